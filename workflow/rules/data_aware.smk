# Data-aware merging ("One bad model spoils the bunch"): synthetic data, then merge coefficients chosen
# on it by CMA-ES (evolve) or from the experts' losses (LM-Cocktail), with and without alignment data.
# Each search writes a merge spec (recipe.json) that the ordinary `merge` rule merges (merge.smk).


rule synthetic:
    input:
        aligned=lambda w: model_path(config["alignment_task"]),  # a function: only read when data-aware is on
        experts=[model_path(t) for t in DOMAIN_TASKS],
        calibration=expand(f"{R}/calibration/{{task}}.jsonl", task=DOMAIN_TASKS),
        generator=[] if DA["synthetic"]["generator"] == ZOO else DA["synthetic"]["generator"],
        weights=lambda w: model_inputs(config["alignment_task"], *DOMAIN_TASKS),
        generator_weights=lambda w: (
            [] if DA["synthetic"]["generator"] == ZOO else model_inputs(DA["synthetic"]["generator"])
        ),
    output:
        data=f"{R}/synthetic/data.jsonl",
        search=f"{R}/synthetic/search.jsonl",
        heldout=f"{R}/synthetic/heldout.jsonl",
        summary=f"{R}/synthetic/summary.json",
    params:
        experts=" ".join(f"{t}={model_path(t)}" for t in DOMAIN_TASKS),
        calibration=" ".join(f"{t}={R}/calibration/{t}.jsonl" for t in DOMAIN_TASKS),
        task=config["alignment_task"],
        options=as_json(DA["synthetic"]),
        out_dir=lambda w, output: os.path.dirname(output.data),
        trust_remote_code="--trust-remote-code" if config["trust_remote_code"] else "",
    threads: rule_threads("synthetic")
    resources:
        **rule_resources("synthetic", DA["synthetic"]["device"]),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/synthetic.log",
    shell:
        "$LEDMERGE --threads {threads} synthesize --aligned {input.aligned} --alignment-task {params.task} "
        "--expert {params.experts} --calibration {params.calibration} --options {params.options:q} "
        "--out-dir {params.out_dir} {params.trust_remote_code} > {log} 2>&1"


rule evolve:
    input:
        unpack(search_inputs),
        tokenizer=f"{R}/tokenizer",  # the run's tokenizer and chat template (the `tokenizer` rule)
    output:
        history=f"{R}/data_aware/evo_{{method}}_{{objective}}/history.csv",
        recipe=f"{R}/data_aware/evo_{{method}}_{{objective}}/recipe.json",
        summary=f"{R}/data_aware/evo_{{method}}_{{objective}}/search.json",
    wildcard_constraints:
        method="|".join(DA["evolve"]["methods"]) or "none",
        objective="align|task",
    params:
        experts=" ".join(f"{t}={model_path(t)}" for t in TASKS),
        masks=lambda w: (
            "--mask " + " ".join(f"{t}={R}/masks/final/{t}.safetensors" for t in TASKS) if w.method == "led" else ""
        ),
        options=as_json({**DA["fitness"], **{k: v for k, v in DA["evolve"].items() if k != "methods"}}),
        out_dir=lambda w, output: os.path.dirname(output.recipe),
        opt_ins=search_opt_ins(),
    threads: rule_threads("evolve")
    resources:
        **rule_resources("evolve", DA["fitness"]["device"]),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/evolve_{{method}}_{{objective}}.log",
    shell:
        "$LEDMERGE --threads {threads} evolve --method {wildcards.method} "
        "--base {input.base} --expert {params.experts} {params.masks} --search {input.search} --heldout {input.heldout} "
        "--tokenizer {input.tokenizer} --objective {wildcards.objective} --options {params.options:q} "
        "--out-dir {params.out_dir} {params.opt_ins} > {log} 2>&1"


rule cocktail:
    input:
        unpack(search_inputs),
        tokenizer=f"{R}/tokenizer",  # the run's tokenizer and chat template (the `tokenizer` rule)
    output:
        recipe=f"{R}/data_aware/cocktail_{{objective}}/recipe.json",
        summary=f"{R}/data_aware/cocktail_{{objective}}/search.json",
    wildcard_constraints:
        objective="align|task",
    params:
        experts=" ".join(f"{t}={model_path(t)}" for t in TASKS),
        masks="",
        options=as_json({**DA["fitness"], **DA["cocktail"]}),
        out_dir=lambda w, output: os.path.dirname(output.recipe),
        opt_ins=search_opt_ins(),
    threads: rule_threads("cocktail")
    resources:
        **rule_resources("cocktail", DA["fitness"]["device"]),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/cocktail_{{objective}}.log",
    shell:
        "$LEDMERGE --threads {threads} cocktail "
        "--base {input.base} --expert {params.experts} {params.masks} --search {input.search} --heldout {input.heldout} "
        "--tokenizer {input.tokenizer} --objective {wildcards.objective} --options {params.options:q} "
        "--out-dir {params.out_dir} {params.opt_ins} > {log} 2>&1"
