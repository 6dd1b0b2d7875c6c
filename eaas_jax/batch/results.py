"""The output file of a batch run: one JSON record per line, appended as each
request finishes, so whatever finished survives SIGINT, SIGTERM, SIGKILL or a
crash, and a rerun resumes.

Each record is one ``write()`` of a whole line on a file opened with
``O_APPEND``: the kernel has it once the call returns, whatever happens to
the process next (the file is synced when the run ends; a crash of the whole
machine before that can lose records, as the page cache can). A process
killed inside that call can leave a partial last line; reopening the file
drops it (it was never a finished record). One run at a time writes a file:
a second is refused (an exclusive lock on it).
"""

from __future__ import annotations

import fcntl
import json
import os

__all__ = ["ResultsFile", "ResultsFileError"]


class ResultsFileError(ValueError):
    """The output cannot be used (the message says why and what to do)."""


class ResultsFile:
    """Opens `path` for a run over the request ids `ids`.

    A missing file is created. An existing one is resumed: the ids it has a
    record for are `done` (results and error records alike; delete a line, or
    pass `overwrite`, to run it again), provided every record in it belongs
    to this input; anything else is refused rather than appended to.
    `overwrite` starts it empty. The directory must be writable: checked
    here, before any model work.

    Raises:
      ResultsFileError: the file or its directory cannot be written, or it
        holds records of another input.
    """

    def __init__(self, path: str, ids: set[str], *, overwrite: bool = False):
        self.path = path
        self.done: set[str] = set()
        self.failed: set[str] = set()  #: ids with an error record
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ResultsFileError(f"{path}: directory {directory} does not exist")
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ResultsFileError(f"cannot write {path}: {e.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise ResultsFileError(f"{path} is being written by another run") from None
        # --overwrite empties the file at the first record, not now: a run
        # that fails before (a wrong --model) leaves the old results.
        self._empty_first = overwrite
        if not overwrite:
            try:
                self._resume(ids)
            except ResultsFileError:
                os.close(self._fd)
                raise

    def _resume(self, ids: set[str]) -> None:
        """Takes the ids recorded in the existing file. A last line without
        its newline is kept (and ended) if it is a whole record, and cut off
        otherwise (a process killed while writing it)."""
        path = self.path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ResultsFileError(f"cannot read {path} to resume it: {e.strerror}") from None
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        for number, line in enumerate(lines, 1):
            if line.strip():
                self._take(self._record_id(line, ids, number))
        if tail.strip():
            try:
                self._take(self._record_id(tail, ids, len(lines) + 1))
                os.write(self._fd, b"\n")  # a whole record that lacked its newline
            except ResultsFileError:  # a partial record: it never finished
                try:
                    os.truncate(path, len(data) - len(tail))
                except OSError as e:
                    raise ResultsFileError(f"cannot cut the partial last line of {path}: {e.strerror}") from None

    def _record_id(self, line: bytes, ids: set[str], number: int) -> tuple[str, bool]:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        custom_id = record.get("custom_id") if isinstance(record, dict) else None
        if not isinstance(custom_id, str) or custom_id not in ids:
            raise ResultsFileError(
                f"{self.path} exists and its line {number} is no record of this input (ids must be this input's); "
                "pass --overwrite to replace it, or choose another --output")
        return custom_id, bool(record.get("error"))

    def _take(self, recorded: tuple[str, bool]) -> None:
        custom_id, failed = recorded
        self.done.add(custom_id)
        if failed:
            self.failed.add(custom_id)

    def write(self, record: dict) -> None:
        """Appends `record` (one with a `custom_id`) as one line, in one write."""
        if self._empty_first:
            os.ftruncate(self._fd, 0)
            self._empty_first = False
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = 0
        while written < len(data):  # a regular file takes a line whole; loop in case it did not
            written += os.write(self._fd, data[written:])
        self._take((record["custom_id"], bool(record.get("error"))))

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
