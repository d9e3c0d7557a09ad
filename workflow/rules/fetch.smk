# Downloads, run on the submitting host (local rules: cluster nodes often have no network), so that every
# other job reads local files only and may run with HF_HUB_OFFLINE=1 (these two rules override it).
# Models given as {hub: org/name}, and Hugging Face datasets used for calibration or evaluation prompts;
# the toy experiment needs neither.

localrules:
    fetch_model,
    fetch_dataset,


rule fetch_model:
    output:
        directory(f"{HUB}/{{repo}}"),
    wildcard_constraints:
        repo="|".join(re.escape(os.path.basename(d)) for d in HUB_MODELS) or "no-hub-model",
    params:
        repo=lambda w: HUB_MODELS[f"{HUB}/{w.repo}"]["hub"],
        revision=lambda w: HUB_MODELS[f"{HUB}/{w.repo}"]["revision"],  # filled by config validation
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("fetch_model", "{repo}"),
    log:
        f"{LOG}/fetch_model_{{repo}}.log",
    shell:
        "HF_HUB_OFFLINE=0 $LEDMERGE fetch-model --repo {params.repo} --revision {params.revision} --out {output} > {log} 2>&1"


rule fetch_dataset:
    output:
        PATHS.dataset("{dataset}"),
    wildcard_constraints:
        dataset=DATASET_NAME,
    params:
        spec=lambda w: as_json(DATASETS[w.dataset][0]),
        columns=lambda w: as_json(DATASETS[w.dataset][1]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("fetch_dataset", "{dataset}"),
    log:
        f"{LOG}/fetch_dataset_{{dataset}}.log",
    shell:
        "HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 $LEDMERGE fetch-dataset --spec {params.spec:q} --columns {params.columns:q} --out {output} > {log} 2>&1"
