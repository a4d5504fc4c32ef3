"""Tests for verify.py: the GSM8K golds, normalisation cases, hostile strings, hostile programs, and
every problem of data/code.jsonl solved by a reference solution (and failed by a wrong one)."""

import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import verify
from verify import code_reward, extract_answer, format_reward, math_reward

ROOT = Path(__file__).resolve().parent
CODE = ROOT / "data" / "code.jsonl"

# -----------------------------------------------------------------------------
# Math.


# The 64 committed problems of data/gsm8k_sample.jsonl, and (needs_shared: conftest.py) all 1,319 of the test split.
@pytest.mark.parametrize("source,count", [("sample", 64), pytest.param("test", 1319, marks=pytest.mark.needs_shared)])
def test_every_gsm8k_gold_scores_one_boxed_zero_when_wrong_and_raw_only_lenient(source, count, request):
    path = ROOT / "data" / "gsm8k_sample.jsonl" if source == "sample" else request.getfixturevalue("gsm8k_test_path")
    with open(path) as f:
        items = [json.loads(line) for line in f]
    assert len(items) == count
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
# Plain data: the only thing that crosses between the program and the judge.

def same_tree(a, b):
    """Equal values with the same exact type at every level (== alone would take 1 == 1.0 == True)."""
    if type(a) is not type(b):
        return False
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if type(a) is float and a != a:
        return b != b  # NaN
    return a == b and (type(a) is not float or math.copysign(1, a) == math.copysign(1, b))


PLAIN_VALUES = [None, True, False, 0, -7, 2 ** 53, -(2 ** 100), 10 ** 5000, [1, 10 ** 5000], [1, "a", 2.5, None, True], 1.0, -0.0, float("nan"), float("inf"), 1e-310,
                "", "é\udcff\U0010ffff", b"\x00\xff", 3 - 4j, [], (), {}, set(), frozenset(),
                [1, (2, [3.5, {"a": (None, b"x")}]), {frozenset({1, 2}), (1, "a")}], {(1, 2): [True], 3: {}, "k": 1.5},
                (1,), [[[[[[0]]]]]], {1: 1.0, True: 0}]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=range(len(PLAIN_VALUES)))
def test_plain_data_round_trips_with_exact_types(value):
    assert same_tree(verify.decode_plain(verify.encode_plain(value)), value)


class IntLike(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


NOT_PLAIN = [IntLike(1), type("S", (str,), {})("x"), type("L", (list,), {})(), type("D", (dict,), {})(), object(),
             iter([1]), (x for x in []), len, lambda: 0, range(3), bytearray(b"x"), [1, [2, object()]],
             {1: IntLike(2)}, {IntLike(1): 2}, (1, (2, type("F", (float,), {})(1.0)))]


@pytest.mark.parametrize("value", NOT_PLAIN, ids=range(len(NOT_PLAIN)))
def test_anything_but_plain_data_is_refused_when_encoding(value):
    with pytest.raises(verify.NotPlain):
        verify.encode_plain(value)


def test_self_referential_and_too_deep_values_are_refused():
    loop = []
    loop.append(loop)
    deep = []
    for _ in range(100_000):
        deep = [deep]
    for value in (loop, deep):
        with pytest.raises(verify.NotPlain):
            verify.encode_plain(value)


BAD_BYTES = [b"", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"tuple": [1], "set": [2]}', b'{"code": "print(1)"}',
             b'{"dict": [[[1]], [2]]}', b'{"dict": [[1, 2], [3]]}', b'{"dict": [[1]]}', b'{"int": 5}', b'{"bytes": "zz"}', b'{"complex": ["1", 2]}', b"1" * 5000,
             b'{"set": [[1]]}', b"__import__('os')", b"\x80\x04K\x01.", b'{"__class__": "int"}']


@pytest.mark.parametrize("data", BAD_BYTES, ids=range(len(BAD_BYTES)))
def test_bytes_that_are_not_plain_data_are_refused_when_decoding(data):
    with pytest.raises(verify.NotPlain):
        verify.decode_plain(data)


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


# Every test from here on runs programs in the sandbox: sandbox_available skips them (CI: fails them)
# where this machine cannot isolate model code. The tests above need no sandbox.
TESTS_WITHOUT_SANDBOX = {name for name in list(globals()) if name.startswith("test_")}
REQUIRE_SANDBOX = os.environ.get("GRPO_REQUIRE_SANDBOX") == "1"  # CI: a missing capability fails, never skips


def skip_unless(condition, missing):
    """Skip with one line naming what this machine lacks; under GRPO_REQUIRE_SANDBOX=1 (CI) fail instead."""
    if not condition:
        (pytest.fail if REQUIRE_SANDBOX else pytest.skip)(f"needs {missing}")


@pytest.fixture(autouse=True)
def sandbox_available(request):
    if request.node.originalname not in TESTS_WITHOUT_SANDBOX:
        problem = verify.isolation_problem()
        skip_unless(problem is None, f"kernel isolation for model code ({problem})")


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
# Wrote the previous harness's token to its report pipe if it could find it (there is no token now).
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


SANDBOX_TIMEOUT = 2.0


def leftover_processes():
    """Processes of our sandbox server other than the server itself, and sleeps with our unique argument.
    Every judge and sandbox process is a fork of the server, so its command line carries the server's token."""
    server = verify.sandbox_server()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != server["process"].pid:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if server["token"].encode() in cmdline or SLEEP.encode() in cmdline:
                found.append(pid)
    return found


