"""sandbox.py: hostile programs are contained and cannot forge their scores; cleanup takes trees of any depth, never
fails a run, and catches what a killed trainer left; memory stays bounded; math-verify batches are bounded in time;
the probe's fallbacks."""

import contextlib
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
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlvr_rewards as env  # noqa: E402
import sandbox  # noqa: E402

PLAN = sandbox._probe_sandbox()
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
            if alive and sandbox._UID_BASE <= os.stat(f"/proc/{pid}").st_uid < sandbox._UID_BASE + (1 << 22) * sandbox._UID_SLOTS:
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
    assert env.code_reward([good, half, "def f(x): return x+1", good], [tests, tests, tests, []]) == [1.0, 0.5, 1.0, None]
    assert env.code_reward([half], [tests], all_or_nothing=True) == [0.0]


@needs_sandbox
def test_sandbox_partial_credit_when_a_test_hangs():
    """Tests that passed before a hanging test still count, the rest fail, and the wall time is the timeout."""
    start = time.monotonic()
    tests = ["assert f(1) == 2", "assert all(True for _ in iter(int, 1))", "assert f(2) == 3"]
    assert env.code_reward(["def f(x): return x + 1"], [tests], timeout_s=1.0) == [pytest.approx(1 / 3)]
    assert time.monotonic() - start < 5


# Needs 1.2 s of CPU on any machine, however fast: it spins until its own CPU clock says so.
HONEST_WORK = """
    import time
    start = time.process_time()
    while time.process_time() - start < 1.2:
        pass
    done = True"""


@needs_sandbox
def test_a_score_does_not_depend_on_its_batch():
    """A program that needs 1.2 s of CPU passes a 2 s limit alone, and still passes beside six programs that spin
    forever, all seven scored at once by code_reward's threads (when each had a seventh of this machine's two cores,
    it got ~0.6 s of CPU before it was stopped)."""
    honest, hog, tests = program(HONEST_WORK), "while True:\n    pass\ndone = True", ["assert done"]
    assert env.code_reward([honest], [tests], timeout_s=2.0) == [1.0]
    batch = [hog] * 3 + [honest] + [hog] * 3
    assert env.code_reward(batch, [tests] * 7, timeout_s=2.0, max_workers=7) == [0.0] * 3 + [1.0] + [0.0] * 3


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
    """Loops, fork and memory bombs, output floods, forged markers, patched builtins: 0, bounded (by the wall-clock
    backstop at worst: a fork bomb's processes share the cores, each with its own CPU limit), nothing left."""
    start = time.monotonic()
    result = sandbox.run_sandboxed(program(HOSTILE_PROGRAMS[name]), ["assert done"], timeout_s=2.0)
    assert result.passed == [False]
    assert time.monotonic() - start < sandbox._wall_s(2.0) + 2
    assert len(result.output) <= 65536
    assert _sandbox_processes() == []


def _first_uid(queue):
    queue.put(sandbox._free_uids().queue[0])


def test_sandbox_uids_are_disjoint_across_processes():
    """A forked process (like another torchrun rank) draws sandbox uids from a block of its own."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_first_uid, args=(queue,))
    child.start()
    assert abs(queue.get(timeout=30) - sandbox._free_uids().queue[0]) >= sandbox._UID_SLOTS
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
    assert env.code_reward([killer], [["assert trainer_killed"]]) == [0.0]
    assert env.code_reward(["x = 1"], [["assert x == 1"]]) == [1.0]


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
    result = sandbox.run_sandboxed(snoop, ["assert leaked == 'hunter2'", "assert via_proc", "assert leaked is None"])
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
        written = f"assert open({str(victim)!r}).read() == 'pwned'"
        assert env.code_reward([write, read], [[write + "\n" + written], [read]]) == [0.0, 0.0]
        litter_code = f"import os\nopen({litter!r}, 'w').write('x')\nos.mkdir({litter + '.d'!r})"
        exists = f"assert os.path.exists({litter!r})"
        assert env.code_reward([litter_code], [[exists]]) == [1.0]  # /tmp is world-writable...
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
        assert env.code_reward([connect], [["assert connected"]]) == [0.0]
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


UNIX_CLIENT = """
    import ctypes, socket
    sent = {{}}
    for name, address in (("pathname", {path!r}), ("abstract", {abstract!r})):
        try:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(1)
            client.connect(address)
            client.sendall(b"hi")
            sent[name] = True
        except OSError as error:
            sent[name] = type(error).__name__
    left, right = socket.socketpair()
    pair_works = left.send(b"x") == 1 and right.recv(1) == b"x"
    libc = ctypes.CDLL(None, use_errno=True)
    io_uring = libc.syscall(425, 1, ctypes.create_string_buffer(120)) == -1 and ctypes.get_errno()  # io_uring_setup
    print(sent, io_uring)"""


@needs_sandbox
def test_sandbox_reaches_no_unix_socket_of_the_host():
    """Code cannot reach a Unix socket this process listens on, by a world-writable path outside the temporary
    directories or by an abstract name, nor make a Unix socket at all (x86_64), nor io_uring, which could make one
    behind the filter's back; socketpair still works."""
    if PLAN.unshare is None and sandbox._SECCOMP is None:
        pytest.skip("neither a network namespace nor a seccomp filter here: host Unix sockets are reachable")
    base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()  # /run: not one of the private ones
    directory = tempfile.mkdtemp(dir=base, prefix="rlvr-test-")
    os.chmod(directory, 0o777)
    path, abstract = f"{directory}/listener", f"\0rlvr-test-{os.getpid()}-{time.monotonic_ns()}"
    listeners = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for listener, address in zip(listeners, (path, abstract)):
            listener.bind(address)
            listener.listen(1)
            listener.settimeout(0.2)
        os.chmod(path, 0o777)
        client = program(UNIX_CLIENT.format(path=path, abstract=abstract))
        tests = ["assert sent['pathname'] == True", "assert sent['abstract'] == True", "assert pair_works == True"]
        if sandbox._SECCOMP is not None:
            tests += ["assert sent['pathname'] == 'PermissionError'", "assert io_uring == 1"]  # EPERM
        result = sandbox.run_sandboxed(client, tests)
        assert result.passed == [False, False, True] + [True] * (len(tests) - 3), result.output[-2000:]
        for listener in listeners:
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        shutil.rmtree(directory, ignore_errors=True)


