"""A run's one-page report for privacy officers and clinicians: a self-contained static HTML
file (inline CSS, images as data: URIs, no script, nothing fetched when opened).

Built from the run directory alone (config.json, metrics.jsonl, privacy.json, the PNGs beside
them), plus the site ledgers where they are reachable from here (a simulation's sites are
under its data-dir; a deployed site audits its own) and an empirical audit's ``audit.json``
that names this run. ``fedfuse report`` renders it on demand; every run writes one at its end.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfuse.common.errors import ConfigError, FedfuseError

REPORT_NAME = "report.html"
# The held-out site's figures in the last row of metrics.jsonl (simulations/holdout.py).
HOLDOUT_KEY = "holdout"
# Verifying a ledger recomputes every entry's epsilon with two accountants (seconds an entry
# on a loaded laptop core): the page written at the end of every run skips it, so that no run
# ends with minutes of auditing; `fedfuse report RUN_DIR` runs it.
SECTIONS = (
    ("config", "Configuration"),
    ("privacy", "Privacy spent per site"),
    ("ledger", "Ledger verification"),
    ("empirical", "Empirical privacy audit"),
    ("learning", "Learning curves"),
    ("contributions", "Modality contributions"),
    ("clinical", "Clinical evaluation"),
    ("holdout", "Held-out site"),
    ("wire", "What crossed the wire"),
)
# What a site sends besides its masked update by default (README "What crosses the wire"),
# as the server records it per site and round; anything else there was shared on opt-in.
_DEFAULT_SITE_FIELDS = {"epsilon", "delta", "ledger", "ledger-seq", "num-examples"}
_SERVER_NOTES = {"refused", "failed", "rejected"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
 color:#1b1f24;background:#f6f7f9}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:0 0 10px}
section{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:16px 20px;margin:16px 0}
table{border-collapse:collapse;font-size:.9em}td,th{border-bottom:1px solid #e5e8ec;
 padding:3px 10px 3px 0;text-align:left;vertical-align:top}th{color:#57606a;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#116329;font-weight:600}.bad{color:#b42318;font-weight:600}.na{color:#6e7781}
.bars{display:grid;grid-template-columns:minmax(80px,max-content) 1fr max-content;
 gap:2px 10px;align-items:center;font-size:.85em}
.track{position:relative;height:14px;background:#eef1f4;border-radius:3px}
.run{position:absolute;left:0;top:0;height:14px;background:#2f6fbb;border-radius:3px}
.life{position:absolute;left:0;top:4px;height:6px;background:#9a6700;opacity:.75}
.budget{position:absolute;top:-2px;width:2px;height:18px;background:#b42318}
.cfg{columns:3 240px;font-size:.85em}.cfg div{break-inside:avoid}.cfg b{font-weight:600}
img{max-width:100%}.small{font-size:.85em;color:#57606a}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, fmt: str = ".4f") -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    return format(v, fmt) if math.isfinite(v) else ("∞" if v > 0 else "-")


def _val(x: Any, fmt: str = ".4f") -> str:
    """A number as shown, with its full value in ``data-value`` (what tests compare)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return '<span class="na">-</span>'
    return f'<span data-value="{v!r}">{_num(v, fmt)}</span>'


