"""Layers with fast Opacus per-sample gradient norms, and a report of what ghost clipping covers.

Opacus' ghost clipping computes per-sample gradient *norms* without materialising per-sample
gradients, but only for layer types that have a registered norm sampler (in Opacus 1.6:
``nn.Linear`` and ``nn.Embedding``). Every other trainable layer (Conv2d, GroupNorm,
LayerNorm) falls back, inside the same ghost-clipping pass, to Opacus' per-sample-gradient
hooks. :func:`ghost_coverage` lists which layers of a model take which path.

Opacus' own embedding norm sampler deduplicates (sample, token) pairs with
``torch.unique(dim=0)``, which on the CPU runs an element-wise comparison per pair and made the
text tower the slowest part of DP training here. :class:`GhostEmbedding` computes the same norm
from one 1-D ``unique`` over ``sample * vocab + token`` keys.
"""

from __future__ import annotations

from collections import Counter

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from torch import nn


class GhostEmbedding(nn.Embedding):
    """``nn.Embedding`` with a fast per-sample gradient norm sampler for ghost clipping."""


register_grad_sampler(GhostEmbedding)(compute_embedding_grad_sample)


@register_norm_sampler(GhostEmbedding)
def ghost_embedding_norm_sample(
    layer: GhostEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of an embedding table.

    Sample ``n``'s gradient for row ``v`` is the sum of the backprops at the positions where
    it looked up ``v``; its squared norm sums ``||that row sum||^2`` over the rows it used.
    """
    ids = activations[0]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1).to(torch.int64)
    grads = backprops.reshape(-1, backprops.shape[-1])
    rows = torch.arange(batch, device=ids.device, dtype=torch.int64).unsqueeze(1)
    keys = (rows * layer.num_embeddings + ids).reshape(-1)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(len(uniq), grads.shape[1], device=grads.device, dtype=grads.dtype)
    summed.index_add_(0, inverse, grads)
    sq = torch.zeros(batch, device=grads.device, dtype=grads.dtype)
    sq.index_add_(0, uniq // layer.num_embeddings, summed.pow(2).sum(dim=1))
    return {layer.weight: sq.sqrt()}


class DPConv2d(nn.Conv2d):
    """``nn.Conv2d`` (groups=1, zero padding) with a faster per-sample gradient on the CPU.

    Opacus' conv grad sampler unfolds the input (im2col) and multiplies per sample. For layers
    with several input channels, asking the convolution backward kernel for the weight
    gradient of a grouped convolution in which every sample is its own group gives the same
    per-sample gradients about twice as fast here (Rochette et al. 2019, arXiv:1912.06015).
    Tested against Opacus' sampler.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("DPConv2d supports groups=1 and numeric zero padding only")


def conv_weight_grad(
    layer: nn.Conv2d,
    grad_out: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    *,
    groups: int,
) -> torch.Tensor:
    """The weight gradient alone of a 2-D convolution with ``layer``'s geometry (one backward
    kernel call; autograd would compute the input gradient too)."""
    _, gw, _ = torch.ops.aten.convolution_backward(
        grad_out,
        inputs,
        weight,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        groups,
        [False, True, False],
    )
    return gw


@register_grad_sampler(DPConv2d)
def dp_conv2d_grad_sample(
    layer: DPConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if n == 0:
            ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        elif layer.in_channels == 1:
            # One input channel: im2col is small, and a batched matmul beats the grouped conv.
            cols = nn.functional.unfold(
                x,
                layer.kernel_size,
                dilation=layer.dilation,
                padding=layer.padding,
                stride=layer.stride,
            )
            g = backprops.reshape(n, layer.out_channels, -1)
            ret[layer.weight] = torch.bmm(g, cols.transpose(1, 2)).view(n, *layer.weight.shape)
        else:
            grouped_x = x.reshape(1, n * layer.in_channels, *x.shape[2:])
            grouped_g = backprops.reshape(1, n * layer.out_channels, *backprops.shape[2:])
            weight = layer.weight.detach().repeat(n, 1, 1, 1)
            gw = conv_weight_grad(layer, grouped_g, grouped_x, weight, groups=n)
            ret[layer.weight] = gw.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3)) if n else torch.zeros_like(layer.bias)[None]
    return ret


def ghost_coverage(model: nn.Module) -> dict[str, list[str]]:
    """Trainable layer types of ``model`` by how ghost clipping handles them.

    Returns:
        ``{"ghost": [...], "per-sample-hooks": [...]}`` with ``"Type x count"`` entries:
        ``ghost`` layers get their norm without per-sample gradients; the others fall back to
        Opacus' per-sample-gradient hooks.
    """
    norm = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    ghost: Counter[str] = Counter()
    hooks: Counter[str] = Counter()
    for m in model.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        (ghost if type(m) in norm else hooks)[type(m).__name__] += 1
    return {
        "ghost": [f"{k} x{v}" for k, v in sorted(ghost.items())],
        "per-sample-hooks": [f"{k} x{v}" for k, v in sorted(hooks.items())],
    }
