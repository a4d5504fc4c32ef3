"""
bench.py -- the measurements behind docs/performance.md. Six subcommands:

  python bench.py gather [--tokens 4096 --hidden 128 --vocab 151936 --dtype float32]
      The log-prob gather alone, forward + backward (hidden gets a gradient, the lm_head weight does
      not): a naive log_softmax(hidden @ W.T / T).gather(...) against grpo.token_logprobs (the fused,
      chunked gather). Each runs in its own child process (`bench.py gather --only naive|fused`), so
      one's allocations cannot colour the other's peak. Prints peak extra memory (above a baseline
      taken once the inputs exist), the median time of a few repetitions after a warm-up, the ratios,
      and the max abs difference of the two log-probs and input gradients. CPU or CUDA.

  python bench.py step --config CONFIG.json [--tokenizer DIR] [--prompts 16 --group 8 --prompt-tokens 256
                       --new-tokens 256 --micro-batch 16 --steps 2 --beta 0.04 --num-iterations 1
                       --lora-r 16 --naive-gather]
      Real GRPO steps through grpo.py's own functions on a random-weight model of CONFIG's
      architecture: the model is built, SAVED to a directory with the tokenizer and RELOADED through
      grpo.load_model (4-bit NF4 + double quant, LoRA on all linear layers, gradient checkpointing)
      -- the same path as a real run; the save + reload takes ~50 s at 14B on a GPU, seconds for a
      tiny config. Each step: grpo.generate -> random rewards -> grpo.group_advantages ->
      grpo.batch_logprobs (reference, β > 0; old, μ > 1) -> grpo.accumulate_gradients -> clip + AdamW.
      Prompts are random tokens (the same seed, so the same prompts as `bench.py trl`). Random
      weights almost never emit EOS, and to make the workload
      fixed (the worst case: every completion max length) EOS is suppressed until --new-tokens
      (min_new_tokens; --allow-eos turns that off). Prints per phase seconds and peak memory, one JSON
      line per step, then a table. --naive-gather swaps grpo.token_logprobs for the naive gather to
      show what the fused one saves.

      Full size (one 80 GB GPU):  python bench.py step --config data/qwen2.5-14b-config.json
                                      --tokenizer ../shared/qwen2.5-tokenizer (or Qwen/Qwen2.5-14B)
      Tiny, on a CPU:             write a small Qwen2 config.json (see TINY_CONFIG in test_grpo.py) and pass it,
                                  or save tiny.py's model and pass its directory (--config DIR/config.json --model-dir DIR).

  python bench.py trl --config CONFIG.json [the same flags as step: --model-dir DIR --prompts 16 --group 8 ...]
      TRL's GRPOTrainer (pip install trl) on the random model step saves, with step's settings, for the side
      by side: give both the same --model-dir (whichever runs first builds it) and the same flags. The model
      is loaded as a TRL user loads it (from_pretrained with the same NF4 + double-quant config as
      grpo.load_model, LoRA r / 2r on all linear layers through peft_config), the same random prompts, G,
      --new-tokens with EOS suppressed, β, μ, lr, micro-batch (gradient accumulation to B·G), temperature,
      grpo's default loss (TRL's loss_type "grpo"), random rewards. Both print a {"settings": ...} line read
      back from the objects that ran (trainer config, loaded model), then one record per step in the same
      format: seconds per phase (TRL's timed by wrapping the trainer's own methods), the step's seconds and
      its peak memory. What TRL does its own way stays so: its adapters are bf16 (it casts QLoRA adapters),
      its log-prob passes take the full logits.

      CPU, the tiny model of `tiny.py cpu-demo` (run A and B in turn, more than once):
        python tiny.py model /tmp/tiny-qwen --tokenizer ../shared/qwen2.5-tokenizer
        python bench.py step --config /tmp/tiny-qwen/config.json --model-dir /tmp/tiny-qwen --device cpu \
            --prompts 8 --group 8 --prompt-tokens 128 --new-tokens 64 --micro-batch 16 --steps 3     # A
        python bench.py trl ... the same flags ...                                                   # B

  python bench.py plan [--gsm8k ../shared/data/gsm8k/train.jsonl --prompts 16 --group 8 --new-tokens 512
                       --micro-batch 16 --steps 200 --length-scale 1]
      A pure computation, no model: padded prompt + completion tokens that the log-prob/policy passes
      process per step with fixed micro-batches of --micro-batch sequences vs grpo's --micro-batch-tokens
      set to the same peak (the largest micro-batch the fixed plan formed over the simulated steps).
      Prompts are GSM8K questions through grpo.build_prompt (chat template, Qwen2.5 tokenizer; a step's
      prompts are left-padded to its longest); completion lengths are drawn from the token lengths of
      GSM8K's reference answers (calculator annotations <<...>> removed) × --length-scale, capped at
      --new-tokens.

  python bench.py decode --config CONFIG.json [--layers 48 --batch 128 --prompt-tokens 280 --new-tokens 64
                         --variants generate-sdpa,generate,generate-static,static-loop,cuda-graph,continuous-batching
                         --check 16]
      One decode step of the dense (merged) sampler alone, in ms, per variant, each in its own process:
      generate with transformers' sdpa attention or with grpo.decode_attention (the merged sampler's),
      generate with a static cache (transformers compiles the step), and graph_generate, our own loop on a
      static cache with fixed buffers, eagerly (static-loop) or with one decode step captured as a CUDA
      graph and replayed (cuda-graph), and transformers' continuous batching (batch_generate: generate_batch,
      paged attention). --check compares greedy tokens with generate's. graph_generate and batch_generate also
      stand in for the sampler's generate in `bench.py step` (--variants '[{"generation_model": "merged",
      "decode": "cuda-graph"}]', or "policy": the 4-bit model's own decode step as the graph; "decode":
      "continuous-batching" likewise) to time whole steps with them.

  python bench.py suite [--config data/qwen2.5-14b-config.json --budget-s 480 --out runs/suite
                        --slice-layers 8 --only NAMES]
      The whole GPU measurement as one budgeted command (docs/performance.md, "Full size on one H200"): the gather at the
      config's shape, our step and TRL's (`bench.py trl`) side by side on a slice of the
      config with fewer layers, our step at full size, 2,048 new tokens with and without
      --offload-activations on one rollout, the 4-bit sampler at full size, and both samplers with the
      CUDA-graph decoding loop (slice-graph, full-graph, full-graph-policy) and with continuous batching
      (slice-paged, full-paged). Each measurement is its
      own process, killed when the budget is spent; suite.json, suite.md and suite.log under --out are
      rewritten as every record arrives, so a cut-off run keeps what it measured.

Memory. CUDA: torch.cuda.max_memory_allocated, reset at the start of each measurement. CPU: the
process's peak resident set size (resource.getrusage ru_maxrss). ru_maxrss is a lifetime peak, so
before each measurement it is reset to the current RSS by writing "5" to /proc/self/clear_refs
(Linux >= 4.0); where that is not allowed, the numbers are lifetime peaks and are labelled so.
RSS counts every byte the process touches (allocator caches, libraries), not only tensors.
"""

import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import grpo

GiB, MiB = 2**30, 2**20
HERE = os.path.dirname(os.path.abspath(__file__))
# The 14B architecture is committed (data/); the real tokenizer is ../shared's copy, else its files from the Hub.
QWEN_14B_CONFIG = os.path.join(HERE, "data", "qwen2.5-14b-config.json")
DEFAULT_TOKENIZER = os.path.join(HERE, "..", "shared", "qwen2.5-tokenizer")
DEFAULT_TOKENIZER = DEFAULT_TOKENIZER if os.path.isdir(DEFAULT_TOKENIZER) else "Qwen/Qwen2.5-14B"


# -----------------------------------------------------------------------------
# Memory and time measurement, CUDA or CPU.


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (what ru_maxrss reports) to the current RSS. False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Peak:
    """Peak memory over a region: `with Peak(device) as p: ...` then p.peak (bytes, absolute) and
    p.extra (bytes above what was in use when the region began). p.kind says what was measured."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "CUDA max_memory_allocated"
        else:
            resettable = reset_peak_rss()
            self.base = current_rss() if resettable else peak_rss()
            self.kind = "CPU peak RSS" if resettable else "CPU peak RSS (lifetime: /proc/self/clear_refs not writable)"
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss()
        self.seconds = time.perf_counter() - self.start
        self.extra = max(0, self.peak - self.base)
        return False


# -----------------------------------------------------------------------------
# gather: naive log_softmax + gather vs grpo.token_logprobs, each in its own process.


def naive_token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, memory_mb=512, with_entropy=False):
    """What the fused gather replaces: the full [N, V] logits, their log-softmax (kept by autograd for
    backward) and a gather. Same signature as grpo.token_logprobs, so it can stand in for it."""
    logits = (hidden @ weight.T).float() / temperature  # [N, V]
    log_p = torch.log_softmax(logits, dim=-1)
    logprobs = log_p.gather(1, targets[:, None]).squeeze(1)  # [N]
    return (logprobs, -(log_p.exp() * log_p).sum(-1).detach()) if with_entropy else logprobs


def gather_inputs(tokens, hidden_size, vocab, dtype, device, seed=0):
    """The same inputs in every process: hidden [N, H], lm_head [V, H] (logit std ~2), targets [N]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * (2 / hidden_size**0.5)).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    grad_output = torch.randn(tokens, generator=generator).to(device)  # like per-token advantages
    return hidden.requires_grad_(), weight, targets, grad_output


