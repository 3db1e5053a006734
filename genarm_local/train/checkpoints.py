"""Checkpoints of a training run (OUT_DIR/checkpoints/step-NNNNNNNN.pt) and the log they go with.

A checkpoint holds everything a resumed run needs to take the steps, and keep the weights, of an uninterrupted one
(run.Run.save_checkpoint lists it: adapter, optimizer, schedule, RNG and the best-weights selection). Each is
written to a temporary file and renamed, so a kill at any moment leaves the previous ones intact; a resume checks
that the checkpoint was made by the same run (settings and data) before it continues.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..core.atomic import atomic_output
from ..core.errors import InvalidOptionError
from .config import TrainConfig, margin_or_off

# Settings that define the optimization and which weights it keeps; a resume with any of them changed would be a
# different run.
RUN_SETTINGS = (
    "beta",
    "gamma",
    "label_smoothing",
    "anchor",
    "anchor_over_base",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "lr",
    "warmup",
    "weight_decay",
    "max_grad_norm",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "max_length",
    "max_prompt_length",
    "seed",
    "eval_split",
    "eval_every",
    "select",
    "early_stopping_patience",
)
# Settings whose default has changed since they were added, with the default they had then: what a checkpoint made
# before they existed ran with (anchor_over_base: the plain anchor until 2 became the default).
DEFAULTS_WHEN_ADDED = {"anchor_over_base": None}
KEEP_CHECKPOINTS = 2


def save(directory: Path, state: dict) -> Path:
    """``state`` (with its "step") as the newest checkpoint in ``directory``; only the last KEEP_CHECKPOINTS stay."""
    directory.mkdir(exist_ok=True)
    path = directory / f"step-{state['step']:08d}.pt"
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)
    for old in sorted(directory.glob("step-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def latest(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``directory`` and its state, if there is one."""
    path = max(directory.glob("step-*.pt"), default=None) if directory.is_dir() else None
    if path is None:
        return None
    for stale in directory.glob(".step-*.tmp"):  # a kill during a save leaves its temporary file
        stale.unlink()
    return path, torch.load(path, map_location="cpu", weights_only=True)


def check_same_run(path: Path, state: dict, settings: dict, data_hash: str) -> None:
    """Refuse to resume from a checkpoint of another run: other settings, other data, or an older version's."""
    if "selection" not in state:
        raise InvalidOptionError(f"{path} was made by an older version of genarm-local; start over with --force")
    # A setting added since the checkpoint was made had its default then: today's, or the one it had when added.
    made = {**{k: getattr(TrainConfig, k) for k in RUN_SETTINGS}, **DEFAULTS_WHEN_ADDED, **state["settings"]}
    changed = [k for k in RUN_SETTINGS if made.get(k) != settings[k]]
    if changed:
        name = changed[0]
        raise InvalidOptionError(
            f"{path} was made with --{name.replace('_', '-')} {spelled(name, made.get(name))}, not "
            f"{spelled(name, settings[name])}; resume with the same settings, or start over with --force"
        )
    if state["data"] != data_hash:
        raise InvalidOptionError(f"{path} was made with different preference data; start over with --force")


def spelled(name: str, value):
    """A setting's value as its flag takes it: None is "off" where the flag reads "off" (--anchor-over-base)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return "off" if value is None and field.metadata.get("type") is margin_or_off else value


def trim_log(log_path: Path, step: int) -> None:
    """Drop the log records of steps after ``step`` (the checkpoint's: they are about to be trained again) and a
    line torn by a kill mid-write."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").split("\n"):  # not splitlines: U+2028 is no newline
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    with atomic_output(log_path, force=True) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")
