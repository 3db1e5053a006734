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
    eval: dict[str, float]  # final held-out loss, accuracy, margin (empty without an eval split)
    export: Path | None
    seconds: float
    calibration: Calibration | None = None  # of the exported ARM (also stored in its GGUF)
    notes: list[str] = field(default_factory=list)  # warnings for the report


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
        train_pairs, eval_pairs = split(pairs, config.eval_split, config.seed)
        run.setup(train_pairs, eval_pairs)
        run.loop(on_step)
        final = run.evaluate() if eval_pairs else {}
        if final:
            run.log({"step": run.step, **{f"eval_{k}": v for k, v in final.items()}})
        run.save_adapter()
        calibration = None
        if export is not None:
            run.export(export)
            if config.calibrate:
                calibration = _calibrate(config, export, train_pairs + eval_pairs, notify)
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


# An ARM whose budget is spent below this weight moves the base far per unit of α: its training overshot.
EXTREME_ALPHA = 0.1


def _calibrate(config: TrainConfig, export: Path, pairs: list, notify) -> Calibration | None:
    """Calibrate the exported ARM on the training prompts against the GGUF base and store the result in it."""
    from ..convert import write_calibration
    from ..evaluation.calibration import CalibrationConfig, calibrate

    base = Path(config.model)
    if not base.is_file():
        notify(
            f"not calibrated: the base {base} is not a GGUF file; run genarm-local calibrate {export} --base BASE.gguf"
        )
        return None
    notify(f"calibrating {export.name} on the training prompts")
    settings = CalibrationConfig(arm=str(export), base=str(base), seed=config.seed)
    calibration = calibrate(settings, prompts=[pair.prompt for pair in pairs])
    write_calibration(export, calibration)
    return calibration


def warnings(final: dict[str, float], calibration: Calibration | None) -> list[str]:
    notes = []
    if calibration is not None and calibration.recommended_alpha < EXTREME_ALPHA:
        notes.append(
            f"extreme ARM: its KL budget is spent at α = {calibration.recommended_alpha:.3g} (α = 1 moves the base "
            f"{calibration.kl_at(1.0):.2f} nats/token); train fewer steps or on more varied pairs"
        )
    if calibration is not None and calibration.recommended_alpha >= max(calibration.alphas):
        notes.append(
            f"weak ARM: even α = {max(calibration.alphas):g} stays within the KL budget; it may have learned little"
        )
    if final and final.get("accuracy", 1.0) < 0.6:
        notes.append(f"held-out accuracy {final['accuracy']:.2f}: the ARM barely separates the held-out pairs")
    return notes
