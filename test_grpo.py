"""Tests for grpo.py: each piece of math against a slow, obvious reference (loops, float64), properties
named as sentences, and the real 4-bit + LoRA path end to end on a tiny random Qwen2 (CPU, offline).

    python -m pytest -q
"""

import argparse
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import bench
import grpo
import tiny
import verify

ROOT = Path(__file__).resolve().parent
GSM8K_SAMPLE = ROOT / "data" / "gsm8k_sample.jsonl"  # GSM8K's first 64 train problems (MIT, data/LICENSE-gsm8k)
QWEN_14B_CONFIG = ROOT / "data" / "qwen2.5-14b-config.json"  # the architecture only, no weights
_spec = importlib.util.spec_from_file_location("countdown", ROOT / "data" / "countdown.py")
countdown = importlib.util.module_from_spec(_spec)  # the worked example of a task of one's own
_spec.loader.exec_module(countdown)


# -----------------------------------------------------------------------------
# Fixtures: a tiny random Qwen2 with a small Qwen-like tokenizer built here (no download), loaded through
# grpo.load_model. The few tests that need the real Qwen2.5 tokenizer or the full GSM8K take them from
# conftest.py's fixtures (qwen_tokenizer_dir, gsm8k_test_path) and are marked needs_shared.


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Byte-level BPE trained on data/gsm8k_sample.jsonl with Qwen2.5's special tokens and chat template."""
    path = str(tmp_path_factory.mktemp("tokenizer"))
    tiny.qwen_like_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen")), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory, qwen_tokenizer_dir):
    """The same tiny model with the real Qwen2.5 tokenizer: 151,680 vocabulary rows instead of 1,040."""
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen2.5")), tokenizer_dir=qwen_tokenizer_dir)


def tiny_args(model_dir, **overrides) -> grpo.Args:
    # A 1 MB log-prob gather budget: 126 rows per chunk at the tiny model's 1,040-row vocabulary, so a batch is
    # gathered in several chunks, as the default 256 MB is at Qwen2.5's 151,936 rows (220 rows per chunk).
    args = grpo.Args(model=model_dir, device="cpu", prompts_per_step=2, group_size=4, max_new_tokens=12,
                     micro_batch=8, steps=2, eval_every=0, save_every=0, warmup_steps=0, lr=1e-2,
                     sample_every=0, reward_workers=2, logprob_memory_mb=1)
    return dataclasses.replace(args, **overrides)


@pytest.fixture
def model_and_tokenizer(tiny_model_dir):
    torch.manual_seed(0)  # LoRA A's initialisation: every test gets the same model, whatever ran before it
    return grpo.load_model(tiny_args(tiny_model_dir), torch.device("cpu"))


def randomize_lora(model, seed=0, scale=0.05):
    """LoRA B starts at 0, which makes policy == reference and zeroes A's gradient; tests that need a
    generic policy give B small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def rollout_batch(model, tokenizer, args, prompts=("What is 2 + 3?", "Name a colour."), keep=()):
    """Real generate on the tiny model -> the batch dict the training step uses (and the rollout's keys in keep)."""
    eos_ids = grpo.end_of_sequence_ids(model, tokenizer)
    texts = [grpo.build_prompt({"prompt": p, "answer": "1"}, tokenizer) for p in prompts for _ in range(args.group_size)]
    torch.manual_seed(0)
    rollout = grpo.generate(model, tokenizer, texts, args, eos_ids, temperature=1.0)
    n = len(texts)
    advantages = torch.linspace(-1.5, 1.5, n)
    return {"prompt_ids": rollout["prompt_ids"], "prompt_mask": rollout["prompt_mask"],
            "completion_ids": rollout["completion_ids"], "completion_mask": rollout["completion_mask"],
            "loss_mask": rollout["completion_mask"].clone(), "advantages": advantages, **{k: rollout[k] for k in keep}}


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# -----------------------------------------------------------------------------
# token_logprobs: the fused gather against a naive float64 log_softmax-gather.


def naive_logprobs64(hidden, weight, targets, temperature):
    logits = hidden.double() @ weight.double().T / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [7, 64, None])
def test_token_logprobs_matches_float64_reference_in_value_and_gradient(dtype, tolerance, temperature, chunk_size):
    torch.manual_seed(0)
    N, H, V = 50, 16, 300  # chunk 7 does not divide 50
    hidden = (torch.randn(N, H) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H).to(dtype).requires_grad_()  # requires grad, yet must get none
    targets = torch.randint(0, V, (N,))
    upstream = torch.randn(N)  # a generic incoming gradient, not all ones

    fused = grpo.token_logprobs(hidden, weight, targets, temperature, chunk_size=chunk_size, memory_mb=1)
    assert fused.dtype == torch.float32 and fused.shape == (N,)
    (fused * upstream).sum().backward()

    hidden64 = hidden.detach().double().requires_grad_()
    reference = naive_logprobs64(hidden64, weight.detach(), targets, temperature)
    (reference * upstream.double()).sum().backward()

    # Values: the reference sees the same (bf16-rounded) inputs, so only float32 accumulation differs.
    assert torch.allclose(fused.double(), reference, atol=1e-4 if dtype == torch.float32 else 1e-3)
    scale = hidden64.grad.abs().max()
    assert (hidden.grad.double() - hidden64.grad).abs().max() <= tolerance * scale
    assert weight.grad is None  # lm_head is frozen: no [V, H] gradient is ever formed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_token_logprobs_on_cuda_uses_the_bf16_gemm_and_matches_float64():
    # The GPU path multiplies bf16 hidden states by the bf16 lm_head with float32 output (no float32 copy
    # of lm_head). At Qwen2.5's vocabulary, against a float64 reference of the same bf16 numbers.
    torch.manual_seed(0)
    N, H, V = 300, 1024, 152_064
    hidden = (torch.randn(N, H, device="cuda")).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device="cuda") * 2 / H**0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    upstream = torch.randn(N, device="cuda")
    product = torch.mm(hidden.detach()[:4], weight.T, out_dtype=torch.float32)  # the GEMM itself exists here
    assert product.dtype == torch.float32
    fused = grpo.token_logprobs(hidden, weight, targets, 0.7, chunk_size=128)
    (fused * upstream).sum().backward()
    hidden64 = hidden.detach().double().requires_grad_()
    reference = naive_logprobs64(hidden64, weight, targets, 0.7)
    (reference * upstream.double()).sum().backward()
    assert (fused.double() - reference).abs().max() < 1e-3
    scale = hidden64.grad.abs().max()
    assert (hidden.grad.double() - hidden64.grad).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_token_logprobs_entropy_matches_float64_and_leaves_logprobs_and_gradient_unchanged(dtype, temperature, chunk_size):
    torch.manual_seed(3)
    N, H, V = 50, 16, 300  # chunk 7 does not divide 50
    hidden = (torch.randn(N, H) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H).to(dtype)
    targets = torch.randint(0, V, (N,))
    upstream = torch.randn(N)
    plain = grpo.token_logprobs(hidden, weight, targets, temperature, chunk_size=chunk_size, memory_mb=1)
    (plain * upstream).sum().backward()
    plain_grad, hidden.grad = hidden.grad.clone(), None
    logprobs, entropy = grpo.token_logprobs(hidden, weight, targets, temperature, chunk_size=chunk_size, memory_mb=1,
                                            with_entropy=True)
    (logprobs * upstream).sum().backward()
    assert torch.equal(logprobs, plain) and torch.equal(hidden.grad, plain_grad)  # the same numbers, bit for bit
    assert entropy.dtype == torch.float32 and entropy.shape == (N,) and not entropy.requires_grad
    # float64 reference, written as a sum over the vocabulary one token at a time: H = -Σ_v p_v log p_v.
    logits = hidden.detach().double() @ weight.double().T / temperature
    for i in range(0, N, 9):
        p = [math.exp(x) for x in (logits[i] - torch.logsumexp(logits[i], 0)).tolist()]
        assert float(entropy[i]) == pytest.approx(-sum(q * math.log(q) for q in p if q > 0), abs=1e-4)
    assert 0 < float(entropy.min()) and float(entropy.max()) <= math.log(V) + 1e-5


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_token_logprobs_gradient_of_confident_tokens_and_far_targets_stays_exact(dtype, tolerance):
    # The forward forms d log p_t / d hidden = ((1 - p_t) W_t - Σ_{v≠t} p_v W_v) / T with the target's term
    # set aside. For a confident token (p_t near 1) that gradient is small; the plain W_t - Σ_v p_v W_v with
    # 16-bit p would cancel to rounding noise there. Checked row by row against float64, relative to each
    # row's own gradient. A target ~200 nats below the max must still give a finite, exact log-prob.
    torch.manual_seed(5)
    N, H, V, temperature = 40, 16, 300, 0.7
    weight = torch.randn(V, H).to(dtype)
    hidden = torch.randn(N, H) * 3
    targets = (hidden @ weight.float().T).argmax(dim=1)  # the most likely token: p_t from ~0.3 to ~1 - 1e-8
    targets[-4:] = (hidden[-4:] @ weight.float().T).argmin(dim=1)  # the least likely
    hidden[-4:] *= 4  # z_t - max < -150 there: exp(z_t - max) underflows float32
    hidden = hidden.to(dtype).requires_grad_()
    upstream = torch.randn(N)
    fused = grpo.token_logprobs(hidden, weight, targets, temperature, chunk_size=16)
    (fused * upstream).sum().backward()
    hidden64 = hidden.detach().double().requires_grad_()
    reference = naive_logprobs64(hidden64, weight, targets, temperature)
    (reference * upstream.double()).sum().backward()
    assert float(reference[-4:].detach().max()) < -150 and torch.isfinite(fused).all()
    assert torch.allclose(fused.double(), reference, rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 1e-3)
    confident = reference[:-4].exp() > 0.999
    assert int(confident.sum()) >= 5  # the case the set-aside term is for
    error = (hidden.grad.double() - hidden64.grad).norm(dim=1) / hidden64.grad.norm(dim=1)  # [N], per row
    assert float(error.max()) <= tolerance, error
    # Without gradient (the reference pass) no slope is formed, and the log-probs are the same numbers.
    with torch.no_grad():
        assert torch.equal(grpo.token_logprobs(hidden, weight, targets, temperature, chunk_size=16), fused.detach())


def test_generation_chunk_is_sized_from_the_kv_cache_and_balanced():
    config = __import__("transformers").AutoConfig.from_pretrained(QWEN_14B_CONFIG)
    # Qwen2.5-14B by hand: K and V x 48 layers x 8 KV heads x 128 dims x 2 bytes = 196,608 bytes (192 KiB)
    # per token; 270 + 256 tokens; prefill MLP 4 x 13,824 x 2 bytes per prompt token; 8 float32 [152,064] rows.
    per_sequence = 196_608 * (270 + 256) + 4 * 13_824 * 2 * 270 + 8 * 4 * 152_064
    chunk = lambda free: grpo.generation_chunk_size(config, 128, 270, 256, free, dtype_bytes=2)  # noqa: E731
    assert chunk(10**12) == 128  # all of it in one call
    assert chunk(128 * per_sequence) == 128 and chunk(128 * per_sequence - 1) == 64  # 127 fit: two balanced 64s
    assert chunk(100 * per_sequence) == 64
    assert chunk(50 * per_sequence) == 43  # 3 chunks: 43 + 43 + 42
    assert chunk(0) == 1


def test_token_logprobs_default_chunking_follows_the_memory_budget():
    V = 151_936
    rows = grpo.gather_chunk_rows(V, memory_mb=256)
    assert rows * 2 * 4 * V <= 256 * 2**20 < (rows + 1) * 2 * 4 * V  # two [rows, V] float32 buffers
    assert grpo.gather_chunk_rows(V, memory_mb=0) == 1


# -----------------------------------------------------------------------------
# grpo_loss against a slow per-token loop.


def slow_grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low, clip_high, beta, agg, max_tokens,
                   sequence_ratio=False, policy_mask=None, sampler_logp=None, tis_cap=0.0):
    """The GRPO objective one token at a time, in float64 python numbers. sequence_ratio: GSPO's ratio, the
    geometric mean of the sequence's token ratios (its trained tokens). policy_mask: tokens whose clipped
    term counts (the KL term counts on every trained token). sampler_logp, tis_cap: the clipped term times
    the truncated importance weight min(π_old / π_sampler, C)."""
    N, T = len(logp), len(logp[0])
    per_sequence, total, tokens = [], 0.0, 0
    for i in range(N):
        sequence_sum, count = 0.0, 0
        trained = [t for t in range(T) if mask[i][t]]
        geometric_mean = math.prod(math.exp(logp[i][t] - old_logp[i][t]) for t in trained) ** (1 / max(len(trained), 1))
        for t in range(T):
            if not mask[i][t]:
                continue
            ratio = geometric_mean if sequence_ratio else math.exp(logp[i][t] - old_logp[i][t])
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            objective = min(ratio * advantages[i], clipped * advantages[i])
            if policy_mask is not None and not policy_mask[i][t]:
                objective = 0.0
            if sampler_logp is not None and tis_cap > 0:
                objective *= min(math.exp(old_logp[i][t]) / math.exp(sampler_logp[i][t]), tis_cap)
            if beta:
                d = ref_logp[i][t] - logp[i][t]
                objective -= beta * (math.exp(d) - d - 1)
            sequence_sum += -objective
            count += 1
        total += sequence_sum
        tokens += count
        if count:
            per_sequence.append(sequence_sum / count)
    if agg == "seq":
        return sum(per_sequence) / max(len(per_sequence), 1)
    if agg == "token":
        return total / max(tokens, 1)
    return total / (N * max_tokens)


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.1, 0.28)])
def test_grpo_loss_matches_per_token_loop(agg, beta, clip_low, clip_high):
    torch.manual_seed(1)
    N, T = 6, 9
    logp = (torch.randn(N, T) - 2).double()
    # Ratios far outside the clip range in both directions, and some inside it.
    old_logp = logp + torch.randn(N, T).double() * 1.5
    ref_logp = logp + torch.randn(N, T).double() * 0.3
    advantages = torch.randn(N).double()
    mask = (torch.rand(N, T) > 0.3).double()
    mask[2] = 0  # a sequence with no trained token
    logp.requires_grad_()
    loss, stats = grpo.grpo_loss(logp, old_logp, ref_logp if beta else None, advantages, mask, clip_low, clip_high,
                                 beta, agg, denominator=grpo.loss_denominator(mask, agg, T))
    expected = slow_grpo_loss(logp.tolist(), old_logp.tolist(), ref_logp.tolist(), advantages.tolist(), mask.tolist(),
                              clip_low, clip_high, beta, agg, T)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    ratio = torch.exp(logp.detach() - old_logp)
    assert ((ratio > 1 + clip_high) | (ratio < 1 - clip_low)).any()  # the clip really binds here
    assert 0 < stats["clip_frac"] < 1


def test_grpo_loss_gradient_matches_autograd_of_the_loop():
    torch.manual_seed(2)
    N, T = 4, 5
    logp = (torch.randn(N, T) - 1).double().requires_grad_()
    old_logp, ref_logp = logp.detach() + 0.4 * torch.randn(N, T).double(), logp.detach() + 0.2
    advantages, mask = torch.randn(N).double(), torch.ones(N, T).double()
    loss, _ = grpo.grpo_loss(logp, old_logp, ref_logp, advantages, mask, 0.2, 0.28, 0.1, "token")
    (gradient,) = torch.autograd.grad(loss, logp)
    epsilon = 1e-6  # central differences of the slow loop
    for i, t in [(0, 0), (1, 3), (3, 4)]:
        up, down = logp.detach().clone(), logp.detach().clone()
        up[i, t] += epsilon
        down[i, t] -= epsilon
        numeric = (slow_grpo_loss(up.tolist(), old_logp.tolist(), ref_logp.tolist(), advantages.tolist(), mask.tolist(),
                                  0.2, 0.28, 0.1, "token", T)
                   - slow_grpo_loss(down.tolist(), old_logp.tolist(), ref_logp.tolist(), advantages.tolist(),
                                    mask.tolist(), 0.2, 0.28, 0.1, "token", T)) / (2 * epsilon)
        assert float(gradient[i, t]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_sequence_ratio_and_policy_mask_match_the_loop_in_value_and_gradient(agg, ratio_level):
    torch.manual_seed(4)
    N, T = 6, 7
    logp = (torch.randn(N, T) - 2).double().requires_grad_()
    shift = torch.tensor([[0.5], [-0.4], [0.0], [0.05], [0.3], [-0.6]]).double()  # sequence ratios in and out of the clip range
    old_logp = logp.detach() + shift + torch.randn(N, T).double() * 0.3
    ref_logp = logp.detach() + torch.randn(N, T).double() * 0.3
    advantages = torch.randn(N).double()
    mask = (torch.rand(N, T) > 0.25).double()
    mask[2] = 0  # a sequence with no trained token
    policy_mask = mask * (torch.rand(N, T) > 0.5).double()
    slow = lambda lp: slow_grpo_loss(lp.tolist(), old_logp.tolist(), ref_logp.tolist(), advantages.tolist(),  # noqa: E731
                                     mask.tolist(), 0.2, 0.28, 0.05, agg, T, ratio_level == "sequence", policy_mask.tolist())
    loss, stats = grpo.grpo_loss(logp, old_logp, ref_logp, advantages, mask, 0.2, 0.28, 0.05, agg,
                                 grpo.loss_denominator(mask, agg, T), ratio_level, policy_mask)
    assert float(loss.detach()) == pytest.approx(slow(logp.detach()), rel=1e-9, abs=1e-12)
    if ratio_level == "sequence":
        assert 0 < stats["clip_frac"] < 1  # whole sequences clipped
    (gradient,) = torch.autograd.grad(loss, logp)
    epsilon = 1e-6  # central differences of the slow loop
    for i, t in [(0, 0), (1, 3), (3, 4), (5, 6), (2, 1)]:
        up, down = logp.detach().clone(), logp.detach().clone()
        up[i, t] += epsilon
        down[i, t] -= epsilon
        assert float(gradient[i, t]) == pytest.approx((slow(up) - slow(down)) / (2 * epsilon), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_truncated_importance_sampling_matches_the_loop_in_value_gradient_and_stats(agg, ratio_level):
    torch.manual_seed(6)
    N, T, cap = 6, 7, 2.0
    logp = (torch.randn(N, T) - 2).double().requires_grad_()
    old_logp = logp.detach() + torch.randn(N, T).double() * 0.3
    ref_logp = logp.detach() + torch.randn(N, T).double() * 0.3
    sampler_logp = old_logp + torch.randn(N, T).double() * 0.8  # weights π_old/π_sampler from ~0.1 to ~10: some capped
    advantages, mask = torch.randn(N).double(), (torch.rand(N, T) > 0.25).double()
    mask[2] = 0  # a sequence with no trained token
    slow = lambda lp, c=cap: slow_grpo_loss(lp.tolist(), old_logp.tolist(), ref_logp.tolist(), advantages.tolist(),  # noqa: E731
                                            mask.tolist(), 0.2, 0.28, 0.05, agg, T, ratio_level == "sequence", None,
                                            sampler_logp.tolist(), c)
    loss, stats = grpo.grpo_loss(logp, old_logp, ref_logp, advantages, mask, 0.2, 0.28, 0.05, agg,
                                 grpo.loss_denominator(mask, agg, T), ratio_level, None, sampler_logp, cap)
    assert float(loss.detach()) == pytest.approx(slow(logp.detach()), rel=1e-9, abs=1e-12)
    assert abs(slow(logp.detach()) - slow(logp.detach(), 0.0)) > 1e-3  # the weights really change the loss
    (gradient,) = torch.autograd.grad(loss, logp)
    epsilon = 1e-6  # central differences of the slow loop: the weight itself carries no gradient
    for i, t in [(0, 0), (1, 3), (3, 4), (5, 6), (2, 1)]:
        up, down = logp.detach().clone(), logp.detach().clone()
        up[i, t] += epsilon
        down[i, t] -= epsilon
        assert float(gradient[i, t]) == pytest.approx((slow(up) - slow(down)) / (2 * epsilon), rel=1e-5, abs=1e-8)
    # The sampler metrics, token by token: |log π_old - log π_sampler|, k3 of KL(π_sampler ‖ π_old), capped share.
    trained = [(i, t) for i in range(N) for t in range(T) if mask[i, t]]
    gaps = [float(old_logp[i, t] - sampler_logp[i, t]) for i, t in trained]
    assert stats["sampler_logp_abs_diff"] == pytest.approx(sum(map(abs, gaps)) / len(gaps), rel=1e-9)
    assert stats["sampler_kl"] == pytest.approx(sum(math.exp(g) - g - 1 for g in gaps) / len(gaps), rel=1e-9)
    assert stats["tis_capped_frac"] == pytest.approx(sum(math.exp(g) > cap for g in gaps) / len(gaps))
    assert 0 < stats["tis_capped_frac"] < 1


def test_truncated_importance_sampling_with_a_sampler_identical_to_the_policy_changes_nothing(tiny_model_dir,
                                                                                            model_and_tokenizer):
    # In the loss: sampler = π_old gives weight exactly 1, so the very same loss and gradient as without it.
    torch.manual_seed(7)
    logp = (torch.randn(5, 6) - 2).requires_grad_()
    ref_logp, advantages, mask = logp.detach() + 0.1 * torch.randn(5, 6), torch.randn(5), (torch.rand(5, 6) > 0.3).float()
    results = [grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, beta=0.04, sampler_logp=sampler, tis_cap=2.0)
               for sampler in (None, logp.detach().clone())]
    gradients = [torch.autograd.grad(loss, logp)[0] for loss, _ in results]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(gradients[0], gradients[1])
    assert results[1][1]["sampler_kl"] == 0.0 and results[1][1]["sampler_logp_abs_diff"] == 0.0
    # End to end, μ = 1: the 4-bit + LoRA policy samples (its log-probs recorded by generate with a KV cache) and
    # trains (the policy pass's own log-probs): the same gradient with --tis-cap 2 as with 0, to float32 rounding.
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)
    args = tiny_args(tiny_model_dir, beta=0.0)
    batch = rollout_batch(model, tokenizer, args, keep=("sampler_logp",))
    gradients, stats = [], []
    for cap in (0.0, 2.0):
        model.zero_grad(set_to_none=True)
        denominator = grpo.loss_denominator(batch["loss_mask"], args.agg)
        stats.append(grpo.accumulate_gradients(model, batch, dataclasses.replace(args, tis_cap=cap), 1.0, denominator))
        gradients.append(lora_grads(model))
    assert stats[1]["sampler_logp_abs_diff"] < 1e-5 and stats[1]["tis_capped_frac"] == 0.0
    for name, gradient in gradients[0].items():  # weights 1 ± 1e-6: float32 rounding of the largest entry, no more
        assert (gradient - gradients[1][name]).abs().max() <= 1e-5 * gradient.abs().max(), name
    assert max(float(g.abs().max()) for g in gradients[0].values()) > 0


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
def test_sequence_ratio_gives_the_token_level_gradient_with_one_update_per_batch(agg):
    # μ = 1: old = logp.detach(), so every ratio is 1 and d s_i = s_i · mean_t d logp_it; summed over the
    # sequence's |o_i| equal terms, that is the token-level gradient Σ_t d logp_it, for every aggregation.
    torch.manual_seed(5)
    logp = (torch.randn(5, 8) - 2).requires_grad_()
    ref_logp, advantages = logp.detach() + 0.1 * torch.randn(5, 8), torch.randn(5)
    mask = (torch.rand(5, 8) > 0.3).float()
    gradients = []
    for ratio_level in ("token", "sequence"):
        loss, _ = grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, beta=0.04, agg=agg, ratio_level=ratio_level)
        gradients.append(torch.autograd.grad(loss, logp)[0])
    assert torch.allclose(gradients[0], gradients[1], atol=1e-7) and gradients[0].abs().sum() > 0


