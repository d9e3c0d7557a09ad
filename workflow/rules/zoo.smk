# The embedded toy experiment: data, tokenizer, base and experts, built offline and deterministically.

ZOO_FILES = ["pretrain", "harmful_eval", "benign_eval", "math_eval", "code_eval"] + [
    f"{t}_{split}" for t in ("safety", "math", "code") for split in ("train", "calib")
]


rule zoo_data:
    output:
        expand(f"{R}/zoo/data/{{name}}.jsonl", name=ZOO_FILES),
        tokenizer=directory(f"{R}/zoo/tokenizer"),
    params:
        data_dir=lambda w, output: os.path.dirname(output[0]),
        options=section_json("zoo"),
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        f"{LOG}/zoo_data.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-data --out-dir {params.data_dir} --tokenizer {output.tokenizer} "
        "--options {params.options:q} --seed {params.seed} > {log} 2>&1"


rule zoo_base:
    input:
        f"{R}/zoo/data/pretrain.jsonl",
        tokenizer=f"{R}/zoo/tokenizer",
    output:
        directory(f"{R}/zoo/models/base"),
    params:
        data_dir=lambda w, input: os.path.dirname(input[0]),
        # without the fine-tuning keys, so changing them does not retrain the base
        options=as_json({k: v for k, v in config["zoo"].items() if k not in ("finetune_steps", "finetune_lr")}),
        seed=config["seed"],
    threads: rule_threads("zoo_base")
    resources:
        **rule_resources("zoo_base"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/zoo_base.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-base --data-dir {params.data_dir} --tokenizer {input.tokenizer} --out {output} "
        "--options {params.options:q} --seed {params.seed} > {log} 2>&1"


rule zoo_expert:
    input:
        base=f"{R}/zoo/models/base",
        train=f"{R}/zoo/data/{{task}}_train.jsonl",
    output:
        directory(f"{R}/zoo/models/{{task}}"),
    wildcard_constraints:
        task="safety|math|code",
    params:
        options=section_json("zoo"),
        seed=lambda w: expert_seed(config["seed"], w.task),
    threads: rule_threads("zoo_expert")
    resources:
        **rule_resources("zoo_expert"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/zoo_expert_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-expert --task {wildcards.task} --base {input.base} --train {input.train} "
        "--out {output} --options {params.options:q} --seed {params.seed} > {log} 2>&1"
