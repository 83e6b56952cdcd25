"""The isolation layers, from inside: what runs in the sandbox's child processes (Linux).

sandbox.py (the parent) does not call this code, it starts this file as a script, once per run:

    python -I -S isolation.py init WORKDIR DEADLINE TIMEOUT MEMORY_MB MAX_PROCESSES DROP_UID REPORT_FD
        pid 1 of the new namespaces, under `unshare`: the mounts, the script as pid 2, the kill, the report
    python -s -P isolation.py guard WORKDIR MAX_PROCESSES
        the fallback: the audit-hook guard, then the script as __main__ in the same interpreter

This file implements
  - `rlimits`              the (resource, soft, hard) limits of a run, on either path
  - `wait_unreaped`        wait for a child without reaping it (the parent's kill relies on it too)
  - `_confine_writes`      readonly-fs: every mount read-only and nosuid, except the work dir
  - `_expose_interpreter`  an interpreter under a root-only directory (pyenv's /root), bound back in
  - `_start_script`        pid 2: uid-nobody (or a nested userns), rlimits, no-new-privs, exec
  - `_init`                pid 1: the two mount steps, the fork of pid 2, the wait, kill(-1), the report
  - `_guard`               audit-hook: the fallback's PEP 578 hook

Why a file of its own, importing nothing but the stdlib modules below (ctypes only on demand): it
starts for every run, and the parent's imports (dataclasses, subprocess, tempfile) would add ~20 ms to
each; and the init, under `-I -S`, sees neither site-packages nor the script's folder, so it could not
import ministacks if it wanted to. What both sides need (the limits, the script's name, the uid)
lives here, and sandbox.py imports it from here, never the other way round.

Why the init is a separate, trusted process and not the script itself: pid 1 of a namespace is the one
process whose death ends the namespace, so it must not be something the script controls (as root the
script could also clear the parent-death signal that `--kill-child` sets).

Why `-s -P` and not `-I` for the script: `-I` also implies `-E`, which ignores *every* PYTHON* variable,
including the PYTHONHASHSEED=0 that makes set and dict-of-str order reproducible between runs. Since the
environment is built from scratch (sandbox._environment), `-s` (no user site-packages) and `-P` (no
script folder on sys.path) give the same isolation as `-I` and keep the seed.
"""

from __future__ import annotations

import math
import os
import select
import signal
import stat
import sys
import time

try:
    import resource
except ImportError:  # Windows: no rlimits, so no sandbox
    resource = None

MAX_FILE_BYTES = 1 << 20      # RLIMIT_FSIZE: any single file the child writes, stdout/stderr included
MAX_OPEN_FILES = 64           # RLIMIT_NOFILE: enough for the interpreter and a few imports
SCRIPT_NAME = "main.py"
NOBODY = 65534                # the uid and gid the script runs as under uid-nobody (Debian's `nobody`)

# mount(2) flags and the prctl/unshare constants from <sys/mount.h>, <linux/prctl.h>, <sched.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 0x20, 0x400, 0x800, 0x1000, 0x4000
MS_RELATIME, MS_STRICTATIME = 0x200000, 0x1000000
KEPT_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000


# --- shared with the parent: the limits and the wait -----------------------------------------------