def test_high_entropy_mask_keeps_the_top_fraction_of_trained_tokens_by_hand():
    entropy = torch.tensor([[0.9, 0.1, 0.5, 0.7, 2.0],
                            [0.3, 0.8, 0.6, 0.2, 0.0],
                            [1.5, 0.4, 0.05, 1.0, 3.0]])
    loss_mask = torch.tensor([[1, 1, 1, 1, 0],  # 2.0 and 3.0 are not trained: they must not count
                              [1, 1, 1, 1, 1],
                              [1, 1, 1, 1, 0]]).float()
    # 13 trained tokens; ρ = 0.2 keeps ⌈2.6⌉ = 3: 1.5, 1.0 and 0.9.
    assert grpo.high_entropy_mask(entropy, loss_mask, 0.2).tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                                                                         [1, 0, 0, 1, 0]]
    # ρ = 0.5 keeps ⌈6.5⌉ = 7: also 0.8, 0.7, 0.6 and 0.5.
    assert grpo.high_entropy_mask(entropy, loss_mask, 0.5).tolist() == [[1, 0, 1, 1, 0], [0, 1, 1, 0, 0],
                                                                         [1, 0, 0, 1, 0]]
    assert torch.equal(grpo.high_entropy_mask(entropy, loss_mask, 1.0), loss_mask)
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    assert grpo.high_entropy_mask(ties, torch.ones(1, 4), 0.25).tolist() == [[1, 1, 1, 0]]  # ties are kept


def test_kl_is_zero_when_policies_match():
    logp = torch.randn(3, 4) - 1
    loss, stats = grpo.grpo_loss(logp, logp, logp.clone(), torch.zeros(3), torch.ones(3, 4), beta=0.5)
    assert stats["kl"] == 0.0 and float(loss) == 0.0


def test_ratio_is_one_and_clip_inactive_when_old_is_the_current_policy():
    logp = torch.randn(3, 4, requires_grad=True)
    _, stats = grpo.grpo_loss(logp, logp.detach(), None, torch.tensor([2.0, -3.0, 0.5]), torch.ones(3, 4), beta=0.0)
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0


