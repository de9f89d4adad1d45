"""The run configuration: parsed once, at the edge, into a frozen and validated dataclass.

Keys are Flower-style kebab-case (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run . --run-config "key=value"``). Unknown keys are rejected with the list of known ones.
What a key means beyond its value (does it feed a site's noise seed, may it change when a run
is resumed, is it a SecAgg+ setting) is declared on the key, as its :class:`KeyFacts`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedfuse.common.errors import ConfigError
from fedfuse.common.secagg.params import SecAggSettings


@dataclass(frozen=True)
class KeyFacts:
    """What a run-config key means beyond its value; declared on the key (``_key``)."""

    # Feeds the seed of a site's round randomness (client/handlers.py, ``_round_seed``): any change
    # to what a site computes must draw fresh noise. False for keys that only name or place the
    # run or tune the server's side.
    seeds_noise: bool = True
    # May differ when a run is resumed (server/checkpoint.py): it names or places the run.
    resume_free: bool = False
    # A SecAgg+ setting (SecAggSettings). It changes only how a DP-SGD update travels (masked;
    # its rounding draws fresh randomness), so it feeds the noise seed only under distributed
    # DP, where it sizes the site's own noise share (threshold, modulus): hashed then, or a
    # server could ask for the same noise at two scales and solve for the update.
    secagg: bool = False


def _key(default: Any, **facts: bool) -> Any:
    """A run-config field with its :class:`KeyFacts` (a key without is a plain training key)."""
    return field(default=default, metadata={"facts": KeyFacts(**facts)})


# SecAgg+ defaults are written once, in SecAggSettings; the run config takes them from there.
_SECAGG = SecAggSettings()


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run.

    Defaults are the CPU demo: 3 rounds over small synthetic sites, finishing in minutes on two
    cores while still reaching a useful AUROC.
    """

    num_rounds: int = 3
    # Server strategy: fedavg, fedprox (sites add a proximal step) or fedadam (server Adam).
    strategy: str = "fedavg"
    # FedProx's mu; 0 makes FedProx FedAvg.
    proximal_mu: float = 0.01
    # FedAdam's server learning rate (eta).
    server_learning_rate: float = 0.01
    # Fraction of sites asked to train each round (1.0 = all of them).
    fraction_train: float = _key(1.0, seeds_noise=False)
    # Fraction of sites asked to evaluate the global model each round.
    fraction_evaluate: float = _key(1.0, seeds_noise=False)
    # The run stops if fewer sites than this can take part in a round.
    min_sites: int = _key(2, seeds_noise=False)
    local_epochs: int = 3
    # Large batches: DP noise is added once per batch, so its share of the update falls as 1/B.
    batch_size: int = 256
    # Adam at 0.1 with clipping norm 1: what `fedfuse plan` chooses under DP for sites of 2,048
    # records or more, less for smaller ones (common/privacy/planning.py `plan_learning_rate`;
    # measured in docs/BENCHMARKS.md#real-data-pathvqa).
    learning_rate: float = 0.1
    # Adam reached a higher AUROC than SGD+momentum under DP on the synthetic task (see
    # docs/BENCHMARKS.md); "sgd" is kept for users who prefer it.
    optimizer: str = "adam"
    # L2 penalty on every weight (added to the gradient after clipping and noise: post-processing,
    # no privacy cost). The plan sets it without DP, where the model otherwise overfits.
    weight_decay: float = 0.0
    # The site's (epsilon, delta) budget covers the WHOLE federation, all rounds together.
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    # PRV is the tightest of Opacus' accountants that is still an upper bound.
    accountant: str = "prv"
    # "bookkeeping": per-sample gradient norms (ghost norms where a layer allows) and the clipped
    # gradient from ONE backward pass (common/privacy/bookkeeping.py); "ghost": Opacus' ghost
    # clipping (two backward passes); "hooks"/"functorch": Opacus' per-sample gradients.
    grad_sample_mode: str = "bookkeeping"
    # record: DP-SGD at each site (each site's ledger). client: update clipping at the sites and
    # noise on the aggregate at the server (no record-level DP at the sites). both: the two.
    # distributed: as client, but each site adds its share of the noise before SecAgg+ masks
    # it (the server never sees an un-noised sum). record+distributed: DP-SGD and distributed.
    dp_level: str = "record"
    # Client-level DP: L2 bound of a site's update, and noise std on the sum as a multiple of it.
    client_clip_norm: float = 1.0
    client_noise_multiplier: float = 1.0
    # Distributed DP (dp-level distributed / record+distributed, common/secagg/distributed_dp.py):
    # the clipped update's L2 bound in integer units (finer rounding as it grows, until the noisy
    # sum could wrap around modulus-range), and the conditional-rounding failure probability.
    ddp_norm_units: int = 4096
    ddp_beta: float = 0.5
    # A linear head over linear hashed-n-gram text features: the fewest parameters for the DP
    # noise to land on; on real data it beat the MLP head ("concat") under DP-SGD
    # (docs/BENCHMARKS.md#real-data-pathvqa).
    fusion: str = "linear"
    # Average-pooled pixels, centred on their learned population mean, into a Linear (152
    # parameters): the CNN's noisy weights drowned the demo's image finding under DP-SGD
    # (docs/BENCHMARKS.md#the-demo-make-demo).
    image_encoder: str = "pool"
    text_encoder: str = "hash-bag"
    # Comma-separated class names; every site's labels must be among them.
    classes: str = "no_finding,pneumonia"
    image_size: int = 32
    text_buckets: int = 1024
    # Longest hashed word n-gram of the hashing tokenizer: 1 words, 2 also bigrams, 3 trigrams.
    text_ngrams: int = 2
    max_tokens: int = 64
    embed_dim: int = 8
    seed: int = 0
    # Simulation: folder of site folders (one per virtual site, in sorted order).
    data_dir: str = _key("data/synthetic", seeds_noise=False, resume_free=True)
    # Simulation: the site folder of data-dir that never trains and only evaluates the final
    # global model, for itself (simulations/holdout.py); "" holds no site out.
    holdout_site: str = ""
    out_dir: str = _key("runs", seeds_noise=False, resume_free=True)
    run_name: str = _key("", seeds_noise=False, resume_free=True)
    # Continue the interrupted run in this run directory from its last checkpoint (its config
    # must be the same); "" starts a new run.
    resume_from: str = _key("", seeds_noise=False, resume_free=True)
    # Secure aggregation (SecAgg+): the server sees only the masked sum of the sites' updates.
    # The keys below are checked by fedfuse.common.secagg.params.SecAggSettings, which explains
    # them and holds their defaults.
    secagg: bool = _key(True, secagg=True)
    num_shares: int = _key(_SECAGG.num_shares, secagg=True)
    reconstruction_threshold: int = _key(_SECAGG.reconstruction_threshold, secagg=True)
    clipping_range: float = _key(_SECAGG.clipping_range, secagg=True)
    quantization_range: int = _key(_SECAGG.quantization_range, secagg=True)
    modulus_range: int = _key(_SECAGG.modulus_range, secagg=True)
    max_weight: float = _key(_SECAGG.max_weight, secagg=True)
    # Seconds to wait for the sites' replies in each exchange (training included), so that a
    # silent site cannot hang a round forever.
    timeout: float = _key(_SECAGG.timeout, seeds_noise=False, secagg=True)
    # --- Modalities, encoders, preprocessing (see common/data/modalities.py) ---
    # Inputs the model takes, in this order (of image, report, audio, tabular). A record or a
    # whole site lacking one of them is normal: the model sees it masked out.
    modalities: str = "image,report"
    audio_encoder: str = "logmel-cnn"
    tabular_encoder: str = "mlp"
    # The tab.<name> columns the model reads: its input size must be fixed before any site
    # is seen. Required when modalities include tabular.
    tabular_columns: str = ""
    # Fixed ranges "name=lo:hi,...", required for every column under DP: one record would
    # move every other record's features through a fitted mean/std, outside the per-record
    # sensitivity DP-SGD assumes. Without DP, a column without one is standardised with the
    # mean/std of the site's own train split (never sent).
    tabular_ranges: str = ""
    # Every WAV is mixed to mono, resampled to audio-rate Hz and cut/padded to audio-seconds;
    # 2 kHz keeps heart and lung sounds (< 1 kHz) and makes small spectrograms.
    audio_rate: int = 2000
    audio_seconds: float = 2.0
    audio_features: str = "logmel"
    # Mel bands (logmel) or coefficients (mfcc).
    audio_bins: int = 32
    # Which frame of a multi-frame DICOM to use.
    dicom_frame: int = 0
    # Local state_dict file to initialise the image encoder from (fedfuse never downloads
    # weights), and its SHA-256: every site checks its copy before training, so that every site
    # fine-tunes the same starting point (common/models/pretrained.py).
    image_weights: str = ""
    image_weights_sha256: str = ""
    # What of the image encoder stays fixed under DP-SGD (fewer noisy parameters): none,
    # last-block (all but the backbone's last block), head (the whole backbone: only the
    # projection trains), all (the encoder is a fixed feature extractor).
    image_freeze: str = "none"
    # BatchNorm of the resnet/densenet/timm backbones: "group" (GroupNorm with the BatchNorm's
    # scale and shift, trainable) or "frozen" (the pretrained statistics as a fixed per-channel
    # affine map: the pretrained function exactly). Either is per-record, as DP-SGD requires.
    image_norm: str = "group"
    # text-encoder "bert": a local Hugging Face checkpoint folder (save_pretrained: config,
    # weights and its own fixed tokenizer), the SHA-256 of the folder's files, what stays
    # fixed (as image-freeze, the last block being the last transformer layer), and the rank
    # of LoRA adapters on the attention's query/value (0 = none; peft).
    text_weights: str = ""
    text_weights_sha256: str = ""
    text_freeze: str = "none"
    text_lora_rank: int = 0
    # Training-image augmentation (torchvision.transforms.v2): "none" or "light".
    augment: str = "none"
    # Training-only augmentation of report tokens (dropout, span deletion, window swap) and of
    # recordings (speed and pitch, noise at a random SNR, time shift, time/frequency masking):
    # "none" or "light" (common/data/augment_text_audio.py). Off until a benchmark shows they help.
    text_augment: str = "none"
    audio_augment: str = "none"
    # "multi-label": labels like "a|b", a sigmoid per class, per-class AUROC.
    task: str = "single-label"
    # Extra tasks on the shared encoders, one head each (common/models/multitask.py):
    # "name=class|class,...", labels from the manifest's label.<name> column (an empty cell, or
    # no column at a site, masks that task out of the record's loss), and their loss weights
    # "name=weight,..." (1 for an unnamed task; the main task, column label, weighs 1).
    tasks: str = ""
    task_weights: str = ""
    # Probability of hiding each present modality of a training record (never all of them),
    # so the global model still works at a site that lacks a modality entirely.
    modality_dropout: float = 0.1
    # Where a site's DP randomness (noise, batches, dropout) comes from. "secret": keyed with the
    # site's own secret over everything the server sent (common/privacy/site_secret.py); the
    # only mode a deployed site accepts. "public": from (seed, site, round) alone, so that two
    # simulations that differ in one setting draw the same noise (controlled comparisons);
    # simulation only -- the server could regenerate such noise.
    noise_seed: str = "secret"

    def __post_init__(self) -> None:
        _check_int("num-rounds", self.num_rounds, low=1)
        _check_choice("strategy", self.strategy, ("fedavg", "fedprox", "fedadam"))
        _check_range("proximal-mu", self.proximal_mu, low=0.0, high=math.inf)
        _check_range(
            "server-learning-rate", self.server_learning_rate, low=0.0, high=math.inf, low_open=True
        )
        _check_range("fraction-train", self.fraction_train, low=0.0, high=1.0, low_open=True)
        _check_range("fraction-evaluate", self.fraction_evaluate, low=0.0, high=1.0, low_open=True)
        _check_int("min-sites", self.min_sites, low=1)
        _check_int("local-epochs", self.local_epochs, low=1)
        _check_int("batch-size", self.batch_size, low=1)
        _check_range("learning-rate", self.learning_rate, low=0.0, high=math.inf, low_open=True)
        _check_range(
            "target-epsilon",
            self.target_epsilon,
            low=0.0,
            high=math.inf,
            low_open=True,
            allow_inf=True,
        )
        _check_range(
            "target-delta", self.target_delta, low=0.0, high=1.0, low_open=True, high_open=True
        )
        _check_range("max-grad-norm", self.max_grad_norm, low=0.0, high=math.inf, low_open=True)
        _check_choice("optimizer", self.optimizer, ("adam", "sgd"))
        _check_range("weight-decay", self.weight_decay, low=0.0, high=math.inf)
        _check_choice("accountant", self.accountant, ("prv", "rdp"))
        _check_choice(
            "grad-sample-mode",
            self.grad_sample_mode,
            ("bookkeeping", "ghost", "hooks", "functorch"),
        )
        _check_choice("dp-level", self.dp_level, DP_LEVELS)
        if self.distributed_dp and not self.secagg:
            raise ConfigError(
                f"'dp-level' {self.dp_level!r} adds the noise inside secure aggregation and "
                "needs 'secagg' = true (without it each site's update would travel with only "
                "its own share of the noise)"
            )
        _check_int("ddp-norm-units", self.ddp_norm_units, low=1)
        _check_range("ddp-beta", self.ddp_beta, low=0.0, high=1.0, low_open=True, high_open=True)
        _check_range(
            "client-clip-norm", self.client_clip_norm, low=0.0, high=math.inf, low_open=True
        )
        _check_range(
            "client-noise-multiplier",
            self.client_noise_multiplier,
            low=0.0,
            high=math.inf,
            low_open=True,
        )
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(
                f"'classes' must name at least two distinct classes; found {self.classes!r}"
            )
        _check_int("image-size", self.image_size, low=8)
        _check_int("text-buckets", self.text_buckets, low=16)
        _check_int("text-ngrams", self.text_ngrams, low=1)
        if self.text_ngrams > 3:
            raise ConfigError(f"'text-ngrams' must be 1, 2 or 3; found {self.text_ngrams}")
        _check_int("max-tokens", self.max_tokens, low=1)
        _check_int("embed-dim", self.embed_dim, low=1)
        if not isinstance(self.secagg, bool):
            raise ConfigError(f"'secagg' must be true or false; found {self.secagg!r}")
        self.secagg_settings()  # raises ConfigError naming the bad key
        _check_modalities(self)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.modalities.split(",") if m.strip())

    @property
    def tabular_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.tabular_columns.split(",") if c.strip())

    @property
    def tabular_range_map(self) -> dict[str, tuple[float, float]]:
        """``tabular-ranges`` parsed: column name -> (low, high)."""
        return _parse_ranges(self.tabular_ranges)

    @property
    def task_classes(self) -> dict[str, tuple[str, ...]]:
        """``tasks`` parsed: extra task name -> its class names (in order)."""
        return _parse_tasks(self.tasks)

    @property
    def task_weight_map(self) -> dict[str, float]:
        """Loss weight of each extra task (``task-weights``; 1 where unnamed)."""
        given = _parse_weights(self.task_weights)
        return {t: given.get(t, 1.0) for t in self.task_classes}

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label"

    @property
    def private(self) -> bool:
        """False when ``target-epsilon`` is infinite: training without DP (a baseline only)."""
        return math.isfinite(self.target_epsilon)

    @property
    def record_level_dp(self) -> bool:
        """Whether the sites train with DP-SGD (not for ``dp-level`` client or distributed)."""
        return self.private and self.dp_level not in ("client", "distributed")

    @property
    def client_level_dp(self) -> bool:
        """Central client-level DP: the server adds the noise (server/client_level_dp.py)."""
        return self.dp_level in ("client", "record+client")

    @property
    def distributed_dp(self) -> bool:
        """Client-level DP whose noise the sites add inside SecAgg+
        (common/secagg/distributed_dp.py)."""
        return self.dp_level in ("distributed", "record+distributed")

    def secagg_settings(self) -> SecAggSettings:
        """The run's SecAgg+ settings. Under client-level or distributed DP every site sends
        weight 1 (equal weights bound each site's share), so the weights are normalised by 1,
        not by max-weight: the updates keep the full quantisation precision."""
        return SecAggSettings(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            max_weight=1.0 if self.client_level_dp or self.distributed_dp else self.max_weight,
            timeout=self.timeout,
        )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (Flower's ``context.run_config``); reject unknown keys."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"Unknown config key(s) {unknown}. Known keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            f = known[key]
            kwargs[f.name] = _coerce(key, value, f.type)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case dict, the inverse of :meth:`from_mapping` (JSON- and Flower-friendly)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# Keys the server adds to the run config it sends each round; not part of RunConfig.
SERVER_KEYS: dict[str, KeyFacts] = {
    "server-round": KeyFacts(),
    "run-id": KeyFacts(seeds_noise=False),
    # Picks the run's ledger entries, hence the plan: the plan itself is hashed into the seed.
    "run-uid": KeyFacts(seeds_noise=False),
}
KEY_FACTS: dict[str, KeyFacts] = {
    **{f.name.replace("_", "-"): f.metadata.get("facts", KeyFacts()) for f in fields(RunConfig)},
    **SERVER_KEYS,
}
# The keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = frozenset(k for k, facts in KEY_FACTS.items() if facts.resume_free)


def seeds_noise(key: str, *, distributed_dp: bool) -> bool:
    """Does ``key`` feed a site's noise seed? An unknown key does (fresh noise is the safe
    side)."""
    facts = KEY_FACTS.get(key, KeyFacts())
    return facts.seeds_noise and (distributed_dp or not facts.secagg)


KNOWN_MODALITIES = ("image", "report", "audio", "tabular")
DP_LEVELS = ("record", "client", "record+client", "distributed", "record+distributed")


def _check_modalities(cfg: RunConfig) -> None:
    names = cfg.modality_names
    bad = [m for m in names if m not in KNOWN_MODALITIES]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(
            f"'modalities' must be distinct names from {list(KNOWN_MODALITIES)}, comma-separated;"
            f" found {cfg.modalities!r}"
        )
    if "tabular" in names and not cfg.tabular_names:
        raise ConfigError(
            "'tabular-columns' must name the tab.<name> columns the model reads (e.g. "
            "\"crp,wbc\") when 'modalities' includes tabular; found ''"
        )
    ranges = _parse_ranges(cfg.tabular_ranges)
    unknown = sorted(set(ranges) - set(cfg.tabular_names))
    if unknown:
        raise ConfigError(
            f"'tabular-ranges' names {unknown}, which are not in 'tabular-columns' "
            f"{list(cfg.tabular_names)}"
        )
    unranged = [c for c in cfg.tabular_names if c not in ranges]
    if "tabular" in names and cfg.private and unranged:
        raise ConfigError(tabular_ranges_required(unranged))
    _check_int("audio-rate", cfg.audio_rate, low=500)
    _check_range("audio-seconds", cfg.audio_seconds, low=0.1, high=60.0)
    _check_choice("audio-features", cfg.audio_features, ("logmel", "mfcc"))
    _check_int("audio-bins", cfg.audio_bins, low=4)
    _check_int("dicom-frame", cfg.dicom_frame, low=0)
    _check_choice("augment", cfg.augment, ("none", "light"))
    _check_choice("text-augment", cfg.text_augment, ("none", "light"))
    _check_choice("audio-augment", cfg.audio_augment, ("none", "light"))
    _check_choice("task", cfg.task, ("single-label", "multi-label"))
    _check_range("modality-dropout", cfg.modality_dropout, low=0.0, high=1.0, high_open=True)
    _check_choice("noise-seed", cfg.noise_seed, ("secret", "public"))
    _check_transfer(cfg)
    _check_tasks(cfg)


FREEZE_MODES = ("none", "last-block", "head", "all")


def _check_transfer(cfg: RunConfig) -> None:
    """Pretrained encoders: weights come with their SHA-256 (common/models/pretrained.py)."""
    for key, weights, digest in (
        ("image-weights", cfg.image_weights, cfg.image_weights_sha256),
        ("text-weights", cfg.text_weights, cfg.text_weights_sha256),
    ):
        if digest and not weights:
            raise ConfigError(f"'{key}-sha256' is set but '{key}' is empty")
        if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise ConfigError(
                f"'{key}-sha256' must be 64 lower-case hex digits (sha256sum); found {digest!r}"
            )
    _check_choice("image-freeze", cfg.image_freeze, FREEZE_MODES)
    _check_choice("text-freeze", cfg.text_freeze, FREEZE_MODES)
    _check_choice("image-norm", cfg.image_norm, ("group", "frozen"))
    _check_int("text-lora-rank", cfg.text_lora_rank, low=0)
    if cfg.text_encoder == "bert" and not cfg.text_weights:
        raise ConfigError(
            "text-encoder 'bert' needs 'text-weights': a local checkpoint folder written by "
            "save_pretrained (model and tokenizer), with 'text-weights-sha256'"
        )


def _parse_tasks(text: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, _, classes = item.partition("=")
        name = name.strip()
        names = tuple(c.strip() for c in classes.split("|") if c.strip())
        if (
            not name
            or not all(ch.isalnum() or ch in "_-" for ch in name)
            or len(names) < 2
            or len(set(names)) != len(names)
            or name in out
        ):
            raise ConfigError(
                f"'tasks' item {item!r} must look like name=class|class (a distinct name of "
                "letters, digits, _ or -, and at least two distinct classes), e.g. "
                '"severity=mild|severe"'
            )
        out[name] = names
    return out


def _parse_weights(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if not (math.isfinite(w) and w >= 0):
            raise ConfigError(
                f"'task-weights' item {item!r} must look like name=weight, weight >= 0"
            )
        out[name.strip()] = w
    return out


def _check_tasks(cfg: RunConfig) -> None:
    tasks = cfg.task_classes
    unknown = sorted(set(_parse_weights(cfg.task_weights)) - set(tasks))
    if unknown:
        raise ConfigError(f"'task-weights' names {unknown}, which are not in 'tasks'")
    if tasks and cfg.multi_label:
        raise ConfigError(
            "'tasks' (extra task heads) needs a single-label main task; found task = 'multi-label'"
        )


def tabular_ranges_required(columns: list[str]) -> str:
    """The one-line error for tabular columns without a fixed range in a private run."""
    example = ",".join(f"{c}=LOW:HIGH" for c in columns)
    return (
        f"under DP (finite target-epsilon) every tabular column needs a fixed range: set "
        f"'tabular-ranges' for {', '.join(columns)} (e.g. tabular-ranges = \"{example}\"); "
        "scaling by a site's own mean/std would release statistics of its records outside epsilon"
    )


def _parse_ranges(text: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        try:
            name, span = item.split("=", 1)
            lo_s, hi_s = span.split(":", 1)
            lo, hi = float(lo_s), float(hi_s)
        except ValueError:
            raise ConfigError(
                f"'tabular-ranges' item {item!r} must look like name=low:high (e.g. crp=0:200)"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ConfigError(f"'tabular-ranges' item {item!r} needs finite low < high")
        out[name.strip()] = (lo, hi)
    return out


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    t = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if t == "float":
            return float(value)
        if t == "str":
            return str(value)
        if t == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
    except (TypeError, ValueError):
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(t, f"a {t}")
        raise ConfigError(f"Config key '{key}' must be {kind}; found {value!r}") from None
    return value


def _check_int(name: str, value: int, *, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"'{name}' must be an integer >= {low}; found {value!r}")


def _check_range(
    name: str,
    value: float,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not math.isnan(value)
    if ok and math.isinf(value):
        ok = allow_inf and value > 0
    elif ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"'{name}' must be in range {lo}{low}, {high}{hi}; found {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"'{name}' must be one of {list(choices)}; found {value!r}")
