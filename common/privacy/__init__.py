"""Privacy maths (pure functions), privacy events, and the stateful objects built on them."""

from fedfuse.common.privacy.accounting import (
    DpSgdEvent,
    epsilon_from_events,
    plan_noise_multiplier,
)

__all__ = ["DpSgdEvent", "epsilon_from_events", "plan_noise_multiplier"]
