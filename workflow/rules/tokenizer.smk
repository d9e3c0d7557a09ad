# The run's one tokenizer, chat template and stop tokens (`tokenizer_source`, `chat_template`): every step that
# turns text into token ids reads it, and every merged model gets a copy (src/ledmerge/tokenizer.py).


rule tokenizer:
    input:
        unpack(tokenizer_inputs),
    output:
        directory(TOKENIZER),
    params:
        source=config["tokenizer_source"],
        experts=" ".join(f"{t}={model_path(t)}" for t in TOKENIZER_CANDIDATES if t != "base"),
        alignment_task=config["alignment_task"],
        chat_template=lambda w, input: f"--chat-template {input.chat_template}" if "chat_template" in input.keys() else "",
        trust_remote_code="--trust-remote-code" if config["trust_remote_code"] else "",
    conda:
        CONDA_ENV
    log:
        f"{LOG}/tokenizer.log",
    shell:
        "$LEDMERGE tokenizer --source {params.source:q} --base {input.base} --expert {params.experts} "
        "--alignment-task {params.alignment_task} {params.chat_template} {params.trust_remote_code} --out {output} "
        "> {log} 2>&1"