def gather_child(a):
    """One implementation, measured in this process; prints one JSON line (and saves results for the diff)."""
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    hidden, weight, targets, grad_output = gather_inputs(a.tokens, a.hidden, a.vocab, dtype, device)
    if a.only == "naive":
        def run():
            return naive_token_logprobs(hidden, weight, targets, a.temperature)
    elif a.only == "fused-copy":  # the gather before: lm_head cast to a float32 copy for the call
        def run():
            return grpo.token_logprobs(hidden, weight.float(), targets, a.temperature, memory_mb=a.memory_mb)
    elif a.only == "fused-entropy":  # the same gather, also returning each token's entropy (grpo logs it)
        def run():
            return grpo.token_logprobs(hidden, weight, targets, a.temperature, memory_mb=a.memory_mb, with_entropy=True)[0]
    else:
        def run():
            return grpo.token_logprobs(hidden, weight, targets, a.temperature, memory_mb=a.memory_mb)

    def once():
        hidden.grad = None
        out = run()
        out.backward(grad_output)
        return out.detach()

    with Peak(device) as peak:  # over the warm-up and every repetition; the baseline holds the inputs
        once()  # warm-up
        times = []
        for _ in range(a.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = once()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    if a.save:
        torch.save({"logprobs": out.float().cpu(), "grad": hidden.grad.float().cpu()}, a.save)
    chunk_rows = grpo.gather_chunk_rows(a.vocab, a.memory_mb) if a.only != "naive" else a.tokens
    print(json.dumps({"impl": a.only, "peak_extra_bytes": peak.extra, "memory_kind": peak.kind,
                      "median_s": statistics.median(times), "times_s": times, "chunk_rows": min(chunk_rows, a.tokens),
                      "threads": torch.get_num_threads()}), flush=True)


def gather_main(a):
    if a.only:
        return gather_child(a)
    device = torch.device(a.device)
    budgets = a.memory_mb_sweep or [a.memory_mb]
    print(f"gather benchmark: N={a.tokens} tokens, H={a.hidden}, V={a.vocab}, {a.dtype}, T={a.temperature}, "
          f"device {device.type}, {a.repeat} repetitions after 1 warm-up (median), forward + backward (grad to hidden), "
          f"each implementation in its own process", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("naive", a.memory_mb)] + [("fused", mb) for mb in budgets]
        if a.compare_copy:  # what the float32 copy of a 16-bit lm_head used to cost
            runs.append(("fused-copy", a.memory_mb))
        if a.with_entropy:
            runs.append(("fused-entropy", a.memory_mb))
        for impl, mb in runs:
            save = os.path.join(tmp, f"{impl}-{mb}.pt")
            command = [sys.executable, os.path.abspath(__file__), "gather", "--only", impl, "--tokens", str(a.tokens),
                       "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--dtype", a.dtype, "--device", a.device,
                       "--temperature", str(a.temperature), "--repeat", str(a.repeat), "--memory-mb", str(mb),
                       "--threads", str(a.threads), "--save", save]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise SystemExit(f"bench.py gather --only {impl} failed:\n{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row["memory_mb"] = mb
            row["result"] = torch.load(save)
            rows.append(row)
    naive = rows[0]
    print(f"memory: {naive['memory_kind']}, peak above the inputs' baseline; time: median of {a.repeat}; "
          f"{naive['threads']} threads")
    header = f"{'implementation':<28} {'peak extra MiB':>15} {'time s':>8} {'mem naive/this':>15} {'time this/naive':>16}"
    print(header)
    print("-" * len(header))
    summary = []
    for row in rows:
        name = "naive log_softmax+gather" if row["impl"] == "naive" else \
            f"{row['impl']} ({row['memory_mb']} MB, {row['chunk_rows']} rows)"
        memory_ratio = naive["peak_extra_bytes"] / max(row["peak_extra_bytes"], 1)
        time_ratio = row["median_s"] / naive["median_s"]
        print(f"{name:<28} {row['peak_extra_bytes'] / MiB:>15.1f} {row['median_s']:>8.3f} {memory_ratio:>15.1f} "
              f"{time_ratio:>16.2f}")
        diff = {}
        if row["impl"] != "naive":
            diff = {key: float((row["result"][key] - naive["result"][key]).abs().max()) for key in ("logprobs", "grad")}
        summary.append({"impl": row["impl"], "memory_mb": row["memory_mb"], "chunk_rows": row["chunk_rows"],
                        "peak_extra_mib": round(row["peak_extra_bytes"] / MiB, 1), "median_s": round(row["median_s"], 4),
                        "times_s": [round(t, 4) for t in row["times_s"]], "memory_ratio_naive_over_this": round(memory_ratio, 2),
                        "time_ratio_this_over_naive": round(time_ratio, 3),
                        **{f"max_abs_diff_{k}": v for k, v in diff.items()}})
    for s in summary[1:]:
        print(f"{s['impl']} ({s['memory_mb']} MB) vs naive: max abs diff log-probs {s['max_abs_diff_logprobs']:.2e}, "
              f"input gradient {s['max_abs_diff_grad']:.2e}")
    print(json.dumps({"gather": summary, "tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": a.dtype,
                      "device": device.type, "memory_kind": naive["memory_kind"]}))
    return summary


# -----------------------------------------------------------------------------
# decode: what one decode step of the dense sampler costs, by attention and decoding loop.

DECODE_VARIANTS = ("generate-sdpa", "generate", "generate-static", "static-loop", "cuda-graph", "continuous-batching")


def graph_generate(model, use_graph, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                   do_sample=True, temperature=1.0, top_p=1.0, logits_processor=(), stopping_criteria=(), **ignored):
    """A stand-in for model.generate, as grpo.generate calls it (bench.py step --variants decode, and
    bench.py decode): prefill into a preallocated (static) KV cache, then every decode step is the same call
    on fixed buffers (token, position, cache slot, a [B, 1, 1, L] mask), so on CUDA one step is captured
    once as a CUDA graph and replayed (use_graph): no per-layer launch overhead. Sampling as generate's:
    min_new_tokens (from the model's generation_config), temperature, transformers' top-p, any logits
    processors; rows that ended get pad; stops when every row has ended. Returns [B, P + new] tokens."""
    from transformers import StaticCache, TopPLogitsWarper
    device = input_ids.device
    batch, P = input_ids.shape
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=device)
    min_new_tokens = getattr(model.generation_config, "min_new_tokens", None) or 0
    top_p_warper = TopPLogitsWarper(top_p) if do_sample and top_p < 1.0 else None
    length = P + max_new_tokens + 2  # + the two warm-up steps before a capture, which write slots P and P + 1
    cache = StaticCache(config=model.config, max_cache_len=length)
    visible = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)  # the decode mask: slot j visible
    visible[:, 0, 0, :P] = attention_mask.bool()
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    sequences = torch.full((batch, P + max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    sequences[:, :P] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # transformers >= 5.24 names the cache argument `cache` (and warns on the old name); older ones past_key_values.
    # The transformers model's own forward: a peft model's (the 4-bit sampler) takes **kwargs and passes them on.
    forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
    cache_argument = {("cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"): cache}

    def next_token(logits, t):  # logits [B, V] of new token t (0-based) -> token [B]
        scores = logits.float()
        if t < min_new_tokens:
            scores[:, eos] = -math.inf
        for processor in logits_processor:
            scores = processor(sequences[:, :P + t], scores)
        if not do_sample:
            return scores.argmax(-1)
        scores = scores / temperature if temperature != 1.0 else scores
        if top_p_warper is not None:
            scores = top_p_warper(sequences[:, :P + t], scores)
        return torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **cache_argument,
                    cache_position=torch.arange(P, device=device), use_cache=True, logits_to_keep=1)
        token = next_token(out.logits[:, -1], 0)
        step_ids, step_position = token[:, None].clone(), positions[:, -1:] + 1
        slot = torch.tensor([P], device=device)  # the cache slot this step writes

        def step():
            visible.index_fill_(3, slot, True)  # the new token sees itself
            return model(input_ids=step_ids, position_ids=step_position, attention_mask=visible, **cache_argument,
                         cache_position=slot, use_cache=True).logits  # [B, 1, V]
        if use_graph:
            # transformers >= 5 advance a cache write counter on device; older ones write at cache_position.
            counted = [layer for layer in cache.layers if hasattr(layer, "cumulative_length")]
            counters = [layer.cumulative_length.clone() for layer in counted]
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up before capture (allocator, cuBLAS workspaces)
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_logits = step()
            for layer, saved in zip(counted, counters):
                layer.cumulative_length.copy_(saved)  # undo the warm-up's writes
            visible[:, 0, 0, P:] = False
        steps = max_new_tokens
        for t in range(max_new_tokens):
            token = torch.where(finished, pad_token_id, token)
            sequences[:, P + t] = token
            finished |= torch.isin(token, eos)
            for criterion in stopping_criteria:  # grpo's progress tick; a True row is done, as in generate
                finished |= criterion(sequences[:, :P + t + 1], None).to(device)
            if t == max_new_tokens - 1 or (t % 16 == 15 and bool(finished.all())):  # one sync per 16 steps
                steps = t + 1
                break
            if use_graph:
                graph.replay()
                logits = graph_logits
            else:
                logits = step()
            token = next_token(logits[:, -1], t + 1)
            step_ids.copy_(token[:, None])
            step_position.add_(1)
            slot.add_(1)
    return sequences[:, :P + steps]


def continuous_batching_available() -> bool:
    import transformers  # 5.17 and 5.24 have both; 4.57 has an older generate_batch without the config class
    return hasattr(transformers.GenerationMixin, "generate_batch") and hasattr(transformers, "ContinuousBatchingConfig")


def batch_generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample=True,
                   temperature=1.0, top_p=1.0, logits_processor=(), **ignored):
    """A stand-in for model.generate, as grpo.generate calls it: transformers' continuous batching (generate_batch:
    a paged KV cache, finished rows' slots refilled by a scheduler; TRL's use_transformers_paged), for the dense copy
    or the 4-bit + LoRA policy (its transformers model, LoRA layers in place). grpo.token_sampler's draw is done by
    generate_batch's own sampler at the token sampler's temperature and top-p (softmax + multinomial, seeded from
    torch's generator), and its log-probs of the drawn tokens (return_logprobs) go to the token sampler's record.
    A row ends at EOS (pad after it); min_new_tokens = max_new_tokens in the model's generation_config (bench.py
    step's fixed workload) switches EOS off. Returns [B, P + new] tokens, the prompts left-padded as given."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    sampler = next((p for p in logits_processor if hasattr(p, "record")), None)  # grpo.token_sampler, when sampling
    if sampler is not None:
        do_sample, temperature, top_p = True, sampler.temperature, sampler.top_p
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # generate_batch is transformers'
    fixed_length = (getattr(model.generation_config, "min_new_tokens", None) or 0) >= max_new_tokens
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]  # no padding
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=None if fixed_length else eos_token_id,
                              pad_token_id=pad_token_id, **sampling)
    # The cache sized for these requests (pages of 256 tokens: both versions' default), not from free memory (80%
    # of the GPU by default); max_batch_tokens: tokens per forward (prefill chunks, or every row's next token).
    paging = ContinuousBatchingConfig(num_blocks=sum(math.ceil((len(p) + max_new_tokens + 1) / 256) for p in prompts) + 1,
                                      max_batch_tokens=max(len(prompts), min(16384, sum(map(len, prompts)))),
                                      return_logprobs=sampler is not None)
    attention = inner.config._attn_implementation
    inner.config._attn_implementation = "sdpa" if attention == grpo.DECODE_ATTENTION else attention  # not one it knows
    try:
        outputs = list(inner.generate_batch(prompts, generation_config=config, continuous_batching_config=paging).values())
    finally:
        inner.config._attn_implementation = attention
    if len(outputs) != len(prompts) or any(output.error for output in outputs):
        raise RuntimeError(f"generate_batch: {[output.error for output in outputs if output.error][:1] or 'rows missing'}")
    batch, P = input_ids.shape
    new = max(len(output.generated_tokens) for output in outputs)
    sequences = torch.full((batch, P + new), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    logps = torch.zeros(batch, new, device=input_ids.device)
    sequences[:, :P] = input_ids
    for row, output in enumerate(outputs):  # in the order of the inputs
        sequences[row, P : P + len(output.generated_tokens)] = torch.tensor(output.generated_tokens)
        logps[row, : len(output.logprobs)] = torch.tensor(output.logprobs)
    if sampler is not None:
        sampler.record.extend(logps.unbind(1))  # [B] per step, as the token sampler records them
    return sequences


def decode_child(a):
    """One variant in this process: ms per decode step (prefill subtracted) on a random bf16 (CUDA) or float32
    (CPU) model of the config with --layers blocks, B rows of random prompts with left padding."""
    from transformers import AutoModelForCausalLM
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    config = sliced_config(a.config, a.layers)
    attention = "sdpa" if a.only == "generate-sdpa" else grpo.register_decode_attention()  # the merged sampler's
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(1000, min(100000, config.vocab_size), (a.batch, a.prompt_tokens), generator=generator)
    lengths = torch.randint(max(1, a.prompt_tokens - 40), a.prompt_tokens + 1, (a.batch,), generator=generator)
    prompt_mask = (torch.arange(a.prompt_tokens)[None, :] >= (a.prompt_tokens - lengths)[:, None]).long()  # left padding
    prompt_ids, prompt_mask = (prompt_ids * prompt_mask).to(device), prompt_mask.to(device)

    def run(new_tokens, greedy=False):
        if a.only in ("static-loop", "cuda-graph", "continuous-batching"):
            # graph_generate and batch_generate read min_new_tokens from here: every row runs the full length, as below
            model.generation_config.min_new_tokens = new_tokens
            sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0)
            loop = (functools.partial(graph_generate, model, a.only == "cuda-graph") if a.only != "continuous-batching"
                    else functools.partial(batch_generate, model))
            return loop(prompt_ids, prompt_mask, new_tokens, [151643, 151645], 0, **sampling)[:, prompt_ids.shape[1]:]
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        cache = dict(cache_implementation="static") if a.only == "generate-static" else {}  # compiled by transformers
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, repetition_penalty=1.0, **sampling, **cache)
        return out[:, prompt_ids.shape[1]:]

    def timed(new_tokens):
        synchronize()
        start = time.perf_counter()
        run(new_tokens)
        synchronize()
        return time.perf_counter() - start
    record = {"variant": a.only, "attention": "paged sdpa" if a.only == "continuous-batching" else attention,
              "layers": config.num_hidden_layers, "batch": a.batch, "prompt_tokens": a.prompt_tokens,
              "new_tokens": a.new_tokens, "device": device.type, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu"}
    if a.check:  # greedy tokens against transformers' generate on the same weights and attention
        reference = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=a.check,
                                   min_new_tokens=a.check, do_sample=False, pad_token_id=0)[:, prompt_ids.shape[1]:]
        record["greedy_tokens_equal_to_generate"] = float((run(a.check, greedy=True) == reference).float().mean())
    record["first_call_s"] = round(timed(8), 3)  # warm-up: CUDA init, compilation for generate-static
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # The prefill baseline is the fastest of three calls: a call's fixed cost jitters (continuous batching's
    # scheduler: ~1 s ± 0.1 s per call on a CPU), and one slow baseline would make a short decode look negative.
    prefill = min(timed(1) for _ in range(3))
    full = timed(a.new_tokens)
    record.update(prefill_s=round(prefill, 3), total_s=round(full, 3),
                  ms_per_decode_step=round(1000 * (full - prefill) / (a.new_tokens - 1), 2),
                  peak_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None)
    print(json.dumps(record), flush=True)
    return record


def decode_main(a):
    if a.only:
        return decode_child(a)
    records = []
    for variant in a.variants.split(","):
        if variant not in DECODE_VARIANTS:
            raise SystemExit(f"bench.py: error: --variants: unknown {variant!r}; choose from {', '.join(DECODE_VARIANTS)}")
        if variant == "cuda-graph" and a.device != "cuda":
            print(json.dumps({"variant": variant, "skipped": "CUDA graphs need a CUDA device"}), flush=True)
            continue
        if variant == "continuous-batching" and not continuous_batching_available():
            print(json.dumps({"variant": variant, "skipped": "this transformers has no generate_batch"}), flush=True)
            continue
        command = [sys.executable, os.path.abspath(__file__), "decode", "--only", variant, "--config", a.config,
                   "--layers", str(a.layers), "--batch", str(a.batch), "--prompt-tokens", str(a.prompt_tokens),
                   "--new-tokens", str(a.new_tokens), "--device", a.device, "--check", str(a.check)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            print(json.dumps({"variant": variant, "failed": result.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        records.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    return records


# -----------------------------------------------------------------------------
# step: real GRPO steps through grpo.py's functions on a random-weight model.


def sliced_config(config_path, layers=0):
    """config_path's config, with `layers` blocks instead of its own when > 0 (same width and vocabulary)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(config_path)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "max_window_layers", None):
            config.max_window_layers = min(config.max_window_layers, layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def build_random_model(config_path, tokenizer, model_dir, device, seed=0, layers=0):
    """Random weights of config_path's architecture (with `layers` blocks instead of the config's when > 0:
    the same width and vocabulary, fewer layers), saved with the tokenizer so grpo.load_model reads it
    exactly like a downloaded checkpoint."""
    from transformers import AutoModelForCausalLM
    config = sliced_config(config_path, layers)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"bench.py: error: the tokenizer has {len(tokenizer)} tokens, more than the config's "
                         f"vocab_size {config.vocab_size}")
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if device.type != "cuda" and parameters > 2e9:
        raise SystemExit(f"bench.py: error: {config_path} has {parameters / 1e9:.1f}B parameters: run it on a CUDA GPU")
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(model_dir)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return parameters


