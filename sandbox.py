"""sandbox.py: running code we did not write, and the math-verify worker processes. Imports nothing of ours.

Two things live here because both run outside the trainer's interpreter, in processes it starts, limits and
kills: the code sandbox (run_sandboxed), where a model's program meets its tests, and the pool of math-verify
processes (math_verify), whose parser is given text a model wrote. Importing this module starts nothing: the
pools are made on first use, and anew in a forked child.

The code sandbox. Each run_sandboxed call runs in its own process tree (Linux):
  - set by the harness before any model code runs: no-new-privs (a setuid program gains nothing), limits on CPU
    seconds, address space (memory_mb), processes (max_processes), file size (max_file_mb; output goes to a file,
    so a flood of prints stops there), open files, no core dumps; after the wall-clock timeout the whole tree is
    SIGKILLed;
  - `python -I -S` (standard library only), cwd = HOME = TMPDIR = a fresh temporary directory removed
    afterwards, an empty environment;
  - as root, the code runs under an unprivileged uid of its own (one per concurrent slot): it cannot write
    outside its directory and the world-writable ones, read others' 0600 files, or signal the trainer, and
    RLIMIT_NPROC is enforced (the kernel ignores it for root). Afterwards every process of that uid is killed,
    its System V IPC objects removed, and what it left at the top of /tmp, /var/tmp, /dev/shm and /run/lock
    deleted. Where those uids do not exist (root of a rootless container) it runs as below, with a warning;
  - with util-linux `unshare` (probed until one works): new network (no network, not even loopback), IPC
    (System V shared memory dies with the run) and PID namespaces, and a /proc of its own where a mount
    namespace works (the trainer is invisible); the trainer kills the namespace's init, and with it every
    process in the namespace, however it detached. Not as root, through an unprivileged user namespace where
    the kernel allows one (there the code is root of its namespace and could unmount its /proc);
  - test outcomes come back on a private pipe tagged with a per-run random nonce: printed "passed" lines count
    for nothing.
It cannot stop code from reading world-readable files, from filling its directory with many files up to the
size limit within the timeout, or from forging outcomes by inspecting the harness's memory (tests run in the
solution's interpreter); a crafted __eq__ fools `assert f(x) == y`. Not as root, the code can write wherever
the training user can; without unshare it also keeps the network and the host's System V IPC and, not as
root, can signal the trainer (a warning says which). For RL on untrusted code, train as root in a container or
VM. If root's Python lives where other users cannot enter (e.g. pyenv under /root), the sandbox runs a system
python3 instead. require_sandbox() raises RuntimeError, naming every plan it tried, where no sandbox works.

math-verify. Its own timeout is signal.alarm, which works only in a main thread, so checks run in small persistent
worker processes (at most 4), each with a 4 GiB address-space limit and its own timer per pair; the parent kills a
worker that has not answered within timeout + 1 s and starts a fresh one for the next pair.
"""

import atexit
import contextlib
import ctypes
import itertools
import json
import marshal
import math
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ math-verify

# math-verify's own timeout is signal.alarm, which works only in a main thread, so its checks run in small
# persistent worker processes. Each arms its own timer around parse + verify (a timeout costs no restart); the
# parent kills a worker that has not answered after timeout + 1 s (stuck in C code, deaf to its timer).
_MATH_WORKER = r"""
import json, logging, resource, signal, sys
logging.disable(logging.WARNING)
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from math_verify import parse, verify
except Exception:
    print("x", flush=True)
    sys.exit()
class Timeout(BaseException): pass
def alarm(signum, frame): raise Timeout()
signal.signal(signal.SIGALRM, alarm)
def check(gold, pred):
    g, p = parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None)
    return "g" if not g else "u" if not p else "1" if verify(g, p, timeout_seconds=None) else "0"
print("ready", flush=True)
for line in sys.stdin:
    gold, pred, timeout_s = json.loads(line)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            verdict = check(gold, pred)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Timeout:
        verdict = "t"
    except Exception:
        verdict = "e"
    print(verdict, flush=True)
"""


