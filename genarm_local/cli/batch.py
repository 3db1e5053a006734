"""`genarm-local batch IN.jsonl -o OUT.jsonl [--ray [ADDRESS]]`: guided completions for a file of prompts, crash-safe
and resumable, in this process or on a pool of Ray actors.

The row format, seeding, grouping and resume rules are genarm_local/batch/runner.py's (and sources.py's for
directories and Parquet); the Ray backend is batch/ray_backend.py; this is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..batch.ray_backend import RayConfig, run_on_ray
from ..batch.rows import NOT_PER_ROW
from ..batch.runner import plan, progress_bar, run
from ..batch.sources import finish
from ..core.errors import InvalidOptionError
from .flags import (
    add_config_arguments,
    add_model_arguments,
    add_sampling_arguments,
    config_options,
    load_config,
    load_model,
    sampling_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="IN.jsonl", help="one JSON object per line: id, prompt or messages, ...; or a Parquet file, "
        "or a directory of .jsonl/.parquet shards (read as one file, in name order)",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT.jsonl",
        help="results, appended row by row (OUT.parquet: written at the end, from OUT.parquet.partial.jsonl)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=8,
        help="rows generated together: the input is cut into groups of this many rows, by position, whose rows "
        "share their decode steps (and the model's slots, -np, are set to it)",
    )  # fmt: skip
    parser.add_argument("--retry-failed", action="store_true", help="redo the rows that OUT holds as errors")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(parser)
    # A fixed default seed: row i samples with seed + line number, so reruns reproduce their text.
    add_sampling_arguments(parser, defaults={"seed": 0}, exclude=tuple(NOT_PER_ROW))
    add_config_arguments(parser.add_argument_group("Ray (docs/scale-out.md)"), RayConfig)


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    ray_config = RayConfig(**config_options(RayConfig, args))
    defaults = sampling_options(args)
    work = plan(Path(args.input), Path(args.output), set(defaults), args.batch_size, args.retry_failed)
    target = work.target or work.output
    # a group's rows all run at once: one slot each
    load = dataclasses.replace(load_config(args), n_parallel=args.batch_size)
    if ray_config.address is not None:
        with progress_bar(work.todo, target, args.progress) as progress:
            ray_run = run_on_ray(work, load, defaults, ray_config, progress)
        done, failed = ray_run.done, ray_run.failed
        per_replica = ", ".join(str(n) for n in sorted(ray_run.rows_per_replica.values(), reverse=True)) or "none"
        threads = f"{ray_run.threads} thread{'s' * (ray_run.threads > 1)}"
        where = f"; on Ray, {ray_run.replicas} replicas × {threads} (rows per replica: {per_replica})"
    else:
        with load_model(load) as model, progress_bar(work.todo, target, args.progress) as progress:
            # OUT is opened only once the model loaded: a bad model leaves no empty OUT behind
            sink = run(model, work, defaults, progress)
        done, failed, where = sink.done, sink.failed, ""
    finish(work.output, work.order, work.target)
    summary = f"{target}: done {done}, skipped {work.skipped} (already in OUT), failed {failed}"
    if work.earlier_failures:
        summary += f"; {work.earlier_failures} earlier failures kept in OUT (--retry-failed redoes them)"
    print(summary + where, file=sys.stderr)
    return 1 if failed or work.earlier_failures else 0
