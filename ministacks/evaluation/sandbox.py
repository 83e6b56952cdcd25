"""Run untrusted, model-generated Python in an isolated, resource-limited child process (Linux).

`run_python(code)` writes `code` to `main.py` in a fresh temporary directory (the *work dir*), runs it
there with the interpreter that runs ministacks, and deletes the directory. Where the OS allows it
(root, or a user namespace), the script runs inside its own Linux namespaces:

    parent ──Popen──► unshare --net --pid --ipc --mount --mount-proc --fork --kill-child
                        └──► python -I -S isolation.py init  pid 1 of the new namespaces, root, trusted
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
                      processes, ctypes, other processes' /proc (isolation.py) child's own interpreter
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

This file is the parent's side: the public `run_python`, `SandboxResult` and `isolation_available`
(the probe), the environment and output capture, and the choice between the two paths. What runs
inside the child processes (the mounts, pid 1, the uid drop, the audit hook) is isolation.py, which
this file starts as a script and whose docstring says why the init is a process of its own.

The exec goes through the util-linux `unshare` binary rather than `unshare(2)` through ctypes in
`preexec_fn`: a new PID namespace applies to the *children* of the caller, so someone has to fork once
more after unshare(2), and doing that (and mounting) in preexec_fn, in a parent that may have threads
(torch has many), is exactly what CPython warns against. The fallback's preexec_fn only calls setrlimit
with precomputed numbers, which takes no lock another thread could hold at fork time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import isolation
from .isolation import MAX_FILE_BYTES, NOBODY, SCRIPT_NAME, rlimits, wait_unreaped

try:
    import resource
except ImportError:  # Windows: no rlimits, so no sandbox
    resource = None

# the public API; MAX_FILE_BYTES is isolation.py's (the child sets the limit) and named here because
# it is the largest file a caller's script can write
__all__ = ["run_python", "SandboxResult", "isolation_available", "LAYERS_ROOT", "LAYERS_USERNS", "LAYERS_FALLBACK",
           "MAX_OUTPUT_CHARS", "MAX_FILE_BYTES"]

ISOLATION_SCRIPT = os.path.abspath(isolation.__file__)  # what both paths start: the init, or the guard
MAX_OUTPUT_CHARS = 4000       # stdout/stderr kept in SandboxResult: head and tail, the middle is cut
INIT_GRACE_S = 1.0  # the parent kills the whole process group this long after the deadline if the init has
#                     not ended the run itself (it should, within milliseconds of the deadline)
PROBE_TIMEOUT_S = 10.0  # the once-per-process probe of which layers work: a cold start can be slow

# the layer sets a run can get (see the module docstring's table)
LAYERS_ROOT = ("netns", "pidns", "ipcns", "readonly-fs", "uid-nobody", "no-new-privs", "rlimits")
LAYERS_USERNS = ("netns", "pidns", "ipcns", "readonly-fs", "userns", "no-new-privs", "rlimits")
LAYERS_FALLBACK = ("rlimits", "process-group", "audit-hook")


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
        exited = wait_unreaped(proc.pid, deadline)
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
        argv = [shutil.which("unshare"), *flags, "--", sys.executable, "-I", "-S", ISOLATION_SCRIPT, "init", workdir,
                repr(start + timeout), repr(timeout), str(memory_mb), str(max_processes), "1" if drop_uid else "0",
                str(report_w)]
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
    limits = rlimits(timeout, memory_mb, max_processes)

    def apply_limits() -> None:  # runs in the child, after fork and before exec
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))

    # -s -P and not -I, as for the script of the isolated path (isolation.py says why)
    argv = [sys.executable, "-s", "-P", ISOLATION_SCRIPT, "guard", workdir, str(max_processes)]
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
            warnings.warn(f"ministacks.evaluation.sandbox: no OS isolation here ({why}); model-written code runs with "
                          f"only the fallback layers {LAYERS_FALLBACK}, which are not a security boundary", stacklevel=2)
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
            "ministacks.evaluation.sandbox needs the POSIX `resource` module to limit the child process, and this "
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
