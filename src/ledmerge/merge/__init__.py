"""Merge methods behind one interface, mergekit-style: a registry of small method modules plus one driver.

`registry` (the methods and post-steps by name: `get_method`, `register`), `driver` (`merge_models`), `card` (the
model card), `base` (the method and post-step interfaces, their parameter declarations) and one module per
method or post-step (`resta`, `safemerge`). LED's mask files are read by `ledmerge.led.files.MaskFiles`.
"""

from .base import MergeMethod, Param, PostStep, TaskVectorMethod, TensorContext
from .driver import merge_device, merge_models
from .registry import METHODS, POST_STEPS, get_method, reference_markdown, register

__all__ = ["MergeMethod", "Param", "PostStep", "TaskVectorMethod", "TensorContext", "merge_device",
           "merge_models", "METHODS", "POST_STEPS", "get_method", "reference_markdown", "register"]
