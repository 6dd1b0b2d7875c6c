"""What a streamed completion may send of its text so far.

A running completion's decoded text can still change at its end: its last
bytes may be half of a UTF-8 character (decoded as U+FFFD until the next
token completes it), and it may end with the start of a stop string, which
is cut from the final text if the rest follows. Both are held back until the
completion ends; what was sent is then always a prefix of the final text.
"""

from __future__ import annotations

from typing import Sequence


def sendable(text: str, stop: Sequence[str]) -> int:
    """How much of a running completion's `text` is final: its length less
    a trailing partial character and the longest suffix that begins a stop
    string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for s in stop:
        for n in range(min(len(s) - 1, end), held, -1):
            if text.endswith(s[:n], 0, end):
                held = n
                break
    return end - held


class TextStream:
    """The new text of one completion at each of its outputs."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.sent = 0  # characters sent
        self.tokens = 0  # tokens whose logprobs were sent
        self.token_chars = 0  # their text's length (a completion's next text offset)

    def delta(self, text: str, finished: bool) -> str:
        end = len(text) if finished else sendable(text, self.stop)
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new
