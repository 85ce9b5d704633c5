"""Functions for the worker-pool tests: importable by spawned workers, no TensorFlow."""

import os
import signal


def square_or_crash(item):
    """``item ** 2``; "exit" leaves with os._exit(3), "segv" dies of SIGSEGV, "raise" raises."""
    if item == "exit":
        os._exit(3)
    if item == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if item == "raise":
        raise ValueError("no square for you\nsecond line")
    return item**2, os.getpid()


def slow_square(item):
    """``item ** 2`` after 0.3 s."""
    import time

    time.sleep(0.3)
    return item**2
