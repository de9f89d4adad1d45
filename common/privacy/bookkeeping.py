"""Single-backward DP-SGD clipping ("book-keeping", Bu et al. 2022) on top of Opacus' optimizer.

Opacus' ghost clipping runs the backward pass twice: once with hooks that compute every
record's gradient norm, then again on the loss re-weighted by the clipping coefficients. Here
one ``torch.autograd.grad`` call asks autograd only for the gradient of the summed per-record
loss with respect to every trainable layer's *output* (autograd then skips every weight
gradient); from each layer's input (kept by a forward hook) and that output gradient, the
per-record gradient norms and then the clipped gradient sum ``sum_n c_n grad_n`` are computed
layer by layer, with no second backward:

- ``nn.Linear``: ghost norms (``|a|^2 |g|^2``, or the Gram form for sequences); the clipped sum is
  ``(c g)^T a``.
- ``nn.Embedding`` (and :class:`~fedfuse.common.models.dp_layers.GhostEmbedding`): norms from one
  1-D ``unique``; the clipped sum is an ``index_add`` of the re-weighted output gradients.
- ``nn.Conv2d`` (groups 1, zero padding): per-record weight gradients (DPConv2d's grouped
  backward) in chunks of records, reduced to norms and, when small, kept for the clipped sum
  ``c @ grads``; otherwise one weight-only convolution backward on the re-weighted gradients.
- ``nn.GroupNorm``: per-record affine gradients (Opacus' formula) in chunks of records.
- every other layer with an Opacus grad sampler (LayerNorm, ...): per-record gradients from
  that sampler; small ones are kept and summed with the coefficients, large ones recomputed
  from the re-weighted output gradients (samplers are linear in them).

The coefficients are Opacus' own (``min(1, C / (norm + 1e-6))``) and noise, scaling and
accounting stay with Opacus' ``DPOptimizerFastGradientClipping``, so a step is the same DP-SGD
step as Opacus' ghost or hooks mode (tested against hooks mode in
tests/common/privacy/test_bookkeeping.py). Parameter tying (a layer called twice in one forward) is
rejected.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch import nn

from fedfuse.common.models.dp_layers import conv_weight_grad, dp_conv2d_grad_sample

# Per-record gradients of a generic layer up to this many elements are kept between the norm
# pass and the clipped sum; larger ones are recomputed (bounded memory for wide layers).
KEEP_GRAD_SAMPLE_ELEMENTS = 1 << 24
# Per-record convolution gradients are computed this many elements (2 MiB) at a time.
CHUNK_ELEMENTS = 1 << 19


@dataclass
class _Record:
    module: nn.Module
    activation: torch.Tensor
    output: torch.Tensor
    version: int
    backprop: torch.Tensor | None = None
    kept: dict[nn.Parameter, torch.Tensor] | None = None


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(n, rest)``; unlike ``reshape(n, -1)`` also for an empty batch."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Per-record squared norm of a ``(n, ...)`` tensor."""
    return _rows(x).pow(2).sum(dim=1)


# ---- per layer type: squared per-record gradient norms, and the clipped gradient sum ----------


