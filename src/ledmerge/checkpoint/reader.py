"""Reading Hugging Face model directories tensor by tensor (single or sharded safetensors, pickle on request).

Reads stream tensor by tensor so a merge's memory is bounded by its largest tensor, not the model.
Safetensors are read with plain positioned reads (`os.preadv` into the tensor's own buffer) rather than the
library's memory map: every mapped page a merge touches counts toward its resident memory until the file is
closed, so reading three 16 GB models through mmap shows as ~48 GB of RSS, and a cluster's memory accounting
kills the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LedmergeError, corrupt_file
from ..fileio import file_sha256, known_sha256, remember_sha256
from .model_files import weight_layout

log = logging.getLogger(__name__)

# safetensors dtype codes <-> torch dtypes
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor layout and metadata of one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt_file(path, "no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 1024**2):
                raise corrupt_file(path, f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise LedmergeError(f"cannot read {path} ({exc.strerror}): check the path and permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise corrupt_file(path, f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt_file(path, "bad header")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos = {}
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise corrupt_file(path, f"bad header entry for {name}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt_file(path, f"the header gives tensor {name} dtype {entry['dtype']} and shape {list(shape)}, "
                               f"{math.prod(shape) * dtype.itemsize} bytes, but data offsets spanning {end - begin} "
                               "bytes: its header was edited or damaged")
        if begin < 0 or start + end > size:
            raise corrupt_file(path, f"tensor {name} lies outside the file")
        infos[name] = TensorInfo(path, dtype, shape, start + begin, start + end)
    return infos, metadata


def _read_exact(fd: int, info: TensorInfo, name: str, begin: int = 0, end: int | None = None) -> torch.Tensor:
    """Bytes [begin, end) of the tensor's data (default: all), read straight into a fresh uint8 tensor (the GIL is
    released, so a reader thread overlaps the merge's compute)."""
    end = info.nbytes if end is None else end
    out = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(out.numpy()) if end > begin else memoryview(b"")
    done = 0
    while done < end - begin:  # one read returns at most ~2 GiB on Linux
        got = os.preadv(fd, [view[done:done + (1 << 30)]], info.begin + begin + done)
        if got <= 0:
            raise corrupt_file(info.file, f"tensor {name} ends early")
        done += got
    return out


class TensorSlices:
    """One stored tensor read on demand, a flat slice at a time: `slices[a:b]` is a fresh tensor of entries a..b-1
    (stored dtype) read from the file, so a merge of an 8B model's LM head (525M entries, 1 GB per input) need not
    hold every input's copy at once. It offers what a merge method's selection asks of a tensor (`shape`, `dtype`,
    `device`, `numel`, `reshape(-1)`)."""

    device = torch.device("cpu")

    def __init__(self, reader: ModelReader, name: str):
        self.reader, self.name = reader, name
        self.info = reader.infos[name]
        self.shape, self.dtype = torch.Size(self.info.shape), self.info.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def reshape(self, *shape) -> TensorSlices:
        if tuple(shape) not in ((-1,), ((-1,),)):
            raise ValueError("TensorSlices is read flat: reshape(-1) only")
        return self

    def __getitem__(self, part: slice) -> torch.Tensor:
        start, stop, step = part.indices(self.numel())
        if step != 1:
            raise ValueError("TensorSlices reads contiguous slices only")
        size = self.dtype.itemsize
        return self.reader.read_bytes(self.name, start * size, max(stop, start) * size).view(self.dtype)


