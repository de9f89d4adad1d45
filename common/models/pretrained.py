"""Pretrained encoders from local files: torchvision/timm image backbones, BERT-family text.

Transfer learning under DP: public pretraining, private fine-tuning of few parameters (Tramer &
Boneh 2021, arXiv:2011.11660; De et al. 2022, arXiv:2204.13650). fedfuse never downloads
weights: a site places the file (or, for text, the checkpoint folder) and the run config names
its SHA-256, which every site checks when it builds the model, before training
(:func:`verified_weights`), so every site fine-tunes the same starting point.

DP rules (Opacus' ``ModuleValidator``): BatchNorm mixes the records of a batch, so it becomes
either GroupNorm (trainable, the BatchNorm's scale and shift copied) or a frozen affine map with
the pretrained statistics (``image-norm = frozen``). ``freeze`` (:data:`FREEZE_MODES`) fixes
parts of an encoder: frozen parameters get no gradient, hence no noise and no clipping share.

The optional libraries (``timm``, ``transformers``, ``peft``, ``torchxrayvision``: the
``transfer`` extra) are imported only when a run names them.
"""

from __future__ import annotations

import hashlib
import importlib
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from fedfuse.common.config import FREEZE_MODES, RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS

if TYPE_CHECKING:
    from torchvision.ops.misc import FrozenBatchNorm2d

# DenseNet's transitions pool without padding: below 32 pixels (five halvings) its map would
# shrink to 0x0, so smaller images are upsampled for it.
DENSENET_MIN_SIZE = 32


class WeightsMismatch(ConfigError):
    """A site's weights file is not the one the run config names (by SHA-256)."""


def optional_import(name: str, *, purpose: str) -> ModuleType:
    """Import an optional library of the ``transfer`` extra, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"{purpose} needs the Python package '{name}', which is not installed: "
            "pip install 'fedfuse[transfer]'"
        ) from None


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: a replaced file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file (``sha256sum FILE``), or of a checkpoint folder: the hash of
    the sorted lines ``<sha256 of file>  <relative path>`` (``sha256sum`` of every file, sorted
    by path, hashed again), so a changed tokenizer file changes it too."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)
    lines = []
    files = {f.relative_to(p).as_posix(): f for f in p.rglob("*") if f.is_file()}
    for rel in sorted(files):  # byte order, as `LC_ALL=C sort`
        if rel.startswith(".") or "/." in rel:
            continue  # caches a library may write next to the files (.cache/, .locks)
        f = files[rel]
        st = f.stat()
        lines.append(f"{_file_sha256(str(f.resolve()), st.st_size, st.st_mtime_ns)}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def verified_weights(path: str, *, sha256: str, key: str, folder: bool = False) -> Path:
    """The local weights at ``path`` after checking they are the ones the run config names.

    Raises :class:`ConfigError` (one line) when the file is missing or has no configured
    hash, and :class:`WeightsMismatch` when its SHA-256 differs from ``sha256``.
    """
    p = Path(path).expanduser()
    kind = "checkpoint folder" if folder else "file"
    if not (p.is_dir() if folder else p.is_file()):
        raise ConfigError(
            f"'{key}' {kind} '{p.name}' does not exist at this site (fedfuse never downloads "
            f"weights: place the {kind} the run names here, see README 'Pretrained encoders')"
        )
    actual = weights_sha256(p)
    if not sha256:
        raise ConfigError(
            f"'{key}' is set but '{key}-sha256' is empty: set it to the SHA-256 published with "
            f"the weights, so that every site checks it starts from the same ones (this "
            f"{kind}'s is {actual})"
        )
    if actual != sha256.lower():
        raise WeightsMismatch(
            f"'{key}' {kind} '{p.name}' has SHA-256 {actual[:16]}..., the run config names "
            f"{sha256[:16]}...: this site refuses to train from other weights than the "
            f"federation's; place the exact {kind} the run names"
        )
    return p


def load_state_dict_file(path: Path, *, key: str) -> dict[str, torch.Tensor]:
    """A torch state_dict from a local file (``weights_only``: no code runs on load)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"'{key}' file '{path.name}' is not a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"'{key}' file '{path.name}' does not hold a state_dict")
    return state


