"""Regenerate the README's "Results" section from the JSON the bench scripts write, measuring what is asked.

    python bench/report.py [--measure SECTION ...] [--reuse] [--allow-dirty] [--peft-dir DIR]

Each section comes from one JSON file in docs/, written by one script that stores its own stamp (date, machine,
commit) inside it; every section of the README is rendered with that stamp, so a section reused from an older run
says when and where it was measured. Without options every section's script runs (SECTIONS below); --measure runs
only the named ones; --reuse runs none. A work tree with uncommitted changes to tracked files is refused before
anything is measured unless --allow-dirty, which stamps the new results "uncommitted". A missing JSON file leaves
its section out; docs/build_arms.json comes from `python bench/build_arms.py` (not rerun here: it retrains the ARMs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stamp import describe, measurement_stamp  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BENCH = REPO / "bench"
START, END = "<!-- report:start -->", "<!-- report:end -->"
# section: (JSON file, script and arguments that write it)
SECTIONS = {
    "eval": ("eval.json", ["evaluate.py"]),
    "quant": ("quant.json", ["quant_fidelity.py"]),
    "fidelity": ("fidelity.json", ["bench_fidelity.py"]),
    "methods": ("bench.json", ["bench_methods.py"]),
    "engine": ("engine.json", ["bench_engine.py", "--tokens", "32"]),
    "kernel": ("kernel.json", ["bench_kernel.py"]),
    "ray": ("ray.json", ["bench_ray.py", "--repeats", "3"]),
    "serve": ("serve.json", ["bench_serve.py"]),
}


def measure(names: list[str], allow_dirty: bool, peft_dir: Path | None) -> None:
    measurement_stamp(allow_dirty)  # refuse a dirty tree before the first script starts
    for name in names:
        file, (script, *options) = SECTIONS[name]
        command = [sys.executable, str(BENCH / script), *options, "--out", str(DOCS / file)]
        if allow_dirty:
            command.append("--allow-dirty")
        if peft_dir and name in ("methods", "quant"):
            command += ["--peft" if name == "methods" else "--peft-dir", str(peft_dir)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def load(name: str) -> dict | None:
    path = DOCS / (SECTIONS[name][0] if name in SECTIONS else f"{name}.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


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


def stamped(title: str, data: dict, command: str) -> list[str]:
    return [f"#### {title}", "", f"_Measured {describe(data.get('stamp'))}, by `{command}`._", ""]


def build_section(build: dict) -> list[str]:
    positive, concise = build["positive_train"]["eval"], build["concise_train"]["eval"]
    return [
        f"_Built {describe(build.get('stamp'))}, by `python bench/build_arms.py --seed {build['seed']}`._",
        "",
        f"The shipped ARMs were rebuilt from seed {build['seed']} by `python bench/build_arms.py` in "
        f"{build['total_s'] / 60:.0f} minutes: {build['continuations']} sampled continuations and "
        f"{build.get('chat_replies', 0)} chat replies ("
        + (
            "reused from an earlier run of the same recipe and seed"
            if build.get("samples_reused")
            else f"{build['sample_s'] / 60:.0f} min"
        )
        + f"), {build['positive_pairs']} positive and "
        f"{build['concise_pairs']} concise pairs, training {build['positive_train_s'] / 60:.0f} + "
        f"{build['concise_train_s'] / 60:.0f} min (held-out preference accuracy "
        f"{positive.get('accuracy', float('nan')):.2f} and {concise.get('accuracy', float('nan')):.2f}).",
        "",
    ]


def eval_section(evaluation: dict) -> list[str]:
    lines = stamped("Quality on held-out prompts (positive ARM)", evaluation, "python bench/evaluate.py")
    best = evaluation["best_of_n"]
    lines += [
        f"{evaluation['prompts']} held-out prompts, {evaluation['tokens']} tokens each, sampling "
        f"{json.dumps(evaluation['sampling'])} (ARGS-greedy excepted); reward = VADER compound; win rate vs the "
        "base's continuation of the same prompt; perplexity of the output under the base. tok/s: wall time of the "
        "whole method per output token, single stream, judging included."
        + f" Best-of-N: N = {best['n']}, the {best['rule']}.",
        "",
        "| method | reward | win rate | perplexity | distinct-2 | rep-4 | degenerate | fragments | 1st sentence "
        "(tokens) | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in evaluation["methods"] + evaluation.get("sweep", []):
        lines.append(
            f"| {m['method']} | {m['reward']:+.3f} | {m['win_rate']:.2f} | {m['perplexity']:.1f} | "
            f"{m['distinct_2']:.2f} | {m['rep_4']:.3f} | {m['degenerate']:.0%} | {m['fragments']:.1%} | "
            f"{m['sentence_tokens']:.1f} | {fmt(m['tok_s'], 1)} |"
        )
    if "sweep" in evaluation:
        lines += ["", "![tradeoff](docs/tradeoff.png)"]
    lines += [
        "",
        "Degenerate: rep-4 (share of repeated word 4-grams in a text) > 0.2, a line repeated 3+ times, markup spam, "
        "or a switch of script (genarm_local/evaluation/fluency.py); fragments: finished sentences under 3 words or "
        "left unfinished, per sentence. Guided rows sample at T·(1+α) for α > 0 (scale_temperature, the default); "
        "a negative α steers away, lowering only the tokens the ARM rates above the base (mixing.guide).",
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
    return lines + [""]


def methods_section(bench: dict) -> list[str]:
    title = f"Speed and memory ({bench['threads']} threads, {bench['tokens']} tokens)"
    lines = stamped(title, bench, f"python bench/bench_methods.py --tokens {bench['tokens']}")
    lines += [
        "Every loop samples the same way "
        f"({json.dumps(bench['sampling'])}) and is timed from after its prefill: N tokens = N − 1 decodes.",
        "",
        "![methods](docs/methods.png)",
        "",
        "| method | tok/s | × base only | tokens (decodes) | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for name, m in bench["methods"].items():
        counts = f"{m['tokens']} ({m['decodes_per_model']})" if "tokens" in m else "–"
        lines.append(
            f"| {name} | {m['tok_s']:.1f} | {fmt(m.get('x_base_only'))} | {counts} | {m['peak_rss_mib']:.0f} |"
        )
    lines += ["", "![batch](docs/batch.png)", "", "| batch size | guided tok/s | × batch 1 |", "|---|---|---|"]
    ratios = bench.get("batch_over_one", {})
    for size, speed in sorted(bench["batch"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} | {speed:.1f} | {fmt(ratios.get(size))} |")
    lines += [
        "",
        "Chat, time to first token per turn (LoRA ARM; only the new turn's tokens are decoded):",
        "",
        "| turn | prompt tokens | decoded | TTFT s |",
        "|---|---|---|---|",
    ]
    for t in bench["ttft"]:
        lines.append(f"| {t['turn']} | {t['prompt_tokens']} | {t['prompt_decoded']} | {fmt(t['ttft_s'], 3)} |")
    return lines + [""]


def engine_section(engine: dict) -> list[str]:
    full, lora, batch = engine["full_model_arm"], engine["lora_arm"], engine["batch_lora_arm"]
    naive, rss = engine["naive_llama_numpy"], engine["peak_rss_mib"]
    n = f"{full['tokens']} tokens, {full['decodes_per_context']} decodes per context"
    command = f"python bench/bench_engine.py --tokens {engine['tokens']}"
    lines = stamped(f"Engine checks ({engine['threads']} threads)", engine, command)
    return lines + [
        "| check | result |",
        "|---|---|",
        f"| guided vs sequential bound (t_base + t_arm per decode, same tokens), full-model ARM, {n} | "
        f"{full['guided_tok_s']:.1f} vs {full['sequential_bound_tok_s']:.1f} tok/s ({full['ratio_to_bound']:.2f}×) |",
        f"| same, LoRA ARM | {lora['guided_tok_s']:.1f} vs {lora['sequential_bound_tok_s']:.1f} tok/s "
        f"({lora['ratio_to_bound']:.2f}×) |",
        f"| contexts decoded concurrently on split cores (the CPU default), full-model / LoRA ARM | "
        f"{full['concurrent_tok_s']:.1f} / {lora['concurrent_tok_s']:.1f} tok/s "
        f"({full['concurrent_over_sequential']:.2f}× / {lora['concurrent_over_sequential']:.2f}× one after the "
        "other) |",
        f"| vs the naive `Llama` + numpy loop (real logits, same sampling, {naive['tokens']} tokens, "
        f"{naive['decodes_per_context']} decodes per context), one after the other / concurrent | "
        f"{naive['tok_s']:.1f} tok/s naive: {engine['ratio_to_naive']:.2f}× / "
        f"{engine['ratio_to_naive_concurrent']:.2f}× |",
        f"| peak RSS, LoRA ARM / base only | {rss['lora_arm']:.0f} / {rss['base_only']:.0f} MiB "
        f"({rss['ratio']:.2f}×) |",
        f"| batched B={batch['n_seq']} vs one stream | {batch['batch_tok_s']:.1f} vs {batch['single_tok_s']:.1f} "
        f"tok/s ({batch['ratio']:.2f}×; llama.cpp alone decoding the same base and ARM rows: "
        f"{batch['raw_guided_ratio']:.2f}×, the base's rows only: {batch['raw_llama_cpp_ratio']:.2f}×) |",
        "",
    ]


def plots(bench: dict | None, evaluation: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(DOCS / name, dpi=120)
        plt.close(fig)

    if bench:
        names = list(bench["methods"])
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh(names[::-1], [bench["methods"][n]["tok_s"] for n in names[::-1]], color="#4c72b0")
        ax.set_xlabel("generated tokens/s (single stream)")
        ax.set_title("GenARM on Gemma-3-270M Q4_K_M, CPU")
        save(fig, "methods.png")
        sizes = sorted(bench["batch"], key=int)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([int(s) for s in sizes], [bench["batch"][s] for s in sizes], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences per batch")
        ax.set_ylabel("guided tokens/s (all sequences)")
        ax.set_title("Batched GenARM throughput (LoRA ARM)")
        save(fig, "batch.png")
    if evaluation:
        grid = evaluation["grid"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.scatter([p["sentence_tokens"] for p in grid], [p["positivity"] for p in grid], c="#dd8452")
        for p in grid:
            label = f"({p['alpha_positive']:g}, {p['alpha_concise']:g})"
            xy = (p["sentence_tokens"], p["positivity"])
            ax.annotate(label, xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("tokens to finish the first sentence (lower: more concise)")
        ax.set_ylabel("mean VADER compound (higher: more positive)")
        ax.set_title("(α_positive, α_concise) grid, held-out prompts")
        save(fig, "pareto.png")
        if "sweep" in evaluation:
            tradeoff_plot(plt, evaluation)


def quant_section(quant: dict) -> list[str]:
    from quant_fidelity import markdown as quant_table

    return stamped("Quantized ARMs", quant, "python bench/quant_fidelity.py") + quant_table(quant) + [""]


def fidelity_section(fidelity: dict) -> list[str]:
    from bench_fidelity import markdown as fidelity_table

    title = "llama.cpp against the model's own float32 distribution"
    return stamped(title, fidelity, "python bench/bench_fidelity.py") + fidelity_table(fidelity) + [""]


def kernel_section(kernel: dict) -> list[str]:
    from bench_kernel import markdown as kernel_table

    return stamped("The fused mixing kernel", kernel, "python bench/bench_kernel.py") + kernel_table(kernel) + [""]


def ray_section(ray: dict) -> list[str]:
    """bench/bench_ray.py's docs/ray.json: the Ray backend against the local one on the same job."""
    lines = stamped("Batch on a Ray cluster", ray, "python bench/bench_ray.py") + [
        f"{ray['rows']} rows × {ray['tokens']} tokens, batch size {ray['batch_size']}, {ray['arm']}:",
        "",
        "| backend | threads | rows/s | × local, same threads |",
        "|---|---|---|---|",
    ]
    local = {run["threads"]: run["rows_per_s"] for run in ray["runs"] if run["backend"] == "local"}
    for run in ray["runs"]:
        name = f"Ray, {run['replicas']} replica{'s' * (run['replicas'] > 1)} × 1 thread" if run["replicas"] else "local"
        lines.append(
            f"| {name} | {run['threads']} | {run['rows_per_s']:.2f} | {run['rows_per_s'] / local[run['threads']]:.2f} |"
        )
    lines += [
        "",
        f"Whole commands, model load included, joining a running Ray instance (starting one took "
        f"{ray['ray_start_s']:.1f} s; a 1-row job took {ray['fixed_s']['local']:.1f} s locally and "
        f"{ray['fixed_s']['ray']:.1f} s on Ray); Ray's overhead per row at 1 replica, fixed costs apart: "
        f"{ray['overhead_per_row_s'] * 1000:.0f} ms; the driver's work per result row "
        f"{ray['driver_ms_per_row']:.2f} ms; same text as the local backend at 1 thread: "
        f"{'yes' if ray['same_text_1_thread'] else 'no'}. See docs/scale-out.md.",
        "",
    ]
    return lines


