"""
verify.py -- the rewards of grpo.py: pure functions `(completion, answer) -> float in [0, 1]`.

GRPO learns whatever these pay for, so they must be hard to fool. Every public function is total: it
never raises on any string input (it returns 0.0 instead) and returns quickly on hostile input.

    extract_answer(text, strict=True)        the last \\boxed{...} (or, lenient, the last number)
    math_reward(completion, answer, strict)  1.0 iff the extracted answer equals the gold number
    format_reward(completion, kind)          1.0 iff the completion has the format the prompt asks for
    code_reward(completion, tests, timeout)  1.0 iff the program passes the asserts, run in a sandbox

A task of your own needs no edit here: its reward function goes in a file of its own, `--reward FILE.py:FUNCTION`
(docs/rewards.md). A new built-in verdict goes here and into `builtin_rewards` in grpo.py.
"""

import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

MAX_TEXT = 100_000  # characters of a completion we look at (its tail: that is where the answer is)
MAX_NUMBER = 60  # characters of a number we convert; longer "numbers" are not answers

# -----------------------------------------------------------------------------
# Math: answer extraction and numeric comparison.

# pattern means: an optional sign, digits with optional thousands commas, an optional decimal part,
# or a bare decimal like ".5".
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
# pattern means: \frac{a}{b} / \dfrac{a}{b} / \tfrac{a}{b}, or a/b, with plain signed numbers a and b.
FRACTION = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$|^([^/]+)/([^/]+)$")


# pattern means: the opening of a box "\boxed{" (spaces allowed before the brace), or any brace.
BOX_OR_BRACE = re.compile(r"\\boxed\s*\{|[{}]")


def last_boxed(text):
    """The content of the last \\boxed{...} to close, with balanced braces; None if none closes.
    One left-to-right pass with a stack: linear time even on thousands of unclosed boxes."""
    stack, last = [], None  # stack: for each open brace, where a box's content starts (None: a plain brace)
    for match in BOX_OR_BRACE.finditer(text):
        token = match.group()
        if token == "}":
            if stack:
                content_start = stack.pop()
                if content_start is not None:
                    last = text[content_start : match.start()]
        else:
            stack.append(match.end() if token != "{" else None)
    return last


def extract_answer(text, strict=True):
    """strict: the last \\boxed{...}'s content, else None. Lenient: that, else the last number in the
    text (GSM8K's gold solutions end "#### 72"; "the answer is 72." counts too)."""
    try:
        text = str(text)[-MAX_TEXT:]
        boxed = last_boxed(text)
        if boxed is not None or strict:
            return boxed
        numbers = NUMBER.findall(text[-10_000:])
        return numbers[-1] if numbers else None
    except Exception:  # total: a reward function must never crash the trainer
        return None


def to_number(text):
    """A Fraction for "1,234", "$18.00", "+5", "-3", "\\frac{3}{2}", "3/2", "50%" is NOT a number
    here (ambiguous); None for anything else. GSM8K's official normalization removes commas
    (openai/grade-school-math, dataset.py); we also drop $, a trailing period and \\text{} units."""
    if text is None:
        return None
    text = str(text).strip()
    if len(text) > 2 * MAX_NUMBER:
        return None
    text = re.sub(r"\\text\{[^{}]*\}|\\[,!;: ]|\\\$|\$", "", text)  # units in \text{}, LaTeX spaces, dollars
    text = text.replace("\\left", "").replace("\\right", "").strip().rstrip(".").strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    fraction = FRACTION.match(text)
    if fraction:
        sign, numerator, denominator = (fraction.group(1), fraction.group(2), fraction.group(3)) \
            if fraction.group(2) is not None else ("", fraction.group(4), fraction.group(5))
        top, bottom = to_number(numerator), to_number(denominator)
        if top is None or bottom is None or bottom == 0:
            return None
        return (-1 if sign else 1) * top / bottom
    if not re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+", text) or len(text) > MAX_NUMBER:
        return None
    return Fraction(text.replace(",", ""))


def gold_number(answer):
    """The gold answer as a number: GSM8K's raw solution ("... #### 1,234") or a plain "1234"."""
    answer = str(answer)
    if "####" in answer:
        answer = answer.split("####")[-1]
    return to_number(answer)


def math_reward(completion, answer, strict=True) -> float:
    """1.0 iff the completion's extracted answer equals the gold answer as an exact number."""
    try:
        gold = gold_number(answer)
        predicted = to_number(extract_answer(completion, strict))
        return float(gold is not None and predicted is not None and predicted == gold)
    except Exception:  # total: never raise into the trainer
        return 0.0


# -----------------------------------------------------------------------------
# Format.

# pattern means: a fenced python block, ```python ... ```
PYTHON_FENCE = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)


