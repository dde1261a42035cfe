"""Which code produced a result: the one commit reader every benchmark and the evaluation use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "FLASHPREFILL_COMMIT"


def git_commit() -> str:
    """The checkout's short commit, with ``+dirty`` for uncommitted changes to tracked files.

    ``FLASHPREFILL_COMMIT`` wins when set: a machine that is handed a copy of the working tree (the
    GPU machines) may hold no ``.git``, or a stale one. ``"unknown"`` when neither tells."""
    env = os.environ.get(COMMIT_ENV)
    if env:
        return env
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "") if commit else "unknown"
