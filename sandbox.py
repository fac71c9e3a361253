"""sandbox.py: running code we did not write, and the math-verify worker processes. Imports nothing of ours.

Two things live here because both run outside the trainer's interpreter, in processes it starts, limits and
kills: the code sandbox (run_sandboxed), where a model's program meets its tests, and the pool of math-verify
processes (math_verify), whose parser is given text a model wrote. Importing this module starts nothing: the
pools are made on first use, and anew in a forked child. stats() counts runs, timeouts, errors and cleanup
failures, for a trainer to log.

Who decides a score. The program runs in a child interpreter, and for a test of the form
`assert <expr> == <literal>` or `assert <literal> == <expr>` (the built-in code task's form), with <literal>
anything ast.literal_eval reads (numbers, strings, bytes, True, False, None, and tuples, lists, dicts and sets of
them), nothing that decides the outcome runs there: this process parses the test and sends the child only <expr>;
the child sends back its value as literal text, which this process reads with ast.literal_eval and compares with ==
to the literal. The expected values never reach the child, so whatever its code does (walk the harness's frames,
gc.get_objects(), write to any file descriptor, exit early, patch builtins or, with ctypes, its interpreter) it
passes such a test only by sending a value equal to the expected one: by computing it, by guessing it (a test whose
answer is True or 0 is easy to guess; one guess per test, the first record counts), or by finding it in a
world-readable file (below). The value must be plain data: None, bool, int, float, complex, str, bytes, bytearray,
list, tuple, dict, set, frozenset or Ellipsis, a subclass counting as its base type (read through the base type's
slots: its own __eq__, __iter__, __repr__ are never called); anything else (an object with a crafted __eq__, a
Fraction, a generator) fails the test. So a crafted return value can no longer pass a test: its methods run only in
the child, which decides nothing, and the most they can do is fail or stall their own run (raise, hang in __del__),
as any code can. Between plain values, == here is the assert's ==: `True == 1`, `1.0 == 1`, `-0.0 == 0`,
`frozenset({1}) == {1}`, an OrderedDict, Counter or defaultdict equals the dict, a namedtuple the tuple. A NaN
anywhere in the value fails the test, as it would fail the assert (no literal holds a NaN); inf is written 1e999. A
value whose text exceeds 1 MiB fails. A test of any other form (`assert is_prime(7)`, `assert f(x) == g(x)`,
`assert abs(f(1) - 0.5) < 1e-9`, `assert f(3) == 10**9 + 7`, `assert f() == float('nan')`, two statements) runs
whole in the child, which reports that it passed: code can forge any such test. A program that does not compile
fails every test (none of it runs). The output shows no AssertionError for a wrong value: the child never learns
that it was wrong.

The code sandbox. Each run_sandboxed call runs in its own process tree (Linux):
  - set by the harness before any model code runs (with a mount namespace, after it has made the mounts read-only,
    mounted the private directories below and switched to the run's uid): a parent-death signal (SIGKILL),
    no-new-privs (a setuid program gains nothing), on x86_64 a seccomp filter under which unshare, setns, mount,
    umount2, pivot_root and the new mount API fail with EPERM, clone with a namespace flag fails with EPERM and
    clone3 with ENOSYS (glibc then falls back to clone), socket() succeeds only for AF_INET and AF_INET6 (not of
    type SOCK_PACKET; in the network namespace below they reach nothing) and fails with EPERM for every other
    family, as io_uring does: no Unix socket of the host can be reached, wherever its path lies, nor the VM's host
    by vsock (which no network namespace holds), nor a netlink, packet, AF_ALG or bluetooth socket made (socketpair
    still works, for AF_UNIX only: it connects the process to itself; io_uring could make and connect a socket
    behind the filter's back). The filter reads the family's low 32 bits, as the kernel does (an int). On other
    architectures there is no filter. Also limits on CPU seconds (below), address space (memory_mb), processes
    (max_processes), file size (max_file_mb; output goes to a file, so a flood of prints stops there), open files,
    no core dumps. The filter also refuses every 32-bit (int 0x80) and x32 system call, through which it could be
    bypassed;
  - time is CPU time, so that a score does not depend on what runs beside it: at most one run per core this process
    may use (its affinity mask) executes code at once, however many threads call run_sandboxed (code_reward's do),
    and a run's clocks start only once it has its core, so waiting costs it nothing. Each process of the run may
    then use timeout_s CPU seconds, rounded up to a whole second (the kernel SIGKILLs it there), and a wall-clock
    backstop of three times that SIGKILLs the whole tree: CPU-bound code meets its CPU limit first even with a third
    of a core, and the backstop ends code that sleeps or blocks. SandboxResult.timed_out says that the run reached
    either (its CPU time read within 0.1 s of the limit). Weaker: the bound is per process (torchrun ranks on one
    machine have one each), counts runs, not processes (a program that forks spinning children takes up to
    max_processes cores from its neighbours, until the backstop), and does not see a CPU quota (cgroup cpu.max) below
    the affinity mask;
  - memory: where this process can make memory cgroups (cgroup v2 with the memory controller enabled for the
    children of its cgroup or of its cgroup's parent; else cgroup v1's memory hierarchy), each run gets one
    limited to memory_mb without swap, which bounds everything the tree holds, tmpfs files (/dev/shm) and memfds
    included. Without one (the fallback) memory is bounded only per process, by RLIMIT_AS (so max_processes ×
    memory_mb in all), files in the private directories below by memory_mb each, and memfds (and, without a mount
    namespace, files in the host's /dev/shm) only by max_file_mb each, times the files the code makes in its time;
  - `python -I -S` (standard library only), cwd = HOME = TMPDIR = a fresh temporary directory removed
    afterwards, an empty environment;
  - a read-only machine with private temporary directories, where a mount namespace works: every mount the run
    inherits, its own /proc included, is made private (nothing done in it propagates back to the host) and then
    read-only for the run, all at once with mount_setattr (Linux 5.12 or later), else by remounting each mount in
    turn, as far as the kernel lets (the probe warns where even / stays writable). Then /tmp, /var/tmp, /dev/shm and
    /run/lock (those that exist) are each a fresh tmpfs of the run's own (at most memory_mb, nosuid, nodev), mounted
    by the harness while it is root of the namespace, before the seccomp filter forbids mounting; the run's
    directory, when it lies below one of them (the default), is made afresh in it, else the host's is bound over
    itself and made writable alone (nosuid, nodev). Those are the only directories the code can write in; besides
    them it writes device files (a read-only mount does not apply to them: /dev/null works), memfds, and the output
    file and pipe it was handed. A file in any other world-writable directory (a 0777 /run/x, Ubuntu's /var/crash of
    mode 1777) is refused with EROFS. What the code writes in the private ones, sockets included, no other sample
    sees, and it dies with the run's mount namespace. Without a mount namespace these directories are the host's,
    and only the cleanup below (as root: files of the run's uid) removes what the code left; what it leaves in other
    world-writable directories stays, for a later sample to read;
  - as root, the code runs under an unprivileged uid of its own (one per concurrent slot): it cannot write
    outside its directory and the world-writable ones (with a mount namespace, outside the places above), read
    others' 0600 files, or signal the trainer, and RLIMIT_NPROC is enforced (the kernel ignores it for root).
    Afterwards every process of that uid is killed, its System V IPC objects removed, and what it left in the
    host's /tmp, /var/tmp, /dev/shm and /run/lock deleted: at their top, and inside the world-writable
    subdirectories of others (/tmp/.X11-unix, mode 1777 on most hosts) down to three levels. Where those uids do
    not exist (root of a rootless container) it runs as below, with a warning;
  - with util-linux `unshare` (probed until one works): new network (no network, not even loopback, and no abstract
    Unix socket of the host, as those belong to a network namespace), IPC (System V shared memory dies with the run)
    and PID namespaces, and where a mount namespace works a /proc of its own (the trainer is invisible) and the
    read-only mounts and private directories above; the trainer kills the namespace's init, and with it every
    process in the namespace, however it detached. Not as root, through an unprivileged user namespace where the
    kernel allows one (there the code is root of its namespace; the seccomp filter keeps it from mounting, and from
    undoing the read-only mounts);
  - a killed trainer, even by SIGKILL, takes its sandboxes with it: the harness dies with `unshare` (its
    parent-death signal is set after the uid switch, which clears it), and `unshare` with the trainer where
    util-linux `setpriv` is present. On first use in a process, what the sandboxes of dead trainers left is
    removed: processes of their uids, their System V IPC objects and files in the world-writable directories
    (looked into as above), rlvr-sandbox-PID-* temporary directories and cgroups;
  - cleanup never recurses (a directory tree of any depth goes), never raises, and never fails a later run: a
    failure is counted (stats()["cleanup_failures"]), the uid is cleaned again before its next run, and a
    directory or cgroup left is retried after each later run.
It cannot stop code from reading every world-readable file on the machine: a dataset on disk, this repository
(whose code makes the built-in tasks, so their expected values can be recomputed), installed packages (which it
can import by adding them to sys.path), and without a /proc of its own the command lines of other processes. Nor,
where its directory is not below one of the private ones (without a mount namespace, or with TMPDIR elsewhere), from
filling it with many files up to the size limit in its time, or from forging the tests of other forms above. Not as
root and without a mount namespace, the code can write wherever the training user can, and what it detaches
survives a killed trainer unless a PID namespace holds it; without unshare it also keeps the network and the host's
System V IPC and, not as root, can signal the trainer (a warning says which). Without the seccomp filter (not
x86_64) it can connect to the host's pathname Unix sockets that its uid may write (private directories hide only
those below them, and a read-only mount does not stop a connect: /run's stay in reach), and without a network
namespace to abstract ones too, and make sockets of any family its uid may (vsock among them, which reaches a VM's
host from any network namespace); not as root (root of a user namespace), it could also undo the read-only mounts.
For RL on untrusted code, train as root in a container or VM. If root's Python lives where other users cannot enter
(e.g. pyenv under /root), the sandbox runs a system python3 instead.
require_sandbox() raises RuntimeError, naming every plan it tried, where no sandbox works.

math-verify. Its own timeout is signal.alarm, which works only in a main thread, so checks run in small persistent
worker processes (at most 4), each with a 4 GiB address-space limit and its own timer per pair; the parent kills a
worker that has not answered within that timer + 1 s and starts a fresh one for the next pair. A batch has a time
budget too (math_verify's budget_s): once it is spent, the pairs not yet checked get "t" untried, and a worker
still busy is killed, so a batch returns within budget_s + 0.5 s.
"""

