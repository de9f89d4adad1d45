"""``fedfuse predict`` and ``fedfuse export``: use a run's model on a site folder, and hand it
over as TorchScript (ONNX where ``onnx`` is installed) with a model card.

An export folder (``<run>/export/``) holds ``model.ts`` (TorchScript: ``model(mask, *inputs)``
-> logits, inputs in the run's modality order), ``config.json`` (the run config: how to turn a
site folder into inputs), ``model_card.md`` and ``model_card.json``. ``fedfuse predict`` takes
either a run directory or such a folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from torch import nn

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError, FedfuseError
from fedfuse.common.provenance import code_digest

EXPORT_DIR = "export"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
CODE_FILE = "code.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_config(folder: Path) -> RunConfig:
    f = folder / "config.json"
    if not f.is_file():
        raise ConfigError(
            f"'{folder}' has no config.json: give a finished run directory (runs/<run-name>) "
            "or the folder `fedfuse export` wrote"
        )
    try:
        return RunConfig.from_mapping(json.loads(f.read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{f} does not parse as JSON ({exc}): export the run again") from exc


@dataclass
class LoadedModel:
    """A model ready to predict: eager (a run directory) or TorchScript (an export folder)."""

    cfg: RunConfig
    module: Any  # nn.Module or torch.jit.ScriptModule: module(mask, *inputs) -> logits
    source: str


def load_model(model_or_run: str | Path) -> LoadedModel:
    """The model of a run directory (``model.pt``) or an export folder (``model.ts``).

    Raises:
        ConfigError: neither, or a file there cannot be loaded.
    """
    # lazy: torch-heavy; the CLI imports this module at start-up to register its commands
    from fedfuse.common.models import build_model

    folder = Path(model_or_run)
    if folder.is_file():
        folder = folder.parent
    cfg = _load_config(folder)
    if (folder / TORCHSCRIPT).is_file():
        try:
            module = torch.jit.load(str(folder / TORCHSCRIPT), map_location="cpu")
        except RuntimeError as exc:
            raise ConfigError(f"{folder / TORCHSCRIPT} is not a TorchScript model: {exc}") from exc
        return LoadedModel(cfg, module.eval(), str(folder / TORCHSCRIPT))
    weights = folder / "model.pt"
    if not weights.is_file():
        raise ConfigError(
            f"'{folder}' holds neither model.pt nor {TORCHSCRIPT}: the run did not finish; "
            "give a finished run directory or an export folder"
        )
    model = build_model(cfg)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{weights} does not fit the run's config.json: {exc}") from exc
    return LoadedModel(cfg, model.eval(), str(weights))


def site_records(site_dir: str | Path, cfg: RunConfig) -> Any:
    """Every record of a site folder (all splits, manifest order) as a dataset, read the way
    training read it (missing modalities as absent, no augmentation).

    Raises:
        DataValidationError: the folder is not a valid site for the run (one line per problem,
            naming the file and row).
    """
    # lazy: torch-heavy; the CLI imports this module at start-up to register its commands
    from fedfuse.common.data.dataset import LabelEncoder, SiteDataset, manifest_for
    from fedfuse.common.data.modalities import build_inputs

    # New records come without labels: predicting needs none (a label column is still checked).
    manifest = manifest_for(site_dir, cfg, labelled=False)
    return SiteDataset(
        list(manifest.records),
        inputs=build_inputs(cfg, manifest),
        labels=_UnlabelledOr(LabelEncoder(cfg.class_names, multi_label=cfg.multi_label)),
        train=False,
    )


class _UnlabelledOr:
    """A label encoder that gives a record without labels a placeholder target (-1, or no
    class for multi-label); predictions never read it."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def __call__(self, labels: tuple[str, ...]) -> torch.Tensor:
        if labels:
            return self.encoder(labels)
        if self.encoder.multi_label:
            return torch.zeros(len(self.encoder.classes), dtype=torch.float32)
        return torch.tensor(-1, dtype=torch.long)


