"""Hugging Face model directories: the one place that reads and writes checkpoint files.

`reader` parses safetensors headers and reads tensor by tensor (`ModelReader`), `writer` writes shards tensor by
tensor (`ShardedWriter`), `compat` checks models against the base before a merge (`check_compatible`).
"""

from .compat import VOCAB_POLICIES, align_rows, check_compatible
from .reader import (
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

__all__ = ["VOCAB_POLICIES", "align_rows", "check_compatible", "INDEX", "PICKLE_HELP", "PICKLE_INDEX", "PICKLE_SINGLE",
           "SINGLE", "ST_DTYPES", "TORCH_TO_ST", "ModelReader", "TensorInfo", "load_state_dict",
           "read_safetensors_header", "tensor_shapes", "weight_files", "ShardedWriter",
           "parse_size"]
