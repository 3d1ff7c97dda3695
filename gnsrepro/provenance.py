"""Which code made a result: the git commit of the package's checkout and whether its tracked files differed.

Imports nothing heavy, so the training side (meta.json) and the analysis side (REPORT.md) both use it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
# the commit a copied working tree was made from, where the copy's own git metadata does not match its files (a
# machine the tree is copied to, as benchmarks/gpu_session.sh's COMMIT= sets it): code_version reports it, with
# whether the files differ from it unknown
COMMIT_ENV = "GNSREPRO_COMMIT"


def git(*args: str, cwd: str | Path = PACKAGE_DIR) -> str | None:
    """`git <args>` run in cwd (the package's directory): its output, or None outside a checkout or without git."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# Tracked paths that are not code: the prose and published reports under docs/ (a report being re-published
# changes docs/reproduce/<plan>/ before the next report is written; that does not change what the code computes).
NOT_CODE = ("docs",)


def code_version(cwd: str | Path = PACKAGE_DIR) -> tuple[str | None, bool | None]:
    """(commit, dirty): the checkout's HEAD and whether tracked files outside NOT_CODE differ from it (None: not
    known) of the checkout holding cwd. A commit names the code only when dirty is False. With GNSREPRO_COMMIT set
    (COMMIT_ENV): (that commit, None)."""
    if os.environ.get(COMMIT_ENV, "").strip():
        return os.environ[COMMIT_ENV].strip(), None
    commit = git("rev-parse", "HEAD", cwd=cwd) or None
    pathspec = [":(top)", *(f":(top,exclude){path}" for path in NOT_CODE)]  # from the checkout's root
    status = git("status", "--porcelain", "--untracked-files=no", "--", *pathspec, cwd=cwd) if commit else None
    return commit, None if status is None else bool(status)