# -----------------------------------------------------------------------------
# Advantages.


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    advantages = grpo.group_advantages(rewards, group_size=4, scale=True, eps=1e-4)
    # group 1: mean 0.5, sample std sqrt(((.5)^2 * 4) / 3) = 0.57735
    std1 = math.sqrt(4 * 0.25 / 3)
    expected1 = [(r - 0.5) / (std1 + 1e-4) for r in (1.0, 0.0, 0.0, 1.0)]
    # group 3: mean 1.0, deviations (1, -1, 0, 0), sample std sqrt(2/3)
    std3 = math.sqrt(2 / 3)
    expected3 = [d / (std3 + 1e-4) for d in (1.0, -1.0, 0.0, 0.0)]
    assert advantages[:4].tolist() == pytest.approx(expected1, rel=1e-6)
    assert advantages[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert advantages[8:].tolist() == pytest.approx(expected3, rel=1e-6)
    unscaled = grpo.group_advantages(rewards, group_size=4, scale=False)  # Dr. GRPO
    assert unscaled[8:].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_zero_variance_group_gets_exactly_zero_advantage():
    # 0.9 × 3 in float32: the mean is off by one ulp, so a naive (r - mean) / (std + eps) gives ±6e-4, not 0.
    rewards = torch.tensor([0.9, 0.9, 0.9, 0.0, 0.0, 0.0])
    assert grpo.group_advantages(rewards, 3).tolist() == [0.0] * 6
    assert grpo.group_advantages(rewards, 3, scale=False).tolist() == [0.0] * 6


# -----------------------------------------------------------------------------
# Rollout masks.


def test_completion_mask_keeps_the_first_eos_and_nothing_after_it_when_pad_equals_eos():
    eos = 9
    ids = torch.tensor([[5, 6, eos, eos, eos],    # finished; generate padded with pad == eos
                        [5, eos, 7, 8, eos],      # only the first EOS counts
                        [5, 6, 7, 8, 1],          # truncated: no EOS at all
                        [eos, eos, eos, eos, eos]])  # EOS right away: that one token is trained
    mask, truncated = grpo.completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    mask, _ = grpo.completion_mask_from_ids(ids, [3, eos])  # several end tokens (chat end-of-turn + EOS)
    assert mask[0].tolist() == [1, 1, 1, 0, 0]


def test_generate_keeps_the_kv_cache_with_gradient_checkpointing_on(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    args = tiny_args(tiny_model_dir, max_new_tokens=6)
    assert model.get_base_model().is_activation_checkpointing
    lengths = []
    decoder = model.get_base_model().get_decoder()
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        never = [model.config.vocab_size - 1]  # an unused padding row as EOS: the completions run to the end
        out = grpo.generate(model, tokenizer, ["hello there"] * 2, args, never, temperature=1.0)
    finally:
        handle.remove()
    assert out["completion_ids"].shape[1] == 6 and out["truncated"].all()
    assert lengths[0] > 1 and lengths[1:] == [1] * 5  # after the prompt, one new token per forward: cache on
    assert model.training  # generate restores train mode for the update


# -----------------------------------------------------------------------------
# The training step on the real 4-bit + LoRA model.


def test_reference_and_policy_logprobs_agree_at_initialization(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer  # LoRA B = 0: the adapters add exactly nothing yet
    args = tiny_args(tiny_model_dir)
    batch = rollout_batch(model, tokenizer, args)
    policy = grpo.batch_logprobs(model, batch, args, temperature=1.0)
    reference = grpo.batch_logprobs(model, batch, args, temperature=1.0, reference=True)
    assert torch.equal(policy, reference)
    assert (policy[batch["completion_mask"].bool()] < 0).all()
    randomize_lora(model)  # ...and the reference really is the adapter-free model
    assert not torch.allclose(grpo.batch_logprobs(model, batch, args, 1.0), reference)
    assert torch.equal(grpo.batch_logprobs(model, batch, args, 1.0, reference=True), reference)


def full_log_softmax64(model, batch, temperature):
    """The model's own full-vocabulary log-softmax at every completion position, [N, T, V] float64."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], torch.ones_like(batch["completion_ids"])], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention,
                       position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits.double()
    P = batch["prompt_ids"].shape[1]
    return torch.log_softmax(logits[:, P - 1 : -1] / temperature, -1)


def test_logprobs_match_the_models_own_logits_at_the_sampling_temperature(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir)
    batch = rollout_batch(model, tokenizer, args)
    ours = grpo.batch_logprobs(model, batch, args, temperature=0.7)
    reference = full_log_softmax64(model, batch, 0.7).gather(2, batch["completion_ids"][..., None]).squeeze(2)
    mask = batch["completion_mask"].bool()
    assert torch.allclose(ours[mask].double(), reference[mask], atol=1e-4)
    assert (ours[~mask] == 0).all()


def test_policy_entropy_matches_the_models_own_logits_and_is_logged_over_trained_tokens(tiny_model_dir,
                                                                                      model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.0, micro_batch=3)  # 3 does not divide 8: token weighting matters
    batch = rollout_batch(model, tokenizer, args)
    batch["loss_mask"][1] = 0  # not trained: not in the logged mean
    logp, entropy = grpo.batch_logprobs(model, batch, args, 0.7, with_entropy=True)
    assert torch.equal(logp, grpo.batch_logprobs(model, batch, args, 0.7))
    log_p = full_log_softmax64(model, batch, 0.7)  # [N, T, V] float64
    reference = -(log_p.exp() * log_p).sum(-1)
    mask = batch["completion_mask"].bool()
    assert torch.allclose(entropy[mask].double(), reference[mask], atol=1e-4) and (entropy[~mask] == 0).all()
    stats = grpo.accumulate_gradients(model, batch, args, 0.7, grpo.loss_denominator(batch["loss_mask"], "seq"))
    assert stats["entropy"] == pytest.approx(float(reference[batch["loss_mask"].bool()].mean()), abs=1e-5)


def test_high_entropy_tokens_and_sequence_ratio_are_exact_under_micro_batching(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.04, ratio_level="sequence")
    batch = rollout_batch(model, tokenizer, args)
    batch["ref_logp"] = grpo.batch_logprobs(model, batch, args, 1.0, reference=True)
    logp, entropy = grpo.batch_logprobs(model, batch, args, 1.0, with_entropy=True)
    batch["old_logp"] = logp + 0.2 * torch.randn(logp.shape) * batch["completion_mask"]  # μ > 1: ratios away from 1
    denominator = grpo.loss_denominator(batch["loss_mask"], "seq")
    grads = []
    for policy_mask in (None, grpo.high_entropy_mask(entropy, batch["loss_mask"], 0.3)):
        if policy_mask is not None:
            batch["policy_mask"] = policy_mask
        for micro_batch in (8, 3):
            model.zero_grad(set_to_none=True)
            grpo.accumulate_gradients(model, batch, dataclasses.replace(args, micro_batch=micro_batch), 1.0, denominator)
            grads.append(lora_grads(model))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name
        assert torch.allclose(grads[2][name], grads[3][name], rtol=1e-4, atol=1e-7), name
    assert any(not torch.allclose(grads[0][n], grads[2][n], rtol=1e-2) for n in grads[0])  # the mask matters


def test_micro_batches_give_the_same_gradient_as_the_whole_batch(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.04)
    batch = rollout_batch(model, tokenizer, args)
    batch["loss_mask"][1] = 0  # a masked-out (e.g. truncated) sequence
    batch["ref_logp"] = grpo.batch_logprobs(model, batch, args, 1.0, reference=True)
    for agg in ("seq", "token", "dr_grpo"):
        denominator = grpo.loss_denominator(batch["loss_mask"], agg, args.max_new_tokens)
        grads = []
        for micro_batch in (8, 3):  # 3 does not divide 8: ragged last micro-batch
            model.zero_grad(set_to_none=True)
            grpo.accumulate_gradients(model, batch, dataclasses.replace(args, micro_batch=micro_batch, agg=agg), 1.0, denominator)
            grads.append(lora_grads(model))
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for name in grads[0]:
            assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), (agg, name)


def slow_plan_tokens(plan, lengths):
    """Padded tokens a plan processes, the long way: every micro-batch padded to its own longest."""
    total = 0
    for rows in plan:
        longest = 0
        for i in rows:
            longest = max(longest, lengths[i])
        total += len(rows) * longest
    return total


def test_micro_batch_plan_partitions_the_batch_within_the_token_budget():
    assert grpo.micro_batch_plan([5, 9, 3, 9, 2, 7], 4) == [[0, 1, 2, 3], [4, 5]]  # the fixed path: batch order
    # Sorted 9, 9, 7, 5, 3, 2 (indices 1, 3, 5, 0, 2, 4); budget 20: 2·9 = 18 fits, 3·9 = 27 does not; 2·7, 3·3 ...
    assert grpo.micro_batch_plan([5, 9, 3, 9, 2, 7], 4, 20) == [[1, 3], [5, 0], [2, 4]]
    assert grpo.micro_batch_plan([5, 30, 3], 4, 20) == [[1], [0, 2]]  # longer than the budget: alone
    generator = torch.Generator().manual_seed(0)
    for budget in (1, 50, 400, 3000, 10**6):
        lengths = (torch.randint(1, 300, (37,), generator=generator)).tolist()
        plan = grpo.micro_batch_plan(lengths, 16, budget)
        assert sorted(i for rows in plan for i in rows) == list(range(37))  # every sequence exactly once
        for rows in plan:
            assert len(rows) == 1 or len(rows) * max(lengths[i] for i in rows) <= budget
        for previous, following in zip(plan, plan[1:]):  # greedy: the next sequence did not fit in the previous one
            assert (len(previous) + 1) * max(lengths[i] for i in previous + following[:1]) > budget
    # GSM8K-like lengths: sorting wastes less padding than fixed micro-batches of the same peak.
    lengths = [60 + int(x) for x in torch.distributions.LogNormal(5.0, 0.5).sample((128,)).clamp(max=512)]
    fixed = grpo.micro_batch_plan(lengths, 16)
    budget = 16 * max(lengths)
    assert slow_plan_tokens(grpo.micro_batch_plan(lengths, 16, budget), lengths) < slow_plan_tokens(fixed, lengths)


def with_varied_lengths(batch, eos, lengths):
    """Cut completion i after lengths[i] tokens with an EOS, so the micro-batch plan has something to sort."""
    for i, length in enumerate(lengths):
        batch["completion_ids"][i, length - 1] = eos
    batch["completion_mask"], _ = grpo.completion_mask_from_ids(batch["completion_ids"], [eos])
    batch["loss_mask"] = batch["completion_mask"].clone()
    return batch


def test_token_budget_micro_batches_give_the_whole_batch_gradient_and_logprobs_in_batch_order(tiny_model_dir,
                                                                                               model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.04)
    batch = with_varied_lengths(rollout_batch(model, tokenizer, args), tokenizer.eos_token_id, [3, 12, 5, 9, 2, 7, 12, 4])
    batch["loss_mask"][1] = 0  # a masked-out (e.g. truncated) sequence
    lengths = grpo.sequence_lengths(batch)
    assert lengths == [batch["prompt_ids"].shape[1] + n for n in [3, 12, 5, 9, 2, 7, 12, 4]]
    whole = grpo.batch_logprobs(model, batch, args, 1.0, reference=True)  # one micro-batch of 8, batch order
    budgets = (1, 3 * max(lengths), 10**6)  # every sequence alone; a few per micro-batch; one holding all 8 sorted
    for budget in budgets:
        budgeted = grpo.batch_logprobs(model, batch, dataclasses.replace(args, micro_batch_tokens=budget), 1.0, reference=True)
        assert torch.allclose(budgeted, whole, atol=1e-5), budget  # rows come back where they were
    batch["ref_logp"] = whole
    for agg in ("seq", "token", "dr_grpo"):
        denominator = grpo.loss_denominator(batch["loss_mask"], agg, args.max_new_tokens)
        model.zero_grad(set_to_none=True)
        grpo.accumulate_gradients(model, batch, dataclasses.replace(args, agg=agg), 1.0, denominator)
        expected = lora_grads(model)
        for budget in budgets:
            model.zero_grad(set_to_none=True)
            grpo.accumulate_gradients(model, batch, dataclasses.replace(args, agg=agg, micro_batch_tokens=budget), 1.0,
                                      denominator)
            grads = lora_grads(model)
            assert grads.keys() == expected.keys() and len(grads) > 0
            for name in grads:  # float32 sums in another order: close relative to the tensor's scale
                scale = float(expected[name].abs().max())
                assert torch.allclose(grads[name], expected[name], rtol=1e-4, atol=3e-5 * scale), (agg, budget, name)


def limit_forward_batch(model, limit, grad_only=False, spare=0):
    """A simulated memory limit inside the real forward: the first decoder layer raises CUDA's out-of-memory
    error (after it has run, as a real one would) when a training pass (not generate, which runs in eval
    mode) gives it more than `limit` sequences (in grad mode only: grad_only), after `spare` such forwards. Returns a record of the sizes it saw and how often it raised, and the hook handle."""
    record = {"sizes": [], "raised": 0}

    def hook(module, inputs, output):
        n = (output[0] if isinstance(output, tuple) else output).shape[0]
        record["sizes"].append(n)
        applies = module.training and (torch.is_grad_enabled() or not grad_only)  # training passes, not generate
        if applies and len(record["sizes"]) > spare and n > limit:
            record["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return record, model.get_base_model().get_decoder().layers[0].register_forward_hook(hook)


@pytest.mark.parametrize("micro_batch_tokens", [0, 10**6])
def test_out_of_memory_in_the_policy_pass_halves_and_redoes_it_from_zeroed_gradients(tiny_model_dir, model_and_tokenizer,
                                                                                      micro_batch_tokens, capsys):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.0, micro_batch=4, micro_batch_tokens=micro_batch_tokens)
    batch = with_varied_lengths(rollout_batch(model, tokenizer, args), tokenizer.eos_token_id, [3, 12, 5, 9, 2, 7, 12, 4])
    denominator = grpo.loss_denominator(batch["loss_mask"], "seq")
    # With the token budget, the first (all-8) forward fails. With --micro-batch 4, the limit of 3 applies after
    # the first micro-batch's forward: its gradient has landed when the second fails, and must not count twice
    # (checked: without the zero_grad in with_memory_retry this test fails).
    record, handle = limit_forward_batch(model, 7 if micro_batch_tokens else 3, grad_only=True,
                                         spare=0 if micro_batch_tokens else 1)
    try:
        model.zero_grad(set_to_none=True)
        stats = grpo.with_memory_retry(lambda: grpo.accumulate_gradients(model, batch, args, 1.0, denominator), model,
                                       batch, args, "policy forward/backward")
    finally:
        handle.remove()
    assert record["raised"] == 1  # the limit bit once, and the smaller size was enough
    recovered = lora_grads(model)
    if micro_batch_tokens:  # halved until the 8 sequences no longer fit in one micro-batch, and no further
        assert args.micro_batch == 4 and args.micro_batch_tokens < 8 * max(grpo.sequence_lengths(batch)) <= 2 * args.micro_batch_tokens
    else:
        assert (args.micro_batch, args.micro_batch_tokens, record["sizes"][:3]) == (2, 0, [4, 4, 2])
    assert "out of memory in the policy forward/backward: halved to --micro-batch" in capsys.readouterr().out
    # The same pass run at the smaller size from the start: bit-identical (nothing of the failed try remains).
    model.zero_grad(set_to_none=True)
    expected_stats = grpo.accumulate_gradients(model, batch, args, 1.0, denominator)
    assert stats == expected_stats
    for name, grad in lora_grads(model).items():
        assert torch.equal(recovered[name], grad), name


def test_first_inner_iteration_has_ratio_exactly_one(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.0)
    batch = rollout_batch(model, tokenizer, args)
    stats = grpo.accumulate_gradients(model, batch, args, 1.0, grpo.loss_denominator(batch["loss_mask"], "seq"))
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
    # μ > 1: old log-probs computed before the update equal the policy's, so the first ratio is 1 too.
    batch["old_logp"] = grpo.batch_logprobs(model, batch, args, 1.0)
    model.zero_grad()
    stats = grpo.accumulate_gradients(model, batch, args, 1.0, grpo.loss_denominator(batch["loss_mask"], "seq"))
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_tokens_after_eos_and_padding_get_no_gradient(tiny_model_dir, model_and_tokenizer):
    """Whatever sits after the first EOS (or in the prompt padding) cannot change the loss or gradient."""
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    args = tiny_args(tiny_model_dir, beta=0.04)
    batch = rollout_batch(model, tokenizer, args)
    # Cut every completion after its 3rd token with an EOS, so there is a tail to tamper with.
    eos = tokenizer.eos_token_id
    batch["completion_ids"][:, 3] = eos
    batch["completion_mask"], _ = grpo.completion_mask_from_ids(batch["completion_ids"], [eos])
    batch["loss_mask"] = batch["completion_mask"].clone()
    batch["ref_logp"] = grpo.batch_logprobs(model, batch, args, 1.0, reference=True)

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        stats = grpo.accumulate_gradients(model, b, args, 1.0, grpo.loss_denominator(b["loss_mask"], "seq"))
        return stats["loss"], lora_grads(model)

    loss, grads = loss_and_grads(batch)
    tampered = {k: v.clone() for k, v in batch.items()}
    tampered["completion_ids"][:, 4:] = torch.randint(0, 1000, tampered["completion_ids"][:, 4:].shape)
    padded = tampered["prompt_mask"] == 0
    assert padded.any()  # the two prompts have different lengths: left padding exists
    tampered["prompt_ids"][padded] = 777  # garbage under the padding
    loss2, grads2 = loss_and_grads(tampered)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], grads2[name], rtol=1e-5, atol=1e-8), name


# -----------------------------------------------------------------------------
# The test tokenizer (tiny.qwen_like_tokenizer) stands in for Qwen2.5's wherever grpo.py relies on a tokenizer.


@pytest.mark.parametrize("source", ["tokenizer_dir", pytest.param("qwen_tokenizer_dir", marks=pytest.mark.needs_shared)])
def test_tokenizer_ends_chat_turns_with_im_end_pads_with_endoftext_and_reads_digits_one_by_one(source, request):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(source))
    endoftext, im_start, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert tokenizer.pad_token_id == endoftext
    base_model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=endoftext))  # Qwen2.5-14B's
    assert grpo.end_of_sequence_ids(base_model, tokenizer) == sorted({endoftext, im_end})  # whichever the tokenizer's EOS
    prompt = grpo.build_prompt(grpo.load_items(str(GSM8K_SAMPLE))[0], tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2  # system, user, and the open assistant turn
    assert prompt.endswith("<|im_start|>assistant\n") and tokenizer.decode(ids) == prompt
    assert len(tokenizer(" 12345", add_special_tokens=False)["input_ids"]) == 6  # a space, then one token per digit


def test_built_tokenizer_gives_exactly_the_real_qwen25_prompts(tokenizer_dir, qwen_tokenizer_dir):
    from transformers import AutoTokenizer
    built, real = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    items = grpo.load_items(str(GSM8K_SAMPLE))[:8] + [{"prompt": "Write `inc(x)`: x + 1.", "tests": "assert inc(1) == 2"}]
    for item in items:  # the chat template, its default system prompt, the math and code instructions
        assert grpo.build_prompt(item, built) == grpo.build_prompt(item, real)


# -----------------------------------------------------------------------------
# main(): real training steps, and bad input.


def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def gsm8k_head(n):
    with open(GSM8K_SAMPLE) as f:
        return [json.loads(next(f)) for _ in range(n)]


# Once more with the real Qwen2.5 tokenizer (needs_shared): its 151,680-row vocabulary and its own tokenizer class.
@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", pytest.param("qwen_model_dir", marks=pytest.mark.needs_shared)])
def test_two_training_steps_change_lora_and_leave_the_4bit_base_bit_identical(model_fixture, request, tmp_path):
    tiny_model_dir = request.getfixturevalue(model_fixture)
    data = write_jsonl(tmp_path / "gsm8k_few.jsonl", gsm8k_head(4))
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    args = tiny_args(tiny_model_dir, data=data, out_dir=str(tmp_path), run_name="two-steps", beta=0.04,
                     correct_weight=0.0, format_weight=0.0, seed=3)
    # Random rewards give non-zero advantages without a trained model (verify.py is tested on its own).
    result = run_main_with_random_rewards(args)
    model = result["model"]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    trained_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): m
                    for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    fresh_base = {n: m for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert trained_base.keys() == fresh_base.keys() and len(fresh_base) == 14  # 7 linears × 2 layers
    for name, module in fresh_base.items():
        assert torch.equal(trained_base[name].weight.data, module.weight.data), name  # packed NF4 bytes
        assert torch.equal(trained_base[name].weight.quant_state.absmax, module.weight.quant_state.absmax), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B left 0: training moved it
    assert len([m for m in result["metrics"] if "reward/mean" in m]) == 2


def run_main_with_random_rewards(args, given=None, flat_groups=False):
    """main() with uniform random rewards (non-zero advantages without a trained model). They are drawn
    from torch's global generator, which grpo.py seeds and saves in checkpoints, so runs are repeatable.
    flat_groups: each group scores all alike with probability 1/2 (zero std, for --dynamic-sampling)."""
    original = grpo.score

    def random_score(completions, items, reward_funcs, **context):
        scores = original(completions, items, reward_funcs, **context)
        scores["rewards"] = torch.rand(len(completions))
        if flat_groups:
            groups = scores["rewards"].view(-1, args.group_size)
            groups[torch.rand(len(groups)) < 0.5] = 0.5
        return scores
    grpo.score = random_score
    try:
        return grpo.main(args, given)
    finally:
        grpo.score = original


def error_of(args) -> str:
    with pytest.raises(SystemExit) as raised:
        grpo.main(args)
    message = str(raised.value.code)
    assert message.startswith("grpo.py: error: ") and "\n" not in message
    return message


def test_bad_input_gets_one_clear_line(tiny_model_dir, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", gsm8k_head(4))
    base = tiny_args(tiny_model_dir, data=good, out_dir=str(tmp_path))
    assert "does not exist" in error_of(dataclasses.replace(base, data=str(tmp_path / "missing.jsonl")))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "1"}\n{"question": "q", "answer": \n')
    assert f"{bad_json}:2: not valid JSON" in error_of(dataclasses.replace(base, data=str(bad_json)))
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"question": "q", "answer": "1"}, {"question": "q"}])
    assert f"{no_answer}:2:" in error_of(dataclasses.replace(base, data=no_answer))
    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"answer": "1"}])
    assert f"{no_prompt}:1: field \"prompt\"" in error_of(dataclasses.replace(base, data=no_prompt))
    assert "--group-size 1" in error_of(dataclasses.replace(base, group_size=1))
    assert "--micro-batch" in error_of(dataclasses.replace(base, micro_batch=0))
    assert "more than the 4 items" in error_of(dataclasses.replace(base, prompts_per_step=5))
    assert "--agg" in error_of(dataclasses.replace(base, agg="mean"))
    assert "--ratio-level" in error_of(dataclasses.replace(base, ratio_level="geometric"))
    assert "--top-entropy-quantile 0" in error_of(dataclasses.replace(base, top_entropy_quantile=0.0))
    assert "not a local model directory" in error_of(dataclasses.replace(base, model=str(tmp_path / "no-such-model")))


def fake_run(run_dir, args, step):
    """A run directory as grpo.py leaves it, with one checkpoint whose files only resume_target reads (args.json)."""
    checkpoint = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    checkpoint.mkdir(parents=True)
    for name in grpo.CHECKPOINT_FILES:
        (checkpoint / name).write_text(json.dumps(args if isinstance(args, dict) else dataclasses.asdict(args)))
    write_jsonl(Path(run_dir) / "metrics.jsonl", [{"step": s} for s in range(1, step + 1)])
    return checkpoint


# Inputs a user may well give, each refused in one line before the model loads: fields over a good tiny config
# ("{tmp}" is the test's directory, which holds latin1.jsonl, empty.jsonl, list.jsonl, spaces.jsonl and a run "old"
# that has done its 2 steps), and what the line says.
HOSTILE_INPUTS = {
    "data not UTF-8": ({"data": "{tmp}/latin1.jsonl"}, "{tmp}/latin1.jsonl:2: not UTF-8 text (byte 0xe9 at byte 18"),
    "data a directory": ({"data": "{tmp}"}, "data file {tmp} is not a readable file"),
    "eval data a directory": ({"eval_every": 1, "eval_data": "{tmp}"}, "data file {tmp} is not a readable file"),
    "data empty": ({"data": "{tmp}/empty.jsonl"}, "data file {tmp}/empty.jsonl has no items"),
    "a JSON line that is a list": ({"data": "{tmp}/list.jsonl"}, "{tmp}/list.jsonl:1: expected a JSON object, got list"),
    "a prompt of spaces": ({"data": "{tmp}/spaces.jsonl"}, "{tmp}/spaces.jsonl:1: field \"prompt\" (or \"question\") is missing"),
    "device tpu": ({"device": "tpu"}, "--device tpu: choose cpu, cuda or cuda:N"),
    "device mps": ({"device": "mps"}, "--device mps: choose cpu, cuda or cuda:N"),
    "device a GPU beyond the last": ({"device": f"cuda:{torch.cuda.device_count()}"},
                                     f"(this machine has {torch.cuda.device_count()} CUDA GPUs)"),
    "out dir a file": ({"out_dir": "{tmp}/empty.jsonl"}, "could not write {tmp}/empty.jsonl/new (Not a directory)"),
    "run name of an existing run": ({"run_name": "old"}, "{tmp}/old holds a run already: continue it with --resume {tmp}/old"),
    "resume a missing directory": ({"resume": "{tmp}/missing"}, "--resume {tmp}/missing: no checkpoint in {tmp}/missing/checkpoints"),
    "resume a file": ({"resume": "{tmp}/empty.jsonl"}, "no checkpoint in {tmp}/empty.jsonl/checkpoints"),
    "resume a checkpoint": ({"resume": "{tmp}/old/checkpoints/step_000002"}, "no checkpoint in {tmp}/old/checkpoints/step_000002/"),
    "resume a run that has done its steps": ({"resume": "{tmp}/old"}, "the run has done 2 of its --steps 2: give --steps N above 2"),
    "resume with fewer steps than done": ({"resume": "{tmp}/old", "steps": 1}, "the run has done 2 of its --steps 1"),
    "adapter missing": ({"eval_only": True, "adapter": "{tmp}/missing"}, "--adapter {tmp}/missing: evaluates a saved adapter"),
    "adapter a file": ({"eval_only": True, "adapter": "{tmp}/empty.jsonl"}, "(a directory with adapter_config.json) with --eval-only"),
    "model a file": ({"model": "{tmp}/empty.jsonl"}, "--model {tmp}/empty.jsonl: not a local model directory"),
    "seed beyond numpy's": ({"seed": 2**32}, "--seed 4294967296 is outside its valid range [0, 2147483647]"),
    "lora rank beyond the model": ({"lora_rank": 10**9}, "--lora-rank 1000000000 is more than the model's hidden size 64"),
}


@pytest.mark.parametrize("case", list(HOSTILE_INPUTS))
def test_hostile_input_is_one_line_before_the_model_loads(case, tiny_model_dir, tmp_path, monkeypatch):
    good = gsm8k_head(4)
    (tmp_path / "latin1.jsonl").write_bytes((json.dumps(good[0]) + '\n{"question": "caf\xe9", "answer": "1"}\n').encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    write_jsonl(tmp_path / "spaces.jsonl", [{"prompt": " \t ", "answer": "1"}])
    base = tiny_args(tiny_model_dir, data=write_jsonl(tmp_path / "good.jsonl", good), out_dir=str(tmp_path), run_name="new")
    fake_run(tmp_path / "old", dataclasses.replace(base, run_name="old"), step=2)
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: pytest.fail("got past the checks to the model"))
    fields, expected = HOSTILE_INPUTS[case]
    args = dataclasses.replace(base, **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()})
    assert expected.format(tmp=tmp_path) in error_of(args)
    assert not (tmp_path / "new").exists()  # nothing made for a run that never started


def test_data_with_a_byte_order_mark_or_crlf_line_ends_reads_as_plain_utf8(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", gsm8k_head(3) + [{"prompt": "Café: ½ + ½?", "answer": "1"}])
    text = open(plain, "rb").read()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    (tmp_path / "crlf.jsonl").write_bytes(text.replace(b"\n", b"\r\n"))
    items = grpo.load_items(plain)
    assert len(items) == 4 and items[3]["prompt"] == "Café: ½ + ½?"
    assert grpo.load_items(str(tmp_path / "bom.jsonl")) == items == grpo.load_items(str(tmp_path / "crlf.jsonl"))


def test_resume_takes_the_runs_saved_settings_and_the_flags_given_over_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    saved = dataclasses.asdict(dataclasses.replace(grpo.Args(), model="m", lr=0.01, steps=5, report_to="tensorboard",
                                                   top_entropy_quantile=0.2, run_name="run", out_dir=str(tmp_path)))
    del saved["top_entropy_quantile"]  # a run from before this setting existed: it takes today's default
    checkpoint = str(fake_run(run_dir, saved, step=2))
    # The command line: a flag it names is given, even at Args' default (--lr 1e-05).
    flags = grpo.command_line(["--resume", str(run_dir), "--lr", "1e-05", "--steps", "9"])
    path, args = grpo.resume_target(grpo.Args(**flags), flags)
    assert path == checkpoint and (args.model, args.lr, args.steps, args.report_to) == ("m", 1e-05, 9, "tensorboard")
    assert args.top_entropy_quantile == 1.0 and os.path.join(args.out_dir, args.run_name) == str(run_dir)
    assert capsys.readouterr().out == (f"resuming {checkpoint} with the run's saved settings; overridden: "
                                       "--steps 9 (saved 5), --lr 1e-05 (saved 0.01)\n")
    # From Python, a field at Args' default cannot be told from one left out: it keeps the run's value.
    assert grpo.resume_target(grpo.Args(resume=str(run_dir), lr=1e-5, steps=9))[1].lr == 0.01
    capsys.readouterr()
    grpo.resume_target(grpo.Args(resume=str(run_dir)), {"resume"})  # --resume alone: nothing overridden
    assert capsys.readouterr().out == f"resuming {checkpoint} with the run's saved settings\n"
    # --run-name: the run continues in a new directory (a branch); --eval-only: evaluates the newest checkpoint.
    branch = grpo.resume_target(grpo.Args(resume=str(run_dir), run_name="branch"))[1]
    assert (branch.out_dir, branch.run_name, branch.steps) == (str(tmp_path), "branch", 5)
    assert grpo.resume_target(grpo.Args(resume=str(run_dir), eval_only=True))[1].adapter == checkpoint
    message = str(pytest.raises(SystemExit, grpo.resume_target, grpo.Args(resume=str(run_dir), model="other")).value.code)
    assert message == "grpo.py: error: --resume: the run was made with a different config: --model 'm' (checkpoint) vs " \
                      "'other' (now) (leave these out to continue it)"


def test_a_14b_model_on_a_machine_without_gpu_is_refused_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model_dir = tmp_path / "qwen2.5-14b"  # config only, no weights: anything that tried to load would fail
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes(QWEN_14B_CONFIG.read_bytes())
    data = write_jsonl(tmp_path / "d.jsonl", gsm8k_head(2))
    message = error_of(grpo.Args(model=str(model_dir), data=data, eval_every=0, out_dir=str(tmp_path), prompts_per_step=2))
    assert "14.8B parameters" in message and "no GPU" in message and "tiny.py" in message


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    process = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--data", str(tmp_path / "nope.jsonl"),
                              "--eval-every", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert process.returncode != 0
    assert process.stderr.strip().splitlines() == [f"grpo.py: error: data file {tmp_path / 'nope.jsonl'} does not exist"]


def test_cli_is_generated_from_args():
    args = grpo.parse_args(["--group-size", "4", "--no-scale-advantages", "--beta", "0", "--agg", "token"])
    assert (args.group_size, args.scale_advantages, args.beta, args.agg) == (4, False, 0.0, "token")
    assert grpo.parse_args([]) == grpo.Args()


def test_help_is_grouped_shows_choices_and_examples_and_no_empty_default():
    process = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0
    text = process.stdout
    assert "(default: )" not in text and "(default: None)" not in text
    for group in ("run and logging:", "model and QLoRA:", "rollout:", "reward:", "loss:", "optimization:"):
        assert f"\n{group}\n" in text, group
    assert "--agg {seq,token,dr_grpo}" in text and "--overlong {keep,mask,penalty}" in text
    assert "examples:\n  python grpo.py --data data/gsm8k.jsonl" in text
    assert "--lora-rank, --lora-alpha" in text  # --resume names the flags that must match the run's
    # Every field is in some group, under its own flag, in Args' order.
    positions = [text.index(f"  --{f.name.replace('_', '-')}") for f in dataclasses.fields(grpo.Args)]
    assert positions == sorted(positions)


@pytest.mark.parametrize("argv,expected", [
    (["--agg", "mean"], "argument --agg: invalid choice: 'mean'"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_a_bad_flag_or_choice_on_the_command_line_is_one_line(argv, expected):
    process = subprocess.run([sys.executable, str(ROOT / "grpo.py"), *argv], capture_output=True, text=True, timeout=120)
    assert process.returncode != 0 and process.stdout == ""
    assert process.stderr.splitlines() == [process.stderr.strip()] and expected in process.stderr


# Values a user may well type, each outside what its flag can mean.
OUT_OF_RANGE = [("lr", -1.0), ("lr", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("temperature", 0.0),
                ("temperature", -0.7), ("temperature_end", -1.0), ("group_size", 1), ("prompts_per_step", 0),
                ("max_new_tokens", 0), ("lora_rank", 0), ("lora_dropout", 1.0), ("beta", -0.1), ("clip_low", 1.0),
                ("clip_high", -0.2), ("top_entropy_quantile", 0.0), ("num_iterations", 0), ("micro_batch", 0),
                ("micro_batch_tokens", -5), ("warmup_steps", -1), ("max_grad_norm", float("inf")),
                ("weight_decay", -0.01), ("keep_last", 0), ("eval_n", -1), ("code_timeout", 0.0), ("reward_workers", 0),
                ("logprob_memory_mb", 0), ("generation_chunk", -1), ("seed", -3), ("correct_weight", float("inf")),
                ("overlong_penalty", -1.0), ("max_bad_steps", 0), ("steps", 0)]


@pytest.mark.parametrize("name,value", OUT_OF_RANGE)
def test_every_out_of_range_number_is_refused_in_one_line_before_anything_loads(name, value, monkeypatch):
    monkeypatch.setattr(grpo, "init_distributed", lambda args: pytest.fail("got past the checks"))
    args = dataclasses.replace(grpo.Args(), **{name: value})
    with pytest.raises(SystemExit) as raised:
        grpo.main(args)
    message = str(raised.value.code)
    assert message.startswith(f"grpo.py: error: --{name.replace('_', '-')} {value} ") and "\n" not in message


def test_every_numeric_flag_has_a_valid_range_and_its_default_is_inside_it():
    for f in dataclasses.fields(grpo.Args):
        if f.type in (int, float, "int", "float"):
            assert f.metadata["valid"], f"--{f.name} has no valid range"
            assert grpo.in_interval(f.default, f.metadata["valid"]), f.name
        if f.metadata["choices"]:
            assert f.default in f.metadata["choices"], f.name
    # The interval reading, by hand.
    assert grpo.in_interval(1, "[1, inf)") and not grpo.in_interval(1, "(1, inf)")
    assert grpo.in_interval(1.0, "(0, 1]") and not grpo.in_interval(1.0, "(0, 1)") and not grpo.in_interval(0, "(0, 1]")
    assert not grpo.in_interval(float("inf"), "(-inf, inf)") and not grpo.in_interval(float("nan"), "(-inf, inf)")


def test_import_does_not_load_a_model_or_read_argv():
    code = "import sys; sys.argv = ['x', '--bogus']; import grpo; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False"


# -----------------------------------------------------------------------------
# Operations: schedules, variants, checkpoints, resume, faults, logging.


def test_temperature_anneals_linearly_and_lr_warms_up_then_follows_cosine():
    args = grpo.Args(steps=5, temperature=1.2, temperature_end=0.4, warmup_steps=2, lr_schedule="cosine")
    assert [grpo.temperature_at(s, args) for s in range(5)] == pytest.approx([1.2, 1.0, 0.8, 0.6, 0.4])
    assert grpo.temperature_at(3, dataclasses.replace(args, temperature_end=0)) == 1.2
    factors = [grpo.lr_factor(s, args) for s in range(5)]
    # warmup: 1/2, 2/2; then cosine over the remaining 3 steps: progress 0, 1/3, 2/3
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))])
    constant = dataclasses.replace(args, lr_schedule="constant")
    assert [grpo.lr_factor(s, constant) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_data_indices_cover_each_epoch_once_and_depend_only_on_the_position():
    seen = [i for step in range(5) for i in grpo.data_indices(2 * step, 2, 10, seed=7)]
    assert sorted(seen) == list(range(10))  # one epoch = 5 steps of 2, every item once
    assert grpo.data_indices(6, 2, 10, seed=7) == seen[6:8] and grpo.data_indices(5, 3, 10, seed=7) == seen[5:8]
    assert grpo.data_indices(10, 2, 10, seed=7) != grpo.data_indices(0, 2, 10, seed=7)  # a new order next epoch


@pytest.fixture
def gsm8k_few(tmp_path):
    return write_jsonl(tmp_path / "gsm8k_few.jsonl", gsm8k_head(6))


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_resume_continues_exactly(tiny_model_dir, gsm8k_few, tmp_path):
    """N steps straight == k steps, then --resume for the remaining N - k (same adapter weights)."""
    common = dict(data=gsm8k_few, out_dir=str(tmp_path), lr_schedule="constant", beta=0.04, save_every=1,
                  temperature=1.3, top_p=0.9)
    straight = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="straight", steps=3, **common))
    first = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="split", steps=1, **common))
    resumed = run_main_with_random_rewards(tiny_args(tiny_model_dir, steps=3, resume=str(tmp_path / "split"), **common))
    a, b = adapter_tensors(straight["model"]), adapter_tensors(resumed["model"])
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[n], adapter_tensors(first["model"])[n]) for n in a)  # steps 2-3 did change them
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [m["step"] for m in resumed["metrics"]] == [2, 3]


def test_checkpoint_is_a_standard_peft_adapter_and_keeps_the_last_k(tiny_model_dir, gsm8k_few, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="ckpt", steps=3, save_every=1,
                     keep_last=2)
    result = run_main_with_random_rewards(args)
    checkpoints = sorted(os.listdir(tmp_path / "ckpt" / "checkpoints"))
    assert checkpoints == ["step_000002", "step_000003"]
    for name in grpo.CHECKPOINT_FILES:
        assert (tmp_path / "ckpt" / "checkpoints" / "step_000003" / name).is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the standard way to use the adapter
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "ckpt" / "checkpoints" / "step_000003"))
    trained = adapter_tensors(result["model"])
    reloaded = {n: p for n, p in adapter_tensors(loaded).items()}
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[n], reloaded[n]) for n in trained)
    # The run directory has what a user reads.
    records = [json.loads(l) for l in open(tmp_path / "ckpt" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss/kl" in r and "reward/mean" in r for r in records)
    samples = [json.loads(l) for l in open(tmp_path / "ckpt" / "samples.jsonl")]
    assert len(samples) == 3 * args.samples_per_step and {"prompt", "completion", "reward", "advantage"} <= samples[0].keys()
    assert json.load(open(tmp_path / "ckpt" / "args.json"))["steps"] == 3


@pytest.fixture
def saved_run(tiny_model_dir, gsm8k_few, tmp_path):
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="run", steps=2, save_every=1)
    run_main_with_random_rewards(args)
    return args, tmp_path / "run"


def resume_args(args, run_dir, **overrides):
    return dataclasses.replace(args, resume=str(run_dir), steps=3, **overrides)


def test_partial_or_corrupt_checkpoints_are_refused_clearly(saved_run):
    args, run_dir = saved_run
    latest = run_dir / "checkpoints" / "step_000002"
    (latest / "trainer_state.pt").rename(run_dir / "moved.pt")
    assert "is incomplete (missing trainer_state.pt)" in error_of(resume_args(args, run_dir))
    (run_dir / "moved.pt").rename(latest / "trainer_state.pt")
    adapter = latest / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])  # a torn write
    assert f"checkpoint {latest} is corrupt" in error_of(resume_args(args, run_dir))


def test_resume_with_an_incompatible_config_is_refused(saved_run):
    args, run_dir = saved_run
    message = error_of(resume_args(args, run_dir, lora_rank=4, group_size=3))
    assert "--lora-rank 16 (checkpoint) vs 4 (now)" in message and "--group-size" in message
    assert "no checkpoint" in error_of(resume_args(args, run_dir.parent / "elsewhere"))


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint_loadable(saved_run, monkeypatch):
    args, run_dir = saved_run
    real_save = torch.save

    def crash(obj, path, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            assert (run_dir / "checkpoints" / "step_000003.tmp" / "adapter_model.safetensors").is_file()
            raise KeyboardInterrupt("a second Ctrl-C during the save")  # after the adapter was written
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        run_main_with_random_rewards(resume_args(args, run_dir))
    monkeypatch.setattr(torch, "save", real_save)
    assert not (run_dir / "checkpoints" / "step_000003.tmp").exists()  # the torn save is removed
    assert grpo.checkpoint_names(str(run_dir)) == ["step_000001", "step_000002"]
    (run_dir / "checkpoints" / "step_000003.tmp").mkdir()  # as a process killed mid-save leaves it: never picked up
    resumed = run_main_with_random_rewards(resume_args(args, run_dir))
    assert [m["step"] for m in resumed["metrics"]] == [3]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000001", "step_000002", "step_000003"]
    assert logged_steps(run_dir / "metrics.jsonl") == [1, 2, 3]  # step 3's record of the interrupted run: dropped


def logged_steps(path):
    return [json.loads(line)["step"] for line in open(path)]


def command_line_args(args: grpo.Args) -> list:
    """The command line that gives every field of args, as a user retyping the whole command would."""
    argv = []
    for f in dataclasses.fields(grpo.Args):
        value = getattr(args, f.name)
        if isinstance(value, bool):
            argv += [grpo.flag(f.name) if value else "--no-" + f.name.replace("_", "-")]
        else:  # a tuple (--reward): the flag once per element
            argv += [part for element in (value if isinstance(value, tuple) else [value])
                     for part in (grpo.flag(f.name), str(element))]
    return argv


def run_command_line(argv):
    """main() as `python grpo.py ARGV` calls it (the flags given are the command line's), with random rewards."""
    flags = grpo.command_line(argv)
    return run_main_with_random_rewards(grpo.Args(**flags), given=flags)


def checkpoint_contents(checkpoint):
    from safetensors.torch import load_file
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    optimizer = [(key, tensor) for moments in state["optimizer"]["state"].values() for key, tensor in moments.items()]
    return load_file(checkpoint / "adapter_model.safetensors"), optimizer, state["scheduler"], state["rng"]


def test_resume_from_the_run_directory_alone_equals_retyping_the_whole_command_bit_for_bit(tiny_model_dir, gsm8k_few,
                                                                                           tmp_path):
    """A run killed after step 2 was logged but before it was saved, continued with `--resume RUN_DIR` alone and
    with the whole original command + --resume: the same adapter, optimizer state, RNG state and metrics, equal to
    the run that was never interrupted, and each step logged once."""
    import shutil
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="straight", steps=2, save_every=1,
                     lr_schedule="constant", temperature=1.3, top_p=0.9)
    run_main_with_random_rewards(args)
    for name in ("alone", "retyped"):
        shutil.copytree(tmp_path / "straight", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step_000002")  # killed before step 2's save
    run_command_line(["--resume", str(tmp_path / "alone")])
    run_command_line(command_line_args(dataclasses.replace(args, run_name="retyped")) + ["--resume", str(tmp_path / "retyped")])
    timings = ("time/", "throughput/", "memory/")
    runs = {}
    for name in ("straight", "alone", "retyped"):
        adapter, optimizer, scheduler, rng = checkpoint_contents(tmp_path / name / "checkpoints" / "step_000002")
        metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith(timings)}
                   for line in open(tmp_path / name / "metrics.jsonl")]
        runs[name] = adapter, optimizer, scheduler, metrics, rng
    for name in ("alone", "retyped"):
        adapter, optimizer, scheduler, metrics, rng = runs[name]
        assert adapter.keys() == runs["straight"][0].keys() and all(torch.equal(t, runs["straight"][0][k]) for k, t in adapter.items())
        assert [k for k, _ in optimizer] == [k for k, _ in runs["straight"][1]] and len(optimizer) > 0
        assert all(torch.equal(t, u) for (_, t), (_, u) in zip(optimizer, runs["straight"][1])), name
        assert scheduler == runs["straight"][2] and metrics == runs["straight"][3], name
        assert all(torch.equal(a["torch"], b["torch"]) for a, b in zip(rng, runs["straight"][4]))
        assert [m["step"] for m in metrics] == [1, 2] and len(logged_steps(tmp_path / name / "samples.jsonl")) == 2 * 4


def test_non_finite_loss_skips_updates_then_stops_with_the_last_good_checkpoint(tiny_model_dir, gsm8k_few, tmp_path,
                                                                                 monkeypatch, capsys):
    real_loss = grpo.grpo_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, stats = real_loss(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 1 else loss), stats  # step 1 fine, then NaN
    monkeypatch.setattr(grpo, "grpo_loss", poisoned)
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="nan", steps=10, save_every=1,
                     max_bad_steps=3)
    with pytest.raises(SystemExit) as raised:
        run_main_with_random_rewards(args)
    assert "3 non-finite steps in a row" in str(raised.value.code)
    assert capsys.readouterr().out.count("non-finite loss or gradient, update skipped") == 3
    # Steps 2 and 3 were skipped but saved (their adapters are the good ones of step 1); step 4 stopped the run.
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == ["step_000001", "step_000002", "step_000003"]
    from safetensors.torch import load_file
    first = load_file(tmp_path / "nan" / "checkpoints" / "step_000001" / "adapter_model.safetensors")
    last = load_file(tmp_path / "nan" / "checkpoints" / "step_000003" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() and torch.equal(t, last[n]) for n, t in first.items())  # no update after step 1


def exact_sampling_probabilities(logits, temperature, top_p):
    """float64 softmax(logits / T), then nucleus truncation the slow, obvious way: walk the tokens from
    the most probable down and keep them until the kept mass reaches top_p; renormalise."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        kept, mass = torch.zeros_like(probs), 0.0
        for token in torch.argsort(probs, descending=True).tolist():
            kept[token] = probs[token]
            mass += float(probs[token])
            if mass >= top_p:
                break
        probs = kept / kept.sum()
    return probs


def chi_square_fits(counts, probs, draws):
    """Pearson's chi-square of the counts against probs (bins of expected count < 5 pooled into one),
    compared with mean + 5 standard deviations of its chi-square distribution (k - 1 dof)."""
    expected = probs * draws
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].sum().double()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    return statistic, dof, statistic < dof + 5 * math.sqrt(2 * dof)


@pytest.mark.parametrize("method", ["inverse_cdf", "multinomial"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9), (1.0, 0.5)])
def test_token_sampler_draws_the_exact_tempered_nucleus_distribution_and_records_its_logprobs(temperature, top_p,
                                                                                              method, monkeypatch):
    """200,000 draws over a 100-token vocabulary in blocks of 16 (six full blocks and a tail of four, so
    both levels of the inverse-CDF draw and the tail are exercised): the counts fit the float64 probabilities,
    tokens outside the nucleus are never drawn, and each recorded log-prob is the float64 log-probability of
    the token drawn."""
    monkeypatch.setattr(grpo, "INVERSE_CDF_BLOCK", 16)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(100, generator=generator) * 2.0  # [V], no ties
    probs = exact_sampling_probabilities(logits, temperature, top_p)
    record = []
    sample = grpo.token_sampler(temperature, top_p, method, record)
    torch.manual_seed(0)
    counts = torch.zeros(100, dtype=torch.long)
    for _ in range(4):  # 4 calls of 50,000 rows: the draws of separate calls must be independent too
        scores = sample(None, logits.repeat(50_000, 1))  # [rows, V]: 0 at the drawn token, -inf elsewhere
        assert (scores == 0).sum(dim=1).eq(1).all() and torch.isinf(scores).sum() == scores.numel() - 50_000
        counts += torch.bincount(scores.argmax(dim=1), minlength=100)
        assert record[-1].shape == (50_000,) and record[-1].dtype == torch.float32  # [n] per step, nothing [n, V]
        assert (record[-1].double() - probs.log()[scores.argmax(dim=1)]).abs().max() < 2e-6
    assert counts[probs == 0].sum() == 0
    statistic, dof, fits = chi_square_fits(counts, probs, 200_000)
    assert fits, f"chi-square {statistic:.1f} with {dof} dof"
    assert 0.5 * float((counts / 200_000 - probs).abs().sum()) < 0.01  # total variation


def test_token_sampler_multinomial_draws_the_tokens_of_generates_own_sampling(tiny_model_dir, model_and_tokenizer):
    # The GPU path (and --cpu-sampler multinomial): greedy generate + token_sampler must be generate's own
    # sampling, draw for draw, from the same seed (temperature, top-p, a row ending at EOS). At temperature 0.05 the
    # nucleus is a few tokens: applying top-p and temperature in the other order would draw outside it.
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)
    args = tiny_args(tiny_model_dir, max_new_tokens=10, top_p=0.9, cpu_sampler="multinomial")
    prompts = ["What is 2 + 3?", "Name a colour, any colour you like, and say why.", "Count: 1, 2, 3"]
    eos_ids = grpo.end_of_sequence_ids(model, tokenizer)
    torch.manual_seed(0)
    ours = grpo.generate(model, tokenizer, prompts, args, eos_ids, temperature=0.05)
    stop = int(ours["completion_ids"][0, 3])  # row 0 now ends at this token's first place (at the latest its 4th)
    eos_ids, ends = eos_ids + [stop], int((ours["completion_ids"][0] == stop).nonzero()[0]) + 1
    torch.manual_seed(0)
    ours = grpo.generate(model, tokenizer, prompts, args, eos_ids, temperature=0.05)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    theirs = model.generate(**encoded, do_sample=True, temperature=0.05, top_p=0.9, top_k=0, max_new_tokens=10,
                            eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)[:, encoded["input_ids"].shape[1]:]
    assert torch.equal(ours["completion_ids"], theirs) and ours["completion_mask"][0].sum() == ends
    assert ours["completion_mask"][1:].sum() > ends  # the other rows go on


def float64_sampler_logprobs(dense64, rollout, temperature, top_p):
    """log π_sampler of every sampled token, recomputed independently: a float64 copy of the policy over each
    whole sequence (no KV cache), logits / T in float64, the nucleus by a descending sort, one token at a time."""
    ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], 1)
    attention = torch.cat([rollout["prompt_mask"], torch.ones_like(rollout["completion_ids"])], 1)
    with torch.no_grad():
        logits = dense64(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits
    P = rollout["prompt_ids"].shape[1]
    expected = torch.zeros(rollout["completion_ids"].shape, dtype=torch.float64)
    for i, t in rollout["completion_mask"].nonzero().tolist():
        probs, token = torch.softmax(logits[i, P - 1 + t] / temperature, dim=0), int(rollout["completion_ids"][i, t])  # [V]
        if top_p < 1:  # keep the most probable tokens up to the one whose cumulative probability reaches top_p
            order = torch.argsort(probs, descending=True)
            kept = torch.zeros_like(probs).index_fill_(0, order[: int((torch.cumsum(probs[order], 0) < top_p).sum()) + 1], 1)
            probs = probs * kept / (probs * kept).sum()
        expected[i, t] = math.log(probs[token])  # -inf for a token outside the nucleus
    return expected


def test_generate_records_the_samplers_logprobs_for_both_samplers_and_every_cpu_sampler(tiny_model_dir,
                                                                                        model_and_tokenizer):
    # sampler_logp against a float64 recomputation, for the 4-bit + LoRA policy and the merged dense copy, each with
    # both CPU draws, each draw with and without temperature and top-p; prompts of different lengths (left padding),
    # two chunks, and a row that ends early: right-padded with 0 after each completion's end, like completion_mask.
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)
    dense = grpo.build_generation_model(model)
    dense64 = grpo.build_generation_model(model).double()
    prompts = ["What is 2 + 3?", "Name a colour, any colour you like, and say why.", "Count: 1, 2, 3", "Hi"]
    eos_ids = grpo.end_of_sequence_ids(model, tokenizer)
    cases = [(model, "inverse_cdf", 1.0, 1.0), (model, "multinomial", 0.05, 0.9), (dense, "inverse_cdf", 0.05, 0.9),
             (dense, "multinomial", 1.0, 1.0)]
    for number, (sampler, cpu_sampler, temperature, top_p) in enumerate(cases):
        args = tiny_args(tiny_model_dir, max_new_tokens=10, top_p=top_p, cpu_sampler=cpu_sampler, generation_chunk=3)
        torch.manual_seed(0)
        rollout = first = grpo.generate(sampler, tokenizer, prompts, args, eos_ids, temperature=temperature)
        if number == 0:  # again, with row 0 ending while rows 1, 2 go on, and row 3 (alone in chunk 2) ending early
            torch.manual_seed(0)
            stops = [int(first["completion_ids"][0, 5]), int(first["completion_ids"][3, 3])]
            rollout = grpo.generate(sampler, tokenizer, prompts, args, eos_ids + stops, temperature=temperature)
            ends = [int(torch.isin(row, torch.tensor(stops)).int().argmax()) + 1 if torch.isin(row, torch.tensor(stops)).any()
                    else 10 for row in first["completion_ids"]]  # each row up to its first stop token
            assert rollout["completion_mask"].sum(1).tolist() == ends and ends[0] <= 6 and ends[3] <= 4 and 10 in ends[1:3]
        recorded, mask = rollout["sampler_logp"], rollout["completion_mask"].bool()
        assert recorded.dtype == torch.float32 and recorded.shape == rollout["completion_ids"].shape
        assert torch.equal(recorded[~mask], torch.zeros(int((~mask).sum())))
        expected = float64_sampler_logprobs(dense64, rollout, temperature, top_p)
        assert (recorded.double() - expected)[mask].abs().max() < 1e-4, (number, float((recorded.double() - expected)[mask].abs().max()))
        assert expected[mask].std() > 0.1  # log-probs worth comparing: not all one value


@pytest.mark.parametrize("cpu_sampler", ["inverse_cdf", "multinomial"])
def test_generate_on_cpu_samples_the_models_own_first_token_distribution(tiny_model_dir, model_and_tokenizer,
                                                                         cpu_sampler):
    """Through generate: 1,024 one-token completions of one prompt fit softmax(model logits / T) with
    top-p. A low temperature concentrates the tiny random model's near-uniform logits on a few tokens."""
    model, tokenizer = model_and_tokenizer
    args = tiny_args(tiny_model_dir, max_new_tokens=1, generation_chunk=256, top_p=0.95, cpu_sampler=cpu_sampler)
    temperature = 0.03  # 15 tokens above 1e-3 at the 1,040-row vocabulary (0.02 gave 18 at Qwen2.5's 151,680)
    prompt = grpo.build_prompt({"prompt": "What is 2 + 3?", "answer": "5"}, tokenizer)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()  # [V]
    probs = exact_sampling_probabilities(logits, temperature, args.top_p)
    assert 5 <= int((probs > 1e-3).sum()) <= 200  # a distribution worth testing: neither one token nor flat
    torch.manual_seed(0)
    drawn = grpo.generate(model, tokenizer, [prompt] * 1024, args, eos_ids=[], temperature=temperature)["completion_ids"][:, 0]
    counts = torch.bincount(drawn, minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    statistic, dof, fits = chi_square_fits(counts, probs, 1024)
    assert fits, f"chi-square {statistic:.1f} with {dof} dof"


def test_generate_draws_a_progress_bar_only_on_a_terminal(tiny_model_dir, model_and_tokenizer, monkeypatch, capsys):
    import io
    model, tokenizer = model_and_tokenizer
    args = tiny_args(tiny_model_dir, max_new_tokens=5, generation_chunk=2)
    prompts = ["What is 2 + 3?"] * 3  # two chunks: 2 + 1 sequences, 5 decode steps each
    grpo.generate(model, tokenizer, prompts, args, eos_ids=[], temperature=1.0, progress="step 1 generate")
    err = capsys.readouterr().err
    assert "step 1 generate" not in err and "%|" not in err  # captured output is not a terminal: no bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    grpo.generate(model, tokenizer, prompts, args, eos_ids=[], temperature=1.0, progress="step 1 generate")
    drawn = terminal.getvalue()
    assert "step 1 generate" in drawn and "10/10" in drawn  # every decode step of both chunks was ticked
    terminal.truncate(0)
    grpo.generate(model, tokenizer, prompts, args, eos_ids=[], temperature=1.0)  # no label: no bar
    assert terminal.getvalue().strip("\x00") == ""


def test_generation_out_of_memory_halves_the_chunk_and_carries_on(tiny_model_dir, model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    real_generate = model.generate
    sizes = []

    def generate_with_small_memory(*a, **k):  # the real generate, with a memory limit at 2 sequences
        sizes.append(k["input_ids"].shape[0])
        if k["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(*a, **k)
    model.generate = generate_with_small_memory
    args = tiny_args(tiny_model_dir, generation_chunk=8, max_new_tokens=4)
    out = grpo.generate(model, tokenizer, ["a b c"] * 6, args, grpo.end_of_sequence_ids(model, tokenizer), 1.0)
    assert out["completion_ids"].shape[0] == 6 and sizes == [6, 4, 2, 2, 2]
    assert "halving the generation chunk to 2" in capsys.readouterr().out


def run_main_with_memory_limit(monkeypatch, args, limit, grad_only=False):
    """main() with random rewards on a model whose forward "runs out of memory" above `limit` sequences."""
    real_load_model = grpo.load_model
    records = []

    def load_model_with_limit(*a, **k):
        model, tokenizer = real_load_model(*a, **k)
        records.append(limit_forward_batch(model, limit, grad_only)[0])
        return model, tokenizer
    monkeypatch.setattr(grpo, "load_model", load_model_with_limit)
    result = run_main_with_random_rewards(args)
    monkeypatch.setattr(grpo, "load_model", real_load_model)
    return result, records[0]


def test_out_of_memory_in_training_recovers_to_the_adapter_of_a_run_without_it(tiny_model_dir, gsm8k_few, tmp_path,
                                                                               monkeypatch, capsys):
    common = dict(data=gsm8k_few, out_dir=str(tmp_path), steps=2, beta=0.04, max_new_tokens=6, lr=1e-3, seed=4)
    # 8 sequences per step; more than 4 in a forward "do not fit": the first (reference) pass fails, halves to 4.
    recovered, record = run_main_with_memory_limit(monkeypatch, tiny_args(tiny_model_dir, run_name="oom", **common), 4)
    assert record["raised"] == 1 and "out of memory in the reference pass: halved to --micro-batch 4" in capsys.readouterr().out
    assert [m["batch/micro_batch"] for m in recovered["metrics"]] == [4, 4]  # kept for the rest of the run
    # A run that used 4 from the start did exactly the same computations: bit-identical adapters.
    at_four = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="four", micro_batch=4, **common))
    # The run that never ran out (8 per forward) sums the same terms in another order: equal to float32 rounding,
    # which Adam magnifies where a gradient element is near its eps (it divides each element by its own size).
    at_eight = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="eight", **common))
    a, four, eight = (adapter_tensors(r["model"]) for r in (recovered, at_four, at_eight))
    start = adapter_tensors(grpo.load_model(tiny_args(tiny_model_dir), torch.device("cpu"))[0])
    for name in a:
        assert torch.equal(a[name], four[name]), name
        moved = float((eight[name] - start[name]).abs().max())  # what 2 optimizer steps did to this tensor
        assert float((a[name] - eight[name]).abs().max()) <= 1e-2 * moved, name
    assert any(not torch.equal(a[n], start[n]) for n in a)


