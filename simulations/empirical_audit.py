"""The empirical privacy audit: canaries at one site, one federated run, an epsilon lower bound.

Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (arXiv:2305.08846),
run on the user's own setup through the real Flower simulation engine:

1. copy the site folders; at the audit site, add each of ``m`` canary records to the training
   split independently with probability 1/2 (the rest are never shown to the federation);
2. train the federation once (:func:`fedfuse.simulations.runner.simulate`, same code as deployment);
3. score every canary against the final global model -- black-box: minus its loss; white-box:
   alignment of its gradient with the global model's total update (final minus initial: what a
   server sees even under secure aggregation; the audit site's own update is a share of it) --
   and guess "in" for the ``k+`` highest scores, "out" for the ``k-`` lowest;
4. turn the number of correct guesses into an epsilon lower bound
   (:mod:`fedfuse.common.privacy.empirical`) and compare it with the epsilon the audit site claims.

Canaries are built to be memorable: a random-noise image, a report made of random nonsense
words (hashed to random buckets, unlike the recurring words of real reports), and a random
label. A model that memorises its
training records fits their random labels; one trained with correct DP cannot do so much better on
included canaries than on excluded ones.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import string
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.func import functional_call, grad, vmap

from fedfuse.client.site import simulation_site_dirs
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import LabelEncoder, SiteDataset
from fedfuse.common.data.manifest import Manifest, Record, find_manifest
from fedfuse.common.data.modalities import build_inputs
from fedfuse.common.data.synthetic import generate
from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model
from fedfuse.common.privacy.empirical import (
    EmpiricalAudit,
    audit_from_scores,
    max_epsilon_lower_bound,
    verdict,
)
from fedfuse.simulations.runner import simulate

# Run-config values the audit uses unless the user overrides them (--set key=value). They make
# memorisation, and so the audit's power, as strong as a realistic small run allows: small
# batches and several local epochs mean many steps per canary. Measured in docs/BENCHMARKS.md.
AUDIT_DEFAULTS: dict[str, Any] = {
    "local-epochs": 5,
    "batch-size": 64,
    "learning-rate": 0.02,
}
CANARY_DIR = "canaries"
CANARY_WORDS = 12


@dataclass(frozen=True)
class AuditSettings:
    """One empirical audit. ``epsilon = inf`` trains without DP (the control)."""

    out: Path
    sites: int = 2
    rounds: int = 3
    epsilon: float = 2.0
    delta: float = 1e-5
    canaries: int = 1000
    # Total guesses r, of which ``guesses_in`` say "in" (highest scores) and the rest "out"
    # (lowest scores). With two classes, a random-label canary that was left out still gets its
    # label right by chance half the time, so low losses mix members with lucky non-members;
    # high losses are (almost) only non-members. All-"out" guessing is the stronger default.
    guesses: int = 200
    guesses_in: int = 0
    white_box: bool = False
    data: Path | None = None
    # Records per synthetic site when ``data`` is None. Few ordinary records at the audit site
    # leave the model room to memorise canaries: the audit measures the worst case.
    records: int = 200
    audit_site: int = 0
    seed: int = 0
    confidence: float = 0.95
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError(f"--sites must be >= 1; found {self.sites}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1; found {self.rounds}")
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ConfigError(f"--epsilon must be in range (0, inf]; found {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in range (0, 1); found {self.delta}")
        if self.canaries < 2:
            raise ConfigError(f"--canaries must be >= 2; found {self.canaries}")
        if not 1 <= self.guesses <= self.canaries:
            raise ConfigError(
                f"--guesses must be in range [1, {self.canaries}] (at most --canaries); "
                f"found {self.guesses}"
            )
        if not 0 <= self.guesses_in <= self.guesses:
            raise ConfigError(
                f"--guesses-in must be in range [0, {self.guesses}] (at most --guesses); "
                f"found {self.guesses_in}"
            )
        if not 0 <= self.audit_site < self.sites:
            raise ConfigError(
                f"--audit-site must be in range [0, {self.sites - 1}]; found {self.audit_site}"
            )
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in range (0, 1); found {self.confidence}")


@dataclass(frozen=True)
class Canary:
    id: str
    image: np.ndarray  # (size, size) in [0, 1]
    report: str
    label: str


def make_canaries(
    m: int, *, classes: tuple[str, ...], image_size: int, rng: np.random.Generator
) -> list[Canary]:
    """``m`` memorable multimodal records: noise image, nonsense report, random label."""
    letters = np.array(list(string.ascii_lowercase))
    out = []
    for i in range(m):
        image = rng.random((image_size, image_size)).astype(np.float32)
        words = ["".join(rng.choice(letters, size=7)) for _ in range(CANARY_WORDS)]
        out.append(
            Canary(
                id=f"canary-{i:05d}",
                image=image,
                report=" ".join(words),
                label=str(classes[int(rng.integers(len(classes)))]),
            )
        )
    return out


def write_canary_images(canaries: list[Canary], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in canaries:
        p = folder / f"{c.id}.png"
        Image.fromarray((c.image * 255).astype(np.uint8), mode="L").save(p)
        paths[c.id] = p
    return paths


def prepare_audit_data(
    source: Path,
    dest: Path,
    *,
    sites: int,
    audit_site: int,
    canaries: list[Canary],
    included: np.ndarray,
) -> tuple[Path, str]:
    """A data folder for the audit: the first ``sites`` site folders of ``source`` (linked, not
    changed), the audit site's one copied with the included canaries added to its training split.

    Excluded canaries are written outside the site folders: the federation never sees them.
    Returns (the canary image folder, the audit site's name).
    """
    dirs = simulation_site_dirs(source)
    if sites > len(dirs):
        raise ConfigError(f"--sites {sites} but '{source}' holds only {len(dirs)} site folders")
    if dest.exists():
        shutil.rmtree(dest)
    sites_dir = dest / "sites"
    sites_dir.mkdir(parents=True)
    for i, d in enumerate(dirs[:sites]):
        if i != audit_site:
            (sites_dir / d.name).symlink_to(d.resolve(), target_is_directory=True)
    site_src = dirs[audit_site]
    if (site_src / CANARY_DIR).exists():
        raise ConfigError(
            f"site folder '{site_src}' already has a '{CANARY_DIR}' folder; the audit needs that "
            "name for its canaries (choose another --audit-site or rename the folder)"
        )
    site_dst = sites_dir / site_src.name
    # A real copy: the manifest's paths must resolve inside the site folder.
    shutil.copytree(site_src, site_dst, symlinks=False)
    all_images = write_canary_images(canaries, dest / "all-canaries")
    (site_dst / CANARY_DIR).mkdir()
    rows = []
    for c, inc in zip(canaries, included, strict=True):
        if inc:
            shutil.copyfile(all_images[c.id], site_dst / CANARY_DIR / f"{c.id}.png")
            rows.append(
                {
                    "id": c.id,
                    "image": f"{CANARY_DIR}/{c.id}.png",
                    "report": c.report,
                    "label": c.label,
                    "split": "train",
                }
            )
    _append_manifest(find_manifest(site_dst), rows)
    return dest / "all-canaries", site_src.name


def _append_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    """Add rows to a copied manifest; existing rows keep their (possibly seeded) split."""
    if path.suffix == ".jsonl":
        with open(path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        return
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        old = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    for col in ("image", "report", "split"):
        if col not in columns:
            columns.append(col)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        # An empty "split" cell means "seeded split", exactly as before the column existed.
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old)
        writer.writerows(rows)


def canary_dataset(
    canaries: list[Canary], images: dict[str, Path] | Path, cfg: RunConfig
) -> SiteDataset:
    """All canaries (included or not) as a dataset, to score them against the final model."""
    folder = images if isinstance(images, Path) else None
    records = [
        Record(
            id=c.id,
            labels=(c.label,),
            split="train",
            image=(folder / f"{c.id}.png") if folder else images[c.id],  # type: ignore[index]
            report=c.report,
        )
        for c in canaries
    ]
    site = folder or Path(".")
    manifest = Manifest(
        site_dir=site, path=site / "canaries", records=tuple(records), tabular_columns=()
    )
    return SiteDataset(
        records,
        inputs=build_inputs(cfg, manifest),
        labels=LabelEncoder(cfg.class_names, multi_label=cfg.multi_label),
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Score on one thread: the per-canary work is small, and one thread measured 10x faster
    than two on a busy 2-core machine (threads spinning against each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
@one_thread()
def loss_scores(model: nn.Module, dataset: SiteDataset, *, batch_size: int = 256) -> np.ndarray:
    """Black-box scores: minus each canary's loss under the final model (high = memorised)."""
    model.eval()
    out = []
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        *inputs, labels = (torch.stack(t) for t in zip(*batch, strict=True))
        out.append(-loss_fn(model(*inputs), labels))
    return torch.cat(out).numpy().astype(np.float64)


@one_thread()
def gradient_alignment_scores(
    model_before: nn.Module,
    model_after: nn.Module,
    dataset: SiteDataset,
    *,
    batch_size: int = 100,
) -> np.ndarray:
    """White-box scores: cosine between each canary's descent direction (minus its loss
    gradient) at the final model and the model's total update (after - before).

    Training on a canary moves the parameters along its negative gradient, so included canaries
    point the way the model moved. The gradient at the final model separated members better
    than the one at the initial model in our measurements (docs/BENCHMARKS.md). Per-canary
    gradients come from ``torch.func`` (vmap over grad): one batched pass, not m backward passes.
    """
    before = dict(model_before.named_parameters())
    params = {n: p.detach() for n, p in model_after.named_parameters()}
    update = torch.cat([(params[n] - before[n].detach()).flatten() for n in params])
    update = update / update.norm().clamp_min(1e-12)
    model_after.eval()

    def loss_of_one(p: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        *inputs, label = (t.unsqueeze(0) for t in sample)
        logits = functional_call(model_after, p, tuple(inputs))
        return nn.functional.cross_entropy(logits, label)

    per_sample_grad = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, 0))
    scores = []
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        tensors = [torch.stack(t) for t in zip(*batch, strict=True)]
        grads = per_sample_grad(params, *tensors)
        g = -torch.cat([grads[n].flatten(1) for n in params], dim=1)
        scores.append((g @ update) / g.norm(dim=1).clamp_min(1e-12))
    return torch.cat(scores).numpy().astype(np.float64)


