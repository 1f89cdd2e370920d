"""Stop at a safe point when the cluster or the user asks: the signal guard of fine-tuning and pretraining.

SIGTERM is what a cluster sends before pre-empting or killing a job (SLURM, Kubernetes, ``docker stop``),
SIGUSR1 what SLURM can send as a warning before a time limit, SIGINT what Ctrl-C sends. While a
:class:`StopSignals` is active the handlers only record the request; the training loop looks at it at the
end of an iteration, writes a checkpoint and exits. Standard library only.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable

PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """While active, the first of ``signals`` only records itself (``requested``, the signal number, and
    ``signal_name``) and writes ``notice`` (``{signal}`` is its name) to stderr. One of ``ends_when_repeated``
    (all of ``signals`` unless given) arriving while a stop is pending restores the previous handlers and is
    delivered again, so an impatient second signal still ends the process at once (a second Ctrl-C raises
    KeyboardInterrupt); a repeated other one changes nothing. On exit the previous handlers are back.

    Processes forked while this is active (nnU-Net's augmentation workers) inherit the handler. A signal
    sent to the whole process group (SLURM, ``kill -TERM -PGID``, Ctrl-C) reaches them too: a worker lets
    the first one pass, so the trainer's current iteration still gets its batch and the trainer shuts its
    workers down after saving; a second one that ends the process (nnU-Net's ``terminate()`` of a worker
    that did not stop in time) ends the worker as the default would. Where handlers cannot be set (not the
    main thread) nothing is installed."""

    def __init__(self, signals: Iterable[int] = PREEMPTION_SIGNALS, ends_when_repeated: Iterable[int] | None = None,
                 notice: str | None = None):
        self.signals = tuple(signals)
        self.ends_when_repeated = self.signals if ends_when_repeated is None else tuple(ends_when_repeated)
        self.notice = notice
        self.requested: int | None = None
        self.previous: dict[int, object] = {}
        self._spared_in: int | None = None  # the forked worker that has let one signal pass

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.requested).name if self.requested is not None else None

    def __enter__(self) -> StopSignals:
        self.owner = os.getpid()
        try:
            for signum in self.signals:
                self.previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread of the main interpreter
            self.restore()
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            # None (a handler set outside Python) restores the default
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.owner:  # a forked worker (see the class docstring)
            if signum in self.ends_when_repeated and self._spared_in == os.getpid():
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self._spared_in = os.getpid()
            return
        if self.requested is not None:
            if signum in self.ends_when_repeated:
                self.restore()
                os.kill(os.getpid(), signum)
            return
        self.requested = signum
        if self.notice:
            # os.write, not print: a handler that prints while the main thread is printing raises
            # "reentrant call" in the middle of training
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.write(sys.stderr.fileno(), self.notice.format(signal=signal.Signals(signum).name).encode())
