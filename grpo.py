"""
grpo.py -- GRPO (Group Relative Policy Optimization) for a 4-bit QLoRA causal LM, in one file.

For every prompt q we sample a group of G completions o_1..o_G from the current policy, score each
with a verifier (verify.py), and push up the log-probability of the completions that scored above
their group's mean. The objective maximised (DeepSeekMath, Shao et al. 2024, eq. 3) is

    J(θ) = E_q E_{o_i ~ π_old} [ 1/G Σ_i 1/|o_i| Σ_t ( min( r_it·Â_i , clip(r_it, 1-ε_low, 1+ε_high)·Â_i )
                                                       - β·KL_t(π_θ ‖ π_ref) ) ]
    r_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t)        (the importance ratio)
    Â_i  = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)      (group-normalised advantage)

and the loss is its negative. π_ref is the frozen base model: the same weights with the LoRA adapters
switched off, so no second copy of the model is ever held in memory.

Departures from the paper (each is a flag; the default is listed first):
  1. KL estimator: k3 = exp(ref - logp) - (ref - logp) - 1 per token (Schulman, "Approximating KL divergence",
     2020), added to the loss as in the paper; `--beta 0` skips the reference pass.
  2. Loss aggregation `--agg`: "seq" = mean over sequences of each sequence's token mean (paper); "token" = one
     mean over all tokens (DAPO, Yu et al. 2025); "dr_grpo" = the sum / B·G·max_new_tokens (Dr. GRPO, Liu et al. 2025).
  3. Advantage scale: divided by the group std; `--no-scale-advantages` leaves it unscaled (Dr. GRPO), which stops
     low-variance groups from being up-weighted.
  4. Inner iterations μ = `--num-iterations` (default 1): with μ = 1, π_old = π_θ, the ratio is exactly 1 and the
     clip never binds (the plain policy gradient); with μ > 1 the old log-probs are computed once before the updates.
  5. From DAPO: asymmetric clipping `--clip-high` (DAPO uses 0.28), dropping zero-std groups from the loss
     (`--drop-zero-std-groups`) or refilling the batch with informative ones (`--dynamic-sampling`), and masking or
     penalising completions that hit max_new_tokens (`--overlong`).
  6. Log-probs are computed at the sampling temperature (logits / T): those of the policy that sampled. top-p
     truncation is not modelled (as in TRL): departure 9 weighs it.
  7. On a GPU, rollouts are sampled from a dense bf16 copy of the policy (4-bit base dequantized, LoRA merged,
     refreshed every step) for speed; it differs from the trained policy by rounding (logged as sampler/*).
     `--generation-model policy` samples from the 4-bit model itself (26 GB less at 14B).
  8. `--ratio-level sequence`: GSPO's one ratio per completion (Zheng et al. 2025); `--top-entropy-quantile`: the
     policy term on the highest-entropy tokens only (Wang et al. 2025). Both off by default.
  9. Truncated importance sampling `--tis-cap C` (default 2; 0: off; Yao et al. 2025): the sampler (bf16 copy, top-p)
     is not exactly π_old, so each token's policy term is weighted by min(π_old/π_sampler, C), π_sampler's log-probs
     recorded while sampling (no extra pass). An exact sampler gets weight 1.

Shapes: B prompts per step, G completions per prompt, N = B·G sequences, P prompt tokens,
T completion tokens, V vocabulary, H hidden size. "mask" is always a 0/1 float of shape [N, T].

Run it full size (Qwen2.5-14B, 4-bit, one 80 GB GPU):
    python grpo.py --data data/gsm8k.jsonl
Run it tiny, on a CPU, offline (a random 2-layer Qwen2 and a toy task; see README):
    python tiny.py learn

Sections (`# ----` bands): Config -> Data -> Model -> Rollout -> Reward -> Log-probs -> GRPO core -> Update ->
Schedules -> Distributed -> One GRPO step (grpo_step) -> Evaluation -> Logging -> Checkpoints -> main. A task of
your own: its items (jsonl) and a reward function in TRL's form, --reward FILE.py:FUNCTION (docs/rewards.md). A loss
variant: the GRPO core (group_advantages, grpo_loss), one Args field for its flag, a test against a slow loop.
"""

import argparse
import contextlib
import copy
import dataclasses
import io
import importlib.util
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from verify import code_reward, code_sandbox_problem, format_reward, math_reward


# -----------------------------------------------------------------------------
# Config: every knob, its meaning, allowed values and valid range; the CLI and the startup checks come from it.

# Fields that must match the checkpoint's when resuming; everything else may change (e.g. --steps).
RESUME_MUST_MATCH = ("model", "lora_rank", "lora_alpha", "data", "prompts_per_step", "group_size", "seed",
                     "chat_template", "agg", "num_iterations")


def arg(default, help, choices=None, valid=None):
    """One knob: its default, its --help line, its allowed values (choices) or its valid range (valid), an interval:
    "[1, inf)" = at least 1, "(0, 1]" = above 0 and at most 1, "(-inf, inf)" = finite. check_args checks both."""
    return field(default=default, metadata={"help": help, "choices": choices, "valid": valid})


ANY, AT_LEAST_0, AT_LEAST_1, POSITIVE = "(-inf, inf)", "[0, inf)", "[1, inf)", "(0, inf)"


@dataclass
class Args:
    # run / logging
    run_name: str = arg("", "run directory name under --out-dir; default: grpo-<date>-<time>")
    out_dir: str = arg("runs", "where run directories go")
    seed: int = arg(0, "seed for python, numpy and torch (torchrun rank r samples with seed + r)", valid="[0, 2147483647]")
    device: str = arg("", "cuda, cuda:N or cpu; default: cuda when available")
    sample_every: int = arg(10, "print one sample completion every this many steps; 0: never", valid=AT_LEAST_0)
    samples_per_step: int = arg(4, "prompt/completion records written to samples.jsonl per step", valid=AT_LEAST_0)
    plot: str = arg("", "path of a run directory: draw its metrics.jsonl into metrics.png and exit")
    report_to: str = arg("none", "also send every metrics.jsonl record to a dashboard: tensorboard (event files in "
                         "RUN_DIR/tensorboard) or wandb (honours WANDB_MODE=offline); each needs its package",
                         choices=("none", "tensorboard", "wandb"))
    wandb_project: str = arg("grpo", "W&B project of --report-to wandb (the run is named like the run directory)")
    # model / QLoRA
    model: str = arg("Qwen/Qwen2.5-14B", "hub id or local path of a causal LM, loaded in 4-bit NF4")
    lora_rank: int = arg(16, "LoRA rank r on every linear layer of the blocks", valid=AT_LEAST_1)
    lora_alpha: int = arg(32, "LoRA alpha (the update is scaled by alpha / r)", valid=AT_LEAST_1)
    lora_dropout: float = arg(0.0, "dropout on the LoRA input", valid="[0, 1)")
    gradient_checkpointing: bool = arg(True, "recompute block activations in backward (saves memory)")
    # data
    data: str = arg("data/gsm8k.jsonl", "training prompts, jsonl (schema: data/README.md); gsm8k.jsonl is downloaded if missing")
    eval_data: str = arg("data/gsm8k_test.jsonl", "held-out prompts; gsm8k_test.jsonl is downloaded if missing")
    chat_template: bool = arg(True, "wrap prompts in the tokenizer's chat template when it has one")
    # rollout
    prompts_per_step: int = arg(16, "B: prompts per optimizer step (across all ranks)", valid=AT_LEAST_1)
    group_size: int = arg(8, "G: completions sampled per prompt (GRPO compares at least 2)", valid="[2, inf)")
    max_new_tokens: int = arg(512, "longest completion; longer ones are cut and flagged truncated", valid=AT_LEAST_1)
    temperature: float = arg(1.0, "sampling temperature at the first step (greedy decoding, T = 0, would make a "
                             "group's G completions identical, and identical completions teach nothing)", valid=POSITIVE)
    temperature_end: float = arg(0.0, "sampling temperature at the last step, linear in between; 0: constant", valid=AT_LEAST_0)
    top_p: float = arg(1.0, "nucleus sampling: keep the smallest set of tokens whose probability reaches top-p", valid="(0, 1]")
    generation_chunk: int = arg(0, "sequences per model.generate call; 0: as many as the free memory holds (KV cache "
                                "sized from the model config); halved automatically on CUDA out-of-memory", valid=AT_LEAST_0)
    generation_model: str = arg("auto", "sample from: policy (the 4-bit + LoRA model) | merged (a dense copy of the "
                                "dequantized base with LoRA merged, refreshed every step: faster decoding, +2 bytes/weight) "
                                "| auto: merged on CUDA (measured faster: docs/performance.md), policy on CPU",
                                choices=("auto", "policy", "merged"))
    cpu_sampler: str = arg("inverse_cdf", "how generate draws tokens on a CPU: inverse_cdf (one uniform per row, faster "
                           "there: docs/performance.md) | multinomial (generate's own); the same distribution. GPUs: always "
                           "generate's own", choices=("inverse_cdf", "multinomial"))
    overlong: str = arg("keep", "truncated completions: keep | mask (out of the loss, DAPO) | penalty (reward - overlong_penalty)",
                        choices=("keep", "mask", "penalty"))
    overlong_penalty: float = arg(1.0, "subtracted from a truncated completion's reward with --overlong penalty", valid=AT_LEAST_0)
    dynamic_sampling: bool = arg(False, "DAPO: sample more prompts until B groups have rewards not all equal (docs/rewards.md)")
    max_refill_rounds: int = arg(4, "--dynamic-sampling: the most extra generation rounds per step", valid=AT_LEAST_0)
    # reward
    reward: tuple = arg((), "repeatable: correct | format | module:function | path/file.py:function, TRL's signature, "
                        "optional =WEIGHT (default: --correct-weight, --format-weight, 1); none: correct, format (docs/rewards.md)")
    correct_weight: float = arg(1.0, "weight of the correctness reward (math answer or code tests)", valid=ANY)
    format_weight: float = arg(0.1, "weight of the format reward (one final \\boxed{} / one ```python block)", valid=ANY)
    strict: bool = arg(True, "training reward reads only \\boxed{} answers (else also the last number)")
    code_timeout: float = arg(5.0, "seconds per code_reward run", valid=POSITIVE)
    unsafe_code_sandbox: bool = arg(False, "run model code even where the kernel cannot isolate it (UNSAFE: only "
                                    "inside a throwaway VM; docs/verifiers.md says what still holds)")
    reward_workers: int = arg(8, "threads scoring completions in parallel", valid=AT_LEAST_1)
    # loss
    beta: float = arg(0.04, "β: KL coefficient; 0 skips the reference pass entirely", valid=AT_LEAST_0)
    clip_low: float = arg(0.2, "ε_low: the ratio is clipped below at 1 - ε_low", valid="[0, 1)")
    clip_high: float = arg(0.2, "ε_high: the ratio is clipped above at 1 + ε_high (DAPO: 0.28)", valid=AT_LEAST_0)
    agg: str = arg("seq", "loss aggregation: seq (GRPO) | token (DAPO) | dr_grpo (Dr. GRPO)", choices=("seq", "token", "dr_grpo"))
    ratio_level: str = arg("token", "importance ratio: token (GRPO) | sequence (GSPO: one length-normalised ratio per "
                           "completion)", choices=("token", "sequence"))
    tis_cap: float = arg(2.0, "C: truncated importance sampling, each token's policy term weighted by min(π_old / "
                         "π_sampler, C), π_sampler recorded while sampling (docs/sampler.md); 0: off", valid=AT_LEAST_0)
    top_entropy_quantile: float = arg(1.0, "ρ: the policy term trains only the batch's top-ρ fraction of trained tokens "
                                      "by policy entropy (Wang et al. 2025 use 0.2); the KL term keeps all; 1: all", valid="(0, 1]")
    scale_advantages: bool = arg(True, "divide advantages by the group std (off: Dr. GRPO)")
    num_iterations: int = arg(1, "μ: optimizer steps per generated batch", valid=AT_LEAST_1)
    drop_zero_std_groups: bool = arg(False, "leave groups whose rewards are all equal out of the loss (DAPO)")
    # optimization
    steps: int = arg(500, "training steps: each samples B·G fresh completions and makes μ optimizer steps", valid=AT_LEAST_1)
    lr: float = arg(1e-5, "peak AdamW learning rate of the adapters", valid=AT_LEAST_0)
    lr_schedule: str = arg("cosine", "after warmup: cosine (to 0) | constant", choices=("cosine", "constant"))
    warmup_steps: int = arg(10, "linear warmup steps", valid=AT_LEAST_0)
    weight_decay: float = arg(0.0, "AdamW weight decay", valid=AT_LEAST_0)
    max_grad_norm: float = arg(1.0, "clip the adapters' gradient to this global norm; 0: off", valid=AT_LEAST_0)
    micro_batch: int = arg(16, "sequences per forward/backward; gradients accumulate to the full batch "
                           "(halved automatically on CUDA out-of-memory)", valid=AT_LEAST_1)
    micro_batch_tokens: int = arg(0, "> 0: micro-batches by a token budget instead: sequences sorted by length, each "
                                  "micro-batch at most this many padded prompt + completion tokens (a longer sequence "
                                  "goes alone); halved automatically on CUDA out-of-memory", valid=AT_LEAST_0)
    offload_activations: bool = arg(False, "keep the tensors saved for backward in (pinned) CPU memory during the policy forward")
    logprob_memory_mb: int = arg(256, "memory budget of one chunk of the fused log-prob gather (sets its row count)", valid=AT_LEAST_1)
    max_bad_steps: int = arg(3, "stop after this many non-finite losses/gradients in a row", valid=AT_LEAST_1)
    # evaluation / checkpoints
    eval_every: int = arg(50, "greedy pass@1 on --eval-data every this many steps (also before the first and after the "
                          "last); 0: off", valid=AT_LEAST_0)
    eval_n: int = arg(200, "items of --eval-data used for evaluation; 0: all", valid=AT_LEAST_0)
    eval_only: bool = arg(False, "evaluate the base model (or --adapter) and exit")
    adapter: str = arg("", "a saved adapter directory to evaluate with --eval-only")
    save_every: int = arg(50, "save a checkpoint every this many steps (and always at the end); 0: only at the end",
                          valid=AT_LEAST_0)
    keep_last: int = arg(3, "checkpoints kept; older ones are deleted", valid=AT_LEAST_1)
    resume: str = arg("", "a run directory: continue it from its newest checkpoint with its saved settings; flags given "
                      "as well override them, except these, which must match the run's: "
                      + ", ".join("--" + name.replace("_", "-") for name in RESUME_MUST_MATCH))


