"""Run untrusted programs (model output plus tests): one subprocess each, limited and isolated.

Every run gets a fresh temporary working directory (also HOME and TMPDIR), a scrubbed
environment, a wall-clock timeout that SIGKILLs the whole process group, and rlimits on
CPU time, address space (RLIMIT_AS), file size, open files and processes. On top of that,
whatever the OS allows (probed once, see `probe_isolation`):

- running as root: the program runs under a throw-away uid (never 0, so RLIMIT_NPROC
  applies and DAC protects other users' files); when the interpreter is only reachable
  through a private home directory it keeps CAP_DAC_READ_SEARCH (reads stay open).
- not root: RLIMIT_NPROC is set to this uid's current thread count plus the limit,
  which bounds a fork bomb but is shared with the user's other processes.
- PID namespace (root, or an unprivileged user namespace): killing the launcher kills
  every process the program started, even ones that called setsid().
- network namespace: the program sees only a loopback device that is down.
- Landlock (Linux >= 5.13): writes are allowed only beneath the working directory
  (and /dev/null); ABI >= 4 also denies TCP bind/connect, ABI >= 6 scopes signals and
  abstract unix sockets to the sandbox.

Not enforced: reads (any file the uid can read, or every file with the kept capability),
UDP without a network namespace, memory as resident size (RLIMIT_AS counts address
space; runtimes such as the JVM need their reservations sized to fit), and anything on a
kernel without these features (`Isolation.describe()` says what was in force).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from codecomplete.eval import _jail

JAIL_PATH = str(Path(_jail.__file__).resolve())
SANDBOX_UID_BASE = 200_000  # throw-away uids: base + per-process block + slot
SANDBOX_SLOTS = 32
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program."""

    timeout_s: float = 10.0  # wall clock, whole process group killed after it
    cpu_s: int = 10  # RLIMIT_CPU per process
    memory_bytes: int | None = 1 << 30  # RLIMIT_AS; None: unlimited (not recommended)
    max_processes: int = 64  # RLIMIT_NPROC: processes *and threads* of the sandbox uid
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: any file written, stdout/stderr included
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 64 << 10  # stdout/stderr kept in the result (each)


@dataclass
class RunResult:
    """What happened to one program."""

    returncode: int | None  # exit status; 128+N when killed by signal N inside the sandbox
    timed_out: bool
    stdout: str
    stderr: str
    wall_ms: float
    sandbox_error: str = ""  # the sandbox itself could not be set up (not the program's fault)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.sandbox_error


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can enforce on this machine (see the module docstring)."""

    root: bool = False
    drop_uid: bool = False  # run as a throw-away uid
    read_all: bool = False  # that uid keeps CAP_DAC_READ_SEARCH
    user_namespace: bool = False  # needed for the namespaces below when not root
    pid_namespace: bool = False
    net_namespace: bool = False
    landlock_abi: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def process_limit(self) -> str:
        if self.drop_uid:
            return "RLIMIT_NPROC on a throw-away uid"
        return "RLIMIT_NPROC relative to this user's thread count (shared)" if not self.root else "none (root is exempt)"

    def describe(self) -> dict[str, str]:
        """One line per guarantee, for reports and `settings`."""
        return {
            "process_limit": self.process_limit,
            "kill_all_descendants": "pid namespace" if self.pid_namespace else "process group only (setsid escapes)",
            "network": "none (own network namespace)" if self.net_namespace
            else ("TCP denied (Landlock)" if self.landlock_abi >= 4 else "not isolated"),
            "writes": ("only the temp dir (Landlock)" if self.landlock_abi >= 1 else
                       ("file permissions of a throw-away uid" if self.drop_uid else "not restricted")),
            "reads": "not restricted" if (self.read_all or not self.drop_uid) else "file permissions of a throw-away uid",
            "memory": "RLIMIT_AS",
            "cpu": "RLIMIT_CPU + wall-clock timeout",
        }


class _UidPool:
    """Throw-away uids, one per concurrent run, disjoint between processes on this machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free = list(range(SANDBOX_SLOTS))
        self._base = SANDBOX_UID_BASE + (os.getpid() % 100_000) * SANDBOX_SLOTS

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"more than {SANDBOX_SLOTS} concurrent sandboxed runs")
            return self._base + self._free.pop()

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid - self._base)


_uids = _UidPool()


