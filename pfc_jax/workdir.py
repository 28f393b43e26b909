"""One run per workdir: a lock file per process, with stale-lock takeover.

A training process holds ``<workdir>/.lock.<process index>`` for its whole life. The file
is created exclusively (``O_CREAT | O_EXCL``, atomic on local and network file systems)
and names its holder: host, PID, the process's start time and when it took the lock.
A second run finds the file and stops at once (:class:`WorkdirInUse`, exit 2), naming
the holder and how to clear a stale lock.

A lock left by a killed process is stale. On the holder's own host that is certain: the
PID is gone, or it now belongs to a process that started at another time. The stale file
is then renamed to a unique name (only one of several contenders can win that rename)
and removed, and the lock is taken as usual. A lock held from another host cannot be
checked from here; the message says how to remove it by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket

from pfc_jax.errors import InputError


class WorkdirInUse(InputError):
    """Another process holds the workdir's lock."""


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder recorded in a lock file on this host still runs."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = holder.get("start_time")
    return started is None or _start_time(pid) in (None, started)


class WorkdirLock:
    """``with WorkdirLock(workdir, process_index):`` — see the module docstring."""

    def __init__(self, workdir: str | pathlib.Path, process_index: int = 0):
        self.path = pathlib.Path(workdir) / f".lock.{process_index}"
        self._held = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _holder(self) -> tuple[str, dict] | None:
        """(text, record) of the lock file; None once released; {} when unreadable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return "", {}
        try:
            return text, json.loads(text)
        except ValueError:
            return text, {}  # being written, or damaged: treated as held

    def _take_over(self, stale_text: str) -> None:
        """Removes a stale lock file whose content is ``stale_text``."""
        # Moved aside under a name of our own first: of several processes taking over at
        # once exactly one succeeds. If what we moved is not what we judged stale (another
        # process took over in between), it is put back.
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != stale_text:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> WorkdirLock:
        for _ in range(3):  # a contender may release or take over between our steps
            if self._create():
                self._held = True
                return self
            found = self._holder()
            if found is None:
                continue
            text, holder = found
            if holder and holder.get("host") == socket.gethostname() and not _alive(holder):
                self._take_over(text)
                continue
            break
        _, holder = self._holder() or ("", {})
        who = (
            f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, since {holder.get('since', '?')}"
            if holder
            else "a process whose lock file cannot be read"
        )
        raise WorkdirInUse(
            f"{self.path.parent} is in use by another run ({who}; lock {self.path}) "
            f"(wait for it to finish, use another --workdir, or, if that run is gone and on another host, "
            f"delete {self.path})"
        )

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
