"""Merge methods behind one interface, mergekit-style: a registry of small method modules plus one driver.

`registry` (the methods by name: `get_method`, `register`), `driver` (`merge_models`), `card` (the model
card), `base` (the method interface, its parameter declarations, LED mask files) and one module per method.
"""

from .base import MaskFiles, MergeMethod, Param, TaskVectorMethod, TensorContext
from .driver import merge_device, merge_models
from .registry import METHODS, get_method, reference_markdown, register

__all__ = ["MaskFiles", "MergeMethod", "Param", "TaskVectorMethod", "TensorContext", "merge_device", "merge_models",
           "METHODS", "get_method", "reference_markdown", "register"]