def random_prompts(tokenizer, count, length, seed=0):
    """Random-token prompt strings, step's and trl's (same seed -> the same prompts). Decoded
    and re-tokenized, so the prompt length in tokens is close to, not exactly, `length`."""
    rng = random.Random(seed)
    high = min(150000, len(tokenizer))
    low = min(1000, high // 10)
    return [tokenizer.decode([rng.randrange(low, high) for _ in range(length)]) for _ in range(count)], rng


def lora_snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def print_settings(variant, model_dir, prompts, model, run):
    """One JSON line of the settings a run really used, step's and trl's alike (a test holds the two equal): `run`
    (batch, sampling, loss: read from the run's own config object) and what the loaded model is, read back from
    it: its 4-bit layers and quantization, LoRA adapters, gradient checkpointing, the prompts (a digest)."""
    import bitsandbytes as bnb
    base = model.get_base_model()
    quantization = base.config.quantization_config
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    lora = model.peft_config["default"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    settings = {"variant": variant, "model_dir": os.path.abspath(model_dir), **run,
                "prompts_sha256": hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16],
                "linears_4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
                "quant_type": quantization["bnb_4bit_quant_type"], "double_quant": quantization["bnb_4bit_use_double_quant"],
                "compute_dtype": str(quantization["bnb_4bit_compute_dtype"]), "lora_rank": lora.r,
                "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout, "lora_targets": sorted(lora.target_modules),
                "trainable_parameters": sum(p.numel() for p in trainable), "adapter_dtype": str(trainable[0].dtype),
                "gradient_checkpointing": base.is_gradient_checkpointing}
    print(json.dumps({"settings": settings}), flush=True)
    return settings


@contextlib.contextmanager
def measure_phase(device, seconds, peaks, used, name):
    """Adds the region's seconds to seconds[name] and keeps the highest peak (μ > 1 repeats phases)."""
    with Peak(device) as p:
        yield
    seconds[name] += p.seconds
    peaks[name] = max(peaks[name], p.peak)
    used.add(name)


PHASES = ("generation", "reference", "old", "policy", "optimizer")
PHASE_TITLES = {"generation": "generation (generate)", "reference": "reference log-probs (β > 0)",
                "old": "old log-probs (μ > 1)", "policy": "policy forward+backward", "optimizer": "optimizer (clip+AdamW)"}


def gsm8k_lengths(path, tokenizer, scale):
    """Token lengths of GSM8K questions (as grpo prompts) and of its reference answers (without the <<...>>
    calculator annotations, which models do not write), answers × scale."""
    import re
    items = [json.loads(line) for line in open(path)]
    prompts = [len(tokenizer(grpo.build_prompt({"prompt": x["question"], "answer": "0"}, tokenizer),
                             add_special_tokens=False)["input_ids"]) for x in items]
    answers = [max(1, round(scale * len(tokenizer(re.sub(r"<<[^>]*>>", "", x["answer"]), add_special_tokens=False)["input_ids"])))
               for x in items]
    return prompts, answers


def plan_costs(lengths, micro_batch, micro_batch_tokens=0) -> list[int]:
    """Padded tokens of each micro-batch grpo forms: its size × its longest (sequence_logprobs trims the rest)."""
    return [len(rows) * max(lengths[i] for i in rows) for rows in grpo.micro_batch_plan(lengths, micro_batch, micro_batch_tokens)]


def plan_main(a):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or DEFAULT_TOKENIZER)
    prompt_lengths, answer_lengths = gsm8k_lengths(a.gsm8k, tokenizer, a.length_scale)
    rng = random.Random(a.seed)
    steps, widths = [], []
    for _ in range(a.steps):
        prompt_width = max(rng.sample(prompt_lengths, a.prompts))  # left-padded to the step's longest prompt
        widths.append(prompt_width)
        completions = [min(a.new_tokens, rng.choice(answer_lengths)) for _ in range(a.prompts * a.group)]
        steps.append([prompt_width + c for c in completions])  # what grpo.sequence_lengths returns
    fixed = [plan_costs(lengths, a.micro_batch) for lengths in steps]
    budget = max(max(c) for c in fixed)  # the fixed plan's peak micro-batch, over all simulated steps
    budgeted = [plan_costs(lengths, a.micro_batch, budget) for lengths in steps]
    real = statistics.mean(sum(lengths) for lengths in steps)
    print(f"GSM8K-like lengths ({a.gsm8k}, answers × {a.length_scale}), {a.steps} steps of {a.prompts} prompts × "
          f"G={a.group}: padded prompt width mean {statistics.mean(widths):.0f}; completion mean "
          f"{statistics.mean(answer_lengths):.0f}, max {max(answer_lengths)} (cut at {a.new_tokens})")
    print(f"{'plan':<30} | padded tokens/step | completion padding | forwards/step | peak micro-batch tokens")
    for name, costs in ((f"--micro-batch {a.micro_batch}", fixed), (f"--micro-batch-tokens {budget}", budgeted)):
        padded = statistics.mean(sum(c) for c in costs)
        print(f"{name:<30} | {padded:>18,.0f} | {1 - real / padded:>18.1%} | {statistics.mean(len(c) for c in costs):>13.1f} "
              f"| {max(max(c) for c in costs):>23,}")
    print(f"{'(prompt + real completion)':<30} | {real:>18,.0f} |")


