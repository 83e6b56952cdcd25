"""Run untrusted, model-generated Python in an isolated, resource-limited child process (Linux).

`run_python(code)` writes `code` to `main.py` in a fresh temporary directory (the *work dir*), runs it
there with the interpreter that runs ministacks, and deletes the directory. Where the OS allows it
(root, or a user namespace), the script runs inside its own Linux namespaces:

    parent ──Popen──► unshare --net --pid --ipc --mount --mount-proc --fork --kill-child
                        └──► python -I -S sandbox.py init    pid 1 of the new namespaces, root, trusted
                               │ mounts  every mount read-only and nosuid, except the work dir;
                               │         an interpreter under /root (pyenv) is bound back in, read-only
                               │ waits   for pid 2 or the deadline, then kill(-1): every process left dies
                               │ report  "returncode timed_out" on a pipe only the parent reads
                               └─fork──► python -s -P main.py    pid 2, cwd = work dir (removed after)
                                           uid    nobody (65534), no groups, no_new_privs
                                           rlimit AS=memory_mb CPU=ceil(timeout)+1 s FSIZE=1 MB NOFILE=64
                                                  NPROC=0 (no process or thread of its own) CORE=0
                                           env    PATH, PYTHONHASHSEED=0, TMPDIR=work dir, ...; nothing inherited
                                           stdio  stdin /dev/null; stdout, stderr → unlinked temp files, capped

Layers, each named as it appears in `SandboxResult.isolation` and `isolation_available()`:

    layer             stops                                                      how
    netns             any network: TCP/UDP to localhost or the world, DNS,       a network namespace with
                      abstract unix sockets                                      only a loopback, left down
    pidns             the parent's /proc/<pid>/environ (it is not in the new     a PID namespace and its
                      /proc); a setsid() grandchild outliving the run            own /proc; when pid 1
                                                                                 exits, the kernel kills all
    ipcns             System V shared memory / semaphores of other processes     an IPC namespace
    readonly-fs       writes anywhere but the work dir (/tmp, /dev/shm, the      a mount namespace whose
                      repo, the venv); setuid binaries                           mounts are all remounted ro
    uid-nobody        root's powers (remount, kill, chown), the files only       setuid(65534) as root; makes
                      root may read; a fork bomb (NPROC now counts)              RLIMIT_NPROC meaningful
    userns            the same powers, when not root: the script runs in a       a nested user namespace
                      user namespace without capabilities, mounts locked         (mapping nothing)
    no-new-privs      regaining privileges through setuid or file-cap binaries   prctl(PR_SET_NO_NEW_PRIVS)
    rlimits           time, memory, file size, open files, processes             setrlimit
    audit-hook        fallback only: sockets, writes outside the work dir,       sys.addaudithook in the
                      processes, ctypes, other processes' /proc (see _guard)     child's own interpreter
    process-group     fallback only: children killed with the process group      start_new_session + killpg

Root gets netns, pidns, ipcns, readonly-fs, uid-nobody, no-new-privs, rlimits. A normal user with user
namespaces enabled gets userns instead of uid-nobody. Where neither works (no `unshare`, namespaces
disabled, not Linux), run_python warns once and falls back to rlimits, process-group and audit-hook.
The probe that decides runs once per process (isolation_available); each result names the layers it
actually got, so a caller (and a test) can check them instead of assuming.

Threat model, honestly. With the namespace layers this is a real boundary against a script that tries
the obvious escapes: writing outside its dir, opening a socket, forking without bound, reading the
parent's secrets, outliving its kill. It is not a boundary against a kernel exploit (it shares the
host kernel; a VM or gVisor is for that), and it does not hide what is world-readable: the repo, the
venv, /etc, /sys and /proc's system-wide files stay readable (read-only); under userns the script runs
as you, so it can read every file you can (a token in ~/.cache included). A unix socket file that is
writable by everyone would still accept a connection (the read-only mount does not cover sockets). Disk
is bounded per file (RLIMIT_FSIZE), not in total: a script may write many 1 MB files into its dir until
the timeout. RLIMIT_NPROC counts every process of a uid, so under uid-nobody concurrent runs share
`max_processes`. The fallback layers are NOT a security boundary: the audit hook lives in the same
interpreter as the code it polices, and code written to escape (ctypes loaded some other way, a C
extension) gets around it; it only catches accidents, like today's limits.

Why the init is a separate, trusted process and not the script itself: pid 1 of a namespace is the one
process whose death ends the namespace, so it must not be something the script controls (as root the
script could also clear the parent-death signal that `--kill-child` sets). And why this same file, run
as `python -I -S sandbox.py init ...`, needs only the imports above its "in the parent" line: it starts
for every call, and the parent's imports (dataclasses, subprocess, tempfile) would add ~20 ms to each.

Why `-s -P` and not `-I` for the script: `-I` also implies `-E`, which ignores *every* PYTHON* variable,
including the PYTHONHASHSEED=0 that makes set and dict-of-str order reproducible between runs. Since the
environment is built from scratch here, `-s` (no user site-packages) and `-P` (no script folder on
sys.path) give the same isolation as `-I` and keep the seed.

The exec goes through the util-linux `unshare` binary rather than `unshare(2)` through ctypes in
`preexec_fn`: a new PID namespace applies to the *children* of the caller, so someone has to fork once
more after unshare(2), and doing that (and mounting) in preexec_fn, in a parent that may have threads
(torch has many), is exactly what CPython warns against. The fallback's preexec_fn only calls setrlimit
with precomputed numbers, which takes no lock another thread could hold at fork time.
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
MAX_OUTPUT_CHARS = 4000       # stdout/stderr kept in SandboxResult: head and tail, the middle is cut
SCRIPT_NAME = "main.py"
NOBODY = 65534                # the uid and gid the script runs as under uid-nobody (Debian's `nobody`)

# the layer sets a run can get (see the module docstring's table)
LAYERS_ROOT = ("netns", "pidns", "ipcns", "readonly-fs", "uid-nobody", "no-new-privs", "rlimits")
LAYERS_USERNS = ("netns", "pidns", "ipcns", "readonly-fs", "userns", "no-new-privs", "rlimits")
LAYERS_FALLBACK = ("rlimits", "process-group", "audit-hook")

# mount(2) flags and the prctl/unshare constants from <sys/mount.h>, <linux/prctl.h>, <sched.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 0x20, 0x400, 0x800, 0x1000, 0x4000
MS_RELATIME, MS_STRICTATIME = 0x200000, 0x1000000
KEPT_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000


def _limits(timeout: float, memory_mb: int, max_processes: int) -> list[tuple[int, int, int]]:
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


def _wait_unreaped(pid: int, deadline: float) -> bool:
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
# These run as `python sandbox.py init|guard ...`, once per call, so they use only the imports above.

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
        print(f"ministacks.sandbox: could not start the script: {e}", file=sys.stderr, flush=True)
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
            print(f"ministacks.sandbox: could not set up the isolation: {e}", file=sys.stderr, flush=True)
            report.write(f"error {e}\n")
            return 1
        limits = _limits(timeout, memory_mb, max_processes)
        script = os.fork()
        if script == 0:
            _start_script(workdir, limits, drop_uid)
        exited = _wait_unreaped(script, deadline)
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
                raise PermissionError(f"ministacks.sandbox: writing outside the work dir is refused: {path}")
            if full.startswith("/proc/") and full.split("/")[2].isdigit() and not (full + "/").startswith(own_proc):
                raise PermissionError(f"ministacks.sandbox: another process's /proc is refused: {path}")
        elif event in _FS_EVENTS and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"ministacks.sandbox: {event} outside the work dir is refused: {args[:2]}")
        elif event in _NETWORK_EVENTS or (event == "socket.__new__" and args[1] != _AF_UNIX):
            raise PermissionError(f"ministacks.sandbox: the network is refused ({event})")
        elif (event in _PROCESS_EVENTS and max_processes == 0) or (event == "os.kill" and args[0] != os.getpid()):
            raise PermissionError(f"ministacks.sandbox: {event} is refused")
        elif event.startswith("ctypes.dl"):  # ctypes would call libc directly, past every check above
            raise PermissionError(f"ministacks.sandbox: {event} is refused")

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
    raise SystemExit(f"usage: sandbox.py init|guard ...: unknown mode {sys.argv[1]!r}")


# --- in the parent ---------------------------------------------------------------------------------
# (imported here, below the child's entry point, so that the init and the guard do not pay for them)

import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

INIT_GRACE_S = 1.0  # the parent kills the whole process group this long after the deadline if the init has
#                     not ended the run itself (it should, within milliseconds of the deadline)
PROBE_TIMEOUT_S = 10.0  # the once-per-process probe of which layers work: a cold start can be slow


@dataclass(frozen=True)
class SandboxResult:
    ok: bool             # exit status 0 and not timed out
    returncode: int      # negative: killed by that signal (-9 after a timeout)
    stdout: str          # at most ~MAX_OUTPUT_CHARS: the first and last halves of what was printed
    stderr: str          # same cap; a traceback's last line (the exception) survives the cut
    timed_out: bool      # the wall-clock timeout was reached and every process of the run was killed
    seconds: float       # wall-clock time from spawn to exit (or to the kill)
    status: str = "ok"   # "ok", "error" (exited non-zero: raised, sys.exit(n)), "timeout", "killed"
    #                      (by a signal: SIGXCPU, SIGSEGV, ...) or "sandbox-error" (isolation failed; not run)
    reason: str = ""     # one line for a person: "" when ok, else the exception line, the signal, ...
    isolation: tuple[str, ...] = ()  # the layers this run actually got (see the module docstring's table)


def _environment(workdir: str) -> dict[str, str]:
    """A fresh environment: only what the interpreter and common libraries need."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONHASHSEED": "0",   # reproducible str hashing, so printed sets come out the same every run
        "PYTHONUTF8": "1",       # stdout is UTF-8 whatever the locale; we decode it as UTF-8
        "PYTHONDONTWRITEBYTECODE": "1",  # no .pyc caches written next to the stdlib: nothing outside the dir
        "TMPDIR": workdir,       # /tmp is read-only in the sandbox; `tempfile` then uses the work dir
        # BLAS/OpenMP start one thread per core at import; NPROC=0 forbids threads, so ask for none
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _read_capped(f) -> str:
    """The first and last MAX_OUTPUT_CHARS/2 bytes of a file, so both the start of the output and a
    traceback at its end survive."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    half = MAX_OUTPUT_CHARS // 2
    if size <= MAX_OUTPUT_CHARS:
        data = f.read()
    else:
        head = f.read(half)
        f.seek(size - half)
        data = head + f"\n... [{size - 2 * half} bytes cut] ...\n".encode() + f.read()
    return data.decode("utf-8", errors="replace")


def _spawn(argv: list[str], workdir: str, out, err, deadline: float, **popen) -> tuple[int, bool]:
    """Start `argv` in its own session, wait for it until `deadline`, then SIGKILL its whole process group
    whether it finished or not (a child it forked must not outlive the check; on timeout this is the
    kill itself). Returns (returncode, exited before the deadline)."""
    proc = subprocess.Popen(argv, cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, start_new_session=True, **popen)
    try:
        exited = _wait_unreaped(proc.pid, deadline)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        returncode = proc.wait()
    return returncode, exited


def _run_isolated(workdir: str, out, err, start: float, timeout: float, memory_mb: int, max_processes: int,
                  layers: tuple[str, ...]) -> tuple[int, bool, str | None]:
    """The namespace path: unshare → init → script. Returns (returncode, timed_out, setup error or None)."""
    drop_uid = "uid-nobody" in layers
    if drop_uid:
        os.chown(workdir, NOBODY, NOBODY)  # the script's only writable place
    flags = ["--net", "--pid", "--ipc", "--mount", "--mount-proc", "--fork", "--kill-child"]
    if not drop_uid:
        flags += ["--user", "--map-root-user"]  # not root: become root of a user namespace for the mounts
    report_r, report_w = os.pipe()
    try:
        argv = [shutil.which("unshare"), *flags, "--", sys.executable, "-I", "-S", os.path.abspath(__file__), "init",
                workdir, repr(start + timeout), repr(timeout), str(memory_mb), str(max_processes),
                "1" if drop_uid else "0", str(report_w)]
        try:
            returncode, exited = _spawn(argv, workdir, out, err, start + timeout + INIT_GRACE_S, pass_fds=(report_w,))
        finally:
            os.close(report_w)
        os.set_blocking(report_r, False)  # every writer is dead now; never hang on a pipe regardless
        try:
            report = os.read(report_r, 4096).decode()
        except BlockingIOError:
            report = ""
    finally:
        os.close(report_r)
    if report.startswith("error "):
        return returncode, False, report.removeprefix("error ").strip()
    if not report:
        if not exited:  # the parent's backstop kill: the init outlived the deadline by INIT_GRACE_S
            return returncode, True, None
        return returncode, False, f"the sandbox's init exited ({returncode}) without a report"
    code, timed_out = report.split()
    return int(code), timed_out == "1", None


def _run_guarded(workdir: str, out, err, start: float, timeout: float, memory_mb: int,
                 max_processes: int) -> tuple[int, bool, str | None]:
    """The fallback path: rlimits, a process group, and the audit-hook guard in the script's interpreter."""
    limits = _limits(timeout, memory_mb, max_processes)

    def apply_limits() -> None:  # runs in the child, after fork and before exec
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))

    argv = [sys.executable, "-s", "-P", os.path.abspath(__file__), "guard", workdir, str(max_processes)]
    returncode, exited = _spawn(argv, workdir, out, err, start + timeout,
                                preexec_fn=apply_limits)  # noqa: PLW1509 (only setrlimit; see the docstring)
    return returncode, not exited, None


