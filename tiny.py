"""
Tiny random Qwen2 models and a toy task, for CPU runs and the tests (no download needed).

    python tiny.py model runs/tiny-model                   # a random 2-layer Qwen2 + word-level tokenizer
    python tiny.py model runs/tiny-qwen --tokenizer DIR    # the same with a real tokenizer (e.g. Qwen2.5's)
    python tiny.py model runs/tiny-chat --tokenizer qwen-like  # with a small Qwen-like one built here (the tests')
    python tiny.py learn                                    # watch GRPO learn the toy task on a CPU
    python tiny.py cpu-demo                                 # docs/performance.md's CPU side by side (two samplers)
    python tiny.py curves                                   # README's variant table and docs/learning_curve.png

The models are saved like any Hugging Face model, so grpo.py loads them through exactly the path it
uses for Qwen2.5-14B (4-bit NF4 + LoRA).
"""

import json
import os
import random
import sys

import torch


def word_tokenizer():
    """A word-level tokenizer: an EOS, [UNK], the ten digits and the words of the toy task's prompt.
    Everything else (grpo.py's instructions) is [UNK]. A vocabulary of 16 keeps a random model's first
    guesses near chance (1/16) rather than hopelessly diffuse: RL needs some reward to start from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<|endoftext|>", "[UNK]"] + [str(d) for d in range(10)] + ["copy", "the", "number"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")


# Qwen2.5's chat template without its tool-calling branches (the full one is in Qwen2.5's tokenizer_config.json).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Qwen2's pre-tokenization: words, single digits (numbers are read digit by digit), punctuation runs, spaces.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def qwen_like_tokenizer(texts=None, vocab_size=1024):
    """A small stand-in for Qwen2.5's tokenizer, built in a second with no download: byte-level BPE (any text
    encodes, decode(encode(x)) == x) with Qwen2's pre-tokenizer, trained on `texts` (default: data/gsm8k_sample.jsonl
    and grpo.py's prompt texts); the same special tokens after the learned ones (<|endoftext|> = EOS and pad, as
    in the base Qwen2.5 models; <|im_start|>, <|im_end|>) and the same chat template, so a chat turn ends with
    <|im_end|> and grpo.build_prompt gives exactly the prompt string the real tokenizer gives."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        import grpo
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "data", "gsm8k_sample.jsonl"), encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        texts = [grpo.MATH_INSTRUCTION, grpo.CODE_INSTRUCTION, grpo.PLAIN_TEMPLATE, QWEN_CHAT_TEMPLATE]
        texts += [item[key] for item in items for key in ("question", "answer")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special[0], pad_token=special[0],
                                   additional_special_tokens=special[1:], chat_template=QWEN_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def build_tiny_model(out_dir, tokenizer_dir=None, hidden=64, layers=2, heads=4, kv_heads=2, seed=0, tokenizer=None):
    """Save a random-weight Qwen2ForCausalLM (untied lm_head, like the 14B) and its tokenizer to out_dir: the one
    given, else the one in tokenizer_dir, else the word-level tokenizer of the toy task."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else word_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab_size = (len(tokenizer) + 15) // 16 * 16  # padded rows, as real checkpoints have
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_copy_task(path, n, seed=0, digits=1):
    """The toy task: "copy the number 7" -> the answer is 7 (scored by verify.math_reward, lenient)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            number = " ".join(str(rng.randrange(10)) for _ in range(digits))
            f.write(json.dumps({"prompt": f"copy the number {number}", "answer": number.replace(" ", "")}) + "\n")
    return path


# -----------------------------------------------------------------------------
# `python tiny.py learn`: GRPO on the copy task through exactly grpo.main (4-bit base, LoRA, generate,
# verify.math_reward with lenient extraction, group advantages, fused log-probs, clipped loss, KL).

# The defaults of the learning run; any grpo.py flag given on the command line overrides them.
LEARN_FLAGS = ["--device", "cpu", "--no-chat-template", "--no-strict", "--format-weight", "0",
               "--eval-every", "0", "--save-every", "0", "--sample-every", "0", "--reward-workers", "2",
               "--prompts-per-step", "8", "--group-size", "16", "--max-new-tokens", "2", "--temperature", "0.7",
               "--micro-batch", "128", "--generation-chunk", "128", "--no-gradient-checkpointing",
               "--lora-rank", "32", "--lora-alpha", "64", "--lr", "3e-3", "--lr-schedule", "cosine",
               "--warmup-steps", "5", "--steps", "100"]
MODEL = dict(hidden=256, layers=2, heads=4, kv_heads=2)


def learn_args(work_dir, argv=(), model_seed=0, hidden=MODEL["hidden"], layers=MODEL["layers"], items=1000):
    """Build the tiny model and the task under work_dir; return grpo.Args for the learning run."""
    import grpo
    model_dir = os.path.join(work_dir, f"model-h{hidden}-l{layers}-s{model_seed}")
    if not os.path.isdir(model_dir):
        build_tiny_model(model_dir, hidden=hidden, layers=layers, heads=MODEL["heads"], kv_heads=MODEL["kv_heads"],
                         seed=model_seed)
    data = write_copy_task(os.path.join(work_dir, "copy.jsonl"), items, seed=0)
    return grpo.parse_args(["--model", model_dir, "--data", data, "--out-dir", work_dir, "--run-name", "learn"]
                           + LEARN_FLAGS + list(argv))


def rolling(values, window=5):
    return [sum(values[max(0, i + 1 - window): i + 1]) / len(values[max(0, i + 1 - window): i + 1])
            for i in range(len(values))]


def summarize(metrics, threshold=0.9, window=5):
    """First/last-window mean reward, and the first step (and seconds) where the rolling mean reaches threshold."""
    steps = [m for m in metrics if "reward/mean" in m]
    rewards = [m["reward/mean"] for m in steps]
    seconds = [sum(m["time/step_s"] for m in steps[: i + 1]) for i in range(len(steps))]
    reached = next((i for i, r in enumerate(rolling(rewards, window)) if r >= threshold), None)
    return {"first": sum(rewards[:window]) / max(1, len(rewards[:window])),
            "last": sum(rewards[-window:]) / max(1, len(rewards[-window:])),
            "steps_to_threshold": None if reached is None else steps[reached]["step"],
            "seconds_to_threshold": None if reached is None else seconds[reached], "seconds": seconds[-1] if seconds else 0}


def learn(argv):
    """python tiny.py learn [--run-dir DIR] [--hidden H] [--layers L] [any grpo.py flag, e.g. --seed 1 --agg token --beta 0.04]"""
    import argparse
    import tempfile

    import grpo
    parser = argparse.ArgumentParser(usage=learn.__doc__)
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--hidden", type=int, default=MODEL["hidden"])
    parser.add_argument("--layers", type=int, default=MODEL["layers"])
    parser.add_argument("--seed", type=int, default=0)
    ours, rest = parser.parse_known_args(argv)
    work_dir = ours.run_dir or tempfile.mkdtemp(prefix="tiny-learn-")
    args = learn_args(work_dir, ["--seed", str(ours.seed)] + rest, model_seed=ours.seed, hidden=ours.hidden,
                      layers=ours.layers)
    result = grpo.main(args)
    s = summarize(result["metrics"])
    print(f"copy task: mean reward over the first 5 steps {s['first']:.3f}, last 5 steps {s['last']:.3f}; "
          f"rolling-5 mean >= 0.9 at step {s['steps_to_threshold']} ({s['seconds_to_threshold'] or float('nan'):.0f} s)")
    grpo.main(grpo.Args(plot=os.path.join(args.out_dir, args.run_name)))
    return result


def cpu_demo(argv):
    """python tiny.py cpu-demo [--tokenizer DIR] [--data GSM8K_JSONL] [--steps 2] [--rounds 2]: docs/performance.md's CPU
    side by side. The tiny Qwen2 (hidden 64, 2 layers) with the real Qwen2.5 tokenizer, 8 GSM8K prompts × G = 8,
    64 new tokens, micro-batch 16, β 0.04, LoRA r 16, 4-bit, through grpo.main with --cpu-sampler multinomial
    and inverse_cdf in turn (the same process, rounds interleaved). Prints each run's seconds per step and phase.
    Tokenizer and data: ../shared's copies when present, else Qwen/Qwen2.5-14B's tokenizer files from the Hub
    and GSM8K's train split (downloaded by grpo.py to data/gsm8k.jsonl)."""
    import argparse
    import resource
    import tempfile

    import grpo
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.path.join(here, "..", "shared")
    tokenizer = os.path.join(shared, "qwen2.5-tokenizer")
    data = os.path.join(shared, "data", "gsm8k", "train.jsonl")
    parser = argparse.ArgumentParser(usage=cpu_demo.__doc__)
    parser.add_argument("--tokenizer", default=tokenizer if os.path.isdir(tokenizer) else "Qwen/Qwen2.5-14B")
    parser.add_argument("--data", default=data if os.path.exists(data) else os.path.join(here, "data", "gsm8k.jsonl"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args(argv)
    work_dir = tempfile.mkdtemp(prefix="tiny-cpu-demo-")
    model_dir = build_tiny_model(os.path.join(work_dir, "model"), tokenizer_dir=a.tokenizer)
    for round_number in range(a.rounds):
        for sampler in ("multinomial", "inverse_cdf"):
            args = grpo.parse_args(["--model", model_dir, "--data", a.data, "--device", "cpu", "--prompts-per-step", "8",
                                    "--group-size", "8", "--max-new-tokens", "64", "--micro-batch", "16", "--beta", "0.04",
                                    "--lora-rank", "16", "--eval-every", "0", "--save-every", "0", "--sample-every", "0",
                                    "--steps", str(a.steps), "--cpu-sampler", sampler, "--out-dir", work_dir,
                                    "--run-name", f"{sampler}-{round_number}"])
            before = resource.getrusage(resource.RUSAGE_SELF)
            metrics = grpo.main(args)["metrics"]
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print("cpu-demo " + json.dumps({"sampler": sampler, "round": round_number, "cpu_s_run": round(cpu, 1),
                                            "step_s": [round(m["time/step_s"], 1) for m in metrics],
                                            "generate_s": [round(m["time/generate_s"], 1) for m in metrics],
                                            "reference_s": [round(m["time/reference_s"], 1) for m in metrics],
                                            "train_s": [round(m["time/train_s"], 1) for m in metrics]}), flush=True)


# `python tiny.py curves`: the README's variant table (3 seeds each) and docs/learning_curve.png.
VARIANTS = {"default": [], "agg token": ["--agg", "token"], "agg dr_grpo": ["--agg", "dr_grpo"], "beta 0": ["--beta", "0"],
            "ratio-level sequence": ["--ratio-level", "sequence"], "top-entropy-quantile 0.2": ["--top-entropy-quantile", "0.2"],
            "drop-zero-std-groups": ["--drop-zero-std-groups"], "dynamic-sampling": ["--dynamic-sampling"],
            "control: lr 0": ["--lr", "0"], "control: advantages negated": []}


def curves(argv):
    """python tiny.py curves [--seeds 0 1 2] [--variants NAME ...] [--out docs/learning_curve.png] [--work-dir DIR]"""
    import argparse
    import resource
    import statistics
    import tempfile

    import grpo
    parser = argparse.ArgumentParser(usage=curves.__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="docs/learning_curve.png")
    parser.add_argument("--work-dir", default="")
    a = parser.parse_args(argv)
    work_dir, runs, cpu = a.work_dir or tempfile.mkdtemp(prefix="tiny-curves-"), {}, {}
    group_advantages = grpo.group_advantages
    # Seed by seed, the variants one after another: on a machine whose load drifts, the runs compared sit close in time.
    for seed in a.seeds:
        for name in a.variants:
            if name == "control: advantages negated":  # a sign bug, on purpose (as the test injects it)
                grpo.group_advantages = lambda *x, **k: -group_advantages(*x, **k)
            args = learn_args(work_dir, ["--seed", str(seed), "--run-name", f"{name}-{seed}".replace(" ", "_").replace(":", "")]
                              + VARIANTS[name], model_seed=seed)
            before = resource.getrusage(resource.RUSAGE_SELF)
            try:
                runs[name, seed] = [m for m in grpo.main(args)["metrics"] if "reward/mean" in m]
            finally:
                grpo.group_advantages = group_advantages
            after = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds of the run: far less load-bound than wall time
            cpu[name, seed] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    def spread(values, digits):
        return " / ".join("never" if v is None else f"{v:.{digits}f}" for v in
                          (min(values), statistics.median(values), max(values))) if None not in values else "never"
    print("| variant | steps to 0.9 (min / median / max) | seconds to 0.9 | last-10 reward | first 2 steps | last-10 entropy "
          "| generation rounds | groups sampled | CPU s per run |")
    for name in a.variants:
        ms = [runs[name, seed] for seed in a.seeds]
        s = [summarize(m) for m in ms]
        mean = lambda m, key, part: sum(r[key] for r in part(m)) / len(part(m))  # noqa: E731
        print(f"| {name} | {spread([x['steps_to_threshold'] for x in s], 0)} | {spread([x['seconds_to_threshold'] for x in s], 1)} "
              f"| {spread([mean(m, 'reward/mean', lambda m: m[-10:]) for m in ms], 3)} "
              f"| {spread([mean(m, 'reward/mean', lambda m: m[:2]) for m in ms], 3)} "
              f"| {spread([mean(m, 'policy/entropy', lambda m: m[-10:]) for m in ms], 2)} "
              f"| {spread([sum(r.get('groups/rounds', 1) for r in m) for m in ms], 0)} "
              f"| {spread([sum(r.get('groups/sampled', 0) for r in m) for m in ms], 0)} "
              f"| {spread([cpu[name, seed] for seed in a.seeds], 0)} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (reward_axis, entropy_axis) = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, color) in zip(a.variants, colors):
        for i, seed in enumerate(a.seeds):
            steps = [m["step"] for m in runs[name, seed]]
            label = f"{name} ({len(a.seeds)} seeds)" if i == 0 else None
            reward_axis.plot(steps, [m["reward/mean"] for m in runs[name, seed]], color=color, alpha=0.7, lw=1, label=label)
            entropy_axis.plot(steps, [m["policy/entropy"] for m in runs[name, seed]], color=color, alpha=0.7, lw=1)
    reward_axis.axhline(0.9, color="black", lw=0.8, ls=":")
    reward_axis.set(title="mean reward", xlabel="step")
    entropy_axis.set(title="policy entropy (nats, mean over trained tokens)", xlabel="step")
    reward_axis.legend(fontsize=7)
    figure.suptitle("tiny.py curves: random 2-layer Qwen2, 4-bit + LoRA, CPU")
    figure.tight_layout()
    figure.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "learn"
    if command == "model":
        tokenizer_dir = sys.argv[sys.argv.index("--tokenizer") + 1] if "--tokenizer" in sys.argv else None
        if tokenizer_dir == "qwen-like":
            print(build_tiny_model(sys.argv[2], tokenizer=qwen_like_tokenizer()))
        else:
            print(build_tiny_model(sys.argv[2], tokenizer_dir))
    elif command == "learn":
        learn(sys.argv[2:])
    elif command == "cpu-demo":
        cpu_demo(sys.argv[2:])
    elif command == "curves":
        curves(sys.argv[2:])
    else:
        raise SystemExit(f"usage: python tiny.py model DIR [--tokenizer DIR|qwen-like] | learn [flags] | cpu-demo [flags] | curves [flags]"
                         f"  (got {command!r})")