class _MathWorker:
    """One math-verify process; check() answers one (gold, pred) pair. A worker that is stuck or dead is
    killed, and the next check starts a fresh one."""

    def __init__(self):
        self.proc = None

    def _read_line(self, timeout_s: float) -> str | None:
        ready = select.select([self.proc.stdout], [], [], timeout_s)[0]  # the worker writes whole lines
        return self.proc.stdout.readline().decode().strip() if ready else None

    def check(self, gold: str, pred: str, timeout_s: float) -> str:
        try:
            if self.proc is None:
                self.proc = subprocess.Popen([sys.executable, "-c", _MATH_WORKER], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
                if self._read_line(60.0) != "ready":  # importing sympy takes a moment, once
                    self.kill()
                    return "x"
            self.proc.stdin.write((json.dumps([gold, pred, timeout_s]) + "\n").encode())
            self.proc.stdin.flush()
            verdict = self._read_line(timeout_s + 1.0)
        except OSError:
            verdict = ""
        if not verdict:
            self.kill()
        return verdict or ("t" if verdict is None else "e")

    def kill(self):
        if self.proc is not None:
            for step in (self.proc.kill, self.proc.stdin.close, self.proc.stdout.close):
                with contextlib.suppress(OSError):
                    step()
            self.proc.wait()
            self.proc = None


_MATH_POOL: tuple[int, list[_MathWorker], threading.Lock] | None = None  # (owner pid, workers, lock)


def _math_pool() -> tuple[list[_MathWorker], threading.Lock]:
    """The worker pool of this process, made on first use: importing this module starts nothing, and a forked child
    (whose pid differs from the owner's) makes its own instead of sharing its parent's workers, pipes and lock."""
    global _MATH_POOL
    if _MATH_POOL is None or _MATH_POOL[0] != os.getpid():
        if _MATH_POOL is None:
            atexit.register(lambda: [worker.kill() for worker in _math_pool()[0]])
        workers = [_MathWorker() for _ in range(max(1, min(4, os.cpu_count() or 1)))]
        _MATH_POOL = (os.getpid(), workers, threading.Lock())
    return _MATH_POOL[1], _MATH_POOL[2]


def math_verify(pairs: list[tuple[str, str]], timeout_s: float) -> list[str]:
    """math-verify's verdict on each (gold, prediction) pair of LaTeX strings: "1" equal, "0" not, "u" prediction
    unparseable, "g" gold unparseable, "t" timeout, "e" error, "x" no math-verify. Worker k takes pairs k, k + W,
    k + 2W, ... in its own thread; one batch at a time."""
    workers, lock = _math_pool()
    verdicts = [""] * len(pairs)

    def serve(k: int):
        for i in range(k, len(pairs), len(workers)):
            verdicts[i] = workers[k].check(*pairs[i], timeout_s)

    with lock, ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(serve, range(min(len(workers), len(pairs)))))
    return verdicts


# ------------------------------------------------------------------------------------------------ code sandbox

# The harness runs inside the sandbox. It reads its job from stdin (nothing on disk or in argv), sets no-new-privs
# and lowers its limits before any model code runs, then runs the program and each test in one namespace, writing
# "nonce i" for each passing test to a pipe only the parent reads. Its default arguments bind exec, compile, ... at
# definition time, so a solution that patches builtins cannot make the tests vacuous.
_HARNESS = r"""
import marshal, os, resource, sys
def main(exec=exec, compile=compile, enumerate=enumerate, write=os.write, excepthook=sys.__excepthook__,
         exc_info=sys.exc_info, BaseException=BaseException):
    job = marshal.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    try:  # PR_SET_NO_NEW_PRIVS (38): no setuid program the code runs can raise its privileges; for good
        import ctypes
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    except Exception:
        pass
    for name, value in job["limits"]:
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (AttributeError, ValueError, OSError):
            pass
    report, nonce, namespace = job["report_fd"], job["nonce"].encode(), {"__name__": "__main__"}
    def run(source, name):
        try:
            exec(compile(source, name, "exec", dont_inherit=True), namespace)
            return True
        except BaseException:
            try:
                excepthook(*exc_info())
            except BaseException:
                pass
            return False
    run(job["program"], "<solution>")
    for index, test in enumerate(job["tests"]):
        if run(test, "<test %d>" % index):
            write(report, b"%s %d\n" % (nonce, index))
main()
"""
# Unprivileged uids for the sandboxes, far from any real account: one per concurrent run, from a block of 64 that
# the trainer process's pid makes its own (torchrun ranks on one machine must not kill each other's sandboxes).
_UID_BASE, _UID_SLOTS = 1_500_000_000, 64


_UID_POOL: tuple[int, queue.Queue] | None = None  # (owner pid, free uids)
_UID_POOL_LOCK = threading.Lock()


def _free_uids() -> queue.Queue:
    """This process's free sandbox uids, made on first use (and anew in a forked child, whose pid owns another
    block)."""
    global _UID_POOL
    with _UID_POOL_LOCK:
        if _UID_POOL is None or _UID_POOL[0] != os.getpid():
            free = queue.Queue()
            for uid in range(_UID_BASE + os.getpid() * _UID_SLOTS, _UID_BASE + (os.getpid() + 1) * _UID_SLOTS):
                free.put(uid)
            _UID_POOL = (os.getpid(), free)
        return _UID_POOL[1]

_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")


