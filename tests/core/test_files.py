"""consisid_core/files.py: waits that a signal ends."""

import signal
import threading

import pytest

from consisid_core import files


class Stopped(Exception):
    pass


def test_a_signal_another_thread_takes_ends_the_wait_for_a_thread():
    """A process-wide signal the kernel hands to another thread (or that comes just before the wait
    sleeps) runs its handler within the wait, not once the awaited thread ends."""

    def stop(signum, frame):
        raise Stopped

    release = threading.Event()
    waiting = threading.Thread(target=release.wait, daemon=True)
    waiting.start()
    previous = signal.signal(signal.SIGUSR1, stop)
    to_the_other_thread = threading.Timer(0.2, signal.pthread_kill, (waiting.ident, signal.SIGUSR1))
    released_anyway = threading.Timer(30, release.set)  # one long wait would end only here
    try:
        to_the_other_thread.start()
        released_anyway.start()
        with pytest.raises(Stopped):
            files.join_interruptibly(waiting)
        assert not release.is_set()
    finally:
        released_anyway.cancel()
        release.set()
        signal.signal(signal.SIGUSR1, previous)