def _linear_sq_norms(
    layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, _rec: _Record
) -> torch.Tensor:
    n = g.shape[0]
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    a = a.to(g.dtype)
    if g.dim() == 2:
        if layer.weight.requires_grad:
            sq += _sq(a) * _sq(g)
        if layer.bias is not None and layer.bias.requires_grad:
            sq += _sq(g)
        return sq
    a = a.flatten(1, -2)
    g = g.flatten(1, -2)
    if layer.weight.requires_grad:
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if t * t <= d_in * d_out:  # ghost (Gram) form is cheaper than the per-record gradient
            sq += (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
        else:
            sq += _sq(torch.bmm(g.transpose(1, 2), a))
    if layer.bias is not None and layer.bias.requires_grad:
        sq += _sq(g.sum(dim=1))
    return sq


def _linear_clipped(
    layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, _rec: _Record
) -> dict[nn.Parameter, torch.Tensor]:
    cg = g * coef.view(-1, *([1] * (g.dim() - 1)))
    cg2 = cg.reshape(-1, cg.shape[-1])
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = cg2.t() @ a.reshape(-1, a.shape[-1]).to(g.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = cg2.sum(dim=0)
    return out


def _embedding_rows(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor):  # noqa: ANN202
    """Flattened ids and output gradients, with padding positions (no gradient) dropped."""
    n = ids.shape[0]
    ids = _rows(ids).to(torch.int64)
    grads = g.reshape(n, ids.shape[1], g.shape[-1])
    if layer.padding_idx is not None:
        grads = grads * (ids != layer.padding_idx).unsqueeze(-1).to(grads.dtype)
    return ids, grads


def _embedding_sq_norms(
    layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, _rec: _Record
) -> torch.Tensor:
    """Record ``n``'s gradient for row ``v`` sums its output gradients at the positions that
    looked ``v`` up; one 1-D ``unique`` over ``record * vocab + id`` groups them."""
    n = ids.shape[0]
    ids, grads = _embedding_rows(layer, ids, g)
    rows = torch.arange(n, device=ids.device, dtype=torch.int64).unsqueeze(1)
    keys = (rows * layer.num_embeddings + ids).reshape(-1)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(len(uniq), grads.shape[-1], device=g.device, dtype=g.dtype)
    summed.index_add_(0, inverse, grads.reshape(-1, grads.shape[-1]))
    sq = torch.zeros(n, device=g.device, dtype=g.dtype)
    sq.index_add_(0, uniq // layer.num_embeddings, summed.pow(2).sum(dim=1))
    return sq


def _embedding_clipped(
    layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, _rec: _Record
) -> dict[nn.Parameter, torch.Tensor]:
    ids, grads = _embedding_rows(layer, ids, g)
    weighted = (grads * coef.view(-1, 1, 1)).reshape(-1, grads.shape[-1])
    out = torch.zeros_like(layer.weight)
    out.index_add_(0, ids.reshape(-1), weighted.to(out.dtype))
    return {layer.weight: out}


def _conv_sq_norms(
    layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, rec: _Record
) -> torch.Tensor:
    # Per-record weight gradients (grouped-convolution backward or bmm, see DPConv2d), in chunks
    # of records: one grouped backward over a whole batch allocates tens of MiB that the C
    # allocator maps and unmaps on every step (page faults were 3/4 of its time here), while
    # chunks of a few MiB come from the heap. Kept for the clipped sum when they are small.
    n = g.shape[0]
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    rec.kept = {}
    if layer.weight.requires_grad:
        chunk = max(1, CHUNK_ELEMENTS // layer.weight.numel())
        keep = n * layer.weight.numel() <= KEEP_GRAD_SAMPLE_ELEMENTS
        kept = []
        for i in range(0, n, chunk):
            gw = dp_conv2d_grad_sample(layer, [x[i : i + chunk]], g[i : i + chunk])[layer.weight]
            gw = _rows(gw)
            sq[i : i + chunk] = torch.linalg.vector_norm(gw, dim=1).pow(2)
            if keep:
                kept.append(gw)
        if keep:
            rec.kept[layer.weight] = kept
    if layer.bias is not None and layer.bias.requires_grad:
        gb = g.sum(dim=(2, 3))
        sq += gb.pow(2).sum(dim=1)
        rec.kept[layer.bias] = gb
    return sq


def _conv_clipped(
    layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, rec: _Record
) -> dict[nn.Parameter, torch.Tensor]:
    kept = rec.kept or {}
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = coef @ kept[layer.bias]
    if not layer.weight.requires_grad:
        return out
    if layer.weight in kept:
        total, start = torch.zeros_like(layer.weight).reshape(-1), 0
        for gw in kept[layer.weight]:
            total += coef[start : start + gw.shape[0]] @ gw
            start += gw.shape[0]
        out[layer.weight] = total
        return out
    # Too large to keep: one weight-only convolution backward on the re-weighted gradients.
    out[layer.weight] = conv_weight_grad(
        layer, g * coef.view(-1, 1, 1, 1), x.to(g.dtype), layer.weight.detach(), groups=1
    )
    return out


def _group_norm_sq_norms(
    layer: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, rec: _Record
) -> torch.Tensor:
    """Record n's affine gradients: weight ``sum_hw g * x_hat``, bias ``sum_hw g`` per channel
    (Opacus' GroupNorm sampler), in chunks of records so the normalised activations stay small."""
    n, c = x.shape[0], x.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, x[0].numel())) if n else 1
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        gw = torch.empty(n, c, dtype=g.dtype, device=g.device)
        for i in range(0, n, chunk):
            xh = nn.functional.group_norm(
                x[i : i + chunk].to(g.dtype), layer.num_groups, eps=layer.eps
            )
            gw[i : i + chunk] = xh.mul_(g[i : i + chunk]).flatten(2).sum(dim=2)
        grads[layer.weight] = gw
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = g.flatten(2).sum(dim=2)
    rec.kept = grads
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    for gs_p in grads.values():
        sq += gs_p.pow(2).sum(dim=1)
    return sq


def _conv_supported(layer: nn.Module) -> bool:
    return (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _generic_sampler(layer: nn.Module) -> Callable | None:
    for cls in type(layer).__mro__:
        if cls in GradSampleHooks.GRAD_SAMPLERS:
            return GradSampleHooks.GRAD_SAMPLERS[cls]
    return None


def _generic_sq_norms(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, rec: _Record):  # noqa: ANN202
    grads = _generic_sampler(layer)(layer, [a], g)
    if sum(gs.numel() for gs in grads.values()) <= KEEP_GRAD_SAMPLE_ELEMENTS:
        rec.kept = grads
    sq = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    for p, gs in grads.items():
        if p.requires_grad:
            sq += _sq(gs)
    return sq


def _generic_clipped(
    layer: nn.Module, a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, rec: _Record
) -> dict[nn.Parameter, torch.Tensor]:
    if rec.kept is not None:
        return {
            p: torch.tensordot(coef.to(gs.dtype), gs, dims=1)
            for p, gs in rec.kept.items()
            if p.requires_grad
        }
    # Per-record gradients are linear in the output gradient: sum_n c_n grad_n(g) = sum_n
    # grad_n(c g).
    cg = g * coef.view(-1, *([1] * (g.dim() - 1)))
    return {p: gs.sum(dim=0) for p, gs in _generic_sampler(layer)(layer, [a], cg).items()}


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    if _conv_supported(layer):
        return "conv"
    if isinstance(layer, nn.GroupNorm):
        return "group-norm"
    if _generic_sampler(layer) is not None:
        return "per-sample"
    return ""


_SQ = {
    "linear": _linear_sq_norms,
    "embedding": _embedding_sq_norms,
    "conv": _conv_sq_norms,
    "group-norm": _group_norm_sq_norms,
    "per-sample": _generic_sq_norms,
}
_CLIPPED = {
    "linear": _linear_clipped,
    "embedding": _embedding_clipped,
    "conv": _conv_clipped,
    "group-norm": _generic_clipped,
    "per-sample": _generic_clipped,
}


def bookkeeping_coverage(model: nn.Module) -> dict[str, list[str]]:
    """Trainable layer types of ``model`` by the rule that clips them: ``{rule: ["Type xN"]}``
    (rules: ``linear``, ``embedding``, ``conv``, ``group-norm``, ``per-sample``; ``none`` would
    make :class:`BookKeepingClipper` refuse the model)."""
    found: dict[str, Counter[str]] = {}
    for m in model.modules():
        if _trainable(m):
            found.setdefault(_kind(m) or "none", Counter())[type(m).__name__] += 1
    return {k: [f"{t} x{c}" for t, c in sorted(v.items())] for k, v in sorted(found.items())}


class BookKeepingClipper:
    """Forward hooks on every trainable layer of ``module``, and the single-backward clipping.

    After a forward pass in training mode, :meth:`backward` takes the per-record losses and
    leaves ``p.grad = sum_n c_n grad_n`` on every trainable parameter, with the clipping
    coefficients ``c_n = min(1, max_grad_norm / (||grad_n|| + 1e-6))`` (Opacus' formula).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self._records: list[_Record] = []
        self._seen: set[int] = set()
        self._kinds: dict[nn.Module, str] = {}
        for name, m in module.named_modules():
            if not _trainable(m):
                continue
            kind = _kind(m)
            if not kind:
                raise NotImplementedError(
                    f"layer '{name}' ({type(m).__name__}) has trainable parameters but neither a "
                    "book-keeping rule nor an Opacus grad sampler; register one with "
                    "opacus.grad_sample.register_grad_sampler, or use grad-sample-mode 'ghost'"
                )
            if isinstance(m, nn.Embedding) and (m.sparse or m.scale_grad_by_freq):
                raise NotImplementedError(
                    f"layer '{name}': embeddings with sparse=True or scale_grad_by_freq=True are "
                    "not supported by book-keeping clipping"
                )
            self._kinds[m] = kind
        self.handles = [module.register_forward_pre_hook(self._start_forward)]
        self.handles += [m.register_forward_hook(self._capture) for m in self._kinds]

    def kinds(self) -> dict[str, str]:
        """``{layer name: rule}`` for every trainable layer (``linear``, ``embedding``, ``conv``,
        ``group-norm``, ``per-sample``)."""
        return {n: self._kinds[m] for n, m in self.module.named_modules() if m in self._kinds}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._records = []

    def _start_forward(self, _module: nn.Module, _inputs: tuple) -> None:
        # A new forward of the whole model starts a new step: forget a step never backwarded.
        self._records = []
        self._seen = set()

    def _capture(self, m: nn.Module, inputs: tuple, output: object) -> None:
        if not (m.training and torch.is_grad_enabled()):
            return
        if id(m) in self._seen:
            raise NotImplementedError(
                f"{type(m).__name__} was called twice in one forward pass (parameter tying): "
                "book-keeping clipping needs one call per layer"
            )
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        self._seen.add(id(m))
        self._records.append(_Record(m, inputs[0].detach(), output, output._version))

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        """Clipped gradient sum of ``loss_per_sample`` (one loss per record) into ``p.grad``."""
        records, self._records, self._seen = self._records, [], set()
        n = loss_per_sample.shape[0]
        for r in records:
            if r.output._version != r.version:
                raise RuntimeError(
                    f"the output of a {type(r.module).__name__} layer was modified in place "
                    "after the layer ran (e.g. ReLU(inplace=True)); book-keeping clipping needs "
                    "it unchanged: make that operation out-of-place"
                )
        backprops = (
            torch.autograd.grad(
                loss_per_sample.sum(), [r.output for r in records], allow_unused=True
            )
            if records
            else []
        )
        sq = torch.zeros(n, dtype=loss_per_sample.dtype, device=loss_per_sample.device)
        for r, g in zip(records, backprops, strict=True):
            r.backprop = torch.zeros_like(r.output) if g is None else g.detach()
            sq += _SQ[self._kinds[r.module]](r.module, r.activation, r.backprop, r)
        norms = sq.sqrt()
        self.per_sample_gradient_norms = norms
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        done: set[int] = set()
        for r in records:
            clipped = _CLIPPED[self._kinds[r.module]](r.module, r.activation, r.backprop, coef, r)
            for p, grad in clipped.items():
                p.grad = grad.reshape(p.shape).to(p.dtype)
                done.add(id(p))
        # Layers that did not run this step (a missing encoder) get a zero gradient, as in
        # Opacus, so the optimizer still adds noise to every parameter.
        for m in self._kinds:
            for p in _trainable(m):
                if id(p) not in done:
                    p.grad = torch.zeros_like(p)


class BookKeepingLoss:
    """Criterion wrapper: per-record losses whose ``backward()`` runs book-keeping clipping."""

    def __init__(self, criterion: nn.Module, clipper: BookKeepingClipper) -> None:
        self.criterion = criterion
        self.clipper = clipper

    def __call__(self, *args, **kwargs) -> BookKeepingTensor:  # noqa: ANN002, ANN003
        old = getattr(self.criterion, "reduction", "mean")
        self.criterion.reduction = "none"
        try:
            per_sample = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = old
        if per_sample.dim() != 1:
            raise ValueError(
                f"the criterion must give one loss per record with reduction='none', "
                f"got shape {tuple(per_sample.shape)}"
            )
        return BookKeepingTensor(per_sample, self.clipper, old)


class BookKeepingTensor:
    """The mean (or sum) loss of a batch; ``backward()`` leaves clipped gradients."""

    def __init__(self, per_sample: torch.Tensor, clipper: BookKeepingClipper, reduction: str):
        self.loss_per_sample = per_sample
        self.clipper = clipper
        self.reduction = reduction

    def detach(self) -> torch.Tensor:
        reduced = self.loss_per_sample.detach()
        return reduced.sum() if self.reduction == "sum" else reduced.mean()

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        self.clipper.backward(self.loss_per_sample)

    def __repr__(self) -> str:
        return f"BookKeepingTensor({self.item():.4f})"


def make_private_bookkeeping(engine, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """``engine.make_private(**kwargs)`` with book-keeping clipping instead of ghost clipping.

    Takes the arguments of ``PrivacyEngine.make_private`` (except ``grad_sample_mode``) and
    returns the same four things as its ghost mode: (model, optimizer, criterion, loader).
    Opacus' optimizer (noise, scaling), accountant and Poisson loader are used as they are;
    only Opacus' norm hooks are replaced. ``model.remove_hooks()`` removes ours too.
    """
    model, optimizer, criterion, loader = engine.make_private(grad_sample_mode="ghost", **kwargs)
    model.remove_hooks()
    clipper = BookKeepingClipper(model._module, max_grad_norm=kwargs["max_grad_norm"])
    # Opacus' remove_hooks() pops this list: callers that clean up with it clean up ours.
    model.autograd_grad_sample_hooks = list(clipper.handles)
    return model, optimizer, BookKeepingLoss(criterion.criterion, clipper), loader