def format_reward(completion, kind="math") -> float:
    """The format the prompts ask for (grpo.py's MATH_INSTRUCTION / CODE_INSTRUCTION):
    math: some reasoning, then exactly one \\boxed{...} that closes the completion: after it only
      whitespace, and optionally a closing "$", "$$", "\\]", "\\)" or "." (a box inside display math).
    code: exactly one ```python fenced block, after which there is only whitespace.
    1.0 or 0.0; never raises."""
    try:
        text = str(completion)[-MAX_TEXT:]
        if kind == "code":
            blocks = PYTHON_FENCE.findall(text)
            return float(len(blocks) == 1 and text.count("```") == 2 and text.rstrip().endswith("```")
                         and bool(blocks[0].strip()))
        if text.count("\\boxed") != 1:
            return 0.0
        start = text.index("\\boxed")
        content = last_boxed(text)
        if content is None or not text[:start].strip():
            return 0.0  # no box, or no reasoning before it
        end = text.index("{", start) + len(content) + 2
        return float(re.fullmatch(r"\s*(?:\$\$?|\\\]|\\\))?\s*\.?\s*", text[end:]) is not None)
    except Exception:  # total
        return 0.0


# -----------------------------------------------------------------------------
# Code: run the program and the tests in an isolated, limited child process.

MEMORY_LIMIT = 1 << 30  # address space, bytes
FILE_LIMIT = 1 << 20  # largest file it may write, bytes
PROCESS_LIMIT = 64  # processes of its user: RLIMIT_NPROC counts per user, and root is exempt
MARKER_VAR = "GRPO_SANDBOX"  # environment variable carrying a per-call marker into every child

# The harness is the child's first code. In order: it reads [token, program, tests] from stdin (the
# tests are never a file the program could read) and points stdin at /dev/null; sets the rlimits
# (here, not in a preexec_fn, which is unsafe in grpo.py's multithreaded parent); compiles both
# sources, rewriting the tests' == and != into a comparison the program's objects cannot rig; installs
# the audit hook (PEP 578; it cannot be removed); runs the program; restores the builtins and hands
# the tests a fresh namespace holding the program's names; runs the tests; and only then writes the
# token to its own pipe and exits at once. The token is a local of main(): the hook refuses the
# ways to reach another frame (sys._getframe, tracebacks' and generators' frames, tracing, gc).
HARNESS = r"""
import ast, builtins, json, os, resource, sys

def main(report_fd, cpu_seconds, memory, file_size, processes, audit):
    token, program, tests = json.loads(b"".join(iter(lambda: os.read(0, 1 << 20), b"")))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value + (limit == resource.RLIMIT_CPU)))  # SIGXCPU, then SIGKILL
    getattribute, heap = type.__getattribute__, 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class written in Python
    bases = ((list, list.__iter__), (tuple, tuple.__iter__), (set, set.__iter__), (frozenset, frozenset.__iter__))

    def plain(x, type=type, next=next, any=any, all=all):  # is == decided by C types all the way down?
        mro = getattribute(type(x), "__mro__")  # type.__getattribute__: a metaclass cannot lie about it
        if getattribute(next(k for k in mro if "__eq__" in getattribute(k, "__dict__")), "__flags__") & heap:
            return False  # its == is Python code, which the program may have written or patched
        if any(k is dict for k in mro):
            return all(plain(k) and plain(v) for k, v in dict.items(x))
        return all(all(plain(v) for v in iterate(x)) for base, iterate in bases if any(k is base for k in mro))

    def same(a, b, plain=plain):  # "a == b", unless b is plain and a is not (an always-equal object)
        return (plain(a) and a == b) if plain(b) else a == b

    class StrictEquality(ast.NodeTransformer):
        def visit_Compare(self, node):
            self.generic_visit(node)
            if len(node.ops) != 1 or type(node.ops[0]) not in (ast.Eq, ast.NotEq):
                return node
            call = ast.Call(ast.Name("__same__", ast.Load()), [node.left, node.comparators[0]], [])
            return call if type(node.ops[0]) is ast.Eq else ast.UnaryOp(ast.Not(), call)

    program = compile(program, "<program>", "exec")
    tests = compile(ast.fix_missing_locations(StrictEquality().visit(ast.parse(tests))), "<tests>", "exec")
    saved_builtins, write, exit, getpid = dict(builtins.__dict__), os.write, os._exit, os.getpid
    harness_pid = getpid()  # before the program runs: only this process may report (see run_tests)
    if audit:
        install_audit_hook(os.path.realpath(os.getcwd()))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exec(program, namespace)
    builtins.__dict__.clear()
    builtins.__dict__.update(saved_builtins)
    # The program's functions keep their own globals, so they cannot rebind __same__ or the tests' names.
    test_namespace = {k: v for k, v in namespace.items() if k not in saved_builtins}
    test_namespace.update(__name__="__main__", __builtins__=builtins, __same__=same)
    exec(tests, test_namespace)
    if getpid() == harness_pid:  # a forked copy of this process (audit=False) reaches here too: it stays silent
        write(report_fd, token.encode())
    exit(0)  # now: atexit handlers and leftover threads of the program do not matter

def install_audit_hook(root):
    readable = tuple(os.path.realpath(p) for p in [root, *sys.path, sys.prefix, "/usr/share/zoneinfo"] if p)
    readable += ("/dev/null", "/dev/urandom")
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    refused = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.symlink", "os.link",
               "resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile", "sys.addaudithook",
               "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
               "gc.get_referents"}
    modules = {"_posixsubprocess", "ctypes", "_ctypes", "_xxsubinterpreters", "_testcapi", "_testinternalcapi",
               "posix", "_signal"}  # _posixsubprocess forks without an audit event; posix, _signal: patched below
    frames = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
    changes = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
               "os.setxattr", "os.removexattr", "sqlite3.connect"}

    def under(path, roots):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except Exception:  # an odd path object: refuse rather than guess
            return False
        return any(real == r or real.startswith(r + os.sep) for r in roots)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return  # an fd it already holds
            if mode is None:  # os.open: only files in its directory, so that it holds no fd of another one
                if not under(path, (root,)) or os.path.isdir(path):
                    raise PermissionError("os.open outside the sandbox")
            elif not under(path, (root,) if isinstance(flags, int) and flags & writes else readable):
                raise PermissionError("open outside the sandbox")
        elif event == "sys._getframe":
            raise ValueError("call stack is not deep enough")  # what namedtuple, enum and typing expect
        elif (event in refused or event.startswith(("socket.", "ctypes.")) or event == "import" and args[0] in modules
              or event == "object.__getattr__" and args[1] in frames):
            raise PermissionError(event + " is not allowed in the sandbox")
        elif event in changes or event.startswith("shutil."):
            if not all(under(a, (root,)) for a in args if isinstance(a, (str, bytes, os.PathLike))):
                raise PermissionError("changing files outside the sandbox")

    sys.addaudithook(hook)
    import _signal, posix  # no audit events for these: a handler would get the harness's frame
    def blocked(*args, **kwargs):
        raise PermissionError("not allowed in the sandbox")
    for module in (os, posix):
        module.mkfifo = module.mknod = blocked
    _signal.signal = blocked

main(*map(int, sys.argv[1:]))
"""