def serve_section(serve: dict) -> list[str]:
    """bench/bench_serve.py's docs/serve.json: the server against the in-process API and against llama.cpp's own
    batching, for guided and for base-only requests, and a load test."""
    single, many, load = serve["single_stream"], serve["concurrency"], serve["load_test"]
    guided, base = many["guided"], many["base"]
    status = ", ".join(f"{code}: {n}" for code, n in sorted(load["status"].items()))
    rounds = len(single["guided"]["ratios"])

    def one_stream(kind: dict) -> str:
        return (
            f"{kind['server_tok_s']:.1f} ÷ {kind['in_process_tok_s']:.1f} tok/s: "
            f"**{kind['server_vs_in_process']:.3f}×** (same text: {kind['same_text']})"
        )

    def clients(kind: dict, which: str = "") -> str:
        return (
            f"{kind[which + 'clients_tok_s']:.1f} ÷ {kind['one_client_tok_s']:.1f} tok/s: "
            f"**{kind[which + 'ratio']:.2f}×**"
        )

    kept = guided["ratio"] / guided["llama_cpp_alone"]["ratio"]
    keeps = f"the server's {guided['ratio']:.2f}× is {kept:.0%} of that"
    return stamped("The OpenAI-compatible server", serve, "python bench/bench_serve.py") + [
        f'{serve["threads"]} threads, {serve["tokens"]} tokens per streamed completion; "guided": the server\'s '
        'default model (the shipped default ARMs at their recommended α), "base": the base\'s own model name '
        "(every α 0).",
        "",
        "| measurement | guided | base |",
        "|---|---|---|",
        f"| one stream: server ÷ in-process API, median of {rounds} alternating rounds | "
        f"{one_stream(single['guided'])} | {one_stream(single['base'])} |",
        f"| {guided['few_clients']} concurrent clients ÷ one client, aggregate | {clients(guided, 'few_')} | "
        f"{clients(base, 'few_')} |",
        f"| {guided['clients']} concurrent clients ÷ one client, aggregate | {clients(guided)} | {clients(base)} |",
        f"| {guided['clients']} sequences ÷ one for llama.cpp alone, decoding the same rows only | "
        f"{guided['llama_cpp_alone']['ratio']:.2f}× | "
        f"{base['llama_cpp_alone']['ratio']:.2f}× |",
        f"| load test: {load['rounds']} rounds of {load['requests'] // load['rounds']} requests (mixed weights, "
        f"{load['disconnected']} disconnecting mid-stream, {load['rejected_4xx']} malformed in all) | status "
        f"{status}; 5xx: {load['server_5xx']}; wrong answers: {len(load['failures'])}; "
        f"{'alive' if load['alive'] else 'DEAD'} after; RSS after the warm-up and each round: "
        f"{' → '.join(f'{value:.0f}' for value in load['rss_mib'])} MiB | |",
        "",
        f"Guided requests cannot reach 2× on this machine, and the llama.cpp row says why: one guided stream already "
        f"keeps both cores busy (the base's decode and the ARM's side by side, one core each), and so placed, "
        f"llama.cpp alone decodes {guided['clients']} sequences of this small model only "
        f"{guided['llama_cpp_alone']['ratio']:.2f}× faster than one; {keeps}. Base "
        "requests (one decode per step, on every core) batch as llama.cpp does. Guided batching with more cores "
        "or on a GPU is not measured here.",
        "",
    ]


