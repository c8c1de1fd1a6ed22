"""A local service as a process group: start it detached, know whether it is ours and healthy, stop all of it.

Each service writes its log to `<state>/logs/<name>.log` and a pid file `<state>/pids/<name>.json` that records the
process-group leader, the command and the ports. A later command (`status`, a second `up`, `down`) finds the service
again through that file, so `up` can leave a healthy service alone and `down` can stop one started by another
process. A service is started with `start_new_session=True`: it leads its own session and process group, so `stop`
reaches every child (vLLM's `VLLM::Worker` engine processes included, orphaned or not) without touching anything
else on the machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from cl_core.errors import ContinualError


class StackError(ContinualError, RuntimeError):
    """A local-stack operation failed; the message says which service and what to do."""


class ServiceStartError(StackError):
    """A service did not become healthy. Names the service, its log file and the tail of that log."""

    def __init__(self, service: str, reason: str, log_path: Path | None, log_tail: str = "") -> None:
        self.service, self.reason, self.log_path, self.log_tail = service, reason, log_path, log_tail
        where = f"\n  log: {log_path}" if log_path else ""
        tail = "\n  last log lines:\n" + "\n".join("    " + line for line in log_tail.splitlines()) if log_tail else ""
        super().__init__(f"service {service!r} failed to start: {reason}{where}{tail}")


class PortInUseError(StackError):
    """A port the stack needs is taken by something that is not our healthy service."""

    def __init__(self, service: str, port: int, env_var: str | None) -> None:
        self.service, self.port, self.env_var = service, port, env_var
        fix = f"set {env_var} to a free port (or pass the matching --flag)" if env_var else "choose another port"
        super().__init__(f"service {service!r}: port {port} on 127.0.0.1 is already in use by another process; "
                         f"stop that process or {fix}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port. SO_REUSEADDR ignores TIME_WAIT leftovers of a stopped server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(exclude: Iterable[int] = ()) -> int:
    """A currently free loopback port chosen by the kernel (for tests and throwaway stacks)."""
    taken = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port
    raise StackError("could not find a free loopback port")


def free_port_block(size: int, low: int = 20000, high: int = 50000) -> int:
    """The first port of `size` consecutive free ports (SeaweedFS needs several, with fixed offsets)."""
    import random

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - size)
        if all(port_is_free(base + i) for i in range(size)):
            return base
    raise StackError(f"could not find {size} consecutive free loopback ports in {low}-{high}")


def executable(name: str) -> str:
    """The console script `name` from this interpreter's environment (the venv), else from PATH."""
    import shutil

    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"executable {name!r} not found next to {sys.executable} nor on PATH; install the "
                         "pipeline extra: pip install -e '.[pipeline]'")
    return found


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None when there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, session id) of a process, or None when it does not exist."""
    fields = _proc_stat(pid)
    return (fields[0], int(fields[3])) if fields else None


def proc_start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, identifies one process for good."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Every live process in session `sid`: the leader's children, grandchildren and orphans alike."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _proc_state(int(entry.name))
            if state is not None and state[1] == sid and state[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


@dataclass
class PidRecord:
    """What a pid file holds: enough to recognise our process after a restart of the CLI."""

    pid: int
    command: list[str]
    ports: list[int]
    started: float
    start_ticks: int | None

    @classmethod
    def read(cls, path: Path) -> PidRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(pid=int(data["pid"]), command=list(data["command"]), ports=list(data["ports"]),
                       started=float(data["started"]), start_ticks=data.get("start_ticks"))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(path)


class Service:
    """A server process the stack owns. Subclasses give the command, the environment and the health check.

    `name` is the short service name (`s3`, `mlflow`, ...); `state_dir` holds logs, pid files and data;
    `start_timeout` bounds the wait for health; `port_env` names the setting that moves the main port, used in
    the error when that port is taken.
    """

    name: str = "service"
    port_env: str | None = None
    start_timeout: float = 60.0
    stop_grace: float = 10.0

    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.cwd = self.state_dir
        # Tests set this: the server gets SIGTERM when the thread that started it exits, so a killed pytest
        # leaves no servers behind. The stack CLI leaves it off: its servers must outlive `up`.
        self.die_with_parent = False
        self._proc: subprocess.Popen | None = None

    # --- what subclasses define -------------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Variables added to this process's environment for the server."""
        return {}

    def ports(self) -> list[int]:
        """All ports the server listens on (checked free before a start)."""
        return [self.port]

    def healthy(self) -> bool:
        """One quick health probe; never raises."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work before the process starts (directories, config files)."""

    def after_healthy(self) -> None:
        """Work once the server answers (buckets, work pools)."""

    def port_setting(self, port: int) -> str | None:
        """The setting that moves `port` (named in the error when that port is taken)."""
        return self.port_env if port == self.port else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- files ----------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "pids" / f"{self.name}.json"

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- lifecycle --------------------------------------------------------------------------------------
    def record(self) -> PidRecord | None:
        return PidRecord.read(self.pid_path)

    def pid(self) -> int | None:
        """The leader pid when our recorded process is alive, else None (a stale pid file is ignored)."""
        rec = self.record()
        if rec is None:
            return None
        if self._proc is not None and self._proc.pid == rec.pid:
            self._proc.poll()
        if not pid_alive(rec.pid):
            return None
        # pid reuse guard: the live process must be the one we started, not a later one with the same pid
        if rec.start_ticks is not None and proc_start_ticks(rec.pid) != rec.start_ticks:
            return None
        return rec.pid

    def running(self) -> bool:
        return self.pid() is not None

    def is_up(self) -> bool:
        """Our process is alive and answers its health check."""
        return self.running() and self.healthy()

    def start(self) -> None:
        """Start the server detached (its own session) unless ours is already running; does not wait."""
        if self.running():
            return
        for port in self.ports():
            if not port_is_free(port):
                raise PortInUseError(self.name, port, self.port_setting(port))
        self.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        env = {**os.environ, **self.environment()}
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=env, cwd=self.cwd, start_new_session=True,
                                              preexec_fn=_term_with_parent(os.getpid()) if self.die_with_parent
                                              else None)
            except OSError as exc:
                raise ServiceStartError(self.name, f"could not execute {cmd[0]}: {exc}", self.log_path) from exc
        PidRecord(pid=self._proc.pid, command=cmd, ports=self.ports(), started=time.time(),
                  start_ticks=proc_start_ticks(self._proc.pid)).write(self.pid_path)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Block until the health check passes; a dead process or a timeout raises ServiceStartError."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        while True:
            if not self.running():
                rec = self.record()
                code = self._proc.poll() if self._proc is not None else None
                why = f"process exited (code {code})" if code is not None else "process is not running"
                raise ServiceStartError(self.name, f"{why} before it became healthy" +
                                        (f" (pid {rec.pid})" if rec else ""), self.log_path, self.log_tail())
            if self.healthy():
                self.after_healthy()
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ServiceStartError(self.name, f"not healthy at {self.url} after "
                                        f"{timeout or self.start_timeout:.0f} s (stopped it)", self.log_path, tail)
            time.sleep(0.5)

    def stop(self, grace: float | None = None) -> bool:
        """SIGTERM the whole session, SIGKILL what is left after `grace` s; True when something was running."""
        rec = self.record()
        was_running = False
        if rec is not None and pid_alive(rec.pid) and rec.start_ticks not in (None, proc_start_ticks(rec.pid)):
            rec = None  # the recorded pid now belongs to another process: nothing of ours is left to stop
        if rec is not None:
            members = session_members(rec.pid)
            was_running = bool(members)
            _signal_all(rec.pid, members, signal.SIGTERM)
            deadline = time.monotonic() + (self.stop_grace if grace is None else grace)
            while time.monotonic() < deadline:
                if self._proc is not None:
                    self._proc.poll()
                if not session_members(rec.pid):
                    break
                time.sleep(0.2)
            leftover = session_members(rec.pid)
            if leftover:
                _signal_all(rec.pid, leftover, signal.SIGKILL)
                for _ in range(50):
                    if self._proc is not None:
                        self._proc.poll()
                    if not session_members(rec.pid):
                        break
                    time.sleep(0.1)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1)
            self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        return was_running

    def status(self) -> str:
        """`healthy`, `unhealthy` (ours, running, not answering) or `stopped`."""
        if not self.running():
            return "stopped"
        return "healthy" if self.healthy() else "unhealthy"


def _term_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: ask Linux to SIGTERM the child when its parent goes (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def _signal_all(sid: int, members: Sequence[int], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in members:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.EPERM):
                raise


def http_ok(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> bool:
    """GET url answers 2xx; connection errors and timeouts are False."""
    try:
        return httpx.get(url, timeout=timeout, headers=headers).is_success
    except httpx.HTTPError:
        return False
