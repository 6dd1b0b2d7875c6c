"""A short thread switch interval while background compiles run beside the
steps.

The thread that drives model steps gives up the GIL at every blocking call
into JAX (a dispatch, a wait for the device) and must get it back to go on.
While another thread runs Python (a background compile tracing the model),
getting it back takes up to the interpreter's switch interval, 5 ms by
default, every time. A step of a few milliseconds then takes tens to
hundreds. Measured on a 2-core CPU with the tiny checkpoint at 32 rows
(2026-12-06): 4.7 ms a step alone, 147 ms beside one busy Python thread at
5 ms, 27.7 ms at 1 ms, 6.8 ms at 200 µs; a step alone cost 5.6 ms at 50 µs
(the switching itself). The server's event loop is Python beside the steps
too, but a served load on that CPU was not measurably faster with it (1050
against 1127 output tok/s, one run each): not applied there.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

#: the switch interval steps are driven under (seconds)
SWITCH_INTERVAL_S = 200e-6


def shorten_switch_interval() -> None:
    """Sets the interpreter's switch interval to SWITCH_INTERVAL_S unless it
    is that short already (process-wide, for the rest of the process: called
    when background compiles start, which a server's warm-up keeps busy for
    minutes)."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        log.info("thread switch interval %.0f µs -> %.0f µs: model steps share the GIL with other threads",
                 sys.getswitchinterval() * 1e6, SWITCH_INTERVAL_S * 1e6)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
