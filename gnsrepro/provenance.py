"""Which code made a result: the git commit of the package's checkout and whether its tracked files differed.

Imports nothing heavy, so the training side (meta.json) and the analysis side (REPORT.md) both use it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(*args: str) -> str | None:
    """`git <args>` run in the package's directory: its output, or None outside a checkout or without git."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> tuple[str | None, bool | None]:
    """(commit, dirty): the checkout's HEAD and whether tracked files differ from it (None: not known). A commit
    names the code only when dirty is False."""
    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, None if status is None else bool(status)
