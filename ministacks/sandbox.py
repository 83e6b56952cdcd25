"""Run untrusted, model-generated Python in a resource-limited child process (Linux).

`run_python(code)` writes `code` to `main.py` in a fresh temporary directory and runs it there with
the interpreter that runs ministacks, then deletes the directory:

    parent ──Popen──► python -s -P main.py      cwd = /tmp/ministacks-sandbox-XXXX (removed after)
                      │ env    PATH, PYTHONHASHSEED=0, PYTHONUTF8=1, one-thread BLAS; nothing inherited
                      │ stdin  /dev/null        stdout, stderr → unlinked temp files, capped on read
                      │ rlimit AS=memory_mb  CPU=ceil(timeout)+1 s  FSIZE=1 MB  NOFILE=64  NPROC=0  CORE=0
                      └ own session; when it exits or the wall clock runs out, the whole group is SIGKILLed

Threat model, honestly. This is a guard against *accidents* of a small model's output — an infinite
loop, a huge allocation, a runaway print or file write, a fork bomb, a script that reads a variable
from your environment — not against code written to escape. What it limits:

- time: the wall clock (`timeout`) and CPU seconds (RLIMIT_CPU, a backstop if the parent dies);
- memory: address space (RLIMIT_AS), so an allocation fails with MemoryError in the child only;
- disk: every file the child writes, stdout and stderr included, stops at MAX_FILE_BYTES (RLIMIT_FSIZE);
- processes: RLIMIT_NPROC=0, so the child can start no process or thread. NPROC counts every task of
  the *user*, so 0 is the only value that means "none of its own"; root ignores it (containers often
  run as root: there, only the process-group kill below stops children);
- environment: nothing from the parent's environment reaches the child (API keys, tokens, paths).

What it does NOT do: the child runs as you, so it can read (and, within FSIZE, write or delete)
every file you can; the network is open; a child may call `setsid()` and leave the process group
before the kill. Blocking those needs OS isolation — namespaces (bubblewrap, nsjail), a container
or a VM — which is out of scope for a CPU teaching repo. Never run this on code written by someone
who wants to break it.

Why `-s -P` and not `-I`: `-I` also implies `-E`, which ignores *every* PYTHON* variable, including
the PYTHONHASHSEED=0 that makes set and dict-of-str order reproducible between runs. Since the
environment is built from scratch here, `-s` (no user site-packages) and `-P` (no script folder on
sys.path) give the same isolation as `-I` and keep the seed.

Limits are set in `preexec_fn`, between fork and exec. CPython warns that preexec_fn is not safe
when the parent has threads (a lock held by another thread at fork time stays held in the child);
the function it runs here only calls setrlimit with precomputed numbers, which takes no such lock.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: no rlimits, so no sandbox
    resource = None

MAX_FILE_BYTES = 1 << 20      # RLIMIT_FSIZE: any single file the child writes, stdout/stderr included
MAX_OPEN_FILES = 64           # RLIMIT_NOFILE: enough for the interpreter and a few imports
MAX_OUTPUT_CHARS = 4000       # stdout/stderr kept in SandboxResult: head and tail, the middle is cut
SCRIPT_NAME = "main.py"


@dataclass(frozen=True)
class SandboxResult:
    ok: bool             # exit status 0 and not timed out
    returncode: int      # negative: killed by that signal (-9 after a timeout)
    stdout: str          # at most ~MAX_OUTPUT_CHARS: the first and last halves of what was printed
    stderr: str          # same cap; a traceback's last line (the exception) survives the cut
    timed_out: bool      # the wall-clock timeout was reached and the process group was killed
    seconds: float       # wall-clock time from spawn to exit (or to the kill)


def _limits(timeout: float, memory_mb: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, computed in the parent so the child does no work but setrlimit."""
    cpu = math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
        (resource.RLIMIT_NPROC, 0, 0),
        (resource.RLIMIT_CORE, 0, 0),  # SIGXCPU and SIGSEGV would otherwise write core files
    ]
    triples = []
    for res, soft, hard in wanted:
        # an unprivileged process cannot raise its hard limit, and a failed setrlimit in preexec_fn
        # aborts the spawn, so never ask for more than the parent already has
        current = resource.getrlimit(res)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        triples.append((res, soft, hard))
    return triples


def _environment() -> dict[str, str]:
    """A fresh environment: only what the interpreter and common libraries need."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONHASHSEED": "0",   # reproducible str hashing, so printed sets come out the same every run
        "PYTHONUTF8": "1",       # stdout is UTF-8 whatever the locale; we decode it as UTF-8
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


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until `pid` exits or the deadline passes, *without* reaping it: while the leader is an
    unreaped zombie its pid (= the process group id) cannot be reused, so killpg cannot hit a stranger."""
    pause = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` as a script in a limited child process; see the module docstring for what is limited.

    Never raises because of what `code` does: errors, timeouts and kills come back in the result.
    """
    if resource is None:
        raise RuntimeError(
            "ministacks.sandbox needs the POSIX `resource` module to limit the child process, and this "
            f"platform ({sys.platform}) has none; run code checks on Linux"
        )
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout and memory_mb must be positive, got timeout={timeout}, memory_mb={memory_mb}")
    limits = _limits(timeout, memory_mb)

    def apply_limits() -> None:  # runs in the child, after fork and before exec
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))

    with (
        tempfile.TemporaryDirectory(prefix="ministacks-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        script = Path(workdir) / SCRIPT_NAME
        script.write_text(code, encoding="utf-8")
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-s", "-P", SCRIPT_NAME],
            cwd=workdir, env=_environment(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            preexec_fn=apply_limits,  # noqa: PLW1509 (only setrlimit runs there; see the module docstring)
            start_new_session=True,   # its own process group, so killpg reaches everything it starts
        )
        try:
            exited = _wait_unreaped(proc.pid, start + timeout)
        finally:
            # kill the whole group whether the script finished or not: a child it forked (root
            # ignores NPROC) must not outlive the check, and on timeout this is the kill itself
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            returncode = proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _read_capped(out), _read_capped(err)
    timed_out = not exited
    return SandboxResult(returncode == 0 and not timed_out, returncode, stdout, stderr, timed_out, seconds)