# --help's groups, each named at its first field (Args' order).
ARG_GROUPS = {"run_name": "run and logging", "model": "model and QLoRA", "data": "data", "prompts_per_step": "rollout",
              "reward": "reward", "beta": "loss", "steps": "optimization", "eval_every": "evaluation and checkpoints"}

EXAMPLES = """examples:
  python grpo.py --data data/gsm8k.jsonl                     # Qwen2.5-14B in 4-bit on one 80 GB GPU
  python tiny.py learn                                       # a tiny random model learns a toy task on a CPU
  python grpo.py --resume runs/NAME                          # continue a run with its saved settings
  python grpo.py --resume runs/NAME --steps 1000             # ... and lengthen it
  python grpo.py --eval-only --adapter runs/NAME/checkpoints/step_000500"""


def flag(name) -> str:
    return "--" + name.replace("_", "-")


def command_line(argv=None) -> dict:
    """{field name: value} of the flags the command line gives, and of no others (main's given for --resume)."""
    parser = argparse.ArgumentParser(usage="python grpo.py [--flag VALUE ...]", epilog=EXAMPLES,
                                     description=__doc__.split("\n\n")[0].strip(), argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # a bad flag or value is one line, not the 60-flag usage message
    for f in dataclasses.fields(Args):
        if f.name in ARG_GROUPS:
            group = parser.add_argument_group(ARG_GROUPS[f.name])
        shown = f" (default: {f.default})" if f.default not in ("", None, ()) else ""
        help = (f.metadata["help"] + shown).replace("%", "%%")  # argparse formats help with %
        if f.type in (bool, "bool"):  # --x / --no-x
            group.add_argument(flag(f.name), help=help, action=argparse.BooleanOptionalAction)
        elif isinstance(f.default, tuple):  # repeatable: --x A --x B (a list here, a tuple in Args)
            group.add_argument(flag(f.name), help=help, action="append", metavar=f.name.upper())
        else:
            group.add_argument(flag(f.name), help=help, type=type(f.default), choices=f.metadata["choices"],
                               metavar=None if f.metadata["choices"] else f.name.upper())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}


def parse_args(argv=None) -> Args:
    return Args(**command_line(argv))


def fail(message):
    """Bad input ends the run with one line, never a traceback from deep inside a library."""
    raise SystemExit(f"grpo.py: error: {message}")


def in_interval(value, interval) -> bool:
    """value inside an interval written as in arg(): "[1, inf)", "(0, 1]". NaN is inside none."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def check_args(args: Args, world_size: int = 1):
    """Reject impossible settings before anything slow: each field's choices or valid range, then the other rules."""
    for f in dataclasses.fields(Args):
        values, choices, valid = getattr(args, f.name), f.metadata["choices"], f.metadata["valid"]
        for value in values if isinstance(f.default, tuple) else (values,):  # a repeatable flag: each of its values
            if choices and value not in choices:
                fail(f"{flag(f.name)} {value!r}: choose one of {', '.join(choices)}")
            if valid and not in_interval(value, valid):
                fail(f"{flag(f.name)} {value} is outside its valid range {valid} ({f.metadata['help']})")
    if args.prompts_per_step % world_size:
        fail(f"--prompts-per-step {args.prompts_per_step} does not split into whole groups over {world_size} ranks")
    if args.adapter and not (args.eval_only and os.path.isfile(os.path.join(args.adapter, "adapter_config.json"))):
        fail(f"--adapter {args.adapter}: evaluates a saved adapter (a directory with adapter_config.json) with --eval-only; "
             "to continue training a run, use --resume RUN_DIR")
    device = re.fullmatch(r"(cpu|cuda)(:(\d+))?", args.device or "cpu")
    if not device or (device[1] == "cuda" and int(device[3] or 0) >= torch.cuda.device_count()):
        fail(f"--device {args.device}: choose cpu, cuda or cuda:N (this machine has {torch.cuda.device_count()} CUDA GPUs)")


# -----------------------------------------------------------------------------
# Data: jsonl prompts -> [{"prompt", "answer" | "tests"}] -> model-ready prompt strings. Plumbing.

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
GSM8K_FILES = {"gsm8k.jsonl": "train", "gsm8k_test.jsonl": "test"}


def download_gsm8k(path):
    """Fetch GSM8K (MIT) from its official repository, written atomically so a cut download leaves nothing."""
    url = GSM8K_URL.format(split=GSM8K_FILES[os.path.basename(path)])
    print(f"{path} not found: downloading GSM8K from {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except OSError as e:
        fail(f"{path} does not exist and GSM8K could not be downloaded ({e}). Offline? Download {url} "
             f"by hand and save it as {path}, or pass --data/--eval-data with your own jsonl")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, payload)


