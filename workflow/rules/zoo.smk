# The embedded experiment: data, base and experts, built offline and deterministically. From scratch (the toy
# world) the data rule also writes the toy tokenizer and the base is pretrained on the data; from a real checkpoint
# (zoo.start_from, the real-model miniature) the base is that checkpoint and the data is real English.
# Its files and directories are named in ledmerge.layout (zoo_files, PATHS.zoo_data, PATHS.zoo_model).

rule zoo_data:
    output:
        [PATHS.zoo_data(name) for name in zoo_files(config)],
        **({"tokenizer": directory(PATHS.zoo_tokenizer)} if ZOO_SCRATCH else {}),
    params:
        data_dir=lambda w, output: os.path.dirname(output[0]),
        tokenizer=lambda w, output: f"--tokenizer {output.tokenizer}" if ZOO_SCRATCH else "",
        options=section_json("zoo"),
        seed=config["seed"],
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("zoo_data"),
    log:
        f"{LOG}/zoo_data.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-data --out-dir {params.data_dir} {params.tokenizer} "
        "--options {params.options:q} --seed {params.seed} > {log} 2>&1"


rule zoo_base:
    input:
        unpack(zoo_base_inputs),
    output:
        directory(PATHS.zoo_model("base")),
    params:
        inputs=lambda w, input: (f"--data-dir {os.path.dirname(input.corpus)} --tokenizer {input.tokenizer}"
                                 if ZOO_SCRATCH else ""),
        # without the fine-tuning keys, so changing them does not retrain the base
        options=as_json({k: v for k, v in config["zoo"].items() if k not in ZOO_FINETUNE_KEYS}),
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
        "$LEDMERGE --threads {threads} zoo-base {params.inputs} --out {output} "
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
        **rule_resources("zoo_expert", config["zoo"]["device"]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("zoo_expert", "{task}"),
    log:
        f"{LOG}/zoo_expert_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} zoo-expert --task {wildcards.task} --base {input.base} --train {input.train} "
        "--out {output} --options {params.options:q} --seed {params.seed} > {log} 2>&1"
