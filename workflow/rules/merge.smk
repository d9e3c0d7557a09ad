# One merged Hugging Face model directory per entry of `merges` in the config (and per data-aware search).


rule merge:
    input:
        unpack(merge_inputs),
    output:
        directory(merged_dir("{merge}")),
    params:
        spec=lambda w: merge_spec_arg(w.merge),
        experts=pairs(TASKS, model_path),
        masks=lambda w: led_masks(merge_method(w.merge)),
        options=section_json("merge"),
        allow_pickle=opt_in("allow_pickle"),
    threads: rule_threads("merge")
    resources:
        **rule_resources("merge", config["merge"]["device"]),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("merge", "{merge}"),
    log:
        f"{LOG}/merge_{{merge}}.log",
    shell:
        "$LEDMERGE --threads {threads} merge --base {input.base} --expert {params.experts} --mask {params.masks} "
        "--spec {params.spec:q} --tokenizer {input.tokenizer} --out {output} --options {params.options:q} "
        "{params.allow_pickle} > {log} 2>&1"
