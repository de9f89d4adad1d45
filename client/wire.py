"""What leaves a site besides its (masked) update: short error reasons, opt-in figures, logs.

A reply carries an error class and a short reason, never a file path or a traceback: those go
to the site's own log. Per-site evaluation figures and privacy internals leave the site only
when its node config opts in (``share-site-metrics = true``; outside any epsilon, see the
README's privacy section); otherwise they stay in ``<site>/.fedfuse/eval.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedfuse.client.node_config import NodeConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.site_state import eval_log, train_log

_LOG = logging.getLogger(__name__)

# A path: a slash that does not follow a word character ("and/or", "1/2" are not paths).
_PATH = re.compile(r"(?<![\w])(?:[A-Za-z]:)?(?:~|\.{1,2})?[\\/][^\s'\"(),;:<>]*")
_MAX_REASON = 300


def public_reason(text: str) -> str:
    """``text`` fit to leave the site: first line, file paths replaced, at most 300 chars."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    line = _PATH.sub("<path>", line)
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def site_label(msg: Message, ctxt: Context) -> str | None:
    """The site's name for an error reply, if its node config or the request says it."""
    try:
        node = NodeConfig.parse(ctxt.node_config)
    except ConfigError:  # naming is a courtesy: the bad node config is the error itself
        return None
    if node.site_name:
        return node.site_name
    if node.data_path is not None:
        return node.data_path.name
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if config is not None and node.partition_id is not None and config.get("data-dir"):
        try:
            # lazy: fedfuse.client.site loads the data pipeline (torch); every message of a
            # deployed site loads this module, and only a simulated site's error reply needs it
            from fedfuse.client.site import simulation_site_dirs

            dirs = simulation_site_dirs(
                str(config["data-dir"]), holdout=str(config.get("holdout-site", ""))
            )
            return dirs[node.partition_id].name
        except Exception:  # naming is a courtesy: never let it hide the real error
            return None
    return None


def error_reply(
    msg: Message, exc: BaseException, *, code: int | None = None, site: str | None = None
) -> Message:
    """An error reply naming the site, the exception's class and a short, path-free reason."""
    reason = f"{type(exc).__name__}: {public_reason(str(exc))}"
    if site:
        reason = f"site {site}: {reason}"
    if code is None:
        code = getattr(exc, "code", ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    return Message(Error(code=int(code), reason=reason), reply_to=msg)


def contain_errors(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: an exception becomes a short error reply; its traceback stays here."""
    try:
        reply = call_next(msg, ctxt)
    except Exception as exc:  # every failure: the server must get a reply, not a traceback
        _LOG.error("the %s request failed at this site", msg.metadata.message_type, exc_info=True)
        return error_reply(
            msg, exc, code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, site=site_label(msg, ctxt)
        )
    if reply.has_error():
        reason = public_reason(reply.error.reason or "")
        if reason != reply.error.reason:
            _LOG.warning("error reply shortened before it left the site: %s", reply.error.reason)
            return Message(Error(code=reply.error.code, reason=reason), reply_to=msg)
    return reply


def log_evaluation(
    site_path: Path, *, run_id: str, server_round: int, figures: Mapping[str, float | str]
) -> Path:
    """Append this site's own evaluation figures to ``<site>/.fedfuse/eval.jsonl``."""
    return _log_site_figures(
        eval_log(site_path), run_id=run_id, server_round=server_round, figures=figures
    )


def log_training(
    site_path: Path, *, run_id: str, server_round: int, figures: Mapping[str, float | str]
) -> Path:
    """Append this site's own training figures (loss, records, noise, steps) to
    ``<site>/.fedfuse/train.jsonl``: they stay at the site unless it opts in to share them."""
    return _log_site_figures(
        train_log(site_path), run_id=run_id, server_round=server_round, figures=figures
    )


def _log_site_figures(
    path: Path, *, run_id: str, server_round: int, figures: Mapping[str, float | str]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "time": round(time.time(), 3),
        "run-id": run_id,
        "round": server_round,
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in figures.items()},
    }
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


__all__ = [
    "contain_errors",
    "error_reply",
    "log_evaluation",
    "log_training",
    "public_reason",
]
