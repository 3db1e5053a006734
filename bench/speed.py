"""Guided decoding speed on the product path (GuidedModel, as chat, serve and apps call it), idle and shared.

    python bench/speed.py [--tokens 64] [--rounds 5] [--draft 4] [--desktop DIR] [--json docs/speed.json]
    python bench/speed.py --acceptance [--draft 4] [--json docs/speculation.json]
    python bench/speed.py ... --against OLD.json          # also each figure of an earlier run beside this one's

Speed: for each model (the embedded Gemma-3-270M with the shipped ARMs; with --desktop, also the synthetic
Llama-3.2-1B-shaped base and LoRA ARM of bench/desktop_model.py, its second ARM a copy of the first) and each
configuration — base only; 1 ARM; 2 ARMs; the ARM configurations plain and speculative (--draft-max), and 2 ARMs
merged in one context (--merge-arms, approximate) — one model is
loaded and generates ``--tokens`` tokens from after the prompt (chat's default sampling, end of generation ignored),
the median of ``--rounds`` (every configuration of a model loaded at once, each round running each in turn: a
moment when the machine is slower falls on every configuration alike, and the median drops the outliers a best-of
keeps), first on the
idle machine, then while one other process keeps a core busy (a Python loop, as
a browser tab or an indexer would). Every figure of one model comes from the same run; the table gives each
configuration's tok/s, its share of base-only on the same machine state, and its loaded ÷ idle share.

--acceptance: what speculation saves at each α, on the evaluation's held-out prompts (24 of them, 48 tokens each):
the share of drafts kept, tokens per round, and ARM decode calls per output token (without speculation: 1), for the
shipped positive ARM along α and the shipped defaults. Counts, not time: any machine state gives the same numbers.

Run it with nothing else busy and without OMP_WAIT_POLICY in the environment (it changes how llama.cpp's threads
wait).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stamp import describe, measurement_stamp  # noqa: E402

PROMPT = "User: What should I pack for a weekend in the mountains?\nAssistant:"
ALPHAS = (0.25, 0.5, 0.68, 1.0, 1.5, 2.0)


class Busy:
    """One other process keeping one core busy while the block runs."""

    def __enter__(self) -> Busy:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()


def arm_calls(model) -> int:
    return sum(context.n_calls for context in model.engine.scheduler.contexts[1:] if context is not None)


def one(model, tokens: int, seed: int) -> tuple[float, int, int]:
    """One generation: its tok/s (timed from after the prefill), ARM decode calls and tokens."""
    before = arm_calls(model)
    result = model.generate(PROMPT, max_tokens=tokens, seed=seed, ignore_eos=True)
    return result.timings.generated_tokens_per_s, arm_calls(model) - before, len(result.tokens)


def configurations(arms: list[str], draft: int) -> dict[str, tuple[dict, dict]]:
    """name → (the ARMs and their weights, load options)."""
    one, two = {arms[0]: None}, {arm: None for arm in arms[:2]}
    return {
        "base only": ({}, {}),
        "1 ARM": (one, {}),
        f"1 ARM, speculative (k={draft})": (one, {"draft_max": draft}),
        "2 ARMs": (two, {}),
        f"2 ARMs, speculative (k={draft})": (two, {"draft_max": draft}),
        "2 ARMs, merged (approximate)": (two, {"merge_arms": True}),
    }


def speed(base: str | None, arms: list[str], args) -> list[dict]:
    """Every configuration loaded at once, and each round runs every one of them in turn, idle and then beside a busy
    process: the configurations share the machine's states rather than each meeting its own, so their ratios hold
    from run to run better than their absolute speeds."""
    from genarm_local import GuidedModel

    with contextlib.ExitStack() as stack:
        models = {
            name: stack.enter_context(GuidedModel(base, weights, **options))
            for name, (weights, options) in configurations(arms, args.draft).items()
        }
        for model in models.values():
            model.generate(PROMPT, max_tokens=8, seed=0)  # contexts created, caches warm
        rows = {name: {"configuration": name} for name in models}
        for state in ("idle", "loaded"):
            speeds = {name: [] for name in models}
            calls, made = dict.fromkeys(models, 0), dict.fromkeys(models, 0)
            with Busy() if state == "loaded" else contextlib.nullcontext():
                for round_ in range(args.rounds):
                    for name, model in models.items():
                        tok_s, n_calls, n_made = one(model, args.tokens, round_)
                        speeds[name].append(tok_s)
                        calls[name] += n_calls
                        made[name] += n_made
            for name in models:
                rows[name][state] = {"tok_s": round(statistics.median(speeds[name]), 2),
                                     "rounds": [round(v, 2) for v in speeds[name]],
                                     "arm_calls_per_token": round(calls[name] / made[name], 3)}  # fmt: skip
        for row in rows.values():
            print(json.dumps(row), flush=True)
    return list(rows.values())


def acceptance(args) -> list[dict]:
    from build_arms import load_prompts

    from genarm_local import GuidedModel
    from genarm_local.core.config import default_arms

    prompts = load_prompts("held-out")[:24]
    shipped = default_arms()
    positive = next(iter(shipped))
    settings = [(f"{positive} α={alpha:g}", {positive: alpha}) for alpha in ALPHAS]
    settings.append(("shipped defaults", dict(shipped)))
    settings.append(("every shipped ARM at its recommended α", dict.fromkeys(shipped)))
    rows = []
    with GuidedModel(None, {name: None for name in shipped}, draft_max=args.draft) as model:
        for name, weights in settings:
            scheduler = model.engine.scheduler
            drafted, refused, calls = scheduler.drafted, scheduler.refused, arm_calls(model)
            # one stream at a time, as chat and an app's request run: each ARM decode call is one round
            results = [
                model.generate(prompt, weights=weights, max_tokens=48, seed=seed, ignore_eos=True)
                for seed, prompt in enumerate(prompts)
            ]
            made = sum(len(r.tokens) for r in results)
            drafted, refused = scheduler.drafted - drafted, scheduler.refused - refused
            calls = arm_calls(model) - calls
            active = sum(1 for alpha in model.arm_weights(weights).values() if alpha != 0)
            row = {
                "setting": name
                + (
                    ""
                    if "α=" in name
                    else " ("
                    + ", ".join(f"{arm} {alpha:.2f}" for arm, alpha in model.arm_weights(weights).items())
                    + ")"
                ),
                "kept": round(1 - refused / drafted, 3),
                "tokens_per_round": round(made * active / calls, 2),
                "arm_calls_per_token": round(calls / active / made, 3),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def speed_table(result: dict) -> str:
    lines = []
    for model in result["models"]:
        lines += [f"\n{model['name']}:\n", "| configuration | idle tok/s | × base only | loaded tok/s | × base only "
                  "(loaded) | loaded ÷ idle | ARM calls per token |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        base = next(r for r in model["rows"] if r["configuration"] == "base only")
        for r in model["rows"]:
            idle, loaded = r["idle"]["tok_s"], r["loaded"]["tok_s"]
            lines.append(
                f"| {r['configuration']} | {idle:.1f} | {idle / base['idle']['tok_s']:.2f} | {loaded:.1f} | "
                f"{loaded / base['loaded']['tok_s']:.2f} | {loaded / idle:.2f} | {r['idle']['arm_calls_per_token']:g} |"
            )
    return "\n".join(lines)


def reproduction_table(old: dict, new: dict) -> str:
    """Each figure of ``old`` (an earlier run's JSON, e.g. the README's) beside this run's: do the claims reproduce
    within 10%?"""
    lines = [f"Against {describe(old['stamp'])}:\n", "| model | configuration | figure | then | now | now ÷ then |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    ratios: dict[str, list[float]] = {"ratio": [], "tok/s": []}  # now ÷ then of each figure, by kind
    for then_model, now_model in zip(old["models"], new["models"], strict=False):
        rows = {r["configuration"]: r for r in now_model["rows"]}
        name = now_model["name"].split(",")[0].split(" (")[0]
        bases = [next(r for r in m["rows"] if r["configuration"] == "base only") for m in (then_model, now_model)]
        for then in then_model["rows"]:
            now = rows.get(then["configuration"])
            if now is None:
                continue
            for state in ("idle", "loaded"):
                figures = {
                    f"{state} tok/s": (then[state]["tok_s"], now[state]["tok_s"]),
                    f"{state} × base only": (then[state]["tok_s"] / bases[0][state]["tok_s"],
                                             now[state]["tok_s"] / bases[1][state]["tok_s"]),
                }  # fmt: skip
                for figure, (a, b) in figures.items():
                    if then["configuration"] != "base only" or figure.endswith("tok/s"):  # not its own 1.00
                        ratios["tok/s" if figure.endswith("tok/s") else "ratio"].append(b / a)
                    lines.append(f"| {name} | {then['configuration']} | {figure} | "
                                 f"{a:.2f} | {b:.2f} | {b / a:.2f} |")  # fmt: skip
    lines.append("")
    for kind, label in (("ratio", "shares (× base only)"), ("tok/s", "tok/s")):
        within = sum(1 / 1.1 <= r <= 1.1 for r in ratios[kind])
        furthest = max((max(r, 1 / r) for r in ratios[kind]), default=1.0)
        lines.append(f"{label}: {within} of {len(ratios[kind])} within 10%, the furthest {furthest:.2f}× apart")
    return "\n".join(lines)


def acceptance_table(result: dict) -> str:
    lines = ["| ARM weights | drafts kept | tokens per round | ARM decode calls per token |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['setting']} | {r['kept']:.2f} | {r['tokens_per_round']:.2f} | {r['arm_calls_per_token']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per machine state; each figure is their median")
    parser.add_argument("--draft", type=int, default=4, help="draft_max of the speculative configurations")
    parser.add_argument("--desktop", type=Path, help="bench/desktop_model.py's output folder: measure its model too")
    parser.add_argument("--acceptance", action="store_true", help="measure speculation's acceptance along α instead")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", action="store_true", help="only print --json as the README's table")
    parser.add_argument(
        "--against", type=Path, help="an earlier run's JSON: print each of its figures beside this run's"
    )
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    if args.table:
        result = json.loads(args.json.read_text())
        command = "python bench/speed.py " + ("--acceptance" if "rows" in result else "")
        print(f"_Measured {describe(result['stamp'])}, in {result['minutes']} min, by `{command.strip()}`._\n")
        print(acceptance_table(result) if "rows" in result else speed_table(result))
        return
    stamp = measurement_stamp(args.allow_dirty)
    started = time.time()
    if args.acceptance:
        result = {"stamp": stamp, "draft": args.draft, "rows": acceptance(args)}
    else:
        from genarm_local.core.config import default_arms

        embedded = speed(None, list(default_arms()), args)
        models = [{"name": "embedded Gemma-3-270M Q4_K_M, shipped ARMs", "rows": embedded}]
        if args.desktop:
            base = next(args.desktop.glob("*-random-q4_k_m.gguf"))
            lora = next(args.desktop.glob("*-random-lora-r8.gguf"))
            with tempfile.TemporaryDirectory() as scratch:
                second = Path(scratch) / "second-arm.gguf"
                shutil.copyfile(lora, second)
                rows = speed(str(base), [str(lora), str(second)], args)
            models.append({"name": f"synthetic {base.name.split('-random')[0]} (random weights, Q4_K_M), LoRA rank 8",
                           "rows": rows})  # fmt: skip
        result = {"stamp": stamp, "tokens": args.tokens, "rounds": args.rounds, "models": models}
    result["minutes"] = round((time.time() - started) / 60, 1)
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(args.json)
    print(acceptance_table(result) if args.acceptance else speed_table(result))
    if args.against:
        print(reproduction_table(json.loads(args.against.read_text()), result))


if __name__ == "__main__":
    main()
