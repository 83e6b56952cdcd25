"""The sandbox: output is captured and capped, the work dir is fresh and removed, and every escape a
model's code could try (write outside its dir, reach the network, fork without bound, read the parent's
secrets, outlive its kill, loop, allocate) fails with a clear status and leaves nothing behind.

Each test names the layers it relies on through `result.isolation`, and test_isolation_layers pins
what root must get, so a machine that silently lost a namespace fails here instead of passing on the
fallback."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ministacks.evaluation.sandbox import (
    LAYERS_FALLBACK,
    LAYERS_ROOT,
    LAYERS_USERNS,
    MAX_OUTPUT_CHARS,
    isolation_available,
    run_python,
)

# a child that replaces itself (no fork needed) by a sleeper whose command line carries `marker`,
# so the test can find it in the host's /proc whatever pid it had inside a PID namespace
SLEEPER = "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])"


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker` (a zombie's command line is empty)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass  # it exited while we looked
    return found


def assert_none_left(marker: str) -> None:
    deadline = time.monotonic() + 2.0  # the fallback's killpg is delivered asynchronously
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes_with(marker) == []


def test_isolation_layers():
    """Root (this project's machines and CI) must get every namespace layer; anything else must say
    honestly which set it got, and every result carries the set it ran under."""
    layers = isolation_available()
    if os.geteuid() == 0:
        assert layers == LAYERS_ROOT
    else:
        assert layers in (LAYERS_USERNS, LAYERS_FALLBACK)
    assert run_python("pass").isolation == layers
    assert run_python("pass", isolate=False).isolation == LAYERS_FALLBACK


# --- what the script sees --------------------------------------------------------------------------

def test_captures_output_exit_status_and_names_the_failure():
    result = run_python("import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nsys.exit(3)")
    assert (result.stdout, result.stderr, result.returncode, result.ok, result.timed_out) == ("to out\n", "to err\n", 3, False, False)
    assert (result.status, result.reason) == ("error", "to err")
    ok = run_python("print(1 + 1)")
    assert (ok.ok, ok.status, ok.reason, ok.stdout) == (True, "ok", "", "2\n")
    raised = run_python("import json\njson.loads('{')")  # the stdlib imports inside the sandbox
    assert raised.status == "error" and raised.reason.startswith("json.decoder.JSONDecodeError")


def test_output_is_capped_keeping_head_and_tail():
    result = run_python("print('first'); print('x' * 100_000); print('last')")
    assert result.ok
    assert len(result.stdout) < MAX_OUTPUT_CHARS + 100
    assert result.stdout.startswith("first\n") and result.stdout.endswith("last\n")


def test_runs_in_a_fresh_writable_temp_dir_that_is_removed():
    result = run_python("import os, tempfile\nprint(os.getcwd())\nprint(sorted(os.listdir()))\n"
                        "open('out.txt', 'w').write('ok')\nprint(tempfile.gettempdir() == os.getcwd())")
    workdir, listing, tmp_is_workdir = result.stdout.splitlines()
    assert Path(workdir).parent == Path(tempfile.gettempdir()).resolve()
    assert workdir != os.getcwd() and listing == "['main.py']" and result.ok
    assert tmp_is_workdir == "True"  # `tempfile` works even though /tmp is read-only inside
    assert not Path(workdir).exists()


def test_does_not_inherit_the_environment(monkeypatch):
    monkeypatch.setenv("MINISTACKS_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    result = run_python("import os, sys\nprint(os.environ.get('MINISTACKS_TEST_SECRET'))\nprint('/nowhere' in sys.path)")
    assert result.stdout == "None\nFalse\n"
    # PYTHONHASHSEED=0 is honoured (it would not be under -I): str hashes agree between runs
    assert run_python("print(hash('abc'))").stdout == run_python("print(hash('abc'))").stdout


# --- escapes ---------------------------------------------------------------------------------------

def test_cannot_read_the_parents_environment_through_proc(monkeypatch):
    """/proc/<pid>/environ shows a process's environment *as it was exec'd*, so the stand-in for a parent
    holding a secret is a process started with it; the script also gets the real parent's pid."""
    secret = f"MINISTACKS_TEST_SECRET=hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("MINISTACKS_TEST_SECRET", secret.split("=", 1)[1])
    holder = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                              env=dict(os.environ), stdout=subprocess.PIPE, text=True)
    try:
        # Popen returns once exec has begun, which is before the kernel has placed the new environment;
        # the holder's first line says it is running, so its environ is in place
        assert holder.stdout.readline() == "up\n"
        code = (
            "import glob, os\n"
            f"print(os.environ.get('MINISTACKS_TEST_SECRET'))\n"
            f"readable = []\n"
            f"for path in ['/proc/{os.getpid()}/environ', '/proc/{holder.pid}/environ', *glob.glob('/proc/*/environ')]:\n"
            f"    try:\n"
            f"        readable.append((path, {secret.encode()!r} in open(path, 'rb').read()))\n"
            f"    except OSError:\n"
            f"        pass\n"
            f"print([path for path, leaked in readable if leaked])\n"
            f"print(any(p.startswith(('/proc/{os.getpid()}/', '/proc/{holder.pid}/')) for p, _ in readable))\n"
        )
        # the holder's environ is readable from out here, so the probe inside would have found it
        assert secret.encode() in Path(f"/proc/{holder.pid}/environ").read_bytes()
        result = run_python(code)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert result.ok, result.stderr
    assert result.stdout == "None\n[]\nFalse\n"  # no secret anywhere, and neither process's /proc at all
    assert secret.split("=", 1)[1] not in result.stdout + result.stderr


