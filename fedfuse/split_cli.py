"""``fedfuse data split``: one pooled folder of records into site folders
(fedfuse.common.data.split does the work)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedfuse.common.data.split import split_folder


def data_split(
    pooled: Path = typer.Argument(..., help="A folder of records in the site format."),
    sites: int = typer.Option(..., "--sites", min=1, help="How many site folders to make."),
    partitioner: str = typer.Option(
        "iid", "--partitioner", help="iid, dirichlet (label skew by --alpha) or pathological."
    ),
    alpha: float = typer.Option(
        0.5, "--alpha", help="Dirichlet concentration: smaller, more label skew."
    ),
    classes_per_site: int = typer.Option(
        1, "--classes-per-site", help="pathological: classes each site holds."
    ),
    seed: int = typer.Option(0, "--seed", help="Same seed, same split."),
    out: Path | None = typer.Option(
        None, "--out", help="Where the site folders go (default: POOLED-sites beside it)."
    ),
) -> None:
    """Split a pooled folder into site-0 .. site-N-1 (files hard-linked, not copied)."""

    dest = out if out is not None else pooled.with_name(pooled.name + "-sites")
    res = split_folder(
        pooled,
        dest,
        sites=sites,
        partitioner=partitioner,
        seed=seed,
        alpha=alpha,
        classes_per_site=classes_per_site,
    )
    console = Console()
    for site, counts in zip(res.sites, res.label_counts, strict=True):
        labels = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        console.print(f"{site}: {sum(counts.values())} records ({labels})", highlight=False)
    console.print(f"{res.linked} files hard-linked, {res.copied} copied", highlight=False)
    for note in res.notes:
        console.print(note, highlight=False)


def register(data_app: typer.Typer) -> None:
    """Add ``fedfuse data split`` to the ``fedfuse data`` group."""
    data_app.command("split")(data_split)
