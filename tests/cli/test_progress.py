"""`fedfuse simulate`'s progress bar: an estimate of what is left, on a terminal only."""

from __future__ import annotations

import io

from rich.console import Console

from fedfuse.progress import FIRST_ROUND, RoundProgress, rounds_left_text


def test_estimate_before_and_after_the_first_round():
    assert rounds_left_text([], rounds_left=3, in_round=5.0) == FIRST_ROUND
    # Round 1 (60 s, start-up included) does not set the pace once round 2 is known.
    assert rounds_left_text([60.0, 10.0], rounds_left=2, in_round=4.0) == "about 16 s left"
    assert rounds_left_text([60.0], rounds_left=2, in_round=0.0) == "about 2 min left"
    assert rounds_left_text([60.0, 10.0, 10.0], rounds_left=0, in_round=0.0) == "done"


def test_bar_on_a_terminal_says_what_round_one_is_doing():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with RoundProgress(console, rounds=3, secagg=True) as bar:
        assert bar._progress is not None
        bar._progress.refresh()
        first = out.getvalue()
        bar.round_done()
        bar._progress.refresh()
    assert "round 1/3: starting the simulation engine, SecAgg+ key exchange, training" in first
    assert FIRST_ROUND in first and "0/3 rounds" in first
    later = out.getvalue()[len(first) :]
    assert "round 2/3: SecAgg+ key exchange, training" in later and "1/3 rounds" in later
    assert "left" in later


def test_no_bar_and_no_escape_codes_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out)  # a file: not a terminal
    with RoundProgress(console, rounds=2, secagg=False) as bar:
        bar.round_done()
        console.print("  round 1/2  ...")
        bar.round_done()
    assert out.getvalue() == "  round 1/2  ...\n"
