"""Tokens → text, with stop strings: what every way of generating (API, server, batch) shows of a sequence.

The scheduler keeps one StopText per sequence and ends the sequence in the very step whose token completes a stop
string, so when a sequence stops never depends on how fast its reader reads.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Sequence

# A new line that opens with a speaker's label ("User:", "Assistant:", "Student:", "Dr Smith:"): in a plain
# transcript the reply is over, whoever the model lets speak next. A tail that may still become one is held back.
TURN_LABEL = re.compile(r"\n[ \t]*[A-Z][\w'-]{0,24}(?: [A-Z][\w'-]{0,24})?:")
MAYBE_TURN_LABEL = re.compile(r"\n[ \t]*(?:[A-Z][\w'-]{0,24}(?: (?:[A-Z][\w'-]{0,24})?)?)?$")


class StopText:
    """Turns tokens into text pieces: holds back bytes of a split UTF-8 character and any tail that could be the
    start of a stop string (or, with ``turn_labels``, of a speaker's label on a new line), so a stop spanning
    several tokens is caught and never emitted."""

    def __init__(self, token_bytes: Callable[[int], bytes], stops: Sequence[str], turn_labels: bool = False):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        self._turn_labels = turn_labels
        self._pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text safe to emit now, whether a stop string was reached)."""
        self._pending += self._decoder.decode(self._token_bytes(token))
        hits = [i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0]
        if self._turn_labels and (label := TURN_LABEL.search(self._pending)):
            hits.append(label.start())
        if hits:
            piece, self._pending = self._pending[: min(hits)], ""
            return piece, True
        hold = max(
            (k for stop in self._stops for k in range(1, len(stop)) if self._pending.endswith(stop[:k])), default=0
        )
        if self._turn_labels and (label := MAYBE_TURN_LABEL.search(self._pending)):
            hold = max(hold, len(self._pending) - label.start())
        cut = len(self._pending) - hold
        piece, self._pending = self._pending[:cut], self._pending[cut:]
        return piece, False

    def flush(self) -> str:
        piece, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return piece
