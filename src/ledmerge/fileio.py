"""Atomic file and directory writes, so an interrupted step never leaves output a rerun would trust."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

from .errors import LedmergeError

log = logging.getLogger(__name__)


# errno -> what the user is told when an output cannot be written for lack of space, and the fix
DISK_FULL = {
    errno.ENOSPC: "the disk is full (ENOSPC); nothing was kept: free space there or point the config's `results` at "
                  "a larger disk, then rerun",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT); nothing was kept: free space within your quota or point the "
                  "config's `results` at another disk, then rerun",
    errno.EFBIG: "a file exceeds the size limit of the file system or of `ulimit -f` (EFBIG); nothing was kept: raise "
                 "`ulimit -f` or point the config's `results` at another file system, then rerun",
}
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust writers (safetensors) report an errno
_live: set[Path] = set()  # temporary paths this process is writing now


def disk_full_reason(exc: BaseException | None) -> str | None:
    """What to tell the user if the exception (or one it was raised from or while handling) is a disk-full error,
    also one reported by a Rust writer (safetensors: "... (os error 28)"); else None."""
    for _ in range(5):
        if exc is None or isinstance(exc, (LedmergeError, KeyboardInterrupt, SystemExit)):
            return None
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None and not isinstance(exc, OSError):
            match = _OS_ERROR.search(str(exc))
            code = int(match.group(1)) if match else None
        if code in DISK_FULL:
            return DISK_FULL[code]
        exc = exc.__cause__ or exc.__context__
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `target` that an earlier, killed run left (`.{name}.tmp-{pid}-XXXX`
    whose process is gone), and return them. Only this target's own temporaries, by exact pattern; never one
    of a live process (another process's pid that is alive; this process's own live ones). Older names
    without a pid are left alone: nothing says whether their writer still runs."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[a-z0-9_]+")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match:
            continue
        path, pid = Path(entry.path), int(match.group(1))
        if path in _live or (pid != os.getpid() and _pid_alive(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.warning("removed %s, left by an interrupted run (pid %d)", path, pid)
        removed.append(path)
    return removed


def check_replaceable(target: str | os.PathLike, marker: str, *, force: bool = False) -> None:
    """Refuse to replace `target` unless it is absent, an empty directory, or an earlier output of the same step
    (a directory holding `marker`, the file that step writes into every output); `force` lifts the last
    condition, not the link and working-directory ones. Replacing a directory deletes what it holds, so a folder
    of the user's is never replaced by mistake."""
    target = Path(target)
    if target.is_symlink():
        raise LedmergeError(f"output {target} is a symbolic link: give the real path, or remove the link")
    check_output_root(target.parent)
    if not target.exists():
        return
    here = Path.cwd().resolve()
    if target.resolve() == here or target.resolve() in here.parents:
        raise LedmergeError(f"output {target} is the current directory or holds it: name a new directory to write to")
    if force or (target.is_dir() and (not any(target.iterdir()) or (target / marker).is_file())):
        return
    what = "a directory that was not written by this ledmerge step" if target.is_dir() else "a file"
    raise LedmergeError(f"output {target} already exists and is {what} (no {marker} in it); replacing it would delete "
                        "what it holds: choose another output directory, or pass --force to replace it")


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output path that is an input, lies inside one, or holds one: writing it would replace the input."""
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise LedmergeError(f"output {output} is, lies inside or holds the input {given}; writing it would replace "
                                "that input: choose an output directory apart from every input")


def replace_output(tmp: Path, target: Path, marker: str, *, force: bool = False) -> None:
    """Rename the finished directory `tmp` onto `target`, removing what `target` held only where
    `check_replaceable` allows it (checked again here: the target may have appeared since the step started)."""
    check_replaceable(target, marker, force=force)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)


def _follow_umask(path: Path) -> None:
    """Give an output, and everything in it, the mode the user's umask says (0644 and 0755 under umask 022), so
    colleagues on a shared project directory can read it: mkstemp/mkdtemp and safetensors' writer create private
    (0600/0700) files."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, marker: str | None = None,
                force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; rename it onto `target` only if the block succeeds.

    A directory output names its `marker`, a file the block writes into it: an existing `target` is replaced only
    when `check_replaceable` allows it (checked again at the rename), so a directory of the user's is never
    deleted; `force` replaces any (the CLI's --force).

    The temporary is named `.{name}.tmp-{pid}-XXXX`, so a rerun removes what a killed run (kill -9, an
    out-of-memory kill, a node lost) left beside the same target (`remove_stale_temps`; the pid is looked up on
    the rerun's host, so two nodes must not write one target at once, which Snakemake's lock ensures). Running
    out of disk space (ENOSPC, EDQUOT, EFBIG) anywhere in the block is a one-line LedmergeError naming `target`;
    the temporary is removed either way."""
    target = Path(target)
    if directory:
        if marker is None:
            raise ValueError("a directory output names the marker file that proves a later run it is ours")
        check_replaceable(target, marker, force=force)  # checks the parent folder too
    else:
        check_output_root(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    tmp = None
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
        _live.add(tmp)
        yield tmp
        _follow_umask(tmp)
        if directory:
            if not (tmp / marker).is_file():
                raise AssertionError(f"the step writing {target} did not write its marker {marker}")
            replace_output(tmp, target, marker, force=force)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        reason = disk_full_reason(exc)
        if reason:
            raise LedmergeError(f"cannot write {target}: {reason}") from None
        raise
    finally:
        _live.discard(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def check_output_root(path: str | os.PathLike) -> None:
    """A folder to write under (the config's results and hub_dir, an output's parent) must be a directory, or
    creatable, and writable: found before any work rather than by the first write."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise LedmergeError(f"{path} {what}, not a directory: choose another folder to write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LedmergeError(f"{existing} is not writable by you: choose a folder you can write to, or fix its "
                            "permissions")


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "the first would be ignored: keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | os.PathLike, what: str):
    """A YAML file (`what` names it in the error): UTF-8, no key given twice; else one line naming the fix."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise LedmergeError(f"cannot read {what} {path}: {exc.strerror}: check the path") from None
    except UnicodeDecodeError as exc:
        raise LedmergeError(f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}): re-save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        why = getattr(exc, "problem", None) or str(exc)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise LedmergeError(f"{what} {path} is not valid YAML{where}: {' '.join(why.split())}") from None


def read_jsonl(path: str | os.PathLike, *, required: Iterable[str] = (), text: Iterable[str] = ()) -> list[dict]:
    """Read a JSONL file; an empty or malformed file is a LedmergeError naming the line. Fields in `text` must be
    strings (a number or null would be read as its spelling, "None")."""
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"data file {path} does not exist: check the path in your config")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise LedmergeError(f"{path}:{lineno} is not UTF-8 text (byte {raw[exc.start]:#04x}): re-save the file "
                                    "as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LedmergeError(f"{path}:{lineno} is not valid JSON ({exc.msg}): fix or regenerate the file") from None
            if not isinstance(row, dict):
                raise LedmergeError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object: every row is one "
                                    "JSON object such as {\"prompt\": ...}")
            missing = [k for k in required if k not in row]
            if missing:
                raise LedmergeError(f"{path}:{lineno} lacks field(s) {missing}: every row needs {sorted(required)}")
            for key in text:
                if not isinstance(row[key], str):
                    raise LedmergeError(f"{path}:{lineno}: field {key!r} must be a string, got {row[key]!r}: quote "
                                        "it, or fix the row")
            rows.append(row)
    if not rows:
        raise LedmergeError(f"data file {path} is empty: it needs at least one JSON row")
    return rows


# ---- sha256 of input files, remembered across processes ----
# A workflow reads the same checkpoints in many jobs (every merge, score and election of a base and its experts),
# and their model cards and provenance checks want each file's sha256: hashing 1 GB costs ~0.8 s of CPU each time.
# A digest is remembered under the file's identity (path, device, inode, size, mtime and ctime in ns), as git's index
# remembers a file's blob: any write to the file changes its ctime, so a changed file is hashed afresh.
HASH_CACHE_ENV = "LEDMERGE_HASH_CACHE"  # a directory, or "off"
RACY_NS = 2_000_000_000  # files written this recently are not remembered (a write in the same clock tick keeps the stat)


def hash_cache_dir() -> Path | None:
    """Where digests are remembered: `$LEDMERGE_HASH_CACHE`, else `$XDG_CACHE_HOME/ledmerge/sha256` (by default
    ~/.cache/ledmerge/sha256); `LEDMERGE_HASH_CACHE=off` remembers nothing."""
    chosen = os.environ.get(HASH_CACHE_ENV)
    if chosen:
        return None if chosen.lower() in ("off", "0", "false", "no") else Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ledmerge" / "sha256"


def _identity(path: str | os.PathLike, st: os.stat_result) -> str:
    return f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"


def _cache_entry(path: str | os.PathLike, st: os.stat_result) -> Path | None:
    where = hash_cache_dir()
    return None if where is None else where / hashlib.sha256(_identity(path, st).encode()).hexdigest()


def known_sha256(path: str | os.PathLike, st: os.stat_result) -> str | None:
    """The remembered sha256 of `path` as `st` (its stat) finds it, or None."""
    entry = _cache_entry(path, st)
    try:
        digest = entry.read_text().strip() if entry is not None else ""
    except OSError:
        return None
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def remember_sha256(path: str | os.PathLike, st: os.stat_result, digest: str) -> None:
    """Remember `digest`, hashed from `path` as `st` (taken before the hashing began) found it, when the file is
    unchanged since and was last written well before (never for a file still being written). The cache is an
    optimisation: a cache directory that cannot be written is ignored."""
    entry = _cache_entry(path, st)
    if entry is None or st.st_mtime_ns > time.time_ns() - RACY_NS:
        return
    try:
        if _identity(path, os.stat(path)) != _identity(path, st):
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError as exc:
        log.debug("cannot remember the sha256 of %s in %s: %s", path, entry.parent, exc)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in 16 MiB chunks, or remembered from an earlier hash of the same file)."""
    st = os.stat(path)
    digest = known_sha256(path, st)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    remember_sha256(path, st, h.hexdigest())
    return h.hexdigest()
