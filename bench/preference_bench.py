"""Teach the embedded base three preferences of different kinds and check that each ARM works at its recommended α
(README, "Your own preference"): for each task of bench/preference_tasks.py named below (a word, a style, a
sentiment; 48 TRL pairs each), train with `train`'s defaults and with 3× the default steps, calibrate as
`train --export` does, then continue the task's held-out prompts (never trained on) with the base alone and guided
at the recommended α: the preferred behaviour's rate, distinct-2, rep-4 and degenerate rate, each the mean over
SEEDS sets of 96 continuations.

    python bench/preference_bench.py [--tasks sky brief kind] [--out docs/preference_tasks.json]
    python bench/preference_bench.py --arms-dir DIR           # keep the trained ARMs in DIR; reuse those there
    python bench/preference_bench.py --table [--out FILE]     # the README's table
    python bench/preference_bench.py --train anchor_over_base=2.0 --arms-dir DIR --out FILE   # a candidate default

--train NAME=VALUE (TrainConfig fields, Python literals) changes a default for both runs, to measure a candidate
default before it becomes one. Tasks not named in --tasks keep their record (and its stamp) from --out, read when
a task's record is written, so one process per task (--tasks sky, --tasks brief, ...) can share an --out. With
--arms-dir a second run skips training (each ARM's training record is kept beside it) and only calibrates and
measures again: what a change to calibration needs.

The bar (issue 21): feature rate ≥ the base's + 25 points (or ≥ 90%), distinct-2 ≥ 0.8 × the base's, rep-4 ≤ the
base's + 0.05; the table's last column says whether a row meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and llama.cpp in one process

from preference_tasks import TASKS  # noqa: E402
from stamp import describe, measurement_stamp  # noqa: E402
from train_experiments import calibrate_arm, measure, parse_overrides, train_only  # noqa: E402

from genarm_local.train.config import TrainConfig  # noqa: E402

# TrainConfig overrides. The default length is 1 epoch or min_steps, whichever is longer: 3× both is 3× it.
RUNS = {"defaults": {}, "3× steps": {"epochs": 3, "min_steps": 3 * TrainConfig.min_steps}}
RUN_SLUGS = {"defaults": "defaults", "3× steps": "steps3"}
SEED = 1
# Continuations of each of the 24 held-out prompts: 96 texts. With 48 (2 each; the README's sky rows still) a rate
# near the bar moved by up to 13 points between nearby weights.
SAMPLES = 4
# Sets of SAMPLES continuations a prompt, each its own seeds; a row's figures are the means over the sets. One set's
# rate has a standard error of ~3.6 points near 85%, and its distinct-2 moved 0.7955x -> 0.807x the base's between
# two seeds for the same ARM at the same α (kind's 3x ARM at 9efb6d2): one set decided the bar by noise. Distinct-2
# is pooled within a set (96 texts, as the bar reads it) and averaged over sets, not pooled over all of them: pooled
# distinct-2 falls as the number of texts grows.
SEEDS = (1, 2, 3)
# Continuations decoded together: 12 rows a step take llama.cpp's batched kernel on a CPU (8 rows or more), about
# twice as fast as the 2 of a GuidedModel's default; the texts are those of the same distribution.
SLOTS = 12


def trained(task, overrides: dict, work: Path) -> tuple[Path, dict]:
    """The ARM trained on ``task`` with ``overrides`` in ``work``: trained there now, or by an earlier run with the
    same overrides (records from before they were stored are taken as made with them)."""
    record = work / "training.json"
    if record.is_file():
        training = json.loads(record.read_text())
        if training.get("train", overrides) != overrides:
            sys.exit(f"{work} holds an ARM trained with {training['train']}, not {overrides}: use another --arms-dir")
        return work / "arm.gguf", training
    work.mkdir(parents=True, exist_ok=True)
    arm, training = train_only(task, overrides, work)
    training["train"] = overrides
    record.write_text(json.dumps(training, indent=1) + "\n")
    return arm, training


def measure_sets(model, task, alpha: float) -> dict:
    """``measure`` once per seed of SEEDS: the mean of each figure over the sets, and every set's own ("sets")."""
    sets = [measure(model, task, alpha, seed, SAMPLES) for seed in SEEDS]
    mean = {key: sum(s[key] for s in sets) / len(sets) for key in ("feature", "distinct_2", "rep_4", "degenerate")}
    per_set = [{k: v for k, v in s.items() if k != "examples"} | {"seed": seed}
               for s, seed in zip(sets, SEEDS, strict=True)]  # fmt: skip
    return {**mean, "alpha": alpha, "n": sum(s["n"] for s in sets), "examples": sets[0]["examples"], "sets": per_set}