def write_atomically(path, data):
    """path's new content, whole or not at all: written beside it, then renamed over it."""
    with open(path + ".tmp", "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(path + ".tmp", path)


def load_items(path, kind_required="") -> list[dict]:
    """One JSON object per line: "prompt" (or GSM8K's "question"), "answer" (math) or "tests" (code), and any other
    fields (the columns reward functions get). kind_required: when one of "answer"/"tests" must be there, and why."""
    if not os.path.exists(path) and os.path.basename(path) in GSM8K_FILES:
        download_gsm8k(path)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        fail(f"data file {path} " + ("is not a readable file" if os.path.exists(path) else "does not exist"))
    items = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 gets its own one-line error
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are allowed (e.g. a trailing newline)
            where = f"{path}:{line_number}"
            try:  # UTF-8; a byte-order mark at the start is allowed, and the \r of \r\n line ends is JSON whitespace
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                fail(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            if not isinstance(record, dict):
                fail(f"{where}: expected a JSON object, got {type(record).__name__}")
            prompt = record.get("prompt", record.get("question"))
            if not isinstance(prompt, str) or not prompt.strip():
                fail(f"{where}: field \"prompt\" (or \"question\") is missing or not a non-empty string")
            item = {"prompt": prompt, **{k: v for k, v in record.items() if k not in ("prompt", "question")}}
            for key in ("answer", "tests", "entry_point"):
                if key in item and not isinstance(item[key], str):
                    fail(f"{where}: field \"{key}\" must be a string")
            if "answer" in item and "tests" in item or kind_required and "answer" not in item and "tests" not in item:
                fail(f"{where}: needs one of \"answer\" (math) or \"tests\" (code), not both{kind_required}")
            items.append(item)
    if not items:
        fail(f"data file {path} has no items")
    return items


def load_data(args: Args) -> tuple[list[dict], list[dict]]:
    """The training items (none with --eval-only) and the first --eval-n held-out items (none without eval)."""
    train_items = [] if args.eval_only else load_items(args.data, "" if args.reward else " (the built-in rewards; a task "
                                                       "of your own: --reward, docs/rewards.md)")
    eval_items = load_items(args.eval_data, " (evaluation uses verify.py)") if (args.eval_every > 0 or args.eval_only) else []
    eval_items = eval_items[: args.eval_n] if args.eval_n > 0 else eval_items
    if train_items and args.prompts_per_step > len(train_items):
        fail(f"--prompts-per-step {args.prompts_per_step} is more than the {len(train_items)} items in {args.data}")
    if any("tests" in item for item in train_items + eval_items):  # probe the code sandbox now, not an hour in
        if problem := code_sandbox_problem(args.unsafe_code_sandbox):
            fail(problem)
    return train_items, eval_items


MATH_INSTRUCTION = "Think step by step, then give the final answer at the end as \\boxed{answer}."
CODE_INSTRUCTION = "Think step by step, then give your solution as one ```python code block at the end."
# R1-Zero's template (DeepSeek-R1 paper, table 1), for tokenizers without a chat template.
PLAIN_TEMPLATE = ("A conversation between User and Assistant. The User asks a question, and the Assistant "
                  "solves it. The Assistant first thinks about the reasoning process and then gives the "
                  "final answer.\nUser: {question}\nAssistant:")


def build_prompt(item, tokenizer, use_chat_template=True) -> str:
    instruction = CODE_INSTRUCTION if "tests" in item else MATH_INSTRUCTION if "answer" in item else ""  # else: as written
    question = f"{item['prompt'].strip()}\n{instruction}".strip()
    if use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(question=question)


def data_indices(position, count, num_items, seed) -> list[int]:
    """The items at positions [position, position + count) of the data order: a seeded permutation per epoch, a pure
    function of the position. A step starts where the one before stopped (checkpoints save it as data_position)."""
    return [int(np.random.default_rng(seed + p // num_items).permutation(num_items)[p % num_items])  # epoch, offset
            for p in range(position, position + count)]


# -----------------------------------------------------------------------------
# Model: the base in 4-bit NF4 (frozen), LoRA adapters on every block linear (trained). Plumbing.


def check_model_fits(args: Args, device):
    """Say so before loading anything when a multi-billion-parameter model is asked for without a GPU. The size
    comes from the config alone (the model built on the meta device: no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(args.model)
    except Exception as e:  # many exception types: missing dir, no network, bad json
        fail(f"--model {args.model}: not a local model directory nor reachable on the Hugging Face Hub "
             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    with torch.device("meta"):
        num_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if device.type != "cuda" and num_parameters > 2e9:
        fail(f"--model {args.model} has {num_parameters / 1e9:.1f}B parameters and this machine has no GPU: "
             "train it on a CUDA GPU, or try the tiny CPU run (python tiny.py learn)")
    if args.lora_rank > config.hidden_size:  # a LoRA wider than the layers it adapts: a typo, and out of memory at load
        fail(f"--lora-rank {args.lora_rank} is more than the model's hidden size {config.hidden_size}")


def load_model(args: Args, device: torch.device):
    """4-bit NF4 base + LoRA (QLoRA, Dettmers et al. 2023). Returns (peft model, tokenizer)."""
    # Silenced by exact text, before bitsandbytes' import: two messages that say nothing is wrong (an optional 4-bit
    # kernel missing: the built-in one runs; peft reading a property that transformers >= 5.24 deprecates).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    # bf16 compute on GPU; float32 on CPU, where bf16 matmuls are slow or missing.
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=compute_dtype,
                                                 device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # generate appends on the right, so prompts are padded on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad = eos: the completion mask below handles it
    if device.type == "cpu":
        # Trap: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference at the first eval-mode
        # forward (generate); the next training forward then fails ("a view of a leaf Variable that requires grad").
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if args.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (no enable_input_require_grads hack). Active in train mode only,
        # so generate (eval mode) keeps its KV cache. transformers >= 5.24 renamed it activation_checkpointing_enable.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.adapter:  # --eval-only of a saved adapter
        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=False)
    else:
        # "all-linear": q,k,v,o,gate,up,down of every block; peft leaves lm_head and embeddings out.
        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    print(f"model {args.model}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.3f}%), "
          f"4-bit NF4, compute {compute_dtype}, device {device}")
    return model, tokenizer


def end_of_sequence_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS, the model's generation EOS and, for chat
    templates, the end-of-turn token (Qwen's base EOS is <|endoftext|> but a chat turn ends <|im_end|>)."""
    generation_eos = model.generation_config.eos_token_id
    turn_ends = [tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")]
    ids = {tokenizer.eos_token_id, *(generation_eos if isinstance(generation_eos, list) else [generation_eos]),
           *(i for i in turn_ends if isinstance(i, int) and i != tokenizer.unk_token_id)}
    return sorted(i for i in ids if i is not None)


def decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' sdpa attention, except for one query token with grouped KV heads (every decode step), where
    sdpa would first copy each KV head to its query heads (repeat_kv: the whole KV cache, 5x at 14B, every layer
    and step): a KV head's query heads become the rows of one query block instead. For the dense sampler only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape  # [B, heads, q, D]
    if length != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # Query head h uses KV head h // groups (repeat_kv's order), so the view groups them under their KV head.
    grouped = query.view(batch, heads // groups, groups, dim)  # [B, kv_heads, groups, D]
    # The mask [B, 1, 1, L] (or [B, 1, L] / None) broadcasts over KV heads and groups alike.
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, 1, heads, dim), None  # [B, q=1, heads, D], as sdpa_attention_forward returns


DECODE_ATTENTION = "grpo_decode"  # the attn_implementation name decode_attention is registered under


def register_decode_attention() -> str:
    """Makes decode_attention selectable as attn_implementation=DECODE_ATTENTION (returned). Without a mask function
    of that name, transformers builds no padding mask, and left-padded prompts would attend to their padding."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    return DECODE_ATTENTION


@torch.no_grad()
def build_generation_model(model):
    """A dense copy of the policy for sampling (--generation-model merged): plain GEMMs instead of a dequantize + two
    LoRA matmuls per linear per token. 2 bytes per block weight while it samples; embeddings, norms, lm_head shared."""
    from transformers import AutoModelForCausalLM
    source = model.get_base_model()
    dtype = source.get_output_embeddings().weight.dtype  # the compute dtype: bf16 on GPU, float32 on CPU
    with torch.device("meta"):
        # A copy of the config: from_config would otherwise set the policy's attention to ours as well.
        dense = AutoModelForCausalLM.from_config(copy.deepcopy(source.config), dtype=dtype,
                                                 attn_implementation=register_decode_attention())
    dense.to_empty(device=source.device)
    for name, module in dense.named_modules():
        original = source.get_submodule(name)
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if isinstance(module, torch.nn.Linear) and tensor_name == "weight" and hasattr(original, "base_layer"):
                continue  # LoRA-wrapped 4-bit weights: filled by refresh_generation_model
            shared = getattr(original.base_layer if hasattr(original, "base_layer") else original, tensor_name)
            setattr(module, tensor_name, torch.nn.Parameter(shared, requires_grad=False)
                    if isinstance(shared, torch.nn.Parameter) else shared)  # the same storage, no copy
    dense.generation_config = source.generation_config
    dense.requires_grad_(False)
    return refresh_generation_model(model, dense.eval())


def merged_linears(model, dense):
    """(dense Linear, its 4-bit + LoRA original) for every LoRA linear: the weights the dense copy owns."""
    source = model.get_base_model()
    for name, module in dense.named_modules():
        original = source.get_submodule(name)
        if isinstance(module, torch.nn.Linear) and hasattr(original, "base_layer"):
            yield module, original


@torch.no_grad()
def refresh_generation_model(model, dense):
    """W = dequantize(W_nf4) + scaling·(B @ A) for every LoRA linear: the current policy, densely.
    Called after every optimizer step, before the next rollout."""
    import bitsandbytes as bnb
    for module, original in merged_linears(model, dense):
        base = original.base_layer.weight
        weight = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()  # [out, in]
        for adapter in original.active_adapters:
            weight += original.scaling[adapter] * (original.lora_B[adapter].weight.float()
                                                   @ original.lora_A[adapter].weight.float())
        module.weight.data = weight.to(module.weight.dtype)  # rounded once, here; (re)allocates what release freed
    return dense


def release_generation_model(model, dense):
    """Frees the dense copy's own weights once the rollout is sampled, so the reference and training passes do not
    hold them; refresh_generation_model allocates them again after the update. Shared tensors stay."""
    for module, _ in merged_linears(model, dense):
        module.weight.data = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)


# -----------------------------------------------------------------------------
# Rollout: G samples per prompt with model.generate, then the completion mask.


def completion_mask_from_ids(completion_ids, eos_ids):
    """mask[i, t] = 1 up to AND including the first EOS (trained, or the policy never learns to stop), 0 after it
    (pad may equal EOS: only the first counts). Returns (mask [N, T] float, truncated [N] bool: no EOS at all)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).int()  # [N, T]
    mask = (is_eos.cumsum(dim=1) - is_eos == 0).float()  # [N, T]: no EOS before t
    return mask, is_eos.sum(dim=1) == 0


def generation_chunk_size(config, sequences, prompt_tokens, max_new_tokens, free_bytes, dtype_bytes) -> int:
    """Sequences per generate call that fit free_bytes (a decode step costs nearly the same for 16 rows as for 128,
    so fewer, larger chunks are faster). Per sequence: its KV cache for P + T tokens, the prefill's MLP activations
    and the sampler's float32 [V] rows (~8 copies). Chunks are balanced (200 -> 100 + 100)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    per_sequence = (kv_per_token * (prompt_tokens + max_new_tokens) + 4 * config.intermediate_size * dtype_bytes
                    * prompt_tokens + 8 * 4 * config.vocab_size)
    largest = max(1, min(sequences, int(free_bytes) // per_sequence))
    chunks = math.ceil(sequences / largest)
    return math.ceil(sequences / chunks)


def free_memory_bytes(device) -> int:
    """Memory a new allocation can use: the GPU's free memory plus what PyTorch has cached but not in use
    (CUDA), or the free physical memory (CPU). 90% of it, minus 1 GiB for workspaces."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(0, int(0.9 * free) - 2**30)


INVERSE_CDF_BLOCK = 1024  # vocabulary entries per block of the two-level draw below


def token_sampler(temperature, top_p, method, record):
    """A logits processor that samples the next token itself, for a greedy (do_sample=False) generate: temperature
    and top-p as generate applies them, one token per row ("multinomial": generate's own calls, the same tokens from
    the same seed; "inverse_cdf": inverse_cdf_draw), its log π_sampler (departure 9) appended to record ([n] per step,
    no [n, V] kept), and scores 0 at that token, -inf elsewhere for generate's argmax (its own draw hides π_sampler)."""
    from transformers import TopPLogitsWarper
    top_p_warper = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def sample(input_ids, scores):  # scores [n, V] float32: generate's own copy of the last logits
        if temperature != 1.0:
            scores.div_(temperature)  # in place; the same float division as generate's temperature warper
        if top_p_warper is not None:
            scores = top_p_warper(input_ids, scores)  # transformers' own top-p: identical truncation
        if method == "multinomial":
            probs = torch.softmax(scores, dim=-1)  # [n, V]
            token = torch.multinomial(probs, 1)  # [n, 1]
            logp = probs.gather(1, token).log()
        else:
            token, logp = inverse_cdf_draw(scores)
        record.append(logp[:, 0].float())  # [n]
        return scores.fill_(-math.inf).scatter_(1, token, 0.0)  # reuses the buffer: no new [n, V] tensor
    sample.temperature, sample.top_p, sample.record = temperature, top_p, record  # for stand-ins of generate (bench.py)
    return sample


def inverse_cdf_draw(scores):
    """One token per row of softmax(scores) [n, V] (overwritten) and its log-prob, ([n, 1], [n, 1]): the first whose
    cumulative probability exceeds u·total, one uniform u per row (torch.multinomial is RNG-bound on a CPU). Two levels
    (a block, then the token in it) keep the float64 sums short; a token of probability 0 is never picked."""
    n, V = scores.shape
    weights = scores.sub_(scores.amax(dim=1, keepdim=True)).exp_()  # [n, V], unnormalised probs, in place
    full = V // INVERSE_CDF_BLOCK * INVERSE_CDF_BLOCK
    # Block sums in float32 (a float64 sum over [n, V] costs 20x more here): each block's weight is
    # then exact to ~1e-7 relative, the same precision as the float32 probabilities multinomial gets.
    block_sums = torch.cat([weights[:, :full].view(n, -1, INVERSE_CDF_BLOCK).sum(dim=2),
                            weights[:, full:].sum(dim=1, keepdim=True)], dim=1).double()  # [n, V / block + 1]
    block_cdf = block_sums.cumsum(dim=1)
    total = block_cdf[:, -1:]  # [n, 1]
    # u in [0, total): clamp just below total, since rand·total may round up to it.
    u = torch.minimum(torch.rand(n, 1, dtype=torch.float64, device=scores.device) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(block_cdf, u, right=True)  # [n, 1]: first block whose cdf exceeds u
    u = u - torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # u inside the block
    columns = block * INVERSE_CDF_BLOCK + torch.arange(INVERSE_CDF_BLOCK, device=scores.device)  # [n, block]
    inner = (weights.gather(1, columns.clamp(max=V - 1)) * (columns < V)).double().cumsum(dim=1)  # [n, block]
    u = torch.minimum(u, torch.nextafter(inner[:, -1:], torch.zeros_like(u)))  # the block's two sums may differ in the last bit
    token = columns.gather(1, torch.searchsorted(inner, u, right=True))  # [n, 1]
    return token, weights.gather(1, token).double().log() - total.log()  # log p = log(w_token / Σ w)


@torch.no_grad()
def generate(model, tokenizer, prompts, args: Args, eos_ids, temperature, greedy=False, log=print, progress=""):
    """One completion per prompt string (a group: a prompt repeated G times), in chunks of --generation-chunk
    sequences (0: sized from free memory). Returns CPU tensors prompt_ids, prompt_mask [N, P] (left padded),
    completion_ids, completion_mask [N, T], truncated [N], sampler_logp [N, T] float32 (token_sampler's record; 0
    off the mask and for greedy); texts; generation_chunk (the size used). progress: a progress bar's label or ""."""
    from tqdm import tqdm
    device = model.device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]  # [N, P]
    # Greedy generate, sampling done by token_sampler, and every other knob set: a checkpoint's generation_config.json
    # may carry its own (Qwen2.5-Instruct has top_k 20, repetition_penalty 1.05), which would change the sampler.
    method = args.cpu_sampler if device.type == "cpu" else "multinomial"  # GPUs: generate's own draw
    model.eval()  # eval mode: no dropout, and gradient checkpointing does not switch the KV cache off
    chunk_size = args.generation_chunk or generation_chunk_size(
        model.config, len(prompts), prompt_ids.shape[1], args.max_new_tokens, free_memory_bytes(device),
        dtype_bytes=2 if device.type == "cuda" else 4)
    chunks, logps, start = [], [], 0
    # A progress bar in decode steps, on a terminal only (disable=None), ticked by a stopping criterion that never
    # stops, redrawn at every tick (a decode step costs far more than a redraw).
    bar = tqdm(total=math.ceil(len(prompts) / chunk_size) * args.max_new_tokens, desc=progress, unit="tok",
               leave=False, file=sys.stderr, disable=None if progress else True, mininterval=0, miniters=1)
    def tick(input_ids, scores, **kwargs):
        bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    while start < len(prompts):
        rows, record = slice(start, start + chunk_size), []  # record: this chunk's sampler log-probs, [n] per step
        sampler = [] if greedy else [token_sampler(temperature, args.top_p, method, record)]
        try:
            output = model.generate(input_ids=prompt_ids[rows].to(device), attention_mask=prompt_mask[rows].to(device),
                                    max_new_tokens=args.max_new_tokens, use_cache=True, eos_token_id=eos_ids,
                                    pad_token_id=tokenizer.pad_token_id, stopping_criteria=[tick], do_sample=False,
                                    logits_processor=sampler, repetition_penalty=1.0)
        except torch.OutOfMemoryError:
            if chunk_size == 1:
                fail("out of memory generating a single sequence: lower --max-new-tokens (or use a smaller --model)")
            chunk_size //= 2
            torch.cuda.empty_cache()
            log(f"out of memory in generate: halving the generation chunk to {chunk_size} sequences "
                f"(set --generation-chunk {chunk_size} to skip this next time)")
            continue
        chunks.append(output[:, prompt_ids.shape[1]:].cpu())  # keep only the new tokens
        logps.append(torch.stack(record, 1).cpu() if record else torch.zeros(chunks[-1].shape))  # one per new token
        start += chunk_size
        done = len(chunks) * args.max_new_tokens  # counted in full: a chunk may stop early (all rows ended)
        bar.total = done + math.ceil((len(prompts) - start) / chunk_size) * args.max_new_tokens  # chunk_size may have halved
        bar.update(done - bar.n)
    bar.close()
    model.train()
    T = max(c.shape[1] for c in chunks)  # chunks stop at different lengths: right-pad to one T
    completion_ids, sampler_logp = (torch.cat([torch.nn.functional.pad(c, (0, T - c.shape[1]), value=value) for c in parts])
                                    for parts, value in ((chunks, tokenizer.pad_token_id), (logps, 0.0)))  # [N, T]
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos_ids)
    texts = tokenizer.batch_decode([ids[mask.bool()] for ids, mask in zip(completion_ids, completion_mask)],
                                   skip_special_tokens=True)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
                truncated=truncated, sampler_logp=sampler_logp * completion_mask, texts=texts, generation_chunk=chunk_size)


def concatenate_rollouts(parts, pad_id) -> dict:
    """One rollout from several (--dynamic-sampling's rounds): tensors concatenated, [N, width] ones padded to the
    widest (prompt_* left, the rest right; *_ids with pad_id, else 0), lists joined, dicts by key, numbers: the last."""
    def join(key, values):
        if isinstance(values[0], dict):
            return concatenate_rollouts(values, pad_id)
        if not torch.is_tensor(values[0]):
            return sum(values, []) if isinstance(values[0], list) else values[-1]
        width, left = max(v.shape[-1] for v in values), key.startswith("prompt")
        return torch.cat([v if v.dim() == 1 else torch.nn.functional.pad(v, (width - v.shape[1], 0) if left else
                          (0, width - v.shape[1]), value=pad_id if key.endswith("_ids") else 0) for v in values])
    return {key: join(key, [part[key] for part in parts]) for key in parts[0]}


def select_rows(batch, rows) -> dict:
    """The rows (a bool mask [N]) of a batch of [N, ...] tensors, less the prompt columns (left) and completion columns
    (right) that are padding in all of them: the batch these sequences make when sampled together."""
    batch = {key: value[rows] for key, value in batch.items()}
    first = int(batch["prompt_mask"].any(dim=0).int().argmax())  # the first column with a real prompt token
    used = int((batch["completion_mask"].any(dim=0) * torch.arange(1, batch["completion_mask"].shape[1] + 1)).max())
    return {key: value if value.dim() == 1 else value[:, first:] if key.startswith("prompt") else value[:, :used]
            for key, value in batch.items()}


# -----------------------------------------------------------------------------
# Reward: the functions of --reward, called as TRL's GRPOTrainer calls them, checked and weighed (docs/rewards.md).


def builtin_rewards(args: Args, pool=None) -> dict:
    """The built-in rewards in TRL's form, and their weights: correct (verify.py's verdict on the item's "answer" or
    "tests", in the thread pool; None for an item with neither) and format (verify.format_reward)."""
    def verdict(text, answer, tests):
        if tests is not None:
            return code_reward(text, tests, args.code_timeout, unsafe_code_sandbox=args.unsafe_code_sandbox)
        return None if answer is None else math_reward(text, answer, strict=args.strict)

    def correct(prompts, completions, answer=None, tests=None, **columns):
        return list(pool.map(verdict, completions, answer or [None] * len(completions), tests or [None] * len(completions)))

    def format(prompts, completions, tests=None, **columns):
        return [format_reward(text, "math" if t is None else "code")
                for text, t in zip(completions, tests or [None] * len(completions))]
    return {"correct": (correct, args.correct_weight), "format": (format, args.format_weight)}


def import_reward(location, name):
    """The function `name` of a module (`package.module`) or a file (`path/to/file.py`)."""
    try:
        if location.endswith(".py"):
            spec = importlib.util.spec_from_file_location(os.path.basename(location)[:-3], location)
            spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
        else:
            module = importlib.import_module(location)
    except Exception as e:  # a missing file or module, or any error inside it
        fail(f"--reward {location}:{name}: cannot import {location} ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    function = getattr(module, name, None)
    return function if callable(function) else fail(f"--reward {location}:{name}: {location} has no function {name}")


def reward_functions(args: Args, pool) -> list[tuple]:
    """(name, function, weight) of each --reward SPEC, imported before the model loads: a bad spec is one line at
    startup. The name (the function's) names its metrics, reward/NAME."""
    builtins, rewards = builtin_rewards(args, pool), []
    for spec in args.reward or ("correct", "format"):
        location, _, target = spec.rpartition(":")  # the last ":": a Windows path keeps its drive
        name, _, weight = target.partition("=")
        if not location and name not in builtins:
            fail(f"--reward {spec}: not a built-in reward ({', '.join(builtins)}), module:function or path/to/file.py:function")
        function, default_weight = (import_reward(location, name), 1.0) if location else builtins[name]
        try:
            weight = float(weight) if weight else default_weight
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            fail(f"--reward {spec}: the weight after = must be a finite number")
        rewards.append((name, function, weight))
    names = [name for name, _, _ in rewards]
    if len(set(names)) < len(names) or {"mean", "std"} & set(names):
        fail(f"--reward: the reward names {names} must differ from each other and from mean and std (metric reward/NAME)")
    return rewards


def score(completions, items, reward_funcs, **context) -> dict:
    """Each reward function on the batch as TRL's GRPOTrainer calls it (docs/rewards.md): fn(prompts=, completions=,
    **context, **columns: the items' other fields as lists). None is "not applicable": out of the weighted sum and
    the reward's statistics; None from every function: reward NaN (unscorable). Returns rewards [N] = Σ weight·value,
    per_reward {name: [N], NaN for None}. A raise, a wrong length or a value neither finite nor None ends the run."""
    keys = dict.fromkeys(key for item in items for key in item if key != "prompt")
    prompts, columns = [item["prompt"] for item in items], {key: [item.get(key) for item in items] for key in keys}
    per_reward, weights = {}, []
    for name, function, weight in reward_funcs:  # reward_functions()
        try:
            values = function(prompts=prompts, completions=completions, **context, **columns)
        except Exception as e:
            fail(f"reward {name} raised {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            fail(f"reward {name} returned {type(values).__name__} {str(values)[:80]}, not a list of {len(completions)} values")
        for i, value in enumerate(values):
            if value is not None and not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)):
                fail(f"reward {name}: item {i} of {len(values)} ({prompts[i][:60]!r}): {value!r} is not a finite number or None")
        per_reward[name], weights = torch.tensor([math.nan if v is None else float(v) for v in values]), weights + [weight]
    values = torch.stack(list(per_reward.values()), dim=1)  # [N, rewards]
    rewards = (values * torch.tensor(weights)).nansum(dim=1)  # [N]: None counts 0 ...
    rewards[values.isnan().all(dim=1)] = math.nan  # ... unless every function said None (unscorable)
    return dict(rewards=rewards, per_reward=per_reward)


# -----------------------------------------------------------------------------
# Log-probs: a fused, chunked lm_head + log-softmax + gather, so [N, V] logits never exist (16 × 2,048 tokens
# × 152k vocabulary: 20 GB in float32). Forward keeps each target's log p = logit - logsumexp and, from the same
# chunk's softmax, its [H] gradient row ("slope": log p_i depends on hidden_i alone); backward only scales those
# rows. Two [N, V]-sized GEMMs instead of three, at the cost of the [N, H] float32 slope (docs/algorithm.md).
# The idea of Liger-Kernel's FusedLinearCrossEntropy and Cut Cross-Entropy (Wijmans et al. 2024), in plain torch.


def gather_chunk_rows(vocab_size, memory_mb) -> int:
    """Rows per chunk so that a chunk's [rows, V] float32 logits plus one more buffer of that size (the exps for
    entropy, or the 16-bit copy for the GEMM on GPU; all else is in place) fit the memory budget."""
    return max(1, int(memory_mb * 2**20) // (2 * 4 * vocab_size))


def float32_matmul(a, b, out=None):
    """a @ b as float32 without a float32 copy of a 16-bit operand (lm_head: 3.1 GB at 14B): on CUDA a bf16 GEMM with
    float32 output, exact up to summation order (bf16 products are exact in float32). out: a float32 buffer (CPU)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)  # torch >= 2.11 (requirements.txt); ran on the H200
    return torch.mm(a.float(), b.float(), out=out)


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy=False, with_gradient=True):
        # hidden [N, H], weight [V, H] (lm_head, frozen, in the compute dtype), targets [N] -> log-probs [N] float32
        N, V = hidden.shape[0], weight.shape[0]
        logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        slope = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if with_gradient else None
        # Trap (CPU): a fresh [n, V] block per chunk goes back to the OS when freed, and the next one pays a page fault
        # per 4 KB (a GEMM into a new [220, 151,936] block: 72-79 ms, a reused one 39-56 ms). So buffers are made once.
        rows_max, on_cpu = min(chunk_size, N), hidden.device.type == "cpu"
        buffer = torch.empty(rows_max, V, dtype=torch.float32, device=hidden.device) if on_cpu else None
        second = torch.empty_like(buffer) if on_cpu and with_entropy else None
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            n, index = hidden[rows].shape[0], targets[rows, None]  # index [n, 1]
            logits = float32_matmul(hidden[rows], weight.T, None if buffer is None else buffer[:n])  # [n, V]
            if temperature != 1.0:
                logits.div_(temperature)  # in place: no second [n, V] buffer
            logits.sub_(logits.amax(dim=1, keepdim=True))  # z - max: exp never overflows, and the max's term is 1
            target = logits.gather(1, index).squeeze(1)  # [n] z_t - max (before any exp: log p_t stays finite)
            if with_entropy:  # e = exp(z - max) in the second buffer, then Σ_v e_v (z_v - max) in the first
                exps = torch.exp(logits, out=None if second is None else second[:n])
                # Trap: torch.sum (cascaded), not a bmm/dot: a BLAS dot over 152k float32 terms drifted 1e-5 to 1e-4 nats.
                weighted = logits.mul_(exps).sum(dim=1)  # [n]
            else:
                exps = logits.exp_()  # in place: one buffer
            # Trap (CUDA): a name that outlives its use keeps the block; the 16-bit copy below, or the next chunk's
            # logits, would then make three buffers. So the names go when their buffers are done with.
            del logits
            # The target's own term is set aside: Σ_{v≠t} e_v is then summed directly, so 1 - p_t = Σ_{v≠t} e_v / Σ e
            # keeps its precision as p_t nears 1 (W_t - Σ_v p_v W_v cancels to rounding noise there, even in float32).
            exps.scatter_(1, index, 0.0)
            others = exps.sum(dim=1)  # [n] Σ_{v≠t} e_v
            total = others + target.exp()  # [n] Σ_v e_v, in [1, V]
            logprobs[rows] = target - total.log()  # log p_t = (z_t - max) - log Σ_v e_v
            if with_entropy:  # H = -Σ p log p = log Σ e - Σ_v e_v (z_v - max) / Σ e: two terms >= 0, no cancellation
                entropy[rows] = total.log() - weighted / total
            if with_gradient:  # d log p_t / d hidden = Σ_v (δ_vt - p_v) W_v / T = ((1 - p_t) W_t - Σ_{v≠t} p_v W_v) / T
                spread = float32_matmul(exps.to(weight.dtype), weight)  # [n, H] Σ_{v≠t} e_v W_v (bf16 GEMM on GPU)
                slope[rows] = (weight[targets[rows]].float() * others[:, None] - spread).div_(total[:, None] * temperature)
            del exps
        ctx.save_for_backward(slope)
        ctx.hidden_dtype = hidden.dtype
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):  # the entropy is a diagnostic: no gradient flows from it
        (slope,) = ctx.saved_tensors  # None when hidden needed no gradient
        grad_hidden = None if slope is None else (grad_logprobs[:, None] * slope).to(ctx.hidden_dtype)  # [N, H]
        # lm_head is frozen: no [V, H] gradient is ever formed; targets/temperature/chunk have none.
        return grad_hidden, None, None, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, memory_mb=256, with_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets], as float32 [N], in chunks of rows (chunk_size=None:
    from memory_mb). hidden [N, H] (gradient flows), weight [V, H] (no gradient), targets [N] int64. with_entropy:
    (log-probs, entropy [N] float32 of softmax(logits / temperature), no gradient), from the same chunks."""
    if chunk_size is None:
        chunk_size = gather_chunk_rows(weight.shape[0], memory_mb)
    with_gradient = torch.is_grad_enabled() and hidden.requires_grad  # else the slope's GEMM is skipped (reference pass)
    return TokenLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size), bool(with_entropy),
                               with_gradient)


def sequence_logprobs(model, batch, temperature, memory_mb=256, with_entropy=False):
    """Per-token log-probs [n, T] of the completions in batch (0 where completion_mask is 0), from the backbone's
    hidden states and the fused gather. with_entropy: (log-probs, the policy's entropy [n, T], no gradient)."""
    prompt_ids, completion_ids, mask = batch["prompt_ids"], batch["completion_ids"], batch["completion_mask"]
    P = prompt_ids.shape[1]
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 0  # trailing all-pad columns are skipped
    logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=mask.device)
    entropy = torch.zeros_like(logprobs)
    if used == 0:
        return (logprobs, entropy) if with_entropy else logprobs
    input_ids = torch.cat([prompt_ids, completion_ids[:, :used]], dim=1)  # [n, P + used]
    attention_mask = torch.cat([batch["prompt_mask"], torch.ones_like(completion_ids[:, :used])], dim=1)
    # Left padding: positions count real tokens only, exactly as generate numbered them.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    backbone = model.get_base_model().get_decoder()  # the transformer without lm_head: no logits
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # [n, P + used, H]
    hidden = hidden[:, P - 1 : P + used - 1]  # [n, used, H]: position t predicts completion token t
    keep = mask.bool()  # [n, T]; its columns >= used are all False, so both selections list the same tokens
    lm_head = model.get_output_embeddings().weight  # [V, H]
    flat = token_logprobs(hidden[keep[:, :used]], lm_head, completion_ids[keep], temperature, memory_mb=memory_mb,
                          with_entropy=with_entropy)
    # [n, T]: only real completion tokens reach the gather; the rest stay 0, no gradient
    logprobs[keep], entropy[keep] = flat if with_entropy else (flat, 0.0)
    return (logprobs, entropy) if with_entropy else logprobs


