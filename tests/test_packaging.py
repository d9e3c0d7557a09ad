"""A normal, non-editable install carries everything the package reads at run time (the config schema, the
lm-eval task YAMLs) and `ledmerge check-config` works from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy, so setuptools' build/ and egg-info never land in the checkout.
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "src"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    # --no-build-isolation: the build backend (setuptools) is already in the environment; offline-safe.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("ledmerge-*.whl")
    return path


def test_wheel_ships_the_schema_and_task_yamls(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ledmerge/schemas/config.schema.yaml" in names
    tasks = {n for n in names if n.startswith("ledmerge/eval_tasks/") and n.endswith(".yaml")}
    shipped = {f"ledmerge/eval_tasks/{p.name}" for p in (REPO / "src" / "ledmerge" / "eval_tasks").glob("*.yaml")}
    assert shipped and tasks == shipped


def test_installed_package_checks_a_config_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = elsewhere / "my.yaml"
    config.write_text((REPO / "config" / "config.yaml").read_text())
    # The installed copy first on the path, the repository's src/ nowhere: it must not read files from the checkout.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-c", "import ledmerge, sys; print(ledmerge.__file__); "
                           "from ledmerge.cli import main; sys.exit(main(['check-config', 'my.yaml']))"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(target)), proc.stdout
    assert "my.yaml: ok" in proc.stdout
