# Sweeps (config `sweeps`, expanded by ledmerge.sweeps): every point is merged and evaluated by the ordinary rules
# (`use rule ... with:` below changes only their paths and the swept values), as a branch of its own under
# results/sweeps/. Each stage's output is named by the values it depends on (ledmerge.layout: scores by zoo seed
# and location, elections by pattern and the task's rate, masks by every rate, merges by the point's own values),
# and scores equal to the main run's are read from the main run's files, so a point reruns only what its own
# values change. The paths are ledmerge.layout's (branch_*, PATHS.point_*), called here with the wildcards; the
# points and branch tables (SWEEP) are bound in common.smk.


wildcard_constraints:
    zoo_seed=r"\d+",


use rule zoo_base as sweep_zoo_base with:
    output:
        directory(branch_model("{zoo_seed}", "base")),
    params:
        seed=lambda w: int(w.zoo_seed),
    benchmark:
        benchmark_file("sweep_zoo_base", "{zoo_seed}"),
    log:
        f"{LOG}/sweeps/zoo_base_seed{{zoo_seed}}.log",


use rule zoo_expert as sweep_zoo_expert with:
    input:
        base=branch_model("{zoo_seed}", "base"),
        train=PATHS.zoo_data(zoo_train("{task}")),
    output:
        directory(branch_model("{zoo_seed}", "{task}")),
    params:
        seed=lambda w: expert_seed(int(w.zoo_seed), w.task),
    benchmark:
        benchmark_file("sweep_zoo_expert", "{zoo_seed}", "{task}"),
    log:
        f"{LOG}/sweeps/zoo_expert_seed{{zoo_seed}}_{{task}}.log",


use rule importance as sweep_importance with:
    input:
        model=lambda w: branch_model(SWEEP.scores[w.branch].zoo_seed, "base" if w.role == "base" else w.task),
        weights=lambda w: [] if SWEEP.scores[w.branch].zoo_seed is not None else model_inputs(
            "base" if w.role == "base" else w.task
        ),
        calibration=calibration_file("{task}"),
        tokenizer=TOKENIZER,
    output:
        branch_scores("{branch}", "{task}", "{role}"),
    params:
        options=lambda w: as_json({**config["importance"], "location": SWEEP.scores[w.branch].values["location"]}),
        random=lambda w: random_args(SWEEP.scores[w.branch].values["location"], w.task),
    benchmark:
        benchmark_file("sweep_importance", "{branch}", "{task}", "{role}"),
    log:
        f"{LOG}/sweeps/importance_{{branch}}_{{task}}_{{role}}.log",


use rule election as sweep_election with:
    input:
        expert=lambda w: branch_scores(SWEEP.elections[w.branch, w.task].scores, w.task, "expert"),
        base=lambda w: branch_scores(SWEEP.elections[w.branch, w.task].scores, w.task, "base"),
    output:
        branch_elected("{branch}", "{task}"),
    params:
        rate=lambda w: SWEEP.elections[w.branch, w.task].values[f"rate_{w.task}"],
        options=lambda w: as_json(
            {**config["election"], "pattern": SWEEP.elections[w.branch, w.task].values["pattern"]}
        ),
    benchmark:
        benchmark_file("sweep_election", "{branch}", "{task}"),
    log:
        f"{LOG}/sweeps/election_{{branch}}_{{task}}.log",


use rule disjoint as sweep_disjoint with:
    input:
        lambda w: [branch_elected(SWEEP.masks[w.branch].elections[t], t) for t in TASKS],
    output:
        masks=[branch_mask("{branch}", t) for t in TASKS],
        stats=PATHS.branch_mask_stats("{branch}"),
        overlap=PATHS.branch_mask_overlap("{branch}"),
        localisation=PATHS.branch_mask_localisation("{branch}"),
    params:
        elected=lambda w: pairs(TASKS, lambda t: branch_elected(SWEEP.masks[w.branch].elections[t], t)),
        out=lambda w: pairs(TASKS, lambda t: branch_mask(w.branch, t)),
    benchmark:
        benchmark_file("sweep_disjoint", "{branch}"),
    log:
        f"{LOG}/sweeps/disjoint_{{branch}}.log",


# Count-matched controls (sweep axis `control`): the final masks' per-tensor counts, placed at random (seeded by the
# config seed) or by |task vector| (ledmerge.led.controls), under masks/control/<masks id>+<control>/.
rule sweep_control:
    input:
        unpack(sweep_control_inputs),
    output:
        masks=[branch_mask("{branch}", t, control=True) for t in TASKS],
        stats=PATHS.branch_mask_stats("{branch}", control=True),
    wildcard_constraints:
        branch=r"[^/]+\+(random|magnitude)",
    params:
        kind=lambda w: SWEEP.controls[w.branch].values["control"],
        matched=lambda w: pairs(TASKS, lambda t: branch_mask(SWEEP.controls[w.branch].matched, t)),
        out=lambda w: pairs(TASKS, lambda t: branch_mask(w.branch, t)),
        models=sweep_control_models,
        opt_ins=opt_in("allow_pickle"),
    threads: rule_threads("disjoint", 1)
    resources:
        **rule_resources("disjoint"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("sweep_control", "{branch}"),
    log:
        f"{LOG}/sweeps/control_{{branch}}.log",
    shell:
        "$LEDMERGE --threads {threads} control --kind {params.kind} --matched {params.matched} --out {params.out} "
        "--stats {output.stats} {params.models} {params.opt_ins} > {log} 2>&1"


use rule merge as sweep_merge with:
    input:
        unpack(sweep_merge_inputs),
    output:
        directory(PATHS.point_dir("{point}")),
    params:
        spec=lambda w: as_json(SWEEP.points[w.point].spec),
        experts=lambda w: pairs(TASKS, lambda t: branch_model(SWEEP.points[w.point].zoo_seed, t)),
        masks=lambda w: pairs(TASKS, lambda t: branch_mask(SWEEP.points[w.point].masks, t))
        if SWEEP.points[w.point].uses_masks
        else "",
    benchmark:
        benchmark_file("sweep_merge", "{point}"),
    log:
        f"{LOG}/sweeps/merge_{{point}}.log",


use rule evaluation as sweep_evaluation with:
    input:
        model=PATHS.point_dir("{point}"),
        data=[eval_data(k) for k in EVAL_SETS if eval_data(k)],
        judge=judge_model(),
        tokenizer=TOKENIZER,
    output:
        metrics=PATHS.point_eval("{point}", "metrics.json"),
        generations=PATHS.point_eval("{point}", "generations.jsonl"),
    params:
        opt_ins=opt_in("trust_remote_code"),  # a merge is never an adapter
    benchmark:
        benchmark_file("sweep_evaluation", "{point}"),
    log:
        f"{LOG}/sweeps/evaluation_{{point}}.log",


localrules:
    sweeps_report,


rule sweeps_report:
    input:
        [point_metrics(name) for name in SWEEP.points],
        [s for p in SWEEP.points.values() if (s := point_mask_stats(p))],
    output:
        report(SWEEPS_CSV, category="Sweeps"),
    params:
        points=sweeps_points_json(),
    resources:
        **rule_resources("report"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("sweeps_report"),
    log:
        f"{LOG}/sweeps_report.log",
    shell:
        "$LEDMERGE sweeps-report --points {params.points:q} --out {output} > {log} 2>&1"
