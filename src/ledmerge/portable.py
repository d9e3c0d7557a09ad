"""Portable numerics (the config's `portable_numerics`): the environment that makes the workflow's CPU arithmetic
the same on every x86-64 CPU, not only run to run on one machine.

torch, MKL, oneDNN, numpy and numpy's OpenBLAS each pick their vector kernels at run time from the CPU (SSE, AVX2,
AVX-512), and the kernels round float sums differently: a toy zoo built on an AVX-512 machine and one built on an
AVX2 machine differ in every model's sha256, and every merge of them after. Each library reads its choice from the
environment once, when it is loaded, so the workflow sets these variables before any job starts (and before the
warm worker, which imports torch once for all jobs, starts: workflow/rules/common.smk), never in a job itself.
What each pin does, and what it costs, in docs/results.md ("Reproducibility").

Standard library only: the workflow imports this at parse time.
"""

from __future__ import annotations

import os

# variable -> (value, what it pins). Every value exists on every x86-64 CPU, so no job can fail on an older one.
PINS = {
    "ATEN_CPU_CAPABILITY": ("default", "torch's own kernels (element-wise ops, reductions, softmax, the optimiser): "
                                       "the portable build, not the AVX2 or AVX-512 one"),
    "MKL_CBWR": ("COMPATIBLE", "MKL, torch's float32 matmuls on CPU: the SSE2 code branch, the one MKL documents "
                               "as giving the same results on Intel and AMD CPUs"),
    "MKL_DYNAMIC": ("FALSE", "MKL keeps the thread count it is given (a condition of its reproducible mode)"),
    "OMP_DYNAMIC": ("FALSE", "OpenMP keeps the thread count it is given"),
    "ONEDNN_MAX_CPU_ISA": ("SSE41", "oneDNN (not called by the toy's float32 models; pinned for the ops that use it)"),
    "OPENBLAS_CORETYPE": ("Prescott", "numpy's OpenBLAS (CMA-ES in data-aware merging): its generic SSE kernels"),
    "NPY_DISABLE_CPU_FEATURES": ("X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
                                 "numpy's own loops: its baseline build (names numpy does not dispatch are ignored)"),
}


def environment(config: dict) -> dict[str, str]:
    """The variables to set for every job of a run with `config` (validated: defaults filled in); {} when its
    `portable_numerics` is false (the CPU's own kernels, whatever the environment says)."""
    return {name: value for name, (value, _) in PINS.items()} if config["portable_numerics"] else {}


def pin(config: dict) -> dict[str, str]:
    """Set `environment(config)` in this process's environment, for the processes it starts (jobs, the warm
    worker); values already there are replaced. Returns what was set."""
    env = environment(config)
    os.environ.update(env)
    return env


def in_effect() -> dict:
    """What this process computes with: torch's kernel level and the pins' variables (for a job's log)."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ.get(name) for name in PINS}}
