"""lm-evaluation-harness task templates (YAML) and their `!function` hooks (utils.py).

The YAML files leave `dataset_kwargs.data_files` empty: `ledmerge.evaluation.runner` writes a small
wrapper YAML per run that `include:`s a template and fills in the data file. Their `until` is empty too:
the runner sets it (and `max_gen_toks`) at run time from the evaluation tokenizer's EOS tokens, so a
model stops on its own end-of-turn token, not on the toy's `<|end|>`.
"""