def test_a_sequence_that_does_not_fit_alone_stops_with_its_length_after_saving(tiny_model_dir, gsm8k_few, tmp_path,
                                                                               monkeypatch):
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="too-long", steps=3,
                     micro_batch_tokens=10**6)
    real_accumulate = grpo.accumulate_gradients
    calls = {"n": 0}

    def accumulate_out_of_memory_from_step_2(*a, **k):  # step 1 fits; from step 2 on, not even one sequence does
        calls["n"] += 1
        return real_accumulate(*a, **k)
    monkeypatch.setattr(grpo, "accumulate_gradients", accumulate_out_of_memory_from_step_2)
    real_load_model = grpo.load_model

    def load_model_with_limit(*a, **k):
        model, tokenizer = real_load_model(*a, **k)

        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled() and calls["n"] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        model.get_base_model().get_decoder().layers[0].register_forward_hook(hook)
        return model, tokenizer
    monkeypatch.setattr(grpo, "load_model", load_model_with_limit)
    message = error_of_main_with_random_rewards(args)
    assert "out of memory in the policy forward/backward with one sequence per micro-batch" in message
    assert "lower --max-new-tokens" in message
    longest = int(message.split("the longest: ")[1].split(" tokens")[0])
    assert longest > 12 and calls["n"] > 2  # prompt + completion; it halved (and retried) before giving up
    assert os.listdir(tmp_path / "too-long" / "checkpoints") == ["step_000001"]  # the finished step is saved


