"""What a run hands over: the HTML report (in a real headless browser), predictions and the
exported model with its card. One tiny in-process federation serves every test here."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import manifest_for
from fedfuse.common.data.synthetic import generate
from fedfuse.common.errors import ConfigError, FedfuseError
from fedfuse.common.models import build_model
from fedfuse.common.provenance import code_digest
from fedfuse.common.site_state import EVAL_LOG, LEDGER_NAME, STATE_DIR, TRAIN_LOG
from fedfuse.export import load_model, site_records
from fedfuse.server.report import SECTIONS, write_report
from fedfuse.simulations.runner import federate_in_process
from tests.support.browser import chromium, load

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-site, 1-round private run (SecAgg+ on), its sites under data/: site-0 and
    site-2 train, site-1 is held out (it only evaluates the final model)."""
    root = tmp_path_factory.mktemp("run")
    # Some records lack a modality: predictions must handle them as training did.
    generate(root / "data", sites=3, records=160, seed=1, missing_rate=0.3)
    cfg = RunConfig(
        data_dir=str(root / "data"),
        out_dir=str(root / "runs"),
        num_rounds=1,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
        run_name="tiny",
        holdout_site=HELD_OUT,
    )
    return federate_in_process(cfg, num_sites=2)


HELD_OUT = "site-1"


def _last_round(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def _shown(dom: str, pattern: str) -> tuple[float, str]:
    m = re.search(pattern + r'.*?<span data-value="([^"]+)">([^<]+)</span>', dom, re.S)
    assert m, pattern
    return float(m[1]), m[2]


def test_report_in_a_headless_browser(run: Path, tmp_path: Path) -> None:
    # Written at the end of the run, beside summary.md (fast: without the ledger audit) ...
    assert (run / "summary.md").is_file()
    assert 'data-ledger-status="not-run"' in (run / "report.html").read_text()
    # ... and by `fedfuse report`, which audits the site ledgers.
    page = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(page)])
    assert res.exit_code == 0, res.output
    exe, why = chromium()
    if exe is None:
        pytest.skip(why)
    shot = tmp_path / "report.png"
    dom, log = load(exe, page, tmp_path, screenshot=shot)
    # No console message at all: the page's CSP turns any fetch or script into one.
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log[-2000:]
    assert shot.stat().st_size > 20_000
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"><h2>{title}</h2>' in dom
    assert "http://" not in dom and "https://" not in dom
    privacy = json.loads((run / "privacy.json").read_text())
    for name, site in privacy["sites"].items():
        value, text = _shown(dom, f'data-site="{name}">.*?run ')
        assert value == site["epsilon"] and text == f"{site['epsilon']:.4f}"
    assert 'data-ledger-status="ok"' in dom
    last = _last_round(run)
    for key in ("eval-auroc", "eval-average-precision", "eval-specificity", "eval-ece"):
        value, _ = _shown(dom, f'data-metric="{key}"><td>[^<]*</td><td class="n">')
        assert value == last[key]
    # The pooled one and the held-out site's.
    assert dom.count('data-figure="reliability"') == 2
    held = _last_round(run)["holdout"]
    value, _ = _shown(dom, 'data-holdout-metric="eval-auroc"><td>[^<]*</td><td class="n">')
    assert value == held["eval-auroc"]
    assert 'data-wire-optin="none"' in dom


def test_held_out_site_never_trains_and_is_reported_apart(run: Path) -> None:
    site = run.parents[1] / "data" / HELD_OUT
    # Never trained: no ledger, no secret, no training log; its own evaluation log only.
    state = site / STATE_DIR
    assert not (state / LEDGER_NAME).exists() and not (state / TRAIN_LOG).exists()
    (local,) = [json.loads(x) for x in (state / EVAL_LOG).read_text().splitlines()]
    cfg = RunConfig.from_mapping(json.loads((run / "config.json").read_text()))
    records = len(site_records(site, cfg))  # every split: it trained on none
    assert local["run-id"] == "tiny" and local["num-examples"] == records
    privacy = json.loads((run / "privacy.json").read_text())
    assert HELD_OUT not in privacy["sites"]
    last = _last_round(run)
    assert HELD_OUT not in last["sites"]
    held = last["holdout"]
    assert held["site"] == HELD_OUT and held["round"] == last["round"] == 1
    assert held["eval-records"] == records and 0.0 <= held["eval-auroc"] <= 1.0
    # Its figures come from its own sums the way the pooled ones do: its AUROC equals the
    # clear-text one to the histogram's resolution.
    assert abs(held["eval-auroc"] - local["eval-auroc"]) <= held["eval-auroc-resolution"] + 1e-9
    for key in ("eval-specificity", "eval-ece", "eval-auroc-ci-low", "eval-average-precision"):
        assert key in held
    assert set(held["reliability"]) == {""}
    summary = (run / "summary.md").read_text()
    assert f"## Held-out site {HELD_OUT} (never trained)" in summary
    assert f"## Clinical evaluation, held-out site {HELD_OUT}" in summary
    assert f'data-holdout="{HELD_OUT}"' in (run / "report.html").read_text()