SOCKET_FAMILIES = """
    import ctypes, errno, os, socket
    libc = ctypes.CDLL(None, use_errno=True)
    def made(family, kind):  # socket(2) itself, as code that bypasses Python's socket module would call it
        fd = libc.syscall(41, ctypes.c_long(family), ctypes.c_long(kind), 0)
        if fd >= 0:
            os.close(fd)
            return True
        return errno.errorcode[ctypes.get_errno()]
    # each family with a type it supports: unix, netlink, vsock (never connected), packet, AF_ALG; then with high
    # bits set in the 64-bit argument, which the kernel ignores (it reads an int)
    refused = {family: made(family, kind) for family, kind in ((1, 1), (16, 3), (40, 1), (17, 3), (38, 5))}
    high_bits = [made((1 << 32) | 40, 1), made((1 << 32) | 2, 1)]
    inet_packet = made(2, 10 | 0o4000)  # AF_INET, SOCK_PACKET | SOCK_NONBLOCK: the kernel makes that a packet socket
    inet6 = made(10, 2)  # AF_INET6, SOCK_DGRAM: EAFNOSUPPORT where IPv6 is off, never EPERM
    inet = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inet.settimeout(1)
    try:
        inet.connect(("192.0.2.1", 9))  # TEST-NET-1: nowhere
        connected = True
    except OSError:
        connected = False
    left, right = socket.socketpair()
    pair_works = left.send(b"x") == 1 and right.recv(1) == b"x"
    print(refused, high_bits, inet_packet, inet6, connected, pair_works)"""


@needs_sandbox
def test_sandbox_makes_only_internet_sockets():
    """socket() works only for AF_INET (and AF_INET6): Unix, netlink, vsock (the VM's host, in no network
    namespace), packet and AF_ALG sockets fail with EPERM, also with high bits set in the family argument; an AF_INET
    socket connects nowhere (an empty network namespace); socketpair still works (x86_64)."""
    if sandbox._SECCOMP is None:
        pytest.skip("no seccomp filter on this architecture")
    tests = ["assert refused == {1: 'EPERM', 16: 'EPERM', 40: 'EPERM', 17: 'EPERM', 38: 'EPERM'}",
             "assert high_bits == ['EPERM', True]", "assert inet_packet == 'EPERM'", "assert inet6 != 'EPERM'",
             "assert pair_works == True"]
    if PLAN.unshare is not None:
        tests.append("assert connected == False")
    result = sandbox.run_sandboxed(program(SOCKET_FAMILIES), tests)
    assert result.passed == [True] * len(tests), result.output[-2000:]


@needs_sandbox
def test_sandbox_runs_in_a_fresh_directory_that_is_removed():
    """cwd, HOME and TMPDIR are one fresh directory, empty at the start and gone afterwards."""
    source = "import os\ncwd = os.getcwd()\nprint(cwd)\nopen('f', 'w').write('x')"
    tests = ["assert os.environ['HOME'] == cwd == os.environ['TMPDIR']", "assert os.listdir() == ['f']"]
    result = sandbox.run_sandboxed(source, tests)
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


def _run_as_nobody(source: str) -> str:
    """Run source with a python as user nobody, and return what it printed; skip where this process cannot switch
    users, nobody cannot import rlvr_rewards, or source prints SKIP."""
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
            return child.stdout
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
            sandbox.run_sandboxed(escape, ["assert True"], timeout_s=1.0)
        else:
            _run_as_nobody("import sandbox\nplan = sandbox._probe_sandbox()\n"
                           "if plan is None or plan.unshare is None:\n    print('SKIP')\n"
                           f"else:\n    sandbox.run_sandboxed({escape!r}, ['assert True'], timeout_s=1.0)")
        time.sleep(0.2)
    finally:
        survivors = _kill_marked(token)
    assert survivors == []


@needs_sandbox
def test_sandbox_sets_no_new_privs():
    """The code runs with no-new-privs, so no setuid program it runs can raise its privileges."""
    source = "status = open('/proc/self/status').read()"
    assert sandbox.run_sandboxed(source, ["assert 'NoNewPrivs:\\t1' in status"]).passed == [True]


@needs_sandbox
def test_sandbox_code_is_dumpable_under_its_own_uid():
    """The code runs dumpable, as after an exec, although its harness switched uid itself: some kernels show the /proc
    entry of a process that is not as its root's, and the cleanup finds a uid's processes by that owner."""
    source = "import ctypes, os\ndumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE"
    assert sandbox.run_sandboxed(source, ["assert dumpable == 1"]).passed == [True]


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
        assert sandbox._run(plan, create, ["assert shmid >= 0"]).passed == [True]
        assert segments() == []
    finally:
        for shmid in segments():
            subprocess.run(["ipcrm", "-m", shmid], check=False)