@dataclass(frozen=True)
class _Plan:
    python: str  # an interpreter the sandbox's uid can run
    unshare: str | None  # util-linux unshare, when namespaces work here
    as_root: bool  # run the code under a per-slot unprivileged uid
    mount_proc: bool = False  # a /proc of the sandbox's own PID namespace (needs a mount namespace)

    def command(self, uid: int | None) -> list[str]:
        run = [self.python, "-I", "-S", "-c", _HARNESS]
        if self.unshare is None:
            return run
        namespaces = ["--net", "--pid", "--ipc", "--fork", "--kill-child"] + ["--mount-proc"] * self.mount_proc
        if self.as_root:
            return [self.unshare, *namespaces, f"--setgid={uid}", f"--setuid={uid}", "--", *run]
        return [self.unshare, "--map-root-user", *namespaces, "--", *run]


@dataclass
class SandboxResult:
    passed: list[bool]  # one per test
    output: str  # the first max_output_bytes of stdout and stderr
    timed_out: bool


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process of uid: the slot is ours alone, so that is exactly the sandbox's tree."""
    for _ in range(100):
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().rsplit(")")[-1][1] in "ZX":  # a zombie is dead already; its parent reaps it
                        continue
                alive.append(int(pid))
                os.kill(int(pid), signal.SIGKILL)
        if not alive:
            return
        time.sleep(0.002)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox. unshare's child is the init of the sandbox's PID namespace, and when it dies the kernel
    kills everything in the namespace, even code that left the session and cleared its parent-death signal (which
    the process-group kill and unshare --kill-child alone would miss). unshare is stopped first so that it cannot
    reap that child and free its pid while we read it."""
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGSTOP)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as children:
            for pid in children.read().split():
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _remove_ipc(uid: int) -> None:
    """Remove the System V shared memory, message queues and semaphores that uid created or owns: outside an IPC
    namespace they outlive their processes, holding memory no rlimit counts and passing data to the next sample."""
    libc = ctypes.CDLL(None)
    remove = {"shm": lambda id_: libc.shmctl(id_, 0, None), "msg": lambda id_: libc.msgctl(id_, 0, None),
              "sem": lambda id_: libc.semctl(id_, 0, 0)}  # 0 is IPC_RMID
    for kind, remove_one in remove.items():
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/sysvipc/{kind}") as table:
                header, *rows = table.read().splitlines()
            owner, creator = header.split().index("uid"), header.split().index("cuid")
            for fields in map(str.split, rows):
                if uid in (int(fields[owner]), int(fields[creator])):
                    remove_one(int(fields[1]))


def _sweep_files(uid: int, keep: str) -> None:
    """Delete what uid left at the top of the world-writable directories (whatever it made lies below)."""
    for directory in {*_SHARED_DIRS, tempfile.gettempdir()}:
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(directory)):
                with contextlib.suppress(OSError):
                    if entry.path != keep and entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """True if proc exits within timeout_s. A pidfd wakes us the moment it does; Popen.wait would poll."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            return proc.wait(timeout_s) is not None
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def _run(plan: _Plan, program: str, tests: list[str], *, timeout_s: float = 3.0, memory_mb: int = 512,
         max_processes: int = 4, max_file_mb: int = 16, max_output_bytes: int = 65536) -> SandboxResult:
    nonce = secrets.token_hex(16)
    limits = [("RLIMIT_CPU", math.ceil(timeout_s)), ("RLIMIT_AS", memory_mb << 20), ("RLIMIT_NPROC", max_processes),
              ("RLIMIT_FSIZE", max_file_mb << 20), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)]
    uid = _free_uids().get() if plan.as_root else None
    try:
        with tempfile.TemporaryDirectory(prefix="rlvr-sandbox-", ignore_cleanup_errors=True) as tmp, \
                tempfile.TemporaryFile(dir=tmp) as output:  # nameless: the code cannot swap it for a FIFO
            if uid is not None:
                os.chown(tmp, uid, uid)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
            as_user = {"user": uid, "group": uid, "extra_groups": []} if uid and plan.unshare is None else {}
            (read_fd, write_fd), report = os.pipe(), b""
            try:
                try:
                    proc = subprocess.Popen(plan.command(uid), stdin=subprocess.PIPE, stdout=output, cwd=tmp, env=env,
                                            stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True,
                                            **as_user)
                finally:
                    os.close(write_fd)
                job = {"program": program, "tests": tests, "limits": limits, "report_fd": write_fd, "nonce": nonce}
                try:
                    with contextlib.suppress(OSError):  # the harness reads its job first thing, or has died
                        proc.stdin.write(marshal.dumps(job, 4))  # marshal: nothing to import in the child
                        proc.stdin.close()
                    timed_out = not _wait(proc, timeout_s)
                finally:  # the PID namespace or the session holds the tree; the uid sweep catches what left it
                    _kill_tree(proc)
                    if uid is not None:
                        _kill_uid(uid)
                        _remove_ipc(uid)
                os.set_blocking(read_fd, False)
                with contextlib.suppress(OSError):
                    report = os.read(read_fd, 1 << 20)
            finally:
                os.close(read_fd)
            passed = [False] * len(tests)
            for tag, _, index in (line.partition(b" ") for line in report.split(b"\n")):
                if tag == nonce.encode() and index.isdigit() and int(index) < len(tests):
                    passed[int(index)] = True
            output.seek(0)
            text = output.read(max_output_bytes).decode(errors="replace")
        if uid is not None:
            _sweep_files(uid, keep=tmp)
        return SandboxResult(passed, text, timed_out)
    finally:
        if uid is not None:
            _free_uids().put(uid)


