"""Hugging Face model directories: the one place that reads and writes checkpoint files.

`model_files` says which files hold a model's weights (no torch: the workflow asks it for every job it plans), `reader`
parses safetensors headers and reads tensor by tensor (`ModelReader`), `writer` writes shards tensor by tensor
(`ShardedWriter`), `compat` checks models against the base before a merge (`check_compatible`), `adapter` reads a
PEFT LoRA adapter as the expert it makes with the base (`AdapterReader`, `open_model`).

The names below are imported from their module on first use, so that `from ledmerge.checkpoint import INDEX`
does not import torch.
"""

import importlib

_MODULES = {
    "model_files": ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "INDEX", "PICKLE_HELP", "PICKLE_INDEX", "PICKLE_SINGLE", "SINGLE",
              "is_adapter", "weight_files", "weight_layout"],
    "reader": ["ST_DTYPES", "TORCH_TO_ST", "ModelReader", "TensorInfo", "TensorSlices", "read_safetensors_header",
               "tensor_shapes"],
    "writer": ["ShardedWriter", "parse_size"],
    "compat": ["VOCAB_POLICIES", "align_rows", "check_compatible"],
    "adapter": ["AdapterReader", "check_adapter", "load_state_dict", "open_model"],
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
