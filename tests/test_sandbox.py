"""sandbox.py: hostile programs are contained, cleaned up and cannot forge their scores; the probe's fallbacks."""

import dataclasses
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlvr_rewards as R  # noqa: E402
import sandbox as S  # noqa: E402

PLAN = S._probe_sandbox()
AS_ROOT = PLAN is not None and PLAN.as_root
needs_sandbox = pytest.mark.skipif(PLAN is None, reason="no working code sandbox on this machine")


def program(source: str) -> str:
    return textwrap.dedent(source).strip() + "\n"


# ------------------------------------------------------------------------------------------------ sandbox

def _sandbox_processes() -> list[str]:
    """Live processes of any sandbox uid."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive = open(f"/proc/{pid}/stat").read().rsplit(")")[-1][1] not in "ZX"
            if alive and S._UID_BASE <= os.stat(f"/proc/{pid}").st_uid < S._UID_BASE + (1 << 22) * S._UID_SLOTS:
                pids.append(pid)
        except OSError:
            pass
    return pids


@needs_sandbox
def test_code_reward_counts_passed_tests():
    """Correct code scores 1, half-correct 0.5 (0 all-or-nothing), fenced code is found, no tests give None."""
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1", "assert f(-1) == 0"]
    good = "Here:\n```python\ndef f(x):\n    return x + 1\n```\n"
    half = "```python\ndef f(x):\n    return x + 1 if x > 0 else 7\n```"
    assert R.code_reward([good, half, "def f(x): return x+1", good], [tests, tests, tests, []]) == [1.0, 0.5, 1.0, None]
    assert R.code_reward([half], [tests], all_or_nothing=True) == [0.0]


@needs_sandbox
def test_sandbox_partial_credit_when_a_test_hangs():
    """Tests that passed before a hanging test still count, the rest fail, and the wall time is the timeout."""
    start = time.monotonic()
    tests = ["assert f(1) == 2", "while True: pass", "assert f(2) == 3"]
    assert R.code_reward(["def f(x): return x + 1"], [tests], timeout_s=1.0) == [pytest.approx(1 / 3)]
    assert time.monotonic() - start < 5


HOSTILE_PROGRAMS = {
    "infinite_loop": """
        while True:
            pass
        done = True""",
    "fork_bomb": """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        done = True""",
    "memory_bomb": """
        chunks = []
        while True:
            chunks.append(bytearray(50 << 20))
        done = True""",
    "print_gigabytes": """
        import sys
        for _ in range(2000):
            sys.stdout.write("x" * (1 << 20))
        done = True""",
    "forge_markers": """
        import os
        for fd in range(64):
            try:
                os.write(fd, b"0 0\\n" * 10)
            except OSError:
                pass
        done = False""",
    "patch_builtins": """
        import builtins
        builtins.exec = builtins.compile = lambda *args, **kwargs: None
        done = False""",
    "escape_the_session": """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        done = False""",
    "exit_early": """
        import os
        os._exit(0)
        done = True""",
}


@needs_sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE_PROGRAMS))
def test_sandbox_contains_hostile_programs(name):
    """Loops, fork and memory bombs, output floods, forged markers, patched builtins: 0, bounded, nothing left."""
    start = time.monotonic()
    result = S.run_sandboxed(program(HOSTILE_PROGRAMS[name]), ["assert done"], timeout_s=2.0)
    assert result.passed == [False]
    assert time.monotonic() - start < 6
    assert len(result.output) <= 65536
    assert _sandbox_processes() == []


def _first_uid(queue):
    queue.put(S._free_uids().queue[0])


def test_sandbox_uids_are_disjoint_across_processes():
    """A forked process (like another torchrun rank) draws sandbox uids from a block of its own."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_first_uid, args=(queue,))
    child.start()
    assert abs(queue.get(timeout=30) - S._free_uids().queue[0]) >= S._UID_SLOTS
    child.join(10)


@needs_sandbox
def test_sandbox_cannot_kill_the_trainer():
    """Code that signals its parent and the training process by pid fails to; this test process lives on."""
    if not AS_ROOT and PLAN.unshare is None:
        pytest.skip("without root or namespaces the code runs as the trainer's user and could kill it")
    killer = program(f"""
        import os, signal
        os.kill(os.getppid(), signal.SIGKILL)
        try:
            os.kill({os.getpid()}, signal.SIGKILL)
            trainer_killed = True
        except OSError:
            trainer_killed = False""")
    assert R.code_reward([killer], [["assert trainer_killed"]]) == [0.0]
    assert R.code_reward(["x = 1"], [["assert x == 1"]]) == [1.0]


