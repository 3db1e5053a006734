"""llama.cpp's CPU weight repacking on and off, side by side: speed and whether a row decoded among others is the row
decoded alone (README, "Same input, same text"; genarm_local.core.native.CPU_REPACK).

    python bench/repack.py [--rounds 3] [--threads N] [--json docs/repack.json]

One process loads the embedded base with the shipped ARMs twice, repacking on and off (native.CPU_REPACK is read when
a model loads), and runs, in turn on each, every round: one stream of 48 tokens unguided and guided (positive at its
recommended α), a batch of 8 prompts × 24 tokens unguided and guided (-np 8), and a 512-token prompt's prefill; the
median of the rounds. Then, on each, four prompts alone and together at -np 4 (serve's default), unguided and guided:
how many get their text alone.

Run it with nothing else busy and without OMP_WAIT_POLICY in the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stamp import describe, measurement_stamp  # noqa: E402

PROMPTS = [
    "The new restaurant downtown was",
    "My neighbour's dog",
    "The train was late again, and",
    "Once upon a time, in a small village by the sea,",
    "The meeting this morning went",
    "After the long winter, the garden",
    "We spent the afternoon at the museum, and",
    "The book I finished last night",
]
LONG = " ".join(["The history of the old harbour town is long and full of stories about its people."] * 30)


def load(repack: bool, n_parallel: int, threads: int | None):
    from genarm_local import GuidedModel
    from genarm_local.core import native

    native.CPU_REPACK = repack
    try:
        return GuidedModel(n_parallel=n_parallel, n_threads=threads)
    finally:
        native.CPU_REPACK = False


def timed(call) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = call()
    return time.perf_counter() - start, tokens


def speeds(model, guided: dict) -> dict[str, float]:
    """tok/s of each measurement, once."""
    off = {name: 0.0 for name in guided}
    out = {}
    for label, weights in (("unguided", off), ("guided", guided)):
        dt, n = timed(lambda w=weights: len(model.generate(PROMPTS[0], weights=w, max_tokens=48, seed=1,
                                                           ignore_eos=True).tokens))  # fmt: skip
        out[f"one stream, {label}"] = n / dt
        dt, n = timed(lambda w=weights: sum(len(r.tokens) for r in model.generate_batch(PROMPTS, weights=w,
                      max_tokens=24, seed=1, ignore_eos=True)))  # fmt: skip
        out[f"batch of 8, {label}"] = n / dt
    prompt = model.tokenize(LONG)[:512]
    dt, _ = timed(lambda: len(model.generate(prompt, weights=off, max_tokens=1, seed=1).tokens))
    out["prefill of 512 tokens"] = len(prompt) / dt
    return out


def same_alone(model, weights: dict) -> int:
    """Of four prompts, how many get the same text together (one step each) as alone."""
    alone = [model.generate(p, weights=weights, max_tokens=32, seed=30 + i).text for i, p in enumerate(PROMPTS[:4])]
    together = model.generate_batch(PROMPTS[:4], weights=weights, max_tokens=32, seeds=[30, 31, 32, 33])
    return sum(r.text == a for r, a in zip(together, alone, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="-t (default: the engine's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    stamp = measurement_stamp()
    start = time.perf_counter()
    models = {repack: load(repack, 8, args.threads) for repack in (True, False)}
    try:
        guided = dict(models[False].arm_weights())  # the shipped defaults: positive at its α, concise at 0
        for model in models.values():
            model.generate(PROMPTS[0], max_tokens=4, seed=0)  # warm
        rounds = {repack: [] for repack in models}
        for _ in range(args.rounds):
            for repack, model in models.items():
                rounds[repack].append(speeds(model, guided))
    finally:
        for model in models.values():
            model.close()
    off = {name: 0.0 for name in guided}
    identity = {}
    for repack in (True, False):
        with load(repack, 4, args.threads) as model:
            identity[repack] = {"unguided": same_alone(model, off), "guided": same_alone(model, guided)}
    table = {}
    for name in rounds[True][0]:
        on = statistics.median(r[name] for r in rounds[True])
        no = statistics.median(r[name] for r in rounds[False])
        table[name] = {"repack on": on, "repack off": no, "off / on": no / on}
    minutes = (time.perf_counter() - start) / 60
    print(f"_Measured {describe(stamp)}, in {minutes:.1f} min, by `python bench/repack.py`._\n")
    print("| tok/s (median of rounds) | repacking on (llama.cpp's default) | off (the engine's) | off ÷ on |")
    print("|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['repack on']:.1f} | {row['repack off']:.1f} | {row['off / on']:.2f} |")
    for repack in (True, False):
        counts = identity[repack]
        print(f"\nrepacking {'on' if repack else 'off'}: at -np 4, of 4 requests together, {counts['unguided']} "
              f"unguided and {counts['guided']} guided get their text alone")  # fmt: skip
    if args.json:
        record = {"stamp": stamp, "minutes": minutes, "guided": guided, "speed": table,
                  "same_text_among_4": {("on" if k else "off"): v for k, v in identity.items()}}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
