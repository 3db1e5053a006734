"""`genarm-local generate`: one prompt → guided completions on stdout (streamed text, or JSON lines for scripts)."""

from __future__ import annotations

import argparse
import json
import sys

from ..core.errors import InvalidOptionError
from .flags import (
    add_model_arguments,
    add_sampling_arguments,
    arm_lines,
    load_model,
    sampling_options,
    timings_dict,
    timings_line,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prompt", help="the prompt; '-' or none with piped stdin: read it from stdin")
    parser.add_argument("--chat", action="store_true", help="render the prompt as a user message of the chat template")
    parser.add_argument("-sys", "--system-prompt", help="with --chat: a system message before the prompt")
    parser.add_argument("--num-samples", type=int, default=1, help="completions to draw; sample i uses seed + i")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per sample: text, tokens, finish_reason, timings"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr after each sample")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def read_prompt(prompt: str | None) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt is None:
        raise InvalidOptionError("give a prompt with -p/--prompt (or pipe it on stdin)")
    return prompt


def main(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise InvalidOptionError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.system_prompt and not args.chat:
        raise InvalidOptionError("-sys/--system-prompt needs --chat")
    sampling = sampling_options(args)
    text = read_prompt(args.prompt)
    with load_model(args) as model:
        if args.chat:
            system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
            chat = model.chat_prompt([*system, {"role": "user", "content": text}])
            prompt, sampling = chat.tokens, chat.sampling(sampling)
        else:
            prompt = text
        seed = sampling.pop("seed")
        if args.verbose and model.arms:
            print("ARMs:\n" + "\n".join(arm_lines(model, model.arm_weights())), file=sys.stderr)
        for index in range(args.num_samples):
            sample_seed = None if seed is None else seed + index
            if args.json:
                result = model.generate(prompt, seed=sample_seed, **sampling)
                print(json.dumps(json_row(result, index, sample_seed, model.arm_weights()), ensure_ascii=False))
            else:
                if index:
                    print("\n" + "-" * 40)
                stream = model.stream(prompt, seed=sample_seed, **sampling)
                for response in stream:
                    print(response.text, end="", flush=True)
                print()
                result = stream.result
            sys.stdout.flush()
            if args.verbose:
                print(timings_line(result), file=sys.stderr)


def json_row(result, index: int, seed: int | None, weights: dict[str, float]) -> dict:
    row = {
        "index": index,
        "text": result.text,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "seed": seed,
        "weights": weights,
        "timings": timings_dict(result),
    }
    if result.logprobs is not None:
        row["logprobs"] = result.logprobs
    return row
