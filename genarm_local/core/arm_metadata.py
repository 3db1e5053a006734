"""An ARM's calibration as it travels in its GGUF file: the `genarm.calibration.*` metadata keys.

Calibration (measured by evaluation/calibration.py) samples continuations of a set of prompts from the base alone
and from the guided distribution at a grid of weights α, and records, at each α, the fluency of the guided text
against the base's (distinct-2, rep-4, degenerate rate: evaluation/fluency.py) and, as a diagnostic, the mean
per-token KL(guided_α ‖ base). The recommended α, the weight an ARM given without one runs at, is the largest α of
the grid whose text, and the text at every smaller α, stays as fluent as the base's (recommend_alpha): an ARM has
the most effect there without costing the reader anything. The record is written into the GGUF by
convert.write_calibration and read back here without loading the model; llama.cpp ignores keys it does not know,
and its quantizer copies them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CorruptModelError

PREFIX = "genarm.calibration."
VERSION = 2  # 1 chose α by a KL budget: such a record is not read (calibrate the ARM again)

# What "as fluent as the base" means (the bounds the README's evaluations hold guided text to): guided samples keep
# this share of the base's distinct-2, add at most this much rep-4 (share of repeated word 4-grams) and this much to
# the share of degenerate continuations.
DISTINCT_2_SHARE = 0.8
REP_4_MARGIN = 0.05
DEGENERATE_MARGIN = 0.05


@dataclass(frozen=True)
class Calibration:
    """One ARM's fluency and KL curves against one base, and the weight they recommend."""

    alphas: tuple[float, ...]  # the grid of weights, increasing
    kl: tuple[float, ...]  # mean per-token KL(guided_α ‖ base) in nats at each α
    tokens: tuple[int, ...]  # sampled continuation tokens the mean is over, at each α
    distinct_2: tuple[float, ...]  # of the guided continuations at each α (all of them together)
    rep_4: tuple[float, ...]  # mean share of repeated word 4-grams per continuation, at each α
    degenerate: tuple[float, ...]  # share of degenerate continuations, at each α
    base_distinct_2: float  # the same three of the base's own continuations
    base_rep_4: float
    base_degenerate: float
    recommended_alpha: float
    prompts: int  # calibration prompts
    base_name: str  # general.name of the base it was measured on
    base_file: str  # the base's file name
    base_sha256: str  # of the base's file: which base, exactly
    max_tokens: int  # tokens sampled per continuation
    seed: int

    def kl_at(self, alpha: float) -> float:
        """The KL the curve gives at ``alpha`` (interpolated between grid points)."""
        return interpolate_kl(self.alphas, self.kl, alpha)

    def fluent(self) -> list[bool]:
        """Whether the guided text at each α of the grid is as fluent as the base's."""
        return fluent(self.distinct_2, self.rep_4, self.degenerate,
                      (self.base_distinct_2, self.base_rep_4, self.base_degenerate))  # fmt: skip


def fluent(
    distinct_2: Sequence[float], rep_4: Sequence[float], degenerate: Sequence[float], base: tuple[float, float, float]
) -> list[bool]:
    """Per grid point: distinct-2 ≥ DISTINCT_2_SHARE × the base's, rep-4 ≤ the base's + REP_4_MARGIN, degenerate
    rate ≤ the base's + DEGENERATE_MARGIN."""
    base_distinct_2, base_rep_4, base_degenerate = base
    return [
        d2 >= DISTINCT_2_SHARE * base_distinct_2 and r4 <= base_rep_4 + REP_4_MARGIN
        and dg <= base_degenerate + DEGENERATE_MARGIN + 1e-9
        for d2, r4, dg in zip(distinct_2, rep_4, degenerate, strict=True)
    ]  # fmt: skip


def recommend_alpha(alphas: Sequence[float], fluent_at: Sequence[bool]) -> float:
    """The largest α of the grid whose guided text, and that at every smaller α, is fluent (``fluent_at``, in
    grid order); 0 when the smallest already is not (the ARM is then too sharp to run without a weight given)."""
    recommended = 0.0
    for alpha, ok in sorted(zip(alphas, fluent_at, strict=True)):
        if not ok:
            break
        recommended = alpha
    return recommended


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


# key (after PREFIX) -> GGUF value kind; the Calibration field is the key with "." as "_"
FIELDS = {
    "alphas": "f32[]",
    "kl": "f32[]",
    "tokens": "u32[]",
    "distinct_2": "f32[]",
    "rep_4": "f32[]",
    "degenerate": "f32[]",
    "base.distinct_2": "f32",
    "base.rep_4": "f32",
    "base.degenerate": "f32",
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