def our_workdirs():
    return [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_code_")]


def check_nothing_left_behind():
    # The judge returns its verdict after the sandbox's PID namespace is gone, so this holds at once; the
    # deadline only absorbs /proc entries of processes that are exiting (no fixed sleep). A process that
    # really survived (they sleep 100 s or more) is still there when the deadline ends.
    deadline = time.monotonic() + 5.0
    while leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftover_processes() == []  # no process outlived the call
    assert not os.path.lexists(MARKER_FILE)
    assert our_workdirs() == []  # nothing on the machine's disk




@pytest.fixture
def leaked_tests():
    Path(LEAKED_TESTS).write_text(TESTS_USING_ABS)
    yield
    os.remove(LEAKED_TESTS)


def run_both(program, tests=TESTS, timeout=SANDBOX_TIMEOUT):
    """Passed? with the tripwire, and without it: the kernel's isolation must hold on its own."""
    return [verify.run_sandboxed(program, tests, timeout=timeout, audit=audit)[0] for audit in (True, False)]


def passes_if(setup, condition):
    """A program that solves `add` iff `condition` holds after `setup` (an error means it does not): it
    scores 1.0 exactly when the probe it makes succeeds."""
    setup = "\n".join("    " + line for line in setup.strip().splitlines()) or "    pass"
    return (f"import os\ntry:\n{setup}\n    ok = bool({condition})\nexcept Exception:\n    ok = False\n"
            "def add(a, b):\n    return a + b if ok else 0\n")


# -----------------------------------------------------------------------------
# The 55 hostile programs that held against the previous harness, and its other hostile checks.

@pytest.mark.parametrize("name", list(HOSTILE_PROGRAMS))
def test_hostile_program_scores_zero_in_time_and_leaves_nothing_behind(name, leaked_tests):
    start = time.monotonic()
    assert code_reward(f"```python\n{HOSTILE_PROGRAMS[name]}```", TESTS_USING_ABS, timeout=SANDBOX_TIMEOUT) == 0.0
    assert time.monotonic() - start < SANDBOX_TIMEOUT + verify.GRACE + 1.0
    check_nothing_left_behind()


def test_the_hostile_programs_that_read_the_tests_would_pass_if_they_could(leaked_tests):
    # So that their 0.0 above means "could not read the tests", not "the program is broken".
    program = FROM_TESTS.format(source=repr(TESTS))
    assert code_reward(program, TESTS) == 1.0


LEFT_BEHIND = ["child process left behind", "fork", "double fork daemon", "os.system", "multiprocessing"]


@pytest.mark.parametrize("name", LEFT_BEHIND)
def test_without_the_tripwire_the_pid_namespace_still_kills_every_process(name):
    # The tripwire refuses these; here it is off, so this checks the kernel's layer alone: their processes
    # start (the first one's add passes), and nothing of them is left once the call returns.
    program = HOSTILE_PROGRAMS[name].replace("import sys\nsys.exit(0)\n", "")
    passed = verify.run_sandboxed(program, TESTS, timeout=SANDBOX_TIMEOUT, audit=False)[0]
    assert passed or name == "double fork daemon"  # its middle process runs the program on and answers too
    check_nothing_left_behind()


def test_without_the_tripwire_a_forked_copy_that_also_answers_cannot_make_a_pass():
    # A program that forks while loading has two copies on the reply pipe. Here the copy speaks first, in
    # the protocol's own words (a policy can read verify.py), and the original waits for it, so the order is
    # fixed: the judge takes the copy's "ready", then reads the original's "ready" as the answer to its first
    # call, which is a failure (never a second chance to pass). Left to the scheduler, the copy may also
    # never get a word in before the tests end, and the correct add passes.
    forged_ready = repr(len(b'["ready", ["add"]]').to_bytes(4, "big") + b'["ready", ["add"]]')
    program = SOLUTION + (
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    for fd in range(3, 256):  # the reply pipe: the one descriptor past 0-2 that takes a write\n"
        "        try:\n"
        f"            os.write(fd, {forged_ready})\n"
        "            break\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n")
    passed, reason = verify.run_sandboxed(program, TESTS, timeout=SANDBOX_TIMEOUT, audit=False)
    assert not passed and "does not answer this call" in reason, reason
    check_nothing_left_behind()


# -----------------------------------------------------------------------------
# Test formats: the judge runs what datasets write.

HUMANEVAL_POLY = '''
import math
def poly(xs, x):
    return sum(coefficient * math.pow(x, i) for i, coefficient in enumerate(xs))
def find_zero(xs):
    low, high = -1.0, 1.0
    while poly(xs, low) * poly(xs, high) > 0:
        low, high = low * 2, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        if poly(xs, middle) * poly(xs, low) > 0:
            low = middle
        else:
            high = middle
    return low
'''
HUMANEVAL_POLY_TESTS = '''
import math, random
def check(candidate):
    rng = random.Random(42)
    for _ in range(20):
        xs = [rng.randint(-10, 10) or 1 for _ in range(2 * rng.randint(1, 4))]
        solution = candidate(xs)
        assert math.fabs(poly(xs, solution)) < 1e-4
check(find_zero)
'''
CYCLIC = '''
def encode_cyclic(s):
    groups = [s[3 * i:min(3 * i + 3, len(s))] for i in range((len(s) + 2) // 3)]
    return "".join(g[1:] + g[0] if len(g) == 3 else g for g in groups)
def decode_cyclic(s):
    groups = [s[3 * i:min(3 * i + 3, len(s))] for i in range((len(s) + 2) // 3)]
    return "".join(g[-1] + g[:-1] if len(g) == 3 else g for g in groups)
'''
CYCLIC_TESTS = '''
import random, string
def check(candidate):
    rng = random.Random(7)
    for _ in range(50):
        text = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(0, 20)))
        assert candidate(encode_cyclic(text)) == text
check(decode_cyclic)
'''
WRONG = SOLUTION.replace("a + b", "a - b")
FORMATS = {  # name: (program, tests, a wrong program)
    "HumanEval check(candidate)": (SOLUTION, "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
                                   "check(add)\n", WRONG),
    "candidate = entry point": (SOLUTION, "candidate = add\nassert candidate(2, 3) == 5\n", WRONG),
    "a helper the tests call (poly)": (HUMANEVAL_POLY, HUMANEVAL_POLY_TESTS,
                                       HUMANEVAL_POLY.replace("return low\n", "return low + 0.5\n")),
    "two program functions (encode/decode_cyclic)": (CYCLIC, CYCLIC_TESTS, CYCLIC.replace("g[-1] + g[:-1]", "g[1:] + g[0]")),
    "calls in a loop at module level": (SOLUTION, "for i in range(300):\n    assert add(i, 1) == i + 1\n",
                                        SOLUTION.replace("a + b", "a + b if a < 299 else 0")),
    "two calls compared": (SOLUTION, "assert add(1, 2) == add(2, 1) != add(2, 2)\n", WRONG),
    "keyword arguments": (SOLUTION, "assert add(b=2, a=1) == 3\n", WRONG),
    "expected exception": ("def add(a, b):\n    if a < 0:\n        raise ValueError('negative')\n    return a + b\n",
                           "try:\n    add(-1, 2)\nexcept ValueError as e:\n    assert str(e) == 'negative'\nelse:\n    assert False\n",
                           "def add(a, b):\n    if a < 0:\n        raise TypeError('negative')\n    return a + b\n"),
    "arguments are the test's own copies": ("def add(a, b):\n    a.append(1)\n    return len(a) + b\n",
                                            "xs = [0]\nassert add(xs, 1) == 3\nassert xs == [0]\n",
                                            "def add(a, b):\n    a.append(1)\n    return len(a)\n"),
    "rich plain values": ("def add(a, b):\n    return {(a, b): [b'x', 1.5, None, {a}, frozenset(), 2 ** 100, 1j]}\n",
                          "assert add(1, 2) == {(1, 2): [b'x', 1.5, None, {1}, frozenset(), 2 ** 100, 1j]}\n",
                          "def add(a, b):\n    return {(a, b): [b'x', 1.5, None, [a], frozenset(), 2 ** 100, 1j]}\n"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_test_formats_of_code_datasets_work_and_a_wrong_program_fails_them(name):
    program, tests, wrong = FORMATS[name]
    passed, reason = verify.run_sandboxed(program, tests, timeout=10.0)
    assert passed, reason
    assert verify.run_sandboxed(wrong, tests, timeout=10.0)[0] is False


def test_a_helper_that_judges_must_come_from_the_tests_not_the_program():
    # HumanEval/32 checks find_zero with poly, a helper of the prompt. If the program defines poly, its poly
    # judges its own answer (a poly that is always 0 passes any find_zero): the dataset must define such
    # helpers in the tests, where they run in the judge and override the program's name.
    cheat = "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 12345.0\n"
    assert verify.run_sandboxed(cheat, HUMANEVAL_POLY_TESTS)[0] is True
    helper = HUMANEVAL_POLY.split("def find_zero")[0]
    assert verify.run_sandboxed(cheat, helper + HUMANEVAL_POLY_TESTS)[0] is False
    assert verify.run_sandboxed(HUMANEVAL_POLY, helper + HUMANEVAL_POLY_TESTS)[0] is True


def test_a_test_that_passes_a_non_plain_argument_fails_with_the_reason():
    passed, reason = verify.run_sandboxed(SOLUTION, "assert add(lambda: 1, 2) == 3\n")
    assert not passed and "not plain data" in reason, reason


def test_a_program_raising_stopiteration_cannot_end_the_tests_iteration_early():
    # In one interpreter, a StopIteration from check() ends map() at once: all(map(check, cases)) is all([]).
    program = "def check(x):\n    raise StopIteration\n"
    assert run_both(program, "assert all(map(check, [1, 2, 3]))\nassert list(map(check, [1])) == []\n") == [False, False]


def test_the_program_raising_a_builtin_exception_reaches_the_tests_as_that_exception():
    program = "def add(a, b):\n    raise KeyError('k')\n"
    assert verify.run_sandboxed(program, "try:\n    add(1, 2)\nexcept KeyError:\n    pass\nelse:\n    assert False\n")[0]
    assert not verify.run_sandboxed(program, "try:\n    add(1, 2)\nexcept ValueError:\n    pass\n")[0]


# -----------------------------------------------------------------------------
# Class 1: the program rebinds the harness's state. There is none in its process: the judge is elsewhere.

HARNESS_ATTACKS = {
    "rebind builtins from a thread, forever": (
        "import builtins, threading\ndef patch():\n    while True:\n        builtins.abs = lambda x: 0\n"
        "        builtins.AssertionError = type('Never', (Exception,), {})\n"
        "        builtins.isinstance = lambda *a: True\nthreading.Thread(target=patch, daemon=True).start()\n"
        "def add(a, b):\n    return 0\n"),
    "rewrite the server's functions through frames": (
        "import sys\nframe = sys._getframe()\nwhile frame is not None:\n    for name in ('judge', 'run_tests', 'Stop', 'program_caller',"
        " 'decode_plain', 'exception_like'):\n        if name in frame.f_globals:\n            frame.f_globals[name] = lambda *a, **k: True\n"
        "    frame = frame.f_back\ndef add(a, b):\n    return 0\n"),
    "patch json so every reply says 5": (
        "import json\njson.dumps = lambda value, *a, **k: '[\"return\", %d, 5]' % value[1] if isinstance(value, list) and "
        "value[:1] == ['return'] else json.JSONEncoder().encode(value)\ndef add(a, b):\n    return 0\n"),
    "send a verdict of its own": (
        "import os\ndef frame(data):\n    return len(data).to_bytes(4, 'big') + data\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, frame(b'{\"passed\": true, \"reason\": \"passed\"}') + frame(b'[\"ready\", []]'))\n"
        "    except OSError:\n        pass\ndef add(a, b):\n    return 0\n"),
    "raise SystemExit during a call": "def add(a, b):\n    raise SystemExit(0)\n",
    "os._exit(0) during a call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "replace its own __main__ module": (
        "import sys, types\nfake = types.ModuleType('__main__')\nfake.add = lambda a, b: a + b\nsys.modules['__main__'] = fake\n"
        "def add(a, b):\n    return 0\n"),
    "shadow builtins the tests use": "def abs(x):\n    return 0\ndef isinstance(*a):\n    return True\ndef add(a, b):\n    return 0\n",
}


def test_class1_names_of_builtins_the_program_defines_do_not_reach_the_tests():
    # Its abs() would otherwise judge `abs(add(2, 3) - 5) < 1e-9` (as it returns 0, any add would pass).
    program = "def abs(x):\n    return 0\ndef max(*a):\n    return 5\ndef add(a, b):\n    return 0\n"
    tests = "assert abs(add(2, 3) - 5) < 1e-9\nassert max(add(2, 3), 0) == 5\n"
    assert run_both(program, tests) == [False, False]


@pytest.mark.parametrize("name", list(HARNESS_ATTACKS))
def test_class1_the_program_cannot_rebind_the_judges_state(name):
    tests = TESTS_USING_ABS + "assert isinstance(add(2, 3), int)\n"
    assert run_both(HARNESS_ATTACKS[name], tests) == [False, False]
    check_nothing_left_behind()


# -----------------------------------------------------------------------------
# Class 2: the program looks for a secret or for the tests. There is no secret, and the tests are never
# in its process, files, pipes or environment. Each program solves `add` only from a table of the
# tests' cases it found (FROM_TESTS); the control shows each search finds the tests where they exist.

SEARCHES = {  # each sets `found`, the text in which the program looks for the tests' cases
    "every object the garbage collector knows": (
        "import gc\nfound = '\\n'.join(x for o in gc.get_objects() if type(o) in (dict, list, tuple)\n"
        "                      for x in (o.values() if type(o) is dict else o) if type(x) is str)"),
    "every frame's locals and globals": (
        "import sys\nframe, parts = sys._getframe(), []\nwhile frame is not None:\n"
        "    parts += [v for v in (*frame.f_locals.values(), *frame.f_globals.values()) if type(v) is str]\n"
        "    frame = frame.f_back\nfound = '\\n'.join(parts)"),
    "every open file descriptor": (
        "import os, select\nparts = []\nfor fd in range(64):\n    try:\n        if select.select([fd], [], [], 0)[0]:\n"
        "            parts.append(os.read(fd, 1 << 20).decode('latin-1'))\n    except (OSError, ValueError):\n        pass\n"
        "found = '\\n'.join(parts)"),
    "the environment": "import os\nfound = repr(dict(os.environ))",
    "every file it can read": (
        "import os\nparts = []\nfor d, _, fs in os.walk('/'):\n    if d.startswith(('/usr', '/dev')) or 'python3' in d:\n"
        "        continue\n    for f in fs:\n        try:\n            parts.append(open(os.path.join(d, f), errors='ignore').read(1 << 16))\n"
        "        except OSError:\n            pass\nfound = '\\n'.join(parts)"),
    "/proc of PID 1 and of itself": "found = open('/proc/1/cmdline').read() + open('/proc/self/environ').read()",
    "the files the tests came from": f"found = open({str(CODE)!r}).read() + open({LEAKED_TESTS!r}).read()",
}


def search_program(search):
    return ("try:\n" + "\n".join("    " + line for line in search.splitlines()) + "\nexcept Exception:\n    found = ''\n"
            + FROM_TESTS.format(source="found"))


@pytest.mark.parametrize("name", list(SEARCHES))
def test_class2_the_program_finds_no_secret_and_no_tests(name, leaked_tests):
    assert run_both(search_program(SEARCHES[name])) == [False, False]


@pytest.mark.parametrize("name", ["every object the garbage collector knows", "every frame's locals and globals"])
def test_class2_control_the_searches_find_the_tests_where_they_are(name):
    program = f"PLANTED = {TESTS!r}\n" + search_program(SEARCHES[name])
    assert verify.run_sandboxed(program, TESTS, audit=False)[0] is True


# -----------------------------------------------------------------------------
# Class 3: comparison tricks. The judge compares its own plain copies, whatever the test's form.

TRICKY_TESTS = ("import math, operator\nassert 5 == add(2, 3)\nassert 0 < add(2, 3) == 5 < 10\nassert add(2, 3) in [5]\n"
                "assert abs(add(2, 3) - 5) < 1e-9\nassert math.isclose(add(2, 3), 5)\nassert not add(2, 3) != 5\n"
                "assert operator.eq(add(2, 3), 5)\nassert [add(2, 3), add(1, 1)] == [5, 2]\nassert add(0, 0) is not None\n"
                "assert not add(0, 0)\nassert sorted([add(2, 3), 1]) == [1, 5]\nassert str(add(2, 3)) == '5'\n")
ANYTHING = ("class Anything:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
            "    def __lt__(self, other): return True\n    def __gt__(self, other): return True\n    def __abs__(self): return 0\n"
            "    def __sub__(self, other): return self\n    def __rsub__(self, other): return self\n    def __bool__(self): return False\n"
            "    def __hash__(self): return 5\n    def __str__(self): return '5'\n    def __float__(self): return 5.0\n")
COMPARISON_TRICKS = {
    "always-equal object": ANYTHING + "def add(a, b):\n    return Anything()\n",
    "int subclass": "class I(int):\n    def __eq__(s, o): return True\n    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)\n",
    "float subclass": "class F(float):\n    def __eq__(s, o): return True\n    __hash__ = float.__hash__\ndef add(a, b):\n    return F(0)\n",
    "str subclass": "class S(str):\n    def __eq__(s, o): return True\n    __hash__ = str.__hash__\ndef add(a, b):\n    return S('5')\n",
    "bool": "def add(a, b):\n    return True\n",
    "mapping proxy of always-equal values": ANYTHING + "import types\ndef add(a, b):\n    return types.MappingProxyType({0: Anything()})\n",
    "weak proxy": ANYTHING + "import weakref\nkeep = Anything()\ndef add(a, b):\n    return weakref.proxy(keep)\n",
    "list subclass": "class L(list):\n    def __eq__(s, o): return True\ndef add(a, b):\n    return L()\n",
    "patched math.isclose and operator.eq": "import math, operator\nmath.isclose = operator.eq = lambda *a, **k: True\ndef add(a, b):\n    return 0\n",
    "patched builtins abs and sorted": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.sorted = lambda x: [1, 5]\ndef add(a, b):\n    return 0\n",
    "an iterator": "def add(a, b):\n    return iter([a + b])\n",
    "NaN": "def add(a, b):\n    return float('nan')\n",
    "a different type that prints the same": "def add(a, b):\n    return str(a + b)\n",
}


def test_class3_control_a_solution_passes_every_form_of_comparison():
    assert verify.run_sandboxed(SOLUTION, TRICKY_TESTS)[0] is True


@pytest.mark.parametrize("name", list(COMPARISON_TRICKS))
def test_class3_comparison_tricks_score_zero(name):
    assert run_both(COMPARISON_TRICKS[name], TRICKY_TESTS) == [False, False]
    assert code_reward(COMPARISON_TRICKS[name], TRICKY_TESTS) == 0.0


# -----------------------------------------------------------------------------
# Class 4: escapes. Each program scores 1.0 only if its escape works; with the tripwire and without it
# (the kernel alone) all score 0.0, and the machine shows no trace of them.

TRAINER = os.getpid()
SESSION_KEYRING = ctypes.CDLL(None).syscall(250, 0, -3, 1) if os.uname().machine == "x86_64" else "x86_64 only"
OUTSIDE = str(ROOT / f"grpo_verify_escape_{os.getpid()}")  # a path in the project, outside any sandbox
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
PTH = os.path.join(SITE_PACKAGES, f"grpo_verify_escape_{os.getpid()}.pth")
SITECUSTOMIZE = os.path.join(sysconfig.get_paths()["stdlib"], f"grpo_verify_escape_{os.getpid()}.py")
ESCAPES = {
    # Signals to the trainer (this test process counts SIGUSR1s) or to its other processes.
    "kill the trainer": passes_if(f"os.kill({TRAINER}, 10)", "True"),
    "kill every process it may": passes_if("os.kill(-1, 10)", "True"),
    "kill the trainer's process group": passes_if(f"os.killpg({os.getpgid(0)}, 10)", "True"),
    "signal through a pidfd": passes_if(f"import signal\nsignal.pidfd_send_signal(os.pidfd_open({TRAINER}), 10)", "True"),
    "kill PID 1 of its namespace": passes_if("import time\nos.kill(1, 9)\ntime.sleep(0.2)\ntry:\n    os.kill(1, 0)\n    gone = False\n"
                                             "except ProcessLookupError:\n    gone = True", "gone"),
    "walk all pids": passes_if("n = 0\nfor pid in range(2, 5000):\n    try:\n        os.kill(pid, 0)\n        n += 1\n    except OSError:\n        pass",
                               "n > 1"),
    # FIFOs, device nodes and files outside its directory.
    "mkfifo in the project": passes_if(f"os.mkfifo({OUTSIDE!r})", "True"),
    "mkfifo in /dev/shm": passes_if(f"os.mkfifo('/dev/shm/grpo_verify_{os.getpid()}')", "True"),
    "device node": passes_if("os.mknod('/work/null', 0o20666, os.makedev(1, 3))", "True"),
    "write the project": passes_if(f"open({OUTSIDE!r}, 'w').write('x')", "True"),
    "write the root": passes_if("open('/grpo_escape', 'w').write('x')", "True"),
    "write /usr": passes_if("open('/usr/grpo_escape', 'w').write('x')", "True"),
    # Code for every later sandbox and for the trainer.
    ".pth in site-packages": passes_if(f"open({PTH!r}, 'w').write('import os')", "True"),
    "sitecustomize in the standard library": passes_if(f"open({SITECUSTOMIZE!r}, 'w').write('x = 1')", "True"),
    "usercustomize in the home directory": passes_if(
        "d = '/root/.local/lib/python3.11/site-packages'\nos.makedirs(d, exist_ok=True)\nopen(d + '/usercustomize.py', 'w').write('x')", "True"),
    # Looking around.
    "list site-packages (benchmark packages ship tests)": passes_if(f"x = os.listdir({SITE_PACKAGES!r})", "x"),
    "list Debian's dist-packages": passes_if("import glob\nx = [f for d in glob.glob('/usr/lib/python3*/dist-packages') "
                                             "for f in os.listdir(d)]", "x"),
    "stat the dataset": passes_if(f"os.stat({str(CODE)!r})", "True"),
    "list the project": passes_if(f"os.listdir({str(ROOT)!r})", "True"),
    "list the home directory": passes_if("x = set(os.listdir('/root')) - {'.pyenv'}", "x"),
    "list /proc": passes_if("os.listdir('/proc')", "True"),
    "list /sys": passes_if("os.listdir('/sys')", "True"),
    "read /etc/passwd": passes_if("open('/etc/passwd').read()", "True"),
    "list the machine's /tmp": passes_if("x = os.listdir('/tmp')", "x"),
    "list /dev beyond its devices": passes_if("x = set(os.listdir('/dev')) - {'null', 'zero', 'full', 'random', 'urandom'}", "x"),
    # Network.
    "TCP to the trainer's machine": passes_if("import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)", "True"),
    "abstract unix socket of the trainer": passes_if(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(b'\\0grpo-verify-{os.getpid()}')", "True"),
    "name resolution": passes_if("import socket\nsocket.getaddrinfo('localhost', 80)", "True"),
    # Privileges (ctypes: the tripwire refuses it, the kernel must too).
    "mount": passes_if("import ctypes\nlibc = ctypes.CDLL(None)", "libc.mount(b'none', b'/work', b'tmpfs', 0, None) == 0"),
    "nested user namespace": passes_if("import ctypes\nlibc = ctypes.CDLL(None)", "libc.unshare(0x10000000) == 0"),
    "change uid": passes_if("os.setuid(1)", "True"),
    "chroot": passes_if("os.chroot('/work')", "True"),
    "hostname": passes_if("import socket\nsocket.sethostname('grpo')", "True"),
    "raise a hard rlimit": passes_if("import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (10 ** 6, 10 ** 6))", "True"),
    "lower its OOM score": passes_if("open('/proc/self/oom_score_adj', 'w').write('-1000')", "True"),
    "the trainer's session keyring": passes_if(  # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)
        "import ctypes\nlibc = ctypes.CDLL(None)", f"libc.syscall(250, 0, -3, 0) == {SESSION_KEYRING}"),
}


@pytest.fixture
def trainer_watch():
    """What an escape could reach in this (the trainer's) process: SIGUSR1s, a TCP and an abstract socket."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(f"\0grpo-verify-{os.getpid()}".encode())
    unix.listen()
    for listener in (tcp, unix):
        listener.setblocking(False)
    yield received, tcp.getsockname()[1]

    def connections(listener):
        try:
            listener.accept()[0].close()
            return 1
        except BlockingIOError:
            return 0
    accepted = connections(tcp) + connections(unix)
    tcp.close()
    unix.close()
    signal.signal(signal.SIGUSR1, previous)
    assert (received, accepted) == ([], 0)


@pytest.mark.parametrize("name", list(ESCAPES))
def test_class4_escapes_score_zero_and_leave_no_trace(name, trainer_watch):
    _, port = trainer_watch
    assert run_both(ESCAPES[name].replace("PORT", str(port))) == [False, False]
    server = verify.sandbox_server()["process"]
    assert server.poll() is None  # the sandbox server is alive
    for path in (OUTSIDE, PTH, SITECUSTOMIZE, f"/dev/shm/grpo_verify_{os.getpid()}", "/grpo_escape", "/usr/grpo_escape"):
        assert not os.path.lexists(path), path
    assert not os.path.exists(os.path.expanduser("~/.local/lib/python3.11/site-packages/usercustomize.py"))
    check_nothing_left_behind()


def test_class4_control_the_probes_pass_where_they_may():
    # The same probes on what the sandbox does allow, so that the 0.0s above mean "refused".
    allowed = [passes_if("os.mkfifo('/work/fifo')", "True"), passes_if("open('x', 'w').write('x')", "os.path.exists('/work/x')"),
               passes_if("", "os.path.exists(os.__file__)"), passes_if("x = os.listdir('/usr/bin')", "x"),
               passes_if("import ctypes\nlibc = ctypes.CDLL(None)", "libc.getpid() > 0")]
    assert [verify.run_sandboxed(program, TESTS, audit=False)[0] for program in allowed] == [True] * len(allowed)


PROCESSES = {
    "fork and sleep": "import os, time\nif os.fork() == 0:\n    time.sleep(1000)\n",
    "double fork, setsid": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n    os._exit(0)\n",
    "exec a sleep in a new session": f"import os\npid = os.posix_spawn('/usr/bin/sleep', ['sleep', '{SLEEP}'], {{}}, setsid=True)\n",
    "a child that ignores SIGTERM and SIGHUP": ("import os, signal, time\nif os.fork() == 0:\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                               "    signal.signal(signal.SIGHUP, signal.SIG_IGN)\n    time.sleep(1000)\n"),
    "a fork bomb": ("import os, time\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n            time.sleep(1000)\n"
                    "    except BlockingIOError:  # RLIMIT_NPROC\n        break\n"),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_class4_no_process_outlives_the_call(name):
    program = SOLUTION + PROCESSES[name]
    with_tripwire, without = run_both(program)
    assert with_tripwire is False  # the tripwire refuses fork, exec and spawn...
    check_nothing_left_behind()  # ...and without it, the PID namespace takes every process with it


def test_a_fork_bomb_stays_within_the_process_limit():
    program = ("import os, time\ncount = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n            time.sleep(1000)\n"
               "        count += 1\n    except BlockingIOError:  # RLIMIT_NPROC\n        break\ndef children(a, b):\n    return count\n")
    passed, reason = verify.run_sandboxed(program, f"assert children(0, 0) < {verify.PROCESS_LIMIT}\n", audit=False)
    assert passed, reason
    check_nothing_left_behind()


CLEANUP_ATTACKS = {
    "unreadable directories": "os.makedirs('/work/a/b/c')\nos.chmod('/work/a/b', 0)\nos.chmod('/work/a', 0)\nos.chmod('/work', 0)",
    "a full work directory": "f = open('/work/big', 'wb')\ntry:\n    while True:\n        f.write(b'x' * (1 << 20))\nexcept OSError:\n    pass",
    "thousands of files": "for i in range(5000):\n    open(f'/work/{i}', 'w').close()",
    "a process holding its directory": "import time\nif os.fork() == 0:\n    os.chdir('/work')\n    time.sleep(1000)",
    "mount over its directory": "import ctypes\nctypes.CDLL(None).mount(b'none', b'/work', b'tmpfs', 0, None)",
}


@pytest.mark.parametrize("name", list(CLEANUP_ATTACKS))
def test_class4_the_program_cannot_make_cleanup_fail(name):
    program = "import os\ntry:\n" + "\n".join("    " + line for line in CLEANUP_ATTACKS[name].splitlines()) + \
        "\nexcept OSError:\n    pass\n" + SOLUTION
    verify.run_sandboxed(program, TESTS, audit=False)
    check_nothing_left_behind()  # in particular no directory on the machine's disk
    assert code_reward(SOLUTION, TESTS) == 1.0  # and the next program is judged as usual


# -----------------------------------------------------------------------------
# The pipe between them: flooding, silence, double answers, bombs.

def replies_fd_writer(payload_expression):
    """Source that writes `payload_expression` (bytes) to every pipe the program holds: one of them is
    its reply pipe to the judge."""
    return ("import os, stat\ndef flood(data):\n    for fd in range(3, 64):\n        try:\n"
            "            if stat.S_ISFIFO(os.fstat(fd).st_mode):\n                os.write(fd, data)\n"
            "        except OSError:\n            pass\n" f"flood({payload_expression})\n")


PROTOCOL_ATTACKS = {
    "a flood on every pipe": replies_fd_writer("b'\\xff' * (1 << 16)") + SOLUTION,
    "a frame longer than the limit": replies_fd_writer("(1 << 31).to_bytes(4, 'big')") + SOLUTION,
    "a deeply nested frame": replies_fd_writer("len(b'[' * 200000 + b']' * 200000).to_bytes(4, 'big') + b'[' * 200000 + b']' * 200000") + SOLUTION,
    "answers twice": ("import os, stat, json\ndef add(a, b):\n    extra = json.dumps(['return', 1, 0]).encode()\n"
                      "    for fd in range(3, 64):\n        try:\n            if stat.S_ISFIFO(os.fstat(fd).st_mode):\n"
                      "                os.write(fd, len(extra).to_bytes(4, 'big') + extra)\n        except OSError:\n            pass\n"
                      "    return a + b\n"),
    "answers for another call": "def add(a, b):\n" + "\n".join("    " + line for line in replies_fd_writer(
        "len(b'[\"return\", 7, 5]').to_bytes(4, 'big') + b'[\"return\", 7, 5]'").splitlines()) + "\n    return a + b\n",
    "a forked copy answers too": "import os\ndef add(a, b):\n    os.fork()\n    return a + b\n",
    "never answers": "import time\ndef add(a, b):\n    time.sleep(1000)\n",
    "a return value over the limit": "def add(a, b):\n    return 'x' * (20 << 20)\n",
    "a return value nested too deeply": "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",
    "a list that contains itself": "def add(a, b):\n    x = []\n    x.append(x)\n    return x\n",
    "exhausts its memory": "def add(a, b):\n    x = bytearray(8 << 30)\n    return a + b\n",
    "fake protocol lines on stdout": ("import sys\nprint('[\"return\", 0, 5]')\nsys.stdout.flush()\n"
                                      "import os\nos.write(1, (13).to_bytes(4, 'big') + b'[\"ready\", []]')\ndef add(a, b):\n    return 0\n"),
    "50 MB of output per call": "import sys\ndef add(a, b):\n    sys.stdout.write('5' * 50_000_000)\n    return 0\n",
    "colliding hashes in a frame (the judge stuck in C)": replies_fd_writer(
        "(lambda body: len(body).to_bytes(4, 'big') + body)(('[\"return\", 0, {\"set\": [' + ', '.join("
        "'{\"int\": \"%s\"}' % hex(i * (2 ** 61 - 1)) for i in range(1, 300000)) + ']}]').encode())") + SOLUTION,
}


PROTOCOL_REASONS = {  # why the judge fails each one, the kernel's layer alone (without the tripwire)
    "a flood on every pipe": "a message of", "a frame longer than the limit": "a message of",
    "a deeply nested frame": "RecursionError", "answers twice": "does not answer this call",
    "answers for another call": "does not answer this call", "a forked copy answers too": "does not answer this call",
    "never answers": "timeout", "a return value over the limit": "a message of",
    "a return value nested too deeply": "nested too deeply", "a list that contains itself": "nested too deeply",
    "exhausts its memory": "MemoryError", "fake protocol lines on stdout": "AssertionError",
    "50 MB of output per call": "AssertionError", "colliding hashes in a frame (the judge stuck in C)": "",
}


@pytest.mark.parametrize("name", list(PROTOCOL_ATTACKS))
def test_protocol_attacks_fail_within_the_timeout(name):
    start = time.monotonic()
    assert verify.run_sandboxed(PROTOCOL_ATTACKS[name], TESTS, timeout=SANDBOX_TIMEOUT)[0] is False
    passed, reason = verify.run_sandboxed(PROTOCOL_ATTACKS[name], TESTS, timeout=SANDBOX_TIMEOUT, audit=False)
    assert not passed and PROTOCOL_REASONS[name] in reason, reason
    assert time.monotonic() - start < 2 * (SANDBOX_TIMEOUT + verify.GRACE) + 2.0  # two runs, no hang past the timeout
    check_nothing_left_behind()


# -----------------------------------------------------------------------------
# Correct programs, threads, environment, totality.

def test_the_judge_has_a_memory_limit_of_its_own():
    # The judge is trusted but holds what the program answers: tests that grow an answer past
    # JUDGE_MEMORY_LIMIT fail with a MemoryError there, instead of calling the kernel's OOM killer.
    program = "def big():\n    return 'x' * (15 << 20)\n"
    passed, reason = verify.run_sandboxed(program, "kept = big() * 200\n", timeout=10.0)
    assert not passed and "MemoryError" in reason, reason
    assert verify.run_sandboxed(program, "kept = big() * 20\n", timeout=10.0)[0] is True


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
import collections, dataclasses, enum, functools, heapq, itertools, logging, math, re, sqlite3, statistics, typing, tempfile
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
logging.getLogger("x").warning("logging works")
sqlite3.connect(":memory:").execute("select 1")
def add(a, b):
    return float(a + b) + fib(0) + statistics.mean([0]) + heapq.nsmallest(1, [0])[0] + Color.RED.value - 1
def point(x, y):
    return tuple(Point(x, y))
def box(v):
    return dataclasses.astuple(Box(v))
"""
    tests = TESTS + ("assert add(1, 1) == 2.0 == 2\nassert point(1, 2) == (1, 2)\nassert box(1) == (1,)\n"
                     "import collections\nassert collections.OrderedDict(a=1) == {'a': 1} != {'a': 2}\n")
    passed, reason = verify.run_sandboxed(program, tests)
    assert passed, reason


def test_code_reward_runs_in_parallel_threads():
    programs = [SOLUTION if i % 2 == 0 else SOLUTION.replace("+", "*") for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: code_reward(p, TESTS), programs))
    assert results == [1.0 if i % 2 == 0 else 0.0 for i in range(16)]
    check_nothing_left_behind()


def test_the_program_gets_a_clean_environment(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "hunter2")
    program = "import os\ndef environment():\n    return dict(os.environ)\n"
    tests = "assert environment() == {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': '/work', 'TMPDIR': '/work'}\n"
    passed, reason = verify.run_sandboxed(program, tests)
    assert passed, reason


def test_code_reward_never_raises():
    for completion, tests in ((None, TESTS), (SOLUTION, None), ("\x00", TESTS), (SOLUTION, "assert (")):
        assert code_reward(completion, tests, timeout=SANDBOX_TIMEOUT) == 0.0


def test_registry_names_every_reward():
    assert verify.REWARDS == {"math": math_reward, "code": code_reward}


# -----------------------------------------------------------------------------
# Who the program is on the machine: root trainer, unprivileged trainer, and no isolation at all.

def test_as_root_every_sandbox_process_is_nobody_on_the_machine_with_no_capabilities():
    skip_unless(os.geteuid() == 0, "root (this test checks the root trainer's case)")
    program = "import os\ndef ids():\n    return [os.getuid(), os.getgid(), os.getgroups()]\n"
    passed, reason = verify.run_sandboxed(program, "assert ids() == [0, 0, []]\n")  # root of its own namespace...
    assert passed, reason
    # ...which is SANDBOX_UID on the machine. Seen from here while a call waits (its tests, in the judge on
    # this machine's filesystem, wait for a file we create once we have looked): the judge (the trainer's
    # uid) and the sandbox's parent, init and program, all SANDBOX_UID with no capabilities and no_new_privs.
    flag = Path(tempfile.mkdtemp(prefix="grpo_verify_flag_")) / "go"
    tests = f"import os, time\nassert add(1, 2) == 3\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(verify.run_sandboxed, SOLUTION, tests, 60.0)
        seen, deadline = {}, time.monotonic() + 30.0  # only if the sandbox misbehaves: then the asserts below fail
        while time.monotonic() < deadline and sorted(state[1] for state in seen.values()).count("0000000000000000") < 3:
            seen = {}
            for pid in leftover_processes():
                try:
                    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                except OSError:
                    continue
                seen[pid] = (fields["Uid"].split(), fields["CapEff"].strip(), fields["NoNewPrivs"].strip())
        flag.touch()
        assert future.result()[0] is True
    shutil.rmtree(flag.parent)
    judges = [state for state in seen.values() if state[0] == ["0"] * 4]
    sandbox = [state for state in seen.values() if state[0] == [str(verify.SANDBOX_UID)] * 4]
    assert len(judges) == 1 and len(sandbox) == 3 and len(seen) == 4, seen
    assert all(capabilities == "0000000000000000" for _, capabilities, _ in sandbox), seen
    assert sorted(no_new_privs for _, _, no_new_privs in sandbox) == ["1", "1", "1"], seen


UNPRIVILEGED_UID = 12345  # a uid with no account and no files: a normal user training on this machine
UNPRIVILEGED_RUNNER = r'''
import json, os, signal, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verify
received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
here = os.path.dirname(os.path.abspath(__file__))
mine = os.path.join(here, "mine.txt")  # the trainer's own file, writable by its uid
with open(mine, "w") as f:
    f.write("untouched")
cases = json.load(open(os.path.join(here, "cases.json")))
results = {"uid": os.getuid(), "problem": verify.isolation_problem()}
for name, (program, tests, audit) in cases.items():
    program = program.replace("TRAINER", str(os.getpid())).replace("HERE", here)
    results[name] = verify.run_sandboxed(program, tests, timeout=5.0, audit=audit)[0]
server = verify.sandbox_server()
def leftovers():
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != server["process"].pid:
            try:
                if server["token"].encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    found.append(pid)
            except OSError:
                pass
    return found
deadline = time.monotonic() + 5.0  # a judge may still be exiting after its verdict; survivors sleep 1000 s
while leftovers() and time.monotonic() < deadline:
    time.sleep(0.01)
results.update(signals=len(received), mine=open(mine).read(), leftovers=leftovers(),
               files=sorted(os.listdir(here)))
print(json.dumps(results))
'''
UNPRIVILEGED_CASES = {
    "solution": (SOLUTION, TESTS, True),
    "comparison trick": (COMPARISON_TRICKS["always-equal object"], TRICKY_TESTS, False),
    "harness attack": (HARNESS_ATTACKS["send a verdict of its own"], TESTS, False),
    "search for the tests": (search_program(SEARCHES["every object the garbage collector knows"]), TESTS, False),
    "kill the trainer": (passes_if("os.kill(TRAINER, 10)", "True"), TESTS, False),
    "kill every process of its uid": (passes_if("os.kill(-1, 10)", "True"), TESTS, False),
    "write the trainer's own file": (passes_if("open('HERE/mine.txt', 'w').write('escaped')", "True"), TESTS, False),
    "create a file beside the trainer's": (passes_if("open('HERE/new.txt', 'w').write('x')", "True"), TESTS, False),
    "list the trainer's directory": (passes_if("os.listdir('HERE')", "True"), TESTS, False),
    "mount": (ESCAPES["mount"], TESTS, False),
    "nested user namespace": (ESCAPES["nested user namespace"], TESTS, False),
    "processes outliving the call": (SOLUTION + PROCESSES["fork and sleep"], TESTS, False),  # passes; leaves nothing
    "name resolution": (ESCAPES["name resolution"], TESTS, False),
}


def unprivileged_python():
    """A Python that UNPRIVILEGED_UID can run whole (this one may live under root's 0700 home: it would start,
    then miss its own standard library), or None."""
    def prefix(candidate, *switch):
        result = subprocess.run([*switch, candidate, "-I", "-c", "import os, sys; print(sys.base_prefix, os.__file__)"],
                                capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else None
    switch = ["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups"]
    for candidate in (sys.executable, "/usr/bin/python3"):
        if shutil.which("setpriv") and os.path.exists(candidate) and prefix(candidate) == prefix(candidate, *switch):
            return candidate
    return None


def test_as_an_unprivileged_user_the_sandbox_isolates_the_same_way():
    skip_unless(os.geteuid() == 0, "root, to switch to an unprivileged uid with setpriv")
    python = unprivileged_python()
    skip_unless(python is not None, f"setpriv and a Python that uid {UNPRIVILEGED_UID} can run")
    here = Path(tempfile.mkdtemp(prefix="grpo_verify_trainer_"))  # not under pytest's tmp_path: that is 0700
    try:
        shutil.copy(ROOT / "verify.py", here / "verify.py")
        (here / "runner.py").write_text(UNPRIVILEGED_RUNNER)
        (here / "cases.json").write_text(json.dumps(UNPRIVILEGED_CASES))
        for path in (here, *here.iterdir()):
            os.chown(path, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        result = subprocess.run(["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups",
                                 python, "-I", "-B", str(here / "runner.py")], capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(here)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results.pop("uid") == UNPRIVILEGED_UID and results.pop("problem") is None
    assert results.pop("solution") is True  # the same kernel isolation works without root...
    assert results.pop("processes outliving the call") is True  # (its children are gone: "leftovers" below)
    assert results.pop("signals") == 0 and results.pop("mine") == "untouched" and results.pop("leftovers") == []
    assert results.pop("files") == ["cases.json", "mine.txt", "runner.py", "verify.py"]
    attacks = set(UNPRIVILEGED_CASES) - {"solution", "processes outliving the call"}
    assert results == {name: False for name in attacks}  # ...and every attack fails


NO_USER_NAMESPACES = r'''
# Runs argv[1:] as uid 12345 in a user namespace whose own limit of user namespaces is 0: what a kernel
# that refuses unprivileged user namespaces (Docker's seccomp profile, Ubuntu 24.04's AppArmor) looks like.
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
(ready_r, ready_w), (go_r, go_w) = os.pipe(), os.pipe()
child = os.fork()
if child == 0:
    assert libc.unshare(0x10000000) == 0
    os.write(ready_w, b"u")
    assert os.read(go_r, 1) == b"g"
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.setresgid(12345, 12345, 12345)
    os.setresuid(12345, 12345, 12345)  # the machine's root underneath: it can still read a Python under /root
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{child}/{name}", "w") as f:
        f.write("0 100000 1\n12345 0 1\n")
os.write(go_w, b"g")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
'''


def run_without_user_namespaces(code, tmp_path):
    skip_unless(os.geteuid() == 0, "root, to build a user namespace that refuses user namespaces")
    script = tmp_path / "no_userns.py"
    script.write_text(NO_USER_NAMESPACES)
    return subprocess.run([sys.executable, str(script), "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_without_kernel_isolation_code_reward_refuses_in_one_line_unless_told_it_is_unsafe(tmp_path):
    code = f"""
import verify
try:
    verify.code_reward({SOLUTION!r}, {TESTS!r})
except verify.SandboxUnavailable as error:
    print("REFUSED", error)
print("UNSAFE", verify.code_reward({SOLUTION!r}, {TESTS!r}, unsafe_code_sandbox=True),
      verify.code_reward({SOLUTION.replace('+', '-')!r}, {TESTS!r}, unsafe_code_sandbox=True),
      verify.code_reward({COMPARISON_TRICKS['always-equal object']!r}, {TRICKY_TESTS!r}, unsafe_code_sandbox=True))
"""
    result = run_without_user_namespaces(code, tmp_path)
    assert result.returncode == 0, result.stderr
    refused, unsafe = result.stdout.splitlines()
    assert refused.startswith("REFUSED verify.code_reward: this machine cannot isolate model code (sandbox: ")
    assert "unshare" in refused and "--unsafe-code-sandbox" in refused and "\n" not in refused
    assert unsafe == "UNSAFE 1.0 0.0 0.0"  # unsafe mode still judges outside the program, on plain data
    warnings = [line for line in result.stderr.splitlines() if "WITHOUT kernel isolation" in line]
    assert len(warnings) == 1  # said once, not per call


def test_grpo_refuses_code_data_at_startup_without_kernel_isolation(tmp_path):
    code = """
import grpo
items = grpo.load_data(grpo.Args(data="data/code.jsonl", eval_every=0, unsafe_code_sandbox=True))[0]
print("UNSAFE LOADED", len(items))
grpo.load_data(grpo.Args(data="data/code.jsonl", eval_every=0))
"""
    result = run_without_user_namespaces(code, tmp_path)
    assert "UNSAFE LOADED 42" in result.stdout, result.stderr
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(
        "grpo.py: error: verify.code_reward: this machine cannot isolate model code"), result.stderr


def test_unsafe_mode_as_root_still_judges_outside_and_runs_the_program_as_nobody():
    skip_unless(os.geteuid() == 0, "root (the unsafe mode's one layer is a uid other than root)")
    program = "import os\ndef ids():\n    return [os.getuid(), os.geteuid(), os.getgroups()]\n"
    passed, reason = verify.run_sandboxed(program, f"assert ids() == [{verify.SANDBOX_UID}] * 2 + [[]]\n", isolate=False)
    assert passed, reason
    assert verify.run_sandboxed(COMPARISON_TRICKS["int subclass"], TRICKY_TESTS, isolate=False)[0] is False
    assert verify.run_sandboxed(SOLUTION + PROCESSES["fork and sleep"], TESTS, isolate=False, audit=False)[0] is True
    check_nothing_left_behind()  # its process group is killed and its directory removed
