"""pytest setup: the `needs_shared` marker and where its tests find the real Qwen2.5 tokenizer and full GSM8K.

The suite needs nothing beside the checkout and no network: tiny.py builds the models and a small Qwen-like
tokenizer, data/ holds a GSM8K slice and Qwen2.5-14B's config.json. A few tests check against the real files;
they are marked `needs_shared` (python -m pytest -m needs_shared runs just them) and take them from, in order:
  1. $GRPO_SHARED, else ../shared beside the checkout: qwen2.5-tokenizer/ and data/gsm8k/test.jsonl;
  2. a download, unless HF_HUB_OFFLINE=1: the tokenizer files of Qwen/Qwen2.5-14B-Instruct (the ones ../shared
     holds) from the Hugging Face Hub, kept in its cache; GSM8K's test split from its official URL to
     data/gsm8k_test.jsonl (where grpo.py itself downloads it; git-ignored, reused next time);
and are skipped otherwise, summed up in one line at the end of the run (GRPO_REQUIRE_SHARED=1, as CI sets
it where ../shared is present, makes a missing file a failure instead).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("GRPO_SHARED", ROOT.parent / "shared"))
QWEN_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
SKIP_PREFIX = "needs_shared: "

# `python -m pytest -n 2` (pytest-xdist, the README's command): each worker runs one torch thread, as do the
# processes its tests start (they inherit it), so two workers fill two cores without oversubscribing them and a
# run compared with a subprocess's uses the same thread count. Each worker has a temporary directory of its own
# (sticky and world-writable like /tmp: the code sandbox's uid works under it), because test_verify.py checks
# that a code run leaves nothing in the temporary directory: another worker's run must not be counted.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    WORKER_TMP = tempfile.mkdtemp(prefix=f"grpo-tests-{WORKER}-")
    os.chmod(WORKER_TMP, 0o1777)
    os.environ["TMPDIR"] = WORKER_TMP
    tempfile.tempdir = None  # tempfile looks again, and finds TMPDIR


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_shared: needs the real Qwen2.5 tokenizer or the full GSM8K "
                                       "(GRPO_SHARED, ../shared or a download; skipped without them)")
    config.addinivalue_line("markers", "slow: 10 s or more (processes of their own, many steps): runs first")
    # With -n N, xdist hands each worker a chunk of the tests up front (a quarter of its share); two at a time from
    # one queue instead, so that the slow tests, sorted first, are spread over the workers and the run ends on fast ones.
    if getattr(config.option, "dist", "no") == "load" and getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 2


def pytest_unconfigure(config):
    if WORKER:
        shutil.rmtree(WORKER_TMP, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """A test that asks for a real file, directly or through another fixture, is marked without anyone remembering.
    The slow tests go first (in their file order), so that the run does not end on one of them alone."""
    for item in items:
        if {"qwen_tokenizer_dir", "gsm8k_test_path"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_shared)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: False (slow) first


def not_here(message):
    if os.environ.get("GRPO_REQUIRE_SHARED") == "1":
        pytest.fail(SKIP_PREFIX + message, pytrace=False)
    pytest.skip(SKIP_PREFIX + message)


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> str:
    """The real Qwen2.5 tokenizer (151,665 tokens), as a directory AutoTokenizer loads."""
    local = SHARED / "qwen2.5-tokenizer"
    if local.is_dir():
        return str(local)
    try:  # with HF_HUB_OFFLINE=1 this only looks in the Hugging Face cache
        from huggingface_hub import snapshot_download
        return snapshot_download("Qwen/Qwen2.5-14B-Instruct", allow_patterns=QWEN_TOKENIZER_FILES)
    except Exception as e:  # no network, offline mode, hub errors: all mean "not here"
        not_here(f"the real Qwen2.5 tokenizer is not in {local} and could not be downloaded ({type(e).__name__})")


@pytest.fixture(scope="session")
def gsm8k_test_path() -> Path:
    """GSM8K's full test split (1,319 problems), as published."""
    import grpo
    download = ROOT / "data" / "gsm8k_test.jsonl"
    for path in (SHARED / "data" / "gsm8k" / "test.jsonl", download):
        if path.is_file():
            return path
    if not offline():
        try:
            grpo.download_gsm8k(str(download))
            return download
        except SystemExit:  # grpo.fail: the download failed
            pass
    not_here(f"GSM8K's test split is not in {SHARED / 'data' / 'gsm8k'} nor {download} and could not be downloaded")


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SKIP_PREFIX in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) marked needs_shared were skipped: set GRPO_SHARED to a folder with "
            f"qwen2.5-tokenizer/ and data/gsm8k/test.jsonl, or run with network access (and no HF_HUB_OFFLINE=1)")