# -----------------------------------------------------------------------------
# GRPO core: advantages and loss. Variants go here.


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """Â_i = (R_i - mean of its group) / (std of its group + eps); rewards [B*G], each group's G contiguous.
    scale=False: no division (Dr. GRPO). A group with identical rewards gets exactly 0: it says nothing."""
    if rewards.isnan().any():  # unscorable (NaN: no reward function applied): 0, out of the group's mean and std (TRL)
        advantages = torch.zeros_like(rewards)
        for scored in (group[~rewards[group].isnan()] for group in torch.arange(len(rewards)).view(-1, group_size)):
            if len(scored) > 1:
                advantages[scored] = group_advantages(rewards[scored], len(scored), scale, eps)
        return advantages
    grouped = rewards.view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale:
        # Sample std (Bessel), as the paper's std(r) and TRL's. eps keeps a near-zero std finite.
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    zero_std = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    return torch.where(zero_std, torch.zeros_like(centered), centered).view(-1)  # [B*G]


def advantages_and_loss_mask(rewards, rollout, args: Args):
    """Group advantages and the loss mask of a rollout, with DAPO's --overlong penalty or mask and
    --drop-zero-std-groups. Returns (rewards after any penalty [N], advantages [N], loss_mask [N, T], zero_std [B])."""
    truncated = rollout["truncated"]  # [N]
    if args.overlong == "penalty":
        rewards = rewards - args.overlong_penalty * truncated.float()  # a new tensor: scores stay as verified
    advantages = group_advantages(rewards, args.group_size, scale=args.scale_advantages)  # [N]
    # All-zero advantages happen exactly for zero-std groups (otherwise some deviation is non-zero).
    zero_std = (advantages.view(-1, args.group_size) == 0).all(dim=1)  # [B]
    # The loss mask: completion tokens, minus masked-out truncations and dropped groups.
    keep = torch.ones_like(rewards, dtype=torch.bool)  # [N]
    if args.overlong == "mask":
        keep &= ~truncated
    if args.drop_zero_std_groups:
        keep &= ~zero_std.repeat_interleave(args.group_size)
    loss_mask = rollout["completion_mask"] * keep[:, None].float()  # [N, T]
    return rewards, advantages, loss_mask, zero_std


