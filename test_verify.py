"""Tests for verify.py: the GSM8K golds, normalisation cases, hostile strings, hostile programs, and
every problem of data/code.jsonl solved by a reference solution (and failed by a wrong one)."""

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import verify
from verify import code_reward, extract_answer, format_reward, math_reward

ROOT = Path(__file__).resolve().parent
GSM8K_TEST = Path(os.environ.get("GRPO_SHARED", ROOT.parent / "shared")) / "data" / "gsm8k" / "test.jsonl"
CODE = ROOT / "data" / "code.jsonl"

# -----------------------------------------------------------------------------
# Math.


def gsm8k_items():
    with open(GSM8K_TEST) as f:
        return [json.loads(line) for line in f]


def test_every_gsm8k_test_gold_scores_one_boxed_zero_when_wrong_and_raw_only_lenient():
    items = gsm8k_items()
    assert len(items) == 1319
    for item in items:
        solution, gold = item["answer"].rsplit("####", 1)
        gold = gold.strip()
        boxed = f"{solution}The answer is \\boxed{{{gold}}}."
        assert math_reward(boxed, item["answer"], strict=True) == 1.0, gold
        wrong = str(int(gold.replace(",", "")) + 1)
        assert math_reward(f"{solution}\\boxed{{{wrong}}}", item["answer"], strict=True) == 0.0, gold
        assert math_reward(item["answer"], item["answer"], strict=False) == 1.0, gold  # "#### N" read leniently
        assert math_reward(item["answer"], item["answer"], strict=True) == 0.0, gold  # no box, no answer


