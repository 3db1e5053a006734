"""`train()`: an ARM (a LoRA adapter over the base) from preference pairs with the GenARM loss.

Checks the settings and the data before anything slow, then hands over to run.Run (torch, transformers, peft).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.arm_metadata import Calibration
from ..core.atomic import check_output
from ..core.config import resolve_base
from ..core.errors import InputNotFoundError, InvalidOptionError, OutputExistsError, require
from ..evaluation.showcase import SideBySide
from .config import TrainConfig, split, validate
from .data import load_preferences


@dataclass
class TrainResult:
    output: Path  # OUT_DIR, holding the PEFT adapter (adapter_config.json, adapter_model.safetensors)
    log: Path  # train_log.jsonl: one JSON object per optimizer step and per evaluation
    steps: int  # optimizer steps of the whole run (including those before a resume)
    train_pairs: int
    eval_pairs: int
    skipped: dict[str, int]  # reason -> rows skipped
    eval: dict[str, float]  # held-out loss, accuracy, margin of the weights kept (empty without an eval split)
    export: Path | None
    seconds: float
    calibration: Calibration | None = None  # of the exported ARM (also stored in its GGUF)
    notes: list[str] = field(default_factory=list)  # warnings for the report
    # the steps planned (--epochs and --min-steps, or --max-steps); more than ``steps`` if it stopped early
    total_steps: int = 0
    selected_step: int = 0  # whose weights were saved and exported (TrainConfig.select)
    select: str = "best"  # "last" too when there was no held-out pair to choose by
    # why it stopped before the last step (TrainConfig.early_stopping_patience): "loss" (no lower held-out loss);
    # None: it took every step
    stopped_early: str | None = None
    evaluations: list[dict] = field(default_factory=list)  # every held-out evaluation: step, loss, accuracy, ...
    samples: list[SideBySide] = field(default_factory=list)  # held-out prompts: base vs guided at the recommended α


def train(config: TrainConfig, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an ARM as configured; ``on_step`` gets each optimizer step's metrics (the train_log.jsonl record)."""
    started = time.perf_counter()
    validate(config)
    if config.model is None:
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
    from .run import Run

    with Run(config, output, notify) as run:
        pairs = run.load_base(data)
        if data.skipped:
            notify(f"skipped rows: {', '.join(f'{n} {reason}' for reason, n in data.skipped.items())}")
        train_index, eval_index = split(list(range(len(pairs))), config.eval_split, config.seed)
        train_pairs, eval_pairs = [pairs[i] for i in train_index], [pairs[i] for i in eval_index]
        run.setup(train_pairs, eval_pairs)
        run.loop(on_step)
        kept = run.keep_selected()
        evaluations = run.selection.evaluations
        final = next(({k: v for k, v in e.items() if k != "step"} for e in evaluations if e["step"] == kept), {})
        run.save_adapter()
        calibration, samples = None, []
        if export is not None:
            run.export(export)
            if config.calibrate:
                where = "held-out" if eval_pairs else "training"
                calibration = _calibrate(config, export, eval_pairs or train_pairs, where, notify)
            if calibration is not None and config.show:
                shown = eval_index or train_index
                samples = _show(config, export, calibration.recommended_alpha, [data.pairs[i] for i in shown],
                                [pairs[i] for i in shown], notify)  # fmt: skip
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
            calibration=calibration,
            notes=warnings(final, calibration),
            total_steps=run.total,
            selected_step=kept,
            select=run.selection.select,
            stopped_early=run.stopped_early,
            evaluations=list(evaluations),
            samples=samples,
        )


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


# An ARM that moves its base less than this far (KL, nats/token) at the grid's largest α has learned little.
WEAK_KL = 0.05


def _calibrate(config: TrainConfig, export: Path, pairs: list, where: str, notify) -> Calibration | None:
    """Calibrate the exported ARM on the prompts of ``pairs`` (``where``: the held-out ones, else the training
    ones) against the GGUF base and store the result in it. Held out, because the ARM is used on prompts it was not
    trained on: on its training prompts it repeats the responses it learned, which reads as less fluent than on new
    prompts where they share a phrase (sky's "... turned orange and pink": recommended α 0.146 there, 0.234 on
    held-out prompts) and as more fluent where they are short and distinct (brief's: α 2.07, where new prompts'
    text has distinct-2 0.74× the base's; README, "Your own preference")."""
    from ..convert import write_calibration
    from ..evaluation.calibration import CalibrationConfig, calibrate

    base = Path(config.model)
    if not base.is_file():
        notify(
            f"not calibrated: the base {base} is not a GGUF file; run genarm-local calibrate {export} --base BASE.gguf"
        )
        return None
    notify(f"calibrating {export.name} on the {where} prompts")
    settings = CalibrationConfig(arm=str(export), base=str(base), seed=config.seed)
    calibration = calibrate(settings, prompts=[pair.prompt for pair in pairs])
    write_calibration(export, calibration)
    return calibration


def _show(config: TrainConfig, export: Path, alpha: float, rows: list, pairs: list, notify) -> list[SideBySide]:
    """The first config.show distinct prompts of ``pairs`` (the held-out ones, else the training ones), as token ids
    rendered as in training, continued by the base alone and guided by the exported ARM at ``alpha``; each shown as
    its row's text (a chat prompt: its last message)."""
    from ..evaluation.showcase import show

    chosen: dict[tuple[int, ...], str] = {}
    for row, pair in zip(rows, pairs, strict=True):
        if len(chosen) < config.show:
            chosen.setdefault(
                tuple(pair.prompt), row.prompt if isinstance(row.prompt, str) else row.prompt[-1]["content"]
            )
    notify(f"continuing {len(chosen)} prompts with the base alone and guided at α = {alpha:.3g}")
    return show(config.model, export, alpha, [list(p) for p in chosen], list(chosen.values()), seed=config.seed)


def warnings(final: dict[str, float], calibration: Calibration | None) -> list[str]:
    # No warning for a sharp ARM whose text leaves the base's fluency before the grid's first α: it works at its
    # weight (kind's 48-step ARM at α 0.197 warmed 91% of held-out replies, README "Your own preference"), and
    # with the stricter distinct-2 share a 16-step ARM that warmed 88% at α 0.243 was told it had overshot.
    notes = []
    if calibration is not None and calibration.kl[-1] < WEAK_KL:
        notes.append(
            f"weak ARM: even α = {max(calibration.alphas):g} moves the base only {calibration.kl[-1]:.3f} nats/token; "
            "it may have learned little"
        )
    if final and final.get("accuracy", 1.0) < 0.6:
        notes.append(f"held-out accuracy {final['accuracy']:.2f}: the ARM barely separates the held-out pairs")
    return notes