# Settings a --variants entry may change; the rest come from the command line.
VARIANT_KEYS = ("name", "generation_model", "offload_activations", "prompts", "group", "new_tokens", "micro_batch",
                "steps", "warmup_new_tokens", "reuse_rollout", "generation_chunk", "attention", "decode")


def step_args(a, model_dir, device, variant, new_tokens):
    return grpo.Args(model=model_dir, device=device.type, prompts_per_step=variant["prompts"], group_size=variant["group"],
                     max_new_tokens=new_tokens, temperature=a.temperature, micro_batch=variant["micro_batch"],
                     micro_batch_tokens=a.micro_batch_tokens, beta=a.beta,
                     num_iterations=a.num_iterations, lora_rank=a.lora_r, lora_alpha=2 * a.lora_r, lr=a.lr,
                     steps=max(1, variant["steps"]), seed=a.seed, generation_chunk=variant["generation_chunk"],
                     logprob_memory_mb=a.logprob_memory_mb, gradient_checkpointing=a.gradient_checkpointing,
                     offload_activations=variant["offload_activations"], generation_model=variant["generation_model"])


# --inject-oom N: the policy pass of the N-th measured step runs out of memory once, after the forward of its
# LAST micro-batch (the worst case: every other micro-batch is redone), as a CUDA OOM would be raised.
INJECTION = {"at": 0, "calls": 0}


def sequence_logprobs_running_out(*positional, real=grpo.sequence_logprobs, **keywords):
    logprobs = real(*positional, **keywords)
    if INJECTION["at"] and torch.is_grad_enabled():
        INJECTION["calls"] += 1
        if INJECTION["calls"] == INJECTION["at"]:
            INJECTION["at"] = 0
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by bench.py --inject-oom)")
    return logprobs


def bench_step(model, sampler, tokenizer, prompts, args, eos_ids, optimizer, rng, device, a, batch=None, inject_oom=False,
               completion_lengths=None):
    """One GRPO step through grpo.py's functions, timed per phase. With `batch` (a previous step's rollout)
    generation is skipped and that batch is trained on again (to compare training settings on one rollout).
    a.random_completions skips generation (random tokens); completion_lengths cuts completions (an EOS where
    each one ends) to lengths drawn from that list; inject_oom makes the policy pass run out of memory once."""
    seconds, peaks, used = {k: 0.0 for k in PHASES}, {k: 0 for k in PHASES}, set()
    phase = functools.partial(measure_phase, device, seconds, peaks, used)
    parameters = [p for p in model.parameters() if p.requires_grad]
    step_start = time.perf_counter()
    chunk = None
    if batch is None:
        if a.random_completions:  # the training passes cost the same whatever the tokens: skip decoding
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            completion_ids = torch.randint(1000, 100000, (len(prompts), args.max_new_tokens))
            rollout = {"prompt_ids": encoded["input_ids"], "prompt_mask": encoded["attention_mask"],
                       "completion_ids": completion_ids, "completion_mask": torch.ones(completion_ids.shape)}
        else:
            if not a.allow_eos:  # the worst case, and a fixed workload: every completion runs to max_new_tokens
                for config in {id(c): c for c in (sampler.generation_config, model.get_base_model().generation_config)}.values():
                    config.min_new_tokens = args.max_new_tokens
            with phase("generation"):
                rollout = grpo.generate(sampler, tokenizer, prompts, args, eos_ids, args.temperature)
            chunk = rollout.get("generation_chunk")
            if sampler is not model:
                grpo.release_generation_model(model, sampler)  # as grpo_step: refreshed after the update
        if completion_lengths:  # GSM8K-like lengths for the training passes: an EOS where each one ends
            for i in range(len(prompts)):
                rollout["completion_ids"][i, min(args.max_new_tokens, rng.choice(completion_lengths)) - 1] = eos_ids[0]
            rollout["completion_mask"], _ = grpo.completion_mask_from_ids(rollout["completion_ids"], eos_ids)
        rewards = torch.tensor([rng.random() for _ in prompts])  # random: non-zero advantages
        advantages = grpo.group_advantages(rewards, args.group_size, scale=args.scale_advantages)
        batch = {"prompt_ids": rollout["prompt_ids"], "prompt_mask": rollout["prompt_mask"],
                 "completion_ids": rollout["completion_ids"], "completion_mask": rollout["completion_mask"],
                 "loss_mask": rollout["completion_mask"], "advantages": advantages,
                 **{k: rollout[k] for k in ("sampler_logp",) if k in rollout and not completion_lengths}}  # as grpo_step
        batch = {k: v.to(device) for k, v in batch.items()}
    batch = {k: v for k, v in batch.items() if k not in ("ref_logp", "old_logp")}
    if args.beta != 0:
        with phase("reference"):
            batch["ref_logp"] = grpo.with_memory_retry(
                lambda: grpo.batch_logprobs(model, batch, args, args.temperature, reference=True),
                model, batch, args, "reference pass")
    if args.num_iterations > 1:
        with phase("old"):
            batch["old_logp"] = grpo.with_memory_retry(lambda: grpo.batch_logprobs(model, batch, args, args.temperature),
                                                       model, batch, args, "old log-prob pass")
    denominator = grpo.loss_denominator(batch["loss_mask"], args.agg, args.max_new_tokens)
    for _ in range(args.num_iterations):
        with phase("policy"):
            optimizer.zero_grad(set_to_none=True)
            if inject_oom:
                INJECTION["calls"], INJECTION["at"] = 0, len(grpo.micro_batch_plan(grpo.sequence_lengths(batch), args.micro_batch,
                                                             args.micro_batch_tokens))
                inject_oom = False
            stats = grpo.with_memory_retry(
                lambda: grpo.accumulate_gradients(model, batch, args, args.temperature, denominator),
                model, batch, args, "policy forward/backward")
        with phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
    if sampler is not model:
        grpo.refresh_generation_model(model, sampler)
    total = time.perf_counter() - step_start
    generated = int(batch["completion_mask"].sum())
    record = {"seconds": {k: round(seconds[k], 3) for k in PHASES if k in used},
              "peak_gib": {k: round(peaks[k] / GiB, 3) for k in PHASES if k in used},
              "step_seconds": round(total, 3), "peak_gib_max": round(max(peaks[k] for k in used) / GiB, 3),
              "generated_tokens": generated, "prompt_tokens": int(batch["prompt_ids"].shape[1]),
              "completion_tokens": int(batch["completion_ids"].shape[1]), "generation_chunk": chunk,
              "generated_tokens_per_s": round(generated / seconds["generation"], 1) if "generation" in used else None,
              "loss": stats.get("loss"), "kl": stats.get("kl"), "grad_norm": float(grad_norm),
              "sampler_logp_abs_diff": stats.get("sampler_logp_abs_diff"), "sampler_kl": stats.get("sampler_kl"),
              "micro_batch": args.micro_batch, "micro_batch_tokens": args.micro_batch_tokens,
              "padded_tokens": sum(plan_costs(grpo.sequence_lengths(batch), args.micro_batch, args.micro_batch_tokens))}
    return record, batch


