"""Score and mask files: the same tensors and metadata give the same bytes, whichever process writes them."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from safetensors.torch import load_file

WRITE = """
import sys, torch
from ledmerge.led.files import save_tensors
save_tensors(sys.argv[1], {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5)},
             metadata={f"key{i}": str(i) for i in range(12)})
"""


def test_save_tensors_is_byte_identical_across_processes(tmp_path):
    # safetensors itself writes __metadata__ in a per-process hash order (two runs differ without the sort).
    digests = set()
    for i in range(2):
        path = tmp_path / f"s{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        assert load_file(str(path))["b"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert len(digests) == 1
