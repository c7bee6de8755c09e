import os
import sys

from .cli import SIGNAL_EXITS, main

code = main()
if code in SIGNAL_EXITS:
    # stopped by a signal, everything cleaned up: end now, not after the interpreter's teardown
    # (seconds with torch loaded, and a write stuck in native code may still hold a thread)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