@pytest.mark.parametrize("completion,answer", [
    ("\\boxed{1,234}", "1234"), ("\\boxed{$18.00}", "18"), ("\\boxed{ 72 }.", "#### 72"), ("\\boxed{+5}", "5"),
    ("\\boxed{-3}", "-3"), ("\\boxed{\\frac{3}{2}}", "1.5"), ("\\boxed{\\dfrac{1}{2}}", "0.5"), ("\\boxed{3/2}", "1.5"),
    ("\\boxed{72.}", "72"), ("\\boxed{0.50}", "1/2"), ("\\boxed{\\$5}", "5"), ("\\boxed{10\\text{ apples}}", "10"),
    ("first \\boxed{1} then \\boxed{2}", "2"), ("\\boxed{-\\frac{1}{4}}", "-0.25"), ("\\boxed{1,000,000}", "1000000"),
    ("\\boxed{(144)/(2)}", "72"), ("\\boxed{(72)}", "72"), ("\\boxed{((3)/(4))}", "0.75"), ("\\boxed{(-144)/(2)}", "-72"),
])
def test_math_reward_accepts_equal_numbers_in_any_usual_form(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize("completion,answer", [
    ("\\boxed{720}", "72"), ("\\boxed{7.2}", "72"), ("\\boxed{-72}", "72"), ("\\boxed{72 apples and 3}", "72"),
    ("\\boxed{}", "0"), ("\\boxed{x}", "1"), ("72", "72"), ("\\boxed{1}", "not a number"), ("\\boxed{1/0}", "1"),
    ("\\boxed{2} \\boxed{1}", "2"), ("\\boxed{1,23}", "123"), ("\\boxed{(144)/(3)}", "72"), ("\\boxed{(1}", "1"),
])
def test_math_reward_rejects_everything_else(completion, answer):
    assert math_reward(completion, answer) == 0.0


def test_extract_answer_strict_and_lenient():
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("a \\boxed{1} b \\boxed{{2}}") == "{2}"
    assert extract_answer("the answer is 72.") is None
    assert extract_answer("the answer is 72.", strict=False) == "72"
    assert extract_answer("#### 1,234", strict=False) == "1,234"
    assert extract_answer("no digits", strict=False) is None
    assert extract_answer("\\boxed{5} and later 7", strict=False) == "5"  # a box wins over a later number


HOSTILE_STRINGS = [
    "9" * 1_000_000, "\\boxed{" * 5000, "\\boxed{" * 5000 + "1" + "}" * 5000, "}" * 100_000 + "\\boxed{1",
    "\\boxed{" + "1" * 1_000_000 + "}", "\\frac{" * 10_000, "١٢٣", "\\boxed{１２}", "\x00\udcff\U0010ffff",
    "", " ", "-" * 100_000 + "1", "1e999999999", "\\boxed{" + "{" * 100_000 + "}", ("1," * 300_000) + "1",
]


@pytest.mark.parametrize("text", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_math_side_survives_hostile_strings_quickly(text):
    # CPU time of this thread, not wall time: it measures the work (a quadratic scan would take far
    # more than 1 s), not how long other processes on a loaded machine kept this one waiting.
    start = time.thread_time()
    for strict in (True, False):
        extract_answer(text, strict)
        assert math_reward(text, "12", strict) in (0.0, 1.0)
        assert math_reward("\\boxed{12}", text, strict) in (0.0, 1.0)
    assert format_reward(text) in (0.0, 1.0) and format_reward(text, kind="code") in (0.0, 1.0)
    assert time.thread_time() - start < 1.0


def test_non_string_input_never_raises():
    for value in (None, 12, 3.5, ["\\boxed{1}"], b"\\boxed{1}"):
        assert math_reward(value, "1") in (0.0, 1.0) and format_reward(value) in (0.0, 1.0)
        assert extract_answer(value, strict=False) is None or isinstance(extract_answer(value, strict=False), str)


@pytest.mark.parametrize("text,expected", [
    ("Add them: 2 + 3 = 5. \\boxed{5}", 1.0), ("reasoning $\\boxed{5}$.", 1.0), ("so \\[\\boxed{5}\\]\n", 1.0),
    ("\\boxed{5}", 0.0),  # no reasoning
    ("reasoning \\boxed{5} and more words", 0.0), ("one \\boxed{4} two \\boxed{5}", 0.0), ("no box at all", 0.0),
    ("unbalanced \\boxed{5", 0.0),
])
def test_format_reward_math(text, expected):
    assert format_reward(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Plan.\n```python\ndef f():\n    return 1\n```", 1.0), ("```python\nx = 1\n```\n\n", 1.0),
    ("```python\nx = 1\n```\nexplanation after", 0.0), ("```python\na=1\n```\n```python\nb=2\n```", 0.0),
    ("def f(): return 1", 0.0), ("```python\n```", 0.0),
])
def test_format_reward_code(text, expected):
    assert format_reward(text, kind="code") == expected


# -----------------------------------------------------------------------------
# Code: every problem is solvable; hostile programs score 0 and leave nothing behind.

REFERENCES = {
    'running_max': 'def running_max(xs):\n    out, best = [], None\n    for x in xs:\n        best = x if best is None or x > best else best\n        out.append(best)\n    return out',
    'count_vowels': "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
    'is_balanced': "def is_balanced(s):\n    pairs, stack = {')': '(', ']': '[', '}': '{'}, []\n    for c in s:\n        if c in '([{':\n            stack.append(c)\n        elif c in pairs:\n            if not stack or stack.pop() != pairs[c]:\n                return False\n    return not stack",
    'digit_sum': 'def digit_sum(n):\n    return sum(int(d) for d in str(abs(n)))',
    'rotate_left': 'def rotate_left(xs, k):\n    if not xs:\n        return []\n    k %= len(xs)\n    return xs[k:] + xs[:k]',
    'second_largest': 'def second_largest(xs):\n    values = sorted(set(xs))\n    return values[-2] if len(values) >= 2 else None',
    'compress': "def compress(s):\n    out, i = [], 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n            j += 1\n        out.append(s[i] + str(j - i))\n        i = j\n    return ''.join(out)",
    'is_leap_year': 'def is_leap_year(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)',
    'flatten': 'def flatten(items):\n    out = []\n    for x in items:\n        if isinstance(x, list):\n            out.extend(flatten(x))\n        else:\n            out.append(x)\n    return out',
    'word_lengths': 'def word_lengths(sentence):\n    return {w: len(w) for w in sentence.split()}',
    'gcd': 'def gcd(a, b):\n    a, b = abs(a), abs(b)\n    while b:\n        a, b = b, a % b\n    return a',
    'to_binary': "def to_binary(n):\n    if n == 0:\n        return '0'\n    bits = ''\n    while n:\n        bits = str(n % 2) + bits\n        n //= 2\n    return bits",
    'merge_sorted': 'def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]',
    'is_palindrome': 'def is_palindrome(s):\n    kept = [c.lower() for c in s if c.isalnum()]\n    return kept == kept[::-1]',
    'chunk': 'def chunk(xs, size):\n    return [xs[i:i + size] for i in range(0, len(xs), size)]',
    'roman_to_int': "def roman_to_int(s):\n    v = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}\n    total = 0\n    for i, c in enumerate(s):\n        if i + 1 < len(s) and v[c] < v[s[i + 1]]:\n            total -= v[c]\n        else:\n            total += v[c]\n    return total",
    'fizzbuzz_line': "def fizzbuzz_line(n):\n    return 'Fizz' * (n % 3 == 0) + 'Buzz' * (n % 5 == 0) or str(n)",
    'unique_in_order': 'def unique_in_order(xs):\n    seen, out = set(), []\n    for x in xs:\n        if x not in seen:\n            seen.add(x); out.append(x)\n    return out',
    'matrix_transpose': 'def matrix_transpose(m):\n    return [list(col) for col in zip(*m)]',
    'count_islands': "def count_islands(grid):\n    seen, count = set(), 0\n    for r in range(len(grid)):\n        for c in range(len(grid[0])):\n            if grid[r][c] == '#' and (r, c) not in seen:\n                count += 1\n                stack = [(r, c)]\n                while stack:\n                    y, x = stack.pop()\n                    if (y, x) in seen or not (0 <= y < len(grid) and 0 <= x < len(grid[0])) or grid[y][x] != '#':\n                        continue\n                    seen.add((y, x))\n                    stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]\n    return count",
    'caesar_shift': "def caesar_shift(text, k):\n    out = []\n    for c in text:\n        if 'a' <= c <= 'z':\n            out.append(chr((ord(c) - 97 + k) % 26 + 97))\n        elif 'A' <= c <= 'Z':\n            out.append(chr((ord(c) - 65 + k) % 26 + 65))\n        else:\n            out.append(c)\n    return ''.join(out)",
    'pascal_row': 'def pascal_row(n):\n    row = [1]\n    for _ in range(n):\n        row = [1] + [a + b for a, b in zip(row, row[1:])] + [1]\n    return row',
    'median': 'def median(xs):\n    s = sorted(xs)\n    mid = len(s) // 2\n    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2',
    'anagrams': "def anagrams(a, b):\n    clean = lambda s: sorted(s.replace(' ', '').lower())\n    return clean(a) == clean(b)",
    'prime_factors': 'def prime_factors(n):\n    out, p = [], 2\n    while p * p <= n:\n        while n % p == 0:\n            out.append(p); n //= p\n        p += 1\n    if n > 1:\n        out.append(n)\n    return out',
    'title_case': "def title_case(s):\n    return ' '.join(w[:1].upper() + w[1:].lower() for w in s.split(' '))",
    'max_subarray': 'def max_subarray(xs):\n    best = current = xs[0]\n    for x in xs[1:]:\n        current = max(x, current + x)\n        best = max(best, current)\n    return best',
    'parse_kv': "def parse_kv(text):\n    out = {}\n    for piece in text.split(';'):\n        if piece.strip():\n            key, value = piece.split('=', 1)\n            out[key.strip()] = value.strip()\n    return out",
    'fibonacci': 'def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a',
    'clamp_list': 'def clamp_list(xs, low, high):\n    return [min(max(x, low), high) for x in xs]',
    'longest_common_prefix': "def longest_common_prefix(words):\n    if not words:\n        return ''\n    prefix = words[0]\n    for w in words[1:]:\n        while not w.startswith(prefix):\n            prefix = prefix[:-1]\n    return prefix",
    'group_by_parity': 'def group_by_parity(xs):\n    return [x for x in xs if x % 2 == 0], [x for x in xs if x % 2]',
    'binary_search': 'def binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if xs[mid] == target:\n            return mid\n        if xs[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1',
    'seconds_to_clock': "def seconds_to_clock(seconds):\n    h, rest = divmod(seconds, 3600)\n    m, s = divmod(rest, 60)\n    return f'{h}:{m:02d}:{s:02d}'",
    'valid_ipv4': "def valid_ipv4(s):\n    parts = s.split('.')\n    return len(parts) == 4 and all(p.isdigit() and p.isascii() and str(int(p)) == p and int(p) <= 255 for p in parts)",
    'dedupe_spaces': "def dedupe_spaces(s):\n    return ' '.join(s.split())",
    'triangle_kind': "def triangle_kind(a, b, c):\n    x, y, z = sorted((a, b, c))\n    if x <= 0 or x + y <= z:\n        return 'invalid'\n    if x == z:\n        return 'equilateral'\n    return 'isosceles' if x == y or y == z else 'scalene'",
    'histogram': 'def histogram(xs):\n    counts = {}\n    for x in xs:\n        counts[x] = counts.get(x, 0) + 1\n    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))',
    'spiral_order': 'def spiral_order(m):\n    out = []\n    m = [row[:] for row in m]\n    while m:\n        out += m.pop(0)\n        m = [list(r) for r in zip(*m)][::-1]\n    return out',
    'sum_of_multiples': 'def sum_of_multiples(limit):\n    return sum(n for n in range(limit) if n % 3 == 0 or n % 5 == 0)',
    'nested_depth': "def nested_depth(s):\n    depth = best = 0\n    for c in s:\n        if c == '(':\n            depth += 1; best = max(best, depth)\n        elif c == ')':\n            depth -= 1\n    return best",
    'interleave': 'def interleave(a, b):\n    out = []\n    for i in range(max(len(a), len(b))):\n        if i < len(a):\n            out.append(a[i])\n        if i < len(b):\n            out.append(b[i])\n    return out',
}


def code_items():
    with open(CODE) as f:
        return [json.loads(line) for line in f]


def test_code_dataset_is_ours_complete_and_every_problem_has_a_reference():
    items = code_items()
    assert len(items) >= 40
    assert {item["entry_point"] for item in items} == set(REFERENCES)
    for item in items:
        assert item["entry_point"] in item["prompt"] and "assert" in item["tests"]


def test_every_code_problem_is_solved_by_its_reference_and_failed_by_a_wrong_answer():
    items = code_items()

    def check(item):
        name = item["entry_point"]
        good = code_reward(f"Here it is.\n```python\n{REFERENCES[name]}\n```", item["tests"])
        wrong = code_reward(f"```python\ndef {name}(*args, **kwargs):\n    return None\n```", item["tests"])
        return name, good, wrong
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(check, items))
    assert [name for name, good, wrong in results if good != 1.0] == []
    assert [name for name, good, wrong in results if wrong != 0.0] == []


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
SOLUTION = "def add(a, b):\n    return a + b\n"
MARKER_FILE = f"/tmp/grpo_verify_escape_{os.getpid()}"
SLEEP = f"1000.{os.getpid()}"  # a sleep argument unique to this test run
LEAKED_TESTS = f"/tmp/grpo_verify_tests_{os.getpid()}.py"  # the tests, where a program might look for them
# Defines add from a table read out of `path`: it passes iff it can read the hidden tests.
FROM_TESTS = ("import re\ntable = {{(int(a), int(b)): int(c) for a, b, c in re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == "
              "(-?\\d+)', {source})}}\ndef add(a, b):\n    return table[a, b]\n")
