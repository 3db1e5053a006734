"""Show, don't tell: a few prompts continued by the base alone and guided by an ARM, side by side, as
`genarm-local demo` prints them. `train` ends with some of its held-out prompts, `calibrate` with some of its
calibration prompts, both at the ARM's recommended α.

Both continuations of a prompt sample with the same seed and the product's default sampling (what `chat` does), so
what differs between them is the ARM.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.config import ArmSpec, LoadConfig

MAX_TOKENS = 40  # a sentence or two: enough to see the ARM at work, short enough for one screen

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class SideBySide:
    prompt: str  # the prompt as shown (the one generated from may be token ids: a chat-template rendering)
    base: str  # the base's continuation
    guided: str  # the continuation guided by the ARM


def side_by_side(
    model,
    arm: str,
    alpha: float,
    prompts: Sequence[Prompt],
    shown: Sequence[str] | None = None,
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
) -> list[SideBySide]:
    """Continue each of ``prompts`` (text, or token ids) with a loaded GuidedModel twice: the base alone (every ARM
    at α = 0) and guided by the ARM named ``arm`` at ``alpha``. ``shown``: the prompts as the result shows them
    (default: the text, or the token ids detokenized)."""
    off = {name: 0.0 for name in model.arm_weights()}
    base, guided = (
        model.generate_batch(prompts, weights={**off, arm: weight}, max_tokens=max_tokens, seed=seed)
        for weight in (0.0, alpha)
    )
    if shown is None:
        shown = [p if isinstance(p, str) else model.detokenize(p) for p in prompts]
    return [SideBySide(text, b.text, g.text) for text, b, g in zip(shown, base, guided, strict=True)]


def show(
    base: str | os.PathLike | None,
    arm: str | os.PathLike,
    alpha: float,
    prompts: Sequence[Prompt],
    shown: Sequence[str] | None = None,
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
    n_threads: int | None = None,
) -> list[SideBySide]:
    """side_by_side on the base GGUF (None: the embedded one) with the ARM file (or shipped name) loaded over it."""
    from ..core.api import GuidedModel

    spec = ArmSpec.of(arm, alpha=alpha)
    load = LoadConfig(base=None if base is None else str(base), arms=(spec,), n_threads=n_threads)
    with GuidedModel(config=load) as model:
        return side_by_side(model, spec.name, alpha, prompts, shown, max_tokens, seed)


def sample_lines(samples: Sequence[SideBySide], alpha: float, width: int = 100) -> list[str]:
    """Each prompt (its end, if long) on a line of its own, then the base's and the guided continuation, whitespace
    collapsed and wrapped under their labels."""
    labels = ("base", f"α={alpha:.2g}")
    label_width = max(map(len, labels))
    indent = " " * (label_width + 4)
    lines = []
    for sample in samples:
        prompt = " ".join(sample.prompt.split())
        room = max(20, width - 2)
        lines.append((prompt if len(prompt) <= room else "…" + prompt[len(prompt) - room + 1 :]) + " …")
        for label, text in zip(labels, (sample.base, sample.guided), strict=True):
            wrapped = textwrap.wrap(" ".join(text.split()), max(20, width - len(indent))) or ["(nothing: it ended)"]
            lines.append(f"  {label:<{label_width}}  {wrapped[0]}")
            lines += [indent + rest for rest in wrapped[1:]]
    return lines
