"""Child processes of the stack: starting them (as another user, when we are root), waiting on
conditions, stopping them; and what that other user can reach."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from parley.devstack.errors import DevstackError

__all__ = [
    "POLL_INTERVAL",
    "Process",
    "ProcessExited",
    "RunAs",
    "allows",
    "reachable_by",
    "stop_all",
    "switch_user_command",
    "temp_dir_candidates",
    "temp_dir_for",
    "unprivileged_user",
    "wait_until",
]

POLL_INTERVAL = 0.05

UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class RunAs:
    """A user (and its primary group) to run a child process as."""

    name: str
    uid: int
    gid: int


def unprivileged_user() -> RunAs | None:
    """The user to run servers as that refuse to run as root, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise DevstackError(
            f"running as root, but there is no {UNPRIVILEGED_USER!r} user to run Postgres as"
        ) from None
    return RunAs(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def switch_user_command(run_as: RunAs) -> list[str]:
    """A command prefix that runs the rest as `run_as` with no supplementary groups."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise DevstackError(
            f"running as root needs setpriv (util-linux) to start Postgres as {run_as.name!r}"
        )
    return [
        setpriv,
        f"--reuid={run_as.uid}",
        f"--regid={run_as.gid}",
        "--clear-groups",
        "--",
    ]


def _allows(info: os.stat_result, user: RunAs, bits: int) -> bool:
    """Whether the mode of `info` gives `user` all of `bits` (read 4, write 2, search 1), read
    from the owner's, the group's or everyone's part as the kernel picks it (we run processes
    as `user` with its primary group only)."""
    if info.st_uid == user.uid:
        shift = 6
    elif info.st_gid == user.gid:
        shift = 3
    else:
        shift = 0
    return (info.st_mode >> shift) & bits == bits


def allows(path: Path, user: RunAs, bits: int) -> bool:
    """Whether `path` (followed if a symlink) gives `user` all of `bits`; False if it is gone."""
    try:
        return _allows(path.stat(), user, bits)
    except OSError:
        return False


def reachable_by(path: Path, user: RunAs) -> bool:
    """Whether `user` may search every directory from / down to `path` (itself included), both
    along `path` as written and along its real path, by their modes."""
    written = Path(os.path.abspath(path))
    for way in {written, written.resolve()}:
        for directory in (*reversed(way.parents), way):
            if not allows(directory, user, stat.S_IXOTH):
                return False
    return True


def temp_dir_candidates() -> list[Path]:
    """The system temp dirs, in the order temp_dir_for tries them."""
    found: list[Path] = []
    for name in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        path = Path(name)
        if path not in found:
            found.append(path)
    return found


def temp_dir_for(run_as: RunAs | None, prefix: str) -> Path:
    """A fresh directory of ours in the system temp dir, which `run_as` (when given) may search
    but neither list nor write: mode 0711, in the first temp dir that `run_as` can reach."""
    if run_as is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    for parent in temp_dir_candidates():
        if parent.is_dir() and reachable_by(parent, run_as):
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            path.chmod(0o711)
            return path
    tried = ", ".join(str(p) for p in temp_dir_candidates())
    raise DevstackError(
        f"no temp dir that {run_as.name!r} can reach ({tried}); set TMPDIR to a directory "
        "every user may search"
    )


class ProcessExited(DevstackError):
    """A child process ended while the stack still needed it."""

    def __init__(self, process: Process) -> None:
        super().__init__(f"{process.name} exited with {process.describe_exit()}")
        self.process = process


class Process:
    """A named child process, started in its own process group.

    Its own group keeps a terminal's Ctrl-C away from it: the stack decides the order in which
    its children stop.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None = None,
        output: IO[bytes] | None = None,
        run_as: RunAs | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        command = self.argv if run_as is None else [*switch_user_command(run_as), *self.argv]
        try:
            # No user=/group= here: with them subprocess must fork() instead of vfork(), and a
            # fork() runs grpc's fork handlers, which can hang for good in a process with grpc
            # channels open (seen as a test run stuck in fork() under EmbeddedPostgres.start).
            self._popen = subprocess.Popen(
                command,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                process_group=0,
            )
        except OSError as exc:
            raise DevstackError(f"cannot start {name} ({self.argv[0]}): {exc.strerror}") from None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def running(self) -> bool:
        return self._popen.poll() is None

    def describe_exit(self) -> str:
        code = self._popen.poll()
        if code is None:
            return "no exit yet"
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"code {code}"

    def send(self, signum: signal.Signals) -> None:
        if self.running():
            try:
                self._popen.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; True when it has."""
        try:
            self._popen.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(
        self,
        signum: signal.Signals = signal.SIGTERM,
        timeout: float = 15.0,
        escalate: Sequence[tuple[signal.Signals, float]] = (),
    ) -> None:
        """Send `signum` and wait; then each further (signal, timeout) step; then SIGKILL."""
        stop_all([self], signum, timeout, escalate)


def stop_all(
    processes: Iterable[Process],
    signum: signal.Signals = signal.SIGTERM,
    timeout: float = 15.0,
    escalate: Sequence[tuple[signal.Signals, float]] = (),
) -> None:
    """Stop several processes at once, sharing each step's deadline; SIGKILL whatever remains."""
    remaining = [p for p in processes if p.running()]
    for step_signal, step_timeout in ((signum, timeout), *escalate, (signal.SIGKILL, 10.0)):
        for process in remaining:
            process.send(step_signal)
        deadline = time.monotonic() + step_timeout
        remaining = [p for p in remaining if not p.wait(deadline - time.monotonic())]
        if not remaining:
            return


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    watch: Iterable[Process] = (),
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll `condition` every `interval` seconds until it holds; fail when `timeout` passes or
    a watched process ends."""
    watched = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        for process in watched:
            if not process.running():
                raise ProcessExited(process)
        if condition():
            return
        if time.monotonic() >= deadline:
            raise DevstackError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