def claimed_epsilon(run_dir: Path, site: str) -> float:
    """The epsilon the audit site claims for the whole run (``inf`` when trained without DP).

    The claim is the site's ledger: the cumulative epsilon of its last ledger entry, as the
    site reported it with its update (``lifetime_epsilon`` in privacy.json). The audit site is
    a fresh copy, so its ledger holds this run only; if it held earlier spend, the claim for the
    canaries (which were in this run only) is this run's epsilon from the same DP events.
    """
    privacy = json.loads((run_dir / "privacy.json").read_text())
    site_rec = privacy["sites"].get(site)
    if site_rec is None:
        raise RuntimeError(
            f"the run in {run_dir} has no privacy record for the audit site '{site}'; "
            "the site did not train (see metrics.jsonl)"
        )
    lifetime, start = site_rec.get("lifetime_epsilon"), site_rec.get("lifetime_epsilon_start")
    if lifetime is not None and start is not None and float(start) == 0.0:
        return float(lifetime)
    return float(site_rec["epsilon"])  # "inf" (no DP) parses as float('inf')


@dataclass(frozen=True)
class AuditResult:
    settings: AuditSettings
    audit: EmpiricalAudit
    claimed_epsilon: float
    verdict: str
    score: str
    site: str
    run_dir: Path
    seconds: float
    train_seconds: float

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "verdict": self.verdict,
            "claimed_epsilon": _finite_or_str(self.claimed_epsilon),
            "lower_bound": self.audit.lower_bound,
            "max_lower_bound": self.audit.max_lower_bound,
            "canaries": self.audit.canaries,
            "canaries_included": self.audit.included,
            "guesses": self.audit.guesses,
            "guesses_in": self.audit.k_pos,
            "guesses_out": self.audit.k_neg,
            "correct_guesses": self.audit.correct,
            "accuracy": self.audit.accuracy,
            "delta": self.audit.delta,
            "confidence": self.audit.confidence,
            "score": self.score,
            "dp": math.isfinite(s.epsilon),
            "target_epsilon": _finite_or_str(s.epsilon),
            "audit_site": self.site,
            "sites": s.sites,
            "rounds": s.rounds,
            "seed": s.seed,
            "run_dir": str(self.run_dir),
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "paper": "Steinke, Nasr, Jagielski 2023, arXiv:2305.08846",
        }


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else str(x))