def program_text(completion):
    """The last ```python fenced block, or the whole completion when there is none."""
    blocks = PYTHON_FENCE.findall(str(completion)[-MAX_TEXT:])
    return blocks[-1] if blocks else str(completion)


def run_processes(leader, marker):
    """Live processes of one run: in the leader's session or process group, descended from it, or
    carrying its marker in their environment; only processes started no earlier than the leader."""
    table = {}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table[int(pid)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone already
    if leader not in table:
        return []
    started, found = table[leader][4], []
    for pid, (state, parent, group, session, start) in table.items():
        if pid == leader or state == b"Z" or start < started:
            continue
        ancestors = set()
        while parent in table and parent not in ancestors and parent != leader:
            ancestors.add(parent)
            parent = table[parent][1]
        mine = leader in (group, session, parent)
        if not mine:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    mine = marker in f.read()
            except OSError:
                continue
        if mine:
            found.append(pid)
    return found


def kill_run(leader, marker):
    """SIGKILL the run's process group, then whatever run_processes finds, until it finds nothing
    (a process may fork between a scan and its kill). The leader is not reaped yet, so its pid,
    which is also the session and group id, cannot have been reused by an unrelated process."""
    quiet = 0
    for _ in range(100):
        try:
            os.killpg(leader, signal.SIGKILL)
        except OSError:
            pass  # the group is empty
        victims = run_processes(leader, marker)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        # Three empty scans 10 ms apart: a process caught inside fork() shows its child only later.
        quiet = 0 if victims else quiet + 1
        if quiet == 3:
            return
        time.sleep(0.01)


def run_tests(program, tests, timeout=5.0, audit=True) -> bool:
    """True iff `program` then `tests` run to their end in the sandbox (code_reward's docstring).
    audit=False leaves out the audit hook, so that the tests can check the other layers on their own.
    A program that forks (possible only with audit=False): the verdict is the harness process's own,
    the one started here. A forked copy that also runs the tests to the end writes nothing, so the
    answer does not depend on which process gets there first; the cleanup kills the copies either way."""
    # The marker and the directory name carry our pid, so that a test can tell its runs from others'.
    token, marker = secrets.token_hex(16), f"{os.getpid()}-{secrets.token_hex(16)}".encode()
    workdir = tempfile.mkdtemp(prefix=f"grpo_code_{os.getpid()}_")
    report_read, report_write = os.pipe()
    process = None
    try:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": workdir, "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", MARKER_VAR: marker.decode()}
        limits = (report_write, math.ceil(timeout) + 1, MEMORY_LIMIT, FILE_LIMIT, PROCESS_LIMIT, int(audit))
        # Output goes nowhere: a flood of prints can fill neither the parent's memory nor the disk.
        process = subprocess.Popen([sys.executable, "-I", "-B", "-c", HARNESS, *map(str, limits)], cwd=workdir,
                                   env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, pass_fds=(report_write,), start_new_session=True)
        os.close(report_write)
        report_write = None
        try:
            process.stdin.write(json.dumps([token, program, tests]).encode())
            process.stdin.close()
        except OSError:
            pass  # it died before reading its input: it cannot report a pass
        # The report pipe turns readable when the token comes or when every writer has exited (EOF).
        # poll, not select: select fails on fd numbers above 1023, which a busy trainer may reach.
        poller = select.poll()
        poller.register(report_read, select.POLLIN)
        # Exactly one token's length: only the harness's own process writes it, once (one atomic write).
        return bool(poller.poll(timeout * 1000)) and os.read(report_read, len(token)) == token.encode()
    finally:
        if process is not None:
            kill_run(process.pid, marker)  # also after a pass: nothing it started survives the call
            process.wait()
        for fd in (report_read, report_write):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def code_reward(completion, tests, timeout=5.0) -> float:
    """1.0 iff the program (the last ```python block of the completion, else all of it) followed by
    `tests` (Python asserts) runs to the end in a sandboxed child process within `timeout` seconds;
    else 0.0. Never raises. Safe to call from many threads at once (no global state, no chdir, no
    signal handlers in the parent).

    What this protects against (layers: a child process, rlimits, an audit hook, a cleanup scan):
      - early exits that skip the tests (sys.exit(0), os._exit(0), raise SystemExit, atexit tricks,
        killing itself, crashing): a pass is a random per-call token that the harness writes to a
        private pipe only after the tests finish; the completion cannot know it, and printing
        "All tests passed" or exiting 0 proves nothing;
      - reading the hidden tests: they come on stdin, never as a file, and reads outside its
        directory and Python's own library directories are refused (so is data/code.jsonl);
      - an always-equal object (__eq__ returning True) or an int/str subclass that rigs ==: the tests'
        == and != are rewritten to require a value made only of builtin types when the expected value
        is one; builtins the program replaced are restored, and names it defines that shadow builtins
        are not passed to the tests;
      - infinite loops and slow code: wall-clock timeout and RLIMIT_CPU;
      - memory bombs (RLIMIT_AS, 1 GiB), huge files (RLIMIT_FSIZE, 1 MiB), floods of output (sent
        to /dev/null), core dumps (RLIMIT_CORE 0);
      - processes: fork, exec, subprocess, os.system, posix_spawn, _posixsubprocess and signals to
        other processes are refused by the audit hook; and after every call, passed or not, the
        process group, every descendant, every process in its session and every process whose
        environment carries the call's marker (a double fork + setsid keeps its environment) is
        SIGKILLed, repeatedly until none is left;
      - files outside its temporary directory (deleted after the call): writes, os.open, removes,
        renames, mkdir, chmod, links, mkfifo and sqlite are refused outside it; chdir is refused;
      - secrets: `python -I` (no user site, no PYTHON* variables) and an environment of PATH, LANG,
        TMPDIR and the marker only; no network (socket creation is refused).
    What it does not protect against:
      - a determined attacker. Audit hooks are a tripwire, not a security boundary: a compiled
        extension it writes and imports, or a CPython bug, gets past them; then a process that
        double-forks, calls setsid and execs with a clean environment escapes the cleanup scan, and
        RLIMIT_NPROC does not bind root (we run as root here). For an adversarial policy run this in
        a container or VM as an unprivileged user with no network and a read-only filesystem;
      - a program that changes modules the tests use (math.isclose = ...), or whose objects rig other
        operators (<, abs, __bool__, __hash__); and the tests' own weaknesses (too few cases);
      - reading its own memory by a route not listed above; sys._getframe is refused (it raises
        ValueError, as namedtuple, enum and typing expect), so logging and inspect do not work;
      - resources other than those listed: disk space inside its directory up to RLIMIT_FSIZE per file.
    """
    try:
        if not isinstance(tests, str):
            return 0.0  # str(None) would be a test that always passes
        return float(run_tests(program_text(completion), tests, timeout))
    except Exception:  # a sandbox failure is a failed test, never a crashed trainer
        return 0.0


# A task name -> reward function; grpo.py picks "code" for items with "tests", else "math".
REWARDS = {"math": math_reward, "code": code_reward}