def meets_bar(row: dict, base: dict) -> bool:
    return (
        (row["feature"] >= base["feature"] + 0.25 or row["feature"] >= 0.9)
        and row["distinct_2"] >= 0.8 * base["distinct_2"]
        and row["rep_4"] <= base["rep_4"] + 0.05
    )


def table(records: list[dict]) -> str:
    lines = [
        "| task (feature) | training | steps | held-out accuracy | recommended α | feature | distinct-2 | rep-4 | "
        "degenerate | meets the bar |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        base = record["base"]
        lines.append(
            f"| {record['task']} ({record['feature']}) | base alone | | | | {base['feature']:.2f} | "
            f"{base['distinct_2']:.3f} | {base['rep_4']:.3f} | {base['degenerate']:.2f} | |"
        )
        for run in record["runs"]:
            row, training = run["guided"], run["training"]
            accuracy = training["eval"].get("accuracy") if training.get("eval") else None
            lines.append(
                f"| | {run['name']} | {training['steps']} | {'' if accuracy is None else f'{accuracy:.2f}'} | "
                f"{run['recommended_alpha']:.3g} | {row['feature']:.2f} | {row['distinct_2']:.3f} | "
                f"{row['rep_4']:.3f} | {row['degenerate']:.2f} | {'yes' if meets_bar(row, base) else '**no**'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sky", "brief", "kind"], choices=TASKS)
    parser.add_argument("--out", default="docs/preference_tasks.json")
    parser.add_argument("--arms-dir", help="keep the trained ARMs here, and reuse those already there")
    parser.add_argument("--train", nargs="*", default=[], metavar="NAME=VALUE", help="TrainConfig overrides")
    parser.add_argument("--table", action="store_true", help="only print --out as the README's table")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        records = json.loads(out.read_text())["tasks"]
        runs = {(describe(r["stamp"]), r["minutes"]): [] for r in records}
        for r in records:
            runs[describe(r["stamp"]), r["minutes"]].append(r["task"])
        print("_Measured " + "; ".join(f"{', '.join(tasks)} {stamp}, in {minutes} min" for (stamp, minutes), tasks
                                       in runs.items()) + ", by `python bench/preference_bench.py`._\n")  # fmt: skip
        print(table(records))
        return
    stamp = measurement_stamp(args.allow_dirty)
    changed = parse_overrides(args.train)

    from genarm_local import GuidedModel
    from genarm_local.core.arm_metadata import read_calibration

    records = []
    for name in args.tasks:
        started = time.time()
        task = TASKS[name]()
        with GuidedModel(arms={}, n_ctx=1024, n_parallel=SLOTS, seed=SEED) as model:
            base = measure_sets(model, task, 0.0)
        record = {"task": name, "feature": task.feature, "pairs": len(task.pairs), "stamp": stamp, "base": base,
                  "runs": []}  # fmt: skip
        for run_name, run_overrides in RUNS.items():
            overrides = {**changed, **run_overrides}
            with tempfile.TemporaryDirectory(prefix="genarm-pref-") as scratch:
                work = Path(args.arms_dir or scratch) / f"{name}-{RUN_SLUGS[run_name]}"
                arm, training = trained(task, overrides, work)
                training.update(calibrate_arm(task, arm, training["seed"], None))
                alpha = read_calibration(arm).recommended_alpha
                with GuidedModel(arms={str(arm): None}, n_ctx=1024, n_parallel=SLOTS, seed=SEED) as model:
                    guided = measure_sets(model, task, alpha)
            record["runs"].append(
                {"name": run_name, "train": overrides, "training": training, "recommended_alpha": alpha,
                 "guided": guided}
            )  # fmt: skip
            print(f"{name} {run_name}: α {alpha:.3g}, feature {base['feature']:.2f} -> {guided['feature']:.2f}, "
                  f"distinct-2 {base['distinct_2']:.3f} -> {guided['distinct_2']:.3f}, rep-4 {base['rep_4']:.3f} -> "
                  f"{guided['rep_4']:.3f}, {training['steps']} steps", flush=True)  # fmt: skip
        record["minutes"] = round((time.time() - started) / 60, 1)
        # read again now: a run of other --tasks in another process may have written its records meanwhile
        kept = {r["task"]: r for r in json.loads(out.read_text())["tasks"]} if out.is_file() else {}
        kept[name] = record
        records = [kept[n] for n in TASKS if n in kept]
        write_json(out, {"tasks": records})  # after each task: a stopped run keeps what it measured
    print(table(records))


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