@needs_sandbox
def test_sandbox_hides_environment(monkeypatch):
    """A secret in the trainer's environment is neither inherited nor readable through /proc."""
    monkeypatch.setenv("RLVR_TEST_SECRET", "hunter2")
    snoop = program(f"""
        import os
        leaked = os.environ.get("RLVR_TEST_SECRET")
        try:
            via_proc = b"hunter2" in open("/proc/{os.getpid()}/environ", "rb").read()
        except OSError:
            via_proc = False""")
    result = S.run_sandboxed(snoop, ["assert leaked == 'hunter2'", "assert via_proc", "assert leaked is None"])
    assert result.passed[0] is False and result.passed[2] is True
    if AS_ROOT:
        assert result.passed[1] is False


@needs_sandbox
@pytest.mark.skipif(not AS_ROOT, reason="file protection needs root (to switch to an unprivileged uid)")
def test_sandbox_cannot_write_or_read_outside(tmp_path):
    """A file outside the sandbox keeps its content, a 0600 file stays unread, /tmp litter is removed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o666)
    fd, secret = tempfile.mkstemp(dir="/tmp")
    os.write(fd, b"top secret")
    os.close(fd)
    litter = f"/tmp/rlvr-litter-{os.getpid()}"
    try:
        write = f"open({str(victim)!r}, 'w').write('pwned')"
        read = f"assert open({secret!r}).read() == 'top secret'"
        assert R.code_reward([write, read], [[write], [read]]) == [0.0, 0.0]
        litter_code = f"import os\nopen({litter!r}, 'w').write('x')\nos.mkdir({litter + '.d'!r})"
        assert R.code_reward([litter_code], [["assert True"]]) == [1.0]  # /tmp is world-writable...
        assert not os.path.exists(litter) and not os.path.exists(litter + ".d")  # ...but swept afterwards
        assert victim.read_text() == "original"
    finally:
        os.unlink(secret)


@needs_sandbox
def test_sandbox_has_no_network():
    """A connection to a port this process listens on never arrives."""
    if PLAN.unshare is None:
        pytest.skip("no network namespace here (unshare unavailable): the sandbox keeps network access")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    connect = program(f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=1).sendall(b"hi")
            connected = True
        except OSError:
            connected = False""")
    try:
        assert R.code_reward([connect], [["assert connected"]]) == [0.0]
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@needs_sandbox
def test_sandbox_runs_in_a_fresh_directory_that_is_removed():
    """cwd, HOME and TMPDIR are one fresh directory, empty at the start and gone afterwards."""
    source = "import os\ncwd = os.getcwd()\nprint(cwd)\nopen('f', 'w').write('x')"
    tests = ["assert os.environ['HOME'] == cwd == os.environ['TMPDIR']", "assert os.listdir() == ['f']"]
    result = S.run_sandboxed(source, tests)
    assert result.passed == [True, True]
    assert not os.path.exists(result.output.strip())


ESCAPE = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG 0: clear the parent-death signal unshare --kill-child set
try:
    os.setsid()  # leave the process group the trainer kills
except OSError:
    pass
os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", {token!r}])
"""


def _kill_marked(token: str) -> list[int]:
    """SIGKILL the live processes whose command line holds token; their pids."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), 9)
                found.append(int(pid))
        except OSError:
            pass
    return found


