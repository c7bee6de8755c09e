"""Tests that stop a command-line process midway: wait for a moment in its run, then signal it."""

import signal
import subprocess
import time


def start(args: list[str], **kwargs) -> subprocess.Popen:
    """`args` as a process of its own, with Ctrl-C's signal handled as in a terminal: a test run
    from a background job (whose shell ignores SIGINT, and children inherit that) still reaches the
    command's own handler."""
    return subprocess.Popen(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def wait_for(condition, seconds: float) -> bool:
    """True once `condition()` is, False when `seconds` passed first."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def signal_when(process: subprocess.Popen, ready, sig: int, what: str, seconds: float = 240) -> tuple[str, str]:
    """Send `sig` to `process` once `ready()` is true (the test fails, saying `what` never happened,
    when it is not within `seconds`); (stdout, stderr) of the process once it ended. The process is
    killed whatever happens."""
    try:
        assert wait_for(ready, seconds), f"{what} never happened"
        process.send_signal(sig)
        try:
            return process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            raise AssertionError(f"still running 120 s after the signal, its stderr ending:\n{err[-2000:]}") from None
    finally:
        process.kill()
