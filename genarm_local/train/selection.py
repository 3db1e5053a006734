"""Which weights a training run keeps, and when it stops, from held-out evaluations every few steps.

Kept: the weights of the evaluation with the lowest held-out loss of the training objective (Hugging Face Trainer's
load_best_model_at_end with metric_for_best_model "loss"); accuracy and margin cannot choose, as on an easy task
the accuracy is 1.0 after a few steps and the margin grows with every step.

Stopped (patience N, Hugging Face's EarlyStoppingCallback in spirit) after N evaluations in a row without a lower
held-out loss: the ARM has stopped generalizing (it memorizes its training pairs).

Saturation — held-out accuracy 1.0 from some evaluation on — is reported, not a stop. When every pair is separable
the Bradley-Terry loss has no finite minimum, so it keeps falling while the ARM grows sharper (IPO, Azar et al. 2023,
section 4.2), but a sharp ARM is not a broken one: calibration gives it a smaller recommended α. Measured on the
README's preference tasks (48 pairs, 8 held out, whose accuracy is 1.0 after a step or two): stopping at 3
evaluations at 1.0 ended the kind task's default run at step 6 of 16 (held-out margin β·Δ 3.3), whose ARM raised
warm continuations from 62% to 71% at its recommended α; trained on to step 18 (margin 10.2), 90%.

No torch here: the run passes in a function that snapshots its LoRA weights, taken only when the loss improves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Evaluations a run gets by default (--eval-every unset): several even on a 5-step run (then every step).
EVALUATIONS = 8


def eval_interval(eval_every: int | None, total: int) -> int:
    """Optimizer steps between held-out evaluations (0: only after the last step)."""
    if eval_every is None:
        return max(1, math.ceil(total / EVALUATIONS))
    return eval_every


def _ordered(loss: float) -> float:
    return loss if not math.isnan(loss) else math.inf  # a NaN loss is never the best


@dataclass
class Selection:
    """The held-out evaluations of a run so far, the best of them (lowest loss) with its weights, and how many
    evaluations have passed since. Saved in every checkpoint, so a resumed run keeps what an uninterrupted one
    would."""

    select: str  # "best" or "last" (TrainConfig.select)
    patience: int  # evaluations without a lower loss before the run stops (0: never)
    evaluations: list[dict] = field(default_factory=list)  # {"step", "loss", "accuracy", "margin", ...}
    best_step: int | None = None
    best_weights: dict | None = None  # parameter name -> tensor, when select == "best"
    since_best: int = 0  # evaluations since the best

    def update(self, step: int, metrics: Mapping[str, float], snapshot: Callable[[], dict]) -> str | None:
        """Record the evaluation after ``step``; snapshot the weights if its loss is the lowest so far. When the
        patience has run out, why ("loss": no lower loss); then stop training."""
        self.evaluations.append({"step": step, **metrics})
        best = self.best
        if best is None or _ordered(metrics["loss"]) < _ordered(best["loss"]):
            self.best_step, self.since_best = step, 0
            if self.select == "best":
                self.best_weights = snapshot()
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            return "loss"
        return None

    @property
    def best(self) -> dict | None:
        return next((e for e in self.evaluations if e["step"] == self.best_step), None)

    def state_dict(self) -> dict:
        return {
            "evaluations": self.evaluations,
            "best_step": self.best_step,
            "best_weights": self.best_weights,
            "since_best": self.since_best,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluations = list(state["evaluations"])
        self.best_step, self.best_weights = state["best_step"], state["best_weights"]
        self.since_best = state["since_best"]


def saturation(evaluations: Sequence[Mapping]) -> dict | None:
    """The first evaluation from which the held-out accuracy is 1.0 at every later one, if a later one exists."""
    first = None
    for evaluation in evaluations:
        if evaluation["accuracy"] < 1.0:
            first = None
        elif first is None:
            first = evaluation
    return first if first is not None and first is not evaluations[-1] else None


def summary(
    evaluations: Sequence[Mapping], kept: int, steps: int, total: int, select: str, stop: str | None
) -> list[str]:
    """What the selection did, in a line or two for the report: which step's weights were kept and why, why the run
    stopped early (``stop``: Selection.update's reason) and where the held-out accuracy saturated."""
    if not evaluations:
        return []
    best = min(evaluations, key=lambda e: _ordered(e["loss"]))
    saturated = saturation(evaluations)
    stopped = f"stopped at step {steps} of {total}"
    if stop == "loss":
        return [
            f"held-out loss stopped improving at step {best['step']} ({best['loss']:.4f}): {stopped}, kept step {kept}"
        ]
    lines = []
    if saturated is not None:
        lines.append(
            f"held-out accuracy 1.00 from step {saturated['step']}: saturated; margin β·Δ {saturated['margin']:.2f} "
            f"there, {evaluations[-1]['margin']:.2f} at step {evaluations[-1]['step']}"
        )
    if select == "last":
        lines.append(f"kept the last step, {kept} (--select last; lowest held-out loss at step {best['step']})")
    elif kept < steps:
        lines.append(f"held-out loss lowest at step {kept} ({best['loss']:.4f}) of {steps}: kept step {kept}")
    else:
        lines.append(f"held-out loss lowest at the last step, {kept}: kept it")
    return lines
