"""Start, watch and reliably stop the real Flower processes of a deployment test.

Flower's SuperLink and SuperNode start their helpers (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) in NEW sessions, so killing a process group does not reach them; and in a
container whose PID 1 does not reap orphans, their "is my parent alive" check can miss a dead
parent. So every descendant is recorded while the test runs (a /proc walk twice a second) and
each one is killed by PID at the end, checked by its start time against PID reuse.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of ``pid`` from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0], int(rest[19])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    return children


def is_running(pid: int, start_time: int) -> bool:
    """True while the process ``pid`` (the one started at ``start_time``) is not dead."""
    st = _stat(pid)
    return st is not None and st[2] == start_time and st[1] not in ("Z", "X")


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Managed:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # Expected to exit (a refused SuperNode) or stopped on purpose: not a failure.
    may_exit: bool = False

    def tail(self, n: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n{text[-n:]}"


@dataclass
class ProcessTracker:
    """Every process started through it, and every process those start, stopped at the end."""

    log_dir: Path
    env: dict[str, str]
    cwd: Path
    procs: list[Managed] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(
        self, name: str, argv: list[str], *, may_exit: bool = False, **kwargs: Any
    ) -> Managed:
        """Start ``argv`` in its own session, its output in ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=kwargs.pop("env", self.env),
                cwd=kwargs.pop("cwd", self.cwd),
                **kwargs,
            )
        m = Managed(name, popen, log, may_exit)
        with self._lock:
            self.procs.append(m)
        self._record()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return m

    def _record(self) -> None:
        children = _children_map()
        with self._lock:
            todo = [m.popen.pid for m in self.procs]
        while todo:
            pid = todo.pop()
            st = _stat(pid)
            if st is None:
                continue
            with self._lock:
                self.seen.setdefault(pid, st[2])
            todo.extend(children.get(pid, []))

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._record()

    def alive(self) -> list[int]:
        with self._lock:
            items = list(self.seen.items())
        return [pid for pid, start in items if is_running(pid, start)]

    def stop(self, m: Managed, *, timeout: float = 15.0) -> int | None:
        """SIGTERM one process (its group), SIGKILL after ``timeout``; its exit code."""
        self._record()
        m.may_exit = True
        if m.popen.poll() is None:
            _signal_group(m.popen.pid, signal.SIGTERM)
            try:
                m.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(m.popen.pid, signal.SIGKILL)
                m.popen.wait(timeout=10)
        return m.popen.returncode

    def stop_all(self, *, timeout: float = 15.0) -> list[int]:
        """Stop every process, then kill any descendant still alive. Returns the survivors."""
        self._record()
        for m in reversed(self.procs):
            self.stop(m, timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)  # helpers exit on their own once their parent is gone
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._stop.set()
        return self.alive()

    def running_named(self, needle: str) -> set[int]:
        """PIDs of live processes started through this tracker whose command line has needle."""
        self._record()
        out = set()
        for pid in self.alive():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if needle.encode() in cmdline:
                out.add(pid)
        return out

    def check_running(self) -> None:
        """Fail at once, with its log, if a process that should serve has exited."""
        for m in self.procs:
            if m.popen.poll() is not None and not m.may_exit:
                raise AssertionError(f"{m.name} exited with {m.popen.returncode}\n{m.tail()}")

    def tails(self) -> str:
        return "\n".join(m.tail() for m in self.procs)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