def test_cannot_write_outside_the_work_dir(tmp_path):
    targets = [tmp_path / "escaped.txt", Path(tempfile.gettempdir()) / f"ministacks-escape-{uuid.uuid4().hex}.txt"]
    code = "\n".join([
        "for path in %r:" % [str(t) for t in targets],
        "    try:",
        "        open(path, 'w').write('escaped')",
        "        print('wrote', path)",
        "    except OSError as e:",
        "        print('refused', type(e).__name__, e)",
    ])
    result = run_python(code)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused") for line in lines), result.stdout
    if "readonly-fs" in result.isolation:
        assert all("Permission denied" in line or "Read-only file system" in line for line in lines)
    for target in targets:
        assert not target.exists()


def test_cannot_reach_a_listener_on_localhost():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        result = run_python(
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__, e)\n"
        )
        # a connection that got through would sit in the listen backlog, accepted or not
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()
    assert result.stdout.startswith("refused"), result.stdout
    if "netns" in result.isolation:
        assert "Network is unreachable" in result.stdout


def test_fork_loop_is_refused_or_contained():
    """200 forks, each child a sleeper: by default the first fork fails (RLIMIT_NPROC=0 for the sandbox
    uid, or the fallback's hook); with a budget of 20 the 21st does, and all 20 die with the run."""
    marker = f"ministacks-forkloop-{uuid.uuid4().hex}"
    code = "\n".join([
        "import os, sys, time",
        "started = 0",
        "for _ in range(200):",
        "    try:",
        "        if os.fork() == 0:",
        "            " + SLEEPER.format(marker=marker),
        "    except OSError as e:",
        "        print('refused after', started, type(e).__name__)",
        "        break",
        "    started += 1",
        "time.sleep(0.2)",
    ])
    refused = run_python(code)
    assert refused.ok and refused.stdout.startswith("refused after 0 "), refused.stdout + refused.stderr
    assert_none_left(marker)
    budget = run_python(code, max_processes=20)
    if "uid-nobody" in budget.isolation or "userns" in budget.isolation:  # NPROC counts the sandbox's uid
        assert budget.stdout.startswith("refused after 20 BlockingIOError"), budget.stdout + budget.stderr
    assert_none_left(marker)


