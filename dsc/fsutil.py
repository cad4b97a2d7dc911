"""Writing user-visible outputs without ever leaving them half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dsc.errors import DscError


def check_replaceable(dest: str | Path, overwrite: bool, marker: str) -> None:
    """Refuse an output directory that is a file, or non-empty without ``overwrite``, or non-empty and
    not an earlier output of ours (no ``marker`` file in it): ``--force`` never deletes the user's files."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DscError(f"{dest} exists and is not a directory; choose another output path")
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise DscError(f"{dest} exists and is not empty; choose another output path or pass --force")
        if not (dest / marker).is_file():
            raise DscError(
                f"{dest} holds files dsc did not write (no {marker}); --force replaces only an earlier dsc output. "
                "Choose another output path, or move those files away yourself"
            )


def check_writable(path: str | Path, what: str, directory: bool) -> None:
    """Before any work: ``path`` can be created (or replaced) as a directory (``directory``) or a file.
    The nearest existing ancestor must be a directory dsc can create entries in (probed, not guessed
    from permission bits, so read-only mounts and root are judged right)."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        kind = "is not a directory" if directory else "is a directory, not a file"
        raise DscError(f"{what} {p} exists and {kind}; choose another path")
    anc = p.parent.absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise DscError(f"{what} {p} cannot be created: {anc} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dsc-probe-", dir=anc))
    except OSError as e:
        raise DscError(
            f"{what} {p} cannot be created: {anc} is not writable ({e.strerror}); choose another path"
        ) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: written beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stale_siblings(dest: Path) -> None:
    """Temporaries of an earlier run that was killed before it could clean up (its pid is gone)."""
    for p in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = p.name.removeprefix(f".{dest.name}.tmp-").split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_dir(
    dest: str | Path, write: Callable[[Path], None], overwrite: bool = False, marker: str = "manifest.json"
) -> None:
    """Fill a fresh temporary sibling of ``dest`` with ``write(tmp)``, then rename it into place.

    An existing non-empty ``dest`` is refused unless ``overwrite`` and it holds ``marker`` (an earlier
    output of ours); then it is replaced only after the new content is complete. On any failure or
    interrupt ``dest`` is untouched and the temporary is removed; a temporary left by a killed run is
    removed by the next one.
    """
    dest = Path(dest)
    check_replaceable(dest, overwrite, marker)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _stale_siblings(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
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
