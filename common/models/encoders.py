"""Modality encoders. Each maps one modality's batch to a ``(batch, dim)`` feature tensor.

Every encoder must pass ``opacus.validators.ModuleValidator.validate`` (no BatchNorm: it mixes
samples of a batch, which breaks per-sample gradients; GroupNorm instead). Layers with an
Opacus norm sampler (Linear, Embedding / :class:`GhostEmbedding`) are ghost-clipped; convolutions
and norms fall back to per-sample-gradient hooks (see :mod:`fedfuse.common.models.dp_layers`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedfuse.common.data.tokenizer import PAD_ID
from fedfuse.common.errors import ConfigError
from fedfuse.common.models.dp_layers import DPConv2d, GhostEmbedding
from fedfuse.common.registry import Registry

IMAGE_ENCODERS: Registry[nn.Module] = Registry("image encoder")
TEXT_ENCODERS: Registry[nn.Module] = Registry("text encoder")
AUDIO_ENCODERS: Registry[nn.Module] = Registry("audio encoder")
TABULAR_ENCODERS: Registry[nn.Module] = Registry("tabular encoder")
# Large negative instead of -inf: a row whose every entry is masked must give zeros, not NaN.
NEG = -1e4


def _conv_block(c_in: int, c_out: int, groups: int, stride: int = 1) -> list[nn.Module]:
    return [
        DPConv2d(c_in, c_out, kernel_size=3, padding=1, stride=stride),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
    ]


class ConvTower(nn.Module):
    """Three conv blocks with GroupNorm; the first two halve the resolution; global max pool.

    Strided convolutions rather than max-pool layers: they downsample at a quarter of the
    cost of the layer that follows, and under DP every conv's per-sample gradient scales with
    its output resolution.
    """

    def __init__(self, *, in_channels: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *_conv_block(in_channels, width, 4, stride=2),
            *_conv_block(width, 2 * width, 8, stride=2),
            *_conv_block(2 * width, 2 * width, 8),
            # Global max pooling: a lesion or a murmur is a small local finding; averaging over
            # the whole image or clip would dilute it.
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.out_channels = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _load_local_weights(module: nn.Module, path: str, what: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"'image-weights' file '{path}' does not exist (fedfuse never downloads weights: "
            f"give a local state_dict file for the {what} encoder, or leave image-weights empty)"
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"'image-weights' file '{path}' is not a torch state_dict: {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"'image-weights' file '{path}' does not hold a state_dict")
    return state


@IMAGE_ENCODERS.register("cnn")
class SmallCNN(nn.Module):
    """A small GroupNorm CNN and a projection; the default image encoder (fast under DP)."""

    def __init__(
        self,
        *,
        dim: int,
        in_channels: int = 1,
        width: int = 16,
        weights: str = "",
        norm: str = "group",
    ) -> None:
        # ``norm`` is accepted for a uniform signature: this CNN has no BatchNorm to replace.
        super().__init__()
        self.tower = ConvTower(in_channels=in_channels, width=width)
        self.proj = nn.Linear(self.tower.out_channels, dim)
        self.out_dim = dim
        if weights:
            state = _load_local_weights(self, weights, "cnn")
            try:
                self.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(
                    f"'image-weights' file '{weights}' does not fit the cnn encoder "
                    f"(embed-dim {dim}): {exc}"
                ) from exc

    def freeze_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(backbone, its last block, head) for ``image-freeze``."""
        return self.tower, self.tower.net[6:9], self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.tower(x)))


# Weight of the ``pool`` encoder's centring loss: each record adds
# ``CENTRE_WEIGHT / 2 * ||cell means - centre||^2`` to its loss. Small against the task's
# gradient (the clipping norm is shared), large enough that the centre settles within a round.
CENTRE_WEIGHT = 0.1


