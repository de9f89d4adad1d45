"""``flwr.simulation.run_simulation`` without Ray, for tests whose claim is not about Ray.

Flower's simulation engine starts Ray for every federation (10-18 s here); these tests run the
same ServerApp and ClientApp over :class:`fedfuse.simulations.inprocess.InProcessGrid` instead.
Flower's engine itself stays covered by the federations that call
:func:`fedfuse.simulations.runner.simulate` with its default engine: test_e2e_simulation.py,
test_e2e_pathvqa.py and the empirical audit's DP run (tests/simulations/); other tests pass
``engine="inprocess"`` where their claim is not the engine's.
"""

from __future__ import annotations

import flwr.simulation
import pytest

from fedfuse.simulations import runner
from fedfuse.simulations.inprocess import run_in_process

# One entry (the number of sites) per federation run in process: a test can check that its
# federations did not leave for Ray, e.g. after a refactoring that imports the name elsewhere.
RUNS: list[int] = []


def run_simulation_in_process(*, server_app, client_app, num_supernodes, **_: object) -> None:  # noqa: ANN001
    """The signature of ``flwr.simulation.run_simulation``: the apps over an in-process Grid
    (``fedfuse simulate --engine inprocess``), counted in :data:`RUNS`."""
    RUNS.append(num_supernodes)
    run_in_process(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes)


def patch_simulation(mp: pytest.MonkeyPatch) -> None:
    """Every federation started through :func:`fedfuse.simulations.runner.simulate` (the CLI,
    experiments, the empirical audit) runs in process while ``mp`` is active, and is counted in
    :data:`RUNS` (``--engine inprocess`` too). runner imports both engines' functions at its
    top, so its own names are the ones to replace."""
    mp.setattr(flwr.simulation, "run_simulation", run_simulation_in_process)
    mp.setattr(runner, "run_simulation", run_simulation_in_process)
    mp.setattr(runner, "run_in_process", run_simulation_in_process)