@needs_sandbox
@pytest.mark.parametrize("mounts", [True, False])
def test_files_in_world_writable_subfolders_do_not_outlive_the_run(mounts):
    """A file the code leaves in a world-writable subfolder of /tmp (/tmp/.X11-unix, mode 1777 on most hosts) is not
    there once the run returns, and the next sample, under another uid, cannot read it: with a mount namespace the
    code had a /tmp of its own; without one (as root), the cleanup looks inside such subfolders."""
    if mounts and not PLAN.mount_proc:
        pytest.skip("no mount namespace here")
    if not mounts and not AS_ROOT:
        pytest.skip("not as root and without a mount namespace the code's files are the training user's own")
    plan = PLAN if mounts else dataclasses.replace(PLAN, mount_proc=False)
    leak = f"/tmp/.X11-unix/rlvr-leak-{os.getpid()}-{time.monotonic_ns()}"
    made = not os.path.isdir("/tmp/.X11-unix")
    if made:
        os.mkdir("/tmp/.X11-unix")
        os.chmod("/tmp/.X11-unix", 0o1777)
    write = f"import os\nos.makedirs('/tmp/.X11-unix', exist_ok=True)\nopen({leak!r}, 'w').write('secret')\nprint(os.getuid())"
    read = f"import os\nprint(os.getuid())\nsecret = open({leak!r}).read()"
    try:
        writer = sandbox._run(plan, write, ["assert True"])
        assert writer.passed == [True], writer.output[-2000:]
        assert not os.path.exists(leak)
        reader = sandbox._run(plan, read, ["assert secret == 'secret'"])
        assert reader.passed == [False]
        if AS_ROOT:
            assert writer.output.split()[0] != reader.output.split()[0]  # two uid slots
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leak)
        if made:
            shutil.rmtree("/tmp/.X11-unix", ignore_errors=True)


READ_ONLY_WRITER = """
    import errno, os
    def wrote(path):
        try:
            with open(path, "w") as f:
                f.write("secret")
            return True
        except OSError as error:
            return errno.errorcode[error.errno]
    outside = wrote({leak!r})
    inside = [wrote(path) for path in ("here", "/tmp/here", "/dev/shm/here", "/dev/null")]
    print(os.getuid(), os.getcwd())"""


@needs_sandbox
@pytest.mark.parametrize("how", ["mount_setattr", "remounts", "run directory elsewhere", "as nobody"])
def test_sandbox_writes_only_its_own_directories(how, monkeypatch):
    """With a mount namespace, code cannot leave a file in a world-writable directory outside the private ones (a
    0777 /run/probe-sandbox-PID here, /var/crash on Ubuntu): every other mount is read-only for it, by mount_setattr
    or, before Linux 5.12, by remounting each one, also not as root (in a user namespace). So nothing appears on the
    host, and the next sample, under another uid, reads nothing; cwd (also when the run's directory lies outside the
    private ones), /tmp, /dev/shm and /dev/null stay writable."""
    if not PLAN.mount_proc:
        pytest.skip("no mount namespace here: the code can write wherever its uid may")
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run, for a world-writable directory outside the private ones")
    if how == "remounts":  # as on a kernel without mount_setattr: syscall -1 fails with ENOSYS
        assert "libc.syscall(442," in sandbox._HARNESS
        monkeypatch.setattr(sandbox, "_HARNESS", sandbox._HARNESS.replace("libc.syscall(442,", "libc.syscall(-1,"))
    probe = f"/run/probe-sandbox-{os.getpid()}"
    os.mkdir(probe)
    os.chmod(probe, 0o777)
    elsewhere = tempfile.mkdtemp(dir="/run", prefix="rlvr-test-")
    if how == "run directory elsewhere":
        os.chmod(elsewhere, 0o755)  # the sandbox's uid must reach its directory in it
        monkeypatch.setattr(tempfile, "tempdir", elsewhere)
    leak = f"{probe}/left-by-a"
    writer_code = program(READ_ONLY_WRITER.format(leak=leak))
    tests = ["assert outside == 'EROFS'", "assert inside == [True, True, True, True]"]
    try:
        if how == "as nobody":
            printed = _run_as_nobody("import sandbox\nplan = sandbox._probe_sandbox()\n"
                                     "if plan is None or not plan.mount_proc:\n    print('SKIP')\n"
                                     f"else:\n    print(sandbox.run_sandboxed({writer_code!r}, {tests!r}))")
            assert "passed=[True, True]" in printed, printed[-2000:]
            assert os.listdir(probe) == []
            return
        writer = sandbox._run(PLAN, writer_code, tests)
        assert writer.passed == [True, True], writer.output[-2000:]
        assert os.listdir(probe) == []
        reader = sandbox._run(PLAN, f"import os\nprint(os.getuid())\nsecret = open({leak!r}).read()",
                              ["assert secret == 'secret'"])
        assert reader.passed == [False]
        if AS_ROOT:
            assert writer.output.split()[0] != reader.output.split()[0]  # two uid slots
        assert writer.output.split()[1].startswith(elsewhere) == (how == "run directory elsewhere")
        assert os.listdir(elsewhere) == []  # the run's directory went too
    finally:
        shutil.rmtree(probe, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


@needs_sandbox
def test_probe_warns_where_mounts_stay_writable(monkeypatch):
    """Where the harness cannot make the mounts read-only (here: it skips that step), the probe still picks the plan
    with a mount namespace, and warns that code can leave files outside the private directories."""
    if not PLAN.mount_proc:
        pytest.skip("no mount namespace here")
    assert "    read_only_mounts(libc)\n" in sandbox._HARNESS
    monkeypatch.setattr(sandbox, "_HARNESS", sandbox._HARNESS.replace("    read_only_mounts(libc)\n", ""))
    monkeypatch.setattr(sandbox, "_PLAN", None)
    with pytest.warns(RuntimeWarning, match="read-only"):
        assert sandbox._probe_sandbox() == PLAN


@needs_sandbox
def test_sandbox_has_its_own_proc_where_mounts_work():
    """With a mount namespace, /proc shows only the sandbox's own PID namespace: the trainer's pid is not there."""
    if not PLAN.mount_proc:
        pytest.skip("no mount namespace here: the sandbox sees the host's /proc")
    source = f"import os\nvisible = os.path.exists('/proc/{os.getpid()}')"
    assert sandbox.run_sandboxed(source, ["assert not visible"]).passed == [True]


def test_sandbox_falls_back_where_its_uids_are_unmapped():
    """As "root" of a user namespace that maps only uid 0 (a rootless container), the probe picks a plan that runs
    as the training user, and code is scored, not zeroed."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or subprocess.run([unshare, "--map-root-user", "true"]).returncode:
        pytest.skip("needs root and unprivileged user namespaces")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = (f"import sys, warnings\nsys.path.insert(0, {repo!r})\nwarnings.simplefilter('ignore')\n"
              "import rlvr_rewards as env, sandbox\n"
              "print(open('/proc/self/uid_map').read().split(), sandbox._ids_mapped(), sandbox._probe_sandbox().as_root,\n"
              "      env.code_reward(['def f(x):\\n    return x + 1'], [['assert f(1) == 2']]))")
    child = subprocess.run([unshare, "--map-root-user", sys.executable, "-c", source], capture_output=True,
                           text=True, timeout=60)
    assert child.stdout.strip() == "['0', '0', '1'] False False [1.0]", child.stderr[-2000:]


@needs_sandbox
def test_failed_probe_is_not_kept_and_code_reward_says_why(monkeypatch):
    """Where no plan works, code_reward raises a RuntimeError naming what was tried and why, rather than score 0;
    the failure is not cached, so once the sandbox works again code is scored."""
    def broken_run(*args, **kwargs):
        raise OSError("fork failed, say")

    run = sandbox._run
    monkeypatch.setattr(sandbox, "_PLAN", None)
    monkeypatch.setattr(sandbox, "_run", broken_run)
    with pytest.raises(RuntimeError, match=r"no working code sandbox.*python.*fork failed, say"):
        env.code_reward(["x = 1"], [["assert x == 1"]])
    assert env.code_reward(["x = 1"], [None]) == [None]  # nothing to run: no error
    monkeypatch.setattr(sandbox, "_run", run)
    assert env.code_reward(["x = 1"], [["assert x == 1"]]) == [1.0]
    assert sandbox._PLAN is not None


def test_importing_rewards_starts_nothing():
    """Importing rlvr_rewards (and sandbox) starts no process and makes no pool: both are made on first use."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = (f"import sys\nsys.path.insert(0, {repo!r})\nimport rlvr_rewards, sandbox\n"
              "print(sandbox._MATH_POOL, sandbox._UID_POOL)")
    assert subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "None None"


