"""One job per run: a lock file in the `save` folder, taken by deepy.py before anything is launched or written.

A second job started on the same `save` (a SLURM requeue while the old job still runs, a copy-pasted command)
would write the same checkpoint tags, interleave metrics.jsonl and delete folders the first is writing. The lock
`save/.run.lock` names its owner (host, pid, job id, start time) and carries a heartbeat that the owner refreshes
while it runs.

Shared file systems: the lock is created with O_CREAT|O_EXCL, which is atomic on local file systems and on NFS v3+
(and Lustre/GPFS), not with flock(), which some NFS setups do not propagate between hosts. Whether a lock is
stale is decided from its content: on the owner's own host, by asking whether the pid is alive; from another
host, by the heartbeat's age (`run_lock_stale_seconds`). A stale lock is taken over with a warning, by renaming
it aside first (rename is atomic: of two jobs taking over at once, one wins).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".run.lock"
HEARTBEAT_SECONDS = 10.0


class RunLocked(RuntimeError):
    """Another live job holds the run's lock."""


def _job_id() -> Optional[str]:
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def describe(owner: dict) -> str:
    age = time.time() - float(owner.get("heartbeat", 0))
    job = f", job {owner['job_id']}" if owner.get("job_id") else ""
    return (f"host {owner.get('host')}, pid {owner.get('pid')}{job}, started {owner.get('started_at')}, "
            f"heartbeat {age:.0f}s ago")


class RunLock:
    def __init__(self, save_dir: str | Path, stale_seconds: float = 300.0,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.path = Path(save_dir) / LOCK_NAME
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": _job_id(),
                      "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.took_over: Optional[dict] = None

    # ------------------------------------------------------------------ state of an existing lock
    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            # Being written this instant (create, then write), or torn: judge it by the file's age.
            try:
                return {"host": None, "pid": None, "heartbeat": self.path.stat().st_mtime}
            except FileNotFoundError:
                return None

    def is_stale(self, owner: dict) -> bool:
        if owner.get("host") == self.owner["host"] and owner.get("pid"):
            return not _pid_alive(int(owner["pid"]))
        return time.time() - float(owner.get("heartbeat", 0)) > self.stale_seconds

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        """Take the lock, or raise RunLocked naming the live owner. A stale lock is taken over (`took_over`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.read()
                if owner is None:
                    continue  # released meanwhile: try again
                if not self.is_stale(owner):
                    raise RunLocked(owner)
                aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)  # of two jobs taking over at once, one rename wins
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                self.took_over = owner
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunLocked(self.read() or {})

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            current = self.read()
            if not current or current.get("pid") != self.owner["pid"] or current.get("host") != self.owner["host"]:
                return  # taken over (we were judged stale): never write over the new owner's lock
            self.owner["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{LOCK_NAME}.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(self.owner))
                os.replace(tmp, self.path)
            except OSError:
                pass  # a full or flaky file system: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        current = self.read()
        if current and current.get("pid") == self.owner["pid"] and current.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)