def run_empirical_audit(
    settings: AuditSettings,
    *,
    console: Console | None = None,
    verbose: bool = False,
    federate: Callable[..., Path] | None = None,
) -> AuditResult:
    """Run the whole audit; write ``audit.json``, ``canaries.csv`` and ``summary.md`` to
    ``settings.out``. Progress goes to ``console`` when given.

    ``federate`` trains the federation (``simulate``'s signature; default: Flower's simulation
    engine). The audit's planted-bug run passes an in-process federation with the bug planted
    by the test (tests/support/faults.py): production code has no switch that drops the noise.
    """
    federate = federate or simulate

    t0 = time.time()
    s = settings
    say: Callable[[str], None] = console.print if console is not None else (lambda _m: None)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        **AUDIT_DEFAULTS,
        "num-rounds": s.rounds,
        "target-epsilon": s.epsilon,
        "target-delta": s.delta,
        "seed": s.seed,
        "out-dir": str(out / "runs"),
        "run-name": "audit",
        **s.overrides,
    }
    cfg = RunConfig.from_mapping(raw)
    if s.data is None:
        source = out / "data" / "source"
        if source.exists():
            shutil.rmtree(source)
        generate(source, sites=s.sites, records=s.records, seed=s.seed)
    else:
        source = Path(s.data)
        if not source.is_dir():
            raise ConfigError(f"--data '{source}' is not a folder of site folders")
    # The canaries and their coin flips come from their own stream: the guesser never sees it.
    rng = np.random.default_rng([s.seed, 0xA0D17])
    canaries = make_canaries(
        s.canaries, classes=cfg.class_names, image_size=cfg.image_size, rng=rng
    )
    included = rng.random(s.canaries) < 0.5
    audit_data = out / "data" / "audit"
    images, site = prepare_audit_data(
        source,
        audit_data,
        sites=s.sites,
        audit_site=s.audit_site,
        canaries=canaries,
        included=included,
    )
    cfg = cfg.replace(data_dir=str(audit_data / "sites"))
    say(
        f"[bold]fedfuse audit[/] {s.canaries} canaries at site {site} "
        f"({int(included.sum())} included), {s.sites} sites x {s.rounds} rounds, "
        + (f"epsilon {s.epsilon:g}" if math.isfinite(s.epsilon) else "no DP (control)")
        + f", data {cfg.data_dir}"
    )
    max_lb = max_epsilon_lower_bound(m=s.canaries, r=s.guesses, delta=s.delta)
    if math.isfinite(s.epsilon) and max_lb <= s.epsilon:
        warnings.warn(
            f"with {s.canaries} canaries and {s.guesses} guesses no audit can show a lower bound "
            f"above {max_lb:.2f}, so it cannot catch a violation of epsilon {s.epsilon:g}; "
            "raise --guesses (and --canaries) or audit a smaller --epsilon",
            stacklevel=2,
        )

    def on_round(rec: dict[str, Any]) -> None:
        say(
            f"  round {rec['round']}/{s.rounds}  train loss {_num(rec.get('train-loss'))}  "
            f"max epsilon {_num(rec.get('max-epsilon'))}  [{rec.get('seconds', 0):.1f}s]"
        )

    run_path = Path(cfg.out_dir) / cfg.run_name
    if run_path.exists():
        shutil.rmtree(run_path)
    t_train = time.time()
    run_dir = federate(cfg, num_sites=s.sites, on_round=on_round, verbose=verbose)
    train_seconds = time.time() - t_train

    say("Scoring the canaries against the final model ...")
    final = build_model(cfg)
    final.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    dataset = canary_dataset(canaries, images, cfg)
    if s.white_box:
        # The server's initial model, rebuilt exactly as run_federation builds it.
        torch.manual_seed(cfg.seed)
        initial = build_model(cfg)
        scores = gradient_alignment_scores(initial, final, dataset)
        score_name = "white-box: canary gradient alignment with the total model update"
    else:
        scores = loss_scores(final, dataset)
        score_name = "black-box: minus the canary's loss under the final model"
    k_pos, k_neg = s.guesses_in, s.guesses - s.guesses_in
    claim = claimed_epsilon(run_dir, site)
    audit = audit_from_scores(
        scores, included, k_pos=k_pos, k_neg=k_neg, delta=s.delta, confidence=s.confidence
    )
    result = AuditResult(
        settings=s,
        audit=audit,
        claimed_epsilon=claim,
        verdict=verdict(lower_bound=audit.lower_bound, claimed_epsilon=claim),
        score=score_name,
        site=site,
        run_dir=run_dir,
        seconds=time.time() - t0,
        train_seconds=train_seconds,
    )
    write_results(result, out, scores=scores, included=included)
    return result


