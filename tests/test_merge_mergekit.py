"""Our baselines agree with mergekit 0.1.5, the reference implementation, configured identically.

Configuration notes (what makes the two compute the same thing):
- task_arithmetic: mergekit's default normalize is false, so θ_0 + lambda·Σ w_t τ_t is ours with
  scale = lambda and the same per-task weights.
- ties: mergekit divides by the summed weights of the agreeing models (`normalize: true`, its default),
  which with our weights is our weighted disjoint mean; `rescale: false` (its default for ties).
  Its trim keeps int(density·n) entries where we keep ceil(density·n): density 0.5 on the tiny zoo's
  even-sized tensors makes both exact. It elects + on a zero sum where we elect nothing: a zero sum
  does not occur with these random floats.
- linear: the experts only, normalised.
- dare_linear / dare_ties are not compared: mergekit draws its drops from torch's global RNG, and its
  `rescale` matches the L1 norm of the task vector instead of dividing by (1 - p), so only the
  distribution could agree, and our own tests check that against the formula.
"""

from __future__ import annotations

import pytest
import torch

from ledmerge.checkpoint import load_state_dict
from ledmerge.merge import merge_models

mergekit = pytest.importorskip("mergekit")
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

TASKS = ("safety", "math", "code")
WEIGHTS = {"safety": 1.0, "math": 0.5, "code": 2.0}


def run_mergekit(config: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False))
    return load_state_dict(out)


@pytest.mark.parametrize("ours, theirs", [
    ({"method": "task_arithmetic", "scale": 0.8, "weights": WEIGHTS},
     {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8, "normalize": False}}),
    ({"method": "ties", "density": 0.5, "scale": 1.0},
     {"merge_method": "ties", "parameters": {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 1.0},
      "unit_weights": True}),
    ({"method": "ties", "density": 0.5, "scale": 0.7, "weights": WEIGHTS},
     {"merge_method": "ties", "parameters": {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 0.7}}),
    ({"method": "linear", "weights": WEIGHTS},
     {"merge_method": "linear", "parameters": {"normalize": True}, "no_base": True}),
], ids=["task_arithmetic", "ties", "ties-weighted", "linear"])
def test_agrees_with_mergekit(tiny_zoo, tmp_path, ours, theirs):
    density = ours.get("density")
    weights = {t: 1.0 for t in TASKS} if theirs.pop("unit_weights", False) else WEIGHTS
    models = []
    for t in TASKS:
        params = {"weight": weights[t], **({"density": density} if density else {})}
        models.append({"model": str(tiny_zoo[t]), "parameters": params})
    config = {**theirs, "models": models, "dtype": "float32", "out_dtype": "float32"}
    if not config.pop("no_base", False):
        config["base_model"] = str(tiny_zoo["base"])
    want = run_mergekit(config, tmp_path / "mergekit")

    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in TASKS}, ours, tmp_path / "ours")
    got = load_state_dict(tmp_path / "ours")
    assert got.keys() == want.keys()
    base = load_state_dict(tiny_zoo["base"])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], base[name]), name  # the comparison is not vacuous


@pytest.mark.parametrize("spec", [
    {"method": "task_arithmetic", "scale": 0.8, "weights": WEIGHTS},
    {"method": "ties", "density": 0.5, "scale": 0.7, "weights": WEIGHTS},
], ids=["task_arithmetic", "ties"])
def test_mergekit_runs_the_exported_config_to_our_merge(tiny_zoo, tmp_path, spec):
    """The mergekit_config.yml a merge writes, run by mergekit as it is, gives our merged weights."""
    import yaml

    from ledmerge.merge.mergekit_io import FILE_NAME

    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in TASKS}, spec, tmp_path / "ours")
    exported = yaml.safe_load((tmp_path / "ours" / FILE_NAME).read_text())
    assert "mergekit_config.yml" in (tmp_path / "ours" / "README.md").read_text()
    want = run_mergekit(exported, tmp_path / "mergekit")
    got = load_state_dict(tmp_path / "ours")
    assert got.keys() == want.keys()
    base = load_state_dict(tiny_zoo["base"])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], base[name]), name