def compare_section(compare: dict) -> list[str]:
    """bench/compare_trees.py's docs/compare.json: this checkout against an earlier one, side by side."""
    before, after = compare["before"]["commit"], compare["after"]["commit"]
    command = f"python bench/compare_trees.py --other CHECKOUT-OF-{before}"
    lines = stamped(f"Before and after: {before} → {after}", compare, command) + [
        f"Each figure: the median of {compare['rounds']} rounds that alternate the two checkouts on the same machine, "
        "each measured by its own bench scripts (bench_engine, bench_serve) and a `batch` run of 24 rows.",
        "",
        f"| figure | {before} | {after} | after ÷ before |",
        "|---|---|---|---|",
    ]
    for figure, values in compare["figures"].items():
        before_value, after_value, ratio = values["before"], values["after"], values["after_over_before"]
        lines.append(f"| {figure} | {before_value:.3g} | {after_value:.3g} | {ratio:.2f} |")
    return lines + [""]


RENDERERS = {
    "build_arms": build_section,
    "eval": eval_section,
    "quant": quant_section,
    "fidelity": fidelity_section,
    "methods": methods_section,
    "engine": engine_section,
    "kernel": kernel_section,
    "ray": ray_section,
    "serve": serve_section,
    "compare": compare_section,
}


