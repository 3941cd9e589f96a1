"""One process per stage and run directory: ``RUN/.{stage}.lock``, held with ``fcntl.flock``.

A stage (capture, select, eval, report) takes its lock before it touches the run and
keeps the file open until it ends. The kernel drops a ``flock`` when its holder exits, by
any means (``kill -9`` included), so a killed holder never blocks the next run: its lock
file is simply taken over. While a holder lives, a second process on the same stage is
refused in one line naming the holder (pid, host, since when, as written into the file).

Several processes of one launch (torchrun / ``accelerate launch``) share one lock: rank 0
takes it and tells every rank the outcome (a broadcast on the launch's process group), so
either the whole group runs or the whole group stops with the same line; the ranks then
write their own shards as before.

The lock file is removed on release (after checking, on acquisition, that the path still
names the file that was locked, so a file unlinked under a waiting process is never held).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

STAGES = ("capture", "select", "eval", "report")


class RunLocked(RuntimeError):
    """Another live process holds this stage of the run directory."""


def lock_path(root: str | Path, stage: str) -> Path:
    return Path(root) / f".{stage}.lock"


def _holder_text(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}"


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


class StageLock:
    """``flock`` on ``RUN/.{stage}.lock``; :meth:`acquire` returns None or the refusal line."""

    def __init__(self, root: str | Path, stage: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        self.root, self.stage = Path(root), stage
        self.path = lock_path(root, stage)
        self.fd: int | None = None
        self.previous: dict = {}  # what the file said before we took it (a killed holder's details)

    def acquire(self) -> str | None:
        import fcntl

        for _ in range(20):  # retried only while another process removes the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                return (f"{self.root} is in use by another `fastv-analyze {self.stage}` ({_holder_text(holder)}); "
                        f"wait for it to finish or stop it (a killed one releases {self.path.name} by itself)")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock
                os.close(fd)
                continue
            self.previous = _read_holder(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "stage": self.stage}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self.fd = fd
            return None
        raise RuntimeError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can be holding the removed file
        finally:
            os.close(self.fd)
            self.fd = None


def _share_outcome(refusal: str | None, state) -> str | None:
    """Rank 0's outcome, on every rank of the launch's process group."""
    if state is None:
        return refusal
    import torch.distributed as dist

    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def stage_lock(root: str | Path, stage: str, state=None):
    """Hold ``stage`` of the run directory ``root`` for the ``with`` block, or raise
    :class:`RunLocked` (one line). ``state``: accelerate's ``PartialState`` of a launch with
    several processes (rank 0 locks for all), else None. Capture may create ``root``; the
    lock removes it again on exit if the stage left nothing in it."""
    root = Path(root)
    if stage != "capture" and not root.is_dir():
        yield None  # nothing to guard: the stage itself says that RUN is not a run directory
        return
    rank0 = state is None or state.process_index == 0
    created = not root.exists()
    lock = StageLock(root, stage)
    refusal = None
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        refusal = lock.acquire()
    refusal = _share_outcome(refusal, state)
    if refusal:
        raise RunLocked(refusal)
    try:
        yield lock
    finally:
        lock.release()
        if rank0 and created and root.exists() and not any(root.iterdir()):
            root.rmdir()


@contextmanager
def run_lock(root: str | Path, stage: str, device: str = "auto"):
    """:func:`stage_lock` for a stage command: under torchrun / ``accelerate launch`` (capture
    and eval) the launch's ranks share it through their process group."""
    state = None
    if stage in ("capture", "eval") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import process_group

        _, _, state = process_group(device)
    with stage_lock(root, stage, state) as lock:
        yield lock
