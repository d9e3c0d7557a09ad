# Summary table (CSV + Markdown) and figures for every model, and what each rule's jobs cost (run_costs).
# Both rules here are seconds of work on small files: on a cluster they run on the submitting host (local rules)
# instead of waiting in the queue for a node, as does `sweeps_report` (sweeps.smk).

localrules:
    report,
    paper,


REPORT_FIGURES = ["safety_utility", "benchmarks", "mask_overlap"] + (["cmaes_fitness"] if EVOLVED else [])


rule report:
    input:
        metrics=[eval_file(m, "metrics.json") for m in MODELS],
        stats=MASK_STATS,
        overlap=MASK_OVERLAP,
        histories=[f"{search_dir(m)}/history.csv" for m in EVOLVED],
        # every job's benchmark record but this rule's and the paper's (they come after it): its costs, per rule
        benchmarks=job_benchmarks(),
    output:
        csv=report(f"{REPORT}/summary.csv", category="Summary"),
        md=f"{REPORT}/summary.md",
        figures=[report(f"{REPORT}/{f}.png", category="Figures") for f in REPORT_FIGURES],
        costs=report(f"{REPORT}/run_costs.csv", category="Run costs"),
        costs_md=f"{REPORT}/run_costs.md",
        costs_figure=report(f"{REPORT}/run_costs.png", category="Run costs"),
    params:
        out_dir=lambda w, output: os.path.dirname(output.csv),
        metrics=pairs(MODELS, lambda m: f"{model_kind(m)}={eval_file(m, 'metrics.json')}"),
        histories=pairs(EVOLVED, lambda m: f"{search_dir(m)}/history.csv"),
        requested=lambda w: requested_resources(),  # at job time: every rule is defined by then
    resources:
        **rule_resources("report"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("report"),
    log:
        f"{LOG}/report.log",
    shell:
        "$LEDMERGE --threads {threads} report --metrics {params.metrics} --mask-stats {input.stats} "
        "--mask-overlap {input.overlap} --history {params.histories} --benchmarks {input.benchmarks} "
        "--requested {params.requested:q} --out-dir {params.out_dir} > {log} 2>&1"


# Paper outputs: booktabs tables (LaTeX + Markdown) and print-ready figures (PDF + PNG), a fixed set of files
# (an ablation no sweep covers is a placeholder), so the outputs here are static. Captions: workflow/report/.
# Resources: the report's (`resources.report`); both are light.
rule paper:
    input:
        summary=rules.report.output.csv,
        metrics=[eval_file(m, "metrics.json") for m in MODELS],
        stats=MASK_STATS,
        overlap=MASK_OVERLAP,
        localisation=MASK_LOCALISATION,
        sweeps=paper_sweeps,
    output:
        tables=[
            report(f"{PAPER}/{t}.md", caption=f"../report/{t}.rst", category="Paper", subcategory="Tables")
            for t in PAPER_TABLES
        ],
        latex=[f"{PAPER}/{t}.tex" for t in PAPER_TABLES],
        figures=[
            report(f"{PAPER}/{f}.png", caption=f"../report/{f}.rst", category="Paper", subcategory="Figures")
            for f in PAPER_FIGURES
        ],
        pdf=[f"{PAPER}/{f}.pdf" for f in PAPER_FIGURES],
    params:
        out_dir=lambda w, output: os.path.dirname(output.latex[0]),
        metrics=pairs(MODELS, lambda m: eval_file(m, "metrics.json")),
        sweeps=lambda w, input: f"--sweeps {input.sweeps}" if input.sweeps else "",
        # table_paired: the LED merges, each paired with every other merge; its bootstrap seeded with the config's seed
        paired=" ".join(["--seed", str(config["seed"]), "--led", *(m for m in MERGES if merge_method(m) == "led")]),
    resources:
        **rule_resources("report"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("paper"),
    log:
        f"{LOG}/paper.log",
    shell:
        "$LEDMERGE paper --summary {input.summary} --metrics {params.metrics} --mask-stats {input.stats} "
        "{params.paired} "
        "--mask-overlap {input.overlap} --localisation {input.localisation} {params.sweeps} --out-dir {params.out_dir} > {log} 2>&1"
