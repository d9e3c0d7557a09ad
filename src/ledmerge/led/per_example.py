"""Σ_x |∂L(x)/∂W| for a micro-batch of several examples, exactly, inside one backward pass.

Autograd only ever gives the gradient of the batch's summed loss, Σ_x ∂L(x)/∂W, whose absolute value lets
opposite signs of different examples cancel. But every scored tensor's per-example gradient can be rebuilt,
one module at a time, from what the backward pass already has at that module: the gradient g of its output
and its input, example by example (examples never mix inside a decoder: no batch norm, and with right
padding no real position attends to a pad).

- nn.Linear, y = x Wᵀ: ∂L(x)/∂W = Σ_positions gᵀ x over that example's real positions (one matmul, the same
  arithmetic as the weight gradient autograd computes at batch size 1).
- nn.Embedding: the rows of the example's token ids receive the sums of their positions' g (a sparse
  gradient: only those rows are touched; padding_idx gets none, as in F.embedding).
- An embedding tied to the LM head (one tensor): the example's gradient is the head's dense one plus the
  embedding's rows, and the absolute value must be taken of the sum. The head's backward comes first: it
  sets the example's token rows aside instead of adding them, and the embedding's backward adds
  |head rows + embedding rows|.
- Any other module holding scored tensors (norms, nn.Linear subclasses with a forward of their own): its
  forward is re-run on each example's slice of the saved input and differentiated against that example's
  g (torch.autograd.grad). Exact for any module that treats examples independently; cheap for norms.

Each module's input is saved through autograd (a custom Function on its output), so gradient checkpointing
recomputes it instead of keeping it, and it is freed as soon as the module's backward is done. The scored
tensors are frozen during the pass: the summed weight gradients are never computed.

What cannot be done this way raises `NotBatchable` (the caller then scores one example per pass, which is
exact for every model): a scored tensor shared by modules other than one embedding and one linear head, a
scored module called twice in a forward (weight reuse), or one whose input is not (batch, positions, ...)
(e.g. mixture-of-experts layers, which see a routed subset of the tokens).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn


class NotBatchable(Exception):
    """This model's scored tensors cannot be split per example inside a batch (the reason is the message)."""


class _Tap(torch.autograd.Function):
    """Identity on a module's output; its backward hands (gradient of the output, saved input) to `sink`.
    `anchor` requires grad, so the output is part of the graph even though every parameter is frozen."""

    @staticmethod
    def forward(ctx, sink, out, anchor, saved):
        ctx.sink = sink
        ctx.save_for_backward(saved)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        (saved,) = ctx.saved_tensors
        ctx.sink(g, saved)
        return None, g, None, None


