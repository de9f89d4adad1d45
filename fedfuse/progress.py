"""A progress bar per round for ``fedfuse simulate``: elapsed time and an estimate of what is
left, on a terminal only (a log or CI output gets the plain per-round lines)."""

from __future__ import annotations

import statistics
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

# The first round also starts the simulation engine (Ray) and, under SecAgg+, exchanges keys:
# 30-90 s on two cores before any later round's pace is known (docs/BENCHMARKS.md).
FIRST_ROUND = "about 30-90 s for the first round"


def rounds_left_text(round_seconds: list[float], *, rounds_left: int, in_round: float) -> str:
    """The estimate shown beside the bar. ``round_seconds``: the finished rounds' durations;
    ``in_round``: seconds spent so far in the round running now."""
    if rounds_left <= 0:
        return "done"
    if not round_seconds:
        return FIRST_ROUND
    # Round 1 carries the start-up: later rounds are paced by the rounds after it.
    pace = statistics.fmean(round_seconds[1:] or round_seconds)
    left = max(pace - in_round, 0.0) + pace * (rounds_left - 1)
    if left >= 90:
        return f"about {left / 60:.0f} min left"
    return f"about {left:.0f} s left"


class _LeftColumn(ProgressColumn):
    def __init__(self, owner: RoundProgress) -> None:
        super().__init__()
        self.owner = owner

    def render(self, task: Task) -> Text:
        return Text(self.owner.left_text(), style="progress.remaining")


class RoundProgress:
    """``with RoundProgress(console, rounds=R, secagg=True) as p: ... p.round_done()``.

    On a terminal it draws a bar under the per-round lines (which ``console.print`` keeps
    above it); elsewhere it draws nothing.
    """

    def __init__(self, console: Console, *, rounds: int, secagg: bool) -> None:
        self.console = console
        self.rounds = rounds
        self.secagg = secagg
        self.done: list[float] = []
        self._t = time.monotonic()
        self._progress: Progress | None = None
        self._task = 0

    def _what(self) -> str:
        n = len(self.done) + 1
        exchange = "SecAgg+ key exchange, " if self.secagg else ""
        if n == 1:
            return f"round 1/{self.rounds}: starting the simulation engine, {exchange}training"
        return f"round {min(n, self.rounds)}/{self.rounds}: {exchange}training, evaluation"

    def left_text(self) -> str:
        return rounds_left_text(
            self.done,
            rounds_left=self.rounds - len(self.done),
            in_round=time.monotonic() - self._t,
        )

    def __enter__(self) -> RoundProgress:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} rounds"),
                TimeElapsedColumn(),
                _LeftColumn(self),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._what(), total=self.rounds)
        self._t = time.monotonic()
        return self

    def round_done(self) -> None:
        now = time.monotonic()
        self.done.append(now - self._t)
        self._t = now
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=self._what())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
