"""Train an ARM on a small saturating preference task (bench/preference_tasks.py) and measure guided generation on
the task's held-out prompts: the preferred feature's rate, distinct-2 and rep-4 at each weight α, the base's at
α = 0. The experiments behind the training defaults (README, "Your own preference").

    python bench/train_experiments.py --task sky --name paper-e2b4 --train epochs=2 batch_size=4 \
        --alphas 0 1 recommended --out docs/train_experiments.json

--train takes TrainConfig fields as NAME=VALUE (Python literals); the rest are the defaults. --arm evaluates an
existing ARM instead of training one. Each run appends one record to --out (the JSON file keeps every run);
`python bench/train_experiments.py --table [--out FILE]` prints them as the README's table.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and llama.cpp in one process

from preference_tasks import TASKS  # noqa: E402

# The product's default sampling (llama.cpp's): what a user sees.
MAX_TOKENS = 40
SAMPLES = 2


def parse_overrides(items: list[str]) -> dict:
    """TrainConfig overrides from NAME=VALUE strings (the value a Python literal)."""
    return {name: ast.literal_eval(value) for name, value in (item.split("=", 1) for item in items)}


def measure(model, task, alpha: float, seed: int, samples: int = SAMPLES) -> dict:
    """Guided continuations of every held-out prompt (``samples`` each) at ``alpha``: feature rate and fluency."""
    from genarm_local.evaluation.fluency import is_degenerate, rep_n, reply
    from genarm_local.evaluation.judges import distinct_n

    prompts = [p for p in task.held_out for _ in range(samples)]
    weights = {name: alpha for name in model.arm_weights()}
    results = model.generate_batch(prompts, weights=weights, max_tokens=MAX_TOKENS, seed=seed)
    texts = [reply(r.text, p) for r, p in zip(results, prompts, strict=True)]  # a chat reply: where chat stops
    return {
        "alpha": alpha,
        "feature": sum(task.has_feature(t) for t in texts) / len(texts),
        "distinct_2": distinct_n(texts, 2),
        "rep_4": sum(rep_n(t) for t in texts) / len(texts),
        "degenerate": sum(map(is_degenerate, texts)) / len(texts),
        "n": len(texts),
        "examples": texts[:4],
    }


def train_arm(task, overrides: dict, workdir: Path, threads: int) -> tuple[Path, dict]:
    """Train with TrainConfig's defaults but ``overrides``, then calibrate as `train --export` does."""
    arm, training = train_only(task, overrides, workdir)
    training.update(calibrate_arm(task, arm, training["seed"], threads))
    return arm, training


def train_only(task, overrides: dict, workdir: Path) -> tuple[Path, dict]:
    """Train with TrainConfig's defaults but ``overrides`` into ``workdir`` (arm.gguf, not calibrated)."""
    from genarm_local.train import TrainConfig, train

    config = TrainConfig(
        data=task.pairs,
        output=str(workdir / "run"),
        export=str(workdir / "arm.gguf"),
        progress=False,
        calibrate=False,
        **overrides,
    )
    result = train(config)
    return Path(result.export), {
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "eval": result.eval,
        "seed": config.seed,
    }


def calibrate_arm(task, arm: Path, seed: int, threads: int | None) -> dict:
    """Calibrate ``arm`` as `train --export` does (on the prompts of the pairs `train` held out with ``seed`` and
    the default --eval-split, the default settings), here with ``threads`` llama.cpp threads, and store the result
    in the file."""
    from genarm_local.convert import write_calibration

    from genarm_local.evaluation.calibration import CalibrationConfig, calibrate
    from genarm_local.train.config import TrainConfig, split

    started = time.perf_counter()
    settings = CalibrationConfig(arm=str(arm), seed=seed, n_threads=threads)
    _, held_out = split(task.pairs, TrainConfig.eval_split, seed)
    calibration = calibrate(settings, prompts=[p["prompt"] for p in held_out])
    write_calibration(arm, calibration)
    return {"calibration_seconds": round(time.perf_counter() - started, 1), "calibration": vars(calibration)}


def table(runs: list[dict]) -> str:
    """The README's table: per task, the base then each run at α = 1 and at its recommended α."""
    lines = [
        "| task | training | steps | held-out margin β·Δ | α | feature | distinct-2 | rep-4 | degenerate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen_base = set()
    for run in runs:
        training = run.get("training", {})
        for row in run["rows"]:
            if row["alpha"] == 0:
                if run["task"] in seen_base:
                    continue
                seen_base.add(run["task"])
                name, steps, margin = "base", "", ""
            else:
                name = run["name"]
                steps = str(training.get("steps", ""))
                margin = f"{training['eval']['margin']:.2f}" if training.get("eval") else ""
            alpha = f"{row['alpha']:.3g}" + (" (rec.)" if row.get("label") == "recommended" else "")
            lines.append(
                f"| {run['task']} | {name} | {steps} | {margin} | {alpha} | {row['feature']:.2f} | "
                f"{row['distinct_2']:.3f} | {row['rep_4']:.3f} | {row.get('degenerate', float('nan')):.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--name", help="label of this run in --out")
    parser.add_argument("--train", nargs="*", default=[], metavar="NAME=VALUE", help="TrainConfig overrides")
    parser.add_argument("--arm", help="evaluate this ARM instead of training one")
    parser.add_argument("--alphas", nargs="+", default=["0", "1", "recommended"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="docs/train_experiments.json")
    parser.add_argument("--keep", help="copy the trained ARM here")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--table", action="store_true", help="only print --out as the README's table")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if not (args.task and args.name):
        parser.error("--task and --name are required")

    from genarm_local import GuidedModel
    from genarm_local.core.arm_metadata import read_calibration

    task = TASKS[args.task]()
    overrides = parse_overrides(args.train)
    record = {"task": args.task, "name": args.name, "train": overrides, "machine_load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="genarm-exp-") as work:
        if args.arm:
            arm = Path(args.arm)
        else:
            started = time.perf_counter()
            arm, record["training"] = train_arm(task, overrides, Path(work), args.threads)
            record["train_seconds"] = round(time.perf_counter() - started, 1)
            if args.keep:
                Path(args.keep).write_bytes(arm.read_bytes())
        calibration = read_calibration(arm)
        record["recommended_alpha"] = calibration.recommended_alpha if calibration else None
        rows = []
        with GuidedModel(arms={str(arm): None}, n_ctx=4096, seed=args.seed, n_threads=args.threads) as model:
            for text in args.alphas:
                if text == "recommended":
                    if calibration is None:
                        continue
                    alpha = calibration.recommended_alpha
                else:
                    alpha = float(text)
                row = measure(model, task, alpha, args.seed)
                row["label"] = text
                rows.append(row)
                print(
                    f"{args.task} {args.name} α={alpha:.3f} ({text}): feature {row['feature']:.2f}, "
                    f"distinct-2 {row['distinct_2']:.3f}, rep-4 {row['rep_4']:.3f}",
                    flush=True,
                )
        record["rows"] = rows
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.exists() else []
    runs.append(record)
    out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