def _is_plain(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


class PerExampleTaps:
    """Hooks that add Σ_{x∈batch} |∂L(x)/∂W| into `acc[name]` for every scored tensor during `loss.backward()`.

    Use as a context manager around the passes, and `with taps.batch(lengths):` around each pass's forward
    (`lengths`: each example's real token count; positions beyond it are padding). `autocast` is entered
    around re-run forwards (the context the model's forward runs in)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor],
                 autocast=contextlib.nullcontext):
        owners: dict[int, list[nn.Module]] = defaultdict(list)
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)].append(module)
        self.autocast = autocast
        self.sinks: dict[nn.Module, object] = {}
        self.ties: dict[nn.Module, dict] = {}
        rerun: dict[nn.Module, list[tuple[nn.Parameter, torch.Tensor]]] = defaultdict(list)
        for name, p in params.items():
            mods = owners[id(p)]
            linears = [m for m in mods if _is_plain(m, nn.Linear) and m.weight is p]
            embeddings = [m for m in mods if _is_plain(m, nn.Embedding) and m.weight is p
                          and m.max_norm is None and not m.scale_grad_by_freq]
            if len(mods) == 1 and linears:
                self.sinks[linears[0]] = self._linear_sink(acc[name], None)
            elif len(mods) == 1 and embeddings:
                self.sinks[embeddings[0]] = self._embedding_sink(acc[name], embeddings[0], None)
            elif len(mods) == 2 and len(linears) == 1 and len(embeddings) == 1:
                tie = self.ties[embeddings[0]] = {"stash": {}}  # "ids": the embedding's input, set by its forward
                self.sinks[linears[0]] = self._linear_sink(acc[name], tie)
                self.sinks[embeddings[0]] = self._embedding_sink(acc[name], embeddings[0], tie)
            elif len(mods) == 1:
                rerun[mods[0]].append((p, acc[name]))
            else:
                raise NotBatchable(f"{name} is shared by {len(mods)} modules")
        for module, pairs in rerun.items():
            self.sinks[module] = self._rerun_sink(module, pairs)
        self.anchor = torch.zeros((), requires_grad=True)
        self.lengths: list[int] = []
        self.in_forward = False
        self.called: set[nn.Module] = set()
        self.handles = []
        self.buffers: dict[tuple, torch.Tensor] = {}

    def _scratch(self, shape, dtype, device) -> torch.Tensor:
        """One reused buffer per weight shape for the example's gradient, instead of a fresh allocation per
        example and layer (on the CPU a large one is new, zero-filled pages each time)."""
        key = (shape, dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self.buffers[key]

    # ---- per-module sinks: (g, saved input) -> add Σ_examples |per-example gradient| ----

    def _linear_sink(self, acc, tie):
        def sink(g, x):
            x = x.to(g.dtype)  # under autocast: the bf16 operand autograd's own weight gradient uses
            grad = self._scratch((g.shape[-1], x.shape[-1]), g.dtype, g.device)
            for i, n in enumerate(self.lengths):
                torch.mm(g[i, :n].t(), x[i, :n], out=grad)
                if tie is not None:  # the tied embedding adds its rows later: set them aside, unsummed
                    rows = torch.unique(tie["ids"][i, :n])
                    tie["stash"][i] = grad[rows]
                    grad[rows] = 0
                acc.add_(grad.abs_())
        return sink

    def _embedding_sink(self, acc, module, tie):
        def sink(g, ids):
            for i, n in enumerate(self.lengths):
                rows, where = torch.unique(ids[i, :n], return_inverse=True)
                grad = torch.zeros((len(rows), g.shape[-1]), dtype=g.dtype, device=g.device)
                grad.index_add_(0, where, g[i, :n])
                if module.padding_idx is not None:
                    grad[rows == module.padding_idx] = 0
                if tie is not None:
                    head = tie["stash"].pop(i, None)
                    if head is not None:
                        grad += head
                acc.index_add_(0, rows, grad.abs_())  # rows are unique: one add per row
        return sink

    def _rerun_sink(self, module, pairs):
        params = [p for p, _ in pairs]

        def sink(g, x):
            try:
                for p in params:
                    p.requires_grad_(True)
                for i, n in enumerate(self.lengths):
                    with torch.enable_grad(), self.autocast():
                        out = module.forward(x[i:i + 1, :n])
                    grads = torch.autograd.grad(out, params, g[i:i + 1, :n], allow_unused=True)
                    for (_, acc), grad in zip(pairs, grads):
                        if grad is not None:
                            acc.add_(grad.abs_())
            finally:
                for p in params:
                    p.requires_grad_(False)
        return sink

    # ---- hooks ----

    def _hook(self, module, args, kwargs, out):
        sink = self.sinks[module]
        if self.in_forward:  # checks on the real forward (a checkpoint recomputation repeats it in backward)
            b, t = len(self.lengths), max(self.lengths)
            if module in self.called:
                raise NotBatchable(f"{type(module).__name__} module is called twice in one forward (weight reuse)")
            self.called.add(module)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if len(args) != 1 or len(tensors) != 1 or not isinstance(out, torch.Tensor) \
                    or tuple(args[0].shape[:2]) != (b, t) or tuple(out.shape[:2]) != (b, t):
                raise NotBatchable(f"a {type(module).__name__} module does not map one (batch, positions, ...) "
                                   "tensor to another")
            if module in self.ties:
                self.ties[module]["ids"] = args[0]
        return _Tap.apply(sink, out, self.anchor, args[0].detach())

    def __enter__(self):
        for module in self.sinks:
            self.handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.buffers.clear()

    @contextlib.contextmanager
    def batch(self, lengths: list[int]):
        """Around one pass's forward: the examples' real lengths (used again by the sinks in its backward)."""
        self.lengths, self.in_forward = list(lengths), True
        self.called.clear()
        try:
            yield
        finally:
            self.in_forward = False
