"""Who controls the directory that holds peerd's socket, checked by the daemon and its clients.

Whoever can write the socket's directory can rename the socket away and bind their own in its
place: the daemon's callers would then hand their tasks to a stranger, and read a stranger's
answers (issue 11: ``/tmp/peerd-999`` created first by user ``nobody``, mode 0777). So:

* the daemon creates the directory itself when it is missing (mode 0700; 0750 and chgrp'ed
  when ``node.socket_group`` is set, so the group can reach the socket), and refuses one that
  is a symlink, is not its own, or is writable by its group or by others
  (:func:`ensure_daemon_dir`);
* a client refuses to connect through a directory that is a symlink or writable by group or
  others, or that is owned by another user (not root) *and* sits in a directory others can
  write, such as /tmp, where anyone could have created it (:func:`check_client_dir`). The
  system service's ``/run/peerd`` belongs to the ``peerd`` user but was made by systemd in
  root's ``/run``, so it passes; ``/tmp/peerd-<uid>`` made by someone else does not.

A parent writable by others passes only with the sticky bit (``/tmp``): without it anyone
could rename our directory and put theirs in its place. Plain ``os``/``stat`` only: peerctl
imports this and must start fast (docs/rpc.md, *Connecting*).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

__all__ = ["UnsafeSocketDir", "check_client_dir", "ensure_daemon_dir"]

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafeSocketDir(Exception):
    """The socket's directory could be controlled by someone else; the message names it and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _lstat_dir(path: Path) -> os.stat_result:
    st = os.lstat(path)  # FileNotFoundError is the caller's to handle
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSocketDir(path, "is a symlink; the socket's directory must be a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDir(path, "is not a directory")
    if st.st_mode & _OTHERS_WRITE:
        raise UnsafeSocketDir(
            path,
            f"is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o}), so another "
            "user could replace the socket; make it writable by its owner only (chmod go-w) or remove "
            "it and let peerd create it",
        )
    return st


def _check_parent(path: Path) -> os.stat_result:
    parent = path.parent
    st = os.stat(parent)
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        raise UnsafeSocketDir(
            path,
            f"its parent {parent} is writable by others without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone could replace the directory",
        )
    return st


def ensure_daemon_dir(path: Path, *, gid: int | None = None, uid: int | None = None) -> None:
    """Make ``path`` the daemon's private socket directory, or raise :class:`UnsafeSocketDir`.

    Created when missing: ``mkdir`` never follows or reuses what is there, and the ``lstat``
    checks that follow decide, so a directory someone else slipped in first (the mkdir then
    fails with EEXIST) is refused rather than used.
    """
    uid = os.geteuid() if uid is None else uid
    path = Path(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o750 if gid is not None else 0o700)
        except FileExistsError:
            pass  # someone was faster: the checks below judge what is there
        else:
            if gid is not None:
                try:
                    os.chown(path, -1, gid, follow_symlinks=False)
                except PermissionError:
                    raise UnsafeSocketDir(
                        path, f"cannot chgrp it to gid {gid}: the daemon's user must be in node.socket_group"
                    ) from None
    _check_parent(path)
    st = _lstat_dir(path)
    if st.st_uid != uid:
        raise UnsafeSocketDir(
            path,
            f"is owned by {_user(st.st_uid)}, not by the daemon's user ({_user(uid)}), so that user "
            "could replace the socket; remove it, or set node.runtime_dir to a directory of your own",
        )


def check_client_dir(path: Path, *, uid: int | None = None) -> None:
    """Raise :class:`UnsafeSocketDir` unless only a trusted user can control ``path``.

    Trusted: the caller, root, or a user who was given the directory inside one that only its
    owner can write. A missing directory passes (connecting then fails as "not running").
    """
    uid = os.geteuid() if uid is None else uid
    path = Path(path)
    try:
        parent = _check_parent(path)
        st = _lstat_dir(path)
    except FileNotFoundError:
        return
    if st.st_uid in (uid, 0):
        return
    if parent.st_mode & _OTHERS_WRITE:
        raise UnsafeSocketDir(
            path,
            f"is owned by {_user(st.st_uid)} and sits in {path.parent}, where any user can create "
            "files, so it may not be the daemon's; refusing to connect (remove it if it is not "
            "yours, or point --socket / $PEERD_SOCKET at the daemon's socket)",
        )
