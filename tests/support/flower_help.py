"""The flags that Flower's executables list in `--help` (compose and launcher checks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fedfuse.common.deploy.flower import flower_env


def help_flags(executable: str) -> set[str]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / executable), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=flower_env(),
    ).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))
