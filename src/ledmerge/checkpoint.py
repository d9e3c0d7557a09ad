"""Reading and writing Hugging Face model directories: the one place that touches checkpoint files.

Reads and writes stream tensor by tensor so a merge's memory is bounded by its largest tensor, not the
model. Safetensors are read with plain positioned reads (`os.preadv` into the tensor's own buffer)
rather than the library's memory map: every mapped page a merge touches counts toward its resident
memory until the file is closed, so reading three 16 GB models through mmap shows as ~48 GB of RSS,
and a cluster's memory accounting kills the job. Writes go through the same format, shard by shard,
with the header computed up front from the plan, so no shard is ever held in memory either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LedmergeError
from .fileio import atomic_path

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_SIZE = 5 * 1000**3  # what save_pretrained and mergekit use

# safetensors dtype codes <-> torch dtypes
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
PICKLE_HELP = ("convert them to safetensors with `AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)`, "
               "or set allow_pickle: true (--allow-pickle) if you trust the files: unpickling can run code")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (as save_pretrained's max_shard_size)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise LedmergeError(f"shard size {value!r} is not a size: write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise LedmergeError(f"shard size {value!r} must be positive")
    return size


# ---------------------------------------------------------------------------------------------
# Reading

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


def _corrupt(path: Path, why: str) -> LedmergeError:
    return LedmergeError(f"cannot read {path} ({why}): the file is corrupt or truncated; re-create or re-download it")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor layout and metadata of one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, "no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 1024**2):
                raise _corrupt(path, f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise LedmergeError(f"cannot read {path} ({exc.strerror}): check the path and permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "bad header")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos = {}
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {name}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or start + end > size:
            raise _corrupt(path, f"tensor {name} lies outside the file")
        infos[name] = TensorInfo(path, dtype, shape, start + begin, start + end)
    return infos, metadata


def _read_exact(fd: int, info: TensorInfo, name: str) -> torch.Tensor:
    """The tensor's raw bytes, read straight into a fresh uint8 tensor (the GIL is released, so a reader
    thread overlaps the merge's compute)."""
    out = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy()) if info.nbytes else memoryview(b"")
    done = 0
    while done < info.nbytes:  # one read returns at most ~2 GiB on Linux
        got = os.preadv(fd, [view[done:done + (1 << 30)]], info.begin + done)
        if got <= 0:
            raise _corrupt(info.file, f"tensor {name} ends early")
        done += got
    return out


