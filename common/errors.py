"""Exception types that fedfuse users are expected to handle."""

from __future__ import annotations


class FedfuseError(Exception):
    """Base class of every error fedfuse raises on purpose."""


class ConfigError(FedfuseError, ValueError):
    """A run-config or command-line value is missing, unknown or out of range."""


class DataReadError(FedfuseError, ValueError):
    """A data file exists but cannot be decoded; the message says why."""


class ImageReadError(DataReadError):
    """An image file exists but cannot be decoded (corrupt, truncated, unsupported, too big)."""


class AudioReadError(DataReadError):
    """A WAV file exists but cannot be decoded (not a WAV, truncated, no samples)."""


class SiteSecretError(FedfuseError, RuntimeError):
    """The site's secret file is unreadable or malformed."""


class DataValidationError(FedfuseError):
    """A site folder failed validation.

    ``problems`` lists every problem found (file, row, field, reason), so one run of the
    validator tells the user everything to fix.
    """

    def __init__(self, problems: list[str], *, source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in {source}" if source else "invalid site data"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}; fix them and run again:\n{body}")


class PrivacyBudgetExhaustedError(FedfuseError):
    """A site refused a round because it would exceed its privacy budget."""

    def __init__(self, *, spent: float, would_reach: float, budget: float) -> None:
        self.spent = spent
        self.would_reach = would_reach
        self.budget = budget
        super().__init__(
            f"privacy budget exhausted: spent {spent:.4g} of {budget:.4g} "
            f"(this round would reach {would_reach:.4g})"
        )
