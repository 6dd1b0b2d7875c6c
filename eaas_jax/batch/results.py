"""The output file of a batch run: one JSON record per line, appended as each
request finishes, so whatever finished survives SIGINT, SIGTERM, SIGKILL or a
crash, and a rerun resumes.

Each record is one ``write()`` of a whole line on a file opened with
``O_APPEND``: the kernel has it once the call returns, whatever happens to
the process next. A process killed inside that call can leave a partial last
line; reopening the file drops it (it was never a finished record).
"""

from __future__ import annotations

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
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ResultsFileError(f"{path}: directory {directory} does not exist")
        if os.path.exists(path) and not overwrite:
            self.done = self._resume(ids)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if overwrite else 0)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise ResultsFileError(f"cannot write {path}: {e.strerror}") from None

    def _resume(self, ids: set[str]) -> set[str]:
        """The ids recorded in the existing file; a partial last line (a
        process killed while writing it) is cut off."""
        try:
            with open(path := self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ResultsFileError(f"cannot read {self.path} to resume it: {e.strerror}") from None
        complete = data[: data.rfind(b"\n") + 1]
        done = set()
        for number, line in enumerate(complete.splitlines(), 1):
            if not line.strip():
                continue
            try:
                custom_id = json.loads(line).get("custom_id")
            except (ValueError, AttributeError):
                custom_id = None
            if custom_id not in ids:
                raise ResultsFileError(
                    f"{path} exists and its line {number} is no record of this input; pass --overwrite to replace "
                    "it, or choose another --output")
            done.add(custom_id)
        if len(complete) < len(data):
            try:
                os.truncate(path, len(complete))
            except OSError as e:
                raise ResultsFileError(f"cannot cut the partial last line of {path}: {e.strerror}") from None
        return done

    def write(self, record: dict) -> None:
        """Appends `record` as one line, in one write."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = 0
        while written < len(data):  # a regular file takes it whole; a short write only on a full disk
            written += os.write(self._fd, data[written:])
        if "custom_id" in record:
            self.done.add(record["custom_id"])

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
