"""The README's client-level DP example: test loss and AUROC per round, and each site's update
norm before clipping (docs/BENCHMARKS.md#client-level-dp).

    python -m bench.client_level_dp                    # the README example (~2 min, 2 cores)
    python -m bench.client_level_dp --scenario smoke --rounds 3 --dp-level record+client \\
        --set client-clip-norm=0.5 --set client-noise-multiplier=0.1      # the old example

The arguments are `fedfuse simulate`'s; the run goes through the real command line with its
ServerApp and ClientApp over the in-process Grid (as tests/cli/test_readme.py runs it).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

README_EXAMPLE = [
    "--scenario", "smoke", "--sites", "20", "--records", "60", "--rounds", "3",
    "--dp-level", "client", "--set", "modalities=report", "--set", "text-buckets=64",
    "--set", "client-clip-norm=1", "--set", "client-noise-multiplier=1",
]  # fmt: skip


def main(argv: list[str]) -> None:
    import flwr.simulation
    from flwr.app import Context, RecordDict
    from typer.testing import CliRunner

    import fedfuse.client.app as client_app
    from fedfuse.cli import app
    from fedfuse.common.privacy import client_level_dp
    from fedfuse.simulations.inprocess import InProcessGrid

    def in_process(*, server_app, client_app, num_supernodes, **_: object) -> None:
        grid = InProcessGrid(client_app, num_supernodes)
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(grid, ctx)

    norms: list[float] = []
    clip = client_level_dp.clip_update_

    def recording_clip(local, reference, *, clip_norm):  # type: ignore[no-untyped-def]
        norms.append(client_level_dp.update_norm(local, reference))
        return clip(local, reference, clip_norm=clip_norm)

    flwr.simulation.run_simulation = in_process  # type: ignore[assignment]
    client_app.clip_update_ = recording_clip  # type: ignore[assignment]
    out = Path(tempfile.mkdtemp(prefix="bench-client-dp-"))
    args = ["simulate", *(argv or README_EXAMPLE), "--out", str(out), "--run-name", "run"]
    res = CliRunner().invoke(app, args)
    if res.exit_code:
        raise SystemExit(res.output[-3000:])
    print("fedfuse " + " ".join(args))
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(
            f"round {r['round']}: test loss {r['eval-loss']:.4f}  test AUROC "
            f"{r['eval-auroc']:.4f}  accuracy {r['eval-accuracy']:.3f}  [{r['seconds']:.1f}s]"
        )
    client = json.loads((out / "run" / "privacy.json").read_text()).get("client_level")
    if client:
        print(f"client-level epsilon {client['epsilon']:.2f} at delta {client['delta']:g}")
    if norms:
        print(f"update norms before clipping: {min(norms):.2f} to {max(norms):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