# ------------------------------------------------------------------------------------------------ forged scores

# Programs that solve nothing and try to pass `assert f(3) == 7`-style tests anyway. Against the former harness, which
# ran the tests in the program's interpreter, the first six scored 1.0; the last three are checks that stay.
FORGERIES = {
    "frame_walk_blanks_the_tests": """
        import sys
        frame = sys._getframe()
        while frame is not None:  # up into the harness: its job holds the tests
            for value in list(frame.f_locals.values()):
                if isinstance(value, dict) and isinstance(value.get("tests"), list):
                    value["tests"][:] = [(False, "pass") if isinstance(test, tuple) else "pass"
                                         for test in value["tests"]]
            frame = frame.f_back""",
    "frame_walk_writes_passes": """
        import os, sys
        frame, found = sys._getframe(), {}
        while frame is not None:  # the harness's locals: the result pipe's fd, its nonce, the job
            for name, value in list(frame.f_locals.items()):
                found[name] = value
                if isinstance(value, dict):
                    found.update((k, v) for k, v in value.items() if isinstance(k, str))
            frame = frame.f_back
        nonce = found.get("nonce", "")
        nonce = nonce.decode() if isinstance(nonce, bytes) else str(nonce)
        for fd in range(3, 256):  # every descriptor, in every format a harness might read
            for i in range(3):
                try:
                    os.write(fd, f"{nonce} {i}\\n{i} p\\n{i} v True\\n".encode())
                except OSError:
                    pass""",
    "gc_finds_the_job": """
        import gc, os
        for job in gc.get_objects():
            if isinstance(job, dict) and "report_fd" in job:
                for i in range(3):
                    os.write(job["report_fd"], f"{job.get('nonce', '')} {i}\\n{i} p\\n".encode())
                job["tests"][:] = [(False, "pass") if isinstance(t, tuple) else "pass" for t in job["tests"]]""",
    "forge_then_exit": """
        import gc, os
        for job in gc.get_objects():
            if isinstance(job, dict) and "report_fd" in job:
                for i in range(3):
                    os.write(job["report_fd"], f"{job.get('nonce', '')} {i}\\n{i} p\\n".encode())
        os._exit(0)""",
    "crafted_eq": """
        class Anything:
            def __eq__(self, other):
                return True
            def __repr__(self):
                return "7"
        def f(x):
            return Anything()""",
    "int_subclass_with_crafted_eq": """
        class Seven(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
            def __repr__(self):
                return "7"
        def f(x):
            return Seven(0)""",
    "guesses_sprayed_on_every_fd": """
        import os
        for fd in range(256):
            for guess in range(100):
                for i in range(3):
                    try:
                        os.write(fd, b"%d v %d\\n" % (i, guess))
                    except OSError:
                        pass
        def f(x):
            return 0""",
    "patched_builtins": """
        import builtins
        builtins.exec = builtins.eval = builtins.compile = lambda *args, **kwargs: None
        builtins.AssertionError = type("Never", (Exception,), {})
        def f(x):
            return 0""",
    "system_exit_in_del": """
        import os
        class Boom:
            def __del__(self):
                raise SystemExit(0)
            def __repr__(self):
                os._exit(0)
        def f(x):
            return [Boom(), Boom()]""",
}
FORGERY_TESTS = ["assert f(3) == 7", "assert f(10) == 21", "assert 43 == f(21)"]  # f(x) = 2x + 1