_available: tuple[str, ...] | None = None  # the probe's answer, once per process


def isolation_available() -> tuple[str, ...]:
    """The layers run_python(isolate=True) applies on this machine: LAYERS_ROOT, LAYERS_USERNS or
    LAYERS_FALLBACK. Decided once per process by running a probe script with the namespace layers (it
    must import from the stdlib and write into its dir); if that fails, warns with the reason and
    answers the fallback, which every later call then uses."""
    global _available
    if _available is None:
        layers = LAYERS_ROOT if os.geteuid() == 0 else LAYERS_USERNS
        if sys.platform != "linux" or shutil.which("unshare") is None:
            why = "needs Linux and the util-linux `unshare` command"
        else:
            probe = _run("import json\nopen('probe', 'w').close()\nprint('ok')", PROBE_TIMEOUT_S, 256, 0, layers)
            why = None if probe.stdout == "ok\n" else (probe.reason or probe.stderr.strip()[-300:] or probe.status)
        if why is not None:
            warnings.warn(f"ministacks.sandbox: no OS isolation here ({why}); model-written code runs with only "
                          f"the fallback layers {LAYERS_FALLBACK}, which are not a security boundary", stacklevel=2)
            layers = LAYERS_FALLBACK
        _available = layers
    return _available


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, *, max_processes: int = 0,
               isolate: bool = True) -> SandboxResult:
    """Run `code` as a script in an isolated, limited child process; see the module docstring.

    max_processes: processes (threads count) the script may start besides itself; 0 refuses all.
    isolate: False skips the namespaces and uses only the fallback layers (for tests and debugging).
    Never raises because of what `code` does: errors, timeouts and kills come back in the result.
    """
    if resource is None:
        raise RuntimeError(
            "ministacks.sandbox needs the POSIX `resource` module to limit the child process, and this "
            f"platform ({sys.platform}) has none; run code checks on Linux"
        )
    if timeout <= 0 or memory_mb <= 0 or max_processes < 0:
        raise ValueError(f"timeout and memory_mb must be positive and max_processes not negative, got "
                         f"timeout={timeout}, memory_mb={memory_mb}, max_processes={max_processes}")
    return _run(code, timeout, memory_mb, max_processes, isolation_available() if isolate else LAYERS_FALLBACK)


def _run(code: str, timeout: float, memory_mb: int, max_processes: int, layers: tuple[str, ...]) -> SandboxResult:
    with (
        tempfile.TemporaryDirectory(prefix="ministacks-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        Path(workdir, SCRIPT_NAME).write_text(code, encoding="utf-8")
        start = time.monotonic()
        if "pidns" in layers:
            returncode, timed_out, setup_error = _run_isolated(workdir, out, err, start, timeout, memory_mb,
                                                               max_processes, layers)
        else:
            returncode, timed_out, setup_error = _run_guarded(workdir, out, err, start, timeout, memory_mb,
                                                              max_processes)
        seconds = time.monotonic() - start
        stdout, stderr = _read_capped(out), _read_capped(err)
    if setup_error is not None:
        status, reason = "sandbox-error", setup_error
    elif timed_out:
        status, reason = "timeout", f"timed out after {timeout:g} s"
    elif returncode == 0:
        status, reason = "ok", ""
    elif returncode < 0:
        status, reason = "killed", f"killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    else:
        lines = stderr.strip().splitlines()
        status, reason = "error", lines[-1] if lines else f"exit status {returncode}"
    return SandboxResult(status == "ok", returncode, stdout, stderr, timed_out, seconds, status, reason, layers)
