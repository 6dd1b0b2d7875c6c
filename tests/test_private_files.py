"""Private files in directories every local user can write to
(`eaas_jax.transport.private_files`), and the cuda_ipc directory entries
kept in them: nothing another local user plants there is written through,
trusted or removed, and a dead owner's entry is told from a live one by its
pid and start time. CPU only: the GPU is not involved in any of it."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading

import pytest

from eaas_jax.transport import cuda_ipc, private_files
from eaas_jax.transport.private_files import (
    UntrustedFileError,
    create_private_file,
    owner_alive,
    process_start_time,
    read_private_file,
    write_private_file,
)
from eaas_jax.transport.wire import Geometry

MAX_BYTES = 4096
GEOMETRY = Geometry(max_endpoints=4, num_channels=2, capacity=16, hidden_size=64, top_k=2, num_layers=2,
                       num_experts=8, deployment_id=7)
_names = itertools.count()


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _read_in_thread(path: str, timeout: float = 10.0):
    """read_private_file(path) in a thread: what it returned or raised, or a
    failure if it still blocks after `timeout` s (opening a FIFO can block)."""
    outcome = {}

    def read():
        try:
            outcome["data"] = read_private_file(path, MAX_BYTES)
        except Exception as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        pytest.fail(f"reading {path} blocked for {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_child():
    """A running process of ours that is not this one."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield child
    child.stdin.close()
    child.wait(timeout=30)


@pytest.fixture
def entry_path():
    """A fresh cuda_ipc directory entry name in /dev/shm (endpoint 1 of a new
    deployment); removed after the test, whoever made it."""
    deployment = f"pf{os.getpid()}-{next(_names)}"
    path = cuda_ipc.directory_path(deployment, 1)
    yield deployment, path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _peer_entry_data(peer: int, *, pid: int) -> bytes:
    """A well-formed directory entry of endpoint `peer` whose owner is `pid`."""
    entry = cuda_ipc._new_entry(peer, GEOMETRY, bytes(64))
    entry["pid"] = pid
    return json.dumps(entry).encode()


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = str(tmp_path / "entry")
    planted = f"{path}.planted.tmp"
    os.symlink(victim, planted)
    # The first temporary name drawn is the planted one (as if it had been guessed).
    names = iter([planted, f"{path}.fresh.tmp"])
    monkeypatch.setattr(private_files, "_temporary_path", lambda _: next(names))
    write_private_file(path, b"new")
    assert victim.read_bytes() == b"precious"
    assert read_private_file(path, MAX_BYTES) == b"new"
    assert os.path.islink(planted)  # left alone
    assert sorted(os.listdir(tmp_path)) == ["entry", "entry.planted.tmp", "victim"]  # no temporary file left


