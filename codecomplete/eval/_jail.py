"""Sandbox launcher: applies an isolation plan to itself, then execs the program.

Run as `python -I -S _jail.py PLAN_JSON`; standard library only, so it starts fast and
never imports the package. The parent (sandbox.py) decides the plan from what the OS
allows; every step the plan asks for must succeed, otherwise the launcher exits with
JAIL_ERROR_EXIT and says why on stderr (a sandbox that silently fails open is worse
than none).

Plan keys: argv, cwd, env, parent_pid, rlimits {name: value}, namespaces [user|net|pid],
uid, gid, read_all (keep CAP_DAC_READ_SEARCH after dropping root), landlock {write_dirs,
write_files, deny_tcp, scope} or null.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import struct
import sys

JAIL_ERROR_EXIT = 125
EXEC_ERROR_EXIT = 127

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = {"user": CLONE_NEWUSER, "pid": CLONE_NEWPID, "net": CLONE_NEWNET}

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Landlock: syscall numbers are shared by all architectures since Linux 5.13.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_WRITE_FILE = 1 << 1
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class JailError(Exception):
    """A step of the plan could not be applied."""


def _check(result: int, what: str) -> int:
    if result < 0:
        raise JailError(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    abi = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


def _landlock_write_rights(abi: int) -> int:
    rights = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG
              | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM)
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    return rights


def apply_landlock(spec: dict) -> None:
    """Allow writes only beneath spec['write_dirs'] (and to spec['write_files']); maybe deny TCP and scope."""
    abi = landlock_abi()
    if abi < 1:
        raise JailError("landlock: not available")
    write_rights = _landlock_write_rights(abi)
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if spec.get("deny_tcp") and abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if spec.get("scope") and abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", write_rights, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", write_rights, handled_net)
    else:
        attr = struct.pack("=Q", write_rights)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset_fd = _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock_create_ruleset")
    file_rights = write_rights & (FS_WRITE_FILE | FS_TRUNCATE)
    rules = [(path, write_rights) for path in spec.get("write_dirs", [])]
    rules += [(path, file_rights) for path in spec.get("write_files", [])]
    for path, rights in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr is packed
        rule_buf = ctypes.create_string_buffer(rule, len(rule))
        _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset_fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule_buf, ctypes.c_uint32(0)), f"landlock_add_rule({path})")
        os.close(fd)
    _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset_fd)


def _unshare(names: list[str]) -> None:
    flags = 0
    for name in names:
        flags |= NAMESPACE_FLAGS[name]
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({'+'.join(names)})")
    if "user" in names:  # map ourselves to ourselves so files keep their owners
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")


def _wait_and_relay(pid: int, reap_all: bool = False) -> None:
    """Wait for pid (reaping any other child on the way when reap_all) and exit as it did."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            done, status = os.waitpid(-1 if reap_all else pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(JAIL_ERROR_EXIT)
        if done == pid:
            break
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _enter_pid_namespace() -> None:
    """After unshare(CLONE_NEWPID): launcher (outside) -> reaper (PID 1) -> program (PID 2).

    The program is not PID 1, so it keeps ordinary signal semantics. The reaper dies with
    the launcher (PDEATHSIG), and when PID 1 dies the kernel kills the whole namespace:
    killing the launcher's process group therefore kills every process the program made,
    even those that left the group with setsid().
    """
    alive_r, alive_w = os.pipe()  # EOF on alive_r once the launcher is gone
    child = os.fork()
    if child:
        os.close(alive_r)
        _wait_and_relay(child)
    os.close(alive_w)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([alive_r], [], [], 0)[0]:  # the launcher died before PDEATHSIG was armed
        os._exit(JAIL_ERROR_EXIT)
    os.close(alive_r)
    program = os.fork()
    if program:
        _wait_and_relay(program, reap_all=True)


def _set_rlimits(rlimits: dict) -> None:
    for name, value in rlimits.items():
        limit = getattr(resource, name)
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError) as e:
            raise JailError(f"setrlimit({name}={value}): {e}") from e


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_to(uid: int, gid: int, read_all: bool) -> None:
    """Become uid/gid; with read_all keep only CAP_DAC_READ_SEARCH (so a toolchain under a private home still runs)."""
    if read_all:
        _prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if read_all:
        bit = 1 << CAP_DAC_READ_SEARCH
        data = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        _check(_libc.capset(ctypes.byref(header), data), "capset")
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH)
        _prctl(PR_SET_KEEPCAPS, 0)


def _die_with_parent(parent_pid: int | None) -> None:
    """SIGKILL us when the process that started us dies (a killed harness leaves nothing behind)."""
    if parent_pid is None:
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the signal was armed
        raise JailError("parent exited")


def apply_plan(plan: dict) -> None:
    """Everything but the exec; raises JailError on the first step that fails."""
    parent_pid = plan.get("parent_pid")
    _die_with_parent(parent_pid)
    namespaces = plan.get("namespaces", [])
    if namespaces:
        _unshare(namespaces)
    if "pid" in namespaces:
        _enter_pid_namespace()
    _set_rlimits(plan.get("rlimits", {}))
    if plan.get("uid") is not None:
        _drop_to(plan["uid"], plan["gid"], plan.get("read_all", False))
        if "pid" not in namespaces:
            _die_with_parent(parent_pid)  # the uid change cleared it; in a pid namespace PID 1 holds it
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if plan.get("landlock"):
        apply_landlock(plan["landlock"])
    os.chdir(plan["cwd"])


def main(argv: list[str]) -> int:
    plan = json.loads(argv[1])
    try:
        apply_plan(plan)
    except (JailError, OSError) as e:
        sys.stderr.write(f"sandbox: {e}\n")
        sys.stderr.flush()
        os._exit(JAIL_ERROR_EXIT)
    try:
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except OSError as e:
        sys.stderr.write(f"sandbox: exec {plan['argv'][0]}: {e}\n")
        sys.stderr.flush()
        os._exit(EXEC_ERROR_EXIT)
    return EXEC_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main(sys.argv))