def high_entropy_mask(entropy, loss_mask, quantile):
    """--top-entropy-quantile ρ: 1 for the trained tokens whose entropy is among the ⌈ρ·n⌉ highest of the batch's n
    (all ranks, ties kept), else 0; [N, T]. Computed once, before the updates: one threshold for every micro-batch."""
    trained = torch.cat([e.to(entropy.device) for e in all_gather(entropy[loss_mask.bool()].cpu())])
    if trained.numel() == 0:
        return loss_mask.clone()
    keep = max(1, math.ceil(round(quantile * trained.numel(), 6)))  # round: 0.2 · 15 is 3.0000000000000004
    threshold = trained.kthvalue(trained.numel() - keep + 1).values  # the keep-th largest
    return loss_mask * (entropy >= threshold).float()


def loss_denominator(mask, agg, max_new_tokens=None):
    """The normalizer of each aggregation, for the whole batch (so micro-batches sum to the same loss).
    seq: sequences with at least one trained token; token: trained tokens; dr_grpo: N·max_new_tokens."""
    if agg == "seq":
        return float((mask.sum(dim=1) > 0).sum().clamp(min=1))
    if agg == "token":
        return float(mask.sum().clamp(min=1))
    return float(mask.shape[0] * (max_new_tokens or mask.shape[1]))


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.2, beta=0.04, agg="seq",
              denominator=None, ratio_level="token", policy_mask=None, sampler_logp=None, tis_cap=0.0):
    """The negated GRPO objective. logp/old_logp/ref_logp/mask [N, T], advantages [N]; ref_logp may be None when
    beta == 0. denominator: the batch-wide normalizer (loss_denominator) when this is one micro-batch of a larger
    batch; None computes it from this batch. ratio_level "sequence": GSPO's one ratio per completion. policy_mask
    [N, T]: 0/1, the tokens whose policy term counts (the KL term counts all of mask); None: all. sampler_logp [N, T]:
    log π_sampler (generate's record); with tis_cap C > 0 the policy term is weighted by min(π_old / π_sampler, C)."""
    A = advantages[:, None]  # [N, 1], one advantage for every token of a completion
    ratio = torch.exp(logp - old_logp)  # [N, T], π_θ / π_old; exactly 1 when old_logp = logp.detach()
    if ratio_level == "sequence":
        # GSPO (Zheng et al. 2025): s_i = exp(mean_t log ratio), length-normalised, one per completion;
        # its gradient flows through every token's log-prob, scaled by s_i / |o_i|. [N, 1]
        ratio = torch.exp(((logp - old_logp) * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1))
    ratio_clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # [N, T]
    surrogate = torch.minimum(ratio * A, ratio_clipped * A)  # [N, T], PPO's pessimistic bound
    if beta != 0:
        log_ratio_ref = ref_logp - logp  # [N, T]
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # [N, T], k3 >= 0, unbiased for KL(π_θ‖π_ref)
    else:
        kl = torch.zeros_like(logp)
    if policy_mask is not None:  # high-entropy tokens only (Wang et al. 2025, "Beyond the 80/20 Rule"); KL on all
        surrogate = surrogate * policy_mask
    if sampler_logp is not None and tis_cap > 0:  # truncated importance sampling (Yao et al. 2025); no gradient
        surrogate = surrogate * torch.clamp(torch.exp(old_logp - sampler_logp), max=tis_cap)  # [N, T], min(π_old/π_sampler, C)
    per_token_objective = surrogate - beta * kl  # [N, T]
    per_token_loss = -per_token_objective * mask  # [N, T]: maximise the objective = minimise its negative
    if agg == "seq":
        # GRPO paper: 1/|o_i| Σ_t within each sequence, then 1/G Σ_i over sequences.
        summed = (per_token_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    else:
        # DAPO "token": Σ over all tokens / number of tokens; Dr. GRPO: Σ / constant (B·G·max_new_tokens)
        summed = per_token_loss.sum()
    if denominator is None:
        denominator = loss_denominator(mask, agg)
    loss = summed / denominator
    with torch.no_grad():  # diagnostics, on trained tokens only
        tokens = mask.sum().clamp(min=1)
        clipped_low = (ratio < 1 - clip_low) & (A < 0)  # tokens whose gradient the clip switched off
        clipped_high = (ratio > 1 + clip_high) & (A > 0)
        stats = {"kl": float((kl * mask).sum() / tokens),
                 "clip_frac_low": float((clipped_low * mask).sum() / tokens),
                 "clip_frac_high": float((clipped_high * mask).sum() / tokens),
                 "ratio_mean": float((ratio * mask).sum() / tokens),
                 "tokens": float(mask.sum())}
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
        if sampler_logp is not None:  # the sampler's gap per trained token; k3 of KL(π_sampler ‖ π_old) as for the KL term
            gap = ((old_logp - sampler_logp) * mask).double()  # [N, T] log(π_old / π_sampler); k3 ≈ gap²/2 needs float64
            stats.update(sampler_logp_abs_diff=float(gap.abs().sum() / tokens),
                         sampler_kl=float((gap.exp() - gap - 1).sum() / tokens),
                         tis_capped_frac=float(((gap.exp() > tis_cap) * mask).sum() / tokens) if tis_cap > 0 else 0.0)
    return loss, stats


# -----------------------------------------------------------------------------
# Update: accumulate the micro-batch gradients of one batch, then one AdamW step. Plumbing + trap notes.


def sequence_lengths(batch) -> list[int]:
    """Tokens each sequence costs in a forward: the batch's prompt width P plus its completion up to its last masked
    token. A micro-batch costs (its size) × (its longest): sequence_logprobs cuts the all-pad columns."""
    mask = batch["completion_mask"]  # [N, T]
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # [T]
    completion = (positions * (mask != 0)).amax(dim=1) if mask.shape[1] else torch.zeros(mask.shape[0])  # [N]
    return (completion + batch["prompt_ids"].shape[1]).tolist()


def micro_batch_plan(lengths, max_sequences, max_tokens=0) -> list[list[int]]:
    """Which sequences go in each micro-batch (indices into the batch). max_tokens = 0: consecutive runs of
    max_sequences. max_tokens > 0: sorted longest first (an out-of-memory comes first, before any other work), each
    micro-batch filled while (its size) × (its longest) ≤ max_tokens; a longer sequence goes alone."""
    if max_tokens <= 0:
        return [list(range(start, min(start + max_sequences, len(lengths))))
                for start in range(0, len(lengths), max_sequences)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # stable: ties keep batch order
    plan = []
    for i in order:
        # Sorted descending, a micro-batch's first sequence is its longest: adding i costs (size + 1) × that.
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def micro_batches(batch, args: Args):
    """(rows, micro-batch) for each micro-batch micro_batch_plan makes of batch; rows: its indices in batch."""
    for rows in micro_batch_plan(sequence_lengths(batch), args.micro_batch, args.micro_batch_tokens):
        rows = torch.tensor(rows, device=batch["completion_ids"].device)
        yield rows, {k: v[rows] for k, v in batch.items()}


@torch.no_grad()
def batch_logprobs(model, batch, args: Args, temperature, reference=False, with_entropy=False):
    """Log-probs [N, T] of a whole batch without gradient: π_old (μ > 1) or, with adapters off, π_ref.
    with_entropy: (log-probs, entropy [N, T])."""
    logprobs = torch.zeros(batch["completion_ids"].shape, dtype=torch.float32, device=batch["completion_ids"].device)
    entropy = torch.zeros_like(logprobs)
    for rows, micro in micro_batches(batch, args):  # rows: back in batch order whatever order the plan ran
        with model.disable_adapter() if reference else contextlib.nullcontext():  # π_ref: the 4-bit base, LoRA off
            result = sequence_logprobs(model, micro, temperature, args.logprob_memory_mb, with_entropy)
        logprobs[rows], entropy[rows] = result if with_entropy else (result, 0.0)
    return (logprobs, entropy) if with_entropy else logprobs  # [N, T]


def accumulate_gradients(model, batch, args: Args, temperature, denominator):
    """Forward + backward every micro-batch of batch (batch["loss_mask"]: the trained tokens). Each micro-batch loss is
    divided by the whole batch's denominator, so the summed gradients are the batch's. Returns token-weighted stats."""
    totals = {}
    device = batch["completion_ids"].device
    # Trap: gradient checkpointing only acts in train mode, and from_pretrained returns an eval-mode model; with the
    # merged sampler nothing else switches it (14B on an H200: 108 GiB peak for 16 x 296 tokens without this line).
    model.train()
    for _, micro in micro_batches(batch, args):
        # --offload-activations: every tensor autograd saves (the checkpointed block inputs, the gather's
        # hidden states) waits in CPU memory until backward: PyTorch's save_on_cpu, at a copy's cost.
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") if args.offload_activations
                   else contextlib.nullcontext())
        with offload:
            logp, entropy = sequence_logprobs(model, micro, temperature, args.logprob_memory_mb, with_entropy=True)
        # μ = 1: π_old is the policy right now, so old = logp.detach() and the ratio is exactly 1.
        old_logp = micro["old_logp"] if "old_logp" in micro else logp.detach()
        loss, stats = grpo_loss(logp, old_logp, micro.get("ref_logp"), micro["advantages"], micro["loss_mask"],
                                args.clip_low, args.clip_high, args.beta, args.agg, denominator, args.ratio_level,
                                micro.get("policy_mask"), micro.get("sampler_logp"), args.tis_cap)
        loss.backward()
        stats["entropy"] = float((entropy * micro["loss_mask"]).sum() / micro["loss_mask"].sum().clamp(min=1))
        stats["loss"] = float(loss.detach()) * denominator  # un-normalised, so the sums below add up
        for key, value in stats.items():
            weight = 1.0 if key in ("loss", "tokens") else stats["tokens"]
            totals[key] = totals.get(key, 0.0) + value * weight
    tokens = max(totals.get("tokens", 0.0), 1.0)
    return {k: (v / denominator if k == "loss" else v if k == "tokens" else v / tokens) for k, v in totals.items()}


def with_memory_retry(run, model, batch, args: Args, phase, log=print, save=None):
    """run() is one pass over batch's micro-batches. On CUDA out-of-memory (CPU allocators raise none): halve
    --micro-batch (or --micro-batch-tokens) until the plan changes, for the rest of the run, and redo the pass from
    zeroed gradients (exact however the batch is split). When one sequence does not fit: save() and stop."""
    while True:
        try:
            return run()
        except torch.OutOfMemoryError:
            pass  # recover outside the except block: its traceback keeps the failed micro-batch's tensors alive
        model.zero_grad(set_to_none=True)  # the micro-batches that did finish are redone: drop their gradients
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed blocks back, so the smaller micro-batches are not fragmented
        lengths, name = sequence_lengths(batch), "micro_batch_tokens" if args.micro_batch_tokens > 0 else "micro_batch"
        plan = micro_batch_plan(lengths, args.micro_batch, args.micro_batch_tokens)
        if all(len(rows) == 1 for rows in plan):  # nothing left to split
            if save is not None:
                save()
            fail(f"out of memory in the {phase} with one sequence per micro-batch (the longest: {max(lengths)} tokens, "
                 f"{batch['prompt_ids'].shape[1]} of them padded prompt): lower --max-new-tokens or the prompt "
                 f"length (or use --offload-activations)")
        while micro_batch_plan(lengths, args.micro_batch, args.micro_batch_tokens) == plan:  # 16 -> 8: same for 8 rows
            setattr(args, name, getattr(args, name) // 2)  # ends at 1 at worst, where every micro-batch is one sequence
        setting = f"{flag(name)} {getattr(args, name)}"
        log(f"out of memory in the {phase}: halved to {setting} for the rest of the run and redoing the pass "
            f"(start with {setting} to skip this)")


def logprobs_before_update(model, batch, args: Args, temperature, retry) -> dict:
    """What the loss needs from the policy before this step's updates (each pass under with_memory_retry): ref_logp
    (adapters off; β > 0), old_logp (μ > 1) and policy_mask (--top-entropy-quantile), all [N, T]."""
    out = {}
    if args.beta != 0:
        out["ref_logp"] = with_memory_retry(lambda: batch_logprobs(model, batch, args, temperature, reference=True),
                                            model, batch, args, "reference pass", **retry)
    if args.num_iterations > 1 or args.top_entropy_quantile < 1:
        # One pass, adapters on: π_old's log-probs (μ > 1) and, only if --top-entropy-quantile needs them, entropies.
        select = args.top_entropy_quantile < 1
        result = with_memory_retry(lambda: batch_logprobs(model, batch, args, temperature, with_entropy=select),
                                   model, batch, args, "old log-prob pass", **retry)
        old_logp, entropy = result if select else (result, None)
        if args.num_iterations > 1:
            out["old_logp"] = old_logp
        if select:
            out["policy_mask"] = high_entropy_mask(entropy, batch["loss_mask"], args.top_entropy_quantile)
    return out


def update_adapters(model, batch, optimizer, scheduler, args: Args, temperature, denominator, retry=None):
    """One optimizer step on the whole batch: accumulate the gradients, sum them over ranks, clip, AdamW. A non-finite
    loss or gradient skips it (a bad batch must not poison the adapters). Returns (stats, grad_norm, finite)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # the LoRA adapters
    optimizer.zero_grad(set_to_none=True)
    stats = with_memory_retry(lambda: accumulate_gradients(model, batch, args, temperature, denominator), model, batch,
                              args, "policy forward/backward", **(retry or {}))
    all_reduce_gradients(parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
    # grad_norm is global after the all-reduce; the losses are gathered: every rank decides alike.
    losses = all_gather(stats.get("loss", 0.0))
    finite = all(math.isfinite(loss) for loss in losses) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
        scheduler.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return stats, float(grad_norm), finite


# -----------------------------------------------------------------------------
# Schedules: sampling temperature and learning rate as pure functions of the step.


def temperature_at(step, args: Args) -> float:
    """Linear from --temperature to --temperature-end over the run (constant when the end is 0)."""
    if args.temperature_end == 0 or args.steps == 1:
        return args.temperature
    return args.temperature + (args.temperature_end - args.temperature) * step / (args.steps - 1)


def lr_factor(optimizer_step, args: Args) -> float:
    """Linear warmup, then cosine to 0 or constant; counted in optimizer steps (steps × μ)."""
    warmup = args.warmup_steps * args.num_iterations
    if optimizer_step < warmup:
        return (optimizer_step + 1) / warmup
    if args.lr_schedule == "constant":
        return 1.0
    progress = (optimizer_step - warmup) / max(1, args.steps * args.num_iterations - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# Distributed (torchrun): each rank samples and scores its own whole groups; only adapter gradients cross ranks.


def init_distributed(args: Args):
    """(rank, world_size, device) from torchrun's RANK, WORLD_SIZE, LOCAL_RANK; a plain run is rank 0 of 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_gather(value):
    """A list of every rank's value (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_gradients(parameters):
    """Sum the adapter gradients of all ranks in place, as one flat buffer (not averaged: every rank divided its loss
    by the global denominator). By hand rather than DDP: a few LoRA tensors, explicit accumulation, no hooks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])  # float32: 4 bytes × 68.8M adapter parameters = 275 MB at 14B, r=16
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, chunk in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


