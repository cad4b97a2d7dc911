"""Writing user-visible outputs without ever leaving them half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dsc.errors import DscError


def atomic_dir(dest: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Fill a fresh temporary sibling of ``dest`` with ``write(tmp)``, then rename it into place.

    An existing non-empty ``dest`` is refused unless ``overwrite``; then it is replaced only after
    the new content is complete. On any failure ``dest`` is untouched and the temporary is removed.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DscError(f"{dest} exists and is not a directory; choose another output path")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise DscError(f"{dest} exists and is not empty; choose another output path or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        _normal_permissions(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _normal_permissions(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only modes; give the result the user's usual ones."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
