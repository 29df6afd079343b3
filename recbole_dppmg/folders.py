"""Publishing a folder that was written beside its destination: readers see the old complete
folder or the new complete one, never a half-written one."""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing (then deleting) a previous ``target``;
    if the second rename fails, the previous folder is put back."""
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{time.time_ns()}")
    target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
