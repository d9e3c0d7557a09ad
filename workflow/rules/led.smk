# LED: Location (importance scores), Election, Disjoint.


rule calibration:
    input:
        calibration_pool,
    output:
        f"{R}/calibration/{{task}}.jsonl",
    params:
        source=lambda w: as_json(config["tasks"][w.task]["calibration"]),
        size=config["calibration"]["size"],
        seed=config["calibration"]["seed"],
        pool=lambda w, input: f"--pool {input[0]}" if input else "",
    threads: rule_threads("calibration", 1)
    resources:
        **rule_resources("calibration"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/calibration_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} calibrate --task {wildcards.task} --source {params.source:q} --size {params.size} "
        "--seed {params.seed} {params.pool} --out {output} > {log} 2>&1"


rule importance:
    input:
        model=lambda w: model_path("base" if w.role == "base" else w.task),
        weights=lambda w: model_inputs("base" if w.role == "base" else w.task),
        calibration=f"{R}/calibration/{{task}}.jsonl",
        tokenizer=TOKENIZER,
    output:
        f"{R}/importance/{{task}}/{{role}}.safetensors",
    wildcard_constraints:
        role="base|expert",
    params:
        options=as_json(config["scoring"]),
        trust_remote_code="--trust-remote-code" if config["trust_remote_code"] else "",
        allow_pickle="--allow-pickle" if config["allow_pickle"] else "",
    threads: rule_threads("importance")
    resources:
        **rule_resources("importance", scoring_device()),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/importance_{{task}}_{{role}}.log",
    shell:
        "$LEDMERGE --threads {threads} score --model {input.model} --calibration {input.calibration} "
        "--tokenizer {input.tokenizer} --out {output} "
        "--options {params.options:q} {params.trust_remote_code} {params.allow_pickle} > {log} 2>&1"


rule election:
    input:
        expert=f"{R}/importance/{{task}}/expert.safetensors",
        base=f"{R}/importance/{{task}}/base.safetensors",
    output:
        f"{R}/masks/elected/{{task}}.safetensors",
    params:
        rate=lambda w: config["tasks"][w.task]["rate"],
        pattern=config["election"]["pattern"],
    threads: rule_threads("election", 1)
    resources:
        **rule_resources("election"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/election_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} elect --expert {input.expert} --base {input.base} --rate {params.rate} "
        "--pattern {params.pattern} --out {output} > {log} 2>&1"


rule disjoint:
    input:
        expand(f"{R}/masks/elected/{{task}}.safetensors", task=TASKS),
    output:
        masks=expand(f"{R}/masks/final/{{task}}.safetensors", task=TASKS),
        stats=f"{R}/masks/stats.csv",
        overlap=f"{R}/masks/overlap.csv",
    params:
        elected=" ".join(f"{t}={R}/masks/elected/{t}.safetensors" for t in TASKS),
        out=" ".join(f"{t}={R}/masks/final/{t}.safetensors" for t in TASKS),
    threads: rule_threads("disjoint", 1)
    resources:
        **rule_resources("disjoint"),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/disjoint.log",
    shell:
        "$LEDMERGE --threads {threads} disjoint --elected {params.elected} --out {params.out} --stats {output.stats} "
        "--overlap {output.overlap} > {log} 2>&1"
