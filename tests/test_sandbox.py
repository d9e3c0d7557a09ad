"""The code sandbox: right verdicts, and misbehaving code contained (time, memory, files, home, network, processes,
disk, env)."""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from ledmerge.evaluation.sandbox import isolation, run_tests

ADD = "def f ( a , b ) : return a + b"  # the toy code expert's style: space-separated, valid as is


def test_passing_code():
    assert run_tests(ADD, ["assert f ( 1 , 2 ) == 3", "assert f ( 0 , 0 ) == 0"], "f")


def test_failing_assert():
    assert not run_tests("def f ( a , b ) : return a - b", ["assert f ( 1 , 2 ) == 3"], "f")


def test_missing_entry_point():
    assert not run_tests("def g ( a , b ) : return a + b", [], "f")


def test_syntax_error():
    assert not run_tests("def f ( a , b ) return", ["assert f ( 1 , 2 ) == 3"], "f")


def test_infinite_loop_killed_by_timeout():
    start = time.time()
    assert not run_tests("def f ( ) :\n    while True : pass", ["f ( )"], "f", timeout=1.0)
    assert time.time() - start < 5


def test_memory_bomb_killed():
    bomb = "def f ( ) :\n    x = []\n    while True : x.append ( ' ' * 10 ** 7 )"
    start = time.time()
    assert not run_tests(bomb, ["f ( )"], "f", timeout=10.0, memory_mb=256)
    assert time.time() - start < 8  # stopped by the address-space limit, not the timeout


def test_writes_happen_in_a_temp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "open ( 'pwned.txt' , 'w' ).write ( 'x' )\nimport os\ncwd = os.getcwd ( )\n" + ADD
    assert run_tests(code, ["assert 'ledmerge-sandbox-' in cwd", "assert f ( 1 , 2 ) == 3"], "f")
    assert not (tmp_path / "pwned.txt").exists()


def test_environment_not_inherited(monkeypatch):
    monkeypatch.setenv("LEDMERGE_SECRET", "x")
    assert run_tests("import os\n" + ADD, ["assert 'LEDMERGE_SECRET' not in os.environ"], "f")
    assert os.environ["LEDMERGE_SECRET"] == "x"


# ---- containment: what "generated code" tries, each attempt fails and the sample counts as failed ----
# Skipped only where util-linux's unshare is missing; where it exists, isolation must work (`isolation()` is None).

needs_namespaces = pytest.mark.skipif(shutil.which("unshare") is None, reason="no util-linux unshare on this OS")


@needs_namespaces
def test_isolation_is_available_where_unshare_is():
    assert isolation() is None


@needs_namespaces
def test_code_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    assert not run_tests(f"open({str(target)!r}, 'w').write('x')\n" + ADD, ["assert f ( 1 , 2 ) == 3"], "f")
    assert not target.exists()


@needs_namespaces
def test_code_cannot_read_the_users_home():
    secret = Path.home() / f".ledmerge-sandbox-secret-{os.getpid()}"
    secret.write_text("token")
    try:
        assert not run_tests(f"print(open({str(secret)!r}).read())\n" + ADD, ["assert f ( 1 , 2 ) == 3"], "f")
        # the check itself: the same code passes when it does not touch the home directory
        assert run_tests(ADD, ["assert f ( 1 , 2 ) == 3"], "f")
    finally:
        secret.unlink()


@needs_namespaces
def test_code_cannot_open_a_network_socket():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + ADD
        assert not run_tests(code, ["assert f ( 1 , 2 ) == 3"], "f")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


@needs_namespaces
def test_fork_bomb_is_stopped():
    start = time.time()
    bomb = "import os\nwhile True:\n    os.fork()\n"
    assert not run_tests(bomb + ADD, ["assert f ( 1 , 2 ) == 3"], "f", timeout=5.0)
    assert time.time() - start < 5  # the first fork fails: not the timeout


@needs_namespaces
def test_filling_the_disk_fails_within_the_sandbox(tmp_path):
    free = shutil.disk_usage(tempfile.gettempdir()).free
    code = ("for i in range(10000):\n    open('f%d' % i, 'wb').write(b'x' * (1 << 20))\n") + ADD
    assert not run_tests(code, ["assert f ( 1 , 2 ) == 3"], "f", timeout=10.0)
    assert shutil.disk_usage(tempfile.gettempdir()).free > free - (64 << 20)  # nothing reached the real disk


def test_time_limit_counts_as_failed():
    assert not run_tests("import time\ntime.sleep(30)\n" + ADD, ["assert f ( 1 , 2 ) == 3"], "f", timeout=1.0)


# sysctls, and the root cgroup of the pids hierarchy (cgroup v1 or v2, whichever this machine has): moving there
# would lift a root-run check's process limit
KERNEL_FILES = [p for p in ("/proc/sys/vm/drop_caches", "/sys/fs/cgroup/pids/cgroup.procs", "/sys/fs/cgroup/cgroup.procs")
                if os.path.exists(p)]


@needs_namespaces
@pytest.mark.parametrize("path", KERNEL_FILES)
def test_code_cannot_write_kernel_interfaces(path):
    assert not run_tests(f"import os\nopen({path!r}, 'w').write(str(os.getpid()))\n", [], None)
