"""Where a site keeps its own state: the ``.fedfuse/`` folder inside its data folder.

The one definition of that folder's layout; every module that reads or writes it asks here::

    <data>/.fedfuse/
        ledger.sqlite   the privacy ledger (common/privacy/ledger.py; client/budget.py)
        ledger-head     the ledger's authenticated head (common/privacy/anchor.py)
        dp-secret       the site's secret, 32 random bytes (common/privacy/site_secret.py)
        site.toml       the site's own budget (client/budget.py)
        eval.jsonl      the site's own evaluation figures (client/wire.py)
        train.jsonl     the site's own training figures (client/wire.py)

Nothing in it leaves the site. A site folder copied without it is a site that never trained
(and one that has trained refuses to train without its ledger: common/privacy/anchor.py).
"""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".fedfuse"
LEDGER_NAME = "ledger.sqlite"
HEAD_NAME = "ledger-head"
SECRET_NAME = "dp-secret"
SITE_FILE = "site.toml"
EVAL_LOG = "eval.jsonl"
TRAIN_LOG = "train.jsonl"


def state_dir(data_path: str | Path) -> Path:
    """``<data>/.fedfuse``."""
    return Path(data_path) / STATE_DIR


def ledger_file(data_path: str | Path) -> Path:
    """The site's ledger, unless its node config puts it elsewhere (``ledger-path``)."""
    return state_dir(data_path) / LEDGER_NAME


def secret_file(data_path: str | Path) -> Path:
    return state_dir(data_path) / SECRET_NAME


def site_file(data_path: str | Path) -> Path:
    return state_dir(data_path) / SITE_FILE


def eval_log(data_path: str | Path) -> Path:
    return state_dir(data_path) / EVAL_LOG


def train_log(data_path: str | Path) -> Path:
    return state_dir(data_path) / TRAIN_LOG