@needs_sandbox
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_scores_cannot_be_forged(name):
    """A program that reaches the harness's state (frames, gc), writes to every fd, exits early, crafts __eq__ or
    patches builtins still fails every `assert <expr> == <literal>` test: the expected values never reach it."""
    result = sandbox.run_sandboxed(program(FORGERIES[name]), FORGERY_TESTS)
    assert result.passed == [False, False, False], result.output[-2000:]
    assert sandbox.run_sandboxed("def f(x):\n    return 2 * x + 1", FORGERY_TESTS).passed == [True, True, True]


@needs_sandbox
def test_forgeries_score_zero_on_the_code_task():
    """On the built-in code task the reference answers score 1 and every forgery 0."""
    rows = env.make_dataset("code", n=3, seed=3)
    tests = [row["tests"] for row in rows]
    assert env.code_reward([row["answer"] for row in rows], tests) == [1.0] * 3
    forgeries = [program(forgery) for forgery in FORGERIES.values() for _ in rows]
    assert env.code_reward(forgeries, tests * len(FORGERIES)) == [0.0] * len(forgeries)


SETUP = """
import collections, enum, fractions
class Color(enum.IntEnum):
    RED = 7
Point = collections.namedtuple("Point", "x y")
class Honest:
    def __eq__(self, other):
        return other == 1
"""
# (expression, literal): `assert expression == literal` must pass in the sandbox exactly when it passes in Python.
EQUALITY_CASES = [
    ("True", "1"), ("1", "True"), ("2", "True"), ("1.0", "1"), ("-0.0", "0"), ("1 + 0j", "1"),
    ("complex(2, -3)", "(2-3j)"),
    ("0.1 + 0.2", "0.3"), ("0.1 + 0.2", "0.30000000000000004"), ("10 ** 20", "1e20"), ("10 ** 15", "1e15"),
    ("float('inf')", "1e999"), ("-float('inf')", "-1e999"), ("complex(float('inf'), -1)", "1e999-1j"),
    ("float('nan')", "0"), ("[float('nan')]", "[0]"), ("{1: float('nan')}", "{1: 0}"),
    ("None", "None"), ("None", "0"), ("...", "..."), ("'1'", "1"), ("'é\\n\\x00😀'", "'é\\n\\x00😀'"),
    ("b'\\x00\\xff'", "b'\\x00\\xff'"), ("bytearray(b'ab')", "b'ab'"), ("b'ab'", "'ab'"),
    ("(1,)", "(1,)"), ("(1,)", "[1]"), ("[1, 2]", "(1, 2)"), ("()", "()"), ("[]", "[]"), ("{}", "{}"),
    ("[1, (2, 3), {'a': {4}}]", "[1, (2, 3), {'a': {4}}]"), ("[[[[1]]]]", "[[[[1]]]]"), ("[[[[1]]]]", "[[[[2]]]]"),
    ("{1: 'x', 2: 'y'}", "{2: 'y', 1: 'x'}"), ("{1, 2}", "{2, 1}"), ("{1, 2}", "[1, 2]"), ("set()", "set()"),
    ("frozenset({1})", "{1}"), ("{(1, 2): [3]}", "{(1, 2): [3]}"), ("[1e15, 0, False]", "[1e15, 0j, 0]"),
    ("collections.OrderedDict(a=1)", "{'a': 1}"), ("collections.Counter('aab')", "{'a': 2, 'b': 1}"),
    ("collections.defaultdict(int, a=1)", "{'a': 1}"), ("Point(1, 2)", "(1, 2)"), ("Color.RED", "7"),
    ("2 ** 14000", str(2 ** 14000)), ("2 ** 14000 + 1", str(2 ** 14000)), ("-(2 ** 14000)", str(-(2 ** 14000))),
    ("'x' * 100_000", repr("x" * 100_000)), ("list(range(5000))", repr(list(range(5000)))),
]


@needs_sandbox
def test_value_tests_compare_as_the_assert_would():
    """For plain values the parent's == gives the assert's outcome: True == 1, 1.0 == 1, NaN never equal, nested
    containers, dict subclasses as dicts, namedtuples as tuples, big ints, long strings; the literal may be on either
    side. A value that is not plain data (a Fraction, an object with an honest __eq__) fails: the documented
    difference."""
    namespace = {}
    exec(SETUP, namespace)
    tests = [f"assert {expression} == {literal}" for expression, literal in EQUALITY_CASES]
    expected = [eval(f"{expression} == {literal}", namespace) for expression, literal in EQUALITY_CASES]
    tests += ["assert 7 == Color.RED", "assert fractions.Fraction(1, 2) == 0.5", "assert Honest() == 1"]
    expected += [True, False, False]
    result = sandbox.run_sandboxed(SETUP, tests, timeout_s=10)
    mismatches = [(test[:80], want) for test, got, want in zip(tests, result.passed, expected) if got != want]
    assert mismatches == [], result.output[-3000:]
    assert "plain data, not Fraction" in result.output


