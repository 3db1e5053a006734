"""An ARM's calibration as it travels in its GGUF file: the `genarm.calibration.*` metadata keys.

Calibration (measured by evaluation/calibration.py) says how far an ARM moves its base: the mean per-token
KL(guided_α ‖ base) on continuations sampled from the guided distribution, for a grid of weights α, and the
largest α whose KL stays within a budget — the weight an ARM given without one runs at. The record is written
into the GGUF by convert.write_calibration and read back here without loading the model; llama.cpp ignores keys
it does not know, and its quantizer copies them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CorruptModelError

PREFIX = "genarm.calibration."
VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """One ARM's KL curve against one base, and the weight recommended for a KL budget."""

    alphas: tuple[float, ...]  # the grid of weights, increasing
    kl: tuple[float, ...]  # mean per-token KL(guided_α ‖ base) in nats at each α
    tokens: tuple[int, ...]  # sampled continuation tokens the mean is over, at each α
    budget: float  # the KL the recommended α spends (nats per token)
    recommended_alpha: float
    prompts: int  # calibration prompts
    base_name: str  # general.name of the base it was measured on
    base_file: str  # the base's file name
    base_sha256: str  # of the base's file: which base, exactly
    max_tokens: int  # tokens sampled per continuation
    seed: int

    def kl_at(self, alpha: float) -> float:
        """The KL the curve gives at ``alpha`` (interpolated like the recommendation)."""
        return interpolate_kl(self.alphas, self.kl, alpha)


def interpolate_kl(alphas: Sequence[float], kl: Sequence[float], alpha: float) -> float:
    """KL at ``alpha`` from the measured curve: linear in log-log between grid points (KL grows like α² near 0,
    so a power law is the natural local model), and the power law through the first point below the grid."""
    alpha = abs(alpha)
    if alpha == 0:
        return 0.0
    points = [(a, k) for a, k in zip(alphas, kl, strict=True) if a > 0 and k > 0]
    if not points:
        return 0.0
    if alpha <= points[0][0]:
        return points[0][1] * (alpha / points[0][0]) ** 2
    for (a0, k0), (a1, k1) in zip(points, points[1:], strict=False):
        if alpha <= a1:
            t = (math.log(alpha) - math.log(a0)) / (math.log(a1) - math.log(a0))
            return math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0)))
    return points[-1][1]


def recommend_alpha(alphas: Sequence[float], kl: Sequence[float], budget: float) -> float:
    """The largest α whose KL stays within ``budget``: the first crossing of the curve, interpolated in log-log
    between grid points; below the grid by the α² law through the first point; the largest grid α when the whole
    curve stays within the budget (the ARM moves its base little, guidance is capped at the measured range)."""
    points = [(a, max(k, 1e-12)) for a, k in zip(alphas, kl, strict=True) if a > 0]
    if not points:
        return 0.0
    a0, k0 = points[0]
    if k0 > budget:
        return a0 * math.sqrt(budget / k0)
    for (a0, k0), (a1, k1) in zip(points, points[1:], strict=False):
        if k1 > budget:
            t = (math.log(budget) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return math.exp(math.log(a0) + t * (math.log(a1) - math.log(a0)))
    return points[-1][0]


# key (after PREFIX) -> GGUF value kind; the Calibration field is the key with "." as "_"
FIELDS = {
    "alphas": "f32[]",
    "kl": "f32[]",
    "tokens": "u32[]",
    "budget": "f32",
    "recommended_alpha": "f32",
    "prompts": "u32",
    "base.name": "str",
    "base.file": "str",
    "base.sha256": "str",
    "max_tokens": "u32",
    "seed": "u32",
}
_PARSE = {"f32[]": lambda v: tuple(map(float, v)), "u32[]": lambda v: tuple(map(int, v)), "f32": float, "u32": int}


def calibration_fields(calibration: Calibration) -> dict[str, tuple[object, str]]:
    """key -> (value, GGUF value kind: "f32", "u32", "str", "f32[]" or "u32[]") of a calibration record."""
    fields = {PREFIX + "version": (VERSION, "u32")}
    for name, kind in FIELDS.items():
        value = getattr(calibration, name.replace(".", "_"))
        fields[PREFIX + name] = (list(value) if kind.endswith("[]") else value, kind)
    return fields


def read_calibration(path: str | os.PathLike) -> Calibration | None:
    """The calibration stored in a GGUF file, or None if it has none (or one of a format we do not know)."""
    from .gguf_metadata import read_metadata
    from .native import check_gguf_path

    path = check_gguf_path(path)
    fields = read_metadata(path, lambda key: key.startswith(PREFIX))
    if fields.get(PREFIX + "version") != VERSION:
        return None
    try:
        values = {name.replace(".", "_"): _PARSE.get(kind, str)(fields[PREFIX + name]) for name, kind in FIELDS.items()}
        return Calibration(**values)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptModelError(f"{path}: incomplete {PREFIX}* metadata ({exc}); calibrate the ARM again") from exc