def _png(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="na">No {alt} ({path.name} is not in the run directory).</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


@dataclass(frozen=True)
class RunFiles:
    """What a report reads from a run directory."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    privacy: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | Path) -> RunFiles:
        path = Path(run_dir)
        need = [path / n for n in ("config.json", "metrics.jsonl", "privacy.json")]
        # A run that failed before its first round has no metrics.jsonl: still worth a page.
        missing = [p.name for p in need if not p.is_file() and p.name != "metrics.jsonl"]
        if missing:
            raise ConfigError(
                f"'{path}' is not a finished run directory (it lacks {', '.join(missing)}): "
                "give the folder `fedfuse simulate` printed, e.g. runs/<run-name>"
            )
        try:
            config = json.loads(need[0].read_text())
            lines = need[1].read_text().splitlines() if need[1].is_file() else []
            rounds = [json.loads(x) for x in lines if x.strip()]
            privacy = json.loads(need[2].read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"run directory '{path}': a file does not parse as JSON ({exc}); "
                "it was changed by hand or cut short: render another run"
            ) from exc
        return cls(path, config, rounds, privacy)


def _ledger_audit(run: RunFiles, *, verify: bool) -> dict[str, Any]:
    """The ledger audit's result as a dict, or why it was not run."""
    entries = sum(
        len((s.get("ledger") or {}).get("entries", []))
        for s in run.privacy.get("sites", {}).values()
    )
    if entries == 0:
        return {"ran": False, "why": "no site recorded a ledger entry in this run (no DP)"}
    if not verify:
        return {
            "ran": False,
            "why": f"{entries} ledger entries, not verified when this page was written (the "
            f"end of the run): `fedfuse report {run.path}` or `fedfuse audit {run.path}` "
            "verifies them",
        }
    # lazy: the ledger audit pulls in Opacus' accountants; an unverified report needs neither
    from fedfuse.common.privacy.ledger_audit import audit

    try:
        return {"ran": True, **audit(run.path).as_dict()}
    except FedfuseError as exc:
        return {"ran": False, "why": str(exc)}


def _empirical(run: RunFiles) -> dict[str, Any] | None:
    """An empirical audit's ``audit.json`` that names this run (in the run directory or up to
    two folders above it), or None."""
    here = run.path.resolve()
    for folder in (here, here.parent, here.parent.parent):
        for p in sorted(folder.glob("audit.json")) + sorted(folder.glob("*/audit.json")):
            try:
                d = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(d, dict) and Path(str(d.get("run_dir", ""))).resolve() == here:
                return d
    return None


def _config_section(run: RunFiles) -> str:
    c = run.config
    items = "".join(
        f"<div><b>{_e(k)}</b> = {_e(v)}</div>"
        for k, v in sorted(c.items())
        if k not in ("data-dir", "out-dir")  # paths of this machine say nothing about the run
    )
    return (
        f"<p>{_e(c.get('num-rounds'))} rounds, strategy <b>{_e(c.get('strategy'))}</b>, fusion "
        f"<b>{_e(c.get('fusion'))}</b>, modalities <b>{_e(c.get('modalities'))}</b>, "
        f"DP level <b>{_e(c.get('dp-level'))}</b>, target (epsilon, delta) per site = "
        f"({_e(c.get('target-epsilon'))}, {_e(c.get('target-delta'))}), accountant "
        f"<b>{_e(c.get('accountant'))}</b>, SecAgg+ <b>{'on' if c.get('secagg') else 'off'}</b>."
        f'</p><div class="cfg">{items}</div>'
    )


def _privacy_section(run: RunFiles) -> str:
    p = run.privacy
    sites = p.get("sites", {})
    if not sites:
        return '<p class="na">No site took part.</p>'
    scale = 0.0
    for s in sites.values():
        for k in ("epsilon", "lifetime_epsilon", "target_epsilon", "epsilon_budget"):
            v = s.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                scale = max(scale, float(v))
    scale = scale or 1.0

    def pct(v: Any) -> float:
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return min(100.0, 100.0 * float(v) / scale) if ok else 0.0

    rows = []
    for name, s in sorted(sites.items()):
        # The site's own lifetime budget where it shares it, else the run's target.
        own = s.get("epsilon_budget")
        budget = own if own is not None else s.get("target_epsilon")
        budget_name = "budget" if own is not None else "target"
        life = s.get("lifetime_epsilon")
        bar = f'<div class="run" style="width:{pct(s.get("epsilon")):.2f}%"></div>'
        if isinstance(life, (int, float)):
            bar += f'<div class="life" style="width:{pct(life):.2f}%"></div>'
        if isinstance(budget, (int, float)) and math.isfinite(budget):
            bar += f'<div class="budget" style="left:{pct(budget):.2f}%"></div>'
        refused = s.get("refused") or []
        rows.append(
            f'<div data-site="{_e(name)}">{_e(name)}</div><div class="track">{bar}</div>'
            f"<div>run {_val(s.get('epsilon'))} · lifetime {_val(life)} · {budget_name} "
            f"{_val(budget, 'g')}{' · refused ' + str(len(refused)) if refused else ''}</div>"
        )
    level = p.get("client_level")
    extra = ""
    if level:
        extra = (
            f"<p>Client-level DP: epsilon {_val(level.get('epsilon'))} at delta "
            f"{_e(level.get('delta'))} for each site's whole contribution "
            f"(accountant {_e(level.get('accountant'))}).</p>"
        )
    return (
        f"<p>Mechanism: {_e(p.get('mechanism'))}. Accountant <b>{_e(p.get('accountant'))}</b> "
        f"(lifetime: {_e(p.get('lifetime_accountant'))}). Blue: epsilon spent in this run; "
        "brown: over the data's lifetime (every run on the site's data; shown only where the "
        "site shares it); red mark: the site's budget (else the run's target). Scale 0 to "
        f'{_num(scale, "g")}.</p>{extra}<div class="bars">{"".join(rows)}</div>'
    )


def _ledger_section(audit: dict[str, Any]) -> str:
    if not audit.get("ran"):
        return f'<p class="na" data-ledger-status="not-run">Not verified: {_e(audit["why"])}</p>'
    ok = audit["exit_code"] == 0
    cls = "ok" if ok else "bad"
    rows = []
    for led in audit["ledgers"]:
        good = led["chain_ok"] and not led["problems"] and not led["over_budget"]
        issues = led["chain_problems"] + led["problems"] + led["over_budget"] + led["notes"]
        rows.append(
            f'<tr><td>{_e(", ".join(led["sites"]))}</td><td class="n">{led["entries"]}</td>'
            f'<td class="{"ok" if led["chain_ok"] else "bad"}">'
            f"{'intact' if led['chain_ok'] else 'BROKEN'}</td>"
            f'<td class="n">{_val(led["lifetime_epsilon"])}</td>'
            f'<td class="{"ok" if good else "bad"}">{"ok" if good else "problem"}</td>'
            f"<td>{_e('; '.join(issues)) or '-'}</td></tr>"
        )
    missing = "".join(f"<li>{_e(m)}</li>" for m in audit.get("missing", []))
    return (
        f'<p>Verdict: <span class="{cls}" data-ledger-status="{_e(audit["status"])}">'
        f"{_e(audit['status'])}</span>. Each ledger's hash chain checked, every entry's "
        f"epsilon recomputed with {_e(' and '.join(audit['accountants']))}, budgets checked, "
        "and the entries the server recorded for this run found unchanged.</p>"
        "<table><tr><th>site</th><th>entries</th><th>hash chain</th><th>lifetime epsilon "
        "(recomputed)</th><th>checks</th><th>findings</th></tr>"
        + "".join(rows)
        + "</table>"
        + (f"<p>Not found here:</p><ul>{missing}</ul>" if missing else "")
    )


def _empirical_section(d: dict[str, Any] | None) -> str:
    if d is None:
        return (
            '<p class="na" data-empirical="none">No empirical audit of this run '
            "(`fedfuse audit empirical` runs one).</p>"
        )
    verdict = str(d.get("verdict", "?"))
    cls = "bad" if verdict == "VIOLATION" else "ok"
    return (
        f'<p>Verdict: <span class="{cls}" data-empirical="{_e(verdict)}">{_e(verdict)}</span>. '
        f"Claimed epsilon {_val(d.get('claimed_epsilon'))}; empirical lower bound "
        f"{_val(d.get('lower_bound'))} (canaries at site {_e(d.get('audit_site'))}).</p>"
    )


def _learning_section(run: RunFiles) -> str:
    rows = "".join(
        f'<tr><td>{_e(r.get("round"))}</td><td class="n">{_val(r.get("eval-loss"))}</td>'
        f'<td class="n">{_val(r.get("eval-accuracy"))}</td>'
        f'<td class="n">{_val(r.get("eval-auroc"))}</td>'
        f'<td class="n">{_val(r.get("max-epsilon"))}</td></tr>'
        for r in run.rounds
    )
    return (
        _png(run.path / "learning_curve.png", "learning curve")
        + _png(run.path / "epsilon.png", "epsilon per site per round")
        + "<table><tr><th>round</th><th>test loss</th><th>test accuracy</th><th>test AUROC</th>"
        f"<th>max epsilon</th></tr>{rows}</table>"
        '<p class="small">Test figures are pooled over the sites\' test splits from the sum of '
        "their evaluation vectors.</p>"
    )


def _contributions_section(run: RunFiles) -> str:
    last = run.rounds[-1] if run.rounds else {}
    mods = [m.strip() for m in str(run.config.get("modalities", "")).split(",") if m.strip()]
    mods = [m for m in mods if f"eval-auroc-drop-{m}" in last]
    if not mods:
        return '<p class="na">No modality contributions recorded.</p>'
    rows = "".join(
        f'<tr><td>{_e(m)}</td><td class="n">{_val(last.get(f"eval-weight-{m}"))}</td>'
        f'<td class="n">{_val(last.get(f"eval-auroc-without-{m}"))}</td>'
        f'<td class="n">{_val(last.get(f"eval-auroc-drop-{m}"))}</td></tr>'
        for m in mods
    )
    return (
        "<p>Final global model, pooled test splits. AUROC drop = test AUROC with every "
        "modality minus with this one hidden from every record.</p><table><tr><th>modality"
        f"</th><th>mean fusion weight</th><th>AUROC without</th><th>AUROC drop</th></tr>{rows}"
        "</table>"
    )


def _reliability_svg(bins: list[dict[str, Any]]) -> str:
    """A reliability diagram as inline SVG: fraction positive against mean score per bin."""
    size, pad = 260, 34
    inner = size - 2 * pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + x * inner, size - pad - y * inner

    parts = [
        f'<svg width="{size}" height="{size}" '
        f'role="img" aria-label="reliability diagram" data-figure="reliability">',
        f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="#fff" '
        'stroke="#9aa4ae"/>',
        '<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="#9aa4ae" '
        'stroke-dasharray="4 3"/>'.format(*xy(0, 0), *xy(1, 1)),
    ]
    for b in bins:
        try:
            lo, hi, frac = float(b["lower"]), float(b["upper"]), float(b["fraction_positive"])
        except (KeyError, TypeError, ValueError):
            continue
        if not math.isfinite(frac):
            continue
        x0, y0 = xy(lo, frac)
        x1, _ = xy(hi, 0)
        parts.append(
            f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
            f'height="{size - pad - y0:.1f}" fill="#2f6fbb" opacity=".35"/>'
        )
        mx, my = xy(float(b["mean_score"]), frac)
        parts.append(f'<circle cx="{mx:.1f}" cy="{my:.1f}" r="3.5" fill="#1b1f24"/>')
    for t in (0.0, 0.5, 1.0):
        tx, ty = xy(t, 0)
        parts.append(
            f'<text x="{tx:.1f}" y="{ty + 13:.1f}" font-size="10" text-anchor="middle">{t:g}</text>'
        )
        tx, ty = xy(0, t)
        parts.append(
            f'<text x="{tx - 4:.1f}" y="{ty + 3:.1f}" font-size="10" text-anchor="end">{t:g}</text>'
        )
    parts += [
        f'<text x="{size / 2}" y="{size - 8}" font-size="11" text-anchor="middle">'
        "mean predicted probability</text>",
        f'<text x="11" y="{size / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 11 {size / 2})">fraction positive</text>',
        "</svg>",
    ]
    return "".join(parts)


def _clinical_section(run: RunFiles) -> str:
    last = next((r for r in reversed(run.rounds) if "eval-average-precision" in r), None)
    if last is None:
        return '<p class="na">No clinical evaluation recorded (no round was evaluated).</p>'
    intro = (
        f"<p>Round {_e(last.get('round'))}, pooled over the sites' test splits "
        f"({_e(int(float(last.get('eval-records', 0))))} records), from the securely "
        "aggregated score histograms."
    )
    return _clinical_body(last, intro, attr="data-metric")


def _holdout_section(run: RunFiles) -> str:
    held = next((r[HOLDOUT_KEY] for r in reversed(run.rounds) if HOLDOUT_KEY in r), None)
    if not held:
        return (
            '<p class="na" data-holdout="none">No site was held out (<code>fedfuse simulate '
            "--holdout-site NAME</code>: a site that never trains evaluates the final model).</p>"
        )
    name = held.get("site", "?")
    if "error" in held:
        why = _e(held["error"])
        return f'<p class="bad" data-holdout="{_e(name)}">{_e(name)}: not evaluated ({why}).</p>'
    intro = (
        f'<p data-holdout="{_e(name)}">Site <b>{_e(name)}</b> never trained: it was sent '
        "nothing during the run and spent no privacy budget. After round "
        f"{_e(held.get('round'))} it evaluated the final model on all its "
        f"{_e(int(float(held.get('eval-records', 0))))} records itself and released these "
        f"figures (test loss {_val(held.get('eval-loss'))}, accuracy "
        f"{_val(held.get('eval-accuracy'))}): one site's exact statistics, outside any "
        "epsilon (README, What crosses the wire). The honest test of a new hospital."
    )
    return _clinical_body(held, intro, attr="data-holdout-metric")


def _clinical_body(last: dict[str, Any], intro: str, *, attr: str) -> str:
    """The clinical table and reliability diagram of one record; ``intro`` opens a paragraph
    that this closes."""

    def row(label: str, key: str, bound: str | None) -> str:
        return (
            f'<tr {attr}="{_e(key)}"><td>{_e(label)}</td><td class="n">'
            f'{_val(last.get(key))}</td><td class="n">{_val(last.get(key + "-ci-low"))} – '
            f'{_val(last.get(key + "-ci-high"))}</td><td class="n">'
            f"{_val(last.get(bound)) if bound else 'exact'}</td></tr>"
        )

    diagrams = last.get("reliability") or {}
    svgs = "".join(
        f'<figure>{_reliability_svg(bins)}<figcaption class="small">'
        f"{_e(task or 'positive class')}</figcaption></figure>"
        for task, bins in diagrams.items()
    )
    return (
        intro + " Operating point: the highest threshold "
        f"({_val(last.get('eval-threshold'))}) with sensitivity at least "
        f"{_num(last.get('eval-sensitivity-target'), 'g')}, chosen on these same records "
        "(so that sensitivity is met by construction; quote the specificity). 95% intervals: "
        "bootstrap over the counts (records independent; site clustering not "
        "modelled). Resolution: how far a figure can be from the raw scores' own.</p>"
        "<table><tr><th>figure</th><th>value</th><th>95% interval</th><th>resolution</th></tr>"
        + row("AUROC", "eval-auroc", "eval-auroc-full-resolution")
        + row("average precision", "eval-average-precision", "eval-average-precision-resolution")
        + row("sensitivity at threshold", "eval-sensitivity", None)
        + row("specificity at threshold", "eval-specificity", None)
        + row("expected calibration error", "eval-ece", "eval-ece-resolution")
        + "</table><h3>Reliability diagram</h3>"
        '<div style="display:flex;flex-wrap:wrap;gap:12px">' + svgs + "</div>"
        '<p class="small">Bars: fraction positive per score bin; dots at each bin\'s mean '
        "score; the dashed diagonal is perfect calibration.</p>"
    )


def _wire_section(run: RunFiles) -> str:
    secagg = bool(run.config.get("secagg"))
    shared: dict[str, set[str]] = {}
    for r in run.rounds:
        for name, s in (r.get("sites") or {}).items():
            extra = set(s) - _DEFAULT_SITE_FIELDS - _SERVER_NOTES
            if extra:
                shared.setdefault(name, set()).update(extra)
    update = (
        "the masked model update (SecAgg+: the server saw only the sum)"
        if secagg
        else "the trained model update, in the clear (SecAgg+ off)"
    )
    evaluation = (
        "the evaluation-sums vector inside a SecAgg+ round of its own (the server saw only "
        "the federation's sums)"
        if secagg
        else "the evaluation-sums vector in the clear (SecAgg+ off: that site's own sums)"
    )
    holdout = next((r[HOLDOUT_KEY] for r in reversed(run.rounds) if HOLDOUT_KEY in r), None)
    held = (
        f"<li>Held-out site {_e(holdout.get('site'))}: nothing during the run; at the end, its "
        "own figures about the final model (record count, loss, accuracy, AUROC, clinical "
        "figures, reliability diagram), exact and outside any epsilon.</li>"
        if holdout
        else ""
    )
    opt = (
        '<p class="bad">Shared in the clear, outside any epsilon (node config '
        "<code>share-site-metrics</code>):</p><ul>"
        + "".join(
            f"<li>{_e(n)}: {_e(', '.join(sorted(keys)))}</li>" for n, keys in sorted(shared.items())
        )
        + "</ul>"
        if shared
        else '<p class="ok" data-wire-optin="none">No site shared its own figures '
        "(share-site-metrics off everywhere).</p>"
    )
    return (
        '<p>What each site sent the server in this run (README, "What crosses the '
        'wire"):</p><ul>'
        f"<li>Training: {update}; in the clear its name, this run's epsilon and delta, and "
        "its ledger entry's sequence number and hash.</li>"
        f"<li>Evaluation: {evaluation}: record count, loss sum, correct predictions, score "
        "histograms on a public binning, fusion-weight sums.</li>"
        "<li>Errors: a class and a short reason without paths.</li>" + held + "</ul>" + opt
    )


def render_report(run_dir: str | Path, *, verify_ledgers: bool = True) -> str:
    """The report of the run in ``run_dir`` as one HTML string.

    ``verify_ledgers``: run the ledger audit where the site ledgers are reachable from here.

    Raises:
        ConfigError: ``run_dir`` is not a finished run directory.
    """
    run = RunFiles.load(run_dir)
    body = {
        "config": _config_section(run),
        "privacy": _privacy_section(run),
        "ledger": _ledger_section(_ledger_audit(run, verify=verify_ledgers)),
        "empirical": _empirical_section(_empirical(run)),
        "learning": _learning_section(run),
        "contributions": _contributions_section(run),
        "clinical": _clinical_section(run),
        "holdout": _holdout_section(run),
        "wire": _wire_section(run),
    }
    status = run.privacy.get("status", "?")
    reason = f" ({_e(run.privacy['reason'])})" if run.privacy.get("reason") else ""
    sections = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{body[sid]}</section>' for sid, title in SECTIONS
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No script, no fetch: the page works offline and cannot call home.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>fedfuse run {_e(run.path.name)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>fedfuse run {_e(run.path.name)}</h1><p>Status: <b data-status="{_e(status)}">'
        f"{_e(status)}</b>{reason}"
        f"</p>{sections}</main></body></html>\n"
    )


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, verify_ledgers: bool = True
) -> Path:
    """Write the report (default ``<run_dir>/report.html``); returns its path."""
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    text = render_report(run_dir, verify_ledgers=verify_ledgers)
    path.write_text(text, encoding="utf-8")
    return path
