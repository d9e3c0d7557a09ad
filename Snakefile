# ledmerge: LED-Merging and baseline merges, scored, merged, evaluated and reported.
# Run from the repository root:  snakemake --cores all   (default: config/config.yaml, the toy zoo)
import sys

from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.fileio import read_yaml


# The default config is used only when none is given: `--configfile my.yaml` replaces it rather
# than being merged into it (a merge would silently add the toy tasks to a real configuration).
if not config:

    configfile: "config/config.yaml"


# validate fills in the defaults, so every process runs it; the checks of files and checkpoints run once, in the
# main process (a cluster job's Snakemake parses this file again, twice: their result would not change).
try:
    if workflow.is_main_process:  # Snakemake's YAML reading keeps the last of a key given twice: refused here
        for path in workflow.configfiles:
            read_yaml(path, "config file")
    validate(config)
    if workflow.is_main_process:
        check(config)
except LedmergeError as exc:
    sys.exit(f"ledmerge: {exc}")


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/zoo.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/led.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/data_aware.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/sweeps.smk"


rule all:
    input:
        rules.report.output,
        rules.paper.output,
        rules.sweeps_report.output if SWEEP_POINTS else [],
    default_target: True


# Local runs: jobs fork from one warm process that has imported torch, transformers and lm-eval once
# (src/ledmerge/worker.py; same results, seconds less per job). Cluster jobs run in fresh processes.
onstart:
    if workflow.local_exec:
        from ledmerge import worker

        worker.start(f"{config['results']}/logs/worker.log")
    else:  # a real cluster run (onstart is skipped by -n): no job goes out with the profile's placeholders
        from ledmerge.config import check_profile

        settings = workflow.resource_settings
        try:
            check_profile(settings.default_resources, settings.overwrite_resources)
        except LedmergeError as exc:
            sys.exit(f"ledmerge: {exc}")


onsuccess:
    from ledmerge import worker

    worker.stop()


onerror:
    from ledmerge import worker

    worker.stop()
