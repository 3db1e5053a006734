"""`genarm-local batch IN.jsonl -o OUT.jsonl`: guided completions for a file of prompts, crash-safe and resumable.

The row format, seeding, grouping and resume rules are genarm_local/batch/runner.py's; this is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..batch.runner import NOT_PER_ROW, plan, progress_bar, run
from ..core.errors import InvalidOptionError
from .flags import add_model_arguments, add_sampling_arguments, load_model, sampling_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.jsonl", help="one JSON object per line: id, prompt or messages, ...")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="results, appended row by row")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences decoded together per llama.cpp batch")
    parser.add_argument("--retry-failed", action="store_true", help="redo the rows that OUT holds as errors")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(parser)
    # A fixed default seed: row i samples with seed + line number, so reruns reproduce their text.
    add_sampling_arguments(parser, defaults={"seed": 0}, exclude=tuple(NOT_PER_ROW))


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    defaults = sampling_options(args)
    work = plan(Path(args.input), Path(args.output), set(defaults), args.retry_failed)
    with load_model(args) as model, progress_bar(len(work.todo), work.output, args.progress) as progress:
        # OUT is opened only once the model loaded: a bad model leaves no empty OUT behind
        sink = run(model, work, defaults, args.batch_size, progress)
    summary = f"{work.output}: done {sink.done}, skipped {work.skipped} (already in OUT), failed {sink.failed}"
    if work.earlier_failures:
        summary += f"; {work.earlier_failures} earlier failures kept in OUT (--retry-failed redoes them)"
    print(summary, file=sys.stderr)
    return 1 if sink.failed or work.earlier_failures else 0
