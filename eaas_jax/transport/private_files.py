"""Small files only this user may touch, kept in directories every local user
can write to (the cuda_ipc directory entries in ``/dev/shm``).

In such a directory another local user can create a name first: a symbolic
link where we are about to write (we would write through it, into a file of
ours it points to), a file of their own where we expect ours (we would trust
what it says), or a FIFO (opening it would block). Hence:

* :func:`create_private_file` and :func:`write_private_file` create files
  with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through an existing name, link
  or not) and mode 0600 whatever the umask, from the moment they exist.
  :func:`write_private_file` writes under an unpredictable temporary name
  next to the file and renames it into place: readers see the old file or the
  new one, never a part.
* :func:`read_private_file` opens with ``O_NOFOLLOW | O_NONBLOCK`` and checks
  the open file (fstat: no race with the name): a regular file of this
  process's effective uid, mode 0600, no larger than the caller's bound.
  Anything else raises :class:`UntrustedFileError`.
* :func:`owner_alive` tells a live process from a dead one whose pid was
  reused, by the start time :func:`process_start_time` reads from ``/proc``.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

__all__ = [
    "PRIVATE_MODE",
    "UntrustedFileError",
    "create_private_file",
    "owner_alive",
    "process_start_time",
    "read_private_file",
    "write_private_file",
]

PRIVATE_MODE = 0o600
_PROC = "/proc"  # where process_start_time looks (tests point it elsewhere)
_TEMPORARY_NAME_ATTEMPTS = 8


class UntrustedFileError(PermissionError):
    """A file is not a private file of this user: a symbolic link or another
    non-regular file, another uid's, another mode than 0600, or too large."""

    def __init__(self, path: str, reason: str, st: os.stat_result | None):
        self.path = path
        self.uid = None if st is None else st.st_uid
        self.mode = None if st is None else stat.S_IMODE(st.st_mode)
        owner = "" if st is None else f" (owner uid {self.uid}, mode {self.mode:04o})"
        super().__init__(f"refusing {path}{owner}: {reason}; expected a regular file of uid {os.geteuid()} "
                         f"with mode {PRIVATE_MODE:04o}")


def _new_private_file(path: str) -> int:
    """Creates `path`, which must not exist (not even as a link), mode 0600;
    returns a descriptor open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # the umask may have cleared bits of 0600 (never added any)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def create_private_file(path: str) -> None:
    """Creates `path` empty, mode 0600, exclusively.

    Raises:
      FileExistsError: the name exists (whatever it is, a link included).
    """
    os.close(_new_private_file(path))


def _temporary_path(path: str) -> str:
    # Unpredictable, so that nobody can plant anything there in advance; it
    # starts with `path` so that whoever cleans up names like `path`'s also
    # finds one a crash left behind.
    return f"{path}.{secrets.token_hex(8)}.tmp"


def write_private_file(path: str, data: bytes) -> None:
    """Replaces `path` atomically with a file holding `data`, mode 0600.

    The data goes to a new temporary file next to `path` first (see
    :func:`_new_private_file`), removed again if anything fails.
    """
    for _ in range(_TEMPORARY_NAME_ATTEMPTS):
        tmp = _temporary_path(path)
        try:
            fd = _new_private_file(tmp)
            break
        except FileExistsError:
            continue  # taken (by chance or on purpose): draw another name
    else:
        raise FileExistsError(errno.EEXIST, f"no free temporary name next to {path} in "
                              f"{_TEMPORARY_NAME_ATTEMPTS} attempts", path)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "not a regular file"


def _refusal(path: str, reason: str) -> UntrustedFileError:
    """The error for `path`, which could not be opened: its owner and mode as lstat sees them."""
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    return UntrustedFileError(path, reason, st)


def _why_untrusted(st: os.stat_result, max_bytes: int) -> str:
    """Why an open file is not a private file of ours ("" when it is one)."""
    if not stat.S_ISREG(st.st_mode):
        return _kind(st.st_mode)
    if st.st_uid != os.geteuid():
        return "owned by another uid"
    if stat.S_IMODE(st.st_mode) != PRIVATE_MODE:
        return f"mode is not {PRIVATE_MODE:04o}"
    if st.st_size > max_bytes:
        return f"larger than {max_bytes} bytes"
    return ""


def read_private_file(path: str, max_bytes: int) -> bytes:
    """The contents of `path`, a private file of this user (see the module's
    docstring) of at most `max_bytes` bytes.

    Raises:
      FileNotFoundError: there is no such file.
      UntrustedFileError: there is one, but not such a file (the error names
        its owner uid and mode).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise _refusal(path, "a symbolic link") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise _refusal(path, "not readable by this user") from None
        raise
    try:
        st = os.fstat(fd)
        reason = _why_untrusted(st, max_bytes)
        if reason:
            raise UntrustedFileError(path, reason, st)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # bounded, should it have grown since fstat
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UntrustedFileError(path, f"larger than {max_bytes} bytes", st)
    return data


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of
    ``/proc/<pid>/stat``); None if there is no such process or no ``/proc``."""
    try:
        with open(f"{_PROC}/{int(pid)}/stat", "rb") as f:
            line = f.read()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it exited while we read
        return None
    # Field 2, the command name in parentheses, may itself hold spaces and
    # parentheses: the fields after it start after the LAST ')'.
    fields = line[line.rindex(b")") + 1 :].split()
    return int(fields[22 - 3])  # fields[0] is field 3


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owner_alive(pid: int, start_time: int | None) -> bool:
    """Whether the process that recorded itself as `pid` started at
    `start_time` (its :func:`process_start_time`) still runs: its pid exists
    and, where ``/proc`` tells, the process under it started then (a pid
    reused by a newer process does not count). With no ``/proc`` or no
    recorded start time (None), the pid alone decides.
    """
    if pid <= 0:
        raise ValueError(f"not a process id: {pid}")  # kill(0 or -n, 0) would probe process groups
    if not _pid_exists(pid):
        return False
    if start_time is None or not os.path.exists(f"{_PROC}/self/stat"):
        return True
    return process_start_time(pid) == start_time