def test_which_tests_are_decided_outside_the_child():
    """`assert <expr> == <literal>` in either order (with or without a message, parentheses, line breaks) is a value
    test: the child gets the expression only. Every other form runs whole in the child."""
    value_tests = {"assert f(3) == 7": "f(3)", "assert 7 == f(3)": "f(3)", "assert f(3)==-7, 'msg'": "f(3)",
                   "assert (f(\n  3)) == [1, (2,), {'a': None}]": "f(\n  3)", "assert g() == {1, 2}": "g()",
                   "assert 1 == 2": "1", "assert f('x') == b'y'": "f('x')", "assert f() == 1e999": "f()"}
    for test, expression in value_tests.items():
        parsed = sandbox._parse_test(test)
        assert parsed.is_value and parsed.source == f"({expression}\n)", test
        assert repr(parsed.expected) not in parsed.source or test == "assert 1 == 2"
    statements = ["assert f(3)", "assert f(3) != 7", "assert f(3) == g(3)", "assert f(3) == 10 ** 9",
                  "assert f() == float('nan')", "assert f(3) == 7 == g(3)", "assert f(3) is None",
                  "assert f(3) == 7; assert f(4) == 9", "x = f(3)", "assert not f(3) == 7"]
    for test in statements:
        assert sandbox._parse_test(test) == sandbox._Test(test), test
    assert sandbox._parse_test("assert f(3) ==").source is None


@needs_sandbox
def test_tests_of_other_forms_run_in_the_child_and_are_forgeable():
    """Tests that are not `assert <expr> == <literal>` still run, in order, in the program's namespace, with partial
    credit; but there the child says what passed, so code that blanks them passes them (as documented)."""
    tests = ["assert abs(f(1) - 3) < 1e-9", "y = f(2)", "assert y == 5", "assert f(3) == 10 ** 9", "assert f(1) ==",
             "assert is_prime(7)"]
    honest = "def f(x):\n    return 2 * x + 1\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))"
    assert sandbox.run_sandboxed(honest, tests).passed == [True, True, True, False, False, True]
    forged = sandbox.run_sandboxed(program(FORGERIES["frame_walk_blanks_the_tests"]), ["assert is_prime(7)"])
    assert forged.passed == [True]


@needs_sandbox
def test_hostile_reports_cost_the_parent_nothing():
    """Records the parent cannot use (megabytes of brackets, a set of ints whose hashes all collide, NUL bytes,
    huge indices, a record cut short) make their tests fail, quickly."""
    hostile = program("""
        import os
        collide = "{" + ", ".join(str(k * (2 ** 61 - 1)) for k in range(60_000)) + "}"
        records = [b"0 v " + b"[" * 500_000 + b"]" * 500_000, b"1 v " + collide.encode(), b"2 v 7\\x00",
                   b"99999999999999999999999 p", b"2 v \\xff\\xfe", b"3 v 7"]  # no newline after the last one
        for fd in range(3, 256):
            try:
                os.write(fd, b"\\n".join(records))
            except OSError:
                pass
        os._exit(0)""")
    start = time.monotonic()
    result = sandbox.run_sandboxed(hostile, ["assert f(1) == [[1]]", "assert f(2) == {1, 2}", "assert f(3) == 7",
                                       "assert f(4) == 7"], timeout_s=5)
    assert result.passed == [False] * 4
    assert time.monotonic() - start < 4
    test = sandbox._parse_test("assert f() == [[1]]")
    assert not sandbox._equals(b"[" * 100_000 + b"]" * 100_000, dataclasses.replace(test, cap=10 ** 7))


@needs_sandbox
def test_a_program_that_does_not_compile_scores_zero():
    """Nothing of a program that does not compile runs, so every test fails, even `assert True`."""
    result = sandbox.run_sandboxed("def f(x) return x", ["assert True", "assert 1 == 1", "x = 1"])
    assert result.passed == [False, False, False]
    assert "SyntaxError" in result.output
    assert env.code_reward(["```python\ndef f(x):\nreturn x\n```"], [["assert f(1) == 1"]]) == [0.0]


# ------------------------------------------------------------------------------------------------ cleanup


