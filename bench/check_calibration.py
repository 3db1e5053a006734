"""An independent check of calibration's KL curve: the same quantity measured directly, with none of genarm-local's
code on the measuring side.

    python bench/check_calibration.py --arm ARM.gguf [--base BASE.gguf] [--task sky] [--alphas 0.25 1 2]

The direct measurement uses llama-cpp-python's high-level `Llama` only (one instance for the base, one for the base
with the ARM's LoRA adapter, or the ARM model itself), decoding token by token, and numpy in float64:

    log p_α = log_softmax((log_softmax(base) + α · log_softmax(arm)) / max(1, 1 + α)),
    KL = Σ p_α · (log p_α − log_softmax(base))

(the guided distribution at T = 1 as the default sampling draws from it: scale_temperature divides the mix by
max(1, 1 + α)) at every position of continuations it samples itself from p_α (its own sampler: top-k 40 → top-p
0.95 → min-p 0.05 → temperature 0.8, llama.cpp's defaults and order). It is compared with what `calibrate` reports
(evaluation.calibration.measure_kl through the engine) on the same prompts, twice:
- on the calibration's own continuations, re-scored token by token (the same tokens, so only the arithmetic and
  the decode path differ);
- on the independent sampler's continuations (different random draws: agreement within the sampling error).
Writes --out (JSON) and prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
TOP_K, TOP_P, MIN_P, TEMPERATURE = 40, 0.95, 0.05, 0.8


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


class Scorer:
    """The base and the ARM as two plain llama.cpp models, fed the same tokens one at a time."""

    def __init__(self, base: str, arm: str, adapter: bool, threads: int):
        from llama_cpp import Llama

        common = dict(n_ctx=512, n_batch=8, n_ubatch=8, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.base = Llama(base, **common)
        self.arm = Llama(base, lora_path=arm, **common) if adapter else Llama(arm, **common)
        self.n_vocab = self.base.n_vocab()

    def rows(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Log-softmaxed next-token rows of base and ARM after ``tokens`` (continuing their caches)."""
        import llama_cpp

        out = []
        for model in (self.base, self.arm):
            done = model.n_tokens
            if model.input_ids[:done].tolist() != tokens[:done]:
                model.reset()
                done = 0
            model.eval(tokens[done:])
            row = llama_cpp.llama_get_logits_ith(model.ctx, -1)  # the last token's logits, straight from llama.cpp
            out.append(log_softmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))
        return out[0], out[1]


def guided_kl(lb: np.ndarray, la: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    lq = log_softmax((lb + alpha * la) / max(1.0, 1.0 + alpha))
    return lq, float(np.sum(np.exp(lq) * (lq - lb)))


def sample(lq: np.ndarray, rng: np.random.Generator) -> int:
    """llama.cpp's default chain on a row of log-probabilities: top-k, top-p, min-p, temperature, draw."""
    order = np.argsort(-lq)[:TOP_K]
    p = np.exp(lq[order] - lq[order[0]])
    p /= p.sum()
    keep = max(1, int(np.searchsorted(np.cumsum(p), TOP_P) + 1))
    order, p = order[:keep], p[:keep]
    kept = p >= MIN_P * p[0]
    order = order[kept]
    logits = lq[order] / TEMPERATURE
    w = np.exp(logits - logits.max())
    return int(order[rng.choice(len(order), p=w / w.sum())])


def continuation_kl(scorer: Scorer, prompt: list[int], tokens: list[int], ended: bool, alpha: float) -> list[float]:
    """KL at every sampled position of a given continuation (and its end-of-sequence position if it ended)."""
    kls = []
    for n in range(len(tokens) + (1 if ended else 0)):
        lb, la = scorer.rows(prompt + tokens[:n])
        kls.append(guided_kl(lb, la, alpha)[1])
    return kls


def sampled_kl(scorer: Scorer, prompt: list[int], alpha: float, max_tokens: int, eos: set[int], rng) -> list[float]:
    tokens, kls = [], []
    for _ in range(max_tokens):
        lb, la = scorer.rows(prompt + tokens)
        lq, kl = guided_kl(lb, la, alpha)
        kls.append(kl)
        token = sample(lq, rng)
        if token in eos:
            break
        tokens.append(token)
    return kls


def mean_and_error(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True)
    parser.add_argument("--base", default=None, help="default: the embedded Gemma-3-270M Q4_K_M")
    parser.add_argument("--task", default="sky", help="bench/preference_tasks.py task whose training prompts to use")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="independent continuations per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "calibration_check.json")
    args = parser.parse_args()

    from preference_tasks import TASKS

    from genarm_local import GuidedModel
    from genarm_local.core.config import resolve_base
    from genarm_local.core.native import gguf_header
    from genarm_local.evaluation.calibration import measure_kl

    base = str(resolve_base(args.base))
    prompts = [pair["prompt"] for pair in TASKS[args.task]().pairs][: args.prompts]
    # what calibrate reports (the product's code path)
    with GuidedModel(base, {args.arm: 1.0}, n_threads=args.threads, n_ctx=1024) as model:
        curve = measure_kl(model, model.arms[0].name, prompts, args.alphas, args.tokens, args.seed)
        token_prompts = [model.tokenize(p) for p in prompts]
        eos = {t for t in range(model.engine.n_vocab) if model.engine.base_model.is_eog(t)}

    scorer = Scorer(base, args.arm, gguf_header(args.arm)["type"] == "adapter", args.threads)
    rng = np.random.default_rng(args.seed)
    rows = []
    for a, alpha in enumerate(args.alphas):
        same = [
            kl
            for prompt, (tokens, ended) in zip(token_prompts, curve.samples[a], strict=True)
            for kl in continuation_kl(scorer, prompt, tokens, ended, alpha)
        ]
        own = [
            kl
            for prompt in token_prompts
            for _ in range(args.repeats)
            for kl in sampled_kl(scorer, prompt, alpha, args.tokens, eos, rng)
        ]
        reported = curve.kl[a]
        (same_mean, _), (own_mean, own_error) = mean_and_error(same), mean_and_error(own)
        _, reported_error = mean_and_error(curve.per_token[a])
        rows.append(
            {
                "alpha": alpha,
                "calibrate": reported,
                "calibrate_tokens": curve.tokens[a],
                "calibrate_stderr": reported_error,
                "direct_same_tokens": same_mean,
                "direct_sampled": own_mean,
                "direct_sampled_stderr": own_error,
                "direct_sampled_tokens": len(own),
                "ratio_same": reported / same_mean,
                "ratio_sampled": reported / own_mean,
            }
        )
        print(
            f"α={alpha:g}: calibrate {reported:.4f} ± {reported_error:.4f} ({curve.tokens[a]} tokens) | direct, same "
            f"tokens {same_mean:.4f} (ratio {reported / same_mean:.3f}) | direct, own samples {own_mean:.4f} ± "
            f"{own_error:.4f} ({len(own)} tokens, ratio {reported / own_mean:.3f})",
            flush=True,
        )
    args.out.write_text(json.dumps({"arm": str(args.arm), "prompts": len(prompts), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