import ast
import atexit
import contextlib
import ctypes
import errno
import itertools
import json
import marshal
import math
import os
import platform
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ counters

_STATS = dict.fromkeys(("runs", "timeouts", "errors", "cleanup_failures", "stale_removed", "math_untried"), 0)
_STATS_LOCK = threading.Lock()


def stats() -> dict[str, int]:
    """Counts since this module was imported (a forked child starts from its parent's): runs (run_sandboxed calls),
    timeouts (runs that reached their CPU limit or wall-clock backstop), errors (runs that failed to start or finish,
    scored 0), cleanup_failures (something a run left that could not be removed: worth logging as a metric),
    stale_removed (leftovers of dead trainers removed at start-up) and math_untried (math-verify pairs given "t"
    untried because their batch's budget was spent)."""
    with _STATS_LOCK:
        return dict(_STATS)


def _count(name: str, n: int = 1) -> None:
    """Add n to one of stats()' counters."""
    with _STATS_LOCK:
        _STATS[name] += n


# ------------------------------------------------------------------------------------------------ math-verify

# math-verify's own timeout is signal.alarm, which works only in a main thread, so its checks run in small
# persistent worker processes. Each arms its own timer around parse + verify (a timeout costs no restart); the
# parent kills a worker that has not answered a second after that (stuck in C code, deaf to its timer).
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
_MATH_START_S = 60.0  # how long a worker may take to import math-verify (sympy) before it counts as broken


