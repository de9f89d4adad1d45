"""The run directory ``<out-dir>/<run-id>/``: config, per-round metrics, model, privacy, summary."""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from fedfuse.common.clinical import clinical_markdown
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.explain import contribution_markdown
from fedfuse.common.jsonsafe import jsonable
from fedfuse.common.privacy.ledger import LEDGER_ACCOUNTANT
from fedfuse.common.provenance import code_digest
from fedfuse.common.site_state import EVAL_LOG, STATE_DIR
from fedfuse.server.distributed_dp import ROUND_RECORD_KEY as DDP_ROUND_KEY
from fedfuse.server.privacy_report import site_privacy
from fedfuse.server.report import HOLDOUT_KEY

RoundCallback = Callable[[dict[str, Any]], None]


def _run_uid(path: Path) -> str:
    """The run's unique id, kept in its directory so a resumed run keeps it: sites key their
    ledger entries by it (the name alone may repeat across output folders)."""
    p = path / "run-uid"
    if p.exists():
        return p.read_text().strip()
    uid = secrets.token_hex(8)
    p.write_text(uid + "\n")
    return uid


def new_run_id(cfg: RunConfig, root: str | Path | None = None) -> str:
    """The run's folder name: ``run-name``, or the start time. With ``root``, a timed name is
    claimed there (its folder made) and gets a suffix ``-2``, ``-3`` ... when a run that started
    in the same second holds it: two runs must never share a folder."""
    if cfg.run_name:
        return cfg.run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if root is None:
        return stamp
    Path(root).mkdir(parents=True, exist_ok=True)
    name, n = stamp, 1
    while True:
        try:
            (Path(root) / name).mkdir()
            return name
        except FileExistsError:
            n += 1
            name = f"{stamp}-{n}"


