"""Stop requests: SIGTERM (cluster pre-emption), SIGUSR1 (SLURM's warning before a time limit) and
Ctrl-C (SIGINT) end the current iteration, write a checkpoint and exit cleanly.

The handlers only set a flag; the loop all-reduces it at the end of the iteration, so every rank
stops at the same iteration even when only one got the signal. A second Ctrl-C while the first is
pending interrupts at once (KeyboardInterrupt), for a user who does not want to wait.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopRequests:
    """Context manager: installs the handlers in the main thread (elsewhere it changes nothing) and
    restores the previous ones on exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc) -> bool:
        for signum, previous in self._previous.items():
            # None (a handler set outside Python) restores the default
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return False
