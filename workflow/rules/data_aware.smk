# Data-aware merging ("One bad model spoils the bunch"): synthetic data, then merge coefficients chosen
# on it by CMA-ES (evolve) or from the experts' losses (LM-Cocktail), with and without alignment data.
# Each search writes a merge spec (recipe.json) that the ordinary `merge` rule merges (merge.smk).


rule synthetic:
    input:
        aligned=lambda w: model_path(config["alignment_task"]),  # a function: only read when data-aware is on
        experts=[model_path(t) for t in DOMAIN_TASKS],
        calibration=[calibration_file(t) for t in DOMAIN_TASKS],
        generator=[] if DA["synthetic"]["generator"] == ZOO else DA["synthetic"]["generator"],
        weights=lambda w: model_inputs(config["alignment_task"], *DOMAIN_TASKS),
        generator_weights=lambda w: (
            [] if DA["synthetic"]["generator"] == ZOO else model_inputs(DA["synthetic"]["generator"])
        ),
    output:
        data=f"{SYNTHETIC}/data.jsonl",
        search=f"{SYNTHETIC}/search.jsonl",
        heldout=f"{SYNTHETIC}/heldout.jsonl",
        summary=f"{SYNTHETIC}/summary.json",
    params:
        experts=pairs(DOMAIN_TASKS, model_path),
        calibration=pairs(DOMAIN_TASKS, calibration_file),
        task=config["alignment_task"],
        options=section_json("data_aware.synthetic"),
        out_dir=lambda w, output: os.path.dirname(output.data),
        trust_remote_code=opt_in("trust_remote_code"),
        # the world generator zoo serves questions of (the toy's, or English for a zoo from a real checkpoint)
        zoo_world=f"--zoo-world {zoo_world(config)}" if DA["synthetic"]["generator"] == ZOO else "",
    threads: rule_threads("synthetic")
    resources:
        **rule_resources("synthetic", DA["synthetic"]["device"]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("synthetic"),
    log:
        f"{LOG}/synthetic.log",
    shell:
        "$LEDMERGE --threads {threads} synthetic --aligned {input.aligned} --alignment-task {params.task} "
        "--expert {params.experts} --calibration {params.calibration} --options {params.options:q} "
        "--out-dir {params.out_dir} {params.zoo_world} {params.trust_remote_code} > {log} 2>&1"


# What the two searches (evolve, cocktail) share: inputs (search_inputs), params and most of the command line.
SEARCH_PARAMS = dict(
    experts=pairs(TASKS, model_path),
    fitness=section_json("data_aware.fitness"),
    out_dir=lambda w, output: os.path.dirname(output.recipe),
    opt_ins=f"{opt_in('trust_remote_code')} {opt_in('allow_pickle')}",
)
SEARCH_SHELL = (
    "--base {input.base} --expert {params.experts} --search {input.search} --heldout {input.heldout} "
    "--tokenizer {input.tokenizer} --objective {wildcards.objective} --options {params.options:q} "
    "--fitness {params.fitness:q} --out-dir {params.out_dir} {params.opt_ins} > {log} 2>&1"
)


rule evolve:
    input:
        unpack(search_inputs),
    output:
        history=f"{search_dir(evolve_name('{method}', '{objective}'))}/history.csv",
        recipe=f"{search_dir(evolve_name('{method}', '{objective}'))}/recipe.json",
        summary=f"{search_dir(evolve_name('{method}', '{objective}'))}/search.json",
    wildcard_constraints:
        method="|".join(DA["evolve"]["methods"]) or "none",
        objective="|".join(OBJECTIVES),
    params:
        **SEARCH_PARAMS,
        masks=lambda w: led_masks(w.method),
        options=section_json("data_aware.evolve"),
    threads: rule_threads("evolve")
    resources:
        **rule_resources("evolve", DA["fitness"]["device"]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("evolve", "{method}", "{objective}"),
    log:
        f"{LOG}/evolve_{{method}}_{{objective}}.log",
    shell:
        " ".join(("$LEDMERGE --threads {threads} evolve --method {wildcards.method} --mask {params.masks}", SEARCH_SHELL))


rule cocktail:
    input:
        unpack(search_inputs),
    output:
        recipe=f"{search_dir(cocktail_name('{objective}'))}/recipe.json",
        summary=f"{search_dir(cocktail_name('{objective}'))}/search.json",
    wildcard_constraints:
        objective="|".join(OBJECTIVES),
    params:
        **SEARCH_PARAMS,
        options=section_json("data_aware.cocktail"),
    threads: rule_threads("cocktail")
    resources:
        **rule_resources("cocktail", DA["fitness"]["device"]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("cocktail", "{objective}"),
    log:
        f"{LOG}/cocktail_{{objective}}.log",
    shell:
        " ".join(("$LEDMERGE --threads {threads} cocktail", SEARCH_SHELL))
