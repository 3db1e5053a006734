"""Speed of the fused guidance kernel against numpy, both measured in the same run.

    python bench/bench_kernel.py

Prints a markdown table of median microseconds per call: the numpy float32 reference (log_softmax of each row,
weighted sum, renormalise) and genarm_local.core.mixing.mix_logprobs on 1 and 2 threads (one row is split by blocks, a
batch by rows, between the caller and the kernel's worker pool), with the speed-ups. Each case runs without the
base-plausibility guard (guard_min_p = 0, the kernel's default path) and with it (τ = 0.02, numpy then masking the
same tokens), so the guard's own cost shows next to the unguarded speed. The timings interleave, so a machine that
slows down part-way slows all columns alike. The kernel writes into a separate dst here; in place on the base row
costs the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# OpenBLAS worker threads spin for a while after numpy starts them and would compete with the kernel's second
# thread; nothing timed here uses BLAS. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from genarm_local.core.mixing import mix_logprobs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from stamp import cpu_name, measurement_stamp, write_stamped  # noqa: E402

N_VOCAB = 262_144  # Gemma-3
GUARD_MIN_P = 0.02


def log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))


def numpy_mix(base: np.ndarray, arms: list[np.ndarray], alphas: list[float], min_p: float = 0.0) -> np.ndarray:
    """What the kernel replaces, in float32 as the logits come; with min_p > 0, the guard masks before renormalising."""
    total = log_softmax(base)
    for alpha, arm in zip(alphas, arms, strict=True):
        total = total + np.float32(alpha) * log_softmax(arm)
    if min_p > 0:
        cutoff = base.max(axis=-1, keepdims=True) + np.float32(np.log(min_p))
        total = np.where(base < cutoff, np.float32(-np.inf), total)
    return log_softmax(total)


def bench_case(
    n_rows: int, n_arms: int, rounds: int, kernel_calls: int, min_p: float = 0.0, seed: int = 0
) -> dict[str, float]:
    """Median µs per call for numpy and for the kernel on 1 and 2 threads, one round of each after the other."""
    rng = np.random.default_rng(seed)
    shape = (n_rows, N_VOCAB)
    # Spread like Gemma-3's logits (mean about -4, standard deviation about 5).
    base = (rng.standard_normal(shape) * 5 - 4).astype(np.float32)
    arms = [(rng.standard_normal(shape) * 5 - 4).astype(np.float32) for _ in range(n_arms)]
    alphas = [1.0] + [0.5] * (n_arms - 1)
    dst = np.empty_like(base)
    runs = {
        "numpy": lambda: numpy_mix(base, arms, alphas, min_p),
        "kernel_1": lambda: mix_logprobs(dst, base, arms, alphas, n_threads=1, guard_min_p=min_p),
        "kernel_2": lambda: mix_logprobs(dst, base, arms, alphas, n_threads=2, guard_min_p=min_p),
    }
    calls = {"numpy": 1, "kernel_1": kernel_calls, "kernel_2": kernel_calls}
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
        "median µs per call",
        "",
        "| case | numpy float32 | kernel, 1 thread | speed-up | kernel, 2 threads | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        lines.append(
            f"| {case['case']} | {case['numpy_us']:,.0f} | {case['kernel_1_us']:,.0f} | {case['speedup_1']:.1f}× | "
            f"{case['kernel_2_us']:,.0f} | {case['speedup_2']:.1f}× |"
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
        ("base + 1 ARM", 1, 1, 0.0),
        (f"base + 1 ARM, guard τ = {GUARD_MIN_P}", 1, 1, GUARD_MIN_P),
        ("base + 3 ARMs", 1, 3, 0.0),
        (f"base + 3 ARMs, guard τ = {GUARD_MIN_P}", 1, 3, GUARD_MIN_P),
        ("batch of 8 rows, base + 1 ARM", 8, 1, 0.0),
        (f"batch of 8 rows, base + 1 ARM, guard τ = {GUARD_MIN_P}", 8, 1, GUARD_MIN_P),
    ]
    report = {"vocab": N_VOCAB, "cpu": cpu_name(), "cpus": os.cpu_count(), "numpy": np.__version__, "cases": []}
    for label, n_rows, n_arms, min_p in cases:
        result = bench_case(n_rows, n_arms, args.rounds, kernel_calls=20, min_p=min_p)
        numpy_us, one, two = result["numpy"], result["kernel_1"], result["kernel_2"]
        report["cases"].append(
            {
                "case": label,
                "numpy_us": numpy_us,
                "kernel_1_us": one,
                "kernel_2_us": two,
                "speedup_1": numpy_us / one,
                "speedup_2": numpy_us / two,
            }
        )
    print("\n".join(markdown(report)))
    print("\nReproduce: python bench/bench_kernel.py")
    if args.out:
        write_stamped(args.out, report, stamp)


if __name__ == "__main__":
    main()