def rlimits(timeout: float, memory_mb: int, max_processes: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, computed before the child so that it does no work but setrlimit."""
    cpu = math.ceil(timeout) + 1
    # NPROC counts every task of the uid, the script's own included: 0 refuses any fork or thread even
    # when the uid runs other processes elsewhere, and k+1 lets a uid of its own start k more
    nproc = 0 if max_processes == 0 else max_processes + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),  # SIGXCPU and SIGSEGV would otherwise write core files
    ]
    triples = []
    for res, soft, hard in wanted:
        # an unprivileged process cannot raise its hard limit, and a failed setrlimit in preexec_fn
        # aborts the spawn, so never ask for more than the process already has
        current = resource.getrlimit(res)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        triples.append((res, soft, hard))
    return triples


def wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until child `pid` exits or the deadline (time.monotonic) passes, *without* reaping it: while
    it is an unreaped zombie its pid (= its process group id) cannot be reused, so killpg cannot hit a
    stranger. A pidfd wakes us the moment it exits; polling is the fallback for kernels before 5.3."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            return bool(select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0])
        finally:
            os.close(pidfd)
    pause = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
    return True


# --- inside the sandbox: pid 1 (init) and the fallback's guard ------------------------------------

def _libc_call(name: str, *args) -> None:
    """Call a libc function through ctypes (Python 3.11 has no os.mount or os.unshare); raise OSError on -1."""
    import ctypes  # here, not at the top: the guard's interpreter must not start with ctypes loaded

    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args!r}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    def arg(s):
        return None if s is None else os.fsencode(s)

    _libc_call("mount", arg(source), arg(target), arg(fstype), ctypes.c_ulong(flags), arg(data))


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) for every mount in this namespace, from mountinfo.
    Field 5 is the mount point, with space, tab, newline and backslash written as octal escapes;
    field 6 the per-mount options (rw/ro, nosuid, ..., the atime mode)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4]
            for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(escape, char)
            options = fields[5].split(",")
            points.append((point, sum(flag for name, flag in KEPT_MOUNT_FLAGS.items() if name in options)))
    return points


def _expose_interpreter() -> None:
    """Let uid nobody run this interpreter even where it lives under a directory only root may enter
    (pyenv's /root/.pyenv is common in containers, and /root is 0700). In the sandbox's own mount table,
    cover the topmost such directory with an empty tmpfs and bind just the interpreter's trees back into
    it; the rest of /root stays out of sight. The host's mounts and permissions are untouched."""
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    needed.add(os.path.dirname(os.path.realpath(sys.executable)))
    # keep the outermost trees: binding /a/b brings /a/b/c along
    needed = {p for p in needed if not any(p.startswith(q + os.sep) for q in needed)}
    blocked: dict[str, list[str]] = {}  # topmost ancestor that "other" cannot enter → trees below it
    for path in sorted(needed):
        parts = path.split(os.sep)  # "/a/b/c" → ["", "a", "b", "c"]
        for i in range(2, len(parts)):
            ancestor = os.sep.join(parts[:i])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                blocked.setdefault(ancestor, []).append(path)
                break
    for ancestor, paths in blocked.items():
        # hold each tree by a file descriptor: once the tmpfs covers `ancestor`, its path leads nowhere
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for path, fd in zip(paths, fds):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def _confine_writes(workdir: str) -> None:
    """Remount every mount read-only and nosuid, except the work dir, which becomes a mount of its own
    (a bind onto itself) so that it alone can stay writable. A remount with MS_BIND changes only this
    namespace's view of a mount, never the file system; the per-mount flags it already had are kept
    (a user namespace may not clear them)."""
    _mount(workdir, workdir, None, MS_BIND)
    for point, kept in _mount_points():
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | kept
        if point == workdir:
            flags |= MS_NODEV
        else:
            flags |= MS_RDONLY
        try:
            _mount(None, point, None, flags)
        except FileNotFoundError:
            pass  # a mount hidden under one mounted later (the host's /proc, or under /root's tmpfs)


def _start_script(workdir: str, limits: list, drop_uid: bool) -> None:
    """In the forked pid 2: give up every privilege, set the limits, exec the script. Never returns."""
    try:
        # enter the work dir's own mount: the cwd inherited from Popen is the read-only mount below it
        os.chdir(workdir)
        if drop_uid:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)  # before NPROC=0: setuid over the limit would make the exec fail (EAGAIN)
        else:
            # not root: a nested user namespace that maps no uid. Its mount namespace gets a locked copy
            # of the mounts (read-only stays read-only), and after exec the script has no capabilities
            _libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNS)
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))
        _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.execv(sys.executable, [sys.executable, "-s", "-P", SCRIPT_NAME])
    except BaseException as e:  # noqa: BLE001 - reported to the script's stderr, which the parent returns
        print(f"ministacks.evaluation.sandbox: could not start the script: {e}", file=sys.stderr, flush=True)
    os._exit(127)