@torch.no_grad()
def predict_probabilities(model: LoadedModel, dataset: Any, *, batch_size: int = 256) -> Any:
    """Per record, the probability of each class (softmax; sigmoid per class when multi-label)."""
    # lazy: torch-heavy; the CLI imports this module at start-up to register its commands
    from torch.utils.data import DataLoader

    out = []
    for mask, *inputs, _y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = model.module(mask, *inputs).float()
        out.append(torch.sigmoid(logits) if model.cfg.multi_label else logits.softmax(dim=1))
    if not out:
        return torch.zeros(0, len(model.cfg.class_names))
    return torch.cat(out)


def predicted_labels(probs: Any, cfg: RunConfig) -> list[str]:
    names = cfg.class_names
    if cfg.multi_label:  # every label at 0.5 or more ("|"-joined, as in manifests)
        return ["|".join(n for n, p in zip(names, row, strict=True) if p >= 0.5) for row in probs]
    return [names[int(i)] for i in probs.argmax(dim=1)]


def write_predictions(model_or_run: str | Path, site_dir: str | Path, out: str | Path) -> int:
    """Write ``id, p_<class>..., predicted`` for every record of ``site_dir``; the count."""
    # lazy: torch-heavy; the CLI imports this module at start-up to register its commands
    from fedfuse.common.data.manifest import csv_safe

    model = load_model(model_or_run)
    ds = site_records(site_dir, model.cfg)
    probs = predict_probabilities(model, ds)
    labels = predicted_labels(probs, model.cfg)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *(f"p_{c}" for c in model.cfg.class_names), "predicted"])
        for rec, row, label in zip(ds.records, probs.tolist(), labels, strict=True):
            # Ids and labels come from the site's manifest: escaped if a spreadsheet would
            # run them as formulas.
            w.writerow([csv_safe(rec.id), *(f"{p:.6g}" for p in row), csv_safe(label)])
    return len(ds)


class _Logits(nn.Module):
    """The fusion model with a fixed signature for tracing: (mask, *inputs) -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mask: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(mask, *inputs)


def _example_inputs(cfg: RunConfig) -> tuple[torch.Tensor, ...]:
    """A batch of two records, the first with every modality, the second with none, in the
    shapes and dtypes the run's loaders give (empty inputs are the absent modality's)."""
    # lazy: torch-heavy; the CLI imports this module at start-up to register its commands
    from fedfuse.common.data.manifest import Manifest
    from fedfuse.common.data.modalities import build_inputs

    manifest = Manifest(Path("."), Path("manifest.csv"), (), cfg.tabular_names)
    inputs = build_inputs(cfg, manifest)
    mask = torch.tensor([[1.0] * len(inputs), [0.0] * len(inputs)])
    xs = [torch.stack([inp.empty(), inp.empty()]) for inp in inputs]
    return (mask, *xs)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def model_card(run_dir: Path, cfg: RunConfig, files: dict[str, str]) -> dict[str, Any]:
    """The model card's facts, from the run directory alone."""
    privacy = json.loads((run_dir / "privacy.json").read_text())
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = next((r for r in reversed(rounds) if "eval-auroc" in r), {})
    sites = {}
    for name, s in sorted(privacy.get("sites", {}).items()):
        shared = next(
            (
                r["sites"][name]["train-examples"]
                for r in reversed(rounds)
                if "train-examples" in r.get("sites", {}).get(name, {})
            ),
            None,
        )
        sites[name] = {
            "rounds": s.get("rounds"),
            "training_records": shared,
            "training_records_note": "as the site reported it"
            if shared is not None
            else "not reported: a site's training-set size stays at the site unless it shares it",
            "epsilon": _finite(s.get("epsilon")),
            "delta": _finite(s.get("delta")),
        }
    eps = [v["epsilon"] for v in sites.values() if v["epsilon"] is not None]
    assumptions = [
        "epsilon bounds what the model reveals about any one record of a site, per site; it "
        "holds for the noise the site drew itself (Opacus DP-SGD, Poisson sampling) and is "
        "recorded in the site's tamper-evident ledger",
        "the sites' evaluation figures (pooled loss, AUROC, the clinical figures) are not "
        "differentially private: SecAgg+ hides which site contributed what, not whether a "
        "record was in a test split",
    ]
    if cfg.secagg:
        assumptions.append(
            "SecAgg+: the server saw only sums while it followed the protocol and fewer than "
            "the reconstruction threshold of sites colluded with it"
        )
    if cfg.distributed_dp:
        assumptions.append(
            "distributed DP holds while at least the reconstruction threshold of sites are "
            "honest and survive each round"
        )
    if not cfg.private:
        assumptions = ["no differential privacy: this model may reveal its training records"]
    evaluation = _figures(last)
    held = last.get("holdout") or {}
    held_out = (
        {
            "split": f"every record of held-out site {held.get('site')}, which never trained "
            "(its own figures, released by it)",
            "site": held.get("site"),
            "round": held.get("round"),
            "figures": _figures(held),
        }
        if held and "error" not in held
        else None
    )
    return {
        "model": f"fedfuse {cfg.fusion} fusion of {', '.join(cfg.modality_names)}",
        "run": run_dir.name,
        "intended_use": (
            f"Research: {'multi-label' if cfg.multi_label else 'single-label'} classification "
            f"into {', '.join(cfg.class_names)} from {', '.join(cfg.modality_names)}, on data "
            "laid out and preprocessed as the sites' (config.json). Not a medical device: not "
            "for diagnosis without validation at the deploying site."
        ),
        "classes": list(cfg.class_names),
        "modalities": list(cfg.modality_names),
        "sites": sites,
        "privacy": {
            "level": cfg.dp_level if cfg.private else "none",
            "mechanism": privacy.get("mechanism"),
            "epsilon_max_over_sites": max(eps) if eps else None,
            "target_epsilon": _finite(cfg.target_epsilon),
            "delta": cfg.target_delta,
            "accountant": cfg.accountant,
            "client_level": privacy.get("client_level"),
            "assumptions": assumptions,
        },
        "evaluation": {
            "split": "the sites' test splits, pooled from the securely aggregated sums",
            "round": last.get("round"),
            "figures": evaluation,
            "held_out_site": held_out,
        },
        "hashes": files,
    }


