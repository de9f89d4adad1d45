"""Split one pooled folder of records into site folders: the partitioners of Flower's
``flwr-datasets`` (IID, Dirichlet label skew, pathological), reimplemented here because a
site's data needs no Hugging Face dataset and fedfuse does not depend on that library.

Deterministic under a seed. Each record goes to exactly one site; its files (images, audio,
report files) are hard-linked into the site folder, not copied, where the filesystem allows
(a site folder must hold its own files: the manifest rejects paths outside it).
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedfuse.common.data.manifest import find_manifest, load_manifest
from fedfuse.common.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological")
# The Dirichlet draw is repeated (as flwr-datasets does) until every site has this many
# records; a site with fewer could not hold a train, validation and test split.
MIN_SITE_RECORDS = 3
MAX_DRAWS = 100
_FILE_COLUMNS = ("image", "audio", "report")


def partition(
    labels: list[str],
    *,
    sites: int,
    partitioner: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_site: int = 1,
) -> list[np.ndarray]:
    """Record indices per site.

    ``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet`` (Hsu et al. 2019,
    arXiv:1909.06335): each class's records are divided among the sites in proportions drawn
    from Dirichlet(alpha, ..., alpha); smaller alpha, stronger label skew. ``pathological``
    (McMahan et al. 2017, arXiv:1602.05629): each site holds ``classes_per_site`` classes
    (site ``i`` the classes ``i, i+1, ...`` modulo their number) and each class is shared
    equally among the sites that hold it.

    Raises:
        ConfigError: a parameter out of range, or a split that leaves a site too few records.
    """
    n = len(labels)
    if partitioner not in PARTITIONERS:
        raise ConfigError(
            f"--partitioner must be one of {', '.join(PARTITIONERS)}; found {partitioner!r}"
        )
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1; found {sites}")
    if n < sites * MIN_SITE_RECORDS:
        raise ConfigError(
            f"{n} records cannot make {sites} sites of at least {MIN_SITE_RECORDS} records: "
            "lower --sites"
        )
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    by_class = {c: np.array([i for i, y in enumerate(labels) if y == c]) for c in classes}
    if partitioner == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), sites)]
    if partitioner == "dirichlet":
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ConfigError(f"--alpha must be a positive number; found {alpha}")
        for _ in range(MAX_DRAWS):
            parts: list[list[int]] = [[] for _ in range(sites)]
            for c in classes:
                idx = rng.permutation(by_class[c])
                share = rng.dirichlet(np.full(sites, alpha))
                cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
                for s, chunk in enumerate(np.split(idx, cuts)):
                    parts[s] += chunk.tolist()
            if min(len(p) for p in parts) >= MIN_SITE_RECORDS:
                return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
        raise ConfigError(
            f"--alpha {alpha} left a site with fewer than {MIN_SITE_RECORDS} records in "
            f"{MAX_DRAWS} draws: raise --alpha or lower --sites"
        )
    k = classes_per_site
    if not 1 <= k <= len(classes):
        raise ConfigError(
            f"--classes-per-site must be in 1..{len(classes)} (the classes present); found {k}"
        )
    holders: dict[str, list[int]] = {c: [] for c in classes}
    for s in range(sites):
        for j in range(k):
            holders[classes[(s + j) % len(classes)]].append(s)
    orphan = [c for c, h in holders.items() if not h]
    if orphan:
        raise ConfigError(
            f"{sites} sites x {k} classes each leave class(es) {', '.join(orphan)} with no "
            "site: raise --sites or --classes-per-site"
        )
    parts = [[] for _ in range(sites)]
    for c in classes:
        for s, chunk in zip(
            holders[c], np.array_split(rng.permutation(by_class[c]), len(holders[c])), strict=True
        ):
            parts[s] += chunk.tolist()
    small = [s for s, p in enumerate(parts) if len(p) < MIN_SITE_RECORDS]
    if small:
        raise ConfigError(
            f"site(s) {small} would get fewer than {MIN_SITE_RECORDS} records: lower --sites"
        )
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


@dataclass
class SplitResult:
    """What :func:`split_folder` made."""

    sites: list[Path]
    label_counts: list[dict[str, int]]
    linked: int = 0
    copied: int = 0  # files copied where a hard link was impossible (another filesystem)
    notes: list[str] = field(default_factory=list)


def _place(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` at ``dst`` (True), or copy it where linking fails (False)."""
    if dst.exists():  # a file two of this site's records share: placed once
        return True
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def split_folder(
    pooled: str | Path,
    out: str | Path,
    *,
    sites: int,
    partitioner: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_site: int = 1,
) -> SplitResult:
    """Write ``sites`` site folders ``out/site-<i>`` from the pooled folder's records.

    The pooled folder is validated first (one line per problem, naming file and row). Each
    site's manifest keeps the pooled manifest's columns and cells (a ``split`` column too),
    in the pooled order.

    Raises:
        DataValidationError: the pooled folder is not a valid site folder.
        ConfigError: bad parameters, or ``out`` already holds files.
    """
    pooled = Path(pooled).resolve()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out '{out}' is not empty: give a new folder")
    load_manifest(pooled, check_files=False)  # every problem at once, before writing
    path = find_manifest(pooled)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    labels = [r["label"].strip() for r in rows]
    parts = partition(
        labels,
        sites=sites,
        partitioner=partitioner,
        seed=seed,
        alpha=alpha,
        classes_per_site=classes_per_site,
    )
    result = SplitResult([], [])
    for s, idx in enumerate(parts):
        site = out / f"site-{s}"
        site.mkdir(parents=True)
        counts: dict[str, int] = {}
        with open(site / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            for i in idx:
                row = rows[int(i)]
                # Cells are the pooled manifest's own (`fedfuse data check` warns about
                # formula-like ones there); only files are placed.
                w.writerow(row)
                counts[labels[int(i)]] = counts.get(labels[int(i)], 0) + 1
                for col in _FILE_COLUMNS:
                    cell = (row.get(col) or "").strip()
                    # A report cell is a file only when it names a .txt (as the manifest reads it).
                    if not cell or (col == "report" and not cell.lower().endswith(".txt")):
                        continue
                    src = pooled / cell
                    if src.is_file() and src.resolve().is_relative_to(pooled):
                        if _place(src, site / cell):
                            result.linked += 1
                        else:
                            result.copied += 1
        result.sites.append(site)
        result.label_counts.append(counts)
    if result.copied:
        result.notes.append(
            f"{result.copied} file(s) copied: hard links are impossible across filesystems"
        )
    return result