# Writes the harness's token to its report pipe if it can find it; `frame` is a frame of the program's.
STEAL = ("def steal(frame):\n    while frame is not None:\n        if 'token' in frame.f_locals:\n"
         "            import os\n            os.write(frame.f_locals['report_fd'], frame.f_locals['token'].encode())\n"
         "            os._exit(0)\n        frame = frame.f_back\n")

HOSTILE_PROGRAMS = {
    "infinite loop": "while True:\n    pass\n" + SOLUTION,
    "sleep": "import time\ntime.sleep(60)\n" + SOLUTION,
    "sys.exit(0)": SOLUTION + "import sys\nsys.exit(0)\n",
    "os._exit(0)": SOLUTION + "import os\nos._exit(0)\n",
    "raise SystemExit": SOLUTION + "raise SystemExit\n",
    "SystemExit in a function": SOLUTION + "def stop():\n    raise SystemExit(0)\nstop()\n",
    "kill itself": SOLUTION + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "raise_signal SIGKILL": SOLUTION + "import signal\nsignal.raise_signal(signal.SIGKILL)\n",
    "raise_signal SIGTERM": SOLUTION + "import signal\nsignal.raise_signal(signal.SIGTERM)\n",
    "segfault": SOLUTION + "import faulthandler\nfaulthandler._sigsegv()\n",
    "child process left behind": SOLUTION + f"import subprocess\nsubprocess.Popen(['sleep', '{SLEEP}'])\nimport sys\nsys.exit(0)\n",
    "fork": SOLUTION + "import os, time\nif os.fork() == 0:\n    time.sleep(100)\n",
    "double fork daemon": SOLUTION + "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(100)\n",
    "os.system": SOLUTION + f"import os\nos.system('sleep {SLEEP} &')\n",
    "multiprocessing": SOLUTION + "import multiprocessing, time\nmultiprocessing.Process(target=time.sleep, args=(100,)).start()\n",
    "_posixsubprocess, new session, clean environment": SOLUTION + (
        "import _posixsubprocess, os\nr, w = os.pipe()\n_posixsubprocess.fork_exec([b'/bin/sleep', b'" + SLEEP + "'], "
        "[b'/bin/sleep'], True, (w,), None, [b'PATH=/bin'], -1, -1, -1, -1, -1, -1, r, w, True, True, -1, None, None, "
        "None, -1, None, False)\n"),
    "ctypes": SOLUTION + "import ctypes\nctypes.CDLL(None).exit(0)\n",
    "memory bomb": "x = bytearray(8 * 1024 ** 3)\n" + SOLUTION,
    "memory bomb list": "x = [1] * (10 ** 10)\n" + SOLUTION,
    "memory bomb, growing": "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\n" + SOLUTION,
    "50 MB of output": "import sys\nsys.stdout.write('x' * 50_000_000)\nsys.exit(0)\n",
    "write outside its directory": f"open({MARKER_FILE!r}, 'w').write('x')\n" + SOLUTION,
    "os.open outside": f"import os\nos.close(os.open({MARKER_FILE!r}, os.O_WRONLY | os.O_CREAT))\n" + SOLUTION,
    "mkfifo outside": f"import os\nos.mkfifo({MARKER_FILE!r})\n" + SOLUTION,
    "sqlite outside": f"import sqlite3\nsqlite3.connect({MARKER_FILE!r}).execute('create table t (x)')\n" + SOLUTION,
    "symlink out, then write": f"import os\nos.symlink({MARKER_FILE!r}, 'link')\nopen('link', 'w').write('x')\n" + SOLUTION,
    "chdir out, then write": f"import os\nos.chdir('/tmp')\nopen({os.path.basename(MARKER_FILE)!r}, 'w').write('x')\n" + SOLUTION,
    "huge file": "open('big', 'wb').write(b'x' * (50 * 1024 ** 2))\n" + SOLUTION,
    "All tests passed": "print('All tests passed')\nprint('OK')\nimport sys\nsys.exit(0)\n",
    "fake token on stdout": "import sys\nprint('PASS ' * 100)\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
    "exit from atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit\n",
    "raise rlimit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nx = bytearray(8 * 1024 ** 3)\n" + SOLUTION,
    "read the tests from stdin": FROM_TESTS.format(source="__import__('sys').stdin.read()"),
    "read the tests from a file": FROM_TESTS.format(source=f"open({LEAKED_TESTS!r}).read()"),
    "read the tests via os.open": FROM_TESTS.format(source=f"__import__('os').read(__import__('os').open({LEAKED_TESTS!r}, 0), 9999).decode()"),
    "token from sys._getframe": STEAL + "import sys\nsteal(sys._getframe())\n",
    "token from a traceback": STEAL + "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    steal(e.__traceback__.tb_frame)\n",
    "token from a generator": STEAL + "def g():\n    yield\nit = g()\nsteal(it.gi_frame)\n",
    "token from a signal handler": STEAL + "import signal\nsignal.signal(signal.SIGUSR1, lambda n, frame: steal(frame))\nsignal.raise_signal(signal.SIGUSR1)\n",
    "token from gc": "import gc, os, re\nfor o in gc.get_objects():\n    pass\n" + SOLUTION,
    "token from /proc/self/mem": "data = open('/proc/self/mem', 'rb')\n" + SOLUTION,
    "settrace to skip the asserts": SOLUTION.replace("a + b", "0") + "import sys\nsys.settrace(lambda *a: None)\n",
    "audit hook reading the tests": "import sys\nsys.addaudithook(lambda event, args: None)\n" + SOLUTION.replace("a + b", "0"),
    "always-equal object": "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\ndef add(a, b):\n    return Anything()\n",
    "int subclass equal to everything": "class Int(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Int(0)\n",
    "list hiding always-equal objects": "class Anything:\n    def __eq__(self, other):\n        return True\nclass L(list):\n"
        "    def __iter__(self):\n        return iter([])\ndef add(a, b):\n    return L([Anything()])\n",
    "bound builtin as __eq__": "class Ne:\n    __eq__ = ''.__ne__\ndef add(a, b):\n    return Ne()\n",
    "patch a stdlib class's ==": "import fractions\nfractions.Fraction.__eq__ = lambda s, o: True\ndef add(a, b):\n    return fractions.Fraction(0)\n",
    "metaclass that equals int": "class Meta(type):\n    def __eq__(cls, other):\n        return True\n    __hash__ = type.__hash__\nclass Fake(metaclass=Meta):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Fake()\n",
    "replace a builtin the tests use": "import builtins\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return 0\n",
    "shadow a builtin the tests use": "def abs(x):\n    return 0\ndef add(a, b):\n    return 0\n",
    "patch builtins while being tested": "import builtins\ndef add(a, b):\n    builtins.abs = lambda x: 0\n    return 0\n",
    "rebind the tests' helper": "def add(a, b):\n    globals()['__same__'] = lambda a, b: True\n    return 0\n",
    "socket": "import socket\nsocket.socket()\n" + SOLUTION,
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGCONT)\n" + SOLUTION,
}
TESTS_USING_ABS = TESTS + "assert abs(add(2, 3) - 5) < 1e-9\nassert [add(1, 1)] == [2]\n"


