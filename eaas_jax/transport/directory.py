"""Directory entries: how the endpoints of one host find an inbox that cannot
be opened by name.

A ``cuda_ipc`` inbox is GPU memory behind an IPC handle, an ``ibgda`` inbox
is memory behind a NIC: a peer needs a handle or an address, not a file. So
each open endpoint of such a backend publishes a small JSON file in
``/dev/shm`` (its *entry*: format, endpoint, owner pid and start time, a
random nonce that changes with every incarnation, the geometry, and the
backend's own fields). Entries are created exclusively, mode 0600, never
through a symbolic link, replaced atomically, and read only when they are
regular files of this uid with mode 0600
(:mod:`~eaas_jax.transport.private_files`). An entry left behind by a dead
process of this user (pid and start time: a reused pid does not keep it) is
replaced; one of another uid is never used nor removed.

An endpoint *claims* its entry's name first (an empty placeholder), opens
its inbox, then *publishes* the entry; readers see the placeholder as "no
entry yet".

Peers on other hosts cannot read this host's files: there the entries live
in the registry instead (``control_plane.registry.RegistryEntries``). Both
are an :class:`EntryStore`, what a backend that follows its peers' entries
takes.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from typing import Protocol

from eaas_jax.transport import wire
from eaas_jax.transport.private_files import (
    UntrustedFileError,
    create_private_file,
    owner_alive,
    process_start_time,
    read_private_file,
    write_private_file,
)

__all__ = ["EntryStore", "FileEntries", "claim", "new_entry", "peer_entry", "publish", "read_entry"]

#: An entry is about 1 KB: a far larger file is none.
MAX_ENTRY_BYTES = 64 * 1024


def new_entry(format: str, endpoint: int, geometry: wire.Geometry, **fields) -> dict:
    """The entry of this process's endpoint `endpoint`, with a fresh nonce;
    `fields`: the backend's own (JSON values)."""
    return {
        "format": format, "endpoint": endpoint, "pid": os.getpid(),
        "start_time": process_start_time(os.getpid()), "nonce": secrets.token_hex(8),
        "geometry": {**vars(geometry)}, **fields,
    }


def read_entry(path: str) -> dict | None:
    """The entry at `path`; None while there is none, or only the empty
    placeholder of an endpoint being opened (entries appear atomically).

    Raises:
      UntrustedFileError: the file there is not a private file of this user.
    """
    try:
        data = read_private_file(path, MAX_ENTRY_BYTES)
    except FileNotFoundError:
        return None
    try:
        entry = json.loads(data)
    except ValueError:  # the placeholder
        return None
    return entry if isinstance(entry, dict) else None


def publish(path: str, entry: dict) -> None:
    """Replaces the file at `path` (claimed before) by `entry`, atomically."""
    write_private_file(path, json.dumps(entry).encode())


def claim(path: str, what: str, in_use: type[Exception]) -> None:
    """Reserves the entry at `path` for `what` (an endpoint, named in
    errors): an empty placeholder, created exclusively, mode 0600.

    Raises:
      in_use: `path` exists and is not an entry of a dead process of this
        user (see :func:`_remove_abandoned`).
    """
    for _ in range(2):
        try:
            create_private_file(path)
            return
        except FileExistsError:
            _remove_abandoned(path, what, in_use)
    raise in_use(f"{what}: {path} was created again while it was being claimed")


def _remove_abandoned(path: str, what: str, in_use: type[Exception]) -> None:
    """Removes the entry at `path` if its owner, a process of this user, died
    without closing (no process runs under its pid with its start time).

    Raises:
      in_use: its owner lives, or it is no entry to judge (a placeholder,
        another uid's file, a link...): left in place.
    """
    try:
        entry = read_entry(path)
    except UntrustedFileError as e:
        raise in_use(
            f"{what} cannot be opened: {e}. It is left in place: its owner (or an administrator) must remove it"
        ) from None
    if entry is None:
        if not os.path.lexists(path):
            return  # removed meanwhile: claim it again
        entry = {}  # a placeholder: its endpoint is being opened (or its owner died opening it)
    owner, started = entry.get("pid"), entry.get("start_time")
    if (isinstance(owner, int) and owner > 0 and (started is None or isinstance(started, int))
            and not owner_alive(owner, started)):
        os.unlink(path)
        return
    raise in_use(
        f"{what} is already open" + (f" by pid {owner}" if owner else "") + f": {path} exists (remove it if "
        "no process uses it)"
    )


def peer_entry(path: str, peer: int, refused: type[Exception]) -> dict | None:
    """Endpoint `peer`'s published entry at `path`; None while it has none
    (or only its placeholder).

    Raises:
      refused: the file under its name is not a private file of this user
        (another uid's, a link, another mode...).
    """
    try:
        entry = read_entry(path)
    except UntrustedFileError as e:
        raise refused(f"refusing endpoint {peer}: {e}") from None
    return entry if entry is not None and entry.get("nonce") else None


class EntryStore(Protocol):
    """Where one endpoint publishes its entry and reads its peers'."""

    def claim(self) -> None:
        """Reserves this endpoint's entry (raises if another live endpoint holds it)."""

    def publish(self, entry: dict) -> None:
        """Makes `entry` this endpoint's, replacing the one before."""

    def read(self, peer: int) -> dict | None:
        """Endpoint `peer`'s entry, or None while it has none (raises the
        store's refusal when what is there cannot be trusted)."""

    def remove(self) -> None:
        """Withdraws this endpoint's entry (idempotent)."""


class FileEntries:
    """Entries as private files in /dev/shm: the endpoints of one host.

    Args:
      path_of: endpoint index -> its entry's path.
      endpoint: this endpoint's index.
      in_use, refused: the backend's errors for a taken name and an
        untrusted peer file.
    """

    def __init__(self, path_of: Callable[[int], str], endpoint: int, *, in_use: type[Exception],
                 refused: type[Exception], what: str):
        self._path_of, self._endpoint, self._what = path_of, endpoint, what
        self._in_use, self._refused = in_use, refused
        self._seen: dict[int, tuple] = {}  # peer -> (inode, mtime, size) of its file when last read
        self._cache: dict[int, dict] = {}

    @property
    def path(self) -> str:
        return self._path_of(self._endpoint)

    def claim(self) -> None:
        claim(self.path, self._what, self._in_use)

    def publish(self, entry: dict) -> None:
        publish(self.path, entry)

    def read(self, peer: int) -> dict | None:
        """Re-read only when the file changed (the caller may ask often)."""
        path = self._path_of(peer)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            self._seen.pop(peer, None)
            self._cache.pop(peer, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._seen.get(peer) != stamp:
            entry = peer_entry(path, peer, self._refused)
            self._seen[peer] = stamp
            if entry is None:
                self._cache.pop(peer, None)
            else:
                self._cache[peer] = entry
        return self._cache.get(peer)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