def _ids_mapped() -> bool:
    """Whether every sandbox uid and gid exists here: not so in a user namespace with a short map, e.g. as "root"
    of a rootless container (uid_map "0 65534 1"), where switching to them fails."""
    low, high = _UID_BASE, _UID_BASE + (1 << 22) * _UID_SLOTS  # 2^22: one past the largest pid Linux hands out
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as id_map:
                extents = [tuple(map(int, line.split())) for line in id_map]
        except OSError:  # no user namespaces here: every id exists
            continue
        if not any(inside <= low and high <= inside + count for inside, _, count in extents):
            return False
    return True


_PLAN: _Plan | None = None  # the sandbox found by the probe; a failed probe is not kept, so the next call retries


def _probe_sandbox(failures: list[str] | None = None) -> _Plan | None:
    """The strongest isolation that works here, found once: under an unprivileged uid of its own where we are root
    and can switch to one, else as the training user; with namespaces (and its own /proc) where util-linux unshare
    works, else without; our interpreter, else (as root, where ours may sit in a directory the unprivileged uid
    cannot enter) a system python3. None if nothing works, each failed try described in `failures`."""
    global _PLAN
    if _PLAN is not None:
        return _PLAN
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    pythons = [sys.executable] + [path for path in ("/usr/bin/python3", "/usr/local/bin/python3")
                                  if root and os.path.exists(path) and path != sys.executable]
    unshare = shutil.which("unshare") if sys.platform.startswith("linux") else None
    namespaces = ([(unshare, True), (unshare, False)] if unshare else []) + [(None, False)]
    for as_root in ([True] if root and _ids_mapped() else []) + [False]:
        for (namespace, mount_proc), python in itertools.product(namespaces, pythons):
            plan = _Plan(python, namespace, as_root, mount_proc)
            try:
                result = _run(plan, "import collections, math, re", ["assert 1 + 1 == 2"], timeout_s=10)
                error = None if result.passed == [True] else (result.output.strip().splitlines() or ["no output"])[-1]
            except Exception as exception:
                error = repr(exception)
            if error is not None:
                if failures is not None:
                    failures.append(f"`{' '.join(plan.command(_UID_BASE)[:-2])}`: {error}")
                continue
            if root and not as_root:
                warnings.warn("the code sandbox cannot switch to an unprivileged uid here (the uids from "
                              f"{_UID_BASE} are not mapped in this user namespace, or setuid fails): code runs as "
                              "root and can write wherever root can", RuntimeWarning)
            if namespace is None:
                warnings.warn("the code sandbox has no namespaces here: code keeps network access"
                              + ("" if as_root else " and can signal the trainer"), RuntimeWarning)
            _PLAN = plan
            return plan
    return None


_PROBE_LOCK = threading.Lock()


def require_sandbox() -> _Plan:
    """The sandbox, or a RuntimeError that names every plan tried and why it failed."""
    failures = []
    with _PROBE_LOCK:
        plan = _probe_sandbox(failures)
    if plan is None:
        raise RuntimeError("no working code sandbox on this machine, so code cannot be scored (it would score 0); "
                           "tried " + "; ".join(failures))
    return plan


def run_sandboxed(program: str, tests: list[str] = (), *, timeout_s: float = 3.0, memory_mb: int = 512,
                  max_processes: int = 4, max_file_mb: int = 16, max_output_bytes: int = 65536) -> SandboxResult:
    """Run program, then each test statement, in the sandbox described at the top of this file. Raises only
    RuntimeError, where no sandbox works on this machine; a failure of one run scores its tests as failed."""
    tests = [str(test) for test in tests]
    plan = require_sandbox()
    try:
        return _run(plan, program if isinstance(program, str) else "", tests, timeout_s=timeout_s,
                    memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb,
                    max_output_bytes=max_output_bytes)
    except Exception as error:  # e.g. fork failing under load: the sample scores 0 and training goes on
        return SandboxResult([False] * len(tests), f"sandbox error: {error!r}", False)
