"""Where a command may write: one check shared by `densenet-fast bench/sweep` (--out, --plot)
and `densenet-fast train` (--output-dir, --checkpoint-dir), made before any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def path_problem(path: Union[str, os.PathLike], directory: bool) -> Optional[str]:
    """Why `path` cannot become a file (directory=False) or a directory (directory=True), or None.
    Missing parents are fine (the writers create them); the nearest existing one must be a
    directory."""
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        return "exists and is not a directory"
    if not directory and p.is_dir():
        return "is a directory, expected a file path"
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return None if parent.is_dir() else f"{parent} is not a directory"