def _init(workdir: str, deadline: float, timeout: float, memory_mb: int, max_processes: int, drop_uid: bool,
          report_fd: int) -> int:
    """Pid 1 of the sandbox's namespaces (see the module picture): set up the mounts, start the script as
    pid 2, wait for it or the deadline, kill every process left, and write one line to `report_fd`,
    "<returncode> <1 if timed out else 0>", or "error <why>" when the isolation could not be set up."""
    os.set_inheritable(report_fd, False)  # the script must not be able to write its own verdict
    _libc_call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)  # nor read this process's memory or fds via /proc
    # pid 1 ignores every signal it has no handler for; drop Python's SIGINT handler so a Ctrl-C (or
    # the script) cannot end the init early and the kill stays the parent's and the deadline's
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with os.fdopen(report_fd, "w") as report:
        try:
            os.umask(0o022)
            if drop_uid:
                _expose_interpreter()
            _confine_writes(workdir)
        except OSError as e:
            print(f"ministacks.evaluation.sandbox: could not set up the isolation: {e}", file=sys.stderr, flush=True)
            report.write(f"error {e}\n")
            return 1
        limits = rlimits(timeout, memory_mb, max_processes)
        script = os.fork()
        if script == 0:
            _start_script(workdir, limits, drop_uid)
        exited = wait_unreaped(script, deadline)
        # kill(-1) from pid 1 reaches every other process of the namespace: the script on a timeout, and
        # whatever it started, setsid() or not. Then reap them all, so they are gone when we report.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = None
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == script:
                status = st
        report.write(f"{os.waitstatus_to_exitcode(status)} {int(not exited)}\n")
    return 0


_AF_UNIX = 1  # socket.AF_UNIX on Linux; not imported, so the guard adds no module the script did not ask for
_FS_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
_PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                   "pty.spawn", "os.killpg"}
_NETWORK_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                   "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}


def _guard(workdir: str, max_processes: int) -> None:
    """The fallback, when the OS grants no isolation: refuse from inside the script's own interpreter what
    the namespaces would have stopped, then run the script as __main__. NOT a security boundary: the hook
    sees only what Python reports (audit events, PEP 578), so a C extension, or ctypes loaded some way
    the hook does not see, walks past it. It catches an accident, not an attack."""
    inside = os.path.realpath(workdir) + os.sep
    own_proc = f"/proc/{os.getpid()}/"

    def outside(path) -> bool:
        if isinstance(path, int):
            return False  # a file descriptor the process already holds
        full = os.path.realpath(os.fsdecode(path))
        return not (full + os.sep).startswith(inside) and full != os.devnull

    def refuse(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if isinstance(path, int) or path is None:
                return
            full = os.path.realpath(os.fsdecode(path))
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
            if writes and outside(path):
                raise PermissionError(f"ministacks.evaluation.sandbox: writing outside the work dir is refused: {path}")
            if full.startswith("/proc/") and full.split("/")[2].isdigit() and not (full + "/").startswith(own_proc):
                raise PermissionError(f"ministacks.evaluation.sandbox: another process's /proc is refused: {path}")
        elif event in _FS_EVENTS and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"ministacks.evaluation.sandbox: {event} outside the work dir is refused: {args[:2]}")
        elif event in _NETWORK_EVENTS or (event == "socket.__new__" and args[1] != _AF_UNIX):
            raise PermissionError(f"ministacks.evaluation.sandbox: the network is refused ({event})")
        elif (event in _PROCESS_EVENTS and max_processes == 0) or (event == "os.kill" and args[0] != os.getpid()):
            raise PermissionError(f"ministacks.evaluation.sandbox: {event} is refused")
        elif event.startswith("ctypes.dl"):  # ctypes would call libc directly, past every check above
            raise PermissionError(f"ministacks.evaluation.sandbox: {event} is refused")

    with open(SCRIPT_NAME, "rb") as f:
        code = compile(f.read(), SCRIPT_NAME, "exec")
    sys.addaudithook(refuse)  # cannot be removed again, by design of PEP 578
    main = type(sys)("__main__")  # a fresh module, as `python main.py` would have run it in
    main.__file__ = SCRIPT_NAME
    sys.modules["__main__"] = main
    sys.argv = [SCRIPT_NAME]
    exec(code, main.__dict__)


if __name__ == "__main__":
    if sys.argv[1] == "init":
        workdir, deadline, timeout, memory_mb, max_processes, drop_uid, report_fd = sys.argv[2:]
        sys.exit(_init(workdir, float(deadline), float(timeout), int(memory_mb), int(max_processes),
                       drop_uid == "1", int(report_fd)))
    if sys.argv[1] == "guard":
        _guard(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    raise SystemExit(f"usage: isolation.py init|guard ...: unknown mode {sys.argv[1]!r}")
