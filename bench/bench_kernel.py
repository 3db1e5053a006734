"""Speed of the guidance kernel against numpy, both measured in the same run.

    python bench/bench_kernel.py

Prints a markdown table of median microseconds per call on one row of Gemma-3's 262,144 tokens: a numpy float32
implementation of the same formula and genarm_local.core.mixing's kernel, with the speed-up. guide() runs with base +
1 ARM and base + 3 ARMs, without the base-plausibility guard and with it (τ = 0.02, numpy then masking the same
tokens), so the guard's own cost shows; log_softmax() normalises one row. The timings interleave, so a machine that
slows down part-way slows both columns alike. The kernel writes into a separate dst here; in place on the base row
costs the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# OpenBLAS worker threads spin for a while after numpy starts them and would compete with the kernel's thread;
# nothing timed here uses BLAS. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from genarm_local.core.mixing import guide, log_softmax  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from stamp import cpu_name, measurement_stamp, write_stamped  # noqa: E402

N_VOCAB = 262_144  # Gemma-3
GUARD_MIN_P = 0.02


def numpy_logsumexp(x: np.ndarray) -> np.float32:
    top = x.max()
    return top + np.log(np.exp(x - top).sum())


def numpy_guide(base: np.ndarray, arms: list[np.ndarray], alphas: list[float], min_p: float = 0.0) -> np.ndarray:
    """What guide() computes, in float32 as the logits come: base + sum_i alpha_i (arm_i - logsumexp(arm_i)), and
    with min_p > 0 the guard's mask."""
    total = base
    for alpha, arm in zip(alphas, arms, strict=True):
        total = total + np.float32(alpha) * (arm - numpy_logsumexp(arm))
    if min_p > 0:
        total = np.where(base < base.max() + np.float32(np.log(min_p)), np.float32(-np.inf), total)
    return total


def bench_case(n_arms: int, rounds: int, kernel_calls: int, min_p: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Median µs per call for numpy and for the kernel, one round of each after the other; n_arms 0: log_softmax."""
    rng = np.random.default_rng(seed)
    # Spread like Gemma-3's logits (mean about -4, standard deviation about 5).
    base = (rng.standard_normal(N_VOCAB) * 5 - 4).astype(np.float32)
    arms = [(rng.standard_normal(N_VOCAB) * 5 - 4).astype(np.float32) for _ in range(n_arms)]
    alphas = [1.0] + [0.5] * (n_arms - 1)
    dst = np.empty_like(base)
    if n_arms:
        runs = {
            "numpy": lambda: numpy_guide(base, arms, alphas, min_p),
            "kernel": lambda: guide(dst, base, arms, alphas, guard_min_p=min_p),
        }
    else:
        runs = {"numpy": lambda: base - numpy_logsumexp(base), "kernel": lambda: log_softmax(dst, base)}
    calls = {"numpy": 1, "kernel": kernel_calls}
    for run in runs.values():  # warm caches and page in the buffers
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(calls[name]):
                start = time.perf_counter_ns()
                run()
                times[name].append((time.perf_counter_ns() - start) / 1000)
    return {name: float(np.median(values)) for name, values in times.items()}


def markdown(report: dict) -> list[str]:
    """The kernel table (this script's output and the README report)."""
    lines = [
        f"vocab {report['vocab']:,}; {report['cpu']}, {report['cpus']} CPUs; numpy {report['numpy']}; "
        "median µs per call, one row",
        "",
        "| case | numpy float32 | kernel | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for case in report["cases"]:
        lines.append(
            f"| {case['case']} | {case['numpy_us']:,.0f} | {case['kernel_us']:,.0f} | {case['speedup']:.1f}× |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="numpy calls per case (kernel: 20 per round)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON, stamped)")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    stamp = measurement_stamp(args.allow_dirty) if args.out else None

    cases = [
        ("guide: base + 1 ARM", 1, 0.0),
        (f"guide: base + 1 ARM, guard τ = {GUARD_MIN_P}", 1, GUARD_MIN_P),
        ("guide: base + 3 ARMs", 3, 0.0),
        (f"guide: base + 3 ARMs, guard τ = {GUARD_MIN_P}", 3, GUARD_MIN_P),
        ("log_softmax", 0, 0.0),
    ]
    report = {"vocab": N_VOCAB, "cpu": cpu_name(), "cpus": os.cpu_count(), "numpy": np.__version__, "cases": []}
    for label, n_arms, min_p in cases:
        result = bench_case(n_arms, args.rounds, kernel_calls=20, min_p=min_p)
        numpy_us, kernel_us = result["numpy"], result["kernel"]
        report["cases"].append(
            {"case": label, "numpy_us": numpy_us, "kernel_us": kernel_us, "speedup": numpy_us / kernel_us}
        )
    print("\n".join(markdown(report)))
    print("\nReproduce: python bench/bench_kernel.py")
    if args.out:
        write_stamped(args.out, report, stamp)


if __name__ == "__main__":
    main()