def error_of_main_with_random_rewards(args) -> str:
    with pytest.raises(SystemExit) as raised:
        run_main_with_random_rewards(args)
    message = str(raised.value.code)
    assert message.startswith("grpo.py: error: ") and "\n" not in message
    return message


def test_variants_drop_zero_std_groups_and_mask_or_penalise_truncation(tiny_model_dir, gsm8k_few, tmp_path):
    common = dict(data=gsm8k_few, out_dir=str(tmp_path), steps=1, max_new_tokens=4, seed=5)
    # A random model never says EOS within 4 tokens: every completion is truncated.
    masked = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="mask", overlong="mask", **common))
    assert masked["metrics"][0]["completions/truncated_frac"] == 1.0
    assert masked["metrics"][0]["loss/trained_tokens"] == 0
    kept = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="keep", **common))
    penalised = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="pen", overlong="penalty",
                                                       overlong_penalty=0.5, **common))
    assert penalised["metrics"][0]["reward/mean"] == pytest.approx(kept["metrics"][0]["reward/mean"] - 0.5)
    assert kept["metrics"][0]["loss/trained_tokens"] == 2 * 4 * 4
    # Dynamic sampling: real (all-zero) rewards from the untrained model -> every group has zero std.
    dropped = grpo.main(tiny_args(tiny_model_dir, run_name="drop", drop_zero_std_groups=True, **common))
    assert dropped["metrics"][0]["groups/dropped"] == 2 and dropped["metrics"][0]["loss/trained_tokens"] == 0
    # --dynamic-sampling there: every round finds nothing, so 1 + 2 rounds of the missing 2 prompts, and nothing trains.
    refilled = grpo.main(tiny_args(tiny_model_dir, run_name="refill", dynamic_sampling=True, max_refill_rounds=2, **common))
    record = refilled["metrics"][0]
    assert (record["groups/rounds"], record["groups/sampled"], record["groups/kept"], record["loss/trained_tokens"]) == (3, 6, 0, 0)
    # GSPO with μ = 2 and high-entropy tokens: the second update's sequence ratios moved off 1 (old pass used).
    gspo = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="gspo", ratio_level="sequence",
                                                  num_iterations=2, top_entropy_quantile=0.3, **common))
    record = gspo["metrics"][0]
    assert record["loss/ratio_mean"] != pytest.approx(1.0, abs=1e-6) and record["loss/trained_tokens"] == 2 * 4 * 4
    vocab_size = gspo["model"].config.vocab_size
    assert 0 < record["policy/entropy"] <= math.log(vocab_size) and kept["metrics"][0]["policy/entropy"] > 0


def test_eval_only_reports_strict_lenient_and_format_and_plot_draws_a_png(saved_run, capsys):
    pytest.importorskip("matplotlib")
    args, run_dir = saved_run
    evaluation = dataclasses.replace(args, eval_only=True, eval_data=args.data, eval_n=3,
                                     adapter=str(run_dir / "checkpoints" / "step_000002"))
    result = grpo.main(evaluation)["metrics"][0]
    assert result["eval/n"] == 3 and {"eval/accuracy_strict", "eval/accuracy_lenient", "eval/format_rate"} <= result.keys()
    assert "eval/accuracy_strict" in capsys.readouterr().out
    # --resume RUN_DIR --eval-only: the run's newest checkpoint, with the run's own model and settings.
    from safetensors.torch import load_file
    evaluated = grpo.main(grpo.Args(resume=str(run_dir), eval_only=True, eval_data=args.data, eval_n=3))
    assert evaluated["metrics"][0] == result
    saved = load_file(run_dir / "checkpoints" / "step_000002" / "adapter_model.safetensors")
    loaded = {n.replace(".default", ""): p for n, p in adapter_tensors(evaluated["model"]).items()}
    assert loaded.keys() == saved.keys() and all(torch.equal(p, saved[n]) for n, p in loaded.items())
    grpo.main(grpo.Args(plot=str(run_dir)))
    assert (run_dir / "metrics.png").stat().st_size > 1000


def test_plot_draws_only_the_panels_that_have_data(tmp_path):
    pytest.importorskip("matplotlib")
    step = {"reward/mean": 0.5, "reward/std": 0.1, "reward/correct": 0.25, "reward/correct/std": 0.4,
            "reward/countdown": 0.125, "completions/mean_length": 9.0, "loss/kl": 0.01}
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, **step}, {"step": 2, **step}])
    assert grpo.main(grpo.Args(plot=str(tmp_path))) == ["reward/mean", "reward/correct", "reward/countdown",
                                                        "completions/mean_length", "loss/kl"]  # a panel per reward; no eval
    append = [{"step": 2, "eval/accuracy_strict": 0.5}]
    grpo.append_jsonl(tmp_path / "metrics.jsonl", append)
    assert "eval/accuracy_strict" in grpo.main(grpo.Args(plot=str(tmp_path)))
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_known_harmless_warnings_are_silenced_and_nothing_else(tiny_model_dir, caplog):
    import logging
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grpo.load_model(tiny_args(tiny_model_dir), torch.device("cpu"))  # peft reads is_gradient_checkpointing
        bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        with caplog.at_level(logging.WARNING, logger=bnb_logger.name):
            bnb_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
            bnb_logger.warning("some other bitsandbytes warning")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught if w.category is FutureWarning] == ["another deprecation"]
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def read_wandb_records(path):
    """The records of an offline W&B run file (run-*.wandb): a 7-byte ":W&B" header, then LevelDB's log
    format (32 KiB blocks; each piece: crc32, 2-byte length, type 1 full / 2 first / 3 middle / 4 last)
    holding wandb_internal_pb2.Record protobufs. Written out here because wandb has no public reader.
    The file is written by W&B's service process, which may still be closing it after run.finish() returned (seen
    on a loaded machine: a file without its history records): wandb.teardown() waits for the service to end."""
    import wandb
    from wandb.proto import wandb_internal_pb2
    wandb.teardown()
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pieces, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is zero padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            pieces.append(pending)
            pending = b""
    records = []
    for piece in pieces:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(piece)
        records.append(record)
    return records


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_report_to_logs_the_metrics_jsonl_records_and_the_args(backend, tiny_model_dir, gsm8k_few, tmp_path,
                                                                 monkeypatch):
    pytest.importorskip(backend)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = tiny_args(tiny_model_dir, data=gsm8k_few, eval_data=gsm8k_few, eval_every=2, eval_n=2, out_dir=str(tmp_path),
                     run_name="dash", report_to=backend, max_new_tokens=6)
    run_main_with_random_rewards(args)
    records = [json.loads(line) for line in open(tmp_path / "dash" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # eval before, two steps, eval after
    if backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(tmp_path / "dash" / "tensorboard"))
        events.Reload()
        for key in {k for r in records for k in r if k != "step"}:
            expected = [(r["step"], r[key]) for r in records if key in r]
            logged = [(e.step, e.value) for e in events.Scalars(key)]
            assert [s for s, _ in logged] == [s for s, _ in expected], key
            assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-12), key  # float32
        assert "--group-size 4" in events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    else:
        [path] = (tmp_path / "dash" / "wandb").glob("offline-run-*/run-*.wandb")
        logged = read_wandb_records(path)
        rows = {}
        for record in logged:
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
        expected = {}
        for r in records:  # the eval record of step 2 joins that step's row
            expected.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
        assert rows == expected
        [run] = [r.run for r in logged if r.WhichOneof("record_type") == "run"]
        config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
        assert config["group_size"] == 4 and config["report_to"] == "wandb" and run.display_name == "dash"