def test_the_old_predictable_temporary_name_is_not_used(tmp_path):
    """cuda_ipc wrote entries through `<entry>.<pid>.tmp`: a link planted there
    made it overwrite the file the link pointed to."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = str(tmp_path / "eaas-d-1.cuda-ipc")
    os.symlink(victim, f"{path}.{os.getpid()}.tmp")
    write_private_file(path, b"entry")
    assert victim.read_bytes() == b"precious"
    assert read_private_file(path, MAX_BYTES) == b"entry"


# Audit hooks see every file operation of this process: how a test watches the
# modes a file goes through while it is written (the mode it ends with says
# nothing about the window before a chmod). Hooks cannot be removed, so this
# one is inert unless a test watches a directory.
_WATCHED: list[tuple[str, set]] = []
_HOOK = threading.local()


def _record_modes(event: str, args) -> None:
    if not _WATCHED or getattr(_HOOK, "busy", False):
        return
    _HOOK.busy = True  # os.scandir raises audit events itself
    try:
        for directory, seen in _WATCHED:
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    seen.add((entry.name, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)))
    finally:
        _HOOK.busy = False


sys.addaudithook(_record_modes)


def test_a_file_is_never_more_open_than_0600_even_with_umask_0(tmp_path):
    seen: set = set()
    _WATCHED.append((str(tmp_path), seen))
    try:
        with _umask(0):
            write_private_file(str(tmp_path / "entry"), b"{}")
    finally:
        _WATCHED.clear()
    assert any(name != "entry" for name, _ in seen), seen  # the temporary file was watched
    assert all(mode & ~0o600 == 0 for _, mode in seen), seen
    assert stat.S_IMODE(os.stat(tmp_path / "entry").st_mode) == 0o600


@pytest.mark.parametrize("mask", [0, 0o777])
def test_created_files_are_0600_whatever_the_umask(tmp_path, mask):
    created, written, claimed = (str(tmp_path / name) for name in ("created", "written", "claimed"))
    with _umask(mask):
        create_private_file(created)
        write_private_file(written, b"{}")
        cuda_ipc._claim_directory_entry(claimed, "endpoint 1")  # the empty placeholder
    for path in (created, written, claimed):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        read_private_file(path, MAX_BYTES)  # and readable as a private file


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "entry"
    path.mkdir()  # a file cannot replace a directory
    (path / "inside").write_bytes(b"")
    with pytest.raises(OSError):
        write_private_file(str(path), b"{}")
    assert os.listdir(tmp_path) == ["entry"]


def test_create_never_goes_through_an_existing_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(FileExistsError):
        create_private_file(str(tmp_path / "link"))
    assert victim.read_bytes() == b"precious"


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def test_a_file_of_another_uid_is_refused(tmp_path, other_user):
    path = str(tmp_path / "entry")
    write_private_file(path, b"{}")
    os.chown(path, other_user.uid, other_user.gid)
    with pytest.raises(UntrustedFileError, match=f"owner uid {other_user.uid}, mode 0600") as refused:
        read_private_file(path, MAX_BYTES)
    assert path in str(refused.value) and "another uid" in str(refused.value)
    assert (refused.value.uid, refused.value.mode) == (other_user.uid, 0o600)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o400, 0o700])
def test_a_mode_other_than_0600_is_refused(tmp_path, mode):
    path = str(tmp_path / "entry")
    write_private_file(path, b"{}")
    os.chmod(path, mode)
    with pytest.raises(UntrustedFileError, match=f"owner uid {os.geteuid()}, mode {mode:04o}"):
        read_private_file(path, MAX_BYTES)


def _make_link(path: str, target: str) -> None:
    os.symlink(target, path)


def _make_fifo(path: str, target: str) -> None:
    os.mkfifo(path, 0o600)


def _make_directory(path: str, target: str) -> None:
    os.mkdir(path, 0o700)


@pytest.mark.parametrize("make, kind", [(_make_link, "a symbolic link"), (_make_fifo, "a FIFO"),
                                        (_make_directory, "a directory")])
def test_anything_but_a_regular_file_is_refused_without_blocking(tmp_path, make, kind):
    target = str(tmp_path / "target")
    write_private_file(target, b"{}")  # a good private file: a link to it is refused all the same
    path = str(tmp_path / "entry")
    make(path, target)
    try:
        with pytest.raises(UntrustedFileError, match=f"refusing {re.escape(path)} .*: {kind};"):
            _read_in_thread(path)
    finally:
        if make is _make_fifo:  # release a reader blocked in open(), should there be one
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_file_over_the_bound_is_refused(tmp_path):
    path = str(tmp_path / "entry")
    write_private_file(path, b"x" * MAX_BYTES)
    assert len(read_private_file(path, MAX_BYTES)) == MAX_BYTES
    write_private_file(path, b"x" * (MAX_BYTES + 1))
    with pytest.raises(UntrustedFileError, match=f"larger than {MAX_BYTES} bytes"):
        read_private_file(path, MAX_BYTES)


# --------------------------------------------------------------------------
# Owners: pid and start time
# --------------------------------------------------------------------------


def test_process_start_time_reads_field_22_past_a_command_name_with_spaces_and_parentheses():
    comm = "a) b (c d"  # 9 bytes: fits the kernel's 15
    child = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys\n"
         "ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)\n"  # PR_SET_NAME
         "print('named', flush=True)\n"
         "sys.stdin.read()\n", comm],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "named"
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            line = f.read()
        prefix = f"{child.pid} ({comm}) ".encode()
        assert line.startswith(prefix)  # the kernel took the name
        assert process_start_time(child.pid) == int(line[len(prefix):].split()[22 - 3])
        assert process_start_time(child.pid) >= process_start_time(os.getpid())
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert process_start_time(child.pid) is None  # exited


def test_an_owner_counts_as_alive_only_with_its_pid_and_start_time(live_child):
    me = os.getpid()
    assert owner_alive(me, process_start_time(me))
    assert not owner_alive(me, process_start_time(me) + 1)  # our pid, but another process's start
    started = process_start_time(live_child.pid)
    assert owner_alive(live_child.pid, started)
    assert not owner_alive(live_child.pid, started - 1)  # a pid reused since its owner died
    assert not owner_alive(_dead_pid(), started)
    assert owner_alive(me, None)  # no start time recorded: the pid decides
    with pytest.raises(ValueError):
        owner_alive(0, None)  # kill(0, 0) would probe our own process group


def test_without_proc_the_pid_alone_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(private_files, "_PROC", str(tmp_path))  # an empty /proc
    assert process_start_time(os.getpid()) is None
    assert owner_alive(os.getpid(), 12345)
    assert not owner_alive(_dead_pid(), 12345)


# --------------------------------------------------------------------------
# cuda_ipc directory entries
# --------------------------------------------------------------------------


def test_an_entry_records_its_owners_pid_and_start_time():
    entry = cuda_ipc._new_entry(3, GEOMETRY, bytes(range(64)))
    assert entry["pid"] == os.getpid() and entry["start_time"] == process_start_time(os.getpid())
    assert entry["endpoint"] == 3 and bytes.fromhex(entry["handle"]) == bytes(range(64))


def test_claiming_replaces_an_entry_whose_owner_pid_was_reused(entry_path, live_child):
    _, path = entry_path
    entry = cuda_ipc._new_entry(1, GEOMETRY, bytes(64))
    entry.update(pid=live_child.pid, start_time=process_start_time(live_child.pid) - 1)
    write_private_file(path, json.dumps(entry).encode())
    cuda_ipc._claim_directory_entry(path, "endpoint 1")
    assert read_private_file(path, MAX_BYTES) == b""  # our placeholder now


def test_claiming_keeps_an_entry_whose_owner_lives(entry_path, live_child):
    _, path = entry_path
    entry = cuda_ipc._new_entry(1, GEOMETRY, bytes(64))
    entry.update(pid=live_child.pid, start_time=process_start_time(live_child.pid))
    data = json.dumps(entry).encode()
    write_private_file(path, data)
    with pytest.raises(cuda_ipc.CudaIpcEndpointInUseError, match=f"by pid {live_child.pid}"):
        cuda_ipc._claim_directory_entry(path, "endpoint 1")
    assert read_private_file(path, MAX_BYTES) == data


def test_claiming_refuses_and_keeps_another_users_entry(entry_path, other_user):
    """Another local user creates the entry's name first, claiming a dead
    owner: it is neither used nor removed, and the error names that uid."""
    _, path = entry_path
    entry = cuda_ipc._new_entry(1, GEOMETRY, bytes(64))
    entry.update(pid=_dead_pid(), start_time=1)
    data = json.dumps(entry)
    made = other_user.run("import os, sys\n"
                          "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
                          "os.write(fd, sys.argv[2].encode())\n", path, data)
    assert made.returncode == 0, made.stderr
    with pytest.raises(cuda_ipc.CudaIpcEndpointInUseError, match=f"owner uid {other_user.uid}"):
        cuda_ipc._claim_directory_entry(path, "endpoint 1")
    assert os.stat(path).st_uid == other_user.uid
    with open(path) as f:
        assert f.read() == data


@pytest.mark.parametrize("spoil", ["another uid", "mode 0644", "a symbolic link"])
def test_a_peer_entry_that_is_not_a_private_file_is_refused(entry_path, tmp_path, spoil, request):
    deployment, path = entry_path
    if spoil == "a symbolic link":
        target = str(tmp_path / "entry")
        write_private_file(target, _peer_entry_data(1, pid=1))
        os.symlink(target, path)
    else:
        write_private_file(path, _peer_entry_data(1, pid=1))
        if spoil == "mode 0644":
            os.chmod(path, 0o644)
        else:
            other_user = request.getfixturevalue("other_user")
            os.chown(path, other_user.uid, other_user.gid)
    with pytest.raises(cuda_ipc.CudaIpcPeerRefusedError, match=f"refusing endpoint 1: refusing {re.escape(path)} "):
        cuda_ipc._peer_entry(deployment, 1)


def test_a_peer_entry_is_read_when_private(entry_path):
    deployment, path = entry_path
    assert cuda_ipc._peer_entry(deployment, 1) is None  # none yet
    cuda_ipc._claim_directory_entry(path, "endpoint 1")
    assert cuda_ipc._peer_entry(deployment, 1) is None  # its placeholder
    data = _peer_entry_data(1, pid=1)
    write_private_file(path, data)
    assert cuda_ipc._peer_entry(deployment, 1) == json.loads(data)


class _FakeLibrary:
    """The two calls of the native library the control path's refresh makes."""

    def __init__(self, wanted: set[int]):
        self.wanted, self.imported = wanted, {}

    def eaas_cuda_ipc_take_wanted(self, endpoint, out, n):
        for peer in self.wanted:
            out[peer] = 1
        self.wanted = set()
        return 0

    def eaas_cuda_ipc_set_peer(self, endpoint, peer, handle, err, errlen):
        if handle is None:
            self.imported.pop(peer, None)
        else:
            self.imported[peer] = bytes(handle)
        return 0


def test_the_control_path_forgets_a_peer_whose_entry_is_spoiled(entry_path, monkeypatch, caplog):
    """An imported peer whose entry turns into a file that is not private (here
    mode 0644) is forgotten with a warning; the control path goes on."""
    deployment, path = entry_path
    write_private_file(path, _peer_entry_data(1, pid=1))
    library = _FakeLibrary(wanted={1})
    monkeypatch.setattr(cuda_ipc, "_lib", lambda: library)
    # An endpoint without its GPU half: what _refresh uses of one.
    endpoint = object.__new__(cuda_ipc.CudaIpcEndpoint)
    endpoint.deployment, endpoint.endpoint, endpoint.geometry = deployment, 0, GEOMETRY
    endpoint._lock, endpoint._imported = threading.Lock(), {}
    endpoint._refresh(rescan=False)
    assert set(library.imported) == {1} and set(endpoint._imported) == {1}
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger=cuda_ipc.__name__):
        endpoint._refresh(rescan=True)
    assert library.imported == {} and endpoint._imported == {}
    assert any(f"refusing {path}" in r.getMessage() and "mode 0644" in r.getMessage() for r in caplog.records)