# -----------------------------------------------------------------------------
# One GRPO step: the README's six steps, in order. Everything it calls is defined above.


def sample_groups(step, position, train_items, sampler, tokenizer, args: Args, eos_ids, reward_funcs, temperature,
                  rank=0, world_size=1, log=print):
    """Steps 1-3 from `position` of the data order: B prompts (this rank's share), G completions each, their rewards.
    --dynamic-sampling (DAPO, algorithm 1): while fewer than B groups over all ranks are informative, a round of as many
    next prompts as groups are missing. Returns (rollouts with "prompts", scores, next position, rounds, seconds)."""
    rollouts, scored, found, seconds = [], [], 0, 0.0
    for rounds in range(1, 2 + (args.max_refill_rounds if args.dynamic_sampling else 0)):
        # 1. The round's prompts (B, then the missing ones): rank r takes the r-th of world_size near-equal slices,
        # each prompt repeated G times (a group's G are contiguous).
        count, start = args.prompts_per_step - found, time.time()
        indices = data_indices(position, count, len(train_items), args.seed)[rank * count // world_size : (rank + 1) * count // world_size]
        position += count
        group_items = [train_items[i] for i in indices for _ in range(args.group_size)]
        prompts, informative = [build_prompt(item, tokenizer, args.chat_template) for item in group_items], 0
        if prompts:  # a small refill round may leave a rank none
            # 2. Rollout: one sampled completion per prompt copy, and its completion mask.
            rollout = generate(sampler, tokenizer, prompts, args, eos_ids, temperature, log=log,
                               progress=f"step {step + 1} generate" if rank == 0 else "")
            seconds += time.time() - start
            # 3. Rewards: every reward function, given what TRL gives (trainer_state: the part of TRL's we have).
            ids = [row[mask.bool()].tolist() for row, mask in zip(rollout["completion_ids"], rollout["completion_mask"])]
            scores = score(rollout["texts"], group_items, reward_funcs, completion_ids=ids,
                           trainer_state=argparse.Namespace(global_step=step, max_steps=args.steps))
            informative = int((~advantages_and_loss_mask(scores["rewards"], rollout, args)[3]).sum())
            rollouts.append({**rollout, "prompts": prompts})
            scored.append(scores)
        found += sum(all_gather(informative))  # the same total on every rank: they agree on the rounds
        if found >= args.prompts_per_step:
            break
    pad = tokenizer.pad_token_id
    return concatenate_rollouts(rollouts, pad), concatenate_rollouts(scored, pad), position, rounds, seconds


def grpo_step(step, train_items, model, sampler, tokenizer, optimizer, scheduler, args: Args, eos_ids, reward_funcs,
              bad_steps=0, rank=0, world_size=1, log=print, save=None, position=None) -> dict:
    """Sample B·G completions, score them, and make μ optimizer steps on them. sampler: model or its dense copy;
    bad_steps: skipped updates in a row so far; save(): a checkpoint before an out-of-memory stop; position: where the
    step's prompts start in the data order (default step·B). Returns what the loop logs (step_metrics reads it)."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_start = time.time()
    temperature = temperature_at(step, args)  # sampling and log-probs use the same one: same policy

    # 1-3. The next B prompts, G completions each, their rewards (--dynamic-sampling: until B groups are informative).
    position = step * args.prompts_per_step if position is None else position
    rollout, scores, position, rounds, generate_seconds = sample_groups(
        step, position, train_items, sampler, tokenizer, args, eos_ids, reward_funcs, temperature, rank, world_size, log)
    if sampler is not model:
        release_generation_model(model, sampler)  # not needed until the refresh after the update

    # 4. Group advantages, and the loss mask that says which tokens train. --dynamic-sampling: the batch is the
    # informative groups alone, as if only they had been sampled.
    rewards, advantages, loss_mask, zero_std = advantages_and_loss_mask(scores["rewards"], rollout, args)
    batch = {**{k: v for k, v in rollout.items() if torch.is_tensor(v)}, "loss_mask": loss_mask, "advantages": advantages}
    if args.dynamic_sampling:
        batch = select_rows(batch, ~zero_std.repeat_interleave(args.group_size))
    batch = {k: v.to(device) for k, v in batch.items()}  # ids, masks and sampler_logp [N, T]; truncated, advantages [N]

    # 5. Reference (adapters off) and, for μ > 1, old log-probs: computed once, before any update.
    reference_start, retry = time.time(), dict(log=log, save=save)
    batch.update(logprobs_before_update(model, batch, args, temperature, retry))
    reference_seconds = time.time() - reference_start

    # 6. μ optimizer steps on this batch. The denominator is global: summed over ranks.
    train_start = time.time()
    denominator = sum(all_gather(loss_denominator(batch["loss_mask"], args.agg, args.max_new_tokens)))
    for _ in range(args.num_iterations):
        stats, grad_norm, finite = update_adapters(model, batch, optimizer, scheduler, args, temperature, denominator, retry)
        bad_steps = 0 if finite else bad_steps + 1
        if not finite:
            log(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
            if bad_steps >= args.max_bad_steps:
                fail(f"{bad_steps} non-finite steps in a row: stopping. The last good checkpoint is in the run "
                     "directory's checkpoints/; try a lower --lr or --max-grad-norm")
            break
    if sampler is not model:
        refresh_generation_model(model, sampler)  # the next rollout samples from the updated policy
    train_seconds = time.time() - train_start
    return {"step": step + 1, "prompts": rollout["prompts"], "rollout": rollout, "scores": scores, "rewards": rewards,
            "advantages": advantages, "zero_std": zero_std, "stats": stats, "grad_norm": grad_norm, "position": position,
            "rounds": rounds, "groups_kept": len(batch["advantages"]) // args.group_size,
            "bad_steps": bad_steps, "temperature": temperature, "lr": scheduler.get_last_lr()[0],
            "seconds": {"generate": generate_seconds, "reference": reference_seconds, "train": train_seconds,
                        "step": time.time() - step_start},
            # CUDA: peak allocated since the reset above; CPU: the process's peak resident set size (Linux: KiB)
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# -----------------------------------------------------------------------------
# Evaluation: greedy pass@1 on held-out items, strict (\boxed{} only) and lenient (last number too).


def evaluate(model, tokenizer, items, args: Args, eos_ids, pool, rank=0, world_size=1) -> dict:
    """Each rank evaluates items[rank::world_size]; the counts are gathered: every rank returns the same numbers."""
    shard = items[rank::world_size]
    strict = lenient = formatted = 0.0
    if shard:
        prompts = [build_prompt(item, tokenizer, args.chat_template) for item in shard]
        texts = generate(model, tokenizer, prompts, args, eos_ids, temperature=1.0, greedy=True,
                         progress="eval" if rank == 0 else "")["texts"]
        answer, tests = [item.get("answer") for item in shard], [item.get("tests") for item in shard]
        (correct, _), (formatted, _) = builtin_rewards(dataclasses.replace(args, strict=True), pool).values()
        verdicts = correct(prompts, texts, answer, tests)
        # Lenient extraction is for math only: code items get None here and keep their (costly) strict verdict.
        lenient_math = builtin_rewards(dataclasses.replace(args, strict=False), pool)["correct"][0](prompts, texts, answer)
        strict, formatted = sum(verdicts), sum(formatted(prompts, texts, tests=tests))
        lenient = sum(strict_verdict if v is None else v for strict_verdict, v in zip(verdicts, lenient_math))
    totals = np.sum(all_gather([strict, lenient, formatted, len(shard)]), axis=0)
    n = max(totals[3], 1)
    return {"eval/accuracy_strict": totals[0] / n, "eval/accuracy_lenient": totals[1] / n,
            "eval/format_rate": totals[2] / n, "eval/n": int(totals[3])}


# -----------------------------------------------------------------------------
# Logging: one line per step, metrics.jsonl, samples.jsonl. Names: docs/operations.md "Logged metrics".

# The metric of a reward function's mean, reward/NAME (not reward/mean, reward/std, reward/NAME/std).
REWARD_FUNCTION_MEAN = re.compile(r"reward/(?!(?:mean|std)$)[^/]+")
# Phrases of self-verification and backtracking, the "aha" behaviours GRPO runs are watched for
# (DeepSeek-R1, sec. 2.2.4). A completion counts once if it contains any of them.
REFLECTION_PATTERN = re.compile(r"\b(wait|let me (?:check|verify|re-?check|re-?evaluate|think again)|verify|"
                                r"double[- ]check|re-?check|on second thought|i made a mistake|actually)\b",
                                re.IGNORECASE)


def step_metrics(result, args: Args, world_size=1) -> dict:
    """The metrics.jsonl record of grpo_step's result (names in docs/operations.md), over every rank's completions."""
    rollout = result["rollout"]
    gathered = all_gather({"reward": result["rewards"].tolist(), "lengths": rollout["completion_mask"].sum(1).int().tolist(),
                           **{f"reward/{name}": values.tolist() for name, values in result["scores"]["per_reward"].items()},
                           "truncated": rollout["truncated"].tolist(), "zero_std": result["zero_std"].tolist(),
                           "reflection": [bool(REFLECTION_PATTERN.search(t)) for t in rollout["texts"]],
                           "stats": result["stats"], "peak_memory_gib": result["peak_memory_gib"], "kept": [result["groups_kept"]]})
    every = {key: np.concatenate([g[key] for g in gathered]) for key in gathered[0] if key not in ("stats", "peak_memory_gib")}
    tokens = [g["stats"].get("tokens", 0.0) for g in gathered]

    def token_mean(key):  # a loss statistic over all ranks' trained tokens
        return float(np.average([g["stats"].get(key, 0.0) for g in gathered], weights=tokens)) if sum(tokens) else 0.0

    def mean_and_std(key):  # over the values that are there: None (NaN) leaves a reward's statistics, as in TRL
        values = every[key][~np.isnan(every[key])]
        return {f"{key}/mean" if key == "reward" else key: float(values.mean()) if values.size else math.nan,
                f"{key}/std": float(values.std()) if values.size else math.nan}
    seconds = result["seconds"]
    return {"step": result["step"], **{k: v for key in every if key.startswith("reward") for k, v in mean_and_std(key).items()},
            "completions/unscorable_frac": float(np.isnan(every["reward"]).mean()),
            "completions/mean_length": float(every["lengths"].mean()), "completions/max_length": int(every["lengths"].max()),
            "completions/truncated_frac": float(every["truncated"].mean()),
            "groups/zero_std_frac": float(every["zero_std"].mean()),
            "groups/dropped": int(every["zero_std"].sum()) if args.drop_zero_std_groups else 0,
            "groups/sampled": len(every["zero_std"]), "groups/kept": int(every["kept"].sum()), "groups/rounds": result["rounds"],
            "behaviour/reflection_rate": float(every["reflection"].mean()),
            "loss/value": sum(g["stats"].get("loss", 0.0) for g in gathered), "loss/kl": token_mean("kl"),
            "loss/clip_frac": token_mean("clip_frac"), "loss/clip_frac_low": token_mean("clip_frac_low"),
            "loss/clip_frac_high": token_mean("clip_frac_high"), "loss/ratio_mean": token_mean("ratio_mean"),
            "policy/entropy": token_mean("entropy"),
            **({"sampler/logp_abs_diff": token_mean("sampler_logp_abs_diff"), "sampler/kl": token_mean("sampler_kl"),
                "sampler/tis_capped_frac": token_mean("tis_capped_frac")} if "sampler_kl" in result["stats"] else {}),
            "loss/grad_norm": result["grad_norm"], "loss/trained_tokens": int(sum(tokens)),
            "optim/lr": result["lr"], "rollout/temperature": result["temperature"],
            **{f"time/{key}_s": value for key, value in seconds.items()},
            "throughput/generated_tokens_per_s": float(every["lengths"].sum()) / max(seconds["generate"], 1e-9) / world_size,
            "memory/peak_gib": max(g["peak_memory_gib"] for g in gathered),
            "batch/micro_batch": args.micro_batch, "batch/micro_batch_tokens": args.micro_batch_tokens}


def format_step_line(m, steps) -> str:
    rewards = "".join(f"| {key[7:]} {m[key]:.3f} " for key in m if REWARD_FUNCTION_MEAN.fullmatch(key))
    return (f"step {m['step']}/{steps} | reward {m['reward/mean']:.3f} ± {m['reward/std']:.3f} {rewards}"
            f"| len {m['completions/mean_length']:.0f}/{m['completions/max_length']} "
            f"| trunc {m['completions/truncated_frac']:.2f} | zero-std {m['groups/zero_std_frac']:.2f} "
            f"| kl {m['loss/kl']:.4f} | ent {m['policy/entropy']:.3f} | clip {m['loss/clip_frac']:.3f} | lr {m['optim/lr']:.2e} "
            f"| temp {m['rollout/temperature']:.2f} | gen {m['time/generate_s']:.1f}s "
            f"| train {m['time/train_s']:.1f}s | {m['throughput/generated_tokens_per_s']:.0f} tok/s "
            f"| mem {m['memory/peak_gib']:.1f} GiB")


@contextlib.contextmanager
def writing(path, run_dir):
    """Writes to one of the run's files: a failure (disk full, no permission) stops the run in one line naming the
    file, the cause and the checkpoint to resume from."""
    try:
        yield
    except Exception as e:  # OSError, or a library's wrapper of one (safetensors' SafetensorError)
        names = checkpoint_names(run_dir)
        resume = f"{os.path.join(run_dir, 'checkpoints', names[-1])}: free space, then --resume {run_dir}" if names else "none yet"
        fail(f"could not write {path} ({getattr(e, 'strerror', None) or e}); the last complete checkpoint is {resume}")


def append_jsonl(path, records):
    with writing(path, os.path.dirname(path)), open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def trim_records(run_dir, step, log=print) -> int:
    """At resume (rank 0): metrics.jsonl and samples.jsonl keep their records up to the checkpoint's step, byte for byte,
    and lose later ones (the run redoes them) and a line a crash cut short. Returns metrics.jsonl's last step before."""
    for name in ("samples.jsonl", "metrics.jsonl"):  # metrics.jsonl last: its steps are returned
        path, steps = os.path.join(run_dir, name), []
        if os.path.exists(path):
            with writing(path, run_dir), open(path, "rb") as f:
                lines = f.readlines()
                steps = [json.loads(line)["step"] if line.endswith(b"\n") else math.inf for line in lines]  # inf: cut short
                kept = [line for line, line_step in zip(lines, steps) if line_step <= step]
                if len(kept) < len(lines):
                    write_atomically(path, b"".join(kept))
                    log(f"{path}: dropped {len(lines) - len(kept)} records of the steps after {step}, which the run redoes")
    return max([line_step for line_step in steps if line_step < math.inf], default=0)


def write_step_records(run_dir, metrics, result, args: Args, log=print):
    """Rank 0: the step's metrics.jsonl record, --samples-per-step samples.jsonl records, a printed sample."""
    prompts, texts, rewards, advantages = result["prompts"], result["rollout"]["texts"], result["rewards"], result["advantages"]
    number = lambda value: None if math.isnan(value) else float(value)  # noqa: E731  (None: unscorable / not applicable)
    append_jsonl(os.path.join(run_dir, "metrics.jsonl"), [metrics])
    append_jsonl(os.path.join(run_dir, "samples.jsonl"),
                 [{"step": metrics["step"], "prompt": prompts[i], "completion": texts[i], "reward": number(rewards[i]),
                   "rewards": {name: number(values[i]) for name, values in result["scores"]["per_reward"].items()},
                   "advantage": float(advantages[i]), "truncated": bool(result["rollout"]["truncated"][i])}
                  for i in range(min(args.samples_per_step, len(prompts)))])
    if args.sample_every and metrics["step"] % args.sample_every == 0:
        log(f"--- sample (reward {float(rewards[0]):.2f}, advantage {float(advantages[0]):+.2f}) ---\n"
            f"{texts[0][:600]}\n---")


def announce_run(args: Args, run_dir, world_size, num_items, is_main, log=print):
    """Print the config and the batch geometry; rank 0 makes the run directory (not one holding a run) + args.json."""
    log("config: " + " ".join(f"{flag(k)} {v}" for k, v in dataclasses.asdict(args).items()))
    local_prompts = args.prompts_per_step // world_size
    sequences = args.prompts_per_step * args.group_size
    log(f"batch: {args.prompts_per_step} prompts × G={args.group_size} = {sequences} sequences per step "
        f"({local_prompts * args.group_size} per rank × {world_size} ranks), "
        + (f"micro-batches of at most {args.micro_batch_tokens} padded tokens (sorted by length), " if args.micro_batch_tokens
           else f"micro-batch {args.micro_batch} -> {math.ceil(local_prompts * args.group_size / args.micro_batch)} "
                f"forward/backward per rank, ") +
        f"μ={args.num_iterations}, {args.steps} steps = {args.steps * args.num_iterations} optimizer steps, "
        f"{num_items} training items ({args.steps * args.prompts_per_step / num_items:.2f} epochs)")
    if is_main:
        continued = args.resume and os.path.abspath(args.resume) == os.path.abspath(run_dir)
        if not continued and (os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or checkpoint_names(run_dir)):
            fail(f"{run_dir} holds a run already: continue it with --resume {run_dir}, or choose another --run-name")
        with writing(run_dir, run_dir):
            os.makedirs(run_dir, exist_ok=True)
            write_atomically(os.path.join(run_dir, "args.json"), json.dumps(dataclasses.asdict(args), indent=2))
        log(f"run directory {run_dir}")


def open_report(args: Args, run_dir, is_main=True, start_step=0, logged=0):
    """--report-to: a live dashboard fed metrics.jsonl's records (x-axis "step"), the run's args as its config.
    Returns (report(record), close()), which do nothing for "none" and on ranks other than 0. Resumed at start_step,
    TensorBoard purges its later steps; W&B (whose steps only go forward) continues after step `logged`."""
    if args.report_to == "none" or not is_main:
        return (lambda record: None), (lambda: None)
    config = dataclasses.asdict(args)
    if args.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package
        except ImportError:
            fail("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        writer.add_text("args", "\n".join(f"    {flag(k)} {v}" for k, v in config.items()))  # indented: markdown code

        def report(record):
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(key, value, global_step=record["step"])
            writer.flush()  # live: visible in TensorBoard at once, not when a buffer fills
        return report, writer.close
    try:
        import wandb
    except ImportError:
        fail("--report-to wandb needs the wandb package: pip install wandb")
    id_path = os.path.join(run_dir, "wandb_id")
    known = os.path.exists(id_path)
    if not known:
        write_atomically(id_path, os.urandom(6).hex())  # a W&B run id, new for each run (not from the seeded RNGs)
    with open(id_path) as f:
        run = wandb.init(project=args.wandb_project, name=os.path.basename(run_dir), dir=run_dir, config=config,
                         id=f.read(), resume="allow")

    def report(record):
        if not known or record["step"] > logged:  # an eval record joins its step's row
            run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    return report, run.finish


def plot_metrics(run_dir):
    """metrics.jsonl -> metrics.png: a panel per metric the run logged, against the step. Returns the names drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib, an optional dependency: pip install matplotlib")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        fail(f"--plot: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]  # not a line a crash cut short
    means = [key for key in dict.fromkeys(key for r in records for key in r) if REWARD_FUNCTION_MEAN.fullmatch(key)]
    panels = [("reward/mean", "reward")] + [(key, f"{key[7:]} (train)") for key in means] + [
              ("eval/accuracy_strict", "eval accuracy"), ("completions/mean_length", "completion length"),
              ("loss/kl", "KL to reference"), ("policy/entropy", "policy entropy"),
              ("sampler/logp_abs_diff", "sampler vs policy |Δ log p|")]
    # Only panels with data: a run without evaluation gets no empty "eval accuracy" frame.
    panels = [(key, title) for key, title in panels if any(key in r for r in records)]
    if not panels:
        fail(f"--plot: {path} has no step or eval records to draw")
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot(*zip(*points), marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(os.path.join(run_dir, "metrics.png"), dpi=100)
    print(f"wrote {os.path.join(run_dir, 'metrics.png')}")
    return [key for key, title in panels]  # what was drawn, for the tests


# -----------------------------------------------------------------------------
# Checkpoints: adapter (peft's format) + optimizer/scheduler/RNG/step, written aside and renamed into place.

CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.pt", "args.json")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def checkpoint_names(run_dir) -> list[str]:
    """The run's complete checkpoints, oldest first (a step_NNNNNN.tmp is a save under way or cut short)."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    return sorted(d for d in os.listdir(checkpoints) if d.startswith("step_") and not d.endswith(".tmp")) \
        if os.path.isdir(checkpoints) else []


def save_checkpoint(run_dir, step, model, optimizer, scheduler, args: Args, rng_states, data_position, log=print):
    """rng_states: one rng_state() per rank; data_position: where the next step's prompts start in the data order.
    A save that fails is one line (writing); one that fails or is interrupted leaves no step_NNNNNN.tmp behind."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if os.path.isdir(final):
        return final  # this step is already saved (e.g. a periodic save that is also the last step)
    temporary = final + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a process killed during an earlier save
    try:
        with writing(final, run_dir):
            model.save_pretrained(temporary)  # adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained)
            state = io.BytesIO()  # then written as a plain file: torch.save's own write errors do not name their cause
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_states, "data_position": data_position}, state)
            write_atomically(os.path.join(temporary, "trainer_state.pt"), state.getbuffer())
            write_atomically(os.path.join(temporary, "args.json"), json.dumps(dataclasses.asdict(args), indent=2))
            os.replace(temporary, final)  # atomic: the checkpoint appears whole or not at all
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # what a failed or interrupted save wrote
    for old in checkpoint_names(run_dir)[:-args.keep_last]:
        shutil.rmtree(os.path.join(run_dir, "checkpoints", old), ignore_errors=True)
    log(f"saved {final}")
    return final


def resume_target(args: Args, given=None, log=print):
    """--resume RUN_DIR: (its newest checkpoint, the run's saved settings (newer ones at today's defaults) with the
    given ones over them, except RESUME_MUST_MATCH's); a fresh run: (None, a copy of args). given: main's."""
    if not args.resume:
        return None, dataclasses.replace(args)
    names = checkpoint_names(args.resume)
    if not names:
        fail(f"--resume {args.resume}: no checkpoint in {os.path.join(args.resume, 'checkpoints')} (give a run's directory)")
    path = os.path.join(args.resume, "checkpoints", names[-1])
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        fail(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to resume from the one before")
    try:
        with open(os.path.join(path, "args.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"checkpoint {path}: args.json is unreadable ({e})")
    fields = [f.name for f in dataclasses.fields(Args)]
    given = [n for n in fields if getattr(args, n) != getattr(Args(), n)] if given is None else given
    # The run's own directory, unless --out-dir/--run-name are given: then it continues in a new one (a branch).
    out_dir, run_name = os.path.split(os.path.normpath(args.resume))
    run = Args(**{n: tuple(saved[n]) if isinstance(saved[n], list) else saved[n] for n in fields if n in saved} | {"resume": args.resume, "out_dir": out_dir, "run_name": run_name})
    merged = dataclasses.replace(run, **{n: getattr(args, n) for n in given})
    differences = [f"{flag(n)} {getattr(run, n)!r} (checkpoint) vs {getattr(merged, n)!r} (now)"
                   for n in RESUME_MUST_MATCH if getattr(merged, n) != getattr(run, n)]
    if differences:
        fail(f"--resume: the run was made with a different config: {'; '.join(differences)} (leave these out to continue it)")
    step = int(names[-1][len("step_"):])
    if merged.steps <= step and not merged.eval_only:
        fail(f"--resume: the run has done {step} of its --steps {merged.steps}: give --steps N above {step} to continue it")
    overridden = [f"{flag(n)} {getattr(merged, n)} (saved {getattr(run, n)})" for n in fields if getattr(merged, n) != getattr(run, n)]
    log(f"resuming {path} with the run's saved settings" + ("; overridden: " + ", ".join(overridden) if overridden else ""))
    return path, dataclasses.replace(merged, adapter=merged.adapter or (path if merged.eval_only else ""))


def load_checkpoint(path, model, optimizer, scheduler, rank=0, world_size=1) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    try:
        adapter = load_file(os.path.join(path, "adapter_model.safetensors"))
        # Our own file, holding numpy/python RNG states: not loadable with weights_only.
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        result = set_peft_model_state_dict(model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected adapter tensors {result.unexpected_keys[:3]}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:  # truncated safetensors, bad pickle, wrong shapes: all mean "corrupt"
        fail(f"checkpoint {path} is corrupt or does not fit this model ({type(e).__name__}: {str(e)[:200]})")
    if len(state["rng"]) != world_size:
        fail(f"checkpoint {path} was written by {len(state['rng'])} ranks: resume it with the same number of ranks "
             f"(now {world_size})")
    rng = state["rng"][rank]  # this rank's rng_state()
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# -----------------------------------------------------------------------------
# The training loop: setup, then grpo_step, log, evaluate, save, until the last step or a signal.


def catch_stop_signals(log=print):
    """SIGINT/SIGTERM: finish the step, save, exit; a second Ctrl-C stops at once. Returns (stop, previous handlers)."""
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log(f"signal {signum}: stopping after this step and saving a checkpoint")
    return stop, {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}


def main(args: Args, given=None):
    """Train (or evaluate, or plot). Returns {"model", "metrics"} so tests and notebooks can look inside. given: the
    fields that --resume takes over the run's saved settings; None (from Python): those that differ from Args()."""
    if args.plot:
        return plot_metrics(args.plot)
    log = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)
    resume_from, args = resume_target(args, given, log)  # a private copy: out-of-memory recovery lowers its micro-batch sizes
    check_args(args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank, world_size, device = init_distributed(args)
    is_main = rank == 0
    seed_everything(args.seed)  # the same on every rank, so the LoRA initialisation is identical
    pool = ThreadPoolExecutor(args.reward_workers)
    reward_funcs = reward_functions(args, pool)  # a --reward that cannot be found: one line now, before anything loads
    # Ranks start a second apart: rank 0's timestamp names the run for all of them.
    run_dir = os.path.join(args.out_dir, all_gather(args.run_name or time.strftime("grpo-%Y%m%d-%H%M%S"))[0])
    train_items, eval_items = load_data(args)
    check_model_fits(args, device)
    if not args.eval_only:  # the run directory is made (or refused) before the model loads
        announce_run(args, run_dir, world_size, len(train_items), is_main, log)

    model, tokenizer = load_model(args, device)
    # Every rank sees the same prompts (batch_indices uses args.seed) but samples its completions with its own seed.
    seed_everything(args.seed + rank)
    eos_ids = end_of_sequence_ids(model, tokenizer)
    merged = args.generation_model == "merged" or (args.generation_model == "auto" and device.type == "cuda")
    sampler = build_generation_model(model) if merged else model
    if args.eval_only:
        result = evaluate(sampler, tokenizer, eval_items, args, eos_ids, pool, rank, world_size)
        log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        return {"model": model, "metrics": [result]}

    # Only the LoRA adapters train: peft froze the 4-bit base, so AdamW's state is ~3× the adapter size.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    state = load_checkpoint(resume_from, model, optimizer, scheduler, rank, world_size) if resume_from else {}
    start_step, position = state.get("step", 0), state.get("data_position", 0)
    logged = trim_records(run_dir, start_step, log) if resume_from and is_main else 0  # each step's records once
    stop, previous_handlers = catch_stop_signals(log)
    history, bad_steps = [], 0
    report, close_report = open_report(args, run_dir, is_main, start_step, logged)  # TensorBoard / W&B, rank 0 only

    def run_evaluation(at_step):
        """Held-out eval: one printed line, a record in history and metrics.jsonl."""
        result = {"step": at_step, **evaluate(sampler, tokenizer, eval_items, args, eos_ids, pool, rank, world_size)}
        log(f"eval step {at_step} | acc strict {result['eval/accuracy_strict']:.3f} "
            f"| lenient {result['eval/accuracy_lenient']:.3f} | format {result['eval/format_rate']:.3f}")
        history.append(result)
        if is_main:
            append_jsonl(os.path.join(run_dir, "metrics.jsonl"), [result])
        report(result)

    try:
        if eval_items and start_step == 0:  # the base model's score: the "before" of the run
            run_evaluation(0)
        for step in range(start_step, args.steps):
            # Out of memory with one sequence per micro-batch saves what the run has done (one process only: the
            # other ranks of a torchrun job wait in a collective and cannot join a save).
            oom_save = (lambda: save_checkpoint(run_dir, step, model, optimizer, scheduler, args, [rng_state()], position,
                                                log)) if world_size == 1 and step > 0 else None
            result = grpo_step(step, train_items, model, sampler, tokenizer, optimizer, scheduler, args, eos_ids,
                               reward_funcs, bad_steps, rank, world_size, log, oom_save, position)
            bad_steps, position = result["bad_steps"], result["position"]
            metrics = step_metrics(result, args, world_size)
            log(format_step_line(metrics, args.steps))
            if is_main:
                write_step_records(run_dir, metrics, result, args, log)
            report(metrics)  # after metrics.jsonl: a dashboard never has a step that the file lacks (open_report)
            history.append(metrics)

            # A signal may reach the ranks at different moments: stop when any rank has one, all at this step.
            stop["requested"] = any(all_gather(stop["requested"]))
            last = step + 1 == args.steps or stop["requested"]
            if eval_items and args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or last):
                run_evaluation(step + 1)
            if last or (args.save_every > 0 and (step + 1) % args.save_every == 0):
                rng_states = all_gather(rng_state())  # a collective: every rank takes part, rank 0 writes
                if is_main:
                    save_checkpoint(run_dir, step + 1, model, optimizer, scheduler, args, rng_states, position, log)
            if stop["requested"]:
                break
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        pool.shutdown()
        close_report()
    return {"model": model, "metrics": history}


if __name__ == "__main__":
    flags = command_line()
    main(Args(**flags), given=flags)
