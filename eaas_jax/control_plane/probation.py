"""How long a server marked dead by a failed exchange stays out while its
process is still up.

With adaptive deadlines a miss can be a false alarm (a pause longer than a
tight deadline), so such a server gets its traffic back after `first_s`,
doubled after each failure in a row up to `max_s`: a false alarm costs seconds
of its capacity, a hung server one short deadline per retry. A server that
served `max_s` past its last probation starts over with a clean record.
"""

from __future__ import annotations


class Probation:
    def __init__(self, first_s: float, max_s: float):
        if not 0 < first_s <= max_s:
            raise ValueError(f"need 0 < first_s <= max_s, got {first_s} and {max_s}")
        self.first_s, self.max_s = first_s, max_s
        self._records: dict[int, tuple[float, int]] = {}  # server -> (may return at, failures in a row)

    def failed(self, server: int, now: float) -> float:
        """Starts `server`'s probation at `now`; returns how long it lasts."""
        in_a_row = self._records.get(server, (0.0, 0))[1] + 1
        seconds = min(self.first_s * 2 ** (in_a_row - 1), self.max_s)
        self._records[server] = (now + seconds, in_a_row)
        return seconds

    def is_over(self, server: int, now: float) -> bool:
        """Whether `server` is on probation and it has ended."""
        record = self._records.get(server)
        return record is not None and now >= record[0]

    def served(self, server: int, now: float) -> None:
        """`server` is live at `now`: long enough after its last probation, its record is cleared."""
        record = self._records.get(server)
        if record is not None and now >= record[0] + self.max_s:
            del self._records[server]

    def forget(self, server: int) -> None:
        """A new process, or a drained server: no probation to end."""
        self._records.pop(server, None)