def _launch(plan: dict, stdout, stderr, stdin, timeout_s: float) -> tuple[int | None, bool, float]:
    """Start the launcher in its own session; kill its process group on timeout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", JAIL_PATH, json.dumps(plan)],
        stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True, close_fds=True,
        env={"PATH": plan["env"].get("PATH", DEFAULT_PATH)},
    )
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc.pid)
    proc.wait()
    return proc.returncode, timed_out, (time.perf_counter() - start) * 1000.0


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is uid (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _kill_uid(uid: int, wait_s: float = 2.0) -> None:
    """Kill what is left of a throw-away uid (processes that escaped the process group)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = _pids_of_uid(uid)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _thread_count_of_uid(uid: int) -> int:
    """Threads belonging to uid now, i.e. what RLIMIT_NPROC counts."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


class Sandbox:
    """Runs programs with `Limits` under the strongest `Isolation` the machine allows."""

    def __init__(self, limits: Limits | None = None, isolation: Isolation | None = None, base_dir: str | None = None):
        self.limits = limits or Limits()
        self.isolation = isolation if isolation is not None else probe_isolation()
        self.base_dir = base_dir

    def run(
        self,
        argv: Sequence[str],
        files: Mapping[str, str | bytes] | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        limits: Limits | None = None,
    ) -> RunResult:
        """Write files into a fresh temp dir, run argv there, return what happened."""
        limits = limits or self.limits
        run_root = Path(tempfile.mkdtemp(prefix="cc-sandbox-", dir=self.base_dir))
        uid = _uids.acquire() if self.isolation.drop_uid else None
        try:
            os.chmod(run_root, 0o711)  # the sandbox uid may pass through, not list
            work = run_root / "work"
            work.mkdir()
            (work / ".tmp").mkdir()
            for name, content in (files or {}).items():
                path = work / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content.encode() if isinstance(content, str) else content)
            if uid is not None:
                _chown_tree(work, uid)
            (run_root / "stdin").write_bytes(stdin or b"")
            plan = self._plan(argv, work, env, limits, uid)
            with open(run_root / "stdin", "rb") as fin, open(run_root / "stdout", "wb") as fout, open(run_root / "stderr", "wb") as ferr:
                returncode, timed_out, wall_ms = _launch(plan, fout, ferr, fin, limits.timeout_s)
            stdout = _read_capped(run_root / "stdout", limits.output_bytes)
            stderr = _read_capped(run_root / "stderr", limits.output_bytes)
            sandbox_error = ""
            if returncode == _jail.JAIL_ERROR_EXIT and stderr.startswith("sandbox: "):
                sandbox_error = stderr.strip()
            return RunResult(returncode, timed_out, stdout, stderr, wall_ms, sandbox_error)
        finally:
            if uid is not None:
                _kill_uid(uid)
                _uids.release(uid)
            shutil.rmtree(run_root, ignore_errors=True)

    def _plan(self, argv, work: Path, env, limits: Limits, uid: int | None) -> dict:
        iso = self.isolation
        tmp = str(work / ".tmp")
        full_env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": str(work), "TMPDIR": tmp, "TMP": tmp, "TEMP": tmp, "USER": "sandbox", "LOGNAME": "sandbox",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
        }
        full_env.update(env or {})
        rlimits = {
            "RLIMIT_CPU": int(limits.cpu_s), "RLIMIT_FSIZE": int(limits.file_size_bytes),
            "RLIMIT_NOFILE": int(limits.open_files), "RLIMIT_CORE": 0,
        }
        if limits.memory_bytes is not None:
            rlimits["RLIMIT_AS"] = int(limits.memory_bytes)
        if uid is not None:
            rlimits["RLIMIT_NPROC"] = int(limits.max_processes)
        elif not iso.root:
            rlimits["RLIMIT_NPROC"] = _thread_count_of_uid(os.getuid()) + int(limits.max_processes)
        namespaces = []
        if iso.user_namespace and not iso.root and (iso.pid_namespace or iso.net_namespace):
            namespaces.append("user")
        if iso.net_namespace:
            namespaces.append("net")
        if iso.pid_namespace:
            namespaces.append("pid")
        landlock = None
        if iso.landlock_abi >= 1:
            landlock = {
                "write_dirs": [str(work)],
                "write_files": ["/dev/null"],
                "deny_tcp": True,
                "scope": True,
            }
        return {
            "argv": list(argv), "cwd": str(work), "env": full_env, "parent_pid": os.getpid(), "rlimits": rlimits,
            "namespaces": namespaces, "uid": uid, "gid": uid, "read_all": iso.read_all and uid is not None,
            "landlock": landlock,
        }


def _chown_tree(root: Path, uid: int) -> None:
    os.chown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


@functools.lru_cache(maxsize=1)
def probe_isolation() -> Isolation:
    """Try each isolation layer once with a trivial program; keep the ones that work."""
    root = os.geteuid() == 0
    notes: list[str] = []
    iso = Isolation(root=root, landlock_abi=_jail.landlock_abi())
    probe = Sandbox(Limits(timeout_s=20.0, cpu_s=20), isolation=iso)

    def works(candidate: Isolation) -> bool:
        probe.isolation = candidate
        result = probe.run([sys.executable, "-I", "-c", "pass"])
        return result.passed

    if iso.landlock_abi and not works(iso):
        notes.append("landlock present but unusable")
        iso = replace(iso, landlock_abi=0)
    if root:
        if works(replace(iso, drop_uid=True)):
            iso = replace(iso, drop_uid=True)
        elif works(replace(iso, drop_uid=True, read_all=True)):
            iso = replace(iso, drop_uid=True, read_all=True)
            notes.append("interpreter not reachable by an unprivileged uid: reads left open")
        else:
            notes.append("cannot drop root: no process limit")
    else:
        if works(replace(iso, user_namespace=True, net_namespace=True)):
            iso = replace(iso, user_namespace=True)
    for layer in ("net_namespace", "pid_namespace"):
        if works(replace(iso, **{layer: True})):
            iso = replace(iso, **{layer: True})
        else:
            notes.append(f"{layer} unavailable")
    return replace(iso, notes=tuple(notes))


def isolation_summary() -> dict:
    """The probed isolation as plain data (for `settings` in eval output)."""
    iso = probe_isolation()
    return {**iso.describe(), "landlock_abi": iso.landlock_abi, "notes": list(iso.notes), "flags": {
        k: v for k, v in asdict(iso).items() if isinstance(v, bool)}}
