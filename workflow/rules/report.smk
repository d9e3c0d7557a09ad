# Summary table (CSV + Markdown) and figures for every model.

REPORT_FIGURES = ["safety_utility", "benchmarks", "mask_overlap"] + (["cmaes_fitness"] if EVOLVED else [])


rule report:
    input:
        metrics=[eval_file(m, "metrics.json") for m in MODELS],
        stats=MASK_STATS,
        overlap=MASK_OVERLAP,
        histories=[f"{search_dir(m)}/history.csv" for m in EVOLVED],
    output:
        csv=report(f"{R}/report/summary.csv", category="Summary"),
        md=f"{R}/report/summary.md",
        figures=[report(f"{R}/report/{f}.png", category="Figures") for f in REPORT_FIGURES],
    params:
        out_dir=lambda w, output: os.path.dirname(output.csv),
        metrics=pairs(MODELS, lambda m: f"{model_kind(m)}={eval_file(m, 'metrics.json')}"),
        histories=pairs(EVOLVED, lambda m: f"{search_dir(m)}/history.csv"),
    resources:
        **rule_resources("report"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/report.log",
    shell:
        "$LEDMERGE --threads {threads} report --metrics {params.metrics} --mask-stats {input.stats} "
        "--mask-overlap {input.overlap} --history {params.histories} --out-dir {params.out_dir} > {log} 2>&1"