class ModelReader:
    """Tensor-by-tensor access to a model directory (single or sharded safetensors).

    `names` lists tensors in file and offset order, so visiting them in order reads every file
    sequentially. Pickle checkpoints are refused unless `allow_pickle` (then loaded with
    `torch.load(weights_only=True, mmap=True)`, one shard at a time). In a PEFT adapter directory it reads the
    adapter's own tensors (its low-rank factors, under peft's names); `adapter.AdapterReader` reads the expert
    they make with the base.

    With `hash_files`, the bytes read are also fed to a sha256 per file while they are read in file
    order, so the model card's input hashes cost no second pass over the inputs; `sha256s` finishes
    whatever was skipped or read out of order. The hashing runs in a thread of its own (hashlib releases the GIL),
    off the reads' path, and a file whose digest is remembered (`fileio.known_sha256`) is not hashed at all.
    """

    HASH_BACKLOG = 1 << 28  # bytes read but not yet hashed, at most: the buffers they hold are memory

    def __init__(self, model_dir: str | os.PathLike, *, allow_pickle: bool = False, hash_files: bool = False):
        self.model_dir = Path(model_dir)
        self._fds: dict[Path, int] = {}
        self._hashes: dict[Path, list] | None = {} if hash_files else None
        self._pickle_shard: tuple[Path, dict] | None = None
        self._digests: dict[Path, str] = {}
        self.infos = self._layout(allow_pickle)
        self.names = sorted(self.infos, key=lambda n: (str(self.infos[n].file), self.infos[n].begin, n))
        self._stats: dict[Path, os.stat_result] = {}  # files hashed while read, as they were before the first read
        self._hasher: ThreadPoolExecutor | None = None
        self._backlog: deque[tuple[Future, int]] = deque()
        if hash_files and self.names and self.infos[self.names[0]].begin >= 0:
            for path in self.files():
                st = self._stats[path] = path.stat()
                digest = known_sha256(path, st)
                if digest is not None:
                    self._digests[path] = digest

    def _layout(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        files, pickled = weight_layout(self.model_dir, allow_pickle)
        if pickled:
            return self._pickle_layout(list(files))
        infos: dict[str, TensorInfo] = {}
        for path, expected in files.items():
            found, _ = read_safetensors_header(path)
            if expected is not None and not expected <= set(found):
                missing = sorted(expected - set(found))[:3]
                raise corrupt_file(path, f"it lacks {missing}, which the index places there")
            infos.update(found)
        return infos

    def _pickle_layout(self, files: list[Path]) -> dict[str, TensorInfo]:
        d = self.model_dir
        log.warning("loading pickle weights from %s (allow_pickle is on)", d)
        infos = {}
        tied = _ties_embeddings(d)
        for path in files:
            state = self._pickle_state(path)
            for name, t in state.items():
                if tied and _is_tied_alias(name, t, state):
                    continue  # stored like safetensors, which keeps a tied weight once (under its input name)
                infos[name] = TensorInfo(path, t.dtype, tuple(t.shape), -1, -1)
        return infos

    def _pickle_state(self, path: Path) -> dict:
        if self._pickle_shard is None or self._pickle_shard[0] != path:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise corrupt_file(path, str(exc).splitlines()[0]) from None
            self._pickle_shard = (path, state)
        return self._pickle_shard[1]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.shape for n, i in self.infos.items()}

    def source(self, name: str) -> str:
        """Where tensor `name` is read from, for error messages."""
        return str(self.infos[name].file)

    def files(self) -> list[Path]:
        return sorted({i.file for i in self.infos.values()})

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, in its stored dtype or cast to `dtype`."""
        info = self.infos.get(name)
        if info is None:
            raise LedmergeError(f"{self.model_dir} has no tensor {name}")
        if info.begin < 0:  # pickle
            t = self._pickle_state(info.file)[name].clone()
        else:
            t = self.read_bytes(name, 0, info.nbytes).view(info.dtype).reshape(info.shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def slices(self, name: str) -> TensorSlices:
        """Tensor `name`, read a flat slice at a time (safetensors only)."""
        if self.infos[name].begin < 0:
            raise ValueError(f"{name}: pickle tensors are read whole")
        return TensorSlices(self, name)

    def read_bytes(self, name: str, begin: int, end: int) -> torch.Tensor:
        """Bytes [begin, end) of tensor `name`'s data; hashed when they continue the file's bytes hashed so far."""
        info = self.infos[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        raw = _read_exact(fd, info, name, begin, end)
        if self._hashes is not None and info.file not in self._digests:
            self._hash_in_order(info.file, info.begin + begin, raw)
        return raw

    def _hash_state(self, path: Path) -> list:
        state = self._hashes.get(path)
        if state is None:  # start with the header: everything before the first tensor's data
            start = min((i.begin for i in self.infos.values() if i.file == path), default=path.stat().st_size)
            with open(path, "rb") as fh:
                state = self._hashes[path] = [hashlib.sha256(fh.read(start)), start]
        return state

    def _hash_in_order(self, path: Path, begin: int, raw: torch.Tensor) -> None:
        """Feed bytes read from `begin` of `path` to its sha256 (in the hashing thread) when they are the next ones in
        file order."""
        state = self._hash_state(path)
        if state[1] != begin or not raw.numel():
            return
        state[1] = begin + raw.numel()
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, "sha256")
        self._backlog.append((self._hasher.submit(state[0].update, memoryview(raw.numpy())), raw.numel()))
        pending = sum(n for _, n in self._backlog)
        while self._backlog and (pending > self.HASH_BACKLOG or self._backlog[0][0].done()):
            done, n = self._backlog.popleft()
            done.result()
            pending -= n

    def wait_hashed(self) -> None:
        """Wait until every byte read so far is hashed: a caller that writes into a tensor it read (the merge's
        result overwrites the base's buffer) must first let the hashing thread see the bytes as they were read."""
        while self._backlog:
            self._backlog.popleft()[0].result()

    def sha256s(self) -> dict[Path, str]:
        """sha256 of every weight file; with `hash_files`, only the bytes not yet hashed are read."""
        self.wait_hashed()
        for path in self.files():
            if path in self._digests:
                continue
            if path not in self._stats:  # pickle files, or not hashed while read: hashed whole, once
                self._digests[path] = file_sha256(path)
                continue
            h, pos = self._hash_state(path)
            with open(path, "rb") as fh:
                fh.seek(pos)
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
            self._digests[path] = h.hexdigest()
            remember_sha256(path, self._stats[path], self._digests[path])
        return {path: self._digests[path] for path in self.files()}

    def close(self) -> None:
        self.wait_hashed()
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickle_shard = None

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ties_embeddings(model_dir: Path) -> bool:
    """Whether config.json ties the output embedding to the input one (transformers' default when it does not say)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    tie = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings", True))
    return bool(tie)


def _is_tied_alias(name: str, tensor: torch.Tensor, state: Mapping[str, torch.Tensor]) -> bool:
    """`lm_head.weight` that a pickle state dict of a tied model stores next to the input embedding it aliases
    (torch.save writes both names, sharing storage): same shape and values as an `*embed*` tensor."""
    if not name.endswith("lm_head.weight"):
        return False
    for other, t in state.items():
        if other != name and "embed" in other and t.shape == tensor.shape and t.dtype == tensor.dtype and (
                t.data_ptr() == tensor.data_ptr() or torch.equal(t, tensor)):
            return True
    return False


def tensor_shapes(model_dir: str | os.PathLike, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the headers, without reading any weights."""
    with ModelReader(model_dir, allow_pickle=allow_pickle) as r:
        return r.shapes
