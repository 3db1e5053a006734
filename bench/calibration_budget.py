"""Choose the default KL budget of calibration by measurement, and draw docs/calibration.png.

    python bench/calibration_budget.py --arm sky=PATH --arm rain=PATH [--arm positive] [--arm concise] \
        [--out docs/calibration_budget.json] [--plot docs/calibration.png]

For each ARM (a task ARM of bench/preference_tasks.py, named after its task — TASK:LABEL for several of one task —,
or a shipped ARM):
1. its calibration curve (evaluation.calibration.calibrate, not written to the file): mean per-token
   KL(guided_α ‖ base) on its calibration prompts (the task's training prompts; for the shipped ARMs the prompts
   bench/build_arms.py trains them on);
2. a sweep over the same α grid on held-out prompts: the ARM's reward (task ARMs: the share of continuations with
   the preferred feature; positive: mean VADER compound; concise: minus the tokens to finish the first sentence),
   distinct-2 and rep-4 (the fluency bounds of issue 12: distinct-2 ≥ 0.8 × the base's, rep-4 ≤ the base's + 0.05);
3. α* = the α of the best reward within the fluency bounds, and the KL the curve gives there.
The smallest KL(α*) is a budget at which every ARM measured stays within the bounds, but α* is read off a coarse
grid (a factor 2 between points up to 1), so it is a lower bound. The plot shows calibration's DEFAULT_BUDGET
(stars: each ARM's recommended α there) with that lower bound beside it. Each ARM's record goes to --out as it
is finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from preference_tasks import TASKS  # noqa: E402
from train_experiments import MAX_TOKENS, SAMPLES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def judge_for(name: str):
    """(reward of a list of continuations, its label, calibration prompts, held-out prompts) for an ARM name."""
    from build_arms import load_prompts

    from genarm_local.evaluation.judges import positivity, sentence_tokens

    name = name.split(":")[0]  # "sky:paper" is another ARM of the sky task
    if name in TASKS:
        task = TASKS[name]()
        reward = lambda texts, pieces: sum(task.has_feature(t) for t in texts) / len(texts)  # noqa: E731
        return reward, f"share that {task.feature}", [p["prompt"] for p in task.pairs], task.held_out
    held_out = load_prompts("held-out")[::3][:24]
    if name == "positive":
        reward = lambda texts, pieces: sum(map(positivity, texts)) / len(texts)  # noqa: E731
        return reward, "mean VADER compound", load_prompts("train"), held_out
    reward = lambda texts, pieces: -sum(map(sentence_tokens, pieces)) / len(pieces)  # noqa: E731
    return reward, "− tokens to finish the first sentence", load_prompts("train"), held_out


def sweep(model, arm: str, alphas, prompts, reward, seed: int) -> list[dict]:
    from genarm_local.evaluation.fluency import rep_n
    from genarm_local.evaluation.judges import distinct_n

    rows = []
    repeated = [p for p in prompts for _ in range(SAMPLES)]
    for alpha in alphas:
        results = model.generate_batch(repeated, weights={arm: alpha}, max_tokens=MAX_TOKENS, seed=seed)
        texts = [r.text for r in results]
        pieces = [[model.detokenize([t]) for t in r.tokens] for r in results]
        rows.append(
            {
                "alpha": alpha,
                "reward": reward(texts, pieces),
                "distinct_2": distinct_n(texts, 2),
                "rep_4": sum(map(rep_n, texts)) / len(texts),
                "example": texts[0],
            }
        )
        print(f"  α={alpha:g}: reward {rows[-1]['reward']:.3f}, distinct-2 {rows[-1]['distinct_2']:.3f}, "
              f"rep-4 {rows[-1]['rep_4']:.3f}", flush=True)  # fmt: skip
    return rows


def best_within_bounds(rows: list[dict]) -> dict:
    base = rows[0]
    fluent = [r for r in rows if r["distinct_2"] >= 0.8 * base["distinct_2"] and r["rep_4"] <= base["rep_4"] + 0.05]
    return max(fluent, key=lambda r: (r["reward"], -r["alpha"]))


def plot(records: list[dict], budget: float, path: Path, lowest: float | None = None) -> None:
    """The curves with ``budget`` (stars: each ARM's recommended α there) and, dotted, ``lowest``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genarm_local.core.arm_metadata import recommend_alpha

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for record in records:
        curve = record["calibration"]
        (line,) = left.loglog(curve["alphas"], curve["kl"], marker="o", label=record["arm"])
        recommended = recommend_alpha(curve["alphas"], curve["kl"], budget)
        left.plot([recommended], [budget], marker="*", markersize=12, color=line.get_color())
        kls = [0.0] + list(curve["kl"])
        base = record["sweep"][0]
        gain = [r["reward"] - base["reward"] for r in record["sweep"]]
        scale = max(abs(g) for g in gain) or 1.0
        fluent = [
            r["distinct_2"] >= 0.8 * base["distinct_2"] and r["rep_4"] <= base["rep_4"] + 0.05 for r in record["sweep"]
        ]
        right.plot(kls[1:], [g / scale for g in gain[1:]], color=line.get_color(), label=record["arm"])
        for kl, g, ok in zip(kls[1:], gain[1:], fluent[1:], strict=True):
            right.plot(kl, g / scale, marker="o" if ok else "x", color=line.get_color(), fillstyle="full")
    left.axhline(budget, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("α")
    left.set_ylabel("KL(guided_α ‖ base), nats/token")
    left.set_title("calibration curves (★ recommended α)")
    left.legend()
    right.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"default budget {budget:g}")
    if lowest is not None:
        right.axvline(lowest, color="grey", linestyle=":", linewidth=1, label=f"lowest KL at a grid α* {lowest:.3g}")
    right.set_xscale("log")
    right.set_xlabel("KL(guided_α ‖ base), nats/token")
    right.set_ylabel("reward gain over the base (÷ its largest)")
    right.set_title("reward vs KL (o fluent, x outside the fluency bounds)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, metavar="NAME[=PATH]")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "calibration_budget.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "calibration.png")
    parser.add_argument("--replot", action="store_true", help="only draw the plot from --out")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    args = parser.parse_args()

    from genarm_local import GuidedModel
    from genarm_local.evaluation.calibration import DEFAULT_ALPHAS, CalibrationConfig, calibrate

    records = json.loads(args.out.read_text()) if args.out.exists() else []
    names = [spec.split("=", 1)[0] for spec in args.arm]
    if not args.replot:
        records = [r for r in records if r["arm"] not in names]
        for spec in args.arm:
            name, _, path = spec.partition("=")
            path = path or name
            reward, label, calibration_prompts, held_out = judge_for(name)
            print(f"{name}: calibrating {path}", flush=True)
            settings = CalibrationConfig(arm=path, write=False, n_threads=args.threads)
            calibration = calibrate(settings, prompts=calibration_prompts)
            with GuidedModel(arms={path: 1.0}, n_ctx=4096, seed=args.seed, n_threads=args.threads) as model:
                arm = model.arms[0].name
                rows = sweep(model, arm, [0.0, *DEFAULT_ALPHAS], held_out, reward, args.seed)
            best = best_within_bounds(rows)
            records.append(
                {
                    "arm": name,
                    "path": Path(path).name,  # no machine's paths in the docs
                    "reward": label,
                    "calibration": {k: v for k, v in vars(calibration).items()},
                    "sweep": rows,
                    "best_alpha": best["alpha"],
                    "kl_at_best": calibration.kl_at(best["alpha"]),
                }
            )
            print(f"{name}: best α within the bounds {best['alpha']:g}, KL there "
                  f"{records[-1]['kl_at_best']:.4f}", flush=True)  # fmt: skip
            args.out.write_text(json.dumps(records, indent=1) + "\n")
    from genarm_local.evaluation.calibration import DEFAULT_BUDGET

    lowest = min(r["kl_at_best"] for r in records if r["kl_at_best"] > 0)
    print(f"smallest KL at the best fluent α of the grid: {lowest:.4f} nats/token over {len(records)} ARMs; "
          f"the default budget: {DEFAULT_BUDGET:g}")  # fmt: skip
    plot(records, DEFAULT_BUDGET, args.plot, lowest)


if __name__ == "__main__":
    main()
