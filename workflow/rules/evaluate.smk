# Safety (judged generations) and utility (lm-evaluation-harness) of every model.


rule evaluate:
    input:
        model=lambda w: model_path(w.model),
        weights=lambda w: model_inputs(w.model),
        data=[eval_data(k) for k in EVAL_SETS],
        judge=judge_model(),
        tokenizer=TOKENIZER,
    output:
        metrics=f"{R}/eval/{{model}}/metrics.json",
        generations=f"{R}/eval/{{model}}/generations.jsonl",
    params:
        options=evaluation_options(),
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate", config["evaluation"]["device"]),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/evaluate_{{model}}.log",
    shell:
        "$LEDMERGE --threads {threads} evaluate --model {input.model} --out {output.metrics} "
        "--generations {output.generations} --options {params.options:q} > {log} 2>&1"