@pytest.mark.parametrize("backend,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_report_to_without_its_package_is_one_clear_line(backend, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(SystemExit) as raised:
        grpo.open_report(grpo.Args(report_to=backend), str(tmp_path))
    assert str(raised.value.code) == f"grpo.py: error: --report-to {backend} needs the {backend} package: pip install {backend}"
    report, close = grpo.open_report(grpo.Args(report_to=backend), str(tmp_path), is_main=False)  # other ranks: nothing
    report({"step": 1, "x": 1.0})
    close()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, gsm8k_few, tmp_path):
    import signal
    command = [sys.executable, str(ROOT / "grpo.py"), "--model", tiny_model_dir, "--data", gsm8k_few, "--device", "cpu",
               "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--steps", "1000",
               "--eval-every", "0", "--save-every", "0", "--out-dir", str(tmp_path), "--run-name", "sig"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:  # wait for the first step line, then ask it to stop
        output.append(line)
        if line.startswith("step 1/1000"):
            process.send_signal(signal.SIGTERM)
            break
    output.append(process.communicate(timeout=120)[0])
    text = "".join(output)
    assert process.returncode == 0, text
    assert "stopping after this step" in text and "Traceback" not in text
    saved = sorted(os.listdir(tmp_path / "sig" / "checkpoints"))
    assert len(saved) == 1 and int(saved[0].split("_")[1]) < 1000


KILLED_AFTER_LOGGING = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import grpo
write_step_records = grpo.write_step_records


def write_then_die(run_dir, metrics, *args, **kwargs):
    """Step 3's records are written; then, in the middle of a samples.jsonl line, SIGKILL (the next save is step 4's)."""
    write_step_records(run_dir, metrics, *args, **kwargs)
    if metrics["step"] == 3:
        with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
            f.write('{"step": 4, "prompt": "a line cut sh')
        os.kill(os.getpid(), signal.SIGKILL)


grpo.write_step_records = write_then_die
flags = grpo.command_line(sys.argv[2:])  # what `python grpo.py FLAGS` runs
grpo.main(grpo.Args(**flags), given=flags)
'''


@pytest.mark.slow
def test_a_run_killed_between_logging_and_saving_resumes_from_its_directory_with_each_step_logged_once(
        tiny_model_dir, gsm8k_few, tmp_path):
    import signal
    run_dir = tmp_path / "killed"
    flags = ["--model", tiny_model_dir, "--data", gsm8k_few, "--device", "cpu", "--prompts-per-step", "2", "--group-size",
             "2", "--max-new-tokens", "4", "--steps", "4", "--save-every", "2", "--eval-every", "0", "--sample-every", "0",
             "--samples-per-step", "2", "--out-dir", str(tmp_path), "--run-name", "killed"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_LOGGING, str(ROOT), *flags], capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert logged_steps(run_dir / "metrics.jsonl") == [1, 2, 3] and grpo.checkpoint_names(str(run_dir)) == ["step_000002"]
    metrics_before, samples_before = open(run_dir / "metrics.jsonl").read(), open(run_dir / "samples.jsonl").read()
    saved = json.load(open(run_dir / "checkpoints" / "step_000002" / "args.json"))
    del saved["ratio_level"], saved["top_entropy_quantile"]  # as a run from before these settings existed
    (run_dir / "checkpoints" / "step_000002" / "args.json").write_text(json.dumps(saved))
    resumed = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--resume", str(run_dir)], capture_output=True,
                             text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert logged_steps(run_dir / "metrics.jsonl") == [1, 2, 3, 4]
    assert logged_steps(run_dir / "samples.jsonl") == [1, 1, 2, 2, 3, 3, 4, 4]
    assert f"{run_dir / 'metrics.jsonl'}: dropped 1 records of the steps after 2" in resumed.stdout
    assert f"{run_dir / 'samples.jsonl'}: dropped 3 records of the steps after 2" in resumed.stdout  # 2 + the cut line
    # The records up to the checkpoint are the ones written before the kill, byte for byte.
    assert open(run_dir / "metrics.jsonl").read().startswith("".join(metrics_before.splitlines(keepends=True)[:2]))
    assert open(run_dir / "samples.jsonl").read().startswith("".join(samples_before.splitlines(keepends=True)[:4]))
    assert grpo.checkpoint_names(str(run_dir)) == ["step_000002", "step_000004"]


@pytest.mark.slow
@pytest.mark.parametrize("fails", ["checkpoint", "samples.jsonl"])
def test_a_file_that_cannot_be_written_stops_the_run_in_one_line_and_resume_continues(fails, saved_run):
    """The kernel refuses to grow a file past RLIMIT_FSIZE (EFBIG: the write path of a full disk's ENOSPC), here
    in the middle of the step-3 checkpoint (its adapter fits, its trainer_state.pt does not) or of a samples.jsonl
    line. The run stops with one line; nothing partial stays; --resume continues and logs each step once."""
    import resource
    args, run_dir = saved_run
    last = run_dir / "checkpoints" / "step_000002"
    if fails == "checkpoint":
        limit, path = 200_000, run_dir / "checkpoints" / "step_000003"
        assert (last / "adapter_model.safetensors").stat().st_size < limit < (last / "trainer_state.pt").stat().st_size
    else:
        limit, path = (run_dir / "samples.jsonl").stat().st_size + 100, run_dir / "samples.jsonl"
    process = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--resume", str(run_dir), "--steps", "3"],
                             capture_output=True, text=True, timeout=600,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)))
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1] == (f"grpo.py: error: could not write {path} (File too large); the last "
                                                       f"complete checkpoint is {last}: free space, then --resume {run_dir}")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000001", "step_000002"]  # no step_000003.tmp
    resumed = run_main_with_random_rewards(resume_args(args, run_dir))
    assert [m["step"] for m in resumed["metrics"]] == [3]
    assert logged_steps(run_dir / "metrics.jsonl") == [1, 2, 3]
    assert logged_steps(run_dir / "samples.jsonl") == [1] * 4 + [2] * 4 + [3] * 4


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_resumed_run_gives_its_dashboard_each_step_once(backend, tiny_model_dir, gsm8k_few, tmp_path, monkeypatch):
    pytest.importorskip(backend)
    import shutil
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # A constant lr: with cosine, lengthening the run (--steps 3) changes the redone step 2's lr, which W&B, whose
    # steps only go forward, would keep from the first try (README: resume).
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="dash", report_to=backend,
                     save_every=1, max_new_tokens=6, lr_schedule="constant")
    run_main_with_random_rewards(args)
    shutil.rmtree(tmp_path / "dash" / "checkpoints" / "step_000002")  # killed after step 2 was logged, before its save
    run_main_with_random_rewards(dataclasses.replace(args, resume=str(tmp_path / "dash"), steps=3))
    records = [json.loads(line) for line in open(tmp_path / "dash" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    if backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(tmp_path / "dash" / "tensorboard"))
        events.Reload()
        for key in records[0].keys() - {"step"}:
            logged = [(e.step, e.value) for e in events.Scalars(key)]
            assert [step for step, _ in logged] == [1, 2, 3], key
            # Step 2's values are the redone step's (its time differs from the first try's): the old ones were purged.
            assert [value for _, value in logged] == pytest.approx([r[key] for r in records], rel=1e-6, abs=1e-12), key
    else:
        sessions = []
        for path in sorted((tmp_path / "dash" / "wandb").glob("offline-run-*/run-*.wandb")):
            logged = read_wandb_records(path)
            [run] = [r.run for r in logged if r.WhichOneof("record_type") == "run"]
            rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                    for r in logged if r.WhichOneof("record_type") == "history"]
            sessions.append((run.run_id, [row["_step"] for row in rows], rows))
        assert len(sessions) == 2 and sessions[0][0] == sessions[1][0]  # one W&B run, continued
        assert sessions[0][1] == [1, 2] and sessions[1][1] == [3]  # step 2 was not sent again
        timings = ("time/", "throughput/", "memory/", "_")
        assert [{k: v for k, v in row.items() if not k.startswith(timings)} for row in sessions[0][2] + sessions[1][2]] == \
            [{k: v for k, v in r.items() if k != "step" and not k.startswith(timings)} for r in records]


# -----------------------------------------------------------------------------
# Rewards as plug-ins (TRL's reward-function form), and dynamic sampling that refills the batch.

RUNNING_MAX = ("```python\ndef running_max(xs):\n    out = []\n    for x in xs:\n        out.append(x if not out else "
               "max(out[-1], x))\n    return out\n```")


def test_default_rewards_are_todays_correctness_and_format_bit_for_bit():
    """No --reward: correct and format at --correct-weight / --format-weight, equal bit for bit to the formula
    score used before the plug-ins (verify.py per item, reward = cw·correct + fw·formatted in float32)."""
    code = [json.loads(line) for line in open(ROOT / "data" / "code.jsonl")][:1]
    items = [{"prompt": "q1", "answer": "#### 72"}] * 3 + [{"prompt": "q2", "answer": "0.5"}] * 2 + code * 2
    completions = ["so \\boxed{72}", "72", "\\boxed{71} \\boxed{72}", "\\boxed{1/2}", "half", RUNNING_MAX, "no code"]
    for strict in (True, False):
        args = grpo.Args(correct_weight=0.7, format_weight=0.3, strict=strict)
        with ThreadPoolExecutor(2) as pool:
            scores = grpo.score(completions, items, grpo.reward_functions(args, pool))
        correct = torch.tensor([verify.code_reward(text, item["tests"]) if "tests" in item else
                                verify.math_reward(text, item["answer"], strict=strict) for text, item in zip(completions, items)])
        formatted = torch.tensor([verify.format_reward(text, "code" if "tests" in item else "math")
                                  for text, item in zip(completions, items)])
        assert 0 < correct.sum() < len(items) and 0 < formatted.sum() < len(items)  # right and wrong ones
        assert torch.equal(scores["rewards"], args.correct_weight * correct + args.format_weight * formatted)
        assert torch.equal(scores["per_reward"]["correct"], correct) and torch.equal(scores["per_reward"]["format"], formatted)
    names = [(name, weight) for name, _, weight in grpo.reward_functions(grpo.Args(), None)]
    assert names == [("correct", 1.0), ("format", 0.1)]
    assert grpo.parse_args(["--reward", "a.py:f=0.5", "--reward", "correct"]).reward == ("a.py:f=0.5", "correct")


def test_evaluation_counts_strict_lenient_and_format_as_verify_py_does_per_item(monkeypatch):
    code = [json.loads(line) for line in open(ROOT / "data" / "code.jsonl")][:1]
    items = [{"prompt": "q1", "answer": "72"}] * 3 + [{"prompt": "q2", "answer": "5"}] + code * 2
    texts = ["so \\boxed{72}", "it is 72", "\\boxed{7}", "5 or \\boxed{5}", RUNNING_MAX, "```python\nx = 1\n```"]
    monkeypatch.setattr(grpo, "generate", lambda *a, **k: {"texts": texts})
    with ThreadPoolExecutor(2) as pool:
        result = grpo.evaluate(None, None, items, grpo.Args(chat_template=False), [0], pool)
    def verdict(text, item, strict):
        return verify.code_reward(text, item["tests"]) if "tests" in item else verify.math_reward(text, item["answer"], strict)
    assert result["eval/accuracy_strict"] == sum(verdict(t, i, True) for t, i in zip(texts, items)) / 6 == 3 / 6
    assert result["eval/accuracy_lenient"] == sum(verdict(t, i, False) for t, i in zip(texts, items)) / 6 == 4 / 6
    assert result["eval/format_rate"] == sum(verify.format_reward(t, "code" if "tests" in i else "math")
                                             for t, i in zip(texts, items)) / 6
    assert result["eval/n"] == 6


def slow_trl_advantages(rewards, group_size, eps=1e-4):
    """TRL's advantages with unscorable (NaN) rewards, as loops in float64: each group's mean and Bessel std over its
    scored completions; NaN (unscorable, or a single scored one whose std is NaN) becomes 0."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        scored = [r for r in group if not math.isnan(r)]
        mean = sum(scored) / len(scored) if scored else math.nan
        std = math.sqrt(sum((r - mean) ** 2 for r in scored) / (len(scored) - 1)) if len(scored) > 1 else math.nan
        out += [0.0 if math.isnan(r) or math.isnan(std) or std == 0 else (r - mean) / (std + eps) for r in group]
    return out


def test_unscorable_completions_get_zero_advantage_and_leave_their_groups_statistics_as_in_trl():
    nan = math.nan
    rewards = torch.tensor([1.0, nan, 0.0, 0.5, nan, nan, nan, nan, 2.0, nan, nan, nan, 0.3, 0.3, nan, 0.3,
                            1.0, 0.0, 0.0, 1.0])
    advantages = grpo.group_advantages(rewards, 4)
    assert advantages.tolist() == pytest.approx(slow_trl_advantages(rewards, 4), rel=1e-6, abs=1e-7)
    assert advantages[1] == 0 and advantages[4:8].tolist() == [0.0] * 4 and advantages[12:16].tolist() == [0.0] * 4
    assert torch.equal(advantages[16:], grpo.group_advantages(rewards[16:], 4))  # a group without NaN: as ever
    unscaled = grpo.group_advantages(rewards, 4, scale=False)[:4].tolist()
    assert unscaled == pytest.approx([0.5, 0.0, -0.5, 0.0])


def write_plugin(path, body) -> str:
    path.write_text("import json, math\n" + textwrap.dedent(body))
    return str(path)


def test_plugin_rewards_get_trls_arguments_and_are_weighed_and_logged_per_function(tiny_model_dir, tmp_path):
    """Three rewards through the real main(): two plug-ins from a file (TRL's form, one weighted) and the built-in
    correct; None = not applicable; a completion no function scores is unscorable (no reward, advantage 0)."""
    from transformers import AutoTokenizer
    calls = tmp_path / "calls.jsonl"
    plugin = write_plugin(tmp_path / "plug.py", f'''
        def digits(prompts, completions, completion_ids, trainer_state, level, answer, **kwargs):
            with open({str(calls)!r}, "a") as f:
                f.write(json.dumps({{"prompts": prompts, "completions": completions, "ids": completion_ids,
                                    "step": trainer_state.global_step, "steps": trainer_state.max_steps,
                                    "level": level, "answer": answer, "kwargs": sorted(kwargs)}}) + "\\n")
            return [None if lv == "skip" else float(sum(ids) % 7) for lv, ids in zip(level, completion_ids)]

        def picky(prompts, completions, level, **kwargs):
            return [None if lv in ("skip", "easy") else 0.5 for lv in level]
        ''')
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3", "level": "easy"},
                                                  {"question": "Say hi.", "level": "hard"}, {"prompt": "Skip me.", "level": "skip"}])
    args = tiny_args(tiny_model_dir, data=data, out_dir=str(tmp_path), run_name="plug", prompts_per_step=3, group_size=4,
                     samples_per_step=12, reward=(f"{plugin}:digits=0.5", f"{plugin}:picky", "correct"))
    grpo.main(args)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = [json.loads(line) for line in open(calls)]
    assert [c["step"] for c in calls] == [0, 1] and {c["steps"] for c in calls} == {2}
    for call in calls:  # the items' own fields, as lists; completion_ids: each completion's tokens up to its EOS
        by_prompt = {"What is 1 + 2?": ("easy", "3"), "Say hi.": ("hard", None), "Skip me.": ("skip", None)}
        assert [by_prompt[p] for p in call["prompts"]] == list(zip(call["level"], call["answer"]))
        assert [call["prompts"].count(p) for p in by_prompt] == [4, 4, 4] and call["kwargs"] == []
        assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in call["ids"]] == call["completions"]
    records = [json.loads(line) for line in open(tmp_path / "plug" / "samples.jsonl")]
    assert len(records) == 24 and all(set(r["rewards"]) == {"digits", "picky", "correct"} for r in records)
    for record in records:
        values = record["rewards"]
        if "Skip me." in record["prompt"]:
            assert values == {"digits": None, "picky": None, "correct": None} and record["reward"] is None
            assert record["advantage"] == 0.0
        else:
            terms = [0.5 * values["digits"], values["picky"] or 0.0, values["correct"] or 0.0]
            assert record["reward"] == pytest.approx(sum(terms), abs=1e-6)
            assert (values["picky"] is None) == ("1 + 2" in record["prompt"])
            assert (values["correct"] is None) == ("Say hi." in record["prompt"])
    metrics = [json.loads(line) for line in open(tmp_path / "plug" / "metrics.jsonl")]
    step = [r for r in records if r["step"] == 2]
    digits = [r["rewards"]["digits"] for r in step if r["rewards"]["digits"] is not None]
    assert metrics[1]["reward/digits"] == pytest.approx(sum(digits) / len(digits))  # over the applicable ones only
    assert metrics[1]["reward/digits/std"] == pytest.approx(float(torch.tensor(digits).std(correction=0)), abs=1e-6)
    assert metrics[1]["reward/picky"] == 0.5 and metrics[1]["reward/picky/std"] == 0.0
    assert metrics[1]["completions/unscorable_frac"] == pytest.approx(1 / 3)


def test_trls_own_reward_functions_run_unchanged_and_score_what_they_score_under_trl(tmp_path):
    """TRL's repetition and soft-overlong rewards (callable objects of trl.rewards, made for GRPOTrainer), imported
    from a file as a user would: called with our keywords they give exactly what they give called directly."""
    pytest.importorskip("trl")
    plugin = write_plugin(tmp_path / "from_trl.py", """
        from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment
        repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
        overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)
        """)
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5], list(range(7)), [9] * 10]
    with ThreadPoolExecutor(1) as pool:
        rewards = grpo.reward_functions(grpo.Args(reward=(plugin + ":repetition", plugin + ":overlong=0.5")), pool)
    scores = grpo.score(["a", "b", "c", "d"], [{"prompt": "p", "solution": "s"}] * 4, rewards, completion_ids=ids,
                        trainer_state=argparse.Namespace(global_step=0, max_steps=1))
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment
    repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)(completion_ids=ids)
    overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)(completion_ids=ids)
    assert scores["per_reward"]["repetition"].tolist() == pytest.approx(repetition) and min(repetition) < 0
    assert scores["per_reward"]["overlong"].tolist() == pytest.approx(overlong) and min(overlong) < 0
    assert scores["rewards"].tolist() == pytest.approx([r + 0.5 * o for r, o in zip(repetition, overlong)])


def test_a_reward_that_cannot_be_found_or_read_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "load_data", lambda args: pytest.fail("got past the reward checks"))
    plugin = write_plugin(tmp_path / "plug.py", "def f(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    broken = write_plugin(tmp_path / "broken.py", "x = 1 / 0\n")
    other = tmp_path / "other"
    other.mkdir()
    write_plugin(other / "plug.py", "def f(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n")
    cases = [((str(tmp_path / "nope.py") + ":f",), "cannot import " + str(tmp_path / "nope.py") + " (FileNotFoundError"),
             ((plugin + ":g",), f"{plugin} has no function g"), (("no_such_module_here:f",), "(ModuleNotFoundError"),
             ((broken + ":f",), "(ZeroDivisionError: division by zero)"), (("correctness",), "not a built-in reward"),
             ((plugin + ":f=heavy",), "the weight after = must be a finite number"), ((plugin + ":f=nan",), "finite number"),
             ((plugin + ":f", str(other / "plug.py") + ":f"), "must differ from each other"), (("statistics:mean",), "must differ")]
    for reward, expected in cases:
        with pytest.raises(SystemExit) as raised:
            grpo.main(grpo.Args(reward=reward, out_dir=str(tmp_path)))
        message = str(raised.value.code)
        assert message.startswith("grpo.py: error: --reward") and "\n" not in message and expected in message, message
    assert grpo.reward_functions(grpo.Args(reward=("json:dumps=2",)), None)[0][1:] == (json.dumps, 2.0)  # module:function


@pytest.mark.parametrize("returned,expected", [
    ("raise ValueError('no judge\\nreachable')", "reward bad raised ValueError: no judge reachable"),
    ("return [1.0] * (len(completions) - 1)", "reward bad returned list"), ("return 1.0", "reward bad returned float"),
    ("return [1.0, math.nan, 1.0, 1.0]", "reward bad: item 1 of 4 ('b'): nan is not a finite number or None"),
    ("return [1.0, 1.0, 'yes', 1.0]", "item 2 of 4 ('c'): 'yes' is not"), ("return [math.inf] * 4", "item 0 of 4"),
])
def test_a_reward_that_raises_or_returns_a_wrong_value_names_itself_the_item_and_the_problem(tmp_path, returned, expected):
    bad = write_plugin(tmp_path / "bad.py", f"def bad(prompts, completions, **kwargs):\n    {returned}\n")
    with ThreadPoolExecutor(1) as pool, pytest.raises(SystemExit) as raised:
        grpo.score(["x"] * 4, [{"prompt": p} for p in "abcd"], grpo.reward_functions(grpo.Args(reward=("correct", bad + ":bad")), pool))
    message = str(raised.value.code)
    assert message.startswith("grpo.py: error: ") and "\n" not in message and expected in message, message


def test_a_reward_failing_mid_run_stops_before_the_update_with_the_last_checkpoint_intact(tiny_model_dir, gsm8k_few,
                                                                                          tmp_path):
    flaky = write_plugin(tmp_path / "flaky.py", '''
        def flaky(prompts, completions, trainer_state, **kwargs):
            return [1.0 if trainer_state.global_step < 2 else math.nan] * len(completions)
        ''')
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="flaky", steps=4, save_every=1,
                     reward=("correct", flaky + ":flaky"))
    assert "reward flaky: item 0 of 8" in error_of(args)
    assert grpo.checkpoint_names(str(tmp_path / "flaky"))[-1] == "step_000002"  # complete, and the newest
    assert [json.loads(line)["step"] for line in open(tmp_path / "flaky" / "metrics.jsonl")] == [1, 2]


def test_countdown_example_scores_its_solutions_and_refuses_everything_else():
    items = [json.loads(line) for line in open(ROOT / "data" / "countdown.jsonl")]
    assert len(items) >= 16 and items == countdown.make_items(len(items))  # the file is the generator's, seed 0
    solved = countdown.countdown_reward([i["prompt"] for i in items], [f"so \\boxed{{{i['solution']}}}" for i in items],
                                        [i["numbers"] for i in items], [i["target"] for i in items])
    assert solved == [1.0] * len(items)
    numbers, target = [[3, 5, 7]], [22]
    for text, expected in [("\\boxed{3 * 5 + 7}", 1.0), ("\\boxed{(7 - 3) \\times 5 + 2 = 22}", 0.0),
                           ("\\boxed{7 \\times 5 - 3 - 10}", 0.0), ("\\boxed{15 + 7}", 0.0), ("\\boxed{3 * 5 + 7 + 0}", 0.0),
                           ("\\boxed{3 * 5 + 7 = 22}", 1.0), ("\\boxed{5 × 3 + 7}", 1.0), ("3 * 5 + 7", 0.0),
                           ("\\boxed{3 ** 5 + 7}", 0.0), ("\\boxed{7 / (5 - 5) + 3}", 0.0), ("\\boxed{" + "(" * 500 + "}", 0.0),
                           ("\\boxed{__import__('os')}", 0.0), ("\\boxed{3 * 5 + 7.0}", 0.0)]:
        assert countdown.countdown_reward(["p"], [text], numbers, target) == [expected], text
    assert countdown.countdown_reward(["p", "q"], ["\\boxed{1}", "x"], [None, [1]], [None, 1]) == [None, 0.0]
    assert countdown.expression_value("7 / 2 * 2", [2, 2, 7]) == 7  # exact fractions: no float rounding


def test_countdown_trains_end_to_end_through_main_with_its_reward_and_the_builtin_format(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, data=str(ROOT / "data" / "countdown.jsonl"), out_dir=str(tmp_path), run_name="cd",
                     samples_per_step=8, reward=(str(ROOT / "data" / "countdown.py") + ":countdown_reward", "format=0.1"))
    grpo.main(args)
    items = {item["prompt"]: item for item in (json.loads(line) for line in open(ROOT / "data" / "countdown.jsonl"))}
    records = [json.loads(line) for line in open(tmp_path / "cd" / "samples.jsonl")]
    assert len(records) == 16
    for record in records:  # each logged value is the example's function on that completion, and the sum is weighed
        item = next(item for prompt, item in items.items() if prompt in record["prompt"])
        assert "\\boxed{answer}" not in record["prompt"]  # no math instruction: the item's prompt as written
        assert record["rewards"]["countdown_reward"] == countdown.countdown_reward(
            [item["prompt"]], [record["completion"]], [item["numbers"]], [item["target"]])[0]
        assert record["rewards"]["format"] == verify.format_reward(record["completion"], "math")
        assert record["reward"] == pytest.approx(record["rewards"]["countdown_reward"] + 0.1 * record["rewards"]["format"])
    metrics = [json.loads(line) for line in open(tmp_path / "cd" / "metrics.jsonl")]
    assert all({"reward/countdown_reward", "reward/countdown_reward/std", "reward/format"} <= m.keys() for m in metrics)


def test_concatenate_rollouts_pads_any_key_on_its_side_and_select_rows_trims_to_the_rows(tiny_model_dir):
    """Rounds of different prompt widths P and completion widths T, with a key the step does not know of (a
    per-token [N, T] float) and one it does not pad ([N]), against a row-by-row construction."""
    generator, pad = torch.Generator().manual_seed(0), 7

    def part(n, P, T):
        lengths = torch.randint(1, P + 1, (n,), generator=generator)
        prompt_mask = (torch.arange(P)[None] >= P - lengths[:, None]).long()  # left padded
        completion_mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (n,), generator=generator)[:, None]).float()
        return {"prompt_ids": torch.randint(10, 99, (n, P), generator=generator) * prompt_mask + pad * (1 - prompt_mask),
                "prompt_mask": prompt_mask, "completion_ids": torch.randint(10, 99, (n, T), generator=generator),
                "completion_mask": completion_mask, "sampler_logp": -torch.rand(n, T, generator=generator) * completion_mask,
                "truncated": torch.rand(n, generator=generator) > 0.5, "texts": [f"t{i}" for i in range(n)],
                "scores": {"rewards": torch.rand(n, generator=generator), "per_reward": {"a": torch.rand(n, generator=generator)}},
                "generation_chunk": n}
    parts = [part(4, 5, 3), part(2, 9, 6), part(3, 2, 1)]
    merged = grpo.concatenate_rollouts(parts, pad)
    rows = [(p, i) for p in parts for i in range(len(p["texts"]))]
    P, T = 9, 6
    for key, side, fill in [("prompt_ids", "left", pad), ("prompt_mask", "left", 0), ("completion_ids", "right", pad),
                            ("completion_mask", "right", 0), ("sampler_logp", "right", 0)]:
        width = P if side == "left" else T
        expected = torch.stack([torch.cat([torch.full((width - p[key].shape[1],), fill, dtype=p[key].dtype), p[key][i]])
                                if side == "left" else torch.cat([p[key][i], torch.full((width - p[key].shape[1],), fill,
                                                                                        dtype=p[key].dtype)]) for p, i in rows])
        assert torch.equal(merged[key], expected), key
    assert torch.equal(merged["truncated"], torch.cat([p["truncated"] for p in parts]))
    assert merged["texts"] == [t for p in parts for t in p["texts"]] and merged["generation_chunk"] == 3
    assert torch.equal(merged["scores"]["per_reward"]["a"], torch.cat([p["scores"]["per_reward"]["a"] for p in parts]))
    keep = torch.tensor([False, True, False, False, False, False, True, False, True])  # rows of parts 0 and 2 only
    batch = {key: merged[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampler_logp",
                                          "truncated")}
    selected = grpo.select_rows(batch, keep)
    P_kept = max(int(merged["prompt_mask"][i].sum()) for i in keep.nonzero().flatten())
    T_kept = max(int(merged["completion_mask"][i].sum()) for i in keep.nonzero().flatten())
    assert selected["prompt_ids"].shape == (3, P_kept) and selected["sampler_logp"].shape == (3, T_kept)
    assert torch.equal(selected["prompt_ids"], merged["prompt_ids"][keep][:, P - P_kept:])
    assert torch.equal(selected["completion_mask"], merged["completion_mask"][keep][:, :T_kept])


def fake_generate(model, tokenizer, prompts, args, eos_ids, temperature, greedy=False, log=print, progress=""):
    """Completions that are a function of the prompt and its place in the group, each ending in EOS, the call's width
    its longest completion (as generate's): one group gets the same tokens sampled alone, in one call or in rounds."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) + i % args.group_size)
        length = int(torch.randint(1, args.max_new_tokens + 1, (1,), generator=generator))
        rows.append(torch.cat([torch.randint(0, len(tokenizer), (length - 1,), generator=generator), torch.tensor(eos_ids[:1])]))
    T = max(len(row) for row in rows)
    completion_ids = torch.stack([torch.nn.functional.pad(row, (0, T - len(row)), value=tokenizer.pad_token_id) for row in rows])
    mask, truncated = grpo.completion_mask_from_ids(completion_ids, eos_ids)
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)], skip_special_tokens=True)
    return dict(prompt_ids=encoded["input_ids"], prompt_mask=encoded["attention_mask"], completion_ids=completion_ids,
                completion_mask=mask, truncated=truncated, texts=texts, generation_chunk=len(prompts))


def test_dynamic_sampling_refills_from_the_data_order_and_trains_exactly_like_a_batch_of_the_kept_groups(
        tiny_model_dir, model_and_tokenizer, monkeypatch):
    """Items flat, good, flat, good (in this order) and B = 2: round 1 keeps one group, round 2 finds none, round 3
    the second. The batch trained (rounds of different prompt and completion widths, concatenated, the kept rows
    cut out) equals, tensor for tensor, a plain step's batch of the two good groups, and so do gradient and update."""
    model, tokenizer = model_and_tokenizer
    randomize_lora(model)
    monkeypatch.setattr(grpo, "generate", fake_generate)
    monkeypatch.setattr(grpo, "data_indices", lambda position, count, n, seed: [p % n for p in range(position, position + count)])
    trained, update = [], grpo.update_adapters
    monkeypatch.setattr(grpo, "update_adapters", lambda model, batch, *a, **k: trained.append(batch) or update(model, batch, *a, **k))
    flat, flat2 = {"prompt": "Flat: " + "a long prompt whose completions all score alike, " * 3}, {"prompt": "Flat."}
    good, good2 = {"prompt": "What is 2 + 3?"}, {"prompt": "Name a colour, please, in a few words of your own."}
    spread = lambda prompts, completions, completion_ids, **k: [  # noqa: E731
        0.0 if p.startswith("Flat") else float(len(ids) + sum(ids) % 5) for p, ids in zip(prompts, completion_ids)]
    args = tiny_args(tiny_model_dir, max_new_tokens=6, max_grad_norm=0, dynamic_sampling=True, max_refill_rounds=3)
    eos_ids, initial = grpo.end_of_sequence_ids(model, tokenizer), adapter_tensors(model)

    def step(items, step_args):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in initial:
                    p.copy_(initial[name])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=step_args.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        result = grpo.grpo_step(0, items, model, model, tokenizer, optimizer, scheduler, step_args, eos_ids,
                                [("spread", spread, 1.0)], position=0)
        return result, lora_grads(model), adapter_tensors(model)
    refilled, grads, weights = step([flat, good, flat2, good2], args)
    assert (refilled["position"], refilled["rounds"], refilled["groups_kept"]) == (4, 3, 2)
    assert refilled["zero_std"].tolist() == [True, False, True, False] and len(refilled["prompts"]) == 16
    plain, plain_grads, plain_weights = step([good, good2], dataclasses.replace(args, dynamic_sampling=False))
    assert (plain["position"], plain["rounds"]) == (2, 1)
    assert trained[0]["prompt_ids"].shape[1] < refilled["rollout"]["prompt_ids"].shape[1]  # the flat prompt's width went
    assert trained[0].keys() == trained[1].keys() and {"ref_logp", "advantages"} <= trained[0].keys()
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    assert all(torch.equal(weights[n], plain_weights[n]) for n in weights)
    assert any(not torch.equal(weights[n], initial[n]) for n in weights)  # it did train


def test_resume_continues_exactly_with_dynamic_sampling(tiny_model_dir, gsm8k_few, tmp_path):
    """The data position is saved: with refills, step s no longer starts at s·B, and resume still matches a straight run."""
    common = dict(data=gsm8k_few, out_dir=str(tmp_path), lr_schedule="constant", beta=0.04, save_every=1,
                  dynamic_sampling=True, max_refill_rounds=2)
    straight = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="straight", steps=3, **common), flat_groups=True)
    run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="split", steps=1, **common), flat_groups=True)
    resumed = run_main_with_random_rewards(tiny_args(tiny_model_dir, steps=3, resume=str(tmp_path / "split"), **common),
                                           flat_groups=True)
    a, b = adapter_tensors(straight["model"]), adapter_tensors(resumed["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [m["groups/sampled"] for m in straight["metrics"]][1:] == [m["groups/sampled"] for m in resumed["metrics"]]
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert state["data_position"] == sum(m["groups/sampled"] for m in straight["metrics"]) > 3 * 2  # refills happened


# -----------------------------------------------------------------------------
# torchrun: data parallel on CPU with gloo.

DISTRIBUTED_SCRIPT = r'''
import json, os, sys, zlib
import torch
sys.path.insert(0, {root!r})
import grpo

def fixed_generate(model, tokenizer, prompts, args, eos_ids, temperature, greedy=False, log=print, progress=""):
    """Fixed completions, a function of the prompt text and its place in the group, so that one process
    and two ranks train on exactly the same samples (sampling differs per rank by design)."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) + i % args.group_size)
        row = torch.randint(0, 1000, (args.max_new_tokens,), generator=generator)  # regular tokens of any tokenizer
        row[int(torch.randint(1, args.max_new_tokens, (1,), generator=generator))] = eos_ids[0]
        rows.append(row)
    completion_ids = torch.stack(rows)
    mask, truncated = grpo.completion_mask_from_ids(completion_ids, eos_ids)
    return dict(prompt_ids=encoded["input_ids"], prompt_mask=encoded["attention_mask"], completion_ids=completion_ids,
                completion_mask=mask, truncated=truncated, texts=["x"] * len(prompts))

def fixed_score(completions, items, reward_funcs, **context):
    """A function of the item and the completion's place in its group (args: the script's); one item in three
    scores all its group alike (for --dynamic-sampling)."""
    rewards = torch.tensor([0.0 if zlib.crc32(item["prompt"].encode()) % 3 == 0 else
                            float(zlib.crc32((item["prompt"] + str(i % args.group_size)).encode()) % 7)
                            for i, item in enumerate(items)])
    if os.environ.get("FAIL_ON_RANK") == os.environ.get("RANK", "0"):
        raise RuntimeError("reward server exploded on rank " + os.environ["RANK"])
    return dict(rewards=rewards, per_reward={{"correct": (rewards > 3).float(), "format": (rewards > 1).float()}})

grpo.generate, grpo.score = fixed_generate, fixed_score
args = grpo.Args(**json.loads(sys.argv[1]))
result = grpo.main(args)
if int(os.environ.get("RANK", 0)) == 0:
    # The adapters after the step, and the step's (all-reduced) gradients: main leaves them in .grad.
    torch.save({{n: (p.detach(), p.grad) for n, p in result["model"].named_parameters() if "lora_" in n}}, sys.argv[2])
'''


def run_distributed(tmp_path, args, ranks, env_extra=None, timeout=300):
    script = tmp_path / "dist_run.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(root=str(ROOT)))
    output = tmp_path / f"adapter_{ranks}.pt"
    # No --master-port: a single-node torchrun then rendezvouses on localhost:0, a port the OS picks free
    # (a fixed or pid-derived port can collide with another test run or service on a shared machine).
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                   str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    process = subprocess.run(launcher + [str(script), json.dumps(dataclasses.asdict(args)), str(output)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    return process, output


# The second run adds the two features whose decisions span the ranks, in one run (each torchrun costs ~40 s):
# --top-entropy-quantile, whose threshold is over both ranks' tokens (a per-rank one fails this test; the random
# model's entropies are all near log V, closer than the two layouts' rounding: a low temperature spreads them), and
# --dynamic-sampling, whose informative groups are counted over both ranks (or they disagree on the rounds).
@pytest.mark.slow
@pytest.mark.parametrize("variant", [{}, {"top_entropy_quantile": 0.4, "temperature": 0.05, "dynamic_sampling": True,
                                          "max_refill_rounds": 3}], ids=["plain", "entropy-refill"])
def test_two_ranks_give_the_same_adapter_as_one_process_on_the_same_global_batch(tiny_model_dir, gsm8k_few, tmp_path,
                                                                                 variant):
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), prompts_per_step=4, group_size=3,
                     max_new_tokens=8, micro_batch=5, steps=1, agg="token", beta=0.04, lr=1e-3, max_grad_norm=0, **variant)
    one, one_path = run_distributed(tmp_path, dataclasses.replace(args, run_name="one"), ranks=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, two_path = run_distributed(tmp_path, dataclasses.replace(args, run_name="two"), ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(one_path), torch.load(two_path)
    assert a.keys() == b.keys() and len(a) == 28
    moved = 0
    for name, (weight, grad) in a.items():
        weight2, grad2 = b[name]
        # The same float32 sums in another order (2 ranks × 6 sequences in micro-batches of 5, vs 12):
        # agreement to ~1e-6 of the largest gradient entry; a missing all-reduce or a local
        # denominator is off by ~50% (tested by breaking them).
        assert (grad - grad2).abs().max() <= 1e-5 * grad.abs().max() + 1e-12, (name, (grad - grad2).abs().max())
        # Adam's first step is lr·g/(|g| + eps): the same sign everywhere but where |g| ~ eps.
        assert (weight - weight2).abs().gt(1e-6).float().mean() < 0.01, name
        moved += int("lora_B" in name and weight.abs().sum() > 0)
    assert moved == 14  # every B moved: the all-reduce reached every adapter
    # Rank 0 alone wrote the run directory, with metrics over both ranks' sequences.
    records = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    reference = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    assert len(records) == 1 and records[0]["reward/mean"] == pytest.approx(reference[0]["reward/mean"])
    assert records[0]["loss/trained_tokens"] == reference[0]["loss/trained_tokens"]
    assert records[0]["loss/kl"] == pytest.approx(reference[0]["loss/kl"], abs=1e-7)
    # The ranks agreed on the rounds (--dynamic-sampling: the informative groups are counted over both ranks).
    keys = ("groups/rounds", "groups/sampled", "groups/kept")
    assert [records[0][k] for k in keys] == [reference[0][k] for k in keys]
    assert records[0]["groups/rounds"] > 1 if variant.get("dynamic_sampling") else records[0]["groups/rounds"] == 1


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job_with_its_error(tiny_model_dir, gsm8k_few, tmp_path):
    args = tiny_args(tiny_model_dir, data=gsm8k_few, out_dir=str(tmp_path), run_name="fail", steps=3, max_new_tokens=4)
    process, _ = run_distributed(tmp_path, args, ranks=2, env_extra={"FAIL_ON_RANK": "1"}, timeout=240)
    assert process.returncode != 0
    assert "reward server exploded on rank 1" in process.stdout + process.stderr


# -----------------------------------------------------------------------------
# Full-size levers, checked on the tiny model: the merged dense sampler and activation offload.


def dense_logprobs(dense, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], torch.ones_like(batch["completion_ids"])], 1)
    with torch.no_grad():
        logits = dense(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits
    P = batch["prompt_ids"].shape[1]
    return torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(2, batch["completion_ids"][..., None]).squeeze(2)


def test_merged_sampler_is_the_policy_up_to_rounding_and_follows_updates(tiny_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)  # large adapters: a merge that dropped them would be far off
    dense = grpo.build_generation_model(model)
    args = tiny_args(tiny_model_dir)
    batch = rollout_batch(dense, tokenizer, args)  # sampled by the dense copy, as in training
    mask = batch["completion_mask"].bool()
    policy = grpo.batch_logprobs(model, batch, args, 1.0)  # the 4-bit + LoRA policy the loss uses
    assert (dense_logprobs(dense, batch)[mask] - policy[mask]).abs().max() < 1e-4  # float32 on CPU: exact merge
    # In bf16 (the GPU compute dtype) only rounding separates them: ~0.035 nats measured, 2^-8 relative.
    dense_bf16 = grpo.build_generation_model(model).to(torch.bfloat16)
    assert (dense_logprobs(dense_bf16, batch)[mask] - policy[mask]).abs().max() < 0.1
    assert model.get_output_embeddings().weight.dtype == torch.float32  # the shared tensors were not cast
    # A changed adapter (an optimizer step) reaches the copy only through refresh.
    randomize_lora(model, seed=1, scale=0.5)
    updated = grpo.batch_logprobs(model, batch, args, 1.0)
    assert (dense_logprobs(dense, batch)[mask] - updated[mask]).abs().max() > 1e-2
    grpo.refresh_generation_model(model, dense)
    assert (dense_logprobs(dense, batch)[mask] - updated[mask]).abs().max() < 1e-4


def test_decode_attention_matches_a_loop_over_heads_in_float64():
    # One query token per row, 8 query heads sharing 2 KV heads, left padding: a loop over rows and heads,
    # each head reading its own KV head (h // groups) by index, in float64.
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 7, 16
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    visible = torch.ones(batch, length, dtype=torch.bool)
    visible[0, :3], visible[2, :1] = False, False  # padding on the left of rows 0 and 2
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads)
    output, _ = grpo.decode_attention(module, query, key, value, visible[:, None, None, :], scaling=dim ** -0.5)
    assert output.shape == (batch, 1, heads, dim)  # [B, q, heads, D], as transformers' sdpa returns it
    for b in range(batch):
        for h in range(heads):
            k, v, q = key[b, h // (heads // kv_heads)].double(), value[b, h // (heads // kv_heads)].double(), query[b, h, 0].double()
            scores = [float(q @ k[j]) / math.sqrt(dim) if visible[b, j] else -math.inf for j in range(length)]
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            assert torch.allclose(output[b, 0, h].double(), weights @ v, atol=1e-5)


def test_merged_sampler_decodes_padded_prompts_like_transformers_eager_attention(tiny_model_dir, model_and_tokenizer):
    # The dense sampler uses our decode attention; the same weights with transformers' eager attention must
    # give the same greedy tokens and scores on prompts of different lengths (left padding), token by token.
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)
    attention_before = model.config._attn_implementation
    dense = grpo.build_generation_model(model)
    assert dense.config._attn_implementation == "grpo_decode"
    assert model.config._attn_implementation == attention_before  # the policy's own attention is untouched
    prompts = ["What is 2 + 3?", "Name a colour, any colour you like, and say why."]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert not encoded["attention_mask"].all()  # there is padding
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id)
    ours = dense.generate(**encoded, **settings)
    dense.config._attn_implementation = "eager"
    eager = dense.generate(**encoded, **settings)
    assert torch.equal(ours.sequences, eager.sequences)
    for a, b in zip(ours.scores, eager.scores):  # min_new_tokens sets EOS to -inf in both
        assert torch.equal(a.isinf(), b.isinf()) and (a - b)[a.isfinite()].abs().max() < 1e-4


def test_bench_decoding_loop_samples_exactly_what_generate_samples(tiny_model_dir, model_and_tokenizer):
    # bench.py's own decoding loop (a static KV cache and fixed buffers: what a CUDA graph replays) must be a
    # drop-in for generate as grpo.generate calls it: the same greedy tokens, the same multinomial draws from
    # the same seed, the same EOS handling (a row that ends is padded, the others go on), prompts of
    # different lengths (left padding). For both samplers: the dense copy, and the 4-bit + LoRA policy itself.
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)
    prompts = ["What is 2 + 3?", "Name a colour, any colour you like, and say why.", "Count: 1, 2, 3"]
    dense = grpo.build_generation_model(model)
    for sampler, cpu_sampler in itertools.product((dense, model), ("inverse_cdf", "multinomial")):
        args = tiny_args(tiny_model_dir, max_new_tokens=10, cpu_sampler=cpu_sampler)
        eos_ids = grpo.end_of_sequence_ids(model, tokenizer)
        torch.manual_seed(0)
        free = grpo.generate(sampler, tokenizer, prompts, args, eos_ids, temperature=1.0)
        eos_ids = eos_ids + [int(free["completion_ids"][0, 3])]  # row 0 now ends at its 4th token
        runs = []
        for decode in ("generate", "loop"):
            if decode == "loop":
                sampler.generate = functools.partial(bench.graph_generate, sampler, False)
            torch.manual_seed(0)
            runs.append(grpo.generate(sampler, tokenizer, prompts, args, eos_ids, temperature=1.0))
            torch.manual_seed(0)
            runs.append(grpo.generate(sampler, tokenizer, prompts, args, eos_ids, temperature=1.0, greedy=True))
        del sampler.generate  # back to the class's generate
        for expected, got in ((runs[0], runs[2]), (runs[1], runs[3])):
            assert torch.equal(got["completion_ids"], expected["completion_ids"])
            assert torch.equal(got["completion_mask"], expected["completion_mask"]) and got["texts"] == expected["texts"]
        assert runs[0]["completion_mask"][0].sum() == 4 and runs[0]["completion_mask"][1:].sum() > 8


@pytest.mark.slow
@pytest.mark.skipif(not bench.continuous_batching_available(), reason="this transformers has no continuous batching "
                    "(generate_batch with ContinuousBatchingConfig: 5.17 and later)")
def test_bench_continuous_batching_decodes_greedily_like_generate_and_records_the_samplers_logprobs(tiny_model_dir,
                                                                                                 model_and_tokenizer):
    # bench.batch_generate (transformers' generate_batch: paged attention, a scheduler) as a drop-in for generate in
    # grpo.generate, for both samplers: the same greedy tokens as generate, with prompts of different lengths and a
    # row that ends at EOS (pad after it, the others go on); sampling records the log-probs of the drawn tokens,
    # which equal the policy's own (float32 on a CPU: both samplers are the policy up to rounding).
    model, tokenizer = model_and_tokenizer
    randomize_lora(model, scale=0.5)
    prompts = ["What is 2 + 3?", "Name a colour, any colour you like, and say why.", "Count: 1, 2, 3"]
    args = tiny_args(tiny_model_dir, max_new_tokens=10, beta=0.0)
    for sampler in (grpo.build_generation_model(model), model):
        eos_ids = grpo.end_of_sequence_ids(model, tokenizer)
        eos_ids.append(int(grpo.generate(sampler, tokenizer, prompts, args, eos_ids, 1.0, greedy=True)["completion_ids"][0, 3]))
        expected = grpo.generate(sampler, tokenizer, prompts, args, eos_ids, 1.0, greedy=True)
        sampler.generate = functools.partial(bench.batch_generate, sampler)
        try:
            got = grpo.generate(sampler, tokenizer, prompts, args, eos_ids, 1.0, greedy=True)
            torch.manual_seed(0)
            sampled = grpo.generate(sampler, tokenizer, prompts, args, eos_ids, temperature=1.0)
        finally:
            del sampler.generate  # back to the class's generate
        assert torch.equal(got["completion_ids"], expected["completion_ids"]) and got["texts"] == expected["texts"]
        assert got["completion_mask"][0].sum() == 4 and got["completion_mask"][1:].sum() == 20
        mask = sampled["completion_mask"].bool()
        policy = grpo.batch_logprobs(model, {k: v for k, v in sampled.items() if torch.is_tensor(v)}, args, 1.0)
        assert (sampled["sampler_logp"] - policy)[mask].abs().max() < 1e-4 and sampled["sampler_logp"][mask].std() > 0.01
        assert torch.equal(sampled["sampler_logp"][~mask], torch.zeros(int((~mask).sum())))


def test_merged_sampler_and_activation_offload_run_in_main(tiny_model_dir, gsm8k_few, tmp_path, monkeypatch):
    # --tis-cap 0: the importance weights of these float32 samplers are 1 ± 1e-6, noise that Adam magnifies where a
    # gradient element is near its eps; the runs compare the samplers and offload, with one formula.
    common = dict(data=gsm8k_few, out_dir=str(tmp_path), steps=2, lr_schedule="constant", seed=4, tis_cap=0.0)
    plain = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="plain", **common))
    offload = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="offload", offload_activations=True, **common))
    # Watch the dense copy main builds: while the policy trains it must hold none of its own block weights
    # (the 26 GB at 14B), counted here by module name; the embeddings and lm_head it shares stay.
    dense_models, held_while_training = [], []
    build, accumulate = grpo.build_generation_model, grpo.accumulate_gradients
    monkeypatch.setattr(grpo, "build_generation_model", lambda model: dense_models.append(build(model)) or dense_models[-1])

    def watched_accumulate(*positional, **keywords):
        held_while_training.append(sum(m.weight.numel() for name, m in dense_models[0].named_modules()
                                       if ".layers." in f".{name}" and isinstance(m, torch.nn.Linear)))
        return accumulate(*positional, **keywords)
    monkeypatch.setattr(grpo, "accumulate_gradients", watched_accumulate)
    merged = run_main_with_random_rewards(tiny_args(tiny_model_dir, run_name="merged", generation_model="merged", **common))
    assert [m["step"] for m in merged["metrics"]] == [1, 2]
    assert len(held_while_training) == 2 and held_while_training == [0, 0]
    assert dense_models[0].model.layers[0].mlp.up_proj.weight.numel() > 0  # allocated again by the refresh
    assert dense_models[0].lm_head.weight.numel() > 0
    # Offload moves saved tensors and changes no formula; the dense copy's float32 probabilities equal the
    # policy's to ~1e-6. So, with the same seed, all three runs draw the very same completions at both steps
    # (a stale dense copy would not) and train to the same adapters. "The same" up to float32 rounding: a
    # CPU GEMM may sum in another order for a tensor at another address (a copy, as save_on_cpu makes), and a
    # last-bit difference in one gradient is not a changed number worth failing on (seen once in many runs).
    completions = {run: [r["completion"] for r in map(json.loads, open(tmp_path / run / "samples.jsonl"))]
                   for run in ("plain", "offload", "merged")}
    assert completions["offload"] == completions["plain"] and completions["merged"] == completions["plain"]
    a = adapter_tensors(plain["model"])
    for other in (offload, merged):
        b = adapter_tensors(other["model"])
        assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-9) for n in a)
    # The sampler's gap to the policy is logged at every step (float32 on a CPU: both samplers are the policy up to
    # rounding), in metrics.jsonl and in the plot.
    for run in ("plain", "merged"):
        records = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        assert len(records) == 2 and all(r["sampler/logp_abs_diff"] < 1e-4 and r["sampler/kl"] < 1e-8 for r in records)
    if importlib.util.find_spec("matplotlib"):
        assert "sampler/logp_abs_diff" in grpo.main(grpo.Args(plot=str(tmp_path / "merged")))


# -----------------------------------------------------------------------------
# It learns: the toy task of tiny.py, through exactly grpo.main (4-bit base, LoRA, generate, verify.py,
# group advantages, fused log-probs, clipped loss, KL). Thresholds from 3 seeds × 8 variants measured
# with `python tiny.py curves` (README "See it learn", 2026-11-27, the CPU inverse-CDF sampler): the
# untrained policy scores 0.016-0.062 over its first 2 steps; the default trained, 0.949-0.963 over the
# last 10 of 100 steps (0.863-0.970 across the learning variants); the lr-0 control 0.044-0.062 and
# the flipped-advantage control 0.002-0.005 there.


def learning_run(tmp_path_factory, name, **overrides):
    work_dir = str(tmp_path_factory.mktemp("learn"))
    args = dataclasses.replace(tiny.learn_args(work_dir), run_name=name, **overrides)
    rewards = [m["reward/mean"] for m in grpo.main(args)["metrics"] if "reward/mean" in m]
    assert len(rewards) == args.steps
    return sum(rewards[:2]) / 2, sum(rewards[-10:]) / 10


@pytest.mark.slow
def test_reward_climbs_from_chance_to_above_0_9(tmp_path_factory):
    first, last = learning_run(tmp_path_factory, "learn")
    assert first <= 0.2  # measured ≤ 0.09: chance (1 in 16 tokens, and most are not digits)
    assert last >= 0.9  # measured ≥ 0.963 over 3 seeds and 4 variants: margin 0.06


# The controls run 30 of the 100 steps: with lr 0 the policy never changes, so any 10 steps are alike; with the
# advantages negated it falls below chance within the first 20. Seed 0, last 10 of 30 steps (2026-12-02): the
# default run 0.644 (so a control that learnt would fail here), lr 0 0.062, advantages negated 0.005.


def test_learning_rate_zero_stays_near_chance(tmp_path_factory):
    _, last = learning_run(tmp_path_factory, "lr0", lr=0.0, steps=30)
    assert last <= 0.2  # measured ≤ 0.055 over 100 steps: margin 0.145; a learning run is above 0.9


def test_flipped_advantages_stay_near_chance(tmp_path_factory, monkeypatch):
    original = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda *a, **k: -original(*a, **k))  # a sign bug, on purpose
    _, last = learning_run(tmp_path_factory, "flipped", steps=30)
    assert last <= 0.2  # measured ≤ 0.002 over 100 steps: the policy learns to avoid the answer


# -----------------------------------------------------------------------------
# bench.py: both subcommands run for real, at tiny sizes (the same commands measure the 14B model on a GPU).

# A 2-layer Qwen2 with Qwen2.5's padded vocabulary (the test tokenizer uses its first 1,027 rows).
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_step_bench_runs_every_phase_and_updates_lora(tmp_path, tokenizer_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    stdout = run_bench("step", "--config", str(config), "--tokenizer", tokenizer_dir, "--device", "cpu",
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


@pytest.mark.slow
def test_step_bench_naive_gather_and_no_reference_pass(tmp_path, tokenizer_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    stdout = run_bench("step", "--config", str(config), "--tokenizer", tokenizer_dir, "--device", "cpu",
                       "--prompts", "1", "--group", "2", "--prompt-tokens", "8", "--new-tokens", "4",
                       "--micro-batch", "2", "--steps", "1", "--beta", "0", "--naive-gather")
    step = next(r for r in json_lines(stdout) if "step" in r)
    assert step["gather"] == "naive"
    assert set(step["seconds"]) == {"generation", "policy", "optimizer"}  # β = 0, μ = 1: no extra passes


@pytest.mark.slow
def test_trl_bench_runs_trl_on_the_model_step_saved_with_steps_settings(tmp_path, tokenizer_dir):
    # bench.py trl: TRL's GRPOTrainer on the directory `bench.py step` saved, given step's flags. What each side
    # reads back from what ran (trainer config or grpo.Args, the loaded model, the prompts) must agree; TRL's
    # records have step's format; TRL trains (its adapters move) on full-length completions.
    hidden = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.modules['trl'] = None; "  # TRL missing
                             "sys.argv = ['bench.py', 'trl', '--config', 'x.json']; runpy.run_path('bench.py', run_name='__main__')"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert hidden.returncode == 1 and hidden.stderr.strip().splitlines() == \
        ["bench.py trl: TRL is not installed (trl is missing): pip install trl"], hidden.stderr[-2000:]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    # The suite's TRL entries are this command with the flags of our run beside them, on its model directory
    plan = dict(bench.suite_plan(bench.parse_args(["suite", "--config", str(config), "--tokenizer", tokenizer_dir,
                                                   "--models-dir", str(tmp_path / "models")]), torch.device("cpu")))
    shared = ("config", "tokenizer", "device", "model_dir", "layers", "prompt_tokens", "micro_batch", "beta",
              "num_iterations", "lr", "lora_r", "temperature", "seed", "gradient_checkpointing", "allow_eos")
    for our_name, trl_name in (("slice-ours", "slice-trl"), ("slice-long-ours", "slice-long-trl")):
        assert plan[trl_name][1:3] == [bench.__file__, "trl"]
        our_args, trl_args = bench.parse_args(plan[our_name][2:]), bench.parse_args(plan[trl_name][2:])
        variant = json.loads(our_args.variants)[0]
        assert [getattr(trl_args, k) for k in shared] == [getattr(our_args, k) for k in shared]
        assert [getattr(trl_args, k) for k in ("prompts", "group", "new_tokens", "steps")] == \
            [variant[k] for k in ("prompts", "group", "new_tokens", "steps")]
    pytest.importorskip("trl", reason="TRL is not installed (pip install trl): bench.py trl is not run")
    flags = ["--config", str(config), "--tokenizer", tokenizer_dir, "--device", "cpu", "--model-dir", str(tmp_path / "model"),
             "--prompts", "2", "--group", "2", "--prompt-tokens", "8", "--new-tokens", "6", "--micro-batch", "2", "--lr", "1e-3"]
    ours = json_lines(run_bench("step", *flags, "--steps", "1"))
    trl_stdout = run_bench("trl", *flags, "--steps", "2")
    theirs = json_lines(trl_stdout)
    assert any("built" in r for r in ours) and not any("built" in r for r in theirs)  # TRL loaded what step saved
    (our_settings,), (trl_settings,) = [[r["settings"] for r in records if "settings" in r] for records in (ours, theirs)]
    # TRL casts QLoRA adapters to bf16 (the QLoRA paper's recipe): its own way, reported, not a setting we pass
    assert (our_settings.pop("adapter_dtype"), trl_settings.pop("adapter_dtype")) == ("torch.float32", "torch.bfloat16")
    assert (our_settings.pop("variant"), trl_settings.pop("variant")) == ("variant 1", "trl")
    assert trl_settings == our_settings
    assert (our_settings["sequences"], our_settings["micro_batch"], our_settings["min_new_tokens"], our_settings["lora_alpha"],
            our_settings["linears_4bit"], our_settings["quant_type"]) == (4, 2, 6, 32, 7 * 2, "nf4")
    our_step = next(r for r in ours if "step_seconds" in r)
    trl_steps = [r for r in theirs if "step_seconds" in r]
    assert [r["step"] for r in trl_steps] == [1, 2]
    for step in trl_steps:  # step's record format, less the sampler's gap (TRL's sampler is its policy's generate)
        assert set(step) == set(our_step) - {"sampler_kl", "sampler_logp_abs_diff"} | {"trl"}
        assert step["generated_tokens"] == 2 * 2 * 6 and step["prompt_tokens"] == our_step["prompt_tokens"]
        assert set(step["seconds"]) == {"generation", "reference", "policy"}
        assert all(0 < seconds < step["step_seconds"] for seconds in step["seconds"].values()), step
        assert step["peak_gib_max"] > 0 and math.isfinite(step["loss"]) and step["kl"] is not None
    assert theirs[-1]["lora_max_abs_change"] > 0 and theirs[-1]["trainable_tensors"] == ours[-1]["trainable_tensors"]
    assert "policy forward+backward" in trl_stdout  # step's readable table


SUITE_SIZES = ["--prompts", "2", "--group", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--micro-batch", "4",
               "--long-prompts", "1", "--long-new-tokens", "8", "--warmup-new-tokens", "2", "--gather-tokens", "64",
               "--decode-new-tokens", "12", "--decode-check", "6"]


def run_suite(tmp_path, tokenizer_dir, only, budget_s="600", out="suite"):
    """The GPU suite's own command on a tiny config, on the CPU: {name: measurement} of suite.json. Three tests share
    its entries out (each entry is a process of its own, as on the GPU), so that two test workers run them side by side."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    run_bench("suite", "--config", str(config), "--tokenizer", tokenizer_dir, "--device", "cpu", "--out", str(tmp_path / out),
              "--models-dir", str(tmp_path / "models"), "--slice-layers", "1", "--budget-s", budget_s,
              *(["--only", only] if only else []), *SUITE_SIZES, timeout=600)
    return {m["name"]: m for m in json.loads((tmp_path / out / "suite.json").read_text())["measurements"]}