class _MathWorker:
    """One math-verify process; check() answers one (gold, pred) pair by a deadline. A worker that is stuck or dead
    is killed, and the next check starts a fresh one; one still starting when its batch's budget ends is kept."""

    def __init__(self):
        self.proc, self.ready, self.started = None, False, 0.0

    def _read_line(self, timeout_s: float) -> str | None:
        ready = select.select([self.proc.stdout], [], [], max(0.0, timeout_s))[0]  # the worker writes whole lines
        return self.proc.stdout.readline().decode().strip() if ready else None

    def check(self, gold: str, pred: str, timeout_s: float, deadline: float) -> str:
        """The verdict on one pair. math-verify's timer gets timeout_s, or what is left before deadline if less."""
        try:
            if self.proc is None:
                self.proc = subprocess.Popen([sys.executable, "-c", _MATH_WORKER], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
                self.ready, self.started = False, time.monotonic()
            if not self.ready:  # importing sympy takes a moment, once; a batch out of time leaves it to finish
                line = self._read_line(min(self.started + _MATH_START_S, deadline) - time.monotonic())
                if line is None and time.monotonic() < self.started + _MATH_START_S:
                    return "t"
                if line != "ready":
                    self.kill()
                    return "x"
                self.ready = True
            left = deadline - time.monotonic()
            if left <= 0:
                return "t"
            self.proc.stdin.write((json.dumps([gold, pred, min(timeout_s, left)]) + "\n").encode())
            self.proc.stdin.flush()
            verdict = self._read_line(min(timeout_s + 1.0, left + 0.5))
        except OSError:
            verdict = ""
        if not verdict:  # dead, or stuck past its own timer: a fresh worker takes the next pair
            self.kill()
        return verdict or ("t" if verdict is None else "e")

    def kill(self):
        """Kill the process (if any); the next check starts a fresh one."""
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


def math_verify(pairs: list[tuple[str, str]], timeout_s: float, *, budget_s: float | None = None) -> list[str]:
    """math-verify's verdict on each (gold, prediction) pair of LaTeX strings: "1" equal, "0" not, "u" prediction
    unparseable, "g" gold unparseable, "t" timeout, "e" error, "x" no math-verify. Each pair gets timeout_s, and the
    batch budget_s (default max(10, 2·timeout_s) + 0.1 s per pair: ample for honest answers, which take
    milliseconds, while 32 hostile ones no longer take 32·timeout_s / workers): once it is spent, the pairs not yet
    checked get "t" untried and a worker still busy is killed, so the call returns within budget_s + 0.5 s (plus
    waiting for another batch, one batch running at a time). An idle worker takes the next pair."""
    if budget_s is None:
        budget_s = max(10.0, 2.0 * timeout_s) + 0.1 * len(pairs)
    workers, lock = _math_pool()
    verdicts, untried, take = ["t"] * len(pairs), iter(range(len(pairs))), threading.Lock()

    def serve(worker: _MathWorker, deadline: float):
        while time.monotonic() < deadline:
            with take:
                index = next(untried, None)
            if index is None:
                return
            verdicts[index] = worker.check(*pairs[index], timeout_s, deadline)

    with lock, ThreadPoolExecutor(len(workers)) as pool:
        deadline = time.monotonic() + budget_s
        list(pool.map(serve, workers[:len(pairs)], itertools.repeat(deadline)))
    _count("math_untried", sum(1 for _ in untried))
    return verdicts


# ------------------------------------------------------------------------------------------------ tests and scores

_VALUE_CAP = 1 << 20  # the longest value text the child sends: fixed, so that it tells the child nothing of a literal


@dataclass(frozen=True)
class _Test:
    """A test as this process keeps it. The child gets `source` only: the expected value never leaves here."""
    source: str | None  # what the child runs: a value test's expression, else the whole statement; None: invalid
    is_value: bool = False  # `assert <expr> == <literal>`: the child sends <expr>'s value, this process compares
    expected: object = None  # the literal's value
    cap: int = 0  # the longest text of a value equal to `expected`; a longer one is not even parsed


def _parse_test(test: str) -> _Test:
    """Split `assert <expr> == <literal>` (or `<literal> == <expr>`) into the expression the child evaluates and the
    value this process expects; any other test runs whole in the child. The test is the dataset's text, not the
    model's, so parsing it here is safe."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return _Test(None)  # it would not compile in the child either
    node = tree.body[0] if len(tree.body) == 1 else None
    if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
            and isinstance(node.test.ops[0], ast.Eq):
        left, right = node.test.left, node.test.comparators[0]
        for expression, literal in ((left, right), (right, left)):
            try:
                expected = ast.literal_eval(literal)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            source = ast.get_source_segment(test, expression) or ast.unparse(expression)
            literal_text = ast.get_source_segment(test, literal) or ast.unparse(literal)
            # A value equal to the literal has a text at most ~10 times the literal's UTF-8 bytes (`0` can come back
            # as `(0.0+0.0j)`, `1e5` as `100000.0`, `'é'` as `'\xe9'`): anything longer cannot be equal, and is not
            # parsed, so that a child cannot make this process parse megabytes (e.g. a set of ints that all collide
            # in their hash, quadratic to build) per test.
            return _Test("(" + source + "\n)", True, expected, 4096 + 16 * len(literal_text.encode()))
    return _Test(test)


def _equals(text: bytes, test: _Test) -> bool:
    """Whether the value the child sent for a value test equals the expected one.

    Why ast.literal_eval on ASCII text, not marshal: marshal.loads is not meant for untrusted bytes (crafted input
    has crashed it, and it builds code objects), while literal_eval only parses text and builds plain values (no
    code runs, no class of the child's can cross, so no crafted __eq__), its parser refuses nesting past ~200
    levels, and the text is bounded (test.cap) before it is read: parse time and memory stay small. The comparison
    then runs here, on plain values, with the same == the assert would have used."""
    if len(text) > test.cap:
        return False
    try:
        return bool(ast.literal_eval(text.decode("ascii")) == test.expected)
    except Exception:  # not ASCII, not a literal, too deep, an unhashable key...: no plain value, so no pass
        return False


def _score(tests: list[_Test], report: bytes) -> list[bool]:
    """Each test's outcome from the child's records ("<index> v <value text>" for a value test, "<index> p" for a
    passed statement test, one a line): only whole lines count, and only a test's first record (one guess each)."""
    passed, seen = [False] * len(tests), set()
    for record in report.split(b"\n")[:-1]:  # the last piece has no newline: cut short, so ignored
        index, _, rest = record.partition(b" ")
        if not (index.isdigit() and len(index) < 10) or int(index) >= len(tests) or int(index) in seen:
            continue
        test, (kind, _, payload) = tests[int(index)], rest.partition(b" ")
        seen.add(int(index))
        if test.is_value:
            passed[int(index)] = kind == b"v" and _equals(payload, test)
        else:
            passed[int(index)] = kind == b"p" and not payload and test.source is not None
    return passed


# ------------------------------------------------------------------------------------------------ the harness

# The harness runs inside the sandbox. It reads its job from stdin (nothing on disk or in argv) and sets its
# parent-death signal, no-new-privs, the seccomp filter and its limits before any model code runs. Then it compiles
# the program (a program that does not compile runs nothing: no record, every test fails), runs it, and for each
# test either evaluates the expression and writes its value as literal text, or runs the statement and writes that
# it passed, to a pipe only the parent reads. It decides nothing: the model's code shares this interpreter, so it
# can rewrite all of this, and the parent trusts a record only as far as the module docstring says.
_HARNESS = r"""
import ctypes, marshal, math, os, resource, sys

def read(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            os._exit(1)
        data += chunk
    return data

def number(x):
    if x != x:
        raise TypeError("a NaN equals no literal")
    return repr(x) if abs(x) != math.inf else "1e999" if x > 0 else "-1e999"

def encode(value, depth=0):
    # value as ASCII text that ast.literal_eval reads back as an equal plain value; TypeError for anything else. A
    # subclass is read through its base type (int.__int__, list.__iter__, ...), never through its own methods.
    if depth > 200:
        raise TypeError("nested too deep")
    if value is None or value is True or value is False:
        return repr(value)
    if value is Ellipsis:
        return "..."
    if isinstance(value, int):
        value = int.__int__(value)
        return repr(value) if value.bit_length() < 13000 else hex(value)  # decimal stops at 4300 digits
    if isinstance(value, float):
        return number(float.__float__(value))
    if isinstance(value, complex):
        real, imag = complex.real.__get__(value), complex.imag.__get__(value)
        return "(%s%s%sj)" % (number(real), "-" if math.copysign(1, imag) < 0 else "+", number(abs(imag)))
    if isinstance(value, str):
        return ascii(str.__str__(value))
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(memoryview(value)))
    if isinstance(value, (list, tuple)):
        items = [encode(item, depth + 1) for item in (list if isinstance(value, list) else tuple).__iter__(value)]
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(encode(k, depth + 1) + ": " + encode(v, depth + 1) for k, v in dict.items(value)) + "}"
    if isinstance(value, (set, frozenset)):
        items = [encode(item, depth + 1) for item in (set if isinstance(value, set) else frozenset).__iter__(value)]
        return "{" + ", ".join(items) + "}" if items else "set()"
    raise TypeError("a test's value must be plain data, not %s" % type(value).__name__)

def send(fd, record):
    while record:
        record = record[os.write(fd, record):]

def finish():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)  # no interpreter shutdown: nothing of the code (atexit, __del__) runs after the tests

def read_only_mounts(libc):
    # Every mount the sandbox inherited becomes read-only in its namespace (the host's own mounts stay as they
    # were), after all are made private, so that nothing done here propagates back. Device files stay writable (a
    # read-only mount does not apply to their I/O: /dev/null works), as do the files and pipes we were handed.
    if libc.mount(None, b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE
        os.write(2, b"sandbox: cannot make the mounts private\n")
        os._exit(1)
    attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # struct mount_attr {attr_set = MOUNT_ATTR_RDONLY, attr_clr, ...}
    if libc.syscall(442, -100, b"/", 0x8000, attr, ctypes.sizeof(attr)) == 0:  # mount_setattr(AT_FDCWD, AT_RECURSIVE)
        return
    # Where that fails (ENOSYS before Linux 5.12): each mount point in turn, as far as the kernel lets us, keeping
    # its nosuid, nodev and noexec (ST_ and MS_ values are the same bits; a remount keeps the atime flags itself).
    with open("/proc/self/mountinfo", "rb") as table:
        points = [line.split()[4].decode("unicode_escape").encode("latin-1") for line in table]  # \040 is a space
    for point in points:
        try:
            kept = os.statvfs(point).f_flag & (2 | 4 | 8)
        except OSError:
            continue
        libc.mount(None, point, None, 0x20 | 0x1000 | 1 | kept, None)  # MS_REMOUNT | MS_BIND | MS_RDONLY

def private_directories(libc, job):
    # A tmpfs of the run's own over each world-writable directory, mounted while we still may (root of the mount
    # namespace, before the seccomp filter), writable where all else is read-only: what the code writes there dies
    # with the namespace, seen by no other sample. The run's directory, if it lay below one of them, is made afresh
    # in the private copy; one elsewhere is bound over itself and made writable again, alone.
    options = b"mode=1777,size=%dm" % job["tmpfs_mb"]
    for path in job["private"]:
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 2 | 4, options) != 0:  # MS_NOSUID | MS_NODEV
            os.write(2, b"sandbox: cannot mount a private %s\n" % path.encode())
            os._exit(1)
    home = job["home"].encode()
    if not os.path.isdir(home):
        os.makedirs(home, 0o700)
        if job["uid"] is not None:
            os.chown(home, job["uid"], job["uid"])
    elif (libc.mount(home, home, None, 0x1000, None) != 0  # MS_BIND, read-only as its source
          or libc.mount(None, home, None, 0x20 | 0x1000 | 2 | 4 | os.statvfs(home).f_flag & 8, None) != 0):
        os.write(2, b"sandbox: cannot make %s writable\n" % home)  # MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
        os._exit(1)
    os.chdir(home)

def main(exec=exec, eval=eval, compile=compile, enumerate=enumerate, excepthook=sys.__excepthook__,
         exc_info=sys.exc_info, BaseException=BaseException):
    libc = ctypes.CDLL(None)
    job = marshal.loads(read(0, int.from_bytes(read(0, 8), "little")))  # the trainer's death ends this read (EOF)
    if job["mounts"]:
        read_only_mounts(libc)
        private_directories(libc, job)
    if job["uid"] is not None:  # unshare left us root of the namespaces, so that we could mount: now the slot's uid
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
        # The switch cleared PR_SET_DUMPABLE (an exec after unshare's switch used to restore it); without it some
        # kernels show /proc/PID as root's, and the cleanup finds the uid's processes by that owner.
        libc.prctl(4, 1, 0, 0, 0)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: die with our parent (set here, after the uid switch)
    os.set_blocking(0, False)
    try:
        if os.read(0, 1) == b"":  # the trainer holds stdin open while it lives: it died before our signal was set
            os._exit(1)
    except BlockingIOError:
        pass
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid program the code runs can raise its privileges
    if job["seccomp"]:  # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, 8 bytes an instruction
        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
        libc.prctl(22, 2, ctypes.byref(Program(len(job["seccomp"]) // 8, job["seccomp"])), 0, 0)  # SECCOMP_MODE_FILTER
    for name, value in job["limits"]:
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (AttributeError, ValueError, OSError):
            pass
    report, namespace = job["report_fd"], {"__name__": "__main__"}
    def traceback():
        try:
            excepthook(*exc_info())
        except BaseException:
            pass
    try:
        program = compile(job["program"], "<solution>", "exec", dont_inherit=True)
    except BaseException:
        traceback()
        finish()
    try:
        exec(program, namespace)
    except BaseException:
        traceback()
    for index, (is_value, source) in enumerate(job["tests"]):
        try:
            if is_value:
                text = encode(eval(compile(source, "<test %d>" % index, "eval", dont_inherit=True), namespace))
                if len(text) > job["value_cap"]:
                    raise ValueError("the value's text is longer than %d bytes" % job["value_cap"])
                record = b"%d v %s\n" % (index, text.encode("ascii"))
            else:
                exec(compile(source, "<test %d>" % index, "exec", dont_inherit=True), namespace)
                record = b"%d p\n" % index
            send(report, record)
        except BaseException:
            traceback()
    finish()

main()
"""


def _seccomp_filter() -> bytes | None:
    """The seccomp-BPF program the harness installs: EPERM for unshare, setns, the mount syscalls and clone with a
    namespace flag, so that code cannot become root of a user namespace and mount a tmpfs no limit bounds; ENOSYS
    for clone3, whose flags a filter cannot read (glibc then falls back to clone); socket() only for AF_INET and
    AF_INET6 (not of type SOCK_PACKET, which the kernel turns into a packet socket), socketpair() only for AF_UNIX,
    EPERM for every other family: no Unix socket of the host wherever it lies, no vsock (the VM's host, in no
    network namespace), no netlink, AF_ALG or bluetooth; and EPERM for io_uring, whose operations (a socket, a
    connect) no filter sees. The kernel reads family and type as int, and so does the filter: their low 32 bits.
    x86_64 only: None elsewhere."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE|K, JSET|K, BPF_RET|K
    and_ = 0x54  # BPF_ALU|BPF_AND|BPF_K
    allow, eperm, enosys = 0x7FFF0000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS  # SECCOMP_RET_ERRNO | errno
    nr, arch, arg0, arg1 = 0, 4, 16, 24  # offsets in struct seccomp_data (argN: its low 32 bits)
    sock_packet, sock_type_mask = 10, 0xF  # type's low bits; SOCK_NONBLOCK and SOCK_CLOEXEC lie above them
    denied = {155: "pivot_root", 165: "mount", 166: "umount2", 272: "unshare", 308: "setns", 428: "open_tree",
              429: "move_mount", 430: "fsopen", 431: "fsconfig", 432: "fsmount", 433: "fspick", 442: "mount_setattr",
              425: "io_uring_setup", 426: "io_uring_enter", 427: "io_uring_register"}
    namespace_flags = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
    code = [(load, 0, 0, arch), (jeq, 1, 0, 0xC000003E), (ret, 0, 0, eperm),  # not AUDIT_ARCH_X86_64 (int 0x80): no
            (load, 0, 0, nr), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm),  # the x32 ABI: no
            (jeq, 0, 1, 435), (ret, 0, 0, enosys)]  # clone3
    for number in denied:
        code += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]
    code += [(jeq, 0, 8, 41), (load, 0, 0, arg0), (jeq, 1, 0, socket.AF_INET), (jeq, 0, 4, socket.AF_INET6),  # socket
             (load, 0, 0, arg1), (and_, 0, 0, sock_type_mask), (jeq, 1, 0, sock_packet), (ret, 0, 0, allow),
             (ret, 0, 0, eperm)]
    code += [(jeq, 0, 4, 53), (load, 0, 0, arg0), (jeq, 0, 1, socket.AF_UNIX), (ret, 0, 0, allow),  # socketpair
             (ret, 0, 0, eperm)]
    code += [(jeq, 0, 3, 56), (load, 0, 0, arg0), (jset, 0, 1, namespace_flags), (ret, 0, 0, eperm),  # clone
             (ret, 0, 0, allow)]
    return b"".join(struct.pack("<HBBI", *instruction) for instruction in code)


_SECCOMP = _seccomp_filter()

# ------------------------------------------------------------------------------------------------ removing things


def _open_directory(parent_fd: int, name: str) -> int | None:
    """name in parent_fd opened as a directory without following a link; None where it was not one (then it is
    unlinked) or is gone."""
    for attempt in range(2):
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno in (errno.ENOTDIR, errno.ELOOP):  # a file, or a link (O_NOFOLLOW): the entry itself goes
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=parent_fd)
                return None
            if error.errno != errno.EACCES or attempt:
                raise
            os.chmod(name, 0o700, dir_fd=parent_fd)  # not as root: a directory the code (our user) made unreadable


def _unlink_files(fd: int) -> list[str]:
    """Unlink everything but the subdirectories in the open directory fd; the subdirectories' names."""
    with contextlib.suppress(OSError):
        os.chmod(fd, 0o700)  # not as root: a directory the code made unwritable
    subdirectories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except IsADirectoryError:
                subdirectories.append(entry.name)
            except FileNotFoundError:
                pass
    return subdirectories


_MAX_OPEN_DIRECTORIES = 32


def _remove_tree(path: str, timeout_s: float = 30.0) -> bool:
    """Delete path, a file or a directory tree of any depth, without recursion and without following links; True if
    it is gone. Never raises. shutil.rmtree recurses (a tree ~1,000 deep raises RecursionError) and a path-based walk
    fails past PATH_MAX, so directories are walked by file descriptor, at most 32 open at once: a directory deeper
    than that is moved up to the top of the tree and removed from there."""
    parent, name = os.path.split(os.path.abspath(path))
    deadline, moved = time.monotonic() + timeout_s, itertools.count()
    stack = []  # (fd, name in the directory below it, subdirectories still to remove), from path's parent down
    try:
        stack.append((os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), None, [name]))
        while stack:
            if time.monotonic() > deadline:
                return False
            fd, name, pending = stack[-1]
            if pending:
                child = pending.pop()
                child_fd = _open_directory(fd, child)
                if child_fd is None:
                    continue
                if len(stack) > _MAX_OPEN_DIRECTORIES:  # too deep: move it up to path itself, whose list gets it
                    os.close(child_fd)
                    new_name = f".rlvr-deep-{os.getpid()}-{next(moved)}"
                    os.rename(child, new_name, src_dir_fd=fd, dst_dir_fd=stack[1][0])
                    stack[1][2].append(new_name)
                    continue
                stack.append((child_fd, child, _unlink_files(child_fd)))
            elif len(stack) == 1:  # path's parent: done
                os.close(stack.pop()[0])
            else:
                try:
                    os.rmdir(name, dir_fd=stack[-2][0])
                except OSError as error:
                    if error.errno != errno.ENOTEMPTY:
                        raise
                    pending.extend(_unlink_files(fd))  # something was moved or made in it meanwhile
                    continue
                os.close(stack.pop()[0])
        return True
    except Exception:  # a mount point, a full fd table, ...: counted by the caller, retried later
        return not os.path.lexists(path)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _ns_depth(pid: int | str = "self") -> int | None:
    """How many PID namespaces deep pid is (the length of its NSpid line), None if unknown."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return len(line.split()) - 1
    return None


def _kill_processes(match) -> tuple[int, bool]:
    """SIGKILL every live process whose uid matches (match(uid) is true) and that lives in our PID namespace or a
    child of it: a sandbox of a trainer in another container, seen from the host, has the same uids but lies deeper,
    and is not ours. How many were killed, and whether none is left."""
    own_depth, killed = _ns_depth(), set()
    for _ in range(100):
        alive = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if not match(os.stat(f"/proc/{pid}").st_uid):
                    continue
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().rsplit(")")[-1][1] in "ZX":  # a zombie is dead already; its parent reaps it
                        continue
                depth = _ns_depth(pid)
                if own_depth is not None and depth is not None and depth > own_depth + 1:
                    continue
                alive = True
                os.kill(int(pid), signal.SIGKILL)
                killed.add(pid)
        if not alive:
            return len(killed), True
        time.sleep(0.002)
    return len(killed), False


def _kill_uid(uid: int) -> bool:
    """SIGKILL every live process of uid (the slot is ours alone, so that is exactly the sandbox's tree); True once
    none is left."""
    return _kill_processes(uid.__eq__)[1]


def _kill_tree(proc: subprocess.Popen) -> float:
    """SIGKILL the sandbox and reap it; the CPU seconds it used (proc's own and those of the children it reaped: the
    harness, for unshare). unshare's child is the init of the sandbox's PID namespace, and when it dies the kernel
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
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere: its CPU time is lost
        proc.wait()
        return 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _remove_ipc(match) -> int:
    """Remove the System V shared memory, message queues and semaphores whose owner or creator uid matches: outside
    an IPC namespace they outlive their processes, holding memory no rlimit counts and passing data to the next
    sample. How many were removed."""
    libc, removed = ctypes.CDLL(None), 0
    remove = {"shm": lambda id_: libc.shmctl(id_, 0, None), "msg": lambda id_: libc.msgctl(id_, 0, None),
              "sem": lambda id_: libc.semctl(id_, 0, 0)}  # 0 is IPC_RMID
    for kind, remove_one in remove.items():
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/sysvipc/{kind}") as table:
                header, *rows = table.read().splitlines()
            owner, creator = header.split().index("uid"), header.split().index("cuid")
            for fields in map(str.split, rows):
                if match(int(fields[owner])) or match(int(fields[creator])):
                    removed += remove_one(int(fields[1])) == 0
    return removed


_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")


def _private_directories() -> list[str]:
    """The world-writable directories that exist here, each once (/var/lock is often a link to /run/lock): those a run
    with a mount namespace gets a private tmpfs over."""
    return sorted({os.path.realpath(path) for path in _SHARED_DIRS if os.path.isdir(path)})


_SWEEP_DEPTH = 3  # how deep world-writable subdirectories of others are looked into


def _sweep_files(match, keep: str | None = None) -> tuple[int, bool]:
    """Delete what the matching uids left in the world-writable directories: each entry of theirs goes whole
    (whatever they made lies below it), and the world-writable subdirectories of others, where they could write too
    (/tmp/.X11-unix, mode 1777 on most hosts), are looked into, down to 3 levels. How many entries went, and whether
    all of them did."""
    removed, ok = 0, True
    pending = [(directory, 1) for directory in {*_SHARED_DIRS, tempfile.gettempdir()}]
    while pending:
        directory, depth = pending.pop()
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(directory)):
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if entry.path != keep and match(info.st_uid):
                        gone = _remove_tree(entry.path)
                        removed, ok = removed + gone, ok and gone
                    elif entry.is_dir(follow_symlinks=False) and info.st_mode & 0o002 and depth < _SWEEP_DEPTH:
                        pending.append((entry.path, depth + 1))
    return removed, ok


# ------------------------------------------------------------------------------------------------ memory cgroups


@dataclass(frozen=True)
class _Cgroups:
    path: str  # the directory each run's cgroup is made in
    version: int  # 2 or 1

    def limits(self, memory_bytes: int) -> list[tuple[str, int]]:
        """(file, value) pairs that bound a cgroup's memory, the first one required; no swap."""
        if self.version == 2:
            return [("memory.max", memory_bytes), ("memory.swap.max", 0)]
        return [("memory.limit_in_bytes", memory_bytes), ("memory.memsw.limit_in_bytes", memory_bytes)]


def _cgroup_candidates() -> list[_Cgroups]:
    """Directories where memory cgroups may be made, best first: cgroup v2 where the memory controller is enabled
    for the children of our cgroup or of its parent, then cgroup v1's memory hierarchy at our cgroup."""
    try:
        with open("/proc/self/cgroup") as cgroups, open("/proc/self/mountinfo") as mountinfo:
            memberships = [line.rstrip("\n").split(":", 2) for line in cgroups]
            mounts = [line.split() for line in mountinfo]
    except OSError:
        return []
    found = []
    for version in (2, 1):
        for hierarchy, controllers, path in memberships:
            if (version == 2) != (hierarchy == "0" and controllers == ""):
                continue
            if version == 1 and "memory" not in controllers.split(","):
                continue
            for fields in mounts:  # ... root mountpoint ... - fstype source superoptions
                fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
                if fstype != ("cgroup2" if version == 2 else "cgroup") or (version == 1 and "memory" not in options):
                    continue
                root, mountpoint = fields[3], fields[4]
                if path != root and not path.startswith(root.rstrip("/") + "/"):
                    continue
                own = os.path.normpath(os.path.join(mountpoint, path[len(root):].lstrip("/")))
                parent = [os.path.dirname(own)] if version == 2 and own != os.path.normpath(mountpoint) else []
                for directory in [own, *parent]:
                    with contextlib.suppress(OSError):
                        if version == 2:
                            with open(f"{directory}/cgroup.subtree_control") as enabled:
                                if "memory" not in enabled.read().split():
                                    continue
                        found.append(_Cgroups(directory, version))
    return found


_CGROUPS: list = []  # empty until looked for, then [where runs' memory cgroups go, or None where nowhere]
_CGROUP_IDS = itertools.count()


def _cgroups() -> _Cgroups | None:
    """Where this process makes its runs' memory cgroups, found on first use; None where none works (the fallback:
    RLIMIT_AS per process only)."""
    if not _CGROUPS:
        _CGROUPS.append(next((where for where in _cgroup_candidates() if _cgroup_works(where)), None))
    return _CGROUPS[0]


def _cgroup_works(where: _Cgroups) -> bool:
    """Whether a memory-limited cgroup can be made in where, a process moved into it, and the cgroup removed."""
    path = _make_cgroup(where, 64 << 20)
    if path is None:
        return False
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(60)"])
    try:
        _enter_cgroup(path, child.pid)
        return True
    except OSError:
        return False
    finally:
        child.kill()
        child.wait()
        if not _remove_cgroup(path):
            _LEFTOVERS[path] = _remove_cgroup


def _make_cgroup(where: _Cgroups | None, memory_bytes: int) -> str | None:
    """A fresh cgroup in where, limited to memory_bytes without swap; None where that fails (or where is None)."""
    if where is None:
        return None
    path = os.path.join(where.path, f"rlvr-sandbox-{os.getpid()}-{next(_CGROUP_IDS)}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    for index, (name, value) in enumerate(where.limits(memory_bytes)):
        try:
            with open(os.path.join(path, name), "w") as limit:
                limit.write(str(value))
        except OSError:
            if index == 0:  # the memory limit itself; the swap limit is absent where there is no swap accounting
                _remove_cgroup(path)
                return None
    return path


def _enter_cgroup(path: str, pid: int) -> None:
    """Move pid and its children into the cgroup at path (a process that has exited meanwhile needs no bound).
    Moving pid first means that a child it forks meanwhile lands there too; one forked before is listed among its
    children."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as procs:
            procs.write(str(pid))
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            pids = children.read().split()
    except (ProcessLookupError, FileNotFoundError):
        return
    for child in pids:
        with contextlib.suppress(ProcessLookupError), open(os.path.join(path, "cgroup.procs"), "w") as procs:
            procs.write(child)


def _remove_cgroup(path: str) -> bool:
    """Kill what is left in the cgroup at path and remove it; True if it is gone."""
    for _ in range(100):
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as procs:
            for pid in procs.read().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:  # EBUSY while its last processes exit
            time.sleep(0.002)
    return False


# ------------------------------------------------------------------------------------------------ uids, stale leftovers

# Unprivileged uids for the sandboxes, far from any real account: one per concurrent run, from a block of 64 that
# the trainer process's pid makes its own (torchrun ranks on one machine must not kill each other's sandboxes):
# uid = _UID_BASE + pid·_UID_SLOTS + slot, so a uid names the trainer that owns it.
_UID_BASE, _UID_SLOTS = 1_500_000_000, 64
_UID_END = _UID_BASE + (1 << 22) * _UID_SLOTS  # 2^22: one past the largest pid Linux hands out

_UID_POOL: tuple[int, queue.Queue] | None = None  # (owner pid, free uids)
_UID_POOL_LOCK = threading.Lock()
_DIRTY_UIDS: set[int] = set()  # uids whose last cleanup failed: cleaned again before their next run


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


def _clean_uid(uid: int, keep: str | None = None) -> bool:
    """Kill uid's processes, remove its IPC objects and its files in the world-writable directories; True if all
    went."""
    killed = _kill_uid(uid)
    _remove_ipc(uid.__eq__)
    return _sweep_files(uid.__eq__, keep)[1] and killed


def _take_uid() -> int:
    """A free sandbox uid of this process, cleaned first if its last cleanup failed."""
    uid = _free_uids().get()
    if uid in _DIRTY_UIDS:
        if _clean_uid(uid):
            _DIRTY_UIDS.discard(uid)
        else:
            _count("cleanup_failures")  # the run goes on: what is left can do no more than its own code could
    return uid


def _owner_alive(pid: int) -> bool:
    """Whether process pid (a trainer that owns sandbox uids or directories) is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale_uid(uid: int) -> bool:
    """Whether uid is a sandbox uid whose trainer is dead."""
    return _UID_BASE <= uid < _UID_END and not _owner_alive((uid - _UID_BASE) // _UID_SLOTS)


_LEFTOVERS: dict = {}  # temporary directory or cgroup whose removal failed -> its remover, retried after each run
_SWEPT: list[int] = []  # the pid of the process that swept (a forked child sweeps again)
_SWEEP_LOCK = threading.Lock()


def _sweep_stale() -> int:
    """Remove what the sandboxes of dead trainers left on this machine: processes of their uids (in our PID namespace
    or below), their System V IPC objects, their files in the world-writable directories (as _sweep_files looks), the
    rlvr-sandbox-PID-* temporary directories of dead pids (or, for older names, of a dead uid) and cgroups. How
    many things went."""
    removed = _kill_processes(_stale_uid)[0] + _remove_ipc(_stale_uid) + _sweep_files(_stale_uid)[0]
    for directory in {tempfile.gettempdir(), "/tmp"}:
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(directory)):
                if not entry.name.startswith("rlvr-sandbox-"):
                    continue
                owner = re.fullmatch(r"rlvr-sandbox-(\d+)-.*", entry.name)
                with contextlib.suppress(OSError):  # older names hold no pid: their owner's uid says whose they are
                    stale = not _owner_alive(int(owner[1])) if owner else _stale_uid(entry.stat().st_uid)
                    if stale:
                        removed += _remove_tree(entry.path)
    where = _cgroups()
    if where is not None:
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(where.path)):
                owner = re.fullmatch(r"rlvr-sandbox-(\d+)-\d+", entry.name)
                if owner is not None and not _owner_alive(int(owner[1])):
                    removed += _remove_cgroup(entry.path)
    return removed


def _sweep_once() -> None:
    """_sweep_stale() on first use of the sandbox in this process; a failure leaves old litter, never fails a run."""
    with _SWEEP_LOCK:
        if os.getpid() in _SWEPT:
            return
        _SWEPT[:] = [os.getpid()]
    try:
        _count("stale_removed", _sweep_stale())
    except Exception:
        _count("cleanup_failures")


# ------------------------------------------------------------------------------------------------ code sandbox

# A run's limit is CPU time, so that its score does not depend on what runs beside it; and no more runs execute code
# at once than there are cores, so that each gets about one. Code that sleeps or blocks uses no CPU: a wall-clock
# backstop, well above the CPU limit, ends it and frees its core.
_CPU_SLOTS: tuple[int, threading.Semaphore] | None = None  # (owner pid, one slot per usable core)
_CPU_SLOTS_LOCK = threading.Lock()


def _cpu_slots() -> threading.Semaphore:
    """This process's bound on runs executing at once: one per core it may run on (its affinity mask), made on first
    use (and anew in a forked child, which must not share its parent's count)."""
    global _CPU_SLOTS
    with _CPU_SLOTS_LOCK:
        if _CPU_SLOTS is None or _CPU_SLOTS[0] != os.getpid():
            try:
                cores = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cores = os.cpu_count() or 1
            _CPU_SLOTS = (os.getpid(), threading.Semaphore(max(1, cores)))
        return _CPU_SLOTS[1]


def _cpu_limit_s(timeout_s: float) -> int:
    """A run's CPU limit, in the whole seconds RLIMIT_CPU counts: timeout_s rounded up."""
    return max(1, math.ceil(timeout_s))


def _wall_s(timeout_s: float) -> float:
    """A run's wall-clock backstop: three times its CPU limit, so that CPU-bound code reaches its CPU limit first
    even with a third of a core (its core shared with the trainer's own work); only code that sleeps, blocks or
    forks meets it."""
    return 3.0 * _cpu_limit_s(timeout_s)


@dataclass(frozen=True)
class _Plan:
    python: str  # an interpreter the sandbox's uid can run
    unshare: str | None  # util-linux unshare, when namespaces work here
    as_root: bool  # run the code under a per-slot unprivileged uid
    mount_proc: bool = False  # a /proc of the sandbox's own PID namespace (needs a mount namespace)
    setpriv: str | None = None  # util-linux setpriv, to give unshare a parent-death signal

    @property
    def harness_switches_uid(self) -> bool:
        """Whether the harness starts as root of a mount namespace, makes its mounts read-only, mounts the private
        directories, and switches to the run's uid itself (else unshare or Popen switches, and nothing is mounted)."""
        return self.as_root and self.mount_proc

    def command(self, uid: int | None) -> list[str]:
        run = [self.python, "-I", "-S", "-c", _HARNESS]
        if self.unshare is None:
            return run
        namespaces = ["--net", "--pid", "--ipc", "--fork", "--kill-child"] + ["--mount-proc"] * self.mount_proc
        dies_with_us = [self.setpriv, "--pdeathsig", "KILL", "--"] if self.setpriv else []
        if self.as_root and not self.harness_switches_uid:
            return [*dies_with_us, self.unshare, *namespaces, f"--setgid={uid}", f"--setuid={uid}", "--", *run]
        if self.as_root:
            return [*dies_with_us, self.unshare, *namespaces, "--", *run]
        return [*dies_with_us, self.unshare, "--map-root-user", *namespaces, "--", *run]


@dataclass
class SandboxResult:
    passed: list[bool]  # one per test
    output: str  # the first max_output_bytes of stdout and stderr
    timed_out: bool  # it reached its CPU limit or its wall-clock backstop


def _read_available(fd: int, into: bytearray, limit: int) -> bool:
    """Append what can be read from the non-blocking fd now, up to limit bytes in all; False at end of file."""
    while len(into) < limit:
        try:
            chunk = os.read(fd, min(1 << 16, limit - len(into)))
        except BlockingIOError:
            return True
        if not chunk:
            return False
        into += chunk
    return True


def _exited(proc: subprocess.Popen) -> bool:
    """Whether proc has exited, without reaping it (so that _kill_tree can still read its CPU time)."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _collect(proc: subprocess.Popen, report_fd: int, timeout_s: float, limit: int) -> tuple[bytearray, bool]:
    """What the child writes on report_fd until proc exits or timeout_s passes (then timed out: True), at most limit
    bytes: the pipe is drained as it fills, so a child that reports large values never blocks on it, and one that
    writes more than any honest child would is left blocked. A pidfd wakes us the moment proc exits; proc is not
    reaped here."""
    deadline, report, open_ = time.monotonic() + timeout_s, bytearray(), True
    os.set_blocking(report_fd, False)
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None  # polled instead, every 10 ms
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return report, True
            watch = ([report_fd] if open_ and len(report) < limit else []) + ([pidfd] if pidfd is not None else [])
            ready = select.select(watch, [], [], left if pidfd is not None else min(left, 0.01))[0]
            if report_fd in ready:
                open_ = _read_available(report_fd, report, limit)
            if (pidfd in ready) if pidfd is not None else _exited(proc):
                _read_available(report_fd, report, limit)
                return report, False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _cleanup(uid: int | None, tmp: str | None, cgroup: str | None) -> None:
    """Remove what a run left: its directory, its cgroup, and (with a uid of its own) the uid's processes, IPC
    objects and files in the world-writable directories. Never raises; a failure is counted, its uid marked to be
    cleaned again before its next run, and a directory or cgroup left retried after each later run."""
    try:
        failed = False
        if uid is not None and not _clean_uid(uid, keep=tmp):
            _DIRTY_UIDS.add(uid)
            failed = True
        for path, remove in list(_LEFTOVERS.items()):  # earlier runs' (a failure there was counted then)
            if remove(path):
                _LEFTOVERS.pop(path, None)
        for path, remove in ((tmp, _remove_tree), (cgroup, _remove_cgroup)):
            if path is not None and not remove(path):
                _LEFTOVERS[path] = remove
                failed = True
        if failed:
            _count("cleanup_failures")
    except Exception:
        _count("cleanup_failures")


def _execute(plan: _Plan, uid: int | None, tmp: str, cgroup: str | None, job: dict, output, wall_s: float,
             limit: int) -> tuple[bytearray, bool, float]:
    """Start the harness under plan, hand it its job, and collect its records (at most limit bytes) until it exits or
    wall_s passes; whether wall_s passed, and the CPU seconds the harness and the children it reaped used. The whole
    tree is dead when this returns."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
    as_user = {"user": uid, "group": uid, "extra_groups": []} if uid and plan.unshare is None else {}
    read_fd, write_fd = os.pipe()
    try:
        try:
            proc = subprocess.Popen(plan.command(uid), stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                                    cwd=tmp, env=env, pass_fds=(write_fd,), start_new_session=True, **as_user)
        finally:
            os.close(write_fd)
        try:
            if cgroup is not None:  # before the job is sent: until then the harness only waits for it
                try:
                    _enter_cgroup(cgroup, proc.pid)
                except OSError as error:
                    _CGROUPS[:] = [None]
                    warnings.warn(f"sandboxed code runs without a memory cgroup from now on: {error!r}",
                                  RuntimeWarning)
            blob = marshal.dumps({**job, "report_fd": write_fd}, 4)  # marshal: nothing to import in the child
            with contextlib.suppress(OSError):  # stdin stays open until the end: the harness's lifeline
                proc.stdin.write(len(blob).to_bytes(8, "little") + blob)
                proc.stdin.flush()
            report, timed_out = _collect(proc, read_fd, wall_s, limit)
        finally:  # the PID namespace or the session holds the tree; _cleanup's uid and cgroup kills catch what left
            cpu_s = _kill_tree(proc)
            with contextlib.suppress(OSError):
                proc.stdin.close()
        _read_available(read_fd, report, limit)  # what came just before the kill
        return report, timed_out, cpu_s
    finally:
        os.close(read_fd)


def _run(plan: _Plan, program: str, tests: list[str], *, timeout_s: float = 3.0, memory_mb: int = 512,
         max_processes: int = 4, max_file_mb: int = 16, max_output_bytes: int = 65536) -> SandboxResult:
    """One sandboxed run of program and tests under plan: run_sandboxed without its catch-all."""
    _sweep_once()
    checks = [_parse_test(test) for test in tests]
    cpu_s = _cpu_limit_s(timeout_s)  # soft = hard: at the limit the kernel sends SIGKILL, which code cannot catch
    job = {"program": program, "tests": [(test.is_value, test.source or "") for test in checks],  # "": invalid
           "limits": [("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory_mb << 20),
                      ("RLIMIT_NPROC", max_processes), ("RLIMIT_FSIZE", max_file_mb << 20), ("RLIMIT_NOFILE", 64),
                      ("RLIMIT_CORE", 0)],
           "seccomp": _SECCOMP, "value_cap": _VALUE_CAP, "tmpfs_mb": memory_mb,
           "mounts": plan.mount_proc, "private": _private_directories() if plan.mount_proc else []}
    limit = 4096 + sum(_VALUE_CAP + 32 if test.is_value else 32 for test in checks)  # more than any honest report
    uid = _take_uid() if plan.as_root else None
    tmp = cgroup = None
    try:
        tmp = tempfile.mkdtemp(prefix=f"rlvr-sandbox-{os.getpid()}-")
        job.update(home=tmp, uid=uid if plan.harness_switches_uid else None)
        if uid is not None:
            os.chown(tmp, uid, uid)
        cgroup = _make_cgroup(_cgroups(), memory_mb << 20)
        with tempfile.TemporaryFile(dir=tmp) as output:  # nameless: the code cannot swap it for a FIFO
            with _cpu_slots():  # a run's clocks start once it holds a core: its wait here costs it nothing
                report, wall_passed, cpu_used = _execute(plan, uid, tmp, cgroup, job, output, _wall_s(timeout_s),
                                                         limit)
            output.seek(0)
            text = output.read(max_output_bytes).decode(errors="replace")
        # rusage can read a few ms short of the time at which the kernel killed it at its limit
        return SandboxResult(_score(checks, bytes(report)), text, wall_passed or cpu_used >= cpu_s - 0.1)
    finally:
        _cleanup(uid, tmp, cgroup)
        if uid is not None:
            _free_uids().put(uid)


def _ids_mapped() -> bool:
    """Whether every sandbox uid and gid exists here: not so in a user namespace with a short map, e.g. as "root"
    of a rootless container (uid_map "0 65534 1"), where switching to them fails."""
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as id_map:
                extents = [tuple(map(int, line.split())) for line in id_map]
        except OSError:  # no user namespaces here: every id exists
            continue
        if not any(inside <= _UID_BASE and _UID_END <= inside + count for inside, _, count in extents):
            return False
    return True


def _setpriv() -> str | None:
    """util-linux setpriv, where it can set a parent-death signal (util-linux 2.33 or later)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if setpriv and subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], capture_output=True,
                                      timeout=10, check=False).returncode == 0:
            return setpriv
    return None


_PLAN: _Plan | None = None  # the sandbox found by the probe; a failed probe is not kept, so the next call retries
# The probe's job: the plan works if the first test passes, which needs modules the harness has not imported (the
# interpreter may start as root, where the run's uid cannot read its library); the program also tries to make a user
# namespace, which the seccomp filter (or the kernel's settings) should refuse, and looks whether / is read-only, as
# it should be with a mount namespace.
_PROBE = ("import collections, ctypes, math, os, re\n"
          "userns = ctypes.CDLL(None).unshare(0x10000000) == 0  # CLONE_NEWUSER\n"
          "read_only = os.statvfs('/').f_flag & os.ST_RDONLY != 0",
          ["assert collections.Counter('aab')['a'] == 2", "assert userns == False", "assert read_only == True"])


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
    setpriv = _setpriv() if unshare else None
    namespaces = ([(unshare, True), (unshare, False)] if unshare else []) + [(None, False)]
    for as_root in ([True] if root and _ids_mapped() else []) + [False]:
        for (namespace, mount_proc), python in itertools.product(namespaces, pythons):
            plan = _Plan(python, namespace, as_root, mount_proc, setpriv if namespace else None)
            try:
                result = _run(plan, *_PROBE, timeout_s=10)
                lines = result.output.strip().splitlines() or ["no output"]
                error = None if result.passed[:1] == [True] else lines[-1]
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
            if not mount_proc:
                warnings.warn("the code sandbox has no mount namespace here: code shares /tmp, /var/tmp, /dev/shm "
                              "and /run/lock with the machine" + (", and what it leaves there is removed only "
                              "afterwards" if as_root else ", and what it leaves there stays"), RuntimeWarning)
            if _SECCOMP is None:
                warnings.warn("the code sandbox has no seccomp filter on this architecture: code can connect to the "
                              "host's Unix sockets that its uid may write, and to a VM's host by vsock",
                              RuntimeWarning)
            if mount_proc and result.passed[2:3] != [True]:
                warnings.warn("the code sandbox could not make the machine's mounts read-only here (no mount_setattr, "
                              "Linux < 5.12, and remounting failed): code can leave files in world-writable "
                              "directories other than /tmp, /var/tmp, /dev/shm and /run/lock", RuntimeWarning)
            if result.passed[1:2] != [True]:
                warnings.warn("sandboxed code can make user namespaces here (no seccomp filter on this architecture, "
                              "or the kernel refused it): it can mount a tmpfs that no rlimit bounds", RuntimeWarning)
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
    """Run program, then each test statement, in the sandbox described at the top of this file, with timeout_s CPU
    seconds (rounded up) per process and a wall-clock backstop of three times that, counted from when the run gets
    one of this process's cores. Raises only RuntimeError, where no sandbox works on this machine; a failure of one
    run scores its tests as failed."""
    tests = [str(test) for test in tests]
    plan = require_sandbox()
    _count("runs")
    try:
        result = _run(plan, program if isinstance(program, str) else "", tests, timeout_s=timeout_s,
                      memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb,
                      max_output_bytes=max_output_bytes)
    except Exception as error:  # e.g. fork failing under load: the sample scores 0 and training goes on
        _count("errors")
        return SandboxResult([False] * len(tests), f"sandbox error: {error!r}", False)
    _count("timeouts", result.timed_out)
    return result
