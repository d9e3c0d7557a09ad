"""The I/O floor: read every tensor of the given model directories once (native dtype), nothing else.

Run as its own process by merge_bench.py, so its time and peak RSS compare with a merge's.
Prints one JSON line: the reader used, tensors and bytes read.
"""

from __future__ import annotations

import json
import sys

from ledmerge.checkpoint import ModelReader

READER = "ledmerge.checkpoint.ModelReader"


def main(dirs: list[str]) -> None:
    n = nbytes = 0
    for d in dirs:
        with ModelReader(d) as r:
            for name in r.names:
                t = r.read(name)  # positioned reads into the tensor: every byte is in memory when it returns
                n += 1
                nbytes += t.numel() * t.element_size()
                del t
    print(json.dumps({"reader": READER, "tensors": n, "bytes": nbytes}))


if __name__ == "__main__":
    main(sys.argv[1:])