def test_unknown_holdout_site_is_one_line(run: Path) -> None:
    data = run.parents[1] / "data"
    res = CliRunner().invoke(
        app, ["simulate", "--data", str(data), "--holdout-site", "site-9", "--out", str(data)]
    )
    assert res.exit_code != 0
    assert "--holdout-site 'site-9'" in res.output and "site-0, site-1, site-2" in res.output
    assert "Traceback" not in res.output


def test_report_shows_a_rewritten_ledger(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(run, copy)
    privacy = json.loads((copy / "privacy.json").read_text())
    privacy["sites"]["site-0"]["ledger"]["entries"][0]["hash"] = "0" * 64
    (copy / "privacy.json").write_text(json.dumps(privacy))
    res = CliRunner().invoke(app, ["report", str(copy), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "r.html").read_text()
    assert 'data-ledger-status="tampered or inconsistent"' in text
    assert "rewritten" in text


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0
    assert isinstance(res.exception, ConfigError)
    assert "not a finished run directory" in str(res.exception)
    with pytest.raises(ConfigError, match="lacks config.json, privacy.json"):
        write_report(tmp_path)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_round_trip_and_model_card(run: Path, tmp_path: Path) -> None:
    site = run.parents[1] / "data" / "site-1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "export")])
    assert res.exit_code == 0, res.output
    # Tracing the model's fixed shape checks is expected, not something to show the user.
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], [
        str(w.message)[:120] for w in caught
    ]
    export = tmp_path / "export"
    assert (export / "model.ts").is_file()
    # The exported TorchScript model against the training model, record by record.
    cfg = RunConfig.from_mapping(json.loads((run / "config.json").read_text()))
    eager = build_model(cfg)
    eager.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    eager.eval()
    ds = site_records(site, cfg)
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    scripted = torch.jit.load(str(export / "model.ts"))
    missing = 0
    with torch.no_grad():
        for mask, *xs, _ in loader:
            missing += int((mask == 0).any(dim=1).sum())
            torch.testing.assert_close(scripted(mask, *xs), eager(mask, *xs), rtol=1e-5, atol=1e-6)
    assert missing > 0  # records with a modality missing went through both
    _onnx_matches(export, eager, loader)
    # `fedfuse predict` gives the same file from the run and from the export.
    a, b = tmp_path / "run.csv", tmp_path / "export.csv"
    for src, out in ((run, a), (export, b)):
        res = CliRunner().invoke(app, ["predict", str(src), "--data", str(site), "--out", str(out)])
        assert res.exit_code == 0, res.output
    assert a.read_text() == b.read_text()
    rows = _read_csv(a)
    assert [r["id"] for r in rows] == [r.id for r in ds.records]
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in cfg.class_names]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == cfg.class_names[max(range(len(p)), key=p.__getitem__)]
    # The card: privacy as privacy.json says, evaluation as metrics.jsonl, hashes of the files.
    card = json.loads((export / "model_card.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    assert set(card["sites"]) == set(privacy["sites"]) == {"site-0", "site-2"}
    assert card["privacy"]["epsilon_max_over_sites"] == max(
        s["epsilon"] for s in privacy["sites"].values()
    )
    assert card["privacy"]["delta"] == 1e-5 and card["privacy"]["accountant"] == "prv"
    assert any("SecAgg+" in a for a in card["privacy"]["assumptions"])
    last = _last_round(run)
    assert card["evaluation"]["figures"]["specificity"] == last["eval-specificity"]
    assert card["evaluation"]["figures"]["auroc-ci-low"] == last["eval-auroc-ci-low"]
    held = card["evaluation"]["held_out_site"]
    assert held["site"] == HELD_OUT and held["figures"]["auroc"] == last["holdout"]["eval-auroc"]
    digest = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
    assert card["hashes"]["weights (model.pt)"] == digest
    code = json.loads((run / "code.json").read_text())["sha256"]
    assert card["hashes"]["code of the run"] == code == code_digest()
    md = (export / "model_card.md").read_text()
    assert digest in md and "## Privacy guarantee" in md and "## Intended use" in md
    assert f"held-out site {HELD_OUT}, which never trained" in md


def test_predict_on_unlabelled_records(run: Path, tmp_path: Path) -> None:
    """New records come without labels: a manifest with no label column predicts the same
    probabilities as the labelled copy of the same records."""
    site = tmp_path / "new"
    src = run.parents[1] / "data" / "site-0"
    shutil.copytree(src, site, ignore=shutil.ignore_patterns(".fedfuse"))
    rows = _read_csv(site / "manifest.csv")
    with open(site / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c not in ("label", "split")])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k in w.fieldnames} for r in rows)
    a, b = tmp_path / "labelled.csv", tmp_path / "unlabelled.csv"
    for data, out in ((src, a), (site, b)):
        res = CliRunner().invoke(app, ["predict", str(run), "--data", str(data), "--out", str(out)])
        assert res.exit_code == 0, res.output
    assert len(_read_csv(b)) == len(rows) and a.read_text() == b.read_text()
    # Training still requires labels.
    with pytest.raises(FedfuseError, match="required column 'label' is missing"):
        manifest_for(site, RunConfig())


