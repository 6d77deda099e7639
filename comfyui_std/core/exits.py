"""Stopping cleanly: Ctrl-C (SIGINT) and SIGTERM end the app, the batch CLI and the trainers through the normal exit
path.

Inside :func:`stop_on_signals` either signal raises :class:`Stopped` in the main thread, so every ``with`` and
``finally`` block runs on the way out: the ``--tiny`` model folder is removed, a video being written is deleted
(its ``.partial`` file; finished outputs stay), and the program exits with 130 (SIGINT) or 143 (SIGTERM) after one
line saying what happened, instead of a traceback or a process killed mid-write. A trainer's loop takes both signals
over while it runs (it finishes the step and writes a checkpoint first) and gives them back after it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


class Stopped(KeyboardInterrupt):
    """The program was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise :class:`Stopped` inside the block (main thread only; elsewhere a no-op); the
    previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        _received.append(int(signum))
        raise Stopped(signum)

    _received.clear()
    previous = {s: signal.signal(s, stop) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def received() -> Stopped | None:
    """The stop a signal asked for inside the current :func:`stop_on_signals` block, also when a library caught the
    :class:`Stopped` it raised (Gradio's server loop does); None without one."""
    return Stopped(_received[-1]) if _received else None
