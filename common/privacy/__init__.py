"""Privacy maths (pure functions), privacy events, and the stateful objects built on them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfuse.common.privacy.accounting import (
        DpSgdEvent,
        epsilon_from_events,
        plan_noise_multiplier,
    )

__all__ = ["DpSgdEvent", "epsilon_from_events", "plan_noise_multiplier"]


def __getattr__(name: str) -> Any:
    """The accounting names, imported on first use: importing a light submodule (the refusal's
    fields, which common/config.py reaches through SecAgg+) must not load Opacus, torch and scipy
    (3.4 s in every `fedfuse` command-line process)."""
    if name in __all__:
        # lazy: Opacus, torch and scipy, for the names only
        from fedfuse.common.privacy import accounting

        return getattr(accounting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
