"""
Countdown, a task of your own for grpo.py: reach a target number from a few given numbers with + - * / and
parentheses, each number used exactly once (the task of TinyZero and of Gandhi et al. 2025). The items are
data/countdown.jsonl, one per line: {"prompt", "numbers", "target", "solution"}; the reward is `countdown_reward`
below, written in TRL's form, so the same function works with TRL's GRPOTrainer(reward_funcs=...) unchanged:

    python grpo.py --data data/countdown.jsonl --eval-every 0 \\
        --reward data/countdown.py:countdown_reward --reward format=0.1

(`format` is grpo.py's built-in format reward: one final \\boxed{}.) To make more items:

    python data/countdown.py 64 --seed 1 > data/my_countdown.jsonl
"""

import ast
import json
import operator
import os
import random
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # verify.py, when run as a script
from verify import last_boxed  # noqa: E402  (the content of the last \boxed{...}, braces balanced)

OPERATIONS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_EXPRESSION = 200  # characters; longer is not an answer (and keeps parsing cheap on hostile text)


def expression_value(expression, numbers):
    """The exact value (a Fraction) of an arithmetic expression over integers with + - * / and parentheses, if it
    uses exactly the given numbers, each once; None otherwise (other syntax, other numbers, division by zero)."""
    expression = expression.split("=")[0].replace("\\times", "*").replace("\\div", "/").replace("×", "*").replace("÷", "/")
    if len(expression) > MAX_EXPRESSION:
        return None
    used = []

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATIONS:
            return OPERATIONS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not + - * / over integers")

    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None
    return result if sorted(used) == sorted(numbers) else None


def countdown_reward(prompts, completions, numbers=None, target=None, **kwargs) -> list:
    """TRL's reward-function form: batched, the item's other fields as keyword lists (here `numbers`, `target`),
    **kwargs for the rest (completion_ids, trainer_state, other columns). 1.0 when the completion's last \\boxed{}
    holds an expression that uses each of the item's numbers once and equals its target, else 0.0; None (not
    applicable) for an item without numbers/target, e.g. a math item in a mixed file."""
    numbers, target = numbers or [None] * len(completions), target or [None] * len(completions)
    return [None if given is None or goal is None else float(expression_value(last_boxed(text) or "", given) == goal)
            for text, given, goal in zip(completions, numbers, target)]


def make_items(count, seed=0, size=3):
    """count items: `size` numbers in 1..10 and the value of a random expression over them (a positive integer), so
    every item has a solution; the solution is stored (the tests check it scores 1.0), never shown to the model."""
    rng, items = random.Random(seed), []
    while len(items) < count:
        numbers = [rng.randint(1, 10) for _ in range(size)]
        expression = str(numbers[0])
        for number in numbers[1:]:
            expression = f"({expression} {rng.choice('+-*/')} {number})" if rng.random() < 0.5 else \
                f"({number} {rng.choice('+-*/')} {expression})"
        value = expression_value(expression, numbers)
        if value is None or value.denominator != 1 or value <= 0:
            continue
        shown = sorted(numbers)
        items.append({"prompt": f"Using the numbers {shown}, each exactly once, and + - * / with parentheses, write an "
                                f"expression that equals {value}. Think step by step, then give the expression as "
                                f"\\boxed{{expression}}.", "numbers": shown, "target": int(value),
                      "solution": expression[1:-1]})
    return items


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    for item in make_items(count, seed):
        print(json.dumps(item))
