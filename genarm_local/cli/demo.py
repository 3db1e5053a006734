"""`genarm-local demo`: GenARM at work on a real model in one command.

For a few prompts it prints the base's continuation and the guided ones (each shipped ARM alone, then all of them
together) with the judges' scores and tokens/s. With no arguments: the embedded base (Gemma-3-270M Q4_K_M) and
the shipped ARMs, "positive" (VADER sentiment) and "concise" (tokens to finish the sentence).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from ..core.config import shipped_arms
from ..core.errors import InvalidOptionError
from .flags import add_model_arguments, add_sampling_arguments, load_model, sampling_options

# Held-out subjects (bench/data/subjects.txt): none of these made a training pair.
PROMPTS = (
    "The hotel we stayed at was",
    "Honestly, the doctor's appointment made me feel",
    "When I think about the bus to work, I",
)
DEFAULTS = dict(max_tokens=32, temperature=1.0, top_k=0, top_p=1.0, min_p=0.05, seed=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p", "--prompt", dest="prompts", action="append", metavar="TEXT",
        help="a prompt to continue (repeatable); default: three built-in held-out prompts",
    )  # fmt: skip
    add_model_arguments(parser)
    add_sampling_arguments(parser, DEFAULTS, exclude=("logprobs", "normalized", "grammar"))


def configurations(weights: dict[str, float]) -> list[tuple[str, dict[str, float]]]:
    """(label, {ARM name: α}): the base alone, each ARM alone at its α, then all of them together."""
    off = {name: 0.0 for name in weights}
    rows = [("base", off)]
    rows += [(f"{name}:{alpha:.2g}", {**off, name: alpha}) for name, alpha in weights.items()]
    if len(weights) > 1:
        rows.append((" + ".join(f"{name}:{alpha:.2g}" for name, alpha in weights.items()), dict(weights)))
    return rows


def main(args: argparse.Namespace) -> None:
    from ..evaluation.fluency import is_degenerate, rep_n
    from ..evaluation.judges import distinct_n, positivity, sentence_tokens

    options = sampling_options(args)
    if not args.arms and not args.no_arm and args.base is None:
        args.arms = [("arm", name) for name in shipped_arms()]  # each at its recommended α (its calibration)
    if not args.arms or args.no_arm:
        raise InvalidOptionError("the demo compares the base with guided output: give at least one --arm")
    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    with load_model(args) as model:
        rows = configurations(model.arm_weights())
        label_width = max(len(label) for label, _ in rows)
        for prompt in args.prompts or PROMPTS:
            print(f"\n\033[1m{prompt}\033[0m …" if sys.stdout.isatty() else f"\n{prompt} …")
            for label, named in rows:
                result = model.generate(prompt, weights=named, **options)
                pieces = [model.detokenize([t]) for t in result.tokens]
                text = " ".join(result.text.split())
                scores = (
                    f"positivity {positivity(result.text):+.2f} · sentence {sentence_tokens(pieces):2d} tok · "
                    f"distinct-2 {distinct_n([result.text]):.2f} · rep-4 {rep_n(result.text):.2f} · "
                    f"{result.timings.generated_tokens_per_s:5.1f} tok/s"
                    + (" · degenerate" if is_degenerate(result.text) else "")
                )
                indent = " " * (label_width + 4)
                print(f"  {label:<{label_width}}  {scores}")
                print(textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent))
