# Sweeps (config `sweeps`, expanded by ledmerge.sweeps): every point is merged and evaluated by the ordinary rules
# (`use rule ... with:` below changes only their paths and the swept values), as a branch of its own under
# results/sweeps/. Each stage's output is named by the values it depends on (ledmerge.sweeps: scores by zoo seed
# and location, elections by pattern and the task's rate, masks by every rate, merges by the point), and a stage
# equal to the main run's reads the main run's files, so a point reruns only what its own values change.
# The points, branch ids and path helpers are in common.smk.


wildcard_constraints:
    zoo_seed=r"\d+",


use rule zoo_base as sweep_zoo_base with:
    output:
        directory(f"{SW}/zoo_seed{{zoo_seed}}/models/base"),
    params:
        seed=lambda w: int(w.zoo_seed),
    log:
        f"{LOG}/sweeps/zoo_base_seed{{zoo_seed}}.log",


use rule zoo_expert as sweep_zoo_expert with:
    input:
        base=f"{SW}/zoo_seed{{zoo_seed}}/models/base",
        train=f"{R}/zoo/data/{{task}}_train.jsonl",
    output:
        directory(f"{SW}/zoo_seed{{zoo_seed}}/models/{{task}}"),
    params:
        seed=lambda w: expert_seed(int(w.zoo_seed), w.task),
    log:
        f"{LOG}/sweeps/zoo_expert_seed{{zoo_seed}}_{{task}}.log",


use rule importance as sweep_importance with:
    input:
        model=lambda w: branch_model(SCORES[w.branch].zoo_seed, "base" if w.role == "base" else w.task),
        weights=lambda w: [] if SCORES[w.branch].zoo_seed is not None else model_inputs(
            "base" if w.role == "base" else w.task
        ),
        calibration=calibration_file("{task}"),
        tokenizer=TOKENIZER,
    output:
        f"{SW}/importance/{{branch}}/{{task}}/{{role}}.safetensors",
    params:
        options=lambda w: as_json({**config["importance"], "location": SCORES[w.branch].values["location"]}),
        random=lambda w: random_args(SCORES[w.branch].values["location"], w.task),
    log:
        f"{LOG}/sweeps/importance_{{branch}}_{{task}}_{{role}}.log",


use rule election as sweep_election with:
    input:
        expert=lambda w: branch_scores(ELECTIONS[w.branch, w.task].scores, w.task, "expert"),
        base=lambda w: branch_scores(ELECTIONS[w.branch, w.task].scores, w.task, "base"),
    output:
        f"{SW}/masks/elected/{{branch}}/{{task}}.safetensors",
    params:
        rate=lambda w: ELECTIONS[w.branch, w.task].values[f"rate_{w.task}"],
        options=lambda w: as_json({**config["election"], "pattern": ELECTIONS[w.branch, w.task].values["pattern"]}),
    log:
        f"{LOG}/sweeps/election_{{branch}}_{{task}}.log",


use rule disjoint as sweep_disjoint with:
    input:
        lambda w: [branch_elected(MASKS[w.branch].elections[t], t) for t in TASKS],
    output:
        masks=[f"{SW}/masks/final/{{branch}}/{t}.safetensors" for t in TASKS],
        stats=f"{SW}/masks/final/{{branch}}/stats.csv",
        overlap=f"{SW}/masks/final/{{branch}}/overlap.csv",
    params:
        elected=lambda w: pairs(TASKS, lambda t: branch_elected(MASKS[w.branch].elections[t], t)),
        out=lambda w: pairs(TASKS, lambda t: branch_mask(w.branch, t)),
    log:
        f"{LOG}/sweeps/disjoint_{{branch}}.log",


use rule merge as sweep_merge with:
    input:
        unpack(sweep_merge_inputs),
    output:
        directory(f"{SW}/merged/{{point}}"),
    params:
        spec=lambda w: as_json(BRANCHES[w.point].spec),
        experts=lambda w: pairs(TASKS, lambda t: branch_model(BRANCHES[w.point].zoo_seed, t)),
        masks=lambda w: pairs(TASKS, lambda t: branch_mask(BRANCHES[w.point].masks, t))
        if BRANCHES[w.point].uses_masks
        else "",
    log:
        f"{LOG}/sweeps/merge_{{point}}.log",


use rule evaluation as sweep_evaluation with:
    input:
        model=f"{SW}/merged/{{point}}",
        data=[eval_data(k) for k in EVAL_SETS if eval_data(k)],
        judge=judge_model(),
        tokenizer=TOKENIZER,
    output:
        metrics=f"{SW}/eval/{{point}}/metrics.json",
        generations=f"{SW}/eval/{{point}}/generations.jsonl",
    params:
        opt_ins=opt_in("trust_remote_code"),  # a merge is never an adapter
    log:
        f"{LOG}/sweeps/evaluation_{{point}}.log",


localrules:
    sweeps_report,


rule sweeps_report:
    input:
        [point_metrics(name) for name in POINTS],
    output:
        report(SWEEPS_CSV, category="Sweeps"),
    params:
        points=sweeps_points_json(),
    resources:
        **rule_resources("report"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/sweeps_report.log",
    shell:
        "$LEDMERGE sweeps-report --points {params.points:q} --out {output} > {log} 2>&1"
