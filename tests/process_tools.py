"""Tests that stop a command-line process midway: wait for a moment in its run, then signal it."""

import subprocess
import time


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
        return process.communicate(timeout=120)
    finally:
        process.kill()