def write_results(
    result: AuditResult, out: Path, *, scores: np.ndarray, included: np.ndarray
) -> None:
    """``audit.json`` (the numbers), ``canaries.csv`` (score and membership per canary) and
    ``summary.md`` (for a person)."""
    d = result.as_dict()
    (out / "audit.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    with open(out / "canaries.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["canary", "included", "score"])
        for i, (inc, sc) in enumerate(zip(included, scores, strict=True)):
            w.writerow([f"canary-{i:05d}", int(inc), f"{sc:.6g}"])
    (out / "summary.md").write_text(summary_markdown(d))


def summary_markdown(d: dict[str, Any]) -> str:
    claim = d["claimed_epsilon"]
    claim_s = claim if isinstance(claim, str) else f"{claim:.4f}"
    lines = [
        "# fedfuse empirical privacy audit",
        "",
        f"Verdict: **{d['verdict']}** (empirical lower bound {d['lower_bound']:.4f} vs claimed "
        f"epsilon {claim_s} at site `{d['audit_site']}`, delta {d['delta']:g}, "
        f"{d['confidence']:.0%} confidence)",
        "",
        f"VIOLATION means the claim is rejected at {d['confidence']:.0%} confidence: a "
        "statistical rejection, not a proof; consistent does not prove the claim either.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| DP | {'on' if d['dp'] else 'off (control)'} |",
        f"| claimed epsilon (site's accountant) | {claim_s} |",
        f"| empirical lower bound | {d['lower_bound']:.4f} |",
        f"| most any audit of this size can show | {d['max_lower_bound']:.4f} |",
        f"| canaries (included) | {d['canaries']} ({d['canaries_included']}) |",
        f"| guesses (in / out) | {d['guesses']} ({d['guesses_in']} / {d['guesses_out']}) |",
        f"| correct guesses | {d['correct_guesses']} |",
        f"| accuracy of guesses | {d['accuracy']:.4f} |",
        f"| score | {d['score']} |",
        f"| sites x rounds | {d['sites']} x {d['rounds']} |",
        f"| time (training) | {d['seconds']:.1f} s ({d['train_seconds']:.1f} s) |",
        "",
        "A lower bound above the claim proves the claim false (up to the 5% chance the test "
        "allows). A bound at or below the claim does not prove it true: audits only find lower "
        "bounds. Method: Steinke, Nasr and Jagielski 2023, arXiv:2305.08846.",
        f"Run directory: `{d['run_dir']}`",
        "",
    ]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_audit(result: AuditResult, console: Console) -> None:
    """The result as a table, the verdict last."""
    d = result.as_dict()
    table = Table(title="Empirical privacy audit (Steinke, Nasr, Jagielski 2023)")
    table.add_column("quantity")
    table.add_column("value")
    claim = d["claimed_epsilon"]
    rows = [
        ("audit site", d["audit_site"]),
        ("claimed epsilon", claim if isinstance(claim, str) else f"{claim:.4f}"),
        ("empirical lower bound", f"{d['lower_bound']:.4f}"),
        ("largest bound this audit can show", f"{d['max_lower_bound']:.4f}"),
        ("canaries (included)", f"{d['canaries']} ({d['canaries_included']})"),
        ("guesses (in / out)", f"{d['guesses']} ({d['guesses_in']} / {d['guesses_out']})"),
        ("correct guesses", f"{d['correct_guesses']} (accuracy {d['accuracy']:.3f})"),
        ("score", d["score"]),
        ("time", f"{d['seconds']:.1f} s (training {d['train_seconds']:.1f} s)"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    if result.verdict == "VIOLATION":
        console.print(
            f"[bold red]VIOLATION[/]: the lower bound {d['lower_bound']:.4f} exceeds the claimed "
            f"epsilon: the claim is rejected at {d['confidence']:.0%} confidence (a statistical "
            "rejection, not a proof; a true claim is rejected at most "
            f"{1 - d['confidence']:.0%} of the time)."
        )
    else:
        console.print(f"[bold green]consistent[/]: lower bound {d['lower_bound']:.4f} <= claim.")
    if not d["dp"]:
        console.print(
            "Control (no DP): a clearly positive lower bound shows the audit has power here."
        )
    console.print(f"Results: {Path(result.settings.out) / 'summary.md'}")