def marked_processes():
    """Processes carrying this test process's sandbox marker, and sleeps with our unique argument."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if f"{verify.MARKER_VAR}={os.getpid()}-".encode() in environ or SLEEP.encode() in cmdline:
                found.append(pid)
    return found


def our_workdirs():
    return [d for d in os.listdir(tempfile.gettempdir()) if d.startswith(f"grpo_code_{os.getpid()}_")]


def check_nothing_left_behind():
    # A SIGKILLed process that init has not reaped yet may linger in /proc for a moment (longer on a
    # loaded machine): wait for that with a deadline, instead of a fixed sleep that races the teardown.
    # A process that really survived (they sleep 100 s or more) is still there when the deadline ends.
    deadline = time.monotonic() + 5.0
    while marked_processes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marked_processes() == []  # no child outlived the call
    assert not os.path.lexists(MARKER_FILE)
    assert our_workdirs() == []


@pytest.fixture
def leaked_tests():
    Path(LEAKED_TESTS).write_text(TESTS_USING_ABS)
    yield
    os.remove(LEAKED_TESTS)


@pytest.mark.parametrize("name", list(HOSTILE_PROGRAMS))
def test_hostile_program_scores_zero_in_time_and_leaves_nothing_behind(name, leaked_tests):
    start = time.monotonic()
    assert code_reward(f"```python\n{HOSTILE_PROGRAMS[name]}```", TESTS_USING_ABS, timeout=2.0) == 0.0
    assert time.monotonic() - start < 2.0 + 2.0
    check_nothing_left_behind()


def test_the_hostile_programs_that_read_the_tests_would_pass_if_they_could(leaked_tests):
    # So that their 0.0 above means "could not read the tests", not "the program is broken".
    program = FROM_TESTS.format(source=repr(TESTS))
    assert code_reward(program, TESTS) == 1.0


LEFT_BEHIND = ["child process left behind", "fork", "double fork daemon", "os.system", "multiprocessing"]


@pytest.mark.parametrize("name", LEFT_BEHIND)
def test_without_the_audit_hook_the_cleanup_still_kills_every_process(name):
    # The audit hook refuses these; here it is off, so this checks the second layer: the kill scan.
    assert verify.run_tests(HOSTILE_PROGRAMS[name].replace("import sys\nsys.exit(0)\n", ""), "x = 1",
                            timeout=2.0, audit=False) is True  # they pass: what matters is what is left
    check_nothing_left_behind()


def test_without_the_audit_hook_a_forked_copy_that_finishes_cannot_pass_for_the_harness():
    # The verdict is the harness process's own (run_tests' docstring): here it stops in the program while
    # its forked copy runs the tests to the end. The copy stays silent, so this is a timeout, not a pass;
    # with two writers, a run whose harness and copy both finish could also read two tokens as one.
    program = SOLUTION + "import os, time\nif os.fork() != 0:\n    time.sleep(100)\n"
    assert verify.run_tests(program, "x = 1", timeout=2.0, audit=False) is False
    check_nothing_left_behind()


def test_a_correct_program_passes_even_with_output_and_no_fence():
    assert code_reward(SOLUTION, TESTS) == 1.0  # no fence: the whole completion is the program
    assert code_reward("print('x' * 1_000_000)\n" + SOLUTION, TESTS) == 1.0
    assert code_reward(f"```python\nwrong = 1\n```\nthen\n```python\n{SOLUTION}```", TESTS) == 1.0  # the last block
    assert code_reward(SOLUTION + "import sys\ndef unused():\n    sys.exit(0)\n", TESTS) == 1.0
    assert code_reward(SOLUTION.replace("a + b", "a - b"), TESTS) == 0.0
    assert code_reward(SOLUTION, TESTS_USING_ABS) == 1.0
    check_nothing_left_behind()


def test_ordinary_library_code_works_in_the_sandbox():
    program = """
