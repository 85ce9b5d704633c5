"""Staging directories beside DST, and removing the ones an interrupted run left behind.

graphfold writes DST as a hidden directory ``.DST.graphfold-<host>-<pid>-XXXX`` beside it and
renames it into place at the end. Its name records the host and the process that owns it. A run
killed before it could clean up (SIGKILL, a power cut) leaves one behind: the next run removes
every such directory of this host whose process is no longer running. Directories of other hosts
(a shared filesystem) and of live processes are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket

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
    pattern = (re.escape(f".{os.path.basename(dst)}{MARK}") +
               r"(?:old-)?([A-Za-z0-9]+)-(\d+)-[^/]+$")
    match = re.match(pattern, name)
    return (match.group(1), int(match.group(2))) if match else None


def is_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, another user's
        return True
    except OverflowError:
        return False
    return True


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
        if found is None or found[0] != host() or is_running(found[1]):
            continue
        path = os.path.join(parent, name)
        if f"{MARK}old-" in name and not os.path.lexists(dst):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    return removed
