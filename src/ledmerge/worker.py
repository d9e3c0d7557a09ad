"""A warm worker for local workflow runs: jobs fork from a process that has already imported the libraries.

Each job of a small run does seconds of work after seconds of importing torch, transformers and lm-eval (a toy
evaluation: 13 s of CPU, 7 s of it imports). For local execution the Snakefile starts one `serve` process per run
(`onstart`); it imports the libraries once and listens on a Unix socket. `python -m ledmerge ...` (every job's
command) connects when `LEDMERGE_WORKER` names that socket, hands over its arguments, working directory,
environment and standard streams, and the worker forks a child that runs the step exactly as a fresh process
would: the same code on the same inputs, so the same bits. The job's exit status comes back to the client.

Anything the worker cannot honour falls back to a fresh process, never to a different result: no socket (SLURM
jobs on other nodes, the worker not started, `LEDMERGE_WORKER=` empty), an environment variable that libraries
read at import time differing from the worker's (e.g. the fetch rules' HF_HUB_OFFLINE=0), or CUDA initialised
in the worker (a forked child could not use it). If the client is killed (Snakemake cancels the job), the
worker kills the child's process group.

Only the standard library is imported here at module level: the client must start in milliseconds.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time

ENV = "LEDMERGE_WORKER"
# Read by libraries when they are imported (the worker imported them with its own values): a job whose value
# differs runs in a fresh process. Thread counts are not here: the steps set torch's threads explicitly. The CPU
# kernel choices (ATEN_CPU_CAPABILITY, MKL_CBWR, ...: ledmerge.portable) are, so a job never computes with the
# worker's kernels when its own environment asks for others (named one by one: Snakemake sets each job's
# OMP/MKL/OPENBLAS_NUM_THREADS).
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "TOKENIZERS_",
                   "PYTHON", "LD_", "MPLBACKEND", "MPLCONFIGDIR", "XDG_CACHE_HOME", "LEDMERGE_PRELOAD", "ATEN_",
                   "MKL_CBWR", "MKL_DYNAMIC", "MKL_ENABLE_INSTRUCTIONS", "OMP_DYNAMIC", "ONEDNN_", "DNNL_",
                   "OPENBLAS_CORETYPE", "NPY_")
PRELOAD = ("torch", "safetensors.torch", "transformers", "transformers.models.llama.modeling_llama", "jsonschema",
           "yaml", "tqdm", "pandas", "matplotlib", "matplotlib.pyplot", "lm_eval", "lm_eval.evaluator",
           "lm_eval.tasks", "lm_eval.models.huggingface", "ledmerge.cli", "ledmerge.led.location",
           "ledmerge.led.election", "ledmerge.merge", "ledmerge.evaluation", "ledmerge.evaluation.runner", "ledmerge.calibration",
           "ledmerge.zoo.build", "ledmerge.summary", "ledmerge.synthetic_data", "ledmerge.data_aware.fitness",
           "ledmerge.data_aware.evolve", "ledmerge.data_aware.cocktail", "ledmerge.tokenizer")
IDLE_EXIT_S = 3600  # a worker nobody uses goes away (its Snakemake run died without stopping it)


def _import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


def _recv_line(conn: socket.socket, fds: list[int] | None = None) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        if fds is not None:
            chunk, got, _, _ = socket.recv_fds(conn, 1 << 16, 4)
            fds.extend(got)
        else:
            chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


# ---------------------------------------------------------------------------------------------------------------
# Client: `python -m ledmerge` (see __main__.py)

def run_via_worker(argv: list[str]) -> int | None:
    """The step's exit status, run by the worker; None when it cannot be (then run it in this process)."""
    path = os.environ.get(ENV, "")
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode() + b"\n"
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(conn, [request], [0, 1, 2])
        reply = json.loads(_recv_line(conn))
    except (OSError, ConnectionError, ValueError):
        conn.close()
        return None
    if reply.get("fallback"):
        conn.close()
        return None
    try:  # the worker answers once the child has exited; if we are killed, it kills the child
        return int(json.loads(_recv_line(conn))["exit"])
    except (OSError, ConnectionError, ValueError, KeyError):
        print("ledmerge: error: the warm worker stopped while running this step: rerun it "
              f"(or unset {ENV} to run steps in fresh processes)", file=sys.stderr)
        return 1
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Starting and stopping (the Snakefile's onstart / onsuccess / onerror)

_started: list = []


def start(log_path: str) -> None:
    """Start a worker for the jobs of this process (a local Snakemake run) and point them at it through
    LEDMERGE_WORKER; `LEDMERGE_WORKER=off` in the environment keeps every job in a fresh process."""
    import subprocess
    import tempfile

    if os.environ.get(ENV) == "off" or _started:
        return
    path = os.path.join(tempfile.gettempdir(), f"ledmerge-worker-{os.getpid()}.sock")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "w") as log:
        _started.append(subprocess.Popen([sys.executable, "-m", "ledmerge.worker", path], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True))
    os.environ[ENV] = path


