"""Hold Ctrl-C while weights are half perturbed or half restored, then deliver it."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_sigint():
    """Run the body with SIGINT postponed until it ends (main thread only; elsewhere a no-op).

    A KeyboardInterrupt between two layers of a restore would leave some weights perturbed; holding it
    for the few milliseconds of the loop keeps every window all-or-nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except ValueError:  # not allowed here (e.g. embedded interpreters)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, received[-1])
        elif received:
            raise KeyboardInterrupt
