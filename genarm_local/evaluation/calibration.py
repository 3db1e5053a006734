"""Calibration: the weight α at which an ARM has the most effect while its text stays as fluent as the base's.

Continuations of the calibration prompts are sampled from the base alone and from the guided distribution
p_α ∝ p_base · p_arm^α at α = 0.25, 0.5, … (generate_batch with the product's default sampling settings; 48
continuations at each α, a prompt continued more than once when there are fewer). The guided text at each α, as
far as a reader gets it (a chat reply up to the next speaker's label, where chat stops), is judged against the
base's (the mean of BASE_DRAWS sets of as many continuations) by the fluency measures of evaluation/fluency.py
(distinct-2, rep-4, degenerate rate, an empty reply counting as degenerate, and the share of empty replies on its
own);
the recommended α is where the first of them leaves its bound (core/arm_metadata.py), interpolated between the
last grid point inside and the first outside, and the grid stops there. The effect grows with α until the text
gives way (loops, a stock phrase everywhere, a reply ended before its first word), so that is the strongest weight
a reader does not pay for; a KL budget instead reads a sharp ARM's large KL as danger when the text is far from the
base because it says what the user asked for (README, "Your own preference").

Beside it, as a diagnostic, each continuation is scored in one decode per context (Context.decode_outputs): at
every position the engine's own mixing gives the guided row and the base's normalised row, and

    KL(p_α ‖ p_base) = Σ_v p_α(v) · (log p_α(v) − log p_base(v))

is averaged over every sampled token (and the end-of-sequence position when one was sampled)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.arm_metadata import DISTINCT_2_SHARE, Calibration, recommend_alpha, slack
from ..core.config import SamplingConfig, option
from ..core.errors import InputNotFoundError, InvalidOptionError

# The grid, walked up to its first point outside a bound: a sharp ARM stops early, a weak one (trained briefly,
# little data) walks on to 3, where a LoRA ARM's mix is about as sharp as the base at T / 4.
DEFAULT_ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
MAX_TOKENS = 511
# The base's fluency, the yardstick every α is judged against, is the mean over this many independent sets of
# continuations (each as many as one α's). One set's distinct-2 moved 0.81–0.90 over four seeds (a few looping
# texts pull a pooled distinct-2 down), which moved the recommended α of one ARM 0.20–0.37; the guided sets at a
# given α moved half as much (README, "Your own preference"). Base-only continuations cost one decode a token.
BASE_DRAWS = 4
# Continuations decoded together. On a CPU, llama.cpp decodes a batch of 8 rows or more with a faster kernel: with 16
# slots instead of a GuidedModel's default 2, the preference bench's calibrations took half the time (README).
SLOTS = 16

Prompt = str | Sequence[int]


@dataclass
class CalibrationConfig:
    """Settings of `genarm-local calibrate` (its flags are generated from these fields) and of the calibration
    `train --export` runs."""

    arm: str = option(help="the ARM to calibrate: a GGUF LoRA adapter of the base or a full GGUF model (rewritten "
                      "in place with its calibration)", flags=("arm",), metavar="ARM.gguf")  # fmt: skip
    base: str | None = option(
        None, "the base GGUF; default: the embedded Gemma-3-270M Q4_K_M", flags=("-m", "--base", "--model")
    )
    prompts: str | None = option(
        None,
        'calibration prompts: one per line, or JSON lines with a "prompt" string (TRL preference data, batch '
        "input); default: a built-in set of everyday openings. `train` uses its own training prompts",
        metavar="FILE",
    )
    alphas: tuple[float, ...] = option(
        DEFAULT_ALPHAS,
        "the grid of weights α (> 0), measured up to the first whose text is less fluent than the base's",
        nargs="+",
        type=float,
        metavar="ALPHA",
    )
    max_tokens: int = option(32, "tokens sampled per continuation")
    samples: int = option(
        48,
        "continuations sampled at each α: as many prompts (a seeded random subset of a larger set), or each "
        "prompt continued as often when there are fewer",
    )
    seed: int = option(0, "seed of the prompt subset and the sampling")
    n_threads: int | None = option(None, "CPU threads; default: all cores but one", flags=("-t", "--threads"))
    write: bool = option(
        True, "store the result in the ARM file (--no-write: only measure and print)", flags=("--no-write",)
    )


# Everyday openings in the registers the shipped ARMs see (story, review, chat transcript), for ARMs calibrated
# without their training prompts.
BUILTIN_PROMPTS = (
    "The new restaurant downtown was",
    "I have to say that the weather this weekend",
    "User: Can you tell me about your weekend?\nAssistant:",
    "Once upon a time, in a small village by the sea,",
    "The meeting this morning went",
    "User: What do you think of the new phone?\nAssistant:",
    "My neighbour's dog",
    "The train was late again, and",
    "User: How was the concert last night?\nAssistant:",
    "Honestly, the movie made me feel",
    "After the long winter, the garden",
    "User: Any advice for my first day at a new job?\nAssistant:",
    "The customer service team",
    "We spent the afternoon at the museum, and",
    "User: I just moved to a new city.\nAssistant:",
    "The book I finished last night",
)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a line that is a JSON object with a "prompt" string (or a JSON string) is that
    string, any other non-blank line is the prompt itself."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"--prompts {path}: no such file")
    prompts = []
    for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines: U+2028 in a JSON line is text
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = line
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str) or not value.strip():
            value = line if not line.lstrip().startswith(("{", "[", '"')) else None
        if value:
            prompts.append(value)
    if not prompts:
        raise InvalidOptionError(f'--prompts {path} holds no prompts (one per line, or JSON lines with "prompt")')
    return prompts


def check_config(config: CalibrationConfig) -> list[float]:
    """The grid, sorted; bad settings refused before anything loads."""
    if not config.alphas or any(not a > 0 for a in config.alphas):
        raise InvalidOptionError(f"--alphas must be weights > 0, got {config.alphas}")
    for name in ("max_tokens", "samples"):
        if getattr(config, name) < 1:
            raise InvalidOptionError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(config, name)}")
    if config.max_tokens > MAX_TOKENS:  # a continuation is scored in one batch
        raise InvalidOptionError(f"--max-tokens must be ≤ {MAX_TOKENS}, got {config.max_tokens}")
    return sorted(set(float(a) for a in config.alphas))


def subset(prompts: Sequence[Prompt], limit: int, seed: int) -> list[Prompt]:
    """At most ``limit`` distinct prompts, a seeded random choice kept in the original order."""
    unique = list({(p if isinstance(p, str) else tuple(p)): p for p in prompts}.values())
    if len(unique) <= limit:
        return unique
    chosen = sorted(random.Random(seed).sample(range(len(unique)), limit))
    return [unique[i] for i in chosen]


def continued(prompts: Sequence[Prompt], samples: int, seed: int) -> list[Prompt]:
    """``samples`` prompts to continue: a subset of that many distinct ones, or each of fewer repeated in turn
    (generate_batch gives every sequence its own seed, so repeats are different continuations)."""
    chosen = subset(prompts, samples, seed)
    return [chosen[i % len(chosen)] for i in range(samples)] if chosen else []


@dataclass
class KLCurve:
    alphas: list[float]
    kl: list[float]  # mean per-token KL(p_α ‖ p_base) at each α
    tokens: list[int]  # tokens the mean is over, at each α
    per_token: list[np.ndarray] = field(default_factory=list)  # every scored position's KL, at each α
    # the sampled continuations at each α: (tokens, whether it ended with end-of-sequence)
    samples: list[list[tuple[list[int], bool]]] = field(default_factory=list)
    base_samples: list[tuple[list[int], bool]] = field(default_factory=list)  # the base's own, alone


def _position_kl(engine, arm: int, alpha: float, rows: int, contexts, guided: np.ndarray, base: np.ndarray):
    """KL(p_α ‖ p_base) at each of the ``rows`` output rows of the last decode of ``contexts`` (the base's, the
    ARM's), of the distribution the default sampling draws from at T = 1: the guided logits (mixing.guide, with the
    default guard) at the temperature SamplingConfig.scale_temperature gives them."""
    from ..core.mixing import guide, log_softmax

    defaults = SamplingConfig()
    scale = engine.temperature_factor(defaults, [(engine.arms[arm], alpha)])
    base_context, arm_context = contexts
    out = np.empty(rows)
    for row in range(rows):
        base_row = base_context.logits_address(row)
        guide(guided, base_row, [arm_context.logits_address(row)], [alpha], n_vocab=engine.n_vocab,
              guard_min_p=defaults.guard_min_p)  # fmt: skip
        log_softmax(guided, guided, n_vocab=engine.n_vocab, scale=1.0 / scale)
        log_softmax(base, base_row, n_vocab=engine.n_vocab)
        log_q = guided.astype(np.float64)
        q = np.exp(log_q)
        kept = q > 0  # a token the guard masks (-inf) contributes nothing
        out[row] = float(np.dot(q[kept], log_q[kept] - base[kept]))
    return out


def measure_kl(
    model,
    arm: str,
    prompts: Sequence[Prompt],
    alphas: Sequence[float],
    max_tokens: int = 24,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    keep_going: Callable[[float, list[tuple[list[int], bool]]], bool] | None = None,
) -> KLCurve:
    """The KL curve of the ARM named ``arm`` of a loaded GuidedModel over ``prompts`` (text or token ids).
    ``keep_going(α, samples)`` sees the samples of each α (0 first: the base's) and ends the grid there when it
    says False; the curve then has the α measured so far."""
    engine = model.engine
    index = next((i for i, a in enumerate(engine.arms) if a.spec.matches(arm)), None)
    if index is None:
        raise InvalidOptionError(f"unknown ARM {arm!r}")
    token_prompts = [model.tokenize(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if not token_prompts or any(not p for p in token_prompts):
        raise InvalidOptionError("calibration needs at least one prompt, and no empty prompt")
    others = {a.name: 0.0 for a in engine.arms if a.name != engine.arms[index].name}
    sampled = []
    for alpha in [0.0, *alphas]:
        sampled.append(sample(model, token_prompts, {**others, engine.arms[index].name: alpha}, max_tokens, seed))
        if progress:
            progress(f"sampled {len(sampled[-1])} continuations at α = {alpha:g}")
        if keep_going is not None and not keep_going(alpha, sampled[-1]):
            break
    base_samples = sampled.pop(0)
    alphas = list(alphas)[: len(sampled)]
    guided = np.empty(engine.n_vocab, dtype=np.float32)
    base = np.empty(engine.n_vocab, dtype=np.float32)
    per_alpha: list[list[np.ndarray]] = [[] for _ in alphas]
    n_ctx = max(len(p) for p in token_prompts) + max_tokens + 1
    # Two scoring contexts of its own (the base's and the ARM's), beside the engine's loop: scoring reads given text,
    # it samples nothing.
    with engine.new_context(0, n_ctx) as base_context, engine.new_context(index + 1, n_ctx) as arm_context:
        contexts = (base_context, arm_context)
        # prompt by prompt, so each context decodes a prompt once and only the continuations after it
        for p, prompt in enumerate(token_prompts):
            for a, alpha in enumerate(alphas):
                continuation, ended = sampled[a][p]
                # rows after prompt[:-1] + each prefix: one per sampled token, and the end-of-sequence choice
                tokens = prompt + (continuation if ended else continuation[:-1])
                first = len(prompt) - 1
                if len(tokens) == first:
                    continue
                for context in contexts:
                    rows = context.decode_outputs(tokens, first)
                per_alpha[a].append(_position_kl(engine, index, alpha, rows, contexts, guided, base))
    per_token = [np.concatenate(kls) if kls else np.zeros(0) for kls in per_alpha]
    return KLCurve(
        alphas=list(alphas),
        kl=[float(k.mean()) if len(k) else 0.0 for k in per_token],
        tokens=[len(k) for k in per_token],
        per_token=per_token,
        samples=sampled,
        base_samples=base_samples,
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def calibrate(
    config: CalibrationConfig,
    prompts: Sequence[Prompt] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measure the ARM's fluency and KL curves against the base and recommend α (convert.write_calibration
    stores the result in the ARM's file). ``prompts`` (text or token ids) override config.prompts."""
    from ..core.api import GuidedModel
    from ..core.config import ArmSpec, LoadConfig
    from ..core.native import Model

    alphas = check_config(config)
    if prompts is None:
        prompts = read_prompts(config.prompts) if config.prompts else list(BUILTIN_PROMPTS)
    prompts = continued(prompts, config.samples, config.seed)
    if not prompts:
        raise InvalidOptionError("calibration needs at least one prompt")
    spec = ArmSpec.of(config.arm, alpha=1.0)
    base_path = LoadConfig(base=config.base).base_path()
    with Model(base_path, vocab_only=True) as vocab:
        n_ctx = max(len(vocab.tokenize(p)) if isinstance(p, str) else len(p) for p in prompts) + config.max_tokens
    if n_ctx > LoadConfig.n_ctx:
        raise InvalidOptionError(f"a calibration prompt + --max-tokens needs {n_ctx} tokens of context")
    load = LoadConfig(base=config.base, arms=(spec,), n_threads=config.n_threads, n_ctx=n_ctx, n_parallel=SLOTS)
    measured: dict[float, tuple[float, ...]] = {}  # α -> (distinct-2, rep-4, degenerate rate, empty replies)

    def keep_going(alpha: float, samples: list[tuple[list[int], bool]]) -> bool:
        if alpha == 0:  # the base's set of the shared seeds, and BASE_DRAWS - 1 more sets of their own seeds
            draws = [samples, *(base_draw(model, prompts, config, draw) for draw in range(1, BASE_DRAWS))]
            measured[0.0] = tuple(np.mean([fluency_of(model, d, texts) for d in draws], axis=0).tolist())
            return True
        measured[alpha] = distinct_2, rep_4, degenerate, empty = fluency_of(model, samples, texts)
        return min(slack([distinct_2], [rep_4], [degenerate], [empty], measured[0.0])[0]) >= 0

    with GuidedModel(config=load) as model:
        texts = [p if isinstance(p, str) else model.detokenize(p) for p in prompts]
        curve = measure_kl(model, spec.name, prompts, alphas, config.max_tokens, config.seed, progress, keep_going)
        base_name = model.engine.base_model.meta("general.name") or ""
    base = measured[0.0]
    distinct_2, rep_4, degenerate, empty = (tuple(measured[a][k] for a in curve.alphas) for k in range(4))
    return Calibration(
        alphas=tuple(curve.alphas),
        kl=tuple(curve.kl),
        tokens=tuple(curve.tokens),
        distinct_2=distinct_2,
        rep_4=rep_4,
        degenerate=degenerate,
        base_distinct_2=base[0],
        base_rep_4=base[1],
        base_degenerate=base[2],
        recommended_alpha=recommend_alpha(curve.alphas, slack(distinct_2, rep_4, degenerate, empty, base)),
        prompts=len({p if isinstance(p, str) else tuple(p) for p in prompts}),
        samples=len(prompts),
        base_name=base_name,
        base_file=base_path.name,
        base_sha256=file_sha256(base_path),
        max_tokens=config.max_tokens,
        seed=config.seed,
        empty=empty,
        base_empty=base[3],
        distinct_2_share=DISTINCT_2_SHARE,
    )


def sample(model, prompts: Sequence[Prompt], weights: dict, max_tokens: int, seed: int) -> list[tuple[list[int], bool]]:
    """Continuations of ``prompts``, sequence i seeded seed + i, as (tokens, whether it ended with end-of-sequence):
    no stop strings here, so a "stop" is EOS, whose position counts too (a choice like any other)."""
    results = model.generate_batch(prompts, weights=weights, max_tokens=max_tokens, seed=seed)
    return [(r.tokens, r.finish_reason == "stop") for r in results]


def base_draw(model, prompts: Sequence[Prompt], config: CalibrationConfig, draw: int) -> list[tuple[list[int], bool]]:
    """Set ``draw`` (≥ 1) of the base's own continuations of ``prompts``: sequence i seeded seed + draw·n + i, so no
    set shares a seed with another or with the guided sets (seed + i)."""
    off = {arm.name: 0.0 for arm in model.engine.arms}
    return sample(model, prompts, off, config.max_tokens, config.seed + draw * len(prompts))


def fluency_of(model, samples: Sequence[tuple[list[int], bool]], prompts: Sequence[str]) -> tuple[float, ...]:
    """(distinct-2, rep-4, degenerate rate, share of empty replies) of sampled continuations of ``prompts``, each
    judged as far as a reader gets it (fluency.reply: a chat reply ends at the next speaker's label, as chat stops
    it)."""
    from .fluency import fluency_summary, reply

    texts = [reply(model.detokenize(tokens), prompt) for (tokens, _), prompt in zip(samples, prompts, strict=True)]
    summary = fluency_summary(texts)
    return summary["distinct_2"], summary["rep_4"], summary["degenerate"], summary["empty"]


def curve_lines(calibration: Calibration) -> list[str]:
    """The calibration as a few lines of text: fluency and KL at each α, and the recommended α."""

    def empty(share: float | None) -> str:
        return f"{share:5.3f}" if share is not None else "    –"

    lines = ["       α   distinct-2   rep-4   degenerate   empty   KL (nats/token)",
             f"  {'base':>6}   {calibration.base_distinct_2:10.3f}   {calibration.base_rep_4:5.3f}   "
             f"{calibration.base_degenerate:10.3f}   {empty(calibration.base_empty)}"]  # fmt: skip
    shares = calibration.empty or [None] * len(calibration.alphas)
    rows = zip(calibration.alphas, calibration.distinct_2, calibration.rep_4, calibration.degenerate, shares,
               calibration.kl, calibration.fluent(), strict=True)  # fmt: skip
    for alpha, d2, r4, dg, share, kl, ok in rows:
        mark = "" if ok else "   less fluent: the grid stops here"
        lines.append(f"  {alpha:6.3g}   {d2:10.3f}   {r4:5.3f}   {dg:10.3f}   {empty(share)}   {kl:15.4f}{mark}")
    lines.append(
        f"recommended α {calibration.recommended_alpha:.3g}: the largest α whose text stays as fluent as the base's "
        f"({calibration.samples} continuations of {calibration.prompts} prompts × {calibration.max_tokens} tokens; "
        f"base {calibration.base_name or '?'}, {calibration.base_file})"
    )
    return lines
