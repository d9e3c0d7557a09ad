"""The papers' configurations (config/<setup>.yaml) and the SLURM profile, checked offline.

A dry run needs no network and no model on disk: hub models and datasets become fetch_model /
fetch_dataset jobs, and a model's compatibility is checked only once it is local.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import job_stats
from test_workflow import REPO, SNAKEMAKE, env

from ledmerge.config import load, validate
from ledmerge.layout import data_aware_models

PAPER_CONFIGS = ["llama3_8b", "mistral_7b", "llama2_13b", "llama3_8b_bio"]
# Experts per setup (every one is scored with the base on its own data: 2 importance jobs per task).
EXPERTS = {"llama3_8b": 3, "mistral_7b": 2, "llama2_13b": 3, "llama3_8b_bio": 2}


def dry_run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), "-n", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
@pytest.mark.parametrize("setup", PAPER_CONFIGS)
def test_paper_config_dry_runs_offline(setup, tmp_path):
    proc = dry_run("--printshellcmds", "--snakefile", str(REPO / "Snakefile"),
                   "--configfile", str(REPO / "config" / f"{setup}.yaml"), "--directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    # Every evaluation loads the models in bf16 and uses the run's tokenizer directory.
    lines = [m for m in re.findall(r" evaluation --model .*", proc.stdout)]
    options = [json.loads(re.search(r"--options '(\{.*?\})'", line).group(1)) for line in lines]
    assert len(options) == stats["evaluation"]
    assert all(o["dtype"] == "bfloat16" for o in options)
    assert all(re.search(r"--tokenizer \S*/tokenizer ", line) for line in lines)
    cfg = validate(yaml.safe_load((REPO / "config" / f"{setup}.yaml").read_text()))
    n_tasks, n_merges = len(cfg["tasks"]), len(cfg["merges"]) + len(data_aware_models(cfg))
    assert n_tasks == EXPERTS[setup]
    assert bool(data_aware_models(cfg)) == (setup == "llama3_8b_bio")  # the second paper's setup searches
    judge_model = 1 if isinstance(cfg["evaluation"]["judge_kwargs"].get("model"), dict) else 0
    assert stats["fetch_model"] == 1 + n_tasks + judge_model
    assert stats["fetch_dataset"] == n_tasks + 2  # calibration per task, harmful and benign prompts
    assert stats["importance"] == 2 * n_tasks
    assert stats["election"] == n_tasks and stats["disjoint"] == 1
    assert stats["merge"] == n_merges
    assert stats["evaluation"] == 1 + n_tasks + n_merges
    assert stats["report"] == 1


@pytest.mark.parametrize("setup", PAPER_CONFIGS)
def test_paper_config_uses_gpus_and_real_data(setup):
    cfg = yaml.safe_load((REPO / "config" / f"{setup}.yaml").read_text())
    assert cfg["importance"]["device"] == cfg["evaluation"]["device"] == "cuda"
    assert cfg["resources"]["importance"]["gpu"] == cfg["resources"]["evaluation"]["gpu"] == 1
    assert "gpu" not in cfg["resources"]["merge"]  # merging runs on CPU nodes
    assert all(t["calibration"]["source"] == "hf" for t in cfg["tasks"].values())
    assert cfg["evaluation"]["lm_eval_tasks"] and cfg["evaluation"]["judge"] in ("harmbench", "llama_guard")


@pytest.mark.parametrize("setup", PAPER_CONFIGS)
def test_paper_config_scores_like_the_reference_code(setup):
    """The released LED code scores every linear layer, every RMSNorm and the LM head with the per-example mean
    response-token loss; its embeddings end at the base (ours: unscored, and `unscored: base` keeps them)."""
    cfg = load(REPO / "config" / f"{setup}.yaml")
    scoring = cfg["importance"]
    assert (scoring["include_norms"], scoring["include_lm_head"], scoring["include_embeddings"]) == (True, True, False)
    assert scoring["loss_reduction"] == "mean" and scoring["granularity"] == "example"
    assert cfg["merges"]["led"]["unscored"] == "base"
    assert cfg["evaluation"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("setup", PAPER_CONFIGS)
def test_paper_config_states_which_harmbench_behaviours_it_evaluates(setup):
    """HarmBench has 400 text behaviours; the `standard` subset holds 200 of them. A config that loads it says so."""
    text = (REPO / "config" / f"{setup}.yaml").read_text()
    harmful = load(REPO / "config" / f"{setup}.yaml")["evaluation"]["harmful"]
    if isinstance(harmful, dict) and harmful["hf"] == "walledai/HarmBench":
        assert harmful["config_name"] == "standard"
        assert "200 standard behaviours" in text and "contextual" in text and "copyright" in text


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
def test_slurm_profile_dry_runs_from_the_repository_root(tmp_path):
    # The default (toy) config; --directory keeps the check away from the repository's own results (and
    # then the Snakefile and config must be named: relative paths would be read from the directory).
    proc = dry_run("--profile", "slurm", "--snakefile", str(REPO / "Snakefile"),
                   "--configfile", str(REPO / "config" / "config.yaml"), "--directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_stats(proc.stdout)["importance"] == 6


def test_slurm_profile_has_marked_placeholders():
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    assert profile["default-resources"]["slurm_account"].startswith("CHANGE_ME")
    partitions = [profile["default-resources"]["slurm_partition"]]
    partitions += [r["slurm_partition"] for r in profile["set-resources"].values()]
    assert all(p.startswith("CHANGE_ME") for p in partitions)


def test_docs_link_only_inside_the_repository():
    """README and docs/ link to files of this repository that exist (never `../`, never the shared design
    notes), and docs/methods.md documents the differences from the paper and the reference code."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            assert not target.startswith("../"), f"{page.name} links outside the repository: {target}"
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to a missing file: {target}"
    readme = (REPO / "README.md").read_text()
    assert "](docs/methods.md)" in readme and "shared/design" not in readme
    methods = (REPO / "docs" / "methods.md").read_text()
    assert "## Where ledmerge differs from the paper or the reference code" in methods
    for topic in ("_random_prune_core", "loss_reduction", "bf16", "⌈r·n⌉", "HumanEval", "pdb", "chat template"):
        assert topic in methods, topic


