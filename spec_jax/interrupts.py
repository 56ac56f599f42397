"""How a command ends: a user error as one line (exit 2), Ctrl-C or SIGTERM as one line (exit 130 or 143).

`run_command(body)` runs a command with SIGINT and SIGTERM turned into `Interrupted`, a
`KeyboardInterrupt`, so every `finally` and context manager on the way out runs: atomic writes remove
their temporary file, benchmark workers are waited for. Only the first signal raises; later ones are
ignored so that this cleanup is not itself cut short. A signal that arrives while XLA runs a host
callback can surface as a JAX runtime error instead; the recorded signal still decides the exit. One that
arrives inside a context where Python swallows exceptions (a garbage-collector callback such as JAX's, a
`__del__`) is delivered again a moment later, outside it, instead of being printed and lost.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from spec_jax.errors import SpecJaxError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []
# An `Interrupted` that Python swallowed (raised in a gc callback or a finalizer) and that must be raised again.
_swallowed = threading.Event()
_in_hook = threading.Event()


def _raise_once(signum, frame):
    if not _received:
        _received.append(signum)
        raise Interrupted(signum)
    if _swallowed.is_set() and not _in_hook.is_set():
        _swallowed.clear()
        raise Interrupted(_received[0])


def _redeliver_swallowed(unraisable, default_hook) -> None:
    """`sys.unraisablehook` while a command runs: an `Interrupted` that Python could not raise is raised again
    at the main thread's next ordinary step, woken by the same signal sent from another thread until it is
    raised; anything else goes to the default hook."""
    if not isinstance(unraisable.exc_value, Interrupted):
        default_hook(unraisable)
        return
    _in_hook.set()
    try:
        if not _swallowed.is_set():
            _swallowed.set()
            threading.Thread(target=_wake, args=(unraisable.exc_value.signum,), daemon=True).start()
    finally:
        _in_hook.clear()


def _wake(signum: int) -> None:
    while _swallowed.is_set():
        os.kill(os.getpid(), signum)
        time.sleep(0.05)


def interrupted() -> int | None:
    """The signal that interrupted this process, if any."""
    return _received[0] if _received else None


def run_command(body: Callable[[], int], prog: str = "spec-jax", quiet: bool = False) -> int:
    """`body()`'s exit status; a `SpecJaxError` prints `prog: error: ...` and gives 2, SIGINT/SIGTERM print
    `prog: interrupted ...` and give 128 + the signal number (`quiet`: no line, for worker processes whose
    parent reports)."""
    _received.clear()
    _swallowed.clear()
    # A signal set to be ignored stays ignored (a job started in the background by a non-interactive shell).
    previous = {s: signal.signal(s, _raise_once) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _redeliver_swallowed(unraisable, previous_hook)
    try:
        return body()
    except SpecJaxError as e:
        if interrupted() is None:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        return _stopped(prog, quiet)
    except SystemExit:  # argparse: the usage error is printed already
        if interrupted() is not None:
            return _stopped(prog, quiet)
        raise
    except BaseException:
        if interrupted() is None:
            raise
        return _stopped(prog, quiet)
    finally:
        _swallowed.clear()  # stops a waking thread
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stopped(prog: str, quiet: bool) -> int:
    signum = interrupted()
    if not quiet:
        try:
            sys.stdout.flush()
        except OSError:  # stdout was a pipe that is gone
            pass
        print(f"{prog}: interrupted by {signal.Signals(signum).name}; the files already written are complete",
              file=sys.stderr)
    return 128 + signum