def freeze_encoder(encoder: nn.Module, mode: str) -> nn.Module:
    """Fix parts of ``encoder`` (``requires_grad = False``) by :data:`FREEZE_MODES` name.

    The encoder names its parts with ``freeze_parts() -> (backbone, last block, head)``:
    ``none`` trains everything; ``last-block`` the backbone's last block and the head;
    ``head`` only the head (the projection to ``embed-dim``); ``all`` nothing (a fixed feature
    extractor: the fusion head alone trains). LoRA adapters, where present, stay trainable
    unless ``all``.
    """
    if mode not in FREEZE_MODES:
        raise ConfigError(f"freeze must be one of {list(FREEZE_MODES)}; found {mode!r}")
    if mode == "none":
        return encoder
    parts = getattr(encoder, "freeze_parts", None)
    if parts is None:
        raise ConfigError(
            f"the {type(encoder).__name__} encoder cannot be frozen in parts; use freeze 'none'"
        )
    backbone, last_block, _head = parts()
    if mode == "all":
        encoder.requires_grad_(False)
        return encoder
    keep = {id(p) for n, p in backbone.named_parameters() if "lora_" in n}
    if mode == "last-block":
        keep |= {id(p) for p in last_block.parameters()}
    for p in backbone.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return encoder


# --- what a round sends ---------------------------------------------------------------------


