"""Merge methods behind one interface, mergekit-style: a registry of small method modules plus one driver.

`registry` (the methods and post-steps by name: `get_method`, `register`), `driver` (`merge_models`), `card` (the
model card), `base` (the method and post-step interfaces), `params` (parameter declarations and checks), `numerics`
(the sums whose bits matter); the task-vector family is one method, `task_vectors`, built from a sparsification
(`sparsify`) and a consensus (`consensus`), which LED (`led`) reuses with its masks (read by
`ledmerge.led.files.MaskFiles`); then one module per other method or post-step (`linear`, `slerp`, `resta`,
`safemerge`).
"""

from .base import MergeMethod, PostStep, TensorContext
from .driver import merge_device, merge_models
from .params import Param
from .registry import METHODS, POST_STEPS, get_method, reference_markdown, register
from .task_vectors import TaskVectorMethod

__all__ = ["MergeMethod", "Param", "PostStep", "TaskVectorMethod", "TensorContext", "merge_device",
           "merge_models", "METHODS", "POST_STEPS", "get_method", "reference_markdown", "register"]