@pytest.mark.parametrize("setup", PAPER_CONFIGS)
def test_paper_config_checks_with_real_checkpoints_standing_in(setup, smol_zoo, tmp_path):
    """Hub models cannot be fetched here: the real SmolLM2 fixture stands in for them where `fetch_model` would put
    them. check-config then resolves the chat template as a real run would: the base (like Meta-Llama-3-8B) has
    none, so the tokenizer comes from the aligned expert; and a run whose chosen source has none is refused."""
    from ledmerge.config import check
    from ledmerge.errors import LedmergeError
    from ledmerge.layout import hub_dir, is_hub
    from ledmerge.tokenizer import resolve_source

    cfg = validate(yaml.safe_load((REPO / "config" / f"{setup}.yaml").read_text()))
    cfg["results"], cfg["hub_dir"] = str(tmp_path / "results"), str(tmp_path / "hub")
    stand_in = {"base": smol_zoo["base"], cfg["alignment_task"]: smol_zoo["safety"]}
    for name, source in [("base", cfg["base_model"])] + [(t, cfg["tasks"][t]["model"]) for t in cfg["tasks"]]:
        assert is_hub(source), (setup, name)
        target = Path(hub_dir(cfg, source))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(stand_in.get(name, smol_zoo["math"]))
    check(cfg)
    experts = {t: hub_dir(cfg, cfg["tasks"][t]["model"]) for t in cfg["tasks"]}
    source, why = resolve_source(cfg["tokenizer_source"], hub_dir(cfg, cfg["base_model"]), experts, cfg["alignment_task"])
    assert Path(source).resolve() == smol_zoo["safety"].resolve() and "no chat template" in why
    with pytest.raises(LedmergeError, match="tokenizer_source.*no chat template"):
        check({**cfg, "tokenizer_source": "base"})


@pytest.mark.integration
def test_real_submission_with_the_profiles_placeholders_is_refused(tmp_path):
    """`snakemake --profile slurm` (not -n) with the shipped CHANGE_ME_* account and partitions: one line naming
    them, exit 1, before any job is submitted or any output written."""
    from test_workflow import SNAKEMAKE

    proc = subprocess.run([str(SNAKEMAKE), "--profile", "slurm", "--snakefile", str(REPO / "Snakefile"),
                           "--configfile", str(REPO / "config" / "config.yaml"), "--directory", str(tmp_path), "-j1"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "ledmerge: the profile still holds placeholder(s)" in out and "slurm_account: CHANGE_ME_account" in out
    assert "Job submission" not in out and not (tmp_path / "results").exists()
