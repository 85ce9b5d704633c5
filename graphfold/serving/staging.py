"""Staging directories beside DST, and removing the ones an interrupted run left behind.

graphfold writes DST as a hidden directory ``.DST.graphfold-<host>-<pid>-XXXX`` beside it and
renames it into place at the end. Its name records the host and the process that owns it. A run
killed before it could clean up (SIGKILL, a power cut) leaves one behind: the next run removes
every such directory of this host whose process is no longer running (or whose pid now belongs to
a process started after the directory was made). Directories of other hosts (a shared
filesystem) and of live runs are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from typing import Any

MARK = ".graphfold-"


def host() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def prefix(dst: str, kind: str = "") -> str:
    """The name prefix for a staging (``kind`` "") or backup (``kind`` "old") directory."""
    kind = f"{kind}-" if kind else ""
    return f".{os.path.basename(dst)}{MARK}{kind}{host()}-{os.getpid()}-"


def owner(name: str, dst: str) -> tuple[str, int] | None:
    """(host, pid) recorded in ``name`` if it is a staging or backup directory of ``dst``."""
    pattern = re.escape(f".{os.path.basename(dst)}{MARK}") + r"(?:old-)?([A-Za-z0-9]+)-(\d+)-[^/]+$"
    match = re.match(pattern, name)
    return (match.group(1), int(match.group(2))) if match else None


def is_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:
        return False
    return True


def started_after(pid: int, timestamp: float) -> bool:
    """Whether process ``pid`` started after ``timestamp`` (so it cannot own a directory made
    then: its pid was reused). False when that cannot be told (no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return boot + ticks / os.sysconf("SC_CLK_TCK") > timestamp + 1.0


def owned_by_a_live_run(pid: int, path: str) -> bool:
    try:
        made = os.stat(path).st_mtime
    except OSError:
        return False
    return is_running(pid) and not started_after(pid, made)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM held back meanwhile, for the renames that put DST in place (which
    must not be cut in half): one that comes is recorded, and handed to the handler that was
    installed before once the block is done, in this frame, so the caller knows the work in the
    block is complete. A no-op off the main thread (Python runs handlers only there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous: dict[int, Any] = {
        signum: signal.signal(signum, lambda signum, frame: came.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set in C
        for number in dict.fromkeys(came):
            handler = previous[number]
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


def remove_stale(dst: str) -> list[str]:
    """Removes the staging directories beside ``dst`` that no running graphfold owns; returns
    their paths. A backup of an old DST is kept while DST itself is missing (it is the only copy).
    """
    parent = os.path.dirname(dst) or "."
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        found = owner(name, dst)
        path = os.path.join(parent, name)
        if found is None or found[0] != host() or owned_by_a_live_run(found[1], path):
            continue
        if f"{MARK}old-" in name and not os.path.lexists(dst):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    return removed
