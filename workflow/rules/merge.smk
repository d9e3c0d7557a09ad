# One merged Hugging Face model directory per entry of `merges` in the config.


rule merge:
    input:
        unpack(merge_inputs),
    output:
        directory(f"{R}/merged/{{merge}}"),
    params:
        spec=lambda w: merge_spec_arg(w.merge),
        experts=" ".join(f"{t}={model_path(t)}" for t in TASKS),
        masks=lambda w: (
            "--mask " + " ".join(f"{t}={R}/masks/final/{t}.safetensors" for t in TASKS)
            if merge_method(w.merge) == "led"
            else ""
        ),
        options=merge_options(),
    threads: rule_threads("merge")
    resources:
        **rule_resources("merge", config["merging"]["device"]),
    conda:
        CONDA_ENV
    log:
        f"{LOG}/merge_{{merge}}.log",
    shell:
        "$LEDMERGE --threads {threads} merge --base {input.base} --expert {params.experts} {params.masks} "
        "--spec {params.spec:q} --tokenizer {input.tokenizer} --out {output} {params.options} > {log} 2>&1"
