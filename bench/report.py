"""Regenerate every table and plot of the README's "Results" section from measurements taken now.

    python bench/report.py [--peft-dir DIR] [--reuse]

Runs bench/bench_methods.py (speed, memory, batching, time to first token) and bench/evaluate.py (quality of the
shipped ARMs against the base, ARGS and best-of-N; the multi-objective grid; quantization fidelity), writes
docs/bench.json, docs/eval.json and docs/*.png, and replaces the README between its report markers, stamped with the
date, the machine and the commit. --reuse renders from the existing JSON files without measuring again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
START, END = "<!-- report:start -->", "<!-- report:end -->"


def machine() -> str:
    from bench_kernel import cpu_name

    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def plots(bench: dict, evaluation: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bench["methods"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names[::-1], [bench["methods"][n]["tok_s"] for n in names[::-1]], color="#4c72b0")
    ax.set_xlabel("generated tokens/s (single stream)")
    ax.set_title("GenARM on Gemma-3-270M Q4_K_M, CPU")
    fig.tight_layout()
    fig.savefig(DOCS / "methods.png", dpi=120)
    plt.close(fig)

    sizes = sorted(bench["batch"], key=int)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([int(s) for s in sizes], [bench["batch"][s] for s in sizes], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequences per batch")
    ax.set_ylabel("guided tokens/s (all sequences)")
    ax.set_title("Batched GenARM throughput (LoRA ARM)")
    fig.tight_layout()
    fig.savefig(DOCS / "batch.png", dpi=120)
    plt.close(fig)

    if "sweep" in evaluation:
        tradeoff_plot(plt, evaluation)

    grid = evaluation["grid"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([p["sentence_tokens"] for p in grid], [p["positivity"] for p in grid], c="#dd8452")
    for p in grid:
        ax.annotate(
            f"({p['alpha_positive']:g}, {p['alpha_concise']:g})",
            (p["sentence_tokens"], p["positivity"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("tokens to finish the first sentence (lower: more concise)")
    ax.set_ylabel("mean VADER compound (higher: more positive)")
    ax.set_title("(α_positive, α_concise) grid, held-out prompts")
    fig.tight_layout()
    fig.savefig(DOCS / "pareto.png", dpi=120)
    plt.close(fig)


def tradeoff_plot(plt, evaluation: dict) -> None:
    """Reward against distinct-2 along the positive ARM's α sweep, one curve per guard τ, the base as a star."""
    base = next(m for m in evaluation["methods"] if m["method"] == "base")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for guard in sorted({p["guard_min_p"] for p in evaluation["sweep"]}):
        points = sorted((p for p in evaluation["sweep"] if p["guard_min_p"] == guard), key=lambda p: p["alpha"])
        label = f"guard τ = {guard:g}" if guard else "no guard"
        ax.plot([p["distinct_2"] for p in points], [p["reward"] for p in points], marker="o", label=label)
        for p in points:
            ax.annotate(f"α={p['alpha']:g}", (p["distinct_2"], p["reward"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)  # fmt: skip
    ax.scatter([base["distinct_2"]], [base["reward"]], marker="*", s=120, c="k", label="base", zorder=3)
    ax.axvline(0.8 * base["distinct_2"], color="grey", linestyle=":", linewidth=1, label="0.8 × base distinct-2")
    ax.set_xlabel("distinct-2 (higher: more varied text)")
    ax.set_ylabel("mean VADER compound (higher: more positive)")
    ax.set_title("Positive ARM: reward vs fluency along α")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "tradeoff.png", dpi=120)
    plt.close(fig)


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(bench: dict, evaluation: dict, engine: dict, kernel: str, build: dict | None, stamp: str) -> str:
    lines = [START, "", f"_Measured {stamp}. Regenerate with `python bench/report.py`._", ""]
    if build:
        lines += [
            f"The shipped ARMs were rebuilt from seed {build['seed']} by `python bench/build_arms.py` in "
            f"{build['total_s'] / 60:.0f} minutes: {build['continuations']} sampled continuations "
            f"({build['sample_s'] / 60:.0f} min), {build['positive_pairs']} positive and {build['concise_pairs']} "
            f"concise pairs, training {build['positive_train_s'] / 60:.0f} + {build['concise_train_s'] / 60:.0f} "
            f"min (held-out preference accuracy {build['positive_train']['eval'].get('accuracy', float('nan')):.2f} "
            f"and {build['concise_train']['eval'].get('accuracy', float('nan')):.2f}).",
            "",
        ]
    lines += [
        "#### Quality on held-out prompts (positive ARM)",
        "",
        f"{evaluation['prompts']} held-out prompts, {evaluation['tokens']} tokens each, "
        f"sampling {json.dumps(evaluation['sampling'])}; reward = VADER compound; win rate vs the base's "
        "continuation of the same prompt; perplexity of the output under the base.",
        "",
        "| method | reward | win rate | perplexity | distinct-2 | rep-4 | degenerate | fragments | tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in evaluation["methods"] + evaluation.get("sweep", []):
        lines.append(
            f"| {m['method']} | {m['reward']:+.3f} | {m['win_rate']:.2f} | {m['perplexity']:.1f} | "
            f"{m['distinct_2']:.2f} | {m['rep_4']:.3f} | {m['degenerate']:.0%} | {m['fragments']:.1%} | "
            f"{fmt(m['tok_s'], 1)} |"
        )
    if "sweep" in evaluation:
        lines += ["", "![tradeoff](docs/tradeoff.png)"]
    lines += [
        "",
        "Degenerate: rep-4 (share of repeated word 4-grams in a text) > 0.2, a line repeated 3+ times, markup spam, "
        "or a switch of script (genarm_local/fluency.py); fragments: finished sentences under 3 words or left "
        "unfinished, per sentence.",
    ]
    lines += [
        "",
        "#### Two objectives at once: (α_positive, α_concise)",
        "",
        "![pareto](docs/pareto.png)",
        "",
        "| α_positive | α_concise | positivity | tokens to finish the sentence |",
        "|---|---|---|---|",
    ]
    for p in evaluation["grid"]:
        lines.append(
            f"| {p['alpha_positive']:g} | {p['alpha_concise']:g} | {p['positivity']:+.3f} | "
            f"{p['sentence_tokens']:.1f} |"
        )
    if "quantization" in evaluation:
        lines += [
            "",
            "#### Quantized ARMs: KL(guided with the merged F16 ARM ‖ guided with …)",
            "",
            "| ARM | mean KL | max KL | file MiB |",
            "|---|---|---|---|",
        ]
        for name, q in evaluation["quantization"].items():
            lines.append(f"| {name} | {q['mean_kl']:.2e} | {q['max_kl']:.2e} | {q['size_mib']:.1f} |")
    lines += [
        "",
        f"#### Speed and memory ({bench['threads']} threads, {bench['tokens']} tokens)",
        "",
        "![methods](docs/methods.png)",
        "",
        "| method | tok/s | × base only | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    base_speed = bench["methods"]["base only"]["tok_s"]
    for name, m in bench["methods"].items():
        lines.append(f"| {name} | {m['tok_s']:.1f} | {m['tok_s'] / base_speed:.2f} | {m['peak_rss_mib']:.0f} |")
    lines += ["", "![batch](docs/batch.png)", "", "| batch size | guided tok/s | × batch 1 |", "|---|---|---|"]
    one = bench["batch"]["1"]
    for size, speed in sorted(bench["batch"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} | {speed:.1f} | {speed / one:.2f} |")
    lines += [
        "",
        "Chat, time to first token per turn (LoRA ARM; only the new turn's tokens are decoded):",
        "",
        "| turn | prompt tokens | decoded | TTFT s |",
        "|---|---|---|---|",
    ]
    for t in bench["ttft"]:
        lines.append(f"| {t['turn']} | {t['prompt_tokens']} | {t['prompt_decoded']} | {fmt(t['ttft_s'], 3)} |")
    full, lora, batch = engine["full_model_arm"], engine["lora_arm"], engine["batch_lora_arm"]
    rss = engine["peak_rss_mib"]
    lines += [
        "",
        f"#### Engine checks (`bench/bench_engine.py --tokens 32`, {engine['threads']} threads, same run)",
        "",
        "| check | result |",
        "|---|---|",
        f"| guided vs sequential bound 1/(t_base + t_arm), full-model ARM | {full['guided_tok_s']:.1f} vs "
        f"{full['sequential_bound_tok_s']:.1f} tok/s ({full['ratio_to_bound']:.2f}×) |",
        f"| same, LoRA ARM | {lora['guided_tok_s']:.1f} vs {lora['sequential_bound_tok_s']:.1f} tok/s "
        f"({lora['ratio_to_bound']:.2f}×) |",
        f"| contexts decoded concurrently on split cores (the CPU default), full-model / LoRA ARM | "
        f"{full['concurrent_tok_s']:.1f} / {lora['concurrent_tok_s']:.1f} tok/s "
        f"({full['concurrent_tok_s'] / full['guided_tok_s']:.2f}× / "
        f"{lora['concurrent_tok_s'] / lora['guided_tok_s']:.2f}× "
        "one after the other) |",
        f"| vs the naive `Llama` + numpy loop (bench/bench_engine.py) | {engine['ratio_to_naive']:.2f}× |",
        f"| peak RSS, LoRA ARM / base only | {rss['lora_arm']:.0f} / {rss['base_only']:.0f} MiB "
        f"({rss['ratio']:.2f}×) |",
        f"| batched B={batch['n_seq']} vs one stream | {batch['batch_tok_s']:.1f} vs {batch['single_tok_s']:.1f} "
        f"tok/s ({batch['ratio']:.2f}×; raw llama.cpp decode on this machine: {batch['raw_llama_cpp_ratio']:.2f}×) |",
        "",
        "#### The fused mixing kernel (`bench/bench_kernel.py`)",
        "",
        kernel.strip(),
        "",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peft-dir", type=Path, default=None, help="the positive ARM's PEFT adapter (optional)")
    parser.add_argument("--reuse", action="store_true", help="render from docs/*.json without measuring")
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    if not args.reuse:
        extra = ["--peft-dir", str(args.peft_dir)] if args.peft_dir else []
        peft = ["--peft", str(args.peft_dir)] if args.peft_dir else []
        kernel = subprocess.run(
            [sys.executable, str(REPO / "bench" / "bench_kernel.py")], check=True, capture_output=True, text=True
        ).stdout
        (DOCS / "kernel.md").write_text(kernel.split("\nReproduce")[0].strip() + "\n")
        engine = [sys.executable, str(REPO / "bench" / "bench_engine.py"), "--tokens", "32"]
        subprocess.run([*engine, "--out", str(DOCS / "engine.json")], check=True)
        subprocess.run([sys.executable, str(REPO / "bench" / "bench_methods.py"), *peft], check=True)
        subprocess.run([sys.executable, str(REPO / "bench" / "evaluate.py"), *extra], check=True)
    engine = json.loads((DOCS / "engine.json").read_text())
    kernel = (DOCS / "kernel.md").read_text()
    build = json.loads((DOCS / "build_arms.json").read_text()) if (DOCS / "build_arms.json").exists() else None
    bench = json.loads((DOCS / "bench.json").read_text())
    evaluation = json.loads((DOCS / "eval.json").read_text())
    plots(bench, evaluation)
    stamp = f"{datetime.date.today().isoformat()} on {machine()}, commit {commit()}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if START not in readme:
        raise SystemExit(f"README.md has no {START} … {END} markers")
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    (REPO / "README.md").write_text(
        head + markdown(bench, evaluation, engine, kernel, build, stamp) + tail, encoding="utf-8"
    )
    print("README.md and docs/*.png updated")


if __name__ == "__main__":
    main()
