"""The Ray backend against the local one, side by side in one run, on the embedded base with the shipped positive ARM.

    python bench/bench_ray.py [--rows 64] [--tokens 32] [--batch-size 8] [--repeats 1] [--out docs/ray.json]

Each configuration is the real `genarm-local batch` command in a fresh process, timed from start to exit (model
load included), on the same 64-row job with the same seeds:
- local, -t 1  vs  --ray with 1 replica × 1 thread (the Ray path's own cost: target ≥ 0.9× the local rows/s);
- local, -t 2  vs  --ray with 2 replicas × 1 thread (the same total threads).
The Ray runs join a Ray instance this script starts once (as a job joins a running cluster); the time that start
takes is reported apart (`--ray` without an address pays it on every run). With --repeats the configurations run
round-robin and each reports its median. The 1-thread runs must write the same text, which is checked. Also timed:
what the driver spends per result row (JSON + the fsynced append, one fsync per chunk), the one cost that grows
with the cluster.
Needs the [ray] and [demo] extras.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stamp import measurement_stamp, write_stamped  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["bicycle", "lighthouse", "violin", "glacier", "bakery", "comet", "library", "harbor"]


def write_job(folder: Path, rows: int, name: str = "in.jsonl") -> Path:
    path = folder / name
    lines = [json.dumps({"id": i, "prompt": f"A short story about the {TOPICS[i % len(TOPICS)]}, part {i}:"})
             for i in range(rows)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def timed_batch(folder: Path, name: str, args: list, job: str = "in.jsonl") -> tuple[float, dict]:
    """Wall seconds of one `genarm-local batch` run, and its rows by id."""
    out = folder / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "genarm_local.cli", "batch", job, "-o", out.name, "--no-progress"]
    start = time.perf_counter()
    # cwd outside the source tree: Ray puts the driver's directory on its workers' sys.path
    done = subprocess.run([*command, *map(str, args)], cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr}")
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    return wall, rows


def driver_ms_per_row(folder: Path, batch_size: int, rows: int = 2048) -> float:
    """The driver's work per result row: decode a replica's chunk, append its rows to OUT, one fsync per chunk."""
    from genarm_local.batch.runner import Sink

    row = {"id": 1, "line": 1, "text": "word " * 40, "finish_reason": "length", "tokens": list(range(32))}
    payload = json.dumps({"rows": [row] * batch_size})
    sink = Sink(folder / "driver.jsonl")
    start = time.perf_counter()
    for _ in range(rows // batch_size):
        sink.write_all(json.loads(payload)["rows"])
    sink.close()
    return (time.perf_counter() - start) / rows * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration (median reported)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ray.json")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    stamp = measurement_stamp(args.allow_dirty)
    import ray

    common = ["--arm", "positive", "-n", args.tokens, "--batch-size", args.batch_size, "--seed", 0]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_job(folder, args.rows)
        write_job(folder, 1, "one.jsonl")  # the fixed costs: start, model load, one row of one token
        cwd = os.getcwd()
        os.chdir(folder)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray_start_s = time.perf_counter() - start
        os.chdir(cwd)
        address = ray.get_runtime_context().gcs_address
        configurations = {}
        for threads in (1, 2):
            configurations[f"local-{threads}"] = ("local", threads, None, ["-t", threads])
            ray_flags = ["--ray", address, "--replicas", threads, "--threads-per-replica", 1]
            configurations[f"ray-{threads}"] = ("ray", threads, threads, ray_flags)
        walls: dict[str, list[float]] = {name: [] for name in [*configurations, "local-fixed", "ray-fixed"]}
        outputs = {}
        try:
            for _ in range(args.repeats):
                for name, (_, _, _, extra) in configurations.items():
                    wall, outputs[name] = timed_batch(folder, name, [*common, *extra])
                    walls[name].append(wall)
                    print(f"{name}: {wall:.1f} s", flush=True)
                for name, extra in (("local-fixed", []), ("ray-fixed", ["--ray", address, "--replicas", 1])):
                    wall, _ = timed_batch(folder, name, ["--arm", "positive", "-n", 1, "-t", 1, *extra], "one.jsonl")
                    walls[name].append(wall)
                    print(f"{name}: {wall:.1f} s", flush=True)
        finally:
            ray.shutdown()
        driver_ms = driver_ms_per_row(folder, args.batch_size)
    fixed = {name: statistics.median(walls[f"{name}-fixed"]) for name in ("local", "ray")}
    runs = []
    for name, (backend, threads, replicas, _) in configurations.items():
        wall = statistics.median(walls[name])
        runs.append(
            {
                "backend": backend,
                "replicas": replicas,
                "threads": threads,
                "wall_s": round(wall, 2),
                "wall_s_all": [round(w, 2) for w in walls[name]],
                "rows_per_s": round(args.rows / wall, 3),
                "tokens": sum(len(row.get("tokens", ())) for row in outputs[name].values()),
            }
        )
    speed = {(run["backend"], run["threads"]): run["rows_per_s"] for run in runs}
    text = lambda name: {key: row.get("text") for key, row in outputs[name].items()}  # noqa: E731
    result = {
        "rows": args.rows,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "arm": "positive (shipped LoRA ARM, α 1)",
        "repeats": args.repeats,
        "ray_start_s": round(ray_start_s, 2),
        "driver_ms_per_row": round(driver_ms, 3),
        "runs": runs,
        "ray1_vs_local1": round(speed["ray", 1] / speed["local", 1], 3),
        "ray2_vs_local2": round(speed["ray", 2] / speed["local", 2], 3),
        "ray2_vs_ray1": round(speed["ray", 2] / speed["ray", 1], 3),
        "fixed_s": {name: round(wall, 2) for name, wall in fixed.items()},
        "overhead_per_row_s": round(
            (args.rows / speed["ray", 1] - fixed["ray"] - args.rows / speed["local", 1] + fixed["local"]) / args.rows, 4
        ),
        "same_text_1_thread": text("local-1") == text("ray-1"),
    }
    args.out.parent.mkdir(exist_ok=True)
    write_stamped(args.out, result, stamp)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
