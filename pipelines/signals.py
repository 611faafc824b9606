"""Termination signals for `edtalk` commands: SIGTERM (and SIGHUP) end a command the way Ctrl-C does.

Python's default action for SIGTERM ends the process at once: no `finally`, no `except BaseException` cleanup, no
atexit hooks. A command that leaves partial outputs or temporary folders only when it is killed that way calls
`terminate_like_interrupt()` first; the signal then raises KeyboardInterrupt where the program is, the cleanup
code runs and the process exits with 128 + the signal number. SIGKILL cannot be caught: what it leaves is handled
where the outputs are written (e.g. hidden partial files beside the target, removed by the next run).
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum, frame):
    # once: a second signal during the cleanup must not interrupt the cleanup
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def terminate_like_interrupt() -> None:
    """Make SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


def exit_code(exc: BaseException) -> int:
    """The shell's exit status for a command ended by `exc` (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def exit_terminated(exc: BaseException) -> None:
    print(f"\nstopped: {exc or 'interrupted'}; partial outputs were removed", file=sys.stderr)
    sys.exit(exit_code(exc))
