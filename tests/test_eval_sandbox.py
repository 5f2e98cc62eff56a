"""The sandbox that runs generated programs: limits hold, and what it cannot enforce is skipped, not faked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from codecomplete.eval.sandbox import Limits, Sandbox, probe_isolation

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout_s=10.0, cpu_s=10, memory_bytes=512 << 20, max_processes=32))


def run_python(sandbox: Sandbox, source: str, **limits) -> object:
    custom = Limits(**{**sandbox.limits.__dict__, **limits})
    return sandbox.run([sys.executable, "-I", "main.py"], files={"main.py": textwrap.dedent(source)}, limits=custom)


def test_passing_program_exits_zero_and_keeps_stdout(sandbox):
    result = run_python(sandbox, "print('hello')")
    assert result.passed and result.stdout == "hello\n"


def test_failing_assertion_is_a_failure(sandbox):
    result = run_python(sandbox, "assert 1 == 2, 'nope'")
    assert not result.passed and "AssertionError" in result.stderr


def test_program_runs_in_its_temp_dir_with_home_and_tmp_inside(sandbox):
    result = run_python(sandbox, """
        import os, tempfile
        cwd = os.getcwd()
        assert os.environ["HOME"] == cwd and tempfile.gettempdir().startswith(cwd)
        open("scratch.txt", "w").write("ok")
        open(os.path.join(tempfile.gettempdir(), "t"), "w").write("ok")
    """)
    assert result.passed, result.stderr


def test_infinite_loop_is_killed_at_the_timeout(sandbox):
    start = time.monotonic()
    result = run_python(sandbox, "while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 8.0


def test_cpu_limit_kills_a_busy_program_before_the_wall_clock(sandbox):
    result = run_python(sandbox, "while True:\n    pass\n", cpu_s=1, timeout_s=20.0)
    assert not result.passed and not result.timed_out and result.wall_ms < 15000


def test_child_processes_die_with_the_program_even_after_setsid(sandbox):
    result = run_python(sandbox, """
        import os, subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        print(os.getuid(), flush=True)
        while True:
            pass
    """, timeout_s=1.5)
    assert result.timed_out
    iso = sandbox.isolation
    if not (iso.pid_namespace or iso.drop_uid):
        pytest.skip("neither a pid namespace nor a throw-away uid here: a setsid() child can escape")
    uid = int(result.stdout.split()[0])
    time.sleep(0.2)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) == uid]


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def test_fork_bomb_is_bounded_and_killed(sandbox):
    iso = probe_isolation()
    if iso.root and not iso.drop_uid:
        pytest.skip("root without a throw-away uid: RLIMIT_NPROC would not apply, not running a fork bomb")
    # Every process forks up to 6 times (so never more than 2**6 processes even if the limit
    # failed); with a limit of 16 some forks must be refused.
    result = run_python(sandbox, """
        import os, time
        refused = forks = 0
        while forks < 6:
            forks += 1
            try:
                os.fork()
            except OSError:
                refused += 1
        if refused:
            print("refused", flush=True)
        time.sleep(30)
    """, max_processes=16, timeout_s=3.0)
    assert result.timed_out
    assert "refused" in result.stdout  # the limit, not the timeout, stopped the growth


def test_memory_exhaustion_fails_inside_the_limit(sandbox):
    result = run_python(sandbox, "block = bytearray(2 << 30)\nprint('allocated')", memory_bytes=256 << 20)
    assert not result.passed and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_writes_outside_the_temp_dir_fail(sandbox, tmp_path):
    if not (sandbox.isolation.landlock_abi or sandbox.isolation.drop_uid):
        pytest.skip("neither Landlock nor a throw-away uid: writes cannot be confined here")
    target = tmp_path / "outside.txt"
    result = run_python(sandbox, f"open({str(target)!r}, 'w').write('escaped')")
    assert not result.passed and "PermissionError" in result.stderr
    assert not target.exists()


def test_writes_to_world_writable_dirs_fail_under_landlock(sandbox, tmp_path):
    if not sandbox.isolation.landlock_abi:
        pytest.skip("no Landlock: a world-writable directory stays writable")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(shared, 0o1777)
    result = run_python(sandbox, f"open({str(shared / 'x')!r}, 'w').write('escaped')")
    assert not result.passed and "PermissionError" in result.stderr
    assert not (shared / "x").exists()


def test_network_is_unreachable(sandbox):
    iso = sandbox.isolation
    if not (iso.net_namespace or iso.landlock_abi >= 4):
        pytest.skip("no network namespace and no Landlock TCP rules here")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        result = run_python(sandbox, f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
            print("connected")
        """)
    assert not result.passed and "connected" not in result.stdout


def test_isolation_summary_names_every_guarantee():
    described = probe_isolation().describe()
    assert {"process_limit", "network", "writes", "reads", "memory", "cpu"} <= set(described)


def _pids_with_token(token: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_a_killed_harness_leaves_no_program_behind(tmp_path):
    token = f"sandbox-orphan-probe-{os.getpid()}-{time.monotonic_ns()}"
    harness = textwrap.dedent(f"""
        import sys
        from codecomplete.eval.sandbox import Limits, Sandbox
        token = {token[:8]!r} + {token[8:]!r}  # split: this harness's own command line must not match
        Sandbox(Limits(timeout_s=60)).run([sys.executable, "-c", "import time; time.sleep(60)", token])
    """)
    proc = subprocess.Popen([sys.executable, "-c", harness])
    try:
        deadline = time.monotonic() + 20
        while not _pids_with_token(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pids_with_token(token), "the program never started"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while _pids_with_token(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pids_with_token(token)