def markdown() -> tuple[str, list[str]]:
    """The report block, and the sections left out (no JSON, or JSON from before the current format)."""
    lines = [START, "", "_Each section says when, where and at which commit it was measured._", ""]
    left_out, rendered = [], {}
    for name, render in RENDERERS.items():
        data = load(name)
        if data is None:
            left_out.append(f"{name} (no JSON)")
            continue
        try:
            lines += render(data)
            rendered[name] = data
        except KeyError as missing:  # written by an older version of its script: rerun it
            left_out.append(f"{name} (old format, no {missing})")
    plots(rendered.get("methods"), rendered.get("eval"))
    return "\n".join(lines + [END]), left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="+", choices=list(SECTIONS), help="measure only these sections")
    parser.add_argument("--reuse", action="store_true", help="measure nothing; render from docs/*.json")
    parser.add_argument("--allow-dirty", action="store_true", help="measure an uncommitted tree, stamped so")
    parser.add_argument("--peft-dir", type=Path, default=None, help="the positive ARM's PEFT adapter (optional)")
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    names = [] if args.reuse else (args.measure or list(SECTIONS))
    if names:
        measure(names, args.allow_dirty, args.peft_dir)
    block, left_out = markdown()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if START not in readme:
        raise SystemExit(f"README.md has no {START} … {END} markers")
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    (REPO / "README.md").write_text(head + block + tail, encoding="utf-8")
    note = f"; left out: {', '.join(left_out)}" if left_out else ""
    print(f"README.md and docs/*.png updated{note}")


if __name__ == "__main__":
    main()
