"""Writing a model directory as safetensors shards, one tensor at a time.

The header of each shard is computed up front from the plan (name, dtype, shape), so a tensor's bytes go to
disk as soon as it exists and no shard is ever held in memory; the layout matches `save_pretrained`'s (one
model.safetensors, or numbered shards plus model.safetensors.index.json).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import LedmergeError
from .model_files import INDEX, SINGLE
from .reader import TORCH_TO_ST


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


class ShardedWriter:
    """Writes a model's tensors into safetensors shards one tensor at a time.

    The plan (name, dtype, shape) is known up front, so each shard's header is written before its
    data and a tensor's bytes go to disk as soon as it exists: nothing is buffered. `order` is the
    order `write` must be called in (within a shard, wider dtypes first, so every tensor is aligned).
    One shard is written as model.safetensors; several as model-0000i-of-0000n.safetensors plus the index.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | str, metadata: Mapping[str, str] | None = None):
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