def _onnx_matches(
    export: Path, eager: torch.nn.Module, loader: torch.utils.data.DataLoader
) -> None:
    """The exported ONNX model (onnxruntime) gives the torch model's logits, batch by batch
    (batch sizes other than the export example's included)."""
    ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
    assert (export / "model.onnx").is_file()
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    sizes = set()
    with torch.no_grad():
        for mask, *xs, _ in loader:
            feed = {n: t.numpy() for n, t in zip(names, (mask, *xs), strict=True)}
            (logits,) = session.run(["logits"], feed)
            sizes.add(len(mask))
            torch.testing.assert_close(
                torch.from_numpy(logits), eager(mask, *xs), rtol=1e-4, atol=1e-5
            )
    assert len(sizes) > 1


def test_predict_bad_input_is_one_line(run: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(
        run.parents[1] / "data" / "site-0", site, ignore=shutil.ignore_patterns(".fedfuse")
    )
    manifest = site / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[3] = lines[3].replace("images/", "images/nope-")
    manifest.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["predict", str(run), "--data", str(site)])
    assert res.exit_code != 0 and isinstance(res.exception, FedfuseError)
    assert "manifest.csv" in str(res.exception) and ":4" in str(res.exception)
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def test_tracking_to_tensorboard_and_mlflow_reads_back(run: Path, tmp_path: Path) -> None:
    """`fedfuse track` (the logging `simulate --track` does during a run) on the tiny run:
    the event files and the MLflow run hold every round's figures, each site's epsilon, the
    held-out site's figures, the config as parameters and the run's files as artifacts."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the 'track' extra is not installed",
    )
    mlflow_tracking = pytest.importorskip("mlflow.tracking", reason="no 'track' extra")
    copy = tmp_path / "tiny"  # TensorBoard writes into the run directory
    shutil.copytree(run, copy)
    rows, privacy = _rows(copy), json.loads((copy / "privacy.json").read_text())
    last = rows[-1]
    res = CliRunner().invoke(app, ["track", str(copy), "--to", "tensorboard"])
    assert res.exit_code == 0, res.output
    acc = event_accumulator.EventAccumulator(str(copy / "tensorboard"))
    acc.Reload()
    for key in ("eval-auroc", "eval-loss", "max-epsilon", "eval-specificity"):
        points = acc.Scalars(key)
        assert [p.step for p in points] == [r["round"] for r in rows]
        assert [p.value for p in points] == pytest.approx([r[key] for r in rows], rel=1e-6)
    for name, site in privacy["sites"].items():
        assert acc.Scalars(f"epsilon/{name}")[-1].value == pytest.approx(site["epsilon"], rel=1e-6)
    held = acc.Scalars("holdout/eval-auroc")
    assert len(held) == 1 and held[0].value == pytest.approx(last["holdout"]["eval-auroc"])

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["track", str(copy), "--to", "mlflow", "--uri", uri])
    assert res.exit_code == 0, res.output
    client = mlflow_tracking.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("fedfuse").experiment_id])
    assert found.info.run_name == "tiny" and found.info.status == "FINISHED"
    config = json.loads((copy / "config.json").read_text())
    assert found.data.params["holdout-site"] == HELD_OUT
    assert found.data.params["target-epsilon"] == str(config["target-epsilon"])
    history = client.get_metric_history(found.info.run_id, "eval-auroc")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["eval-auroc"]) for r in rows]
    for name, site in privacy["sites"].items():
        assert found.data.metrics[f"epsilon/{name}"] == site["epsilon"]
    assert found.data.metrics["holdout/eval-auroc"] == last["holdout"]["eval-auroc"]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"report.html", "model.pt", "summary.md", "privacy.json"} <= artifacts
    # Beside the store, not in the folder the command ran in.
    assert (tmp_path / "mlflow-artifacts").is_dir()


def test_tracking_without_the_extra_is_one_line(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("torch.utils.tensorboard", "mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    for kind in ("tensorboard", "mlflow"):
        res = CliRunner().invoke(app, ["track", str(run), "--to", kind])
        assert res.exit_code != 0 and isinstance(res.exception, ConfigError)
        assert "'track' extra" in str(res.exception) and "fedfuse[track]" in str(res.exception)
    res = CliRunner().invoke(app, ["track", str(run), "--to", "wandb"])
    assert "unknown tracker; choose one of tensorboard, mlflow" in str(res.exception)
    assert not (run / "tensorboard").exists()