class ModelReader:
    """Tensor-by-tensor access to a model directory (single or sharded safetensors).

    `names` lists tensors in file and offset order, so visiting them in order reads every file
    sequentially. Pickle checkpoints are refused unless `allow_pickle` (then loaded with
    `torch.load(weights_only=True, mmap=True)`, one shard at a time).

    With `hash_files`, the bytes read are also fed to a sha256 per file while they are read in file
    order, so the model card's input hashes cost no second pass over the inputs; `sha256s` finishes
    whatever was skipped or read out of order.
    """

    def __init__(self, model_dir: str | os.PathLike, *, allow_pickle: bool = False, hash_files: bool = False):
        self.model_dir = Path(model_dir)
        self._fds: dict[Path, int] = {}
        self._hashes: dict[Path, list] | None = {} if hash_files else None
        self._pickle_shard: tuple[Path, dict] | None = None
        self._digests: dict[Path, str] = {}
        self.infos = self._layout(allow_pickle)
        self.names = sorted(self.infos, key=lambda n: (str(self.infos[n].file), self.infos[n].begin, n))

    def _layout(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        d = self.model_dir
        if not d.is_dir():
            raise LedmergeError(f"model directory {d} does not exist: check the path in your config or build it first")
        if (d / INDEX).is_file():
            files = _index_files(d / INDEX)
        elif (d / SINGLE).is_file():
            files = {d / SINGLE: None}
        elif (d / PICKLE_INDEX).is_file() or (d / PICKLE_SINGLE).is_file() or any(d.glob("*.bin")) or any(d.glob("*.pt")):
            if not allow_pickle:
                raise LedmergeError(f"{d} holds only pickle weights (.bin/.pt), which ledmerge does not load by default: "
                                    + PICKLE_HELP)
            return self._pickle_layout()
        else:
            raise LedmergeError(f"{d} has no {SINGLE} or {INDEX}: is it a Hugging Face model directory?")
        infos: dict[str, TensorInfo] = {}
        for path, expected in files.items():
            if not path.is_file():
                raise LedmergeError(f"shard {path} named by {d / INDEX} is missing: re-download or re-save the model")
            found, _ = read_safetensors_header(path)
            if expected is not None and not expected <= set(found):
                missing = sorted(expected - set(found))[:3]
                raise _corrupt(path, f"it lacks {missing}, which the index places there")
            infos.update(found)
        return infos

    def _pickle_layout(self) -> dict[str, TensorInfo]:
        d = self.model_dir
        if (d / PICKLE_INDEX).is_file():
            files = sorted(_index_files(d / PICKLE_INDEX))
        else:
            files = sorted(d.glob("*.bin")) or sorted(d.glob("*.pt"))
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
                raise _corrupt(path, str(exc).splitlines()[0]) from None
            self._pickle_shard = (path, state)
        return self._pickle_shard[1]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.shape for n, i in self.infos.items()}

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
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            raw = _read_exact(fd, info, name)
            if self._hashes is not None:
                self._hash_in_order(info, raw)
            t = raw.view(info.dtype).reshape(info.shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def _hash_state(self, path: Path) -> list:
        state = self._hashes.get(path)
        if state is None:  # start with the header: everything before the first tensor's data
            start = min((i.begin for i in self.infos.values() if i.file == path), default=path.stat().st_size)
            with open(path, "rb") as fh:
                state = self._hashes[path] = [hashlib.sha256(fh.read(start)), start]
        return state

    def _hash_in_order(self, info: TensorInfo, raw: torch.Tensor) -> None:
        state = self._hash_state(info.file)
        if state[1] == info.begin:
            state[0].update(memoryview(raw.numpy()) if info.nbytes else b"")
            state[1] = info.end

    def sha256s(self) -> dict[Path, str]:
        """sha256 of every weight file; with `hash_files`, only the bytes not yet hashed are read."""
        out = {}
        for path in self.files():
            if self._hashes is None or self.infos[self.names[0]].begin < 0:
                if path not in self._digests:  # pickle files: hashed once
                    self._digests[path] = file_sha256(path)
                out[path] = self._digests[path]
                continue
            h, pos = self._hash_state(path)
            with open(path, "rb") as fh:
                fh.seek(pos)
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
            self._hashes[path] = [h, path.stat().st_size]
            out[path] = h.hexdigest()
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickle_shard = None

    def __enter__(self) -> "ModelReader":
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


def _index_files(index: Path) -> dict[Path, set[str]]:
    """Shard file -> tensor names, from a (safetensors or pickle) index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        by_file: dict[Path, set[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(index.parent / fname, set()).add(name)
        return by_file
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise LedmergeError(f"{index} is not a valid weight index ({exc}): re-download or re-save the model") from None


def weight_files(model_dir: str | os.PathLike, allow_pickle: bool = False) -> list[Path]:
    """The files holding a model's weights (one, or every shard), sorted."""
    with ModelReader(model_dir, allow_pickle=allow_pickle) as r:
        return r.files()


def tensor_shapes(model_dir: str | os.PathLike, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the headers, without reading any weights."""
    with ModelReader(model_dir, allow_pickle=allow_pickle) as r:
        return r.shapes


def load_state_dict(model_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                    allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a model directory in memory, cast to `dtype` when given (small models only:
    merges stream through ModelReader instead)."""
    with ModelReader(model_dir, allow_pickle=allow_pickle) as r:
        return {name: r.read(name, dtype) for name in r.names}


# ---------------------------------------------------------------------------------------------
# Checking inputs against the base

VOCAB_POLICIES = ("error", "base")
_VOCAB_NAME = re.compile(r"(embed|lm_head|wte|wpe|output|word)", re.IGNORECASE)


def _vocab_size(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def check_compatible(base_dir: str | os.PathLike, others: Mapping[str, str | os.PathLike], *,
                     vocab_policy: str = "error", allow_pickle: bool = False) -> dict[str, dict[str, int]]:
    """Every model must hold the base's tensor names with the base's shapes; else one clear error.

    A vocabulary mismatch (an expert with added tokens, a padded embedding: only the rows of the
    embedding/LM-head tensors differ) is an error naming the tensors, unless `vocab_policy` is
    "base": then the merge keeps the base's vocabulary. Returns {model: {tensor: its row count}} for
    the tensors whose rows must be aligned to the base's.
    """
    if vocab_policy not in VOCAB_POLICIES:
        raise LedmergeError(f"vocab_policy must be one of {list(VOCAB_POLICIES)}, got {vocab_policy!r}")
    base = tensor_shapes(base_dir, allow_pickle)
    aligned: dict[str, dict[str, int]] = {}
    for label, other_dir in others.items():
        other = tensor_shapes(other_dir, allow_pickle)
        missing = sorted(set(base) - set(other))
        extra = sorted(set(other) - set(base))
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra tensors {extra[:3]}"
            tied = any("lm_head" in n for n in missing + extra)
            raise LedmergeError(
                f"model '{label}' ({other_dir}) {what} compared with the base ({base_dir}): experts must be fine-tuned "
                "from the same base architecture" + (" (one ties its input and output embeddings and the other does "
                                                     "not: tie_word_embeddings must agree)" if tied else ""))
        vocab = {_vocab_size(Path(base_dir)), _vocab_size(Path(other_dir))} - {None}
        rows: dict[str, int] = {}
        for name, shape in base.items():
            got = other[name]
            if got == shape:
                continue
            only_rows = len(got) == len(shape) >= 1 and got[1:] == shape[1:]
            if only_rows and (got[0] in vocab or _VOCAB_NAME.search(name)):
                rows[name] = got[0]
                continue
            raise LedmergeError(
                f"model '{label}' ({other_dir}) has {name} of shape {list(got)} but the base has {list(shape)}: "
                "experts must share the base's architecture")
        if rows and vocab_policy == "error":
            shown = ", ".join(f"{n} {[rows[n], *base[n][1:]]} vs base {list(base[n])}" for n in sorted(rows)[:2])
            raise LedmergeError(
                f"model '{label}' ({other_dir}) has a different vocabulary from the base ({shown}): set "
                "vocab_policy: base to merge into the base's vocabulary (rows of extra tokens are dropped), or "
                "merge experts that share the base's tokenizer")
        if rows:
            log.warning("model '%s': aligning %s to the base's vocabulary (vocab_policy: base)", label, sorted(rows))
            aligned[label] = rows
    return aligned


def align_rows(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """An expert's embedding-like tensor on the base's rows: extra token rows dropped, missing rows taken
    from the base (a zero task vector there)."""
    n = base.shape[0]
    if tensor.shape[0] >= n:
        return tensor[:n]
    return torch.cat([tensor, base[tensor.shape[0]:].to(tensor.dtype)])


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing

class ShardedWriter:
    """Writes a model's tensors into safetensors shards one tensor at a time.

    The plan (name, dtype, shape) is known up front, so each shard's header is written before its
    data and a tensor's bytes go to disk as soon as it exists: nothing is buffered. `order` is the
    order `write` must be called in (within a shard, wider dtypes first, so every tensor is aligned).
    One shard is written as model.safetensors; several as model-0000i-of-0000n.safetensors plus the index.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, metadata: Mapping[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            nbytes = dtype.itemsize * math.prod(shape)
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        shards = [sorted(s, key=lambda e: -e[1].itemsize) for s in shards if s]  # stable: keeps plan order
        n = len(shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.order = [e[0] for s in shards for e in s]
        self.total_size = sum(e[3] for s in shards for e in s)
        self._next = 0
        self._shard = -1
        self._fh = None
        self._expected: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {
            e[0]: (i, e[1], e[2]) for i, s in enumerate(shards) for e in s}

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header, offset = {}, 0
        for name, dtype, shape, nbytes in self.shards[i]:
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = dict(self.metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / self.files[i], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"ShardedWriter: got {name}, expected {expected}")
        shard, dtype, shape = self._expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"ShardedWriter: {name} is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close the open shard without finishing it (its directory is being discarded); errors are ignored, so a
        full disk does not raise again from an unflushed buffer."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass

    def close(self) -> None:
        """Finish the last shard and write the index; an incomplete model is an error, not a file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._next != len(self.order):
            raise RuntimeError(f"ShardedWriter: {len(self.order) - self._next} tensors were never written")
        if len(self.files) > 1:
            weight_map = {e[0]: self.files[i] for i, s in enumerate(self.shards) for e in s}
            (self.out_dir / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (scores, masks)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise _corrupt(path, str(exc)) from None


def load_tensors(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"{path} does not exist: run the step that writes it first")
    with _open(path) as f:
        keys = list(f.keys()) if names is None else list(names)
        return {k: f.get_tensor(k) for k in keys}


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    with _open(Path(path)) as f:
        return f.metadata() or {}