import collections, dataclasses, enum, functools, heapq, itertools, math, re, statistics, typing, tempfile
from fractions import Fraction
Point = collections.namedtuple("Point", "x y")
class Pair(typing.NamedTuple):
    a: int
    b: int
@dataclasses.dataclass
class Box:
    v: int
class Color(enum.Enum):
    RED = 1
@functools.lru_cache(None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
with open("scratch.txt", "w") as f:  # its own directory is writable
    f.write("ok")
with tempfile.TemporaryFile() as f:  # TMPDIR is its own directory
    f.write(b"ok")
def add(a, b):
    return float(a + b) + fib(0) + statistics.mean([0]) + heapq.nsmallest(1, [0])[0] + Color.RED.value - 1
"""
    tests = TESTS + ("assert add(1, 1) == 2.0 == 2\nassert Point(1, 2) == (1, 2)\nassert Box(1) == Box(1)\n"
                     "assert collections.OrderedDict(a=1) == {'a': 1} != {'a': 2}\nassert [Pair(1, 2)] == [(1, 2)]\n")
    assert code_reward(program, tests) == 1.0


def test_code_reward_runs_in_parallel_threads():
    programs = [SOLUTION if i % 2 == 0 else SOLUTION.replace("+", "*") for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: code_reward(p, TESTS), programs))
    assert results == [1.0 if i % 2 == 0 else 0.0 for i in range(16)]
    check_nothing_left_behind()


def test_the_child_gets_no_inherited_secrets(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "hunter2")
    leak = "import os\nassert 'GRPO_TEST_SECRET' not in os.environ\n" + SOLUTION
    assert code_reward(leak, TESTS) == 1.0


def test_code_reward_never_raises():
    for completion, tests in ((None, TESTS), (SOLUTION, None), ("\x00", TESTS), (SOLUTION, "assert (")):
        assert code_reward(completion, tests, timeout=2.0) == 0.0


def test_registry_names_every_reward():
    assert verify.REWARDS == {"math": math_reward, "code": code_reward}