def fixed_state_keys(model: nn.Module, cfg: RunConfig) -> frozenset[str]:
    """State-dict entries of ``model`` that no round changes and every party already holds.

    Those of a pretrained backbone loaded from its SHA-256-checked file (``image-weights``;
    the ``bert`` checkpoint) that do not train: its frozen parameters (LoRA adapters excepted:
    their starting values are random, not the file's) and its buffers (constants such as
    frozen BatchNorm statistics). The server and every site build them from the same file, so
    the global model and every update leave them out (:func:`wire_state`): a frozen ResNet-18
    no longer sends 11 million unchanged values masked every round (docs/BENCHMARKS.md). A
    projection or head is never fixed this way, frozen or not: its start is random.
    """
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = []
    for modality, enc in getattr(model, "encoders", {}).items():
        from_file = (modality == "image" and bool(cfg.image_weights)) or (
            modality == "report" and cfg.text_encoder == "bert"
        )
        if from_file and hasattr(enc, "freeze_parts"):
            prefixes.append(names[id(enc.freeze_parts()[0])] + ".")
    if not prefixes:
        return frozenset()
    params = {n for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    return frozenset(
        k
        for k in model.state_dict(keep_vars=True)
        if k.startswith(tuple(prefixes)) and k not in params
    )


def wire_state(model: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The part of ``model``'s state a round sends (global model and updates): all of it but
    :func:`fixed_state_keys`."""
    fixed = fixed_state_keys(model, cfg)
    return {k: v for k, v in model.state_dict().items() if k not in fixed}


def load_wire_state(model: nn.Module, cfg: RunConfig, state: dict[str, torch.Tensor]) -> None:
    """Load a global model as :func:`wire_state` sent it; the fixed entries stay the ones
    ``model`` was built with from the checked file. The names must be exactly those."""
    expected = set(wire_state(model, cfg))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(
            f"the global model's parameter names differ (missing {missing[:3]}, unexpected "
            f"{extra[:3]})"
        )
    model.load_state_dict(state, strict=False)


# --- images ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _no_inplace_blocks() -> dict[type, type]:
    """torchvision's ResNet blocks -> subclasses with an out-of-place residual addition."""
    # lazy: torchvision takes about a second to import, paid by every ClientApp process
    # (a deployed site starts several a round); only pretrained image encoders need it
    from torchvision.models.resnet import BasicBlock, Bottleneck

    class _BasicBlockNoInplace(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class _BottleneckNoInplace(Bottleneck):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    return {BasicBlock: _BasicBlockNoInplace, Bottleneck: _BottleneckNoInplace}


def _no_inplace(net: nn.Module) -> None:
    # In-place ops (ReLU(inplace=True), "out += identity") would edit the outputs of Opacus'
    # backward hooks, which autograd forbids.
    blocks = _no_inplace_blocks()
    for m in net.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
        if type(m) in blocks:
            m.__class__ = blocks[type(m)]


def _frozen_bn(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    # lazy: see _no_inplace_blocks
    from torchvision.ops.misc import FrozenBatchNorm2d

    f = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.affine:
            f.weight.copy_(bn.weight)
            f.bias.copy_(bn.bias)
        if bn.running_mean is not None and bn.running_var is not None:
            f.running_mean.copy_(bn.running_mean)
            f.running_var.copy_(bn.running_var)
    return f


def dp_norms(net: nn.Module, norm: str) -> nn.Module:
    """Replace every BatchNorm of ``net``: GroupNorm (``group``) or frozen statistics."""
    if norm == "frozen":
        for m in list(net.modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(m, child_name, _frozen_bn(child))
        return net
    if norm != "group":
        raise ConfigError(f"'image-norm' must be 'group' or 'frozen'; found {norm!r}")
    # lazy: Opacus' validators import its whole module tree; only GroupNorm swaps need them
    from opacus.validators import ModuleValidator

    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    fixed = ModuleValidator.fix(net)
    with torch.no_grad():
        for name, gn in fixed.named_modules():
            if name in bns and isinstance(gn, nn.GroupNorm) and bns[name].affine:
                gn.weight.copy_(bns[name].weight)
                gn.bias.copy_(bns[name].bias)
    return fixed


def _gray_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The RGB stem summed to ``in_channels``: a gray image gets the RGB image's response."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        w = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(w.repeat(1, in_channels, 1, 1) / in_channels)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _load_into(net: nn.Module, weights: Path | None, *, arch: str, skip: tuple[str, ...]) -> None:
    if weights is None:
        return
    state = load_state_dict_file(weights, key="image-weights")
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ConfigError(
            f"'image-weights' file '{weights.name}' is not a {arch} state_dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


class FeatureCache:
    """Features of fully frozen encoders (``freeze = all``), kept across rounds in this process.

    A fixed encoder maps a record to the same features in every round, so they are computed
    once and later rounds cost only the fusion head. Entries are keyed by the SHA-256 of the
    encoder's whole state (the weights: what the run's weights hash names, as loaded) and of
    the record's input tensor (the preprocessed record: a changed file or setting is a new
    key), so a stale entry cannot be served. Nothing leaves the site: it is the site's memory.
    """

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self._store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._store.clear()
        self.hits = self.misses = 0

    @staticmethod
    def state_digest(module: nn.Module) -> bytes:
        h = hashlib.sha256()
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def features(self, module: nn.Module, x: torch.Tensor, compute) -> torch.Tensor:  # noqa: ANN001
        """``compute(x)``'s rows, from the cache where present (``module``: whose state keys)."""
        state = getattr(module, "_state_key", None)
        if state is None:
            state = module._state_key = self.state_digest(module)  # type: ignore[assignment]
        rows = x.detach().cpu().contiguous()
        keys = [state + hashlib.sha256(r.numpy().tobytes()).digest() for r in rows]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            if len(self._store) + len(missing) > self.max_entries:
                self._store.clear()
            with torch.no_grad():
                out = compute(x[missing]).detach().cpu()
            for i, f in zip(missing, out, strict=True):
                self._store[keys[i]] = f
        return torch.stack([self._store[k] for k in keys]).to(x.device)


# One per process: a site's worker keeps it from round to round (the model is rebuilt).
FEATURE_CACHE = FeatureCache()


def _refer(module: nn.Module, name: str, part: nn.Module) -> None:
    """Keep a reference to a part of ``module``'s own tree WITHOUT registering it again: a
    module registered twice would appear twice in ``state_dict`` (sent twice) and get Opacus'
    per-sample hooks twice (its per-sample gradients counted twice)."""
    module.__dict__[name] = part


def _forget_state_key(module: nn.Module, _incompatible: object) -> None:
    module.__dict__["_state_key"] = None


class PretrainedImageEncoder(nn.Module):
    """A pretrained backbone (features, no classifier) and a projection to ``dim``.

    ``net`` maps ``(batch, C, H, W)`` to ``(batch, features)``; ``last_block`` is its last
    stage (what ``freeze = last-block`` leaves trainable); ``proj`` is the head. Images smaller
    than ``min_size`` are upsampled to it.
    """

    last_block: nn.Module  # a reference into ``net`` (see _refer)

    def __init__(
        self,
        net: nn.Module,
        *,
        features: int,
        last_block: nn.Module,
        dim: int,
        rgb: bool,
        min_size: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.min_size = min_size
        _refer(self, "last_block", last_block)
        self.rgb = rgb  # the backbone kept its RGB stem: gray input is repeated to 3 channels
        self.proj = nn.Linear(features, dim)
        self.out_dim = dim
        # Set by the factory for freeze = all: features computed once (FeatureCache).
        self.feature_cache: FeatureCache | None = None
        self._state_key: bytes | None = None
        # New weights (the global model, loaded each round) mean a new cache key.
        self.register_load_state_dict_post_hook(_forget_state_key)

    def freeze_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.net, self.last_block, self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_cache is not None and not any(p.requires_grad for p in self.parameters()):
            return self.feature_cache.features(self, x, self._forward)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            x = nn.functional.interpolate(x, size=self.min_size, mode="bilinear")
        if self.rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return torch.relu(self.proj(self.net(x)))


def _torchvision_resnet(arch: str, *, dim: int, in_channels: int, weights: Path | None, norm: str):
    # lazy: torchvision takes seconds to import; only pretrained image encoders need it
    from torchvision import models

    net = getattr(models, arch)(weights=None)
    _load_into(net, weights, arch=f"torchvision {arch}", skip=("fc.",))
    net.conv1 = _gray_stem(net.conv1, in_channels)
    features = net.fc.in_features
    net.fc = nn.Identity()
    net = dp_norms(net, norm)
    _no_inplace(net)
    last = cast(nn.Module, net.layer4)
    return PretrainedImageEncoder(net, features=features, last_block=last, dim=dim, rgb=False)


class _DenseNetFeatures(nn.Module):
    """torchvision DenseNet's forward without its in-place final ReLU and classifier; inputs
    multiplied by ``scale`` first (a fixed public constant, not a parameter)."""

    def __init__(self, features: nn.Module, *, scale: float = 1.0) -> None:
        super().__init__()
        self.features = features
        self.scale = scale
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x * self.scale if self.scale != 1.0 else x))


def _torchvision_densenet(
    arch: str, *, dim: int, in_channels: int, weights: Path | None, norm: str
):
    # lazy: torchvision takes seconds to import; only pretrained image encoders need it
    from torchvision import models

    net = getattr(models, arch)(weights=None)
    _load_into(net, weights, arch=f"torchvision {arch}", skip=("classifier.",))
    net.features.conv0 = _gray_stem(net.features.conv0, in_channels)
    features = net.classifier.in_features
    body = dp_norms(net.features, norm)
    _no_inplace(body)
    wrapped = _DenseNetFeatures(body)
    # The last dense block and the final norm: the stage ``last-block`` fine-tunes.
    last = nn.ModuleList([cast(nn.Module, body.denseblock4), cast(nn.Module, body.norm5)])
    return PretrainedImageEncoder(
        wrapped,
        features=features,
        last_block=last,
        dim=dim,
        rgb=False,
        min_size=DENSENET_MIN_SIZE,
    )


# torchxrayvision's models take pixels in [-1024, 1024] (its ``datasets.normalize``); fedfuse's
# images arrive normalised to [-1, 1] (common/data/images.py).
XRV_INPUT_SCALE = 1024.0


def _xrv_densenet(arch: str, *, dim: int, in_channels: int, weights: Path | None, norm: str):
    """torchxrayvision's chest X-ray DenseNet-121 (one input channel), its 18-finding
    classifier removed. Its architecture comes from the library; its weights only from a local
    state_dict file (``torch.save(xrv.models.DenseNet(weights=...).state_dict(), FILE)`` once,
    on a machine with internet): fedfuse never lets the library download or unpickle a model."""
    xrv = optional_import("torchxrayvision", purpose=f"image-encoder '{arch}'")
    if in_channels != 1:
        raise ConfigError(f"image-encoder '{arch}' takes gray images (one channel)")
    net = xrv.models.DenseNet(weights=None)
    _load_into(net, weights, arch=f"torchxrayvision {arch}", skip=("classifier.", "op_threshs"))
    features = net.classifier.in_features
    body = dp_norms(net.features, norm)
    _no_inplace(body)
    wrapped = _DenseNetFeatures(body, scale=XRV_INPUT_SCALE)
    last = nn.ModuleList([cast(nn.Module, body.denseblock4), cast(nn.Module, body.norm5)])
    return PretrainedImageEncoder(
        wrapped,
        features=features,
        last_block=last,
        dim=dim,
        rgb=False,
        min_size=DENSENET_MIN_SIZE,
    )


def _register_torchvision(name: str, builder) -> None:  # noqa: ANN001
    def make(
        *, dim: int, in_channels: int = 1, weights: str | Path | None = None, norm: str = "group"
    ) -> PretrainedImageEncoder:
        return builder(
            name,
            dim=dim,
            in_channels=in_channels,
            weights=Path(weights) if weights else None,
            norm=norm,
        )

    make.__doc__ = builder.__doc__ or (
        f"torchvision {name}, BatchNorm made DP-safe (image-norm), one input channel."
    )
    IMAGE_ENCODERS.register(name)(make)


# ResNet-18 was the only pretrained choice before; ResNet-50 and DenseNet-121 (the usual chest
# X-ray backbone, CheXNet) join it.
for _name, _builder in (
    ("resnet18", _torchvision_resnet),
    ("resnet50", _torchvision_resnet),
    ("densenet121", _torchvision_densenet),
    # The chest X-ray DenseNet-121 of torchxrayvision (the `transfer` extra).
    ("xrv-densenet121", _xrv_densenet),
):
    _register_torchvision(_name, _builder)


TIMM_PREFIX = "timm:"


def timm_encoder(
    arch: str, *, dim: int, weights: str | Path | None = None, norm: str = "group"
) -> PretrainedImageEncoder:
    """A ``timm`` architecture by name (``image-encoder = "timm:<arch>"``), its classifier
    removed; weights from a local timm state_dict. The RGB stem is kept (gray input is repeated
    to three channels, which equals summing the stem's weights)."""
    timm = optional_import("timm", purpose=f"image-encoder 'timm:{arch}'")
    try:
        net = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(f"image-encoder 'timm:{arch}': {exc}") from None
    head = net.default_cfg.get("classifier", "")
    skip = tuple(f"{h}." for h in ([head] if isinstance(head, str) else head) if h)
    _load_into(net, Path(weights) if weights else None, arch=f"timm {arch}", skip=skip or ("~",))
    last_name = str(net.feature_info[-1]["module"])
    net.reset_classifier(0)
    features = net.num_features
    net = dp_norms(net, norm)
    _no_inplace(net)
    last = net.get_submodule(last_name)
    return PretrainedImageEncoder(net, features=features, last_block=last, dim=dim, rgb=True)


# --- text -----------------------------------------------------------------------------------

# Attention projections that LoRA adapts, by Hugging Face model type (query and value, as in Hu
# et al. 2021, arXiv:2106.09685).
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}
DEFAULT_LORA_TARGETS = ["query", "value"]


def _text_folder(cfg_weights: str | Path) -> Path:
    return Path(cfg_weights).expanduser()


class CheckpointTokenizer:
    """The checkpoint's own tokenizer (a fixed public vocabulary: it learns nothing from a
    site's reports), as text -> ``max_tokens`` ids padded with the tokenizer's pad id."""

    def __init__(self, folder: Path, *, max_tokens: int) -> None:
        transformers = optional_import("transformers", purpose="text-encoder 'bert'")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True
        )
        self.max_tokens = max_tokens
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # [CLS], [SEP], ...: text augmentation never drops or moves them.
        self.special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)

    def __call__(self, text: str) -> torch.Tensor:
        enc = self.tokenizer(
            text, truncation=True, max_length=self.max_tokens, padding="max_length"
        )
        return torch.tensor(enc["input_ids"], dtype=torch.long)


def checkpoint_tokenizer(weights: str, *, sha256: str, max_tokens: int) -> CheckpointTokenizer:
    """The tokenizer of ``text-weights``, after the folder's SHA-256 check."""
    folder = verified_weights(weights, sha256=sha256, key="text-weights", folder=True)
    return CheckpointTokenizer(folder, max_tokens=max_tokens)


@TEXT_ENCODERS.register("bert")
class PretrainedTextEncoder(nn.Module):
    """A Hugging Face BERT-family encoder from a local checkpoint folder, masked mean pooling
    over the non-padding tokens, and a projection to ``dim``.

    ``lora_rank > 0`` wraps the encoder with ``peft`` LoRA adapters on the attention's query
    and value projections: the pretrained weights stay fixed and only the adapters (and the
    projection) train, which keeps the number of noisy parameters small.
    """

    last_block: nn.Module  # the last transformer layer, a reference (see _refer)

    def __init__(
        self, *, dim: int, weights: str | Path, lora_rank: int = 0, **_ignored: object
    ) -> None:
        super().__init__()
        transformers = optional_import("transformers", purpose="text-encoder 'bert'")
        folder = _text_folder(weights)
        try:
            bert = transformers.AutoModel.from_pretrained(
                str(folder), local_files_only=True, attn_implementation="eager"
            )
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"'text-weights' folder '{folder.name}' is not a Hugging Face checkpoint: {first}"
            ) from None
        self.pad_id = int(bert.config.pad_token_id or 0)
        layers = _transformer_layers(bert)
        _refer(self, "last_block", layers[-1])
        if lora_rank > 0:
            peft = optional_import("peft", purpose="'text-lora-rank' > 0")
            targets = LORA_TARGETS.get(bert.config.model_type, DEFAULT_LORA_TARGETS)
            config = peft.LoraConfig(
                r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=targets
            )
            bert = peft.get_peft_model(bert, config)
        self.bert = bert
        self.proj = nn.Linear(bert.config.hidden_size, dim)
        self.out_dim = dim

    def freeze_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.bert, self.last_block, self.proj

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != self.pad_id
        hidden = self.bert(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        w = keep.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return torch.relu(self.proj(pooled))


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (the last one is ``last-block``)."""
    best: nn.ModuleList | None = None
    for _name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) >= len(best)):
            best = m
    if best is None:
        raise ConfigError("'text-weights': the checkpoint has no stack of transformer layers")
    return best