def device_and_tokenizer(a):
    """step's and trl's device (cuda when available), thread count and tokenizer (--tokenizer, else the
    config's directory when it holds one, else ../shared/qwen2.5-tokenizer, else Qwen/Qwen2.5-14B's from the Hub)."""
    from transformers import AutoTokenizer
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    config_dir = os.path.dirname(os.path.abspath(a.config))
    has_tokenizer = os.path.exists(os.path.join(config_dir, "tokenizer.json"))
    tokenizer_dir = a.tokenizer or (config_dir if has_tokenizer else DEFAULT_TOKENIZER)
    return device, AutoTokenizer.from_pretrained(tokenizer_dir)


def saved_model_dir(a, tokenizer, device):
    """--model-dir, or a temporary directory; the random model is built and saved there unless it already holds
    one, so step and trl given the same --model-dir load the same weights. Returns (directory, delete it after)."""
    model_dir = a.model_dir or tempfile.mkdtemp(prefix="bench-random-model-")
    start = time.perf_counter()
    if os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"reusing the random model in {model_dir}", flush=True)
    else:
        try:
            parameters = build_random_model(a.config, tokenizer, model_dir, device, a.seed, a.layers)
        except BaseException:
            if not a.model_dir:
                shutil.rmtree(model_dir, ignore_errors=True)
            raise
        print(json.dumps({"built": model_dir, "parameters": parameters, "layers": a.layers or "config",
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return model_dir, not a.model_dir


def step_main(a):
    device, tokenizer = device_and_tokenizer(a)
    if a.naive_gather:
        grpo.token_logprobs = naive_token_logprobs  # sequence_logprobs looks it up at call time
    base = {"name": "", "generation_model": a.generation_model, "offload_activations": a.offload_activations,
            "prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens, "micro_batch": a.micro_batch,
            "steps": a.steps, "warmup_new_tokens": a.warmup_new_tokens, "reuse_rollout": False,
            "generation_chunk": a.generation_chunk, "attention": "", "decode": "generate"}
    variants = []
    for v in json.loads(a.variants) if a.variants else [{}]:
        unknown = set(v) - set(VARIANT_KEYS)
        if unknown:
            raise SystemExit(f"bench.py: error: --variants: unknown keys {sorted(unknown)}; allowed: {', '.join(VARIANT_KEYS)}")
        variants.append({**base, **v})
    model_dir, cleanup = saved_model_dir(a, tokenizer, device)
    try:
        for v in variants:
            grpo.check_args(step_args(a, model_dir, device, v, v["new_tokens"]))
        load_start = time.perf_counter()
        grpo.seed_everything(a.seed)
        # Reloads it: 4-bit NF4 + LoRA, grpo.py's own path. generation_model and offload do not affect loading.
        model, tokenizer = grpo.load_model(step_args(a, model_dir, device, variants[0], a.new_tokens), device)
        weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()
        layers = model.get_base_model().config.num_hidden_layers
        print(json.dumps({"loaded_seconds": round(time.perf_counter() - load_start, 1), "layers": layers,
                          "weights_gib": round(weights / GiB, 2),
                          "weights_kind": "CUDA allocated" if device.type == "cuda" else "process RSS"}), flush=True)
        eos_ids = grpo.end_of_sequence_ids(model, tokenizer)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
        before = lora_snapshot(model)
        records, batch, measured = [], None, 0
        completion_lengths = gsm8k_lengths(a.lengths_from, tokenizer, 1.0)[1] if a.lengths_from else None
        grpo.sequence_logprobs = sequence_logprobs_running_out  # accumulate_gradients looks it up at call time
        for index, v in enumerate(variants):
            sampler = grpo.build_generation_model(model) if v["generation_model"] == "merged" else model
            if v["attention"]:  # e.g. "sdpa": the merged sampler with transformers' own attention, for the A/B
                sampler.config._attn_implementation = v["attention"]
            if v["decode"] != "generate":  # graph_generate or batch_generate stands in for sampler.generate
                if v["decode"] not in ("static-loop", "cuda-graph", "continuous-batching"):
                    raise SystemExit(f"bench.py: error: decode {v['decode']!r}: choose generate, static-loop, cuda-graph "
                                     "or continuous-batching")
                if v["decode"] == "continuous-batching" and not continuous_batching_available():
                    raise SystemExit("bench.py: error: decode continuous-batching: this transformers has no generate_batch")
                # The merged sampler, or the 4-bit policy itself (its decode step captured with bitsandbytes' kernels)
                sampler.generate = (functools.partial(batch_generate, sampler) if v["decode"] == "continuous-batching" else
                                    functools.partial(graph_generate, sampler, v["decode"] == "cuda-graph"))
            prompts, rng = random_prompts(tokenizer, v["prompts"], a.prompt_tokens, a.seed)
            group_prompts = [q for q in prompts for _ in range(v["group"])]  # groups contiguous, as grpo.main
            name = v["name"] or f"variant {index + 1}"
            print(f"{name}: {v['prompts']} prompts × G={v['group']} = {len(group_prompts)} sequences, ~{a.prompt_tokens} "
                  f"prompt + {v['new_tokens']} new tokens{'' if a.allow_eos else ' (EOS suppressed: all max length)'}, "
                  f"micro-batch {v['micro_batch']}, β={a.beta}, μ={a.num_iterations}, LoRA r={a.lora_r}, sampler "
                  f"{v['generation_model']}, offload {v['offload_activations']}, gather "
                  f"{'NAIVE' if a.naive_gather else 'fused'}, {layers} layers, device {device}", flush=True)
            args = step_args(a, model_dir, device, v, v["new_tokens"])
            print_settings(name, model_dir, prompts, model, {
                "sequences": args.prompts_per_step * args.group_size, "group": args.group_size, "micro_batch": args.micro_batch,
                "new_tokens": args.max_new_tokens, "min_new_tokens": 0 if a.allow_eos else args.max_new_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "beta": args.beta, "num_iterations": args.num_iterations,
                "lr": args.lr, "max_grad_norm": args.max_grad_norm})
            schedule = ([("warmup", v["warmup_new_tokens"])] if v["warmup_new_tokens"] and not v["reuse_rollout"] else [])
            schedule += [("measured", v["new_tokens"])] * v["steps"]
            for number, (kind, new_tokens) in enumerate(schedule, 1):
                args = step_args(a, model_dir, device, v, new_tokens)
                reuse = batch if (v["reuse_rollout"] and batch is not None) else None
                measured += kind == "measured"
                record, batch = bench_step(model, sampler, tokenizer, group_prompts, args, eos_ids, optimizer, rng,
                                           device, a, reuse, inject_oom=kind == "measured" and measured == a.inject_oom,
                                           completion_lengths=completion_lengths)
                record = {"step": number, "variant": name, "warmup": kind == "warmup", "layers": layers,
                          "sampler": v["generation_model"], "offload": v["offload_activations"],
                          "attention": sampler.config._attn_implementation if sampler is not model else "policy",
                          "decode": v["decode"],
                          "sequences": len(group_prompts), "new_tokens": new_tokens,
                          "reused_rollout": reuse is not None, "device": device.type,
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "gather": "naive" if a.naive_gather else "fused",
                          "memory_kind": "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS (process)",
                          **record}
                records.append(record)
                print(json.dumps(record), flush=True)
            vars(sampler).pop("generate", None)  # the class's generate again (the policy serves the next variant too)
            del sampler
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        after = lora_snapshot(model)
        lora_change = max(float((after[k] - before[k]).abs().max()) for k in before)
        print(json.dumps({"lora_max_abs_change": lora_change, "trainable_tensors": len(before)}), flush=True)
        print_step_table([r for r in records if not r["warmup"]], device)
        return records
    finally:
        if cleanup:
            shutil.rmtree(model_dir, ignore_errors=True)


def print_step_table(records, device):
    memory = "peak CUDA alloc GiB" if device.type == "cuda" else "peak RSS GiB (CPU)"
    columns = "".join(f" | {r['variant'][:10]} {r['step']} s | {memory}" for r in records)
    print(f"\n{'phase':<30}{columns}")
    for name in PHASES:
        if not any(name in r["seconds"] for r in records):
            continue
        cell = lambda values, width: f"{values[name]:>{width}.2f}" if name in values else f"{'-':>{width}}"  # noqa: E731
        cells = "".join(f" | {cell(r['seconds'], len(r['variant'][:10]) + 6)} | {cell(r['peak_gib'], len(memory))}"
                        for r in records)
        print(f"{PHASE_TITLES[name]:<30}{cells}")
    cells = "".join(f" | {r['step_seconds']:>{len(r['variant'][:10]) + 6}.2f} | {r['peak_gib_max']:>{len(memory)}.2f}"
                    for r in records)
    print(f"{'step total (incl. measuring)':<30}{cells}")
    print("generated tokens/s: " + ", ".join(f"{r['variant']} step {r['step']}: {r['generated_tokens_per_s'] or 0:.0f} "
                                             f"({r['generated_tokens']} tokens)" for r in records))


# -----------------------------------------------------------------------------
# trl: TRL's GRPOTrainer on the same saved model, with the same settings, for the side by side with step.


def trl_main(a):
    """TRL's GRPOTrainer, as a TRL user runs it (the model loaded 4-bit by from_pretrained, LoRA from a peft_config,
    one reward function), on the random model `bench.py step` saves (the same --model-dir, built here if missing)
    and step's settings: B prompts × G (the same random prompts), --new-tokens with EOS suppressed, β, μ, lr, LoRA
    r / 2r on all linear layers, NF4 + double quant (compute dtype as grpo.load_model), micro-batch (gradient
    accumulation to B·G), temperature, grpo's default loss (TRL's loss_type "grpo"), gradient clipping, random
    rewards. Prints the settings read back from the trainer, then one record per step in step's format (phases:
    see trl_phase_clock), peak memory over the whole step."""
    try:
        import datasets
        import trl
    except ImportError as e:
        raise SystemExit(f"bench.py trl: TRL is not installed ({e.name} is missing): pip install trl")
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    device, tokenizer = device_and_tokenizer(a)
    sequences = a.prompts * a.group
    if sequences % a.micro_batch:
        raise SystemExit(f"bench.py trl: error: --micro-batch {a.micro_batch} must divide B·G = {sequences} "
                         f"(TRL accumulates whole micro-batches)")
    model_dir, cleanup = saved_model_dir(a, tokenizer, device)
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    try:
        load_start = time.perf_counter()
        model = load_4bit_for_trl(model_dir, device)
        tokenizer.padding_side = "left"
        eos_ids = grpo.end_of_sequence_ids(model, tokenizer)  # step's: every one is held back until --new-tokens
        prompts, rng = random_prompts(tokenizer, a.prompts, a.prompt_tokens, a.seed)  # step's prompts, step's seed
        dataset = datasets.Dataset.from_list([{"prompt": q} for q in prompts] * (a.steps * a.num_iterations + 1))

        def random_reward(completions, **unused):  # non-zero advantages, as step's random rewards
            return [rng.random() for _ in completions]
        config = trl.GRPOConfig(
            output_dir=out_dir, use_cpu=device.type == "cpu", bf16=device.type == "cuda", seed=a.seed,
            per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=sequences // a.micro_batch,
            num_generations=a.group, max_completion_length=a.new_tokens, temperature=a.temperature, top_p=grpo.Args.top_p,
            generation_kwargs=None if a.allow_eos else {"min_new_tokens": a.new_tokens, "eos_token_id": eos_ids},
            beta=a.beta, num_iterations=a.num_iterations, loss_type="grpo", learning_rate=a.lr, lr_scheduler_type="constant",
            max_grad_norm=grpo.Args.max_grad_norm, gradient_checkpointing=a.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False}, max_steps=a.steps * a.num_iterations,
            logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=False, disable_tqdm=True)
        lora = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # as step gives grpo.load_model
        trainer = trl.GRPOTrainer(model=model, reward_funcs=random_reward, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=lora)
        for printer in (PrinterCallback, ProgressCallback):  # TRL's own log lines: the records say it all
            trainer.remove_callback(printer)
        model = trainer.model
        layers = model.get_base_model().config.num_hidden_layers
        weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()
        print(json.dumps({"loaded_seconds": round(time.perf_counter() - load_start, 1), "layers": layers, "trl": trl.__version__,
                          "weights_gib": round(weights / GiB, 2),
                          "weights_kind": "CUDA allocated" if device.type == "cuda" else "process RSS"}), flush=True)
        records, before = [], lora_snapshot(model)
        trainer.add_callback(trl_step_records(a, trainer, device, model_dir, prompts, tokenizer, records))
        print(f"trl {trl.__version__}: {a.prompts} prompts × G={a.group} = {sequences} sequences, ~{a.prompt_tokens} prompt + "
              f"{a.new_tokens} new tokens{'' if a.allow_eos else ' (EOS suppressed: all max length)'}, micro-batch "
              f"{a.micro_batch}, β={a.beta}, μ={a.num_iterations}, LoRA r={a.lora_r}, {layers} layers, device {device}",
              flush=True)
        trainer.train()
        after = lora_snapshot(model)
        print(json.dumps({"lora_max_abs_change": max(float((after[k].float() - before[k].float()).abs().max()) for k in before),
                          "trainable_tensors": len(before)}), flush=True)
        print_step_table(records, device)
        return records
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if cleanup:
            shutil.rmtree(model_dir, ignore_errors=True)


def load_4bit_for_trl(model_dir, device):
    """The saved model in 4-bit, as a TRL user loads it, with grpo.load_model's quantization config."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as grpo.load_model
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=compute_dtype,
                                                 device_map={"": device})
    if device.type == "cpu":  # bitsandbytes' CPU trap, switched off as grpo.load_model does (see there)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def trl_phase_clock(trainer, device):
    """Seconds per phase of TRL's step, by wrapping the trainer's own methods: generation (_generate), reference
    (the log-prob passes without grad: with μ > 1 they include the old log-probs), training_step and
    _prepare_inputs (policy forward + backward = the first minus the second, which generates and scores)."""
    seconds = {k: 0.0 for k in ("generation", "reference", "training_step", "prepare_inputs")}
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(name, method, when=lambda: True):
        def wrapper(*positional, **keywords):
            if not when():
                return method(*positional, **keywords)
            synchronize()  # CUDA's queue drained at both ends, as step's phases (not Peak: it would reset the step's)
            start = time.perf_counter()
            result = method(*positional, **keywords)
            synchronize()
            seconds[name] += time.perf_counter() - start
            return result
        return wrapper
    trainer._generate = timed("generation", trainer._generate)
    trainer._get_per_token_logps_and_entropies = timed("reference", trainer._get_per_token_logps_and_entropies,
                                                       when=lambda: not torch.is_grad_enabled())
    trainer.training_step = timed("training_step", trainer.training_step)
    trainer._prepare_inputs = timed("prepare_inputs", trainer._prepare_inputs)
    return seconds


def trl_step_records(a, trainer, device, model_dir, prompts, tokenizer, records):
    """A TrainerCallback: prints the settings at train begin, then appends and prints one record per GRPO step (one
    rollout and μ optimizer steps) in step's format: phase seconds, the step's seconds and peak memory."""
    import trl
    from transformers import TrainerCallback
    seconds, model, sequences = trl_phase_clock(trainer, device), trainer.model, a.prompts * a.group
    prompt_tokens = max(len(ids) for ids in tokenizer(prompts)["input_ids"])  # what TRL tokenizes them to

    class StepRecords(TrainerCallback):
        logs, peak = {}, None

        def on_train_begin(self, args, state, control, **unused):
            print_settings("trl", model_dir, prompts, model, {
                "sequences": args.generation_batch_size, "group": args.num_generations,
                "micro_batch": args.per_device_train_batch_size, "new_tokens": args.max_completion_length,
                "min_new_tokens": trainer.generation_config.min_new_tokens or 0, "temperature": args.temperature,
                "top_p": args.top_p, "beta": args.beta, "num_iterations": args.num_iterations,
                "lr": args.learning_rate, "max_grad_norm": args.max_grad_norm})

        def on_step_begin(self, args, state, control, **unused):
            if state.global_step % a.num_iterations == 0:
                seconds.update({k: 0.0 for k in seconds})
                self.logs, self.peak = {}, Peak(device).__enter__()

        def on_step_end(self, args, state, control, **unused):
            if state.global_step % a.num_iterations == 0:
                self.peak.__exit__(None, None, None)

        def on_log(self, args, state, control, logs=None, **unused):  # after on_step_end: the step's loss and kl
            self.logs.update(logs or {})
            if state.global_step % a.num_iterations or "loss" not in (logs or {}) or self.peak is None:
                return
            p, self.peak = self.peak, None
            generated = round(self.logs.get("completions/mean_length", 0) * sequences)
            phases = {"generation": seconds["generation"], "reference": seconds["reference"],
                      "policy": seconds["training_step"] - seconds["prepare_inputs"]}
            record = {"step": len(records) + 1, "variant": "trl", "warmup": False,
                      "layers": model.get_base_model().config.num_hidden_layers, "sampler": "policy", "offload": False,
                      "attention": model.config._attn_implementation, "decode": "generate", "sequences": sequences,
                      "new_tokens": a.new_tokens, "reused_rollout": False, "device": device.type,
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gather": "trl",
                      "memory_kind": p.kind + " (over the whole step)",
                      "seconds": {k: round(v, 3) for k, v in phases.items() if v > 0}, "peak_gib": {},
                      "step_seconds": round(p.seconds, 3), "peak_gib_max": round(p.peak / GiB, 3),
                      "generated_tokens": generated, "prompt_tokens": prompt_tokens, "completion_tokens": a.new_tokens,
                      "generation_chunk": None,
                      "generated_tokens_per_s": round(generated / phases["generation"], 1) if phases["generation"] else None,
                      "loss": self.logs.get("loss"), "kl": self.logs.get("kl"), "grad_norm": self.logs.get("grad_norm"),
                      "micro_batch": a.micro_batch, "micro_batch_tokens": 0, "padded_tokens": None, "trl": trl.__version__}
            records.append(record)
            print(json.dumps(record), flush=True)
    return StepRecords()


# -----------------------------------------------------------------------------
# suite: the whole GPU measurement as one budgeted command (see the module docstring).


def environment(device):
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device.type, "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 1)
    for package in ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets"):
        try:
            info[package] = __import__(package).__version__
        except Exception as e:  # a missing or broken package is a fact to record, not a reason to stop
            info[package] = f"unavailable ({type(e).__name__})"
    return info


def suite_plan(a, device):
    """The measurements, most important first: each one command, run in its own process."""
    here = os.path.abspath(__file__)
    config = json.load(open(a.config))
    full_layers = config["num_hidden_layers"]
    model_dir = lambda layers: os.path.join(a.models_dir, f"layers{layers}")  # noqa: E731 (one line)
    common = ["--config", a.config, "--tokenizer", a.tokenizer, "--device", device.type, "--prompt-tokens",
              str(a.prompt_tokens), "--beta", str(a.beta), "--micro-batch", str(a.micro_batch)]
    short = {"prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens}
    long = {"prompts": a.long_prompts, "group": a.group, "new_tokens": a.long_new_tokens}
    plan = [("gather", [sys.executable, here, "gather", "--tokens", str(a.gather_tokens), "--hidden", str(config["hidden_size"]),
                        "--vocab", str(config["vocab_size"]), "--dtype", "bfloat16" if device.type == "cuda" else "float32",
                        "--device", device.type, "--repeat", "3", "--compare-copy"])]

    def ours(name, layers, variants):
        return (name, [sys.executable, here, "step", *common, "--layers", str(layers), "--model-dir", model_dir(layers),
                       "--variants", json.dumps(variants)])

    def trl(name, layers, sizes, steps):  # TRL's GRPOTrainer on the model directory ours uses (built by whichever runs first)
        return (name, [sys.executable, here, "trl", *common, "--layers", str(layers), "--model-dir", model_dir(layers),
                       "--prompts", str(sizes["prompts"]), "--group", str(sizes["group"]),
                       "--new-tokens", str(sizes["new_tokens"]), "--steps", str(steps)])

    def decode(name, layers, variants, check):
        return (name, [sys.executable, here, "decode", "--config", a.config, "--layers", str(layers), "--device", device.type,
                       "--batch", str(a.prompts * a.group), "--prompt-tokens", str(a.prompt_tokens + 24),
                       "--new-tokens", str(a.decode_new_tokens), "--variants", variants, "--check", str(check)])

    warm = {"warmup_new_tokens": a.warmup_new_tokens, "steps": 1}
    # ms per decode step, every decoding variant (bench.py decode); ~280 prompt tokens like the steps' prompts
    plan.append(decode("decode-slice", a.slice_layers or full_layers, ",".join(DECODE_VARIANTS), a.decode_check))
    plan.append(decode("decode-full", full_layers, "generate-sdpa,generate,cuda-graph,continuous-batching", 0))
    if a.slice_layers:  # the side by side with TRL: same width and vocabulary, fewer layers
        plan.append(ours("slice-ours", a.slice_layers, [{"name": "policy", "steps": 2, **short},
                                                        {"name": "merged", "generation_model": "merged", "steps": 2, **short}]))
        plan.append(trl("slice-trl", a.slice_layers, short, 2))
    # Our step with the CUDA-graph decoding loop instead of generate (bench.py decode; CPU: the same loop, no graph)
    graph = {"generation_model": "merged", "decode": "cuda-graph" if device.type == "cuda" else "static-loop"}
    # ... and with the 4-bit policy as the sampler (no 26 GB dense copy: the memory goal's path), decoded the same way
    graph_policy = {**graph, "generation_model": "policy"}
    # ... and with transformers' continuous batching (generate_batch, paged attention), both samplers
    paged, paged_policy = {"generation_model": "merged", "decode": "continuous-batching"}, {"decode": "continuous-batching"}
    if a.slice_layers:
        plan.append(ours("slice-graph", a.slice_layers, [{"name": "graph", "steps": 2, **graph, **short},
                                                         {"name": "graph policy", "steps": 2, **graph_policy, **short}]))
        plan.append(ours("slice-paged", a.slice_layers, [{"name": "paged", "steps": 2, **paged, **short},
                                                         {"name": "paged policy", "steps": 2, **paged_policy, **short}]))
    plan.append(ours("full-graph", full_layers, [{"name": "graph", **warm, **graph, **short}]))
    plan.append(ours("full-paged", full_layers, [{"name": "paged", **warm, **paged, **short}]))
    plan.append(ours("full-ours", full_layers, [{"name": "merged", "generation_model": "merged", **warm, **short}]))
    plan.append(ours("full-long", full_layers, [{"name": "long", "generation_model": "merged", **warm, **long},
                                               {"name": "long+offload", "generation_model": "merged", "offload_activations": True,
                                                "reuse_rollout": True, "steps": 1, **long}]))
    if a.slice_layers:
        plan.append(ours("slice-long-ours", a.slice_layers, [{"name": "long", "generation_model": "merged", "steps": 2, **long}]))
        plan.append(trl("slice-long-trl", a.slice_layers, long, 2))
    # The 4-bit sampler at full size (no 26 GB dense copy), then in generate chunks of half the sequences: the
    # KV cache halves, the peak that TRL's memory is compared with (its decode steps double)
    half = max(1, a.prompts * a.group // 2)
    plan.append(ours("full-policy", full_layers, [{"name": "policy", **warm, **short},
                                                  {"name": f"policy chunk {half}", "steps": 1, "generation_chunk": half, **short}]))
    plan.append(ours("full-graph-policy", full_layers, [{"name": "graph policy", **warm, **graph_policy, **short},
                                                        {"name": f"graph policy chunk {half}", "steps": 1,
                                                         "generation_chunk": half, **graph_policy, **short}]))
    if not a.only:
        return plan
    plan = dict(plan)
    return [(name, plan[name]) for name in dict.fromkeys(a.only.split(",")) if name in plan]  # in the order given


def run_streaming(command, timeout, on_line):
    """Run command (its own process group), call on_line for every output line as it comes; kill the whole
    group at the timeout. Returns the exit code, or None when it was killed."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True, cwd=HERE)
    reader = threading.Thread(target=lambda: [on_line(line.rstrip("\n")) for line in process.stdout], daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    reader.join(timeout=10)
    return code


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def suite_markdown(results):
    env = results["env"]
    lines = [f"# bench.py suite — {env.get('gpu', env['device'])}, {env['date']}", "",
             f"`{results['command']}`", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()
                                                                  if k not in ("device", "date", "gpu")), ""]
    steps = [r for m in results["measurements"] for r in m["records"] if "step_seconds" in r and not r.get("warmup")]
    if steps:
        lines += ["| measurement | layers | sampler | offload | sequences × new tokens | step s | generation s | "
                  "reference s | policy s | peak GiB | generated tok/s | generate chunk |",
                  "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in steps:
            s = r["seconds"]
            lines.append(f"| {r['measurement']} {r['variant']} step {r['step']} | {r['layers']} | {r['sampler']}"
                         f"{'' if r.get('decode', 'generate') == 'generate' else ', ' + r['decode']} | "
                         f"{r['offload']} | {r['sequences']} × {r['new_tokens']}{' (rollout reused)' if r['reused_rollout'] else ''} | "
                         f"{r['step_seconds']:.1f} | {s.get('generation', 0):.1f} | {s.get('reference', 0):.1f} | "
                         f"{s.get('policy', 0):.1f} | {r['peak_gib_max']:.2f} | {r['generated_tokens_per_s'] or '-'} | "
                         f"{r['generation_chunk'] or '-'} |")
    decode = [r for m in results["measurements"] for r in m["records"] if "ms_per_decode_step" in r]
    if decode:
        lines += ["", "| decode variant | layers | batch × prompt | ms per decode step | prefill s | first call s | peak GiB | "
                  "greedy = generate |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['variant']} ({r['attention']}) | {r['layers']} | {r['batch']} × {r['prompt_tokens']} | "
                  f"{r['ms_per_decode_step']} | {r['prefill_s']} | {r['first_call_s']} | {r['peak_gib']} | "
                  f"{r.get('greedy_tokens_equal_to_generate', '-')} |" for r in decode]
    gather = [r for m in results["measurements"] for r in m["records"] if isinstance(r.get("gather"), list)]
    for g in gather:
        lines += ["", f"Gather, {g['tokens']} tokens, H {g['hidden']}, V {g['vocab']}, {g['dtype']} ({g['memory_kind']}):", "",
                  "| implementation | peak extra MiB | median s |", "| --- | ---: | ---: |"]
        lines += [f"| {row['impl']} | {row['peak_extra_mib']} | {row['median_s']} |" for row in g["gather"]]
    lines += ["", "| measurement | exit | seconds | note |", "| --- | --- | ---: | --- |"]
    lines += [f"| {m['name']} | {m['exit']} | {m['seconds']} | {m.get('note', '')} |" for m in results["measurements"]]
    return "\n".join(lines) + "\n"


def suite_main(a):
    """Run the plan within --budget-s, writing suite.json, suite.md and suite.log under --out as results come
    in, so a run cut off anywhere still leaves every figure measured so far."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.models_dir, exist_ok=True)
    deadline = time.monotonic() + a.budget_s
    results = {"env": environment(device), "command": " ".join(["python", "bench.py", *sys.argv[1:]]), "measurements": []}
    log = open(os.path.join(a.out, "suite.log"), "a")

    def save():
        write_atomically(os.path.join(a.out, "suite.json"), json.dumps(results, indent=1))
        try:
            markdown = suite_markdown(results)
        except Exception as e:  # the table is a view of suite.json: never let it stop the measuring
            markdown = f"suite.md could not be written ({type(e).__name__}: {e}); see suite.json\n"
        write_atomically(os.path.join(a.out, "suite.md"), markdown)
    save()
    for name, command in suite_plan(a, device):
        measurement = {"name": name, "command": " ".join(command), "records": [], "exit": "not run", "seconds": 0}
        results["measurements"].append(measurement)
        remaining = deadline - time.monotonic()
        if name.endswith("trl") and importlib.util.find_spec("trl") is None:
            measurement["note"] = "skipped: TRL is not installed (pip install trl)"
            save()
            continue
        if remaining < 5:
            measurement["note"] = "skipped: the budget is spent"
            save()
            continue
        print(f"[suite] {name} ({remaining:.0f} s of budget left): {measurement['command']}", flush=True)
        start = time.monotonic()

        def on_line(line, measurement=measurement, start=start):
            log.write(f"[{name} {time.monotonic() - start:7.1f}s] {line}\n")
            log.flush()
            # A progress bar may share the line (bars end without a newline): the record starts at its brace.
            line = line[line.find('{"'):] if '{"' in line else line
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return
                record["measurement"] = name
                measurement["records"].append(record)
                print(f"[suite] {name}: {line[:400]}", flush=True)
                save()
        code = run_streaming(command, remaining, on_line)
        measurement["exit"] = "killed at the budget" if code is None else code
        measurement["seconds"] = round(time.monotonic() - start, 1)
        save()
    print(open(os.path.join(a.out, "suite.md")).read(), flush=True)
    return results


# -----------------------------------------------------------------------------
# Command line.


def add_step_settings(parser):
    """The flags step and trl share: the same values give both the same saved model and the same settings."""
    parser.add_argument("--config", required=True, help="config.json of the architecture (the weights are random)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory; default: the config's directory if it "
                        "holds one, else ../shared/qwen2.5-tokenizer, else Qwen/Qwen2.5-14B (from the Hub)")
    parser.add_argument("--model-dir", default=None, help="where the random model is saved (kept, and reused if "
                        "present: step and trl given the same one load the same weights); default: a temporary "
                        "directory, deleted at the end")
    parser.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available")
    parser.add_argument("--prompts", type=int, default=16, help="B: prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="random tokens per prompt (about; see docstring)")
    parser.add_argument("--new-tokens", type=int, default=256, help="completion length (max_new_tokens)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.04, help="β; 0 skips the reference pass")
    parser.add_argument("--num-iterations", type=int, default=1, help="μ; > 1 adds the old log-probs pass")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every linear layer of the blocks (alpha = 2r)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=grpo.Args.temperature, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=0, help="blocks of the random model; 0: the config's (fewer: a "
                        "slice of the same width and vocabulary)")
    parser.add_argument("--gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--allow-eos", action="store_true", help="let completions stop at EOS (default: forced max length)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gather", help="naive vs fused log-prob gather: peak memory and time",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--tokens", type=int, default=4096, help="N: tokens (rows)")
    g.add_argument("--hidden", type=int, default=128, help="H: hidden size")
    g.add_argument("--vocab", type=int, default=151936, help="V: vocabulary size (Qwen2.5's padded 151,936)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--repeat", type=int, default=3, help="timed repetitions after one warm-up")
    g.add_argument("--memory-mb", type=int, default=grpo.Args.logprob_memory_mb,
                   help="the fused gather's chunk budget (grpo --logprob-memory-mb)")
    g.add_argument("--memory-mb-sweep", type=int, nargs="*", default=None,
                   help="several budgets to compare (each a fused row), instead of --memory-mb")
    g.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    g.add_argument("--compare-copy", action="store_true", help="add a row for the fused gather fed a float32 copy "
                   "of lm_head (what it did before it learnt to multiply 16-bit weights without one)")
    g.add_argument("--with-entropy", action="store_true", help="add a row for the fused gather that also returns "
                   "each token's entropy (token_logprobs(..., with_entropy=True), as the training pass calls it)")
    g.add_argument("--only", choices=("naive", "fused", "fused-copy", "fused-entropy"), default=None,
                   help=argparse.SUPPRESS)  # child
    g.add_argument("--save", default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("plan", help="padded tokens per step: fixed micro-batches vs a token budget (no model)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gsm8k", default=os.path.join(HERE, "..", "shared", "data", "gsm8k", "train.jsonl"))
    p.add_argument("--tokenizer", default=None, help="default: ../shared/qwen2.5-tokenizer, else Qwen/Qwen2.5-14B")
    p.add_argument("--prompts", type=int, default=16, help="B: prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--new-tokens", type=int, default=512, help="max_new_tokens: longer completions are cut")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per fixed micro-batch")
    p.add_argument("--steps", type=int, default=200, help="simulated steps")
    p.add_argument("--length-scale", type=float, default=1.0, help="completion length = reference answer length × this")
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("step", help="real GRPO steps on a random-weight model: seconds and peak memory per phase",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_settings(s)
    s.add_argument("--micro-batch-tokens", type=int, default=0, help="> 0: micro-batches by this token budget (grpo.py's flag)")
    s.add_argument("--lengths-from", default=None, help="a GSM8K jsonl: cut completions to its reference answers' token "
                   "lengths for the training passes (generation still runs --new-tokens)")
    s.add_argument("--random-completions", action="store_true", help="no generation: random completion tokens "
                   "(--new-tokens each), to time the training passes alone")
    s.add_argument("--inject-oom", type=int, default=0, help="this step's policy pass runs out of memory once, at its last "
                   "micro-batch (grpo's recovery halves and redoes it); 0: never")
    s.add_argument("--generation-chunk", type=int, default=0, help="sequences per generate call; 0: sized from memory (grpo's default)")
    s.add_argument("--warmup-new-tokens", type=int, default=0, help="before the measured steps, one warm-up step with "
                   "this many new tokens (not in the table); 0: none")
    s.add_argument("--variants", default=None, help="JSON list of settings to run one after another on the one loaded "
                   "model, each overriding the flags: keys " + ", ".join(VARIANT_KEYS) + "; reuse_rollout trains on "
                   "the previous step's rollout instead of generating")
    s.add_argument("--generation-model", default="policy", choices=("policy", "merged"))
    s.add_argument("--logprob-memory-mb", type=int, default=grpo.Args.logprob_memory_mb)
    s.add_argument("--offload-activations", default=False, action=argparse.BooleanOptionalAction)
    s.add_argument("--naive-gather", action="store_true", help="use a naive log_softmax + gather instead of the fused one")
    t = sub.add_parser("trl", help="TRL's GRPOTrainer on step's saved model with step's settings (pip install trl)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_settings(t)
    d = sub.add_parser("decode", help="ms per decode step of the dense sampler: attention and decoding loop variants",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--config", required=True, help="config.json of the architecture (random weights)")
    d.add_argument("--layers", type=int, default=0, help="blocks; 0: the config's")
    d.add_argument("--batch", type=int, default=128, help="rows decoded together (B·G of a step)")
    d.add_argument("--prompt-tokens", type=int, default=280, help="padded prompt length (rows: 40 shorter at most)")
    d.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (prefill subtracted)")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--variants", default=",".join(DECODE_VARIANTS), help="each in its own process: generate-sdpa "
                   "(transformers' attention), generate (grpo's decode attention, the merged sampler today), "
                   "generate-static (cache_implementation=static: transformers compiles the step), static-loop (our "
                   "own loop on a static cache), cuda-graph (that loop, one step captured as a CUDA graph), "
                   "continuous-batching (transformers' generate_batch: paged attention)")
    d.add_argument("--check", type=int, default=0, help="> 0: also compare this many greedy tokens with generate's")
    d.add_argument("--only", choices=DECODE_VARIANTS, default=None, help=argparse.SUPPRESS)  # child
    u = sub.add_parser("suite", help="the full-size GPU measurement in one budgeted command: gather, our step "
                       "(both samplers), TRL side by side on a layer slice, long completions with and without offload",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    u.add_argument("--config", default=QWEN_14B_CONFIG)
    u.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    u.add_argument("--out", default="runs/suite", help="suite.json, suite.md and suite.log go here")
    u.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "grpo-bench-models"),
                   help="random models are saved here (one per layer count) and reused by later runs")
    u.add_argument("--budget-s", type=float, default=480, help="wall-clock budget; what does not fit is cut or skipped")
    u.add_argument("--device", default=None)
    u.add_argument("--slice-layers", type=int, default=8, help="layers of the slice for the side by side with TRL; 0: none")
    u.add_argument("--prompts", type=int, default=16)
    u.add_argument("--group", type=int, default=8)
    u.add_argument("--prompt-tokens", type=int, default=256)
    u.add_argument("--new-tokens", type=int, default=256)
    u.add_argument("--micro-batch", type=int, default=16)
    u.add_argument("--beta", type=float, default=0.04)
    u.add_argument("--gather-tokens", type=int, default=4096, help="tokens of the gather measurement")
    u.add_argument("--long-prompts", type=int, default=2)
    u.add_argument("--long-new-tokens", type=int, default=2048)
    u.add_argument("--warmup-new-tokens", type=int, default=16, help="full-size steps are preceded by one warm-up "
                   "step with this many new tokens instead of a second full step")
    u.add_argument("--decode-new-tokens", type=int, default=64, help="decode steps timed by the decode measurements")
    u.add_argument("--decode-check", type=int, default=16, help="greedy tokens compared with generate's (decode-slice)")
    u.add_argument("--only", default="", help="comma-separated measurement names to run (default: all): gather, "
                   "decode-slice, decode-full, slice-ours, slice-trl, slice-graph, slice-paged, full-graph, full-paged, "
                   "full-ours, full-long, slice-long-ours, slice-long-trl, full-policy, full-graph-policy")
    return parser.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    {"gather": gather_main, "plan": plan_main, "step": step_main, "trl": trl_main, "decode": decode_main,
     "suite": suite_main}[a.command](a)
