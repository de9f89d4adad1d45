"""Fusion heads and the multimodal model that joins encoders and a head.

Each head takes a list of per-modality features ``(batch, dim)`` and a modality mask
``(batch, num_modalities)`` (1 = present) and returns logits ``(batch, num_classes)``.
Missing modalities are normal: a head must not let a feature whose mask is 0 change its output.
Heads with per-modality weights (``gated``, ``attention``, ``late``) leave the last batch's
weights, renormalised over present modalities, in ``last_weights`` for interpretability.
"""

from __future__ import annotations

import torch
from torch import nn

from fedfuse.common.models.dp_layers import GhostEmbedding
from fedfuse.common.registry import Registry

FUSION_HEADS: Registry[nn.Module] = Registry("fusion head")
NEG = -1e4  # "minus infinity" that keeps fully-masked rows finite
# Bounds on the learned modality weights (GatedHead, AttentionHead). Under DP-SGD a gate that
# can switch a modality off does, and that modality's encoder then stops learning: the gate's
# logits are bounded at 0.5 (weight ratios at most e^1) and attention scores soft-capped, so a
# head can favour a modality but never silence one. Evidence: docs/BENCHMARKS.md#fusion-heads.
GATE_BOUND = 0.5
ATTENTION_SCORE_CAP = 2.0


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask == 1``; all-masked rows give zeros."""
    keep = mask > 0
    w = torch.softmax(scores.masked_fill(~keep, NEG), dim=-1) * keep.to(scores.dtype)
    return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)


@FUSION_HEADS.register("concat")
class ConcatHead(nn.Module):
    """Early (feature-level) fusion: masked features and the mask itself, concatenated, MLP."""

    def __init__(self, *, dim: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_modalities * dim + num_modalities, dim),
            nn.ReLU(),
            nn.Linear(dim, num_classes),
        )
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        masked = [f * mask[:, i : i + 1] for i, f in enumerate(feats)]
        return self.mlp(torch.cat([*masked, mask], dim=1))


@FUSION_HEADS.register("linear")
class LinearHead(nn.Module):
    """Early fusion with no hidden layer: one Linear over the masked features and the mask.

    The fewest parameters a head can have: under DP-SGD every parameter receives noise, and
    with linear encoders (``hash-bag``) the whole model stays a logistic regression, which
    learns steadily under noise (see docs/BENCHMARKS.md#real-data-pathvqa).
    """

    def __init__(self, *, dim: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_modalities * dim + num_modalities, num_classes)
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        masked = [f * mask[:, i : i + 1] for i, f in enumerate(feats)]
        return self.linear(torch.cat([*masked, mask], dim=1))


@FUSION_HEADS.register("gated")
class GatedHead(nn.Module):
    """Gated fusion: learned per-record modality weights, renormalised over present modalities.

    The gate sees every present modality's features (and the mask), so it can trust the image
    more when the report is uninformative. Each modality keeps its own slots: the MLP reads
    ``[n_present * w_m * f_m for each m]`` (uniform weights leave features at their scale), so
    down-weighting a modality scales it rather than mixing it into the others. The gate's
    logits are bounded (``GATE_BOUND``): it can favour a modality, never silence one.
    """

    def __init__(self, *, dim: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.gate = nn.Linear(num_modalities * dim + num_modalities, num_modalities)
        # Start from equal weights: a gate that favours the modality that helps first would
        # starve the others of gradient (and, under DP, of signal above the noise).
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.mlp = nn.Sequential(
            nn.Linear(num_modalities * dim + num_modalities, dim),
            nn.ReLU(),
            nn.Linear(dim, num_classes),
        )
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(feats, dim=1) * mask.unsqueeze(-1)  # (B, M, D)
        # Bounded gate logits (weight ratios at most e^(2 * GATE_BOUND)): a down-weighted
        # modality's encoder gets a down-weighted gradient, so under DP noise a gate free to
        # starve a modality stops it learning for good (rich-get-richer).
        logits = GATE_BOUND * torch.tanh(self.gate(torch.cat([stacked.flatten(1), mask], dim=1)))
        w = masked_softmax(logits, mask)
        self.last_weights = w.detach()
        scaled = stacked * (w * mask.sum(dim=1, keepdim=True)).unsqueeze(-1)
        return self.mlp(torch.cat([scaled.flatten(1), mask], dim=1))


@FUSION_HEADS.register("attention")
class AttentionHead(nn.Module):
    """A one-layer transformer over one token per present modality plus a [CLS] token.

    Absent modalities are masked out of the attention keys. The classifier reads the [CLS]
    token and every modality's token (after the layer) in its own slot, zero where absent,
    with the mask (as ``concat`` reads the features), and the attention scores are
    soft-capped (``cap * tanh(score / cap)``, as in Gemma 2), so DP noise in the query/key
    weights cannot sharpen the attention onto one modality; reading [CLS] alone, or the mean of
    the modality tokens, let the model settle on one modality (docs/BENCHMARKS.md#fusion-heads).
    Built from ``nn.Linear`` and ``nn.LayerNorm`` (Opacus samples both) rather than
    ``opacus.layers.DPMultiheadAttention``: in Opacus 1.6 that layer with ``batch_first=True``
    and more than one head reshapes its output across tokens (its result differs from
    ``batch_first=False`` on the same input), and the rest of the model is batch-first.
    Modality and [CLS] identities are an embedding (a bare ``nn.Parameter`` has no Opacus
    sampler).
    """

    # The model trains at a tenth of learning-rate (the linear head's rate, 0.1 by default):
    # under DP-Adam every coordinate of a transformer layer moves by about the rate each step,
    # noise or not, and at 0.1 the four-modality synthetic federation of
    # tests/simulations/test_e2e_multimodal.py stayed at chance (mean AUROC 0.50 over four
    # seeds; 0.55 at 0.03, 0.66 at 0.01; docs/BENCHMARKS.md#real-data-pathvqa).
    learning_rate_scale = 0.1

    def __init__(
        self, *, dim: int, num_modalities: int, num_classes: int, num_heads: int = 2
    ) -> None:
        super().__init__()
        self.num_heads = num_heads if dim % num_heads == 0 else 1
        self.token_type = GhostEmbedding(num_modalities + 1, dim)  # index 0 = [CLS]
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        # [CLS] and each modality's own token in its own slot (zero where absent), and the mask.
        self.classifier = nn.Linear((num_modalities + 1) * dim + num_modalities, num_classes)
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        b, m, d = feats[0].shape[0], len(feats), feats[0].shape[1]
        h = self.num_heads
        types = torch.arange(m + 1, device=mask.device).expand(b, m + 1).contiguous()
        cls = torch.zeros(b, 1, d, device=mask.device, dtype=feats[0].dtype)
        x = torch.cat([cls, torch.stack(feats, dim=1)], dim=1) + self.token_type(types)
        keys = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # [CLS] always present
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, m + 1, h, d // h).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5  # (B, H, T, T)
        scores = ATTENTION_SCORE_CAP * torch.tanh(scores / ATTENTION_SCORE_CAP)
        attn = masked_softmax(scores, keys[:, None, None, :].expand_as(scores))
        ctx = (attn @ v).transpose(1, 2).reshape(b, m + 1, d)
        x = x + self.out(ctx)
        x = x + self.ff(self.norm2(x))
        # [CLS]'s attention over the modality tokens, averaged over heads, renormalised.
        self.last_weights = masked_softmax(
            torch.log(attn[:, :, 0, 1:].mean(dim=1).detach().clamp_min(1e-12)), mask
        )
        slots = (x[:, 1:] * mask.unsqueeze(-1)).flatten(1)
        return self.classifier(torch.cat([x[:, 0], slots, mask], dim=1))


@FUSION_HEADS.register("late")
class LateHead(nn.Module):
    """Late (decision-level) fusion: a classifier per modality, logits averaged with learned
    weights over the modalities present (the weights depend on which set is present)."""

    def __init__(self, *, dim: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))
            for _ in range(num_modalities)
        )
        self.combine = nn.Linear(num_modalities, num_modalities)
        nn.init.zeros_(self.combine.weight)  # start from an equal-weight average
        nn.init.zeros_(self.combine.bias)
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([head(f) for head, f in zip(self.heads, feats, strict=True)], 1)
        w = masked_softmax(self.combine(mask), mask)
        self.last_weights = w.detach()
        return (w.unsqueeze(-1) * logits).sum(dim=1)


class FusionModel(nn.Module):
    """Encoders (one per modality, in a fixed order) + a fusion head.

    ``forward(mask, *inputs)`` takes the modality mask first and then one input tensor per
    modality in ``self.modalities`` order, which is also the order a site dataset yields them.
    ``task_heads`` (run config ``tasks``): one more head per extra task on the same encoders;
    ``forward`` still returns the main task's logits, :meth:`forward_all` every task's.
    """

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        head: nn.Module,
        task_heads: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.task_heads = nn.ModuleDict(task_heads or {})
        # Per record, from the last forward: what training adds to the task's loss
        # (:class:`~fedfuse.common.models.objectives.WithAuxiliaryLoss`); None when nothing.
        self.auxiliary_loss: torch.Tensor | None = None

    def _features(self, mask: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(inputs) != len(self.modalities):
            raise ValueError(
                f"expected {len(self.modalities)} inputs ({', '.join(self.modalities)}); "
                f"got {len(inputs)}"
            )
        if mask.shape[-1] != len(self.modalities):
            raise ValueError(
                f"mask has {mask.shape[-1]} columns; the model has {len(self.modalities)} "
                f"modalities ({', '.join(self.modalities)})"
            )
        feats = [self.encoders[m](x) for m, x in zip(self.modalities, inputs, strict=True)]
        self.auxiliary_loss = self._auxiliary(mask)
        return feats

    def _auxiliary(self, mask: torch.Tensor) -> torch.Tensor | None:
        """Each record's encoders' extra losses from this forward (the ``pool`` encoder's
        centring loss), counted only where the record has the modality."""
        total = None
        for i, m in enumerate(self.modalities):
            extra = getattr(self.encoders[m], "centring_loss", None)
            if extra is not None:
                term = extra * mask[:, i].to(extra.dtype)
                total = term if total is None else total + term
        return total

    def forward(self, mask: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(mask, inputs), mask)

    def forward_all(self, mask: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The main task's logits, then each extra task's, concatenated along dim 1."""
        feats = self._features(mask, inputs)
        main = self.head(feats, mask)
        return torch.cat([main, *(h(feats, mask) for h in self.task_heads.values())], dim=1)
