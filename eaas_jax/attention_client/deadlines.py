"""Exchange deadlines that follow the step times a client observes.

A combine waits for its servers until a deadline, and a server that died costs
every step in flight one deadline before the client routes around it. A fixed
deadline has to cover the slowest healthy exchange there will ever be (a long
prefill on a busy server), so failover would cost seconds where steps take
milliseconds. `AdaptiveDeadline` gives each step a deadline from how long
recent healthy steps took: one exchange of a healthy step waits at most the
whole step, and a step of more tokens takes longer, so `margin` times the
slowest recent step of the nearest token count at or above this one's, clamped
to [min, max], bounds it with room for jitter. A step larger than any seen
`min_samples` times gets the maximum.

The risk is a false alarm: a healthy server slower than `margin` x its recent
worst (a burst from another client, a pause) is marked dead and loses this
client's traffic until it comes back as a new process. `min_us` is the floor
that keeps short steps from getting deadlines tighter than such pauses.
"""

from __future__ import annotations

import bisect
import collections


class AdaptiveDeadline:
    def __init__(self, *, min_us: int, max_us: int, margin: float = 4.0, window: int = 32,
                 min_samples: int = 3):
        if not 0 < min_us <= max_us:
            raise ValueError(f"need 0 < min_us <= max_us, got {min_us} and {max_us}")
        if margin < 1 or window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need margin >= 1 and 1 <= min_samples <= window, got {margin}, {min_samples}, {window}")
        self.min_us, self.max_us, self.margin = int(min_us), int(max_us), float(margin)
        self.window, self.min_samples = window, min_samples
        self._recent: dict[int, collections.deque[float]] = {}  # step times by token count
        self._known: list[int] = []  # sorted token counts seen min_samples times

    def deadline_us(self, num_tokens: int) -> int:
        """The deadline of each exchange of a step of `num_tokens` (padded) tokens."""
        i = bisect.bisect_left(self._known, num_tokens)
        if i == len(self._known):
            return self.max_us
        slowest = max(self._recent[self._known[i]])
        return int(min(self.max_us, max(self.min_us, self.margin * slowest * 1e6)))

    def forget(self) -> None:
        """Drops what was learnt: every step gets the maximum until healthy
        steps of its size were seen again (after a false alarm)."""
        self._recent.clear()
        self._known.clear()

    def observe(self, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` that every server answered took `seconds` on
        the device (steps with a failed exchange must not be observed: their
        time is the deadline itself)."""
        if seconds < 0:
            raise ValueError(f"a step cannot take {seconds} s")
        recent = self._recent.setdefault(num_tokens, collections.deque(maxlen=self.window))
        recent.append(seconds)
        if len(recent) == self.min_samples:
            bisect.insort(self._known, num_tokens)