SETSID_ESCAPE = """
import os, sys, time
try:
    child = os.fork()
except OSError as e:
    print('refused', type(e).__name__)
    sys.exit(0)
if child == 0:
    os.setsid()  # leave the process group: a killpg of it no longer reaches what follows
    if os.fork() == 0:
        {sleeper}
    os._exit(0)
os.waitpid(child, 0)
time.sleep(0.2)  # let the grandchild exec, so that its command line carries the marker
print('started')
"""


def test_a_setsid_grandchild_does_not_outlive_the_run():
    marker = f"ministacks-setsid-{uuid.uuid4().hex}"
    code = SETSID_ESCAPE.format(sleeper=SLEEPER.format(marker=marker))
    result = run_python(code)  # no process budget: refused outright
    assert result.ok and result.stdout.startswith("refused"), result.stdout + result.stderr
    assert_none_left(marker)
    # with a budget the grandchild does start, and the PID namespace still ends it with the run
    result = run_python(code, max_processes=4)
    if "pidns" in result.isolation:
        assert result.ok and result.stdout == "started\n", result.stdout + result.stderr
    assert_none_left(marker)


def test_an_infinite_loop_is_killed_at_the_timeout():
    marker = f"ministacks-loop-{uuid.uuid4().hex}"
    # exec (no fork needed) turns the script into a busy loop that carries the marker
    loop = SLEEPER.format(marker=marker).replace("import time; time.sleep(30)", "while True: pass")
    code = f"import os, sys\ntry:\n    {loop}\nexcept OSError:  # the fallback's hook refuses exec\n    while True: pass\n"
    result = run_python(code, timeout=1.0)
    assert (result.timed_out, result.ok, result.status, result.returncode) == (True, False, "timeout", -9)
    assert result.reason == "timed out after 1 s"
    assert 1.0 <= result.seconds < 1.5
    if "pidns" in result.isolation:
        assert processes_with(marker) == []  # the init reaped it before reporting
    assert_none_left(marker)


def test_memory_limit():
    assert run_python("b = bytearray(64 << 20)", memory_mb=256).ok
    result = run_python("b = bytearray(1 << 30)", memory_mb=256)  # would succeed (lazily) without RLIMIT_AS
    assert not result.ok and result.stderr.rstrip().endswith("MemoryError")
    assert (result.status, result.reason) == ("error", "MemoryError")


# --- the fallback ----------------------------------------------------------------------------------

def test_fallback_says_what_it_is_and_refuses_the_obvious(tmp_path):
    """isolate=False: only rlimits, the process group and the audit hook, which is no security boundary
    but turns the usual accidents into a PermissionError."""
    code = "\n".join([
        "import os, socket",
        "def attempt(what, f):",
        "    try:",
        "        f()",
        "        print(what, 'done')",
        "    except OSError as e:",
        "        print(what, 'refused', type(e).__name__)",
        f"attempt('write', lambda: open({str(tmp_path / 'escaped.txt')!r}, 'w'))",
        "attempt('socket', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))",
        f"attempt('environ', lambda: open('/proc/{os.getpid()}/environ', 'rb').read())",
        "attempt('fork', os.fork)",
        "attempt('inside', lambda: open('inside.txt', 'w').close())",
    ])
    result = run_python(code, isolate=False)
    assert result.isolation == LAYERS_FALLBACK and "netns" not in result.isolation
    assert result.stdout.splitlines() == [
        "write refused PermissionError", "socket refused PermissionError", "environ refused PermissionError",
        "fork refused PermissionError", "inside done",
    ], result.stdout + result.stderr
    assert not (tmp_path / "escaped.txt").exists()
    loop = run_python("while True: pass", timeout=0.5, isolate=False)
    assert loop.status == "timeout" and loop.seconds < 1.0
