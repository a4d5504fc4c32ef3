"""
verify.py -- the rewards of grpo.py: pure functions `(completion, answer) -> float in [0, 1]`.

GRPO learns whatever these pay for, so they must be hard to fool. Every public function is total: it
never raises on any string input (it returns 0.0 instead) and returns quickly on hostile input.

    extract_answer(text, strict=True)        the last \\boxed{...} (or, lenient, the last number)
    math_reward(completion, answer, strict)  1.0 iff the extracted answer equals the gold number
    format_reward(completion, kind)          1.0 iff the completion has the format the prompt asks for
    code_reward(completion, tests, timeout)  1.0 iff the program passes the asserts, run in a sandbox

To add a task, write one more function here and call it from `score` in grpo.py.
"""

import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
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
PROCESS_LIMIT = 64  # processes of its user (see "not covered": root is exempt)

# The harness runs first in the child. It sets the resource limits (in the child itself: a preexec_fn
# is unsafe in grpo.py's multithreaded parent), reads the per-call token from a pipe into a local
# variable and closes that pipe, installs an audit hook (PEP 578; it cannot be removed once added)
# that refuses writes outside the working directory, new processes, signals and rlimit changes, runs
# the program and then the tests in one namespace, and only if both complete writes the token to a
# second pipe. An early exit (sys.exit, os._exit, SystemExit, a signal, a crash) never gets there.
HARNESS = r"""
import os, resource, sys

def main(token_fd, report_fd, memory, file_size, processes, cpu_seconds):
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, file_size),
                         (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    token = os.read(token_fd, 64)
    os.close(token_fd)
    with open("program.py") as f:
        program = f.read()
    with open("tests.py") as f:
        tests = f.read()
    root = os.path.realpath(os.getcwd()) + os.sep
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except Exception:
            return False

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = ("r" != mode.replace("b", "").replace("t", "")) if isinstance(mode, str) else bool(flags & writes)
            if writing and not (isinstance(path, (str, bytes)) and inside(path)):
                raise PermissionError("writing outside the sandbox")
        elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.chmod",
                       "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move"):
            if not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
                raise PermissionError("changing files outside the sandbox")
        elif event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "subprocess.Popen",
                       "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                       "resource.prlimit", "ctypes.dlopen", "socket.connect", "os.setsid"):
            raise PermissionError(event + " is not allowed in the sandbox")

    sys.addaudithook(audit)
    namespace = {"__name__": "__main__"}
    exec(compile(program, "program.py", "exec"), namespace)
    exec(compile(tests, "tests.py", "exec"), namespace)
    os.write(report_fd, token)

main(*map(int, sys.argv[1:]))
"""


def program_text(completion):
    """The last ```python fenced block, or the whole completion when there is none."""
    blocks = PYTHON_FENCE.findall(str(completion))
    return blocks[-1] if blocks else str(completion)


def kill_session(session_id, marker):
    """Kill the child's process group and any process left in its session or carrying the per-call
    marker in its environment (a double fork + setsid leaves the group, not the environment)."""
    try:
        os.killpg(session_id, signal.SIGKILL)
    except OSError:
        pass
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                session = int(f.read().rsplit(b")", 1)[1].split()[3])
            with open(f"/proc/{pid}/environ", "rb") as f:
                marked = marker in f.read()
            if session == session_id or marked:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue  # gone already, or not ours to read


def code_reward(completion, tests, timeout=5.0) -> float:
    """1.0 iff the program (the last ```python block of the completion, else all of it) followed by
    `tests` (Python asserts) runs to the end in a sandboxed child process; else 0.0. Never raises.

    What this protects against:
      - early exits that skip the tests (sys.exit(0), os._exit(0), raise SystemExit, killing itself):
        a pass is a random per-call token written to a private pipe only after the tests finish; the
        completion cannot know it, and printing "All tests passed" or exiting 0 proves nothing;
      - infinite loops and slow code: wall-clock timeout (the whole process group and session are
        SIGKILLed) and RLIMIT_CPU;
      - memory bombs (RLIMIT_AS, 1 GiB), huge files (RLIMIT_FSIZE, 1 MiB), floods of output (sent
        to /dev/null), core dumps;
      - processes left behind: fork/subprocess/os.system are refused by an audit hook, and after every
        call the child's session and anything carrying its per-call environment marker is killed;
      - writing or deleting files outside its own temporary directory (audit hook), which is deleted
        after the call; it runs with `python -I` (no user site, no PYTHON* variables, no cwd on the
        path) and an environment without the parent's variables (no inherited secrets).
    What it does not protect against:
      - a determined attacker: audit hooks are a tripwire, not a sandbox. ctypes (refused at dlopen,
        but already-loaded libraries remain reachable) or a bug in CPython can get past them, and then
        RLIMIT_NPROC does not bind root. Run untrusted code as an unprivileged user in a container
        or VM (no network, read-only filesystem) if your policy may be adversarial;
      - reading files outside its directory, and the network (not blocked here);
      - a program that inspects its own interpreter: it can walk the harness's frames or gc to find
        the token (sys._getframe(1).f_locals) and report a pass, or redefine builtins the tests use.
        Models trained on ordinary tasks are unlikely to stumble on this; a reward-hacking search can.
    """
    workdir = None
    try:
        token, marker = secrets.token_hex(16), "GRPO_SANDBOX_" + secrets.token_hex(8)
        workdir = tempfile.mkdtemp(prefix="grpo_code_")
        for name, text in (("program.py", program_text(completion)), ("tests.py", str(tests)), ("harness.py", HARNESS)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        token_read, token_write = os.pipe()
        report_read, report_write = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", marker: "1", "OMP_NUM_THREADS": "1"}
        limits = (MEMORY_LIMIT, FILE_LIMIT, PROCESS_LIMIT, max(1, math.ceil(timeout)))  # CPU seconds ~ wall
        # Output goes nowhere: a flood of prints can fill neither the parent's memory nor the disk.
        process = subprocess.Popen([sys.executable, "-I", "-S", "harness.py", str(token_read), str(report_write),
                                    *map(str, limits)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   pass_fds=(token_read, report_write), start_new_session=True)
        os.close(token_read)
        os.close(report_write)
        os.write(token_write, token.encode())
        os.close(token_write)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        kill_session(process.pid, marker.encode())  # also when it exited: nothing it started survives
        process.wait()
        os.set_blocking(report_read, False)
        try:
            reported = os.read(report_read, 64)
        except BlockingIOError:
            reported = b""
        os.close(report_read)
        return float(process.returncode == 0 and reported == token.encode())
    except Exception:  # total: a sandbox failure is a failed test, never a crashed trainer
        return 0.0
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# A task name -> reward function; grpo.py picks "code" for items with "tests", else "math".
REWARDS = {"math": math_reward, "code": code_reward}
