"""Run one step's command in a child process, passing SIGTERM and SIGINT on to it.

Each step runs in its own process (its own peak memory, progress bar and exit status). The
child gets its own process group, so a terminal's Ctrl-C reaches it once, through the runner:
the runner forwards the signal and waits, and the step, like every command, turns it into a
clean stop that removes its temporary output; killing the child instead would leave its
``.<id>.weightsmith-tmp-*`` behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import FrameType

FORWARDED = (signal.SIGTERM, signal.SIGINT)
# The child's own process group keeps a terminal's Ctrl-C from reaching it twice.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


class _Forwarder:
    """Signal handler state: the signals received, passed on to the child once it exists."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.forwarded = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        self.flush()

    def flush(self) -> None:
        while self.proc is not None and self.forwarded < len(self.received):
            self.proc.send_signal(self.received[self.forwarded])
            self.forwarded += 1


def run_step_process(cmdline: list[str]) -> tuple[int, int | None]:
    """Run ``cmdline`` and wait for it; returns its exit status and the first SIGTERM/SIGINT
    the runner received meanwhile (None when it was not interrupted)."""
    forwarder = _Forwarder()
    previous = {}
    try:
        for sig in FORWARDED:
            previous[sig] = signal.signal(sig, forwarder)
    except ValueError:  # not the main thread: signals stay with their current handlers
        pass
    try:
        forwarder.proc = subprocess.Popen(cmdline, **_OWN_GROUP)
        forwarder.flush()  # a signal that came while the child was starting
        returncode = forwarder.proc.wait()
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, cannot be restored
                signal.signal(sig, handler)
    return returncode, (forwarder.received[0] if forwarder.received else None)
