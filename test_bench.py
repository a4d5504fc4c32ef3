"""Tests for bench.py: both subcommands run for real, at tiny sizes (CPU, offline, ~30 s).

    python -m pytest -q test_bench.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
TOKENIZER = ROOT.parent / "shared" / "qwen2.5-tokenizer"

# A 2-layer Qwen2 with Qwen2.5's padded vocabulary (the tokenizer has 151,665 tokens).
TINY_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 151936, "max_position_embeddings": 4096, "bos_token_id": 151643, "eos_token_id": 151643,
               "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}


def run_bench(*arguments, timeout=300):
    process = subprocess.run([sys.executable, str(ROOT / "bench.py"), *arguments], capture_output=True, text=True,
                             cwd=ROOT, timeout=timeout, check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_gather_bench_fused_uses_far_less_memory_than_naive_and_agrees(device):
    # 2048 x 32000 float32 logits are 250 MiB: the naive path holds several such buffers, the fused one
    # a few 43-row chunks (a 16 MB budget).
    stdout = run_bench("gather", "--tokens", "2048", "--vocab", "32000", "--repeat", "1", "--memory-mb", "16",
                       "--device", device)
    summary = json_lines(stdout)[-1]
    naive, fused = summary["gather"]
    assert (naive["impl"], fused["impl"]) == ("naive", "fused")
    assert naive["peak_extra_mib"] > 400
    assert fused["peak_extra_mib"] < naive["peak_extra_mib"] / 4, stdout
    assert fused["max_abs_diff_logprobs"] < 1e-4 and fused["max_abs_diff_grad"] < 1e-4, stdout
    assert all(row["median_s"] > 0 for row in summary["gather"])
    assert "naive log_softmax+gather" in stdout and "mem naive/this" in stdout  # the readable table


def test_step_bench_runs_every_phase_and_updates_lora(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    stdout = run_bench("step", "--config", str(config), "--tokenizer", str(TOKENIZER), "--device", "cpu",
                       "--prompts", "2", "--group", "2", "--prompt-tokens", "8", "--new-tokens", "6",
                       "--micro-batch", "2", "--steps", "1", "--num-iterations", "2", "--lr", "1e-3")
    records = json_lines(stdout)
    steps = [r for r in records if "step" in r]
    assert len(steps) == 1
    step = steps[0]
    assert set(step["seconds"]) == {"generation", "reference", "old", "policy", "optimizer"}
    for phase, seconds in step["seconds"].items():
        assert 0 < seconds < float("inf"), (phase, seconds)
        assert step["peak_gib"][phase] > 0
    assert step["generated_tokens"] == 2 * 2 * 6  # EOS suppressed: every completion is max length
    assert step["generated_tokens_per_s"] > 0
    assert step["loss"] is not None and abs(step["loss"]) < float("inf")
    assert records[-1]["lora_max_abs_change"] > 0  # the optimizer step moved the adapters
    assert "policy forward+backward" in stdout  # the readable table


def test_step_bench_naive_gather_and_no_reference_pass(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    stdout = run_bench("step", "--config", str(config), "--tokenizer", str(TOKENIZER), "--device", "cpu",
                       "--prompts", "1", "--group", "2", "--prompt-tokens", "8", "--new-tokens", "4",
                       "--micro-batch", "2", "--steps", "1", "--beta", "0", "--naive-gather")
    step = next(r for r in json_lines(stdout) if "step" in r)
    assert step["gather"] == "naive"
    assert set(step["seconds"]) == {"generation", "policy", "optimizer"}  # β = 0, μ = 1: no extra passes
