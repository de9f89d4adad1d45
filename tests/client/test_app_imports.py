"""The ClientApp loads without torch or Opacus, and a SecAgg+ key exchange runs without them.

In deployment Flower 1.42 starts one `flwr-clientapp` process per message, eight per site in a
SecAgg+ round; each loads fedfuse.client.app. Only the messages that train, evaluate or check
the budget need torch and Opacus (client/app.py). A top-level import of either, anywhere in
what the app imports, would make every message pay for them again: these tests run the real
app in a fresh interpreter and look at what it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "opacus", "scipy")

# The evaluation's setup and share-keys stages of a SecAgg+ round, through the real ClientApp
# (its mods and handlers) at a deployed site, in one fresh interpreter.
_KEY_EXCHANGE = textwrap.dedent(
    """
    import json, sys
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedfuse.client.app import app
    from fedfuse.common.secagg import RoundParams, crypto
    from fedfuse.common.secagg.protocol import RECORD_KEY, Key, Stage

    HEAVY = {heavy!r}
    loaded = {{"app": [m for m in HEAVY if m in sys.modules]}}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5, 1
    ctxt = Context(
        run_id=1, node_id=5, node_config={{"data-path": {site!r}}}, state=RecordDict(),
        run_config={{}},
    )

    def send(record):
        msg = Message(
            RecordDict({{RECORD_KEY: ConfigRecord(record)}}),
            dst_node_id=5,
            message_type=MessageType.EVALUATE,
        )
        reply = app(msg, ctxt)
        assert not reply.has_error(), reply.error.reason
        return reply.content.config_records[RECORD_KEY]

    params = RoundParams(3, 3, 2, 8.0, 2**22, 2**32, 1000.0).to_record()
    own = send({{Key.STAGE: Stage.SETUP, **params}})
    others = [crypto.generate_key_pair()[1] for _ in range(4)]
    shares = send(
        {{
            Key.STAGE: Stage.SHARE_KEYS,
            Key.NODE_IDS: [5, 6, 7],
            Key.PK1_LIST: [own[Key.PK1], *others[:2]],
            Key.PK2_LIST: [own[Key.PK2], *others[2:]],
        }}
    )
    loaded["key-exchange"] = [m for m in HEAVY if m in sys.modules]
    loaded["shares"] = len(shares[Key.DESTINATIONS])
    print(json.dumps(loaded))
    """
)


def _run(code: str) -> dict[str, object]:
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_client_app_and_a_key_exchange_load_neither_torch_nor_opacus(tmp_path: Path) -> None:
    site = tmp_path / "site-0"
    site.mkdir()
    loaded = _run(_KEY_EXCHANGE.format(heavy=HEAVY, site=str(site)))
    assert loaded["app"] == [], f"importing fedfuse.client.app loaded {loaded['app']}"
    assert loaded["key-exchange"] == [], f"the key exchange loaded {loaded['key-exchange']}"
    assert loaded["shares"] == 2  # a share for each of the two neighbours: the stage really ran


def test_the_scan_sees_a_heavy_import(tmp_path: Path) -> None:
    """The check above can fail: the same scan after importing the handlers finds torch."""
    loaded = _run(
        "import json, sys\nimport fedfuse.client.handlers\n"
        f"print(json.dumps({{'app': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert "torch" in loaded["app"] and "opacus" in loaded["app"]
