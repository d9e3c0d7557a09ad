# LED: Location (importance scores), Election, Disjoint.


rule calibration:
    input:
        pool=lambda w: PATHS.calibration_pool(w.task),
    output:
        calibration_file("{task}"),
    params:
        source=lambda w: as_json(config["tasks"][w.task]["calibration"]),
        options=section_json("calibration"),
    threads: rule_threads("calibration", 1)
    resources:
        **rule_resources("calibration"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("calibration", "{task}"),
    log:
        f"{LOG}/calibration_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} calibration --task {wildcards.task} --source {params.source:q} "
        "--pool {input.pool} --options {params.options:q} --out {output} > {log} 2>&1"


rule importance:
    input:
        unpack(lambda w: on_base(w.task) if w.role == "expert" else {}),
        model=lambda w: model_path("base" if w.role == "base" else w.task),
        weights=lambda w: model_inputs("base" if w.role == "base" else w.task),
        calibration=calibration_file("{task}"),
        tokenizer=TOKENIZER,
    output:
        scores_file("{task}", "{role}"),
    wildcard_constraints:
        role="base|expert",
    params:
        options=section_json("importance"),
        random=lambda w: random_args(config["importance"]["location"], w.task),
        # the opt-ins, and --base for a LoRA expert (its scoring loads the base)
        opt_ins=lambda w: f"{opt_in('trust_remote_code')} {opt_in('allow_pickle')}"
        + (base_flag(w.task) if w.role == "expert" else ""),
    threads: rule_threads("importance")
    resources:
        **rule_resources("importance", importance_device()),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("importance", "{task}", "{role}"),
    log:
        f"{LOG}/importance_{{task}}_{{role}}.log",
    shell:
        "$LEDMERGE --threads {threads} importance --model {input.model} --calibration {input.calibration} "
        "--tokenizer {input.tokenizer} --out {output} --options {params.options:q} {params.random} {params.opt_ins} "
        "> {log} 2>&1"


rule election:
    input:
        expert=scores_file("{task}", "expert"),
        base=scores_file("{task}", "base"),
    output:
        elected_mask("{task}"),
    params:
        rate=lambda w: config["tasks"][w.task]["rate"],
        options=section_json("election"),
    threads: rule_threads("election", 1)
    resources:
        **rule_resources("election"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("election", "{task}"),
    log:
        f"{LOG}/election_{{task}}.log",
    shell:
        "$LEDMERGE --threads {threads} election --expert {input.expert} --base {input.base} --rate {params.rate} "
        "--options {params.options:q} --out {output} > {log} 2>&1"


rule disjoint:
    input:
        [elected_mask(t) for t in TASKS],
    output:
        masks=[final_mask(t) for t in TASKS],
        stats=MASK_STATS,
        overlap=MASK_OVERLAP,
        localisation=MASK_LOCALISATION,
    params:
        elected=pairs(TASKS, elected_mask),
        out=pairs(TASKS, final_mask),
    threads: rule_threads("disjoint", 1)
    resources:
        **rule_resources("disjoint"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("disjoint"),
    log:
        f"{LOG}/disjoint.log",
    shell:
        "$LEDMERGE --threads {threads} disjoint --elected {params.elected} --out {params.out} --stats {output.stats} "
        "--overlap {output.overlap} --localisation {output.localisation} > {log} 2>&1"