@IMAGE_ENCODERS.register("pool")
class PooledLinear(nn.Module):
    """Average-pooled pixels (a ``grid`` x ``grid`` map of cell means), centred, -> a Linear.

    The default image encoder: under DP-SGD every parameter receives noise, and this encoder
    has ``grid**2 * in_channels * (dim + 1) + dim`` of them (152 by default) against the CNN's
    ~7,000. Cell means keep what a small bright finding adds to its cell, with the pixel noise
    averaged away. The CNN's random-walking weights add noise to every record's logit and its
    ReLU outputs die, so on the demo it learned nothing from the image in 3 rounds (the model
    stalled at the report's ceiling); this one does (docs/BENCHMARKS.md#the-demo-make-demo). No
    ReLU on the output: a linear feature cannot die.

    **Centring.** The cell means are centred on ``centre``, the population's mean cell values,
    learned with the rest of the model: each record's loss gains the centring loss
    ``CENTRE_WEIGHT / 2 * ||cell means - centre||^2``, whose gradient reaches only ``centre``
    (the projection reads the centre detached, and the centring loss reads the cell means
    detached). So the centre is estimated by DP-SGD itself: its per-record gradient is clipped
    with the record's whole gradient and noised with it, and the accounting covers it as it
    covers every weight. Federated averaging averages it like any weight. Uncentred features
    gave the Linear a common component (the anatomy every image shares): the first steps push
    every logit towards the label's prior, Adam moves each image weight as far as the one bias,
    and the image weights then carried each site's prior instead of the finding (the image
    part of the model was inverted after round 1 on the demo; docs/BENCHMARKS.md, "Sixth
    pass"). ``centre`` starts at 0.5 (the fixed centre before it was learned), so a weights
    file without it loads as it did.
    """

    def __init__(
        self,
        *,
        dim: int,
        in_channels: int = 1,
        grid: int = 4,
        weights: str = "",
        norm: str = "group",
    ) -> None:
        # ``norm`` is accepted for a uniform signature: there is no normalisation layer.
        super().__init__()
        cells = in_channels * grid * grid
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        self.proj = nn.Linear(cells, dim)
        # A Linear on a constant 1: Opacus clips and noises its per-record gradient as any
        # Linear's (a bare Parameter would have no per-sample gradient rule).
        self.centre = nn.Linear(1, cells, bias=False)
        nn.init.constant_(self.centre.weight, 0.5)
        self.out_dim = dim
        # Each record's centring loss from the last forward (FusionModel.auxiliary_loss).
        self.centring_loss: torch.Tensor | None = None
        if weights:
            state = _load_local_weights(self, weights, "pool")
            state.setdefault("centre.weight", self.centre.weight.detach().clone())
            try:
                self.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(
                    f"'image-weights' file '{weights}' does not fit the pool encoder "
                    f"(embed-dim {dim}): {exc}"
                ) from exc

    def freeze_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(backbone, its last block, head) for ``image-freeze``: the pooling has no weights."""
        return self.pool, self.pool, self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.pool(x)
        # ones_like, not new_ones(len(...)): a traced export (TorchScript, ONNX) keeps the batch
        # size free.
        centre = self.centre(torch.ones_like(cells[:, :1]))
        self.centring_loss = 0.5 * CENTRE_WEIGHT * (centre - cells.detach()).square().sum(dim=1)
        return self.proj(cells - centre.detach())


class _HashedText(nn.Module):
    def __init__(self, *, dim: int, num_buckets: int) -> None:
        super().__init__()
        self.embed = GhostEmbedding(num_buckets, dim)
        self.proj = nn.Linear(dim, dim)
        self.out_dim = dim


@TEXT_ENCODERS.register("hash-mean")
class HashedMeanEncoder(_HashedText):
    """Hashed token ids -> embeddings -> mean over non-padding tokens -> projection.

    ``nn.Embedding`` + masked mean rather than ``nn.EmbeddingBag``: Opacus cannot compute
    per-sample gradients of EmbeddingBag on 2-D input, and it has no ghost-clipping sampler.
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != PAD_ID).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(ids) * keep).sum(dim=1)
        mean = summed / keep.sum(dim=1).clamp_min(1.0)
        return torch.relu(self.proj(mean))


@TEXT_ENCODERS.register("hash-attention")
class HashedAttentionEncoder(_HashedText):
    """Hashed token ids -> embeddings -> learned attention pooling -> projection.

    A score per token (one Linear over the embedding) weights the tokens, so a few decisive
    words ("fever", "no_fever") can outweigh filler; padding gets no weight.
    """

    def __init__(self, *, dim: int, num_buckets: int) -> None:
        super().__init__(dim=dim, num_buckets=num_buckets)
        self.score = nn.Linear(dim, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)
        keep = ids != PAD_ID
        scores = self.score(torch.tanh(e)).squeeze(-1).masked_fill(~keep, NEG)
        w = torch.softmax(scores, dim=1) * keep.to(e.dtype)  # all-padding rows -> zeros
        pooled = (w.unsqueeze(-1) * e).sum(dim=1)
        return torch.relu(self.proj(pooled))


@TEXT_ENCODERS.register("hash-bag")
class HashedBagEncoder(nn.Module):
    """Hashed unigrams and bigrams -> a linear bag of features (no hidden layer).

    The features are the sum of the tokens' embedding rows divided by sqrt(token count), the
    hashed counterpart of an L2-normalised bag of words: with a linear fusion head the model is
    a (low-rank) logistic regression on hashed n-grams, the model that does best on short
    clinical questions and the cheapest to train under DP-SGD (each record's gradient touches
    only its own rows, and there are no hidden units for the noise to push around). The table
    starts at zero, so an untrained text tower adds nothing to the logits. See
    docs/BENCHMARKS.md#real-data-pathvqa.
    """

    def __init__(self, *, dim: int, num_buckets: int) -> None:
        super().__init__()
        self.embed = GhostEmbedding(num_buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != PAD_ID).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(ids) * keep).sum(dim=1)
        return summed / keep.sum(dim=1).clamp_min(1.0).sqrt()


@AUDIO_ENCODERS.register("logmel-cnn")
class LogMelCNN(nn.Module):
    """A GroupNorm CNN over a ``(1, bins, frames)`` log-mel spectrogram (or MFCC) + projection."""

    def __init__(self, *, dim: int, bins: int = 32, width: int = 16) -> None:
        super().__init__()
        self.tower = ConvTower(in_channels=1, width=width)
        self.proj = nn.Linear(self.tower.out_channels, dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.tower(x)))


@TABULAR_ENCODERS.register("mlp")
class TabularMLP(nn.Module):
    """Two Linear layers over ``[scaled values, observed flags]``."""

    def __init__(self, *, dim: int, in_features: int) -> None:
        super().__init__()
        if in_features < 1:
            raise ConfigError("the tabular encoder needs at least one column (tabular-columns)")
        self.net = nn.Sequential(
            nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU()
        )
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
