# The run's one tokenizer, chat template and stop tokens (`tokenizer_source`, `chat_template`): every step that
# turns text into token ids reads it, and every merged model gets a copy (src/ledmerge/tokenizer.py).


rule tokenizer:
    input:
        unpack(tokenizer_inputs),
    output:
        directory(TOKENIZER),
    params:
        source=config["tokenizer_source"],
        experts=pairs([t for t in TOKENIZER_CANDIDATES if t != "base"], model_path),
        alignment_task=config["alignment_task"],
        chat_template=lambda w, input: input.chat_template if "chat_template" in input.keys() else "",
        trust_remote_code=opt_in("trust_remote_code"),
    conda:
        CONDA_ENV
    benchmark:
        benchmark_file("tokenizer"),
    log:
        f"{LOG}/tokenizer.log",
    shell:
        "$LEDMERGE tokenizer --source {params.source:q} --base {input.base} --expert {params.experts} "
        "--alignment-task {params.alignment_task} --chat-template {params.chat_template:q} {params.trust_remote_code} --out {output} "
        "> {log} 2>&1"