def _run_as_nobody(source: str) -> None:
    """Run source with a python as user nobody; skip where this process cannot switch users, nobody cannot import
    rlvr_rewards, or source prints SKIP."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as user nobody")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        try:
            child = subprocess.run([python, "-c", f"import sys\nsys.path.insert(0, {repo!r})\n{source}"], cwd="/",
                                   capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]},
                                   user=65534, group=65534, extra_groups=[])
        except OSError:  # missing, or where nobody cannot reach it (pyenv under /root)
            continue
        if child.returncode == 0 and "SKIP" not in child.stdout:
            return
    pytest.skip("user nobody cannot import rlvr_rewards or has no sandbox with namespaces here")


@needs_sandbox
@pytest.mark.parametrize("user", ["this process", "nobody"])
def test_sandbox_kills_code_that_detaches_itself(user):
    """Code that clears its parent-death signal, leaves its session and execs is dead once the run returns, also
    not as root (there only killing the PID namespace's init reaches it)."""
    token = f"rlvr-escape-{os.getpid()}-{time.monotonic_ns()}"
    escape = ESCAPE.format(token=token)
    try:
        if user == "this process":
            S.run_sandboxed(escape, ["assert True"], timeout_s=1.0)
        else:
            _run_as_nobody("import sandbox as S\nplan = S._probe_sandbox()\n"
                           "if plan is None or plan.unshare is None:\n    print('SKIP')\n"
                           f"else:\n    S.run_sandboxed({escape!r}, ['assert True'], timeout_s=1.0)")
        time.sleep(0.2)
    finally:
        survivors = _kill_marked(token)
    assert survivors == []


@needs_sandbox
def test_sandbox_sets_no_new_privs():
    """The code runs with no-new-privs, so no setuid program it runs can raise its privileges."""
    source = "status = open('/proc/self/status').read()"
    assert S.run_sandboxed(source, ["assert 'NoNewPrivs:\\t1' in status"]).passed == [True]


@needs_sandbox
@pytest.mark.parametrize("namespaces", [True, False])
def test_sandbox_shared_memory_does_not_outlive_the_run(namespaces):
    """A System V shared-memory segment the code creates is gone once the run returns: it lived in the run's IPC
    namespace, or (as root without namespaces) the slot uid's segments were removed."""
    if namespaces and PLAN.unshare is None:
        pytest.skip("no namespaces here")
    if not namespaces and not AS_ROOT:
        pytest.skip("not as root and without namespaces the code shares the training user's System V IPC")
    plan = PLAN if namespaces else dataclasses.replace(PLAN, unshare=None, mount_proc=False)
    key = 0x5EED0000 + os.getpid() % 0xFFFF
    create = f"import ctypes\nshmid = ctypes.CDLL(None).shmget({key}, 1 << 20, 0o1000 | 0o600)  # IPC_CREAT"

    def segments():
        with open("/proc/sysvipc/shm") as table:
            return [row.split()[1] for row in table.read().splitlines()[1:] if int(row.split()[0]) == key]

    try:
        assert S._run(plan, create, ["assert shmid >= 0"]).passed == [True]
        assert segments() == []
    finally:
        for shmid in segments():
            subprocess.run(["ipcrm", "-m", shmid], check=False)


@needs_sandbox
def test_sandbox_has_its_own_proc_where_mounts_work():
    """With a mount namespace, /proc shows only the sandbox's own PID namespace: the trainer's pid is not there."""
    if not PLAN.mount_proc:
        pytest.skip("no mount namespace here: the sandbox sees the host's /proc")
    source = f"import os\nvisible = os.path.exists('/proc/{os.getpid()}')"
    assert S.run_sandboxed(source, ["assert not visible"]).passed == [True]


def test_sandbox_falls_back_where_its_uids_are_unmapped():
    """As "root" of a user namespace that maps only uid 0 (a rootless container), the probe picks a plan that runs
    as the training user, and code is scored, not zeroed."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or subprocess.run([unshare, "--map-root-user", "true"]).returncode:
        pytest.skip("needs root and unprivileged user namespaces")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = (f"import sys, warnings\nsys.path.insert(0, {repo!r})\nwarnings.simplefilter('ignore')\n"
              "import rlvr_rewards as R, sandbox as S\n"
              "print(open('/proc/self/uid_map').read().split(), S._ids_mapped(), S._probe_sandbox().as_root,\n"
              "      R.code_reward(['def f(x):\\n    return x + 1'], [['assert f(1) == 2']]))")
    child = subprocess.run([unshare, "--map-root-user", sys.executable, "-c", source], capture_output=True,
                           text=True, timeout=60)
    assert child.stdout.strip() == "['0', '0', '1'] False False [1.0]", child.stderr[-2000:]


@needs_sandbox
def test_failed_probe_is_not_kept_and_code_reward_says_why(monkeypatch):
    """Where no plan works, code_reward raises a RuntimeError naming what was tried and why, rather than score 0;
    the failure is not cached, so once the sandbox works again code is scored."""
    def broken_run(*args, **kwargs):
        raise OSError("fork failed, say")

    run = S._run
    monkeypatch.setattr(S, "_PLAN", None)
    monkeypatch.setattr(S, "_run", broken_run)
    with pytest.raises(RuntimeError, match=r"no working code sandbox.*python.*fork failed, say"):
        R.code_reward(["x = 1"], [["assert x == 1"]])
    assert R.code_reward(["x = 1"], [None]) == [None]  # nothing to run: no error
    monkeypatch.setattr(S, "_run", run)
    assert R.code_reward(["x = 1"], [["assert x == 1"]]) == [1.0]
    assert S._PLAN is not None


def test_importing_rewards_starts_nothing():
    """Importing rlvr_rewards (and sandbox) starts no process and makes no pool: both are made on first use."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = (f"import sys\nsys.path.insert(0, {repo!r})\nimport rlvr_rewards, sandbox\n"
              "print(sandbox._MATH_POOL, sandbox._UID_POOL)")
    assert subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "None None"
