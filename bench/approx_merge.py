"""How far is one context with every LoRA ARM applied (at scales α_i/Σα) from the exact product of the ARMs?

    python bench/approx_merge.py [--prompts 24] [--tokens 48] [--grid-prompts 36] [--json docs/approx_merge.json]
    python bench/approx_merge.py --table [--json docs/approx_merge.json]

Two LoRA ARMs over one base cost three decodes a token exactly (base, ARM 1, ARM 2). An approximation (issue 23)
costs two: one context of the base with both adapters set at scales α_i/Σα, mixed once at weight Σα,

    exact:  log p_base + Σ α_i log p_arm_i        approximate:  log p_base + (Σ α_i) log p_merged

equal to first order in the adapters' deltas (the logits are linear in a small LoRA update). This measures the
error where it matters: the shipped positive and concise ARMs at their recommended weights (and at 2× those),
continuing the evaluation's held-out prompts with the exact two-ARM guidance; along each continuation, teacher
forced, the mean per-token KL(exact ‖ approximate), the share of positions whose most likely token differs, and for
scale the same two against the exact one-ARM guidance (positive alone) and against the base. Counts and
probabilities only: any machine state gives the same numbers.

Then the evaluation's two-objective grid (bench/evaluate.py: 36 held-out prompts, 32 tokens, the points where both
weights are positive, and the shipped defaults) sampled exactly and with --merge-arms, the same seeds: positivity and
tokens to finish the first sentence, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from build_arms import load_prompts  # noqa: E402
from evaluate import log_softmax  # noqa: E402
from stamp import describe, measurement_stamp, write_stamped  # noqa: E402


def compare(exact: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean per-position KL(exact ‖ other) in nats, and the share of positions whose argmax differs."""
    p = np.exp(exact)
    kl = (p * (exact - other)).sum(axis=-1)
    return float(kl.mean()), float((exact.argmax(-1) != other.argmax(-1)).mean())


def measure(model, prompts: list[str], tokens: int, scale: float, seed: int) -> dict:
    from genarm_local.core.context import Context

    engine = model.engine
    arms = engine.arms
    alphas = [scale * arm.recommended_alpha for arm in arms]
    total = sum(alphas)
    weights = {arm.name: alpha for arm, alpha in zip(arms, alphas, strict=True)}
    results = model.generate_batch(prompts, weights=weights, max_tokens=tokens, seed=seed)
    n_ctx = 512

    def context(adapters):
        return Context(engine.base_model, engine.config, n_ctx=n_ctx, adapters=adapters)

    sums = {"approximate": [], "one ARM": [], "base": []}
    with (
        context([]) as base_ctx,
        context([(arms[0].adapter, 1.0)]) as first,
        context([(arms[1].adapter, 1.0)]) as second,
        context([(arm.adapter, alpha / total) for arm, alpha in zip(arms, alphas, strict=True)]) as merged,
    ):
        for prompt, result in zip(prompts, results, strict=True):
            ids = engine.base_model.tokenize(prompt) + list(result.tokens)
            start = len(ids) - len(result.tokens) - 1  # the positions that predicted each generated token
            rows = slice(start, len(ids) - 1)
            base = base_ctx.logits_all(ids)[rows].astype(np.float64)
            arm_1 = log_softmax(first.logits_all(ids)[rows])
            arm_2 = log_softmax(second.logits_all(ids)[rows])
            mixed = log_softmax(merged.logits_all(ids)[rows])
            exact = log_softmax(base + alphas[0] * arm_1 + alphas[1] * arm_2)
            others = {
                "approximate": log_softmax(base + total * mixed),
                "one ARM": log_softmax(base + alphas[0] * arm_1),
                "base": log_softmax(base),
            }
            for name, other in others.items():
                sums[name].append((*compare(exact, other), len(result.tokens)))
    row = {"weights": {name: round(alpha, 4) for name, alpha in weights.items()}, "texts": len(prompts)}
    for name, values in sums.items():
        n = sum(v[2] for v in values)
        row[name] = {
            "kl": round(sum(v[0] * v[2] for v in values) / n, 4),
            "top1_differs": round(sum(v[1] * v[2] for v in values) / n, 4),
        }
    row["tokens"] = sum(v[2] for v in sums["base"])
    return row


def grid(prompts: list[str], seed: int) -> list[dict]:
    from evaluate import judge_all, run_batch, sentence_lengths

    from genarm_local import GuidedModel
    from genarm_local.core.config import default_arms

    shipped = default_arms()
    points = [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (2.0, 2.0), (None, None)]  # None: the ARM's recommended α
    rows = {point: {"alpha_positive": point[0], "alpha_concise": point[1]} for point in points}
    for mode, merge in (("exact", False), ("approximate", True)):
        with GuidedModel(None, {name: None for name in shipped}, merge_arms=merge) as model:
            for point in points:
                results = run_batch(model, prompts, dict(zip(("positive", "concise"), point, strict=True)), seed, 32)
                rows[point][mode] = {
                    "positivity": round(float(np.mean(judge_all([r.text for r in results]))), 4),
                    "sentence_tokens": round(float(np.mean(sentence_lengths(model, results))), 2),
                }
                print(json.dumps(rows[point]), flush=True)
    return list(rows.values())


def table(report: dict) -> str:
    stamp = report["stamp"]
    lines = [
        f"_Measured {describe(stamp)}, by `python bench/approx_merge.py`._\n",
        "Per token along exact two-ARM continuations of the held-out prompts: KL(exact ‖ other) in nats, and how "
        "often the most likely token differs.\n",
        "| weights (positive, concise) | approximate (--merge-arms) | positive ARM alone | base alone |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        cells = [f"{row[name]['kl']:.3f} / {100 * row[name]['top1_differs']:.1f}%"
                 for name in ("approximate", "one ARM", "base")]  # fmt: skip
        weights = ", ".join(f"{alpha:g}" for alpha in row["weights"].values())
        lines.append(f"| {weights} | " + " | ".join(cells) + " |")
    lines += [
        "\nThe two-objective grid, exact and approximate (same prompts and seeds; positivity, tokens to finish the "
        "first sentence):\n",
        "| α_positive | α_concise | exact | approximate |",
        "|---|---|---|---|",
    ]
    for point in report["grid"]:
        names = [
            ("recommended" if point[key] is None else f"{point[key]:g}") for key in ("alpha_positive", "alpha_concise")
        ]
        cells = [f"{point[mode]['positivity']:+.3f}, {point[mode]['sentence_tokens']:.1f}"
                 for mode in ("exact", "approximate")]  # fmt: skip
        lines.append(f"| {names[0]} | {names[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-prompts", type=int, default=36)
    parser.add_argument("--json", type=Path, default=Path("docs/approx_merge.json"))
    parser.add_argument("--table", action="store_true", help="print the README's tables from --json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return

    from genarm_local import GuidedModel
    from genarm_local.core.config import default_arms

    stamp = measurement_stamp()
    prompts = load_prompts("held-out")[: args.prompts]
    rows = []
    with GuidedModel(None, {name: None for name in default_arms()}) as model:
        for scale in (1.0, 2.0):
            rows.append(measure(model, prompts, args.tokens, scale, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    points = grid(load_prompts("held-out")[: args.grid_prompts], args.seed)
    write_stamped(args.json, {"rows": rows, "grid": points}, stamp)


if __name__ == "__main__":
    main()
