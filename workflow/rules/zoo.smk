# The embedded toy experiment: data, tokenizer, base and experts, built offline and deterministically.
# Its files and directories are named in ledmerge.layout (ZOO_FILES, PATHS.zoo_data, PATHS.zoo_model).


rule zoo_data:
    output:
        [PATHS.zoo_data(name) for name in ZOO_FILES],
        tokenizer=directory(PATHS.zoo_tokenizer),
    params:
        data_dir=lambda w, output: os.path.dirname(output[0]),
        options=section_json("zoo"),
        seed=config["seed"],
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("zoo_data"),
    log:
        f"{LOG}/zoo_data.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-data --out-dir {params.data_dir} --tokenizer {output.tokenizer} "
        "--options {params.options:q} --seed {params.seed} > {log} 2>&1"


rule zoo_base:
    input:
        PATHS.zoo_data(PRETRAIN),
        tokenizer=PATHS.zoo_tokenizer,
    output:
        directory(PATHS.zoo_model("base")),
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
    benchmark:
        benchmark_file("zoo_base"),
    log:
        f"{LOG}/zoo_base.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-base --data-dir {params.data_dir} --tokenizer {input.tokenizer} --out {output} "
        "--options {params.options:q} --seed {params.seed} > {log} 2>&1"


rule zoo_expert:
    input:
        base=PATHS.zoo_model("base"),
        train=PATHS.zoo_data(zoo_train("{task}")),
    output:
        directory(PATHS.zoo_model("{task}")),
    wildcard_constraints:
        task="|".join(ZOO_TASKS),
    params:
        options=section_json("zoo"),
        seed=lambda w: expert_seed(config["seed"], w.task),
    threads: rule_threads("zoo_expert")
    resources:
        **rule_resources("zoo_expert"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("zoo_expert", "{task}"),
    log:
        f"{LOG}/zoo_expert_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-expert --task {wildcards.task} --base {input.base} --train {input.train} "
        "--out {output} --options {params.options:q} --seed {params.seed} > {log} 2>&1"