@pytest.mark.slow
def test_suite_bench_writes_every_figure_as_it_goes_and_respects_its_budget(tmp_path, tokenizer_dir):
    # Gather, our step (warm-up + measured step), and the long-completion pair with and without offload on one
    # rollout. TRL's entries: the trl test; the decoding engines: the two tests below.
    by_name = run_suite(tmp_path, tokenizer_dir, "gather,full-ours,full-long")
    assert list(by_name) == ["gather", "full-ours", "full-long"]
    gather = next(r for r in by_name["gather"]["records"] if isinstance(r.get("gather"), list))
    assert [row["impl"] for row in gather["gather"]] == ["naive", "fused", "fused-copy"]
    steps = [r for r in by_name["full-ours"]["records"] if "step_seconds" in r]
    assert [(r["variant"], r["warmup"], r["new_tokens"]) for r in steps] == [("merged", True, 2), ("merged", False, 4)]
    long, offload = [r for r in by_name["full-long"]["records"] if "step_seconds" in r and not r["warmup"]]
    assert (long["offload"], offload["offload"], offload["reused_rollout"]) == (False, True, True)
    assert long["generated_tokens"] == 2 * 8 and "generation" not in offload["seconds"]
    assert all(r["layers"] == TINY_CONFIG["num_hidden_layers"] and r["peak_gib_max"] > 0 for r in steps)
    table = (tmp_path / "suite" / "suite.md").read_text()
    assert "| full-ours merged step 2 |" in table and "| full-long long+offload step 1 |" in table
    # A spent budget: nothing runs, every measurement says why, the files are still written.
    nothing = run_suite(tmp_path, tokenizer_dir, "", budget_s="0", out="none")
    assert all(m["exit"] == "not run" and m["note"].startswith("skipped") for m in nothing.values())


