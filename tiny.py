"""
Tiny random Qwen2 models and a toy task, for CPU runs and the tests (no download needed).

    python tiny.py model runs/tiny-model                   # a random 2-layer Qwen2 + word-level tokenizer
    python tiny.py model runs/tiny-qwen --tokenizer DIR    # the same with a real tokenizer (e.g. Qwen2.5's)
    python tiny.py learn                                    # watch GRPO learn the toy task on a CPU

The models are saved like any Hugging Face model, so grpo.py loads them through exactly the path it
uses for Qwen2.5-14B (4-bit NF4 + LoRA).
"""

import json
import os
import random
import sys

import torch


def word_tokenizer():
    """A word-level tokenizer: the digits, the words of grpo.py's plain prompt template, and an EOS.
    Anything else is [UNK]. Small vocabulary = a random model's output is not hopelessly diffuse."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import grpo
    words = set()
    for text in (grpo.PLAIN_TEMPLATE, grpo.MATH_INSTRUCTION, "copy the number"):
        words.update(pre_tokenizers.Whitespace().pre_tokenize_str(text.replace("\\", " \\ ")))
    vocab = ["<|endoftext|>", "[UNK]"] + [str(d) for d in range(10)]
    vocab += sorted({w for w, _ in words} - set(vocab))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")


def build_tiny_model(out_dir, tokenizer_dir=None, hidden=64, layers=2, heads=4, kv_heads=2, seed=0):
    """Save a random-weight Qwen2ForCausalLM (untied lm_head, like the 14B) and its tokenizer to out_dir."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else word_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # padded rows, as real checkpoints have
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


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "learn"
    if command == "model":
        tokenizer_dir = sys.argv[sys.argv.index("--tokenizer") + 1] if "--tokenizer" in sys.argv else None
        print(build_tiny_model(sys.argv[2], tokenizer_dir))
    else:
        raise SystemExit(f"usage: python tiny.py model DIR [--tokenizer DIR] | learn  (got {command!r})")
