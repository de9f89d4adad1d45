"""Exception types that fedfuse users are expected to handle."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self


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
    validator tells the user everything to fix. The message (:meth:`lines`) shows a problem
    that recurs in many rows of one file once, with its count and first rows. ``labels`` holds
    the labels the manifests use where some are not the run's ``classes``; the message then
    says how to name them.
    """

    def __init__(
        self,
        problems: list[str],
        *,
        source: str = "",
        labels: Iterable[str] = (),
        classes: Iterable[str] = (),
    ) -> None:
        self.problems = list(problems)
        self.source = source
        self.labels = frozenset(labels)
        self.classes = tuple(classes)
        body = "\n".join([*(f"  - {line}" for line in self.lines()), *self.advice()])
        super().__init__(f"{self.head()}; fix them and run again:\n{body}")

    @classmethod
    def of_sites(cls, errors: Mapping[Path, DataValidationError], *, source: str) -> Self:
        """One error for several site folders' errors: each problem prefixed with its site's
        folder name (unless it already names a path), the labels merged."""
        problems = [
            p if p.startswith(str(site)) else f"{site.name}/{p}"
            for site, exc in errors.items()
            for p in exc.problems
        ]
        labels = frozenset().union(*(exc.labels for exc in errors.values()))
        classes = next((exc.classes for exc in errors.values() if exc.classes), ())
        return cls(problems, source=source, labels=labels, classes=classes)

    def head(self) -> str:
        n = len(self.problems)
        return f"{n:,} problem(s) in {self.source}" if self.source else "invalid site data"

    def lines(self) -> list[str]:
        """The problems to print: one line for each, except that a problem found in more than
        :data:`GROUP_AFTER` rows of one file is one line (its count and first rows)."""
        groups: dict[tuple[str, str], list[str]] = {}
        order: list[tuple[str, str] | str] = []
        for problem in self.problems:
            m = _ROW_PROBLEM.match(problem)
            if m is None:
                order.append(problem)
                continue
            key = (m["file"], m["what"])
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(m["row"])
        out = []
        for item in order:
            if isinstance(item, str):
                out.append(item)
                continue
            (file, what), rows = item, groups[item]
            if len(rows) <= GROUP_AFTER:
                out += [f"{file}:{row}: {what}" for row in rows]
            else:
                first = ", ".join(rows[:GROUP_AFTER])
                out.append(f"{file}: {len(rows):,} rows ({first}, ...): {what}")
        return out

    def advice(self) -> list[str]:
        """Lines (``hint: ...``) on what to do beyond fixing each row: how to name the run's
        classes, where the manifests' labels are unknown to it."""
        out = []
        if self.labels:
            found = ",".join(sorted(self.labels))
            out.append(
                f"hint: the labels in those manifests are {', '.join(sorted(self.labels))} and "
                f"the run's classes {', '.join(self.classes)}. Correct the rows, or, if the "
                "labels are right, name them as the run's classes (the positive one last where "
                f"there are two): --set classes={found} (fedfuse simulate and plan), --classes "
                f"{found} (fedfuse data check)"
            )
        return out


# A problem in one row of a file: "site-0/manifest.csv:12: label: unknown label 'yes' ...".
_ROW_PROBLEM = re.compile(r"^(?P<file>[^:\n]+):(?P<row>\d+): (?P<what>.+)$", re.DOTALL)
GROUP_AFTER = 5  # rows of one file shown one by one before a recurring problem is grouped


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