@pytest.mark.slow
def test_suite_bench_decode_variants_each_decode_greedily_what_generate_decodes(tmp_path, tokenizer_dir):
    # Every decoding variant that runs on a CPU samples greedily exactly what generate does (our own loop on a
    # static cache included: its positions, cache slots and mask); CUDA graphs need CUDA and say so.
    decode = {r["variant"]: r for r in run_suite(tmp_path, tokenizer_dir, "decode-slice")["decode-slice"]["records"]}
    assert set(decode) == set(bench.DECODE_VARIANTS)
    assert decode["cuda-graph"]["skipped"].startswith("CUDA graphs need")
    for variant in ("generate-sdpa", "generate", "generate-static", "static-loop", "continuous-batching"):
        assert decode[variant]["greedy_tokens_equal_to_generate"] == 1.0 and decode[variant]["ms_per_decode_step"] > 0
    assert decode["static-loop"]["layers"] == 1 and decode["static-loop"]["batch"] == 4


@pytest.mark.slow
def test_suite_bench_steps_with_our_decoding_loop_and_with_continuous_batching(tmp_path, tokenizer_dir):
    by_name = run_suite(tmp_path, tokenizer_dir, "slice-graph,slice-paged")
    graph_steps = [r for r in by_name["slice-graph"]["records"] if "step_seconds" in r]
    # CPU: no graph; the merged sampler, then the 4-bit policy as the sampler
    assert [(r["variant"], r["sampler"], r["decode"], r["generated_tokens"]) for r in graph_steps] == \
        [("graph", "merged", "static-loop", 2 * 2 * 4)] * 2 + [("graph policy", "policy", "static-loop", 2 * 2 * 4)] * 2
    paged_steps = [r for r in by_name["slice-paged"]["records"] if "step_seconds" in r]  # continuous batching, EOS off
    assert [(r["variant"], r["sampler"], r["decode"], r["generated_tokens"]) for r in paged_steps] == \
        [("paged", "merged", "continuous-batching", 2 * 2 * 4)] * 2 + [("paged policy", "policy", "continuous-batching", 2 * 2 * 4)] * 2