def stop() -> None:
    """Stop the worker `start` started (it also stops by itself when its parent exits)."""
    while _started:
        proc = _started.pop()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()


# ---------------------------------------------------------------------------------------------------------------
# Server: `python -m ledmerge.worker SOCKET`

def _preload() -> object:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional library missing: its steps just import it themselves
            print(f"ledmerge worker: not preloaded {name}: {exc}", file=sys.stderr)
    import torch

    return torch.get_rng_state()


def _run_child(conn: socket.socket, listener: socket.socket, request: dict, fds: list[int], rng_state,
               added: dict) -> None:
    """In the forked child: become the job (streams, directory, environment, argv), run the step, exit."""
    code = 1
    try:
        listener.close()
        conn.close()
        os.setpgid(0, 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**added, **request["env"]})
        sys.argv = [f"{sys.executable} -m ledmerge", *request["argv"]]
        import tempfile

        import torch

        tempfile.tempdir = None  # TMPDIR is per job
        torch.set_rng_state(rng_state)  # as a fresh process would start
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from ledmerge.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str, idle_exit_s: float = IDLE_EXIT_S) -> None:
    """Listen on `path` until SIGTERM, the parent's exit, or `idle_exit_s` without a job."""
    parent = os.getppid()
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # bound before the imports: early clients wait in the backlog instead of falling back
    listener.listen(64)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    started = time.time()
    before = dict(os.environ)
    base_env = _import_time_env(before)
    rng_state = _preload()
    # What the imports themselves set (e.g. torch's TORCHINDUCTOR_CACHE_DIR): a fresh process would have it too.
    added = {k: v for k, v in os.environ.items() if k not in before}
    print(f"ledmerge worker: ready on {path} after {time.time() - started:.1f} s", file=sys.stderr, flush=True)

    import torch

    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[socket.socket, int] = {}  # client connection -> child pid
    last_job = time.time()
    try:
        while not stop and os.getppid() == parent:
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    fds: list[int] = []
                    try:
                        request = json.loads(_recv_line(conn, fds))
                    except (OSError, ConnectionError, ValueError):
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    why = _fallback_reason(request, fds, base_env, torch)
                    if why:
                        print(f"ledmerge worker: {' '.join(request.get('argv', [])[:1])} runs in a fresh process: {why}",
                              file=sys.stderr, flush=True)
                        for fd in fds:
                            os.close(fd)
                        conn.sendall(b'{"fallback": true}\n')
                        conn.close()
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        _run_child(conn, listener, request, fds, rng_state, added)
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b'{"started": true}\n')
                    children[conn] = pid
                    sel.register(conn, selectors.EVENT_READ)
                else:  # a client closed its end before its child finished: the job was cancelled
                    conn = key.fileobj
                    sel.unregister(conn)
                    pid = children.pop(conn)
                    conn.close()
                    _kill(pid)
            for conn, pid in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    sel.unregister(conn)
                    del children[conn]
                    code = os.waitstatus_to_exitcode(status)
                    try:
                        conn.sendall(json.dumps({"exit": code if code >= 0 else 128 - code}).encode() + b"\n")
                    except OSError:
                        pass
                    conn.close()
                    last_job = time.time()
            if not children and time.time() - last_job > idle_exit_s:
                break
    finally:
        for pid in children.values():
            _kill(pid)
        listener.close()
        if os.path.exists(path):
            os.unlink(path)


def _fallback_reason(request: dict, fds: list[int], base_env: dict, torch) -> str:
    """Why this job cannot fork from the worker ('' when it can)."""
    if len(fds) != 3:
        return f"{len(fds)} file descriptors received, expected 3"
    env = _import_time_env(request["env"])
    if env != base_env:
        return f"import-time environment differs ({sorted(set(env.items()) ^ set(base_env.items()))[:4]})"
    if torch.cuda.is_initialized():
        return "CUDA is initialised in the worker"
    return ""


def _kill(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        for _ in range(50):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.1)


if __name__ == "__main__":
    serve(sys.argv[1])