def _figures(row: dict[str, Any]) -> dict[str, float | None]:
    """A row's ``eval-*`` numbers, without the prefix."""
    return {
        k.removeprefix("eval-"): _finite(v)
        for k, v in row.items()
        if k.startswith("eval-") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def card_markdown(card: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:g}"
        return "-" if x is None else str(x)

    p = card["privacy"]
    lines = [
        f"# Model card: {card['model']}",
        "",
        f"Run `{card['run']}`.",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        f"Classes: {', '.join(card['classes'])}. Modalities: {', '.join(card['modalities'])}.",
        "",
        "## Data sites",
        "",
        "| site | rounds | training records | epsilon | delta |",
        "|---|---|---|---|---|",
    ]
    for name, s in card["sites"].items():
        lines.append(
            f"| {name} | {f(s['rounds'])} | {f(s['training_records'])} | {f(s['epsilon'])} | "
            f"{f(s['delta'])} |"
        )
    lines += [
        "",
        "Training records: "
        + "; ".join(sorted({s["training_records_note"] for s in card["sites"].values()}))
        + ".",
        "",
        "## Privacy guarantee",
        "",
        f"Level `{p['level']}`: {p['mechanism']}. Epsilon {f(p['epsilon_max_over_sites'])} "
        f"(largest over sites; target {f(p['target_epsilon'])}) at delta {p['delta']:g}, "
        f"accountant `{p['accountant']}`.",
        "",
        "Assumptions:",
        "",
        *[f"- {a}" for a in p["assumptions"]],
        "",
        "## Evaluation",
        "",
    ]
    held = card["evaluation"].get("held_out_site")
    for part in (card["evaluation"], *([held] if held else [])):
        lines += _evaluation_table(part, f)
    lines += ["## Hashes (SHA-256)", ""]
    lines += [f"- {k}: `{v}`" for k, v in card["hashes"].items()]
    return "\n".join(lines) + "\n"


def _evaluation_table(part: dict[str, Any], f: Any) -> list[str]:
    """Model-card lines for one evaluation (the pooled one, or the held-out site's)."""
    ev = part["figures"]
    lines = [
        f"On {part['split']}, round {part['round']}.",
        "",
        "| figure | value | 95% interval |",
        "|---|---|---|",
    ]
    for key, label in (
        ("auroc", "AUROC"),
        ("average-precision", "average precision"),
        ("sensitivity", "sensitivity at threshold"),
        ("specificity", "specificity at threshold"),
        ("ece", "expected calibration error"),
        ("accuracy", "accuracy"),
        ("loss", "loss"),
    ):
        if key in ev:
            lo, hi = ev.get(f"{key}-ci-low"), ev.get(f"{key}-ci-high")
            ci = f"{f(lo)} – {f(hi)}" if lo is not None else "-"
            lines.append(f"| {label} | {f(ev[key])} | {ci} |")
    if "threshold" in ev:
        lines += ["", f"Operating threshold: {f(ev['threshold'])}."]
    return lines + [""]


def export_run(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """TorchScript (and ONNX with ``onnx`` installed) and the model card; the files written.

    Raises:
        ConfigError: not a finished run directory.
    """
    run_dir = Path(run_dir)
    for name in ("privacy.json", "metrics.jsonl", "model.pt"):
        if not (run_dir / name).is_file():
            raise ConfigError(
                f"'{run_dir}' lacks {name}: give a finished run directory (runs/<run-name>)"
            )
    model = load_model(run_dir)
    cfg = model.cfg
    out_dir = Path(out) if out is not None else run_dir / EXPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    example = _example_inputs(cfg)
    wrapped = _Logits(model.module).eval()
    with warnings.catch_warnings():
        # Tracing warns about attributes the heads keep for explanation (last_weights).
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    ts = out_dir / TORCHSCRIPT
    traced.save(str(ts))
    written = {"torchscript": ts}
    try:
        # lazy: onnx is an optional package (torch.onnx needs it)
        import onnx  # noqa: F401  (torch.onnx needs it)
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            # The TorchScript-based exporter (dynamo=False): the torch.export-based one needs
            # onnxscript and traces the masked fusion no better. Inputs as model.ts takes
            # them, any batch size.
            names = ["mask", *cfg.modality_names]
            with warnings.catch_warnings():
                # The exporter traces again: the heads' checks of the mask's width against the
                # modalities become constants, as they should (the width is fixed by the model).
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(
                    wrapped,
                    example,
                    str(out_dir / ONNX),
                    dynamo=False,
                    input_names=names,
                    output_names=["logits"],
                    dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]},
                )
            written["onnx"] = out_dir / ONNX
        except Exception as exc:  # noqa: BLE001  (ONNX is optional: TorchScript is the export)
            (out_dir / ONNX).unlink(missing_ok=True)
            warnings.warn(f"ONNX export failed, TorchScript only: {exc}", stacklevel=2)
    (out_dir / "config.json").write_text((run_dir / "config.json").read_text())
    code = run_dir / CODE_FILE
    hashes = {
        "weights (model.pt)": _sha256(run_dir / "model.pt"),
        f"TorchScript ({TORCHSCRIPT})": _sha256(ts),
        "code at export": code_digest(),
    }
    if "onnx" in written:
        hashes[f"ONNX ({ONNX})"] = _sha256(written["onnx"])
    if code.is_file():
        hashes["code of the run"] = str(json.loads(code.read_text()).get("sha256"))
    card = model_card(run_dir, cfg, hashes)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "model_card.md").write_text(card_markdown(card))
    written["card"] = out_dir / "model_card.md"
    return written


console = Console()


def predict(
    model_or_run: Path = typer.Argument(..., help="A run directory or an export folder."),
    data: Path = typer.Option(
        ..., "--data", help="A site folder (manifest.csv; a label column is not needed)."
    ),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="The CSV to write."),
) -> None:
    """Predict every record of a site folder: id, probability per class, predicted label."""
    n = write_predictions(model_or_run, data, out)
    console.print(f"{n} predictions written to {out}", soft_wrap=True, highlight=False)


def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    out: Path | None = typer.Option(None, "--out", help="Folder (default: RUN_DIR/export)."),
) -> None:
    """TorchScript (ONNX too where `onnx` is installed) and a model card (Markdown + JSON)."""
    written = export_run(run_dir, out)
    for kind, path in written.items():
        console.print(f"{kind}: {path}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``fedfuse predict`` and ``fedfuse export`` to the ``fedfuse`` app."""
    app.command("predict")(predict)
    app.command("export")(export)


__all__ = ["FedfuseError", "export_run", "load_model", "register", "write_predictions"]