class RunDirectory:
    """Writes the files of one run as it progresses (one JSONL line per finished round)."""

    def __init__(self, root: str | Path, cfg: RunConfig, *, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id or new_run_id(cfg, root)
        self.path = Path(root) / self.run_id
        if (self.path / "metrics.jsonl").exists():
            raise FileExistsError(
                f"run directory {self.path} already holds a run; choose another run-name"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self.resumed_after: list[int] = []
        # What a held-out site released about the final model (simulations/holdout.py).
        self.holdout: dict[str, Any] | None = None
        self.uid = _run_uid(self.path)
        self.write_json("config.json", cfg.to_mapping())
        # Which code ran (the model card of `fedfuse export` quotes it).
        self.write_json("code.json", {"sha256": code_digest()})

    @classmethod
    def reopen(cls, path: str | Path, cfg: RunConfig, *, completed_rounds: int) -> RunDirectory:
        """Continue an interrupted run here, keeping its first ``completed_rounds`` rounds.

        A round logged after the last checkpoint (a crash between the two writes) is dropped:
        it is trained again.
        """
        self = cls.__new__(cls)
        self.cfg = cfg
        self.path = Path(path)
        self.run_id = self.path.name
        self.holdout = None
        self.uid = _run_uid(self.path)
        metrics = self.path / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        self.rounds = [json.loads(x) for x in lines if x.strip()]
        self.rounds = [r for r in self.rounds if int(r["round"]) <= completed_rounds]
        if [int(r["round"]) for r in self.rounds] != list(range(1, completed_rounds + 1)):
            raise ConfigError(
                f"{metrics} does not hold rounds 1..{completed_rounds} that its checkpoint "
                "says were completed; the run directory was changed by hand: start a new run"
            )
        tmp = metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rounds))
        tmp.replace(metrics)
        self.resumed_after = [*self._resumes(), completed_rounds]
        self.write_json("resumes.json", self.resumed_after)
        return self

    def _resumes(self) -> list[int]:
        p = self.path / "resumes.json"
        return list(json.loads(p.read_text())) if p.exists() else []

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        p.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")
        return p

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(jsonable(record), sort_keys=True) + "\n")

    def _rewrite_metrics(self) -> None:
        path = self.path / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(jsonable(r), sort_keys=True) + "\n" for r in self.rounds))
        tmp.replace(path)

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> Path:
        p = self.path / "model.pt"
        torch.save(state_dict, p)
        return p

    def privacy_summary(self) -> dict[str, Any]:
        """Per site: this run's epsilon, its lifetime epsilon (every run on its data, from its
        ledger) before and after this run, its budget, refusals, and its ledger entries."""
        # Client-level DP, with the noise at the server or at the sites (distributed DP).
        key = DDP_ROUND_KEY if self.cfg.distributed_dp else "client-dp"
        client_level = next((r[key] for r in reversed(self.rounds) if key in r), None)
        return {
            "accountant": self.cfg.accountant,
            "level": self.cfg.dp_level,
            "client_level": client_level,
            "mechanism": _mechanism(self.cfg),
            "max_grad_norm": self.cfg.max_grad_norm,
            "lifetime_accountant": LEDGER_ACCOUNTANT,
            "sites": site_privacy(
                self.rounds, target_epsilon=self.cfg.target_epsilon, delta=self.cfg.target_delta
            ),
        }

    def finish(
        self, *, state_dict: dict[str, torch.Tensor] | None, status: str, reason: str = ""
    ) -> None:
        if state_dict is not None:
            self.save_model(state_dict)
        if self.holdout is not None and self.rounds:
            # The held-out site's figures are about the final model: the last round's row.
            self.rounds[-1][HOLDOUT_KEY] = self.holdout
            self._rewrite_metrics()
        privacy = {"status": status, "reason": reason, **self.privacy_summary()}
        self.write_json("privacy.json", privacy)
        # Machine-readable outcome: `fedfuse simulate` exits non-zero unless it is "completed".
        self.write_json("status.json", {"status": status, "reason": reason})
        self._plots()
        (self.path / "summary.md").write_text(self._summary(privacy, status, reason))
        self._report()

    def _report(self) -> None:
        """report.html beside summary.md (server/report.py). A report that cannot be drawn
        must not turn a finished run into a failed one: `fedfuse report` can redraw it."""
        # lazy: the report draws with matplotlib, whose import writes a cache under HOME;
        # only a finished run needs it
        from fedfuse.server.report import write_report

        try:
            write_report(self.path, verify_ledgers=False)  # fast: `fedfuse report` audits
        except Exception as exc:  # noqa: BLE001
            log(WARNING, "report.html not written: %s: %s", type(exc).__name__, exc)

    def _plots(self) -> None:
        # lazy: matplotlib takes a second and writes its cache under $HOME when imported; only
        # the end of a run draws figures
        from fedfuse.common import plots

        if not self.rounds:
            return
        target = self.cfg.target_epsilon if self.cfg.private else None
        title = plots.run_title(self.run_id, self.rounds, target_epsilon=target)
        plots.learning_curve(self.rounds, self.path / "learning_curve.png", title=title)
        per_site = plots.epsilon_history(self.rounds)
        budget: float | None = self.cfg.target_epsilon
        if not any(math.isfinite(e) for pts in per_site.values() for _, e in pts):
            # dp-level client: no site accounts a record-level epsilon; the guarantee is the
            # client-level one (no target: the run config's target is record-level).
            client = plots.client_level_history(self.rounds)
            per_site = {"client-level, every site": client} if client else {}
            budget = None
        if per_site and self.cfg.private:
            plots.epsilon_curves(
                per_site,
                self.path / "epsilon.png",
                budget=budget,
                site_budget=plots.site_budgets(self.rounds),
                title=title,
            )

    def _summary(self, privacy: dict[str, Any], status: str, reason: str) -> str:
        cfg = self.cfg
        lines = [
            f"# fedfuse run {self.run_id}",
            "",
            f"Status: **{status}**" + (f" ({reason})" if reason else ""),
            "",
            *(
                [f"Resumed from a checkpoint after round(s) {self.resumed_after}.", ""]
                if self.resumed_after
                else []
            ),
            f"{cfg.num_rounds} rounds, fusion `{cfg.fusion}`, target (epsilon, delta) = "
            f"({cfg.target_epsilon}, {cfg.target_delta}) per site, accountant `{cfg.accountant}`.",
            "Aggregation: "
            + ("SecAgg+ (the server saw only masked updates)." if cfg.secagg else "in the clear."),
            "",
            "## Rounds",
            "",
            "| round | train loss | test loss | test accuracy | test AUROC | max epsilon |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rounds:
            lines.append(
                f"| {r['round']} | {_f(r.get('train-loss'))} | {_f(r.get('eval-loss'))} | "
                f"{_f(r.get('eval-accuracy'))} | {_f(r.get('eval-auroc'))} | "
                f"{_f(r.get('max-epsilon'))} |"
            )
        lines += [
            "",
            "Test figures are pooled over the sites' test splits, from the sum of their "
            "evaluation vectors" + (" (SecAgg+)" if cfg.secagg else "") + "; each site keeps its "
            f"own figures in `{STATE_DIR}/{EVAL_LOG}` unless it shares them "
            "(node config `share-site-metrics`).",
            "",
            "## Privacy spent per site",
            "",
            "Run epsilon: this run's rounds composed. Lifetime epsilon: every run on the "
            "site's data (its ledger), before this run and after it, against the site's own "
            "budget. Noise multiplier and lifetime spend stay at the site ('-') unless it "
            "shares them.",
            "",
            "| site | run epsilon | delta | target | noise multiplier | rounds | "
            "lifetime before | lifetime after | site budget | refused |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in privacy["sites"].items():
            refused = "; ".join(f"round {r['round']}: {r['reason']}" for r in s.get("refused", []))
            lines.append(
                f"| {name} | {_f(s.get('epsilon'))} | {_g(s.get('delta'))} | "
                f"{_g(s.get('target_epsilon'))} | {_f(s.get('noise_multiplier'))} | "
                f"{s['rounds']} | {_f(s.get('lifetime_epsilon_start'))} | "
                f"{_f(s.get('lifetime_epsilon'))} | {_g(s.get('epsilon_budget'))} | "
                f"{refused or '-'} |"
            )
        client = privacy.get("client_level")
        if client:
            lines += [
                "",
                f"Client-level DP (`dp-level = {cfg.dp_level}`): epsilon "
                f"{_f(client['epsilon'])} at delta {client['delta']:g} for each site's whole "
                f"contribution; noise multiplier {client['noise_multiplier']:g} on the sum, "
                f"update clip {client['clip_norm']:g}, {client['rounds']} rounds, accountant "
                f"`{client['accountant']}`.",
            ]
            if "sampling_assumption" in client:
                lines += [
                    "",
                    f"That epsilon is the coordinator's: {client['sampling_assumption']} "
                    f"(epsilon at rate 1: {_f(client.get('epsilon_unamplified'))}).",
                ]
        if (self.path / "epsilon.png").exists():
            lines += ["", "![epsilon per site](epsilon.png)"]
        if self.rounds:
            lines += clinical_markdown(self.rounds[-1])
            lines += _holdout_markdown(self.rounds[-1].get(HOLDOUT_KEY))
            lines += contribution_markdown(self.rounds[-1], cfg.modality_names)
        if self.rounds and cfg.task_classes:
            last = self.rounds[-1]
            lines += [
                "",
                "## Tasks",
                "",
                "Extra tasks (run config `tasks`), last round, pooled over the test records "
                "that have the task's label:",
                "",
                "| task | labelled test records | test accuracy | test AUROC |",
                "|---|---|---|---|",
            ]
            for t in cfg.task_classes:
                lines.append(
                    f"| {t} | {_g(last.get(f'eval-records-task-{t}'))} | "
                    f"{_f(last.get(f'eval-accuracy-task-{t}'))} | "
                    f"{_f(last.get(f'eval-auroc-task-{t}'))} |"
                )
        return "\n".join(lines) + "\n"


def _holdout_markdown(held: dict[str, Any] | None) -> list[str]:
    """summary.md lines for the held-out site's figures (none without one)."""
    if not held:
        return []
    name = held.get("site", "?")
    if "error" in held:
        return ["", f"## Held-out site {name}", "", f"Not evaluated: {held['error']}."]
    head = [
        "",
        f"## Held-out site {name} (never trained)",
        "",
        f"Sent nothing and spent no budget; after round {held.get('round')} it evaluated the "
        f"final model on all its {_g(held.get('eval-records'))} records itself: test loss "
        f"{_f(held.get('eval-loss'))}, accuracy {_f(held.get('eval-accuracy'))}, AUROC "
        f"{_f(held.get('eval-auroc'))}. These are one site's exact figures, released by it, "
        "outside any epsilon (README, What crosses the wire).",
    ]
    return head + clinical_markdown(
        held,
        heading=f"Clinical evaluation, held-out site {name}",
        source=f"the score histograms of held-out site {name}'s records",
    )


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _f(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4f}" if math.isfinite(x) else str(x)
    return str(x)


def _mechanism(cfg: RunConfig) -> str:
    """What protects the data in this run, in words (privacy.json ``mechanism``)."""
    parts = []
    if cfg.record_level_dp:
        parts.append("record-level DP-SGD at each site (Opacus), Poisson sampling, Gaussian noise")
    if cfg.client_level_dp:
        parts.append(
            "client-level DP: updates clipped at the sites, Gaussian noise added by the server"
        )
    if cfg.distributed_dp:
        parts.append(
            "distributed client-level DP: each site clips, rotates, rounds and adds its share of "
            "discrete Gaussian noise inside SecAgg+ (holds while at least the reconstruction "
            "threshold of sites survive)"
        )
    return "; ".join(parts) or "none (no differential privacy)"