def _dig(top: str, depth: int, extras: bool = False) -> None:
    """Make a chain of `depth` directories under top (deeper than PATH_MAX allows by name), with a file, a link to
    outside, a FIFO and a read-only subdirectory at some levels when extras."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for level in range(depth):
            if extras and level % 500 == 0:
                os.close(os.open("file", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
                os.symlink("/", "link-to-root", dir_fd=fd)
                os.mkfifo("fifo", dir_fd=fd)
                os.mkdir("locked", 0o000, dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
    finally:
        os.close(fd)


def test_remove_tree_takes_any_depth_and_follows_no_link(tmp_path):
    """_remove_tree removes a 3,000-deep tree (shutil.rmtree raises RecursionError), a wide one, a file, a missing
    path, and never follows a link out of the tree."""
    if os.path.isdir("/dev/shm"):  # a tmpfs: thousands of directories cost no disk
        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="rlvr-test-"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    deep, wide = tmp_path / "deep", tmp_path / "wide"
    deep.mkdir()
    _dig(str(deep), 3000, extras=True)
    os.symlink(outside, deep / "outside-link")
    wide.mkdir()
    for i in range(1000):
        (wide / str(i)).mkdir()
        (wide / str(i) / "f").write_text("x")
    try:
        assert sandbox._remove_tree(str(deep)) and sandbox._remove_tree(str(wide))
        assert not deep.exists() and not wide.exists() and (outside / "keep").read_text() == "x"
        (tmp_path / "file").write_text("x")
        assert sandbox._remove_tree(str(tmp_path / "file")) and sandbox._remove_tree(str(tmp_path / "missing"))
        assert not (tmp_path / "file").exists()
    finally:  # what is left (pytest's own clean-up of old temporary directories would recurse into it)
        subprocess.run(["rm", "-rf", "--one-file-system", str(deep), str(wide)], check=False)
        if str(tmp_path).startswith("/dev/shm/"):
            shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def tmpfs_tempdir(monkeypatch):
    """tempfile's directory (where sandboxes make theirs, and the sweep looks) moved to a fresh one on a tmpfs, where
    thousands of directories cost no disk; removed afterwards."""
    if not os.path.isdir("/dev/shm"):
        yield tempfile.gettempdir()
        return
    base = tempfile.mkdtemp(dir="/dev/shm", prefix="rlvr-test-")
    os.chmod(base, 0o755)  # the sandbox's uid must reach its directory in it
    monkeypatch.setattr(tempfile, "tempdir", base)
    try:
        yield base
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", base], check=False)


DEEP_LITTER = """
    import os
    print(os.getcwd(), flush=True)
    for top in (".", "/dev/shm/{token}"):
        os.chdir("/dev/shm" if top != "." else ".")
        if top != ".":
            os.mkdir("{token}")
            os.chdir("{token}")
        for depth in range(1, 3001):
            os.mkdir("d")
            os.chdir("d")
        open("bottom", "w").write("x")"""


@needs_sandbox
def test_cleanup_removes_deep_trees_and_the_slot_stays_usable(monkeypatch, tmpfs_tempdir):
    """Code that leaves 3,000-deep trees in its directory and in /dev/shm scores normally, both trees are gone, no
    cleanup failure is counted, and its uid slot (drawn again at once) scores the next sample normally."""
    token = f"rlvr-deep-{os.getpid()}"
    if AS_ROOT:  # a pool of one uid: the next run gets the same slot
        one = sandbox.queue.Queue()
        one.put(sandbox._free_uids().get())
        monkeypatch.setattr(sandbox, "_UID_POOL", (os.getpid(), one))
    failures = sandbox.stats()["cleanup_failures"]
    try:
        result = sandbox.run_sandboxed(program(DEEP_LITTER.format(token=token)), ["assert depth == 3000"], timeout_s=10)
        assert result.passed == [True], result.output[-2000:]
        assert not os.path.exists(result.output.splitlines()[0])
        if AS_ROOT:
            assert not os.path.exists(f"/dev/shm/{token}")
        assert sandbox.stats()["cleanup_failures"] == failures
        assert sandbox.run_sandboxed("x = 1", ["assert x == 1"]).passed == [True]
    finally:
        sandbox._remove_tree(f"/dev/shm/{token}")


@needs_sandbox
def test_cleanup_failures_are_counted_and_fail_no_run(monkeypatch):
    """A cleanup step that fails or raises is counted in stats(), the run is scored normally, the next run too, and
    a directory left is removed after a later run."""
    remove_tree, left = sandbox._remove_tree, []

    def fails_once(path, *args, **kwargs):
        if os.path.basename(path).startswith("rlvr-sandbox-") and not left:
            left.append(path)
            return False
        return remove_tree(path, *args, **kwargs)

    def raises(*args, **kwargs):
        raise RuntimeError("a cleanup bug")

    failures = sandbox.stats()["cleanup_failures"]
    monkeypatch.setattr(sandbox, "_remove_tree", fails_once)
    assert sandbox.run_sandboxed("x = 1", ["assert x == 1"]).passed == [True]
    assert sandbox.stats()["cleanup_failures"] == failures + 1 and os.path.isdir(left[0])
    monkeypatch.setattr(sandbox, "_remove_ipc", raises)
    assert sandbox.run_sandboxed("x = 2", ["assert x == 2"]).passed == [True]
    assert sandbox.stats()["cleanup_failures"] == failures + 2
    monkeypatch.undo()
    assert sandbox.run_sandboxed("x = 3", ["assert x == 3"]).passed == [True]
    assert not os.path.exists(left[0])
    assert sandbox.stats()["cleanup_failures"] == failures + 2


@needs_sandbox
def test_stats_count_runs_and_timeouts():
    """stats() counts runs and timeouts (for a trainer to log), and returns a copy."""
    before = sandbox.stats()
    sandbox.run_sandboxed("while True:\n    pass", ["assert True"], timeout_s=0.5)
    sandbox.run_sandboxed("x = 1", ["assert x == 1"])
    after = sandbox.stats()
    assert after["runs"] == before["runs"] + 2 and after["timeouts"] == before["timeouts"] + 1
    assert set(after) >= {"runs", "timeouts", "errors", "cleanup_failures", "stale_removed", "math_untried"}
    after["runs"] = -1
    assert sandbox.stats()["runs"] != -1


# ------------------------------------------------------------------------------------------------ memory

USERNS_TMPFS = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD), fork-like
    if pid == 0:
        os._exit(0)
    cloned = pid > 0
    clone3 = libc.syscall(435, 0, 0) != -1 or ctypes.get_errno() != 38  # ENOSYS
    uid, gid = os.getuid(), os.getgid()
    unshared = libc.unshare(0x10000000 | 0x20000)  # CLONE_NEWUSER | CLONE_NEWNS: root of a namespace of its own
    if unshared == 0:
        for name, line in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
    os.mkdir("mnt")
    mounted = unshared == 0 and libc.mount(b"none", b"mnt", b"tmpfs", 0, b"size=2g") == 0
    written = 0
    if mounted:  # tmpfs pages are in no process's address space: RLIMIT_AS does not see them
        chunk = b"x" * (1 << 20)
        try:
            for i in range(40):
                with open(f"mnt/{i}", "wb") as f:
                    for _ in range(16):
                        written += f.write(chunk)
        except OSError:
            pass
    print(written >> 20, "MiB written to a tmpfs of its own")"""


@needs_sandbox
def test_sandbox_denies_user_namespaces_and_mounts():
    """Code cannot become root of a user namespace (unshare, clone) to mount a tmpfs and fill it past its memory
    limit: the seccomp filter refuses (x86_64)."""
    if sandbox._SECCOMP is None:
        pytest.skip("no seccomp filter on this architecture")
    tests = ["assert cloned == False", "assert clone3 == False", "assert unshared == -1", "assert mounted == False",
             "assert written == 0"]
    result = sandbox.run_sandboxed(program(USERNS_TMPFS), tests, timeout_s=10)
    assert result.passed == [True] * 5, result.output[-2000:]


