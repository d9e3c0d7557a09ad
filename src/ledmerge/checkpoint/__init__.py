"""Hugging Face model directories: the one place that reads and writes checkpoint files.

`reader` parses safetensors headers and reads tensor by tensor (`ModelReader`), `writer` writes shards tensor by
tensor (`ShardedWriter`), `compat` checks models against the base before a merge (`check_compatible`), `adapter`
reads a PEFT LoRA adapter as the expert it makes with the base (`AdapterReader`, `open_model`).
"""

from .adapter import AdapterReader, check_adapter, is_adapter, open_model
from .compat import VOCAB_POLICIES, align_rows, check_compatible
from .reader import (
                     ADAPTER_CONFIG,
                     ADAPTER_WEIGHTS,
                     INDEX,
                     PICKLE_HELP,
                     PICKLE_INDEX,
                     PICKLE_SINGLE,
                     SINGLE,
                     ST_DTYPES,
                     TORCH_TO_ST,
                     ModelReader,
                     TensorInfo,
                     load_state_dict,
                     read_safetensors_header,
                     tensor_shapes,
                     weight_files,
)
from .writer import ShardedWriter, parse_size

__all__ = ["AdapterReader", "check_adapter", "is_adapter", "open_model", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
           "VOCAB_POLICIES", "align_rows", "check_compatible", "INDEX", "PICKLE_HELP", "PICKLE_INDEX", "PICKLE_SINGLE",
           "SINGLE", "ST_DTYPES", "TORCH_TO_ST", "ModelReader", "TensorInfo", "load_state_dict",
           "read_safetensors_header", "tensor_shapes", "weight_files", "ShardedWriter",
           "parse_size"]