SHM_FLOOD = """
    import os
    chunk, written = b"x" * (1 << 20), 0
    for i in range(48):  # 768 MiB in /dev/shm (a tmpfs), in files of 16 MiB (max_file_mb)
        with open(f"/dev/shm/rlvr-flood-{token}-{{i}}", "wb") as f:
            for _ in range(16):
                f.write(chunk)
                written += 1
                print(written, flush=True)"""


@needs_sandbox
def test_sandbox_bounds_memory_in_tmpfs():
    """Where a memory cgroup can be made, files written to /dev/shm count against memory_mb: 768 MiB never fit in
    512, and the files are removed afterwards."""
    if sandbox._cgroups() is None:
        pytest.skip("no writable memory cgroup here: memory is bounded per process only (the documented fallback)")
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    try:
        result = sandbox.run_sandboxed(program(SHM_FLOOD.format(token=token)), ["assert written == 768"], timeout_s=10)
        written = max([int(line) for line in result.output.split() if line.isdigit()] or [0])
        assert result.passed == [False] and 0 < written < 512, result.output[-500:]
        assert [name for name in os.listdir("/dev/shm") if token in name] == [] or not AS_ROOT
    finally:
        for name in os.listdir("/dev/shm"):
            if token in name:
                os.unlink(f"/dev/shm/{name}")


# ------------------------------------------------------------------------------------------------ orphans


def _marked(token: str) -> list[int]:
    """Live processes whose command line holds token."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive = open(f"/proc/{pid}/stat").read().rsplit(")")[-1][1] not in "ZX"
            if alive and token.encode() in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0"):
                found.append(int(pid))
        except OSError:
            pass
    return found


@needs_sandbox
def test_killing_the_scorer_kills_its_sandboxes():
    """SIGKILL of the process that scores, while code runs, leaves no sandbox process alive within seconds, and the
    next start-up sweep removes the temporary directory it left."""
    if PLAN.unshare is None and not AS_ROOT:
        pytest.skip("without namespaces or root, code that outlives the trainer cannot be told from the trainer's")
    token = f"rlvr-orphan-{os.getpid()}-{time.monotonic_ns()}"
    sleeper = ("import os, sys\n"
               f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {token!r}])")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = (f"import sys\nsys.path.insert(0, {repo!r})\nimport sandbox\n"
              f"sandbox.run_sandboxed({sleeper!r}, ['assert True'], timeout_s=60)")
    scorer = subprocess.Popen([sys.executable, "-c", source])
    try:
        for _ in range(600):
            if _marked(token):
                break
            time.sleep(0.05)
        assert _marked(token), "the sandbox never started"
        directories = [name for name in os.listdir(tempfile.gettempdir()) if f"rlvr-sandbox-{scorer.pid}-" in name]
        scorer.kill()
        scorer.wait()
        for _ in range(100):
            if not _marked(token):
                break
            time.sleep(0.05)
        assert _marked(token) == []
        assert directories and sandbox._sweep_stale() >= 1
        assert [name for name in os.listdir(tempfile.gettempdir()) if f"rlvr-sandbox-{scorer.pid}-" in name] == []
    finally:
        scorer.kill()
        for pid in _marked(token):
            os.kill(pid, 9)


@pytest.mark.skipif(not AS_ROOT, reason="sandbox uids exist only as root")
def test_startup_sweep_removes_what_dead_trainers_left(tmpfs_tempdir):
    """What a dead trainer's sandboxes left (a process of its uid, a /dev/shm file, a System V segment, a deep
    temporary directory) is removed by the sweep a process makes on first use; a live trainer's is not touched."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner, live = dead.pid, os.getpid()
    uid, live_uid = (sandbox._UID_BASE + pid * sandbox._UID_SLOTS + 5 for pid in (owner, live))
    paths = {pid: (f"{tempfile.gettempdir()}/rlvr-sandbox-{pid}-left", f"/dev/shm/rlvr-left-{pid}")
             for pid in (owner, live)}
    processes = []
    try:
        for pid, user in ((owner, uid), (live, live_uid)):
            directory, shm = paths[pid]
            os.mkdir(directory)
            _dig(directory, 3000)
            open(shm, "w").close()
            os.chown(shm, user, user)
            processes.append(subprocess.Popen(["sleep", "60"], user=user, group=user, extra_groups=[],
                                              start_new_session=True))
        try:
            os.kill(owner, 0)
            pytest.skip("the dead pid was reused")
        except ProcessLookupError:
            pass
        assert sandbox._sweep_stale() >= 3
        assert processes[0].wait(5) == -9 and processes[1].poll() is None
        assert not any(map(os.path.exists, paths[owner])) and all(map(os.path.exists, paths[live]))
    finally:
        for process in processes:
            process.kill()
            process.wait()
        for path in paths[live]:
            sandbox._remove_tree(path)


# ------------------------------------------------------------------------------------------------ math-verify


def test_math_verify_batch_has_a_time_budget():
    """A batch of hostile LaTeX (each pair would take its whole timeout) returns within its budget plus half a
    second; the pairs left get "t" untried (counted), and the workers answer the next batch."""
    if sandbox.math_verify([("\\boxed{1}", "\\boxed{1}")], 10) == ["x"]:  # also starts the workers
        pytest.skip("math-verify is not installed")
    hostile = [("\\boxed{1}", "\\boxed{9^{9^{9^{9^{9}}}}}")] * 16
    untried = sandbox.stats()["math_untried"]
    start = time.monotonic()
    verdicts = sandbox.math_verify(hostile, 0.5, budget_s=1.5)
    assert time.monotonic() - start < 1.5 + 1.0
    assert set(verdicts) == {"t"} and sandbox.stats()["math_untried"] > untried
    assert sandbox.math_verify([("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"), ("\\boxed{2}", "\\boxed{3}")], 10) == ["1", "0"]
