"""An ARM's calibration as it travels in its GGUF file: the `genarm.calibration.*` metadata keys.

Calibration (measured by evaluation/calibration.py) samples continuations of a set of prompts from the base alone
and from the guided distribution at a grid of weights α, and records, at each α, the fluency of the guided text
against the base's (distinct-2, rep-4, degenerate rate, empty replies: evaluation/fluency.py) and, as a diagnostic,
the mean per-token KL(guided_α ‖ base). The recommended α, the weight an ARM given without one runs at, is the
largest α whose text stays as fluent as the base's (recommend_alpha): the effect grows with α, so that is the most
an ARM does without costing the reader anything. The record is written into the GGUF by convert.write_calibration
and read back here without loading the model; llama.cpp ignores keys it does not know, and its quantizer copies
them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CorruptModelError

PREFIX = "genarm.calibration."
VERSION = 3  # 1 chose α by a KL budget, 2 by fluency at grid points only: not read (calibrate the ARM again)

# What "as fluent as the base" means: guided samples add at most this much rep-4 (share of repeated word 4-grams
# per text, the bound the README's evaluations hold guided text to) and this much to the share of degenerate texts
# (one of calibration's 48 texts is 2 points: 10 leaves room for sampling noise and catches an ARM that breaks
# text), and keep this share of the base's distinct-2. Distinct-2 pools every text, so it falls as the corpus grows
# (an ARM's stock phrases recur across prompts): measured on 48 texts it reads higher than on an evaluation's 96
# (kind's 16-step ARM at α 0.358: 0.90×, 0.82× and 0.78× of the base's on 48, 96 and 192 texts), hence a stricter
# share than the evaluations' 0.8. At 0.85 calibration's crossing landed on the preference bench's 96 held-out texts
# at 0.76-0.90× the base's, two ARMs of six below 0.8, while these ARMs' effect had stopped growing well before their
# text gave way (kind's: 92%, 91% and 91% of replies warm at α 0.25, 0.3 and 0.358, distinct-2 0.84×, 0.81×,
# 0.795×): past that point more weight costs the reader and buys nothing, so the bound sits inside the bar, not on it.
DISTINCT_2_SHARE = 0.875
# the share of records that do not store theirs (calibrated before 0.875), whose recommended α was chosen with it
FORMER_DISTINCT_2_SHARE = 0.85
REP_4_MARGIN = 0.05
DEGENERATE_MARGIN = 0.1
# An empty reply (no word: a turn ended before it began) counts as degenerate, but it is not the noise the
# degenerate margin makes room for: the base gives one rarely (its end-of-turn token is ~e^-8 of its top token after
# "Assistant:"), while an ARM that learned "answer briefly" raises it to 5-20% past some weight, and the 10 points let
# brief's 16-step ARM through at α 2.34, where 11% of its held-out replies were empty (README, "Your own
# preference"). So empty replies have their own bound: one text of calibration's 48 above the base's share passes,
# two do not.
EMPTY_MARGIN = 0.03


@dataclass(frozen=True)
class Calibration:
    """One ARM's fluency and KL curves against one base, and the weight they recommend."""

    alphas: tuple[float, ...]  # the weights measured, increasing: the grid up to its first point outside a bound
    kl: tuple[float, ...]  # mean per-token KL(guided_α ‖ base) in nats at each α
    tokens: tuple[int, ...]  # sampled continuation tokens the mean is over, at each α
    distinct_2: tuple[float, ...]  # of the guided continuations at each α (all of them together)
    rep_4: tuple[float, ...]  # mean share of repeated word 4-grams per continuation, at each α
    degenerate: tuple[float, ...]  # share of degenerate continuations, at each α
    base_distinct_2: float  # the same three of the base's own continuations (the mean over calibration.BASE_DRAWS sets)
    base_rep_4: float
    base_degenerate: float
    recommended_alpha: float
    prompts: int  # calibration prompts
    samples: int  # continuations sampled at each α (each prompt continued as often, or as near as can be)
    base_name: str  # general.name of the base it was measured on
    base_file: str  # the base's file name
    base_sha256: str  # of the base's file: which base, exactly
    max_tokens: int  # tokens sampled per continuation
    seed: int
    # share of empty replies at each α, and the base's: None in a record from before they were measured (no bound)
    empty: tuple[float, ...] | None = None
    base_empty: float | None = None
    # the distinct-2 bound the record was judged by: None in a record from before it was stored (FORMER_...)
    distinct_2_share: float | None = None

    def kl_at(self, alpha: float) -> float:
        """The KL the curve gives at ``alpha`` (interpolated between grid points)."""
        return interpolate_kl(self.alphas, self.kl, alpha)

    def fluent(self) -> list[bool]:
        """Whether the guided text at each α of the grid is as fluent as the base's."""
        return [min(s) >= 0 for s in self.slack()]

    def slack(self) -> list[tuple[float, ...]]:
        """Per α of the grid: how far each fluency measure is inside its bound (negative: outside)."""
        # a record from before empty replies were measured counts none (their bound never binds), and one from
        # before the share was stored is judged by the share its α was chosen with
        empty = self.empty or (0.0,) * len(self.alphas)
        base = (self.base_distinct_2, self.base_rep_4, self.base_degenerate, self.base_empty or 0.0)
        share = self.distinct_2_share or FORMER_DISTINCT_2_SHARE
        return slack(self.distinct_2, self.rep_4, self.degenerate, empty, base, share)


def slack(
    distinct_2: Sequence[float],
    rep_4: Sequence[float],
    degenerate: Sequence[float],
    empty: Sequence[float],
    base: tuple[float, float, float, float],
    share: float = DISTINCT_2_SHARE,
) -> list[tuple[float, float, float, float]]:
    """Per grid point, (distinct-2 / the base's − ``share`` (DISTINCT_2_SHARE), the base's rep-4 + REP_4_MARGIN −
    rep-4, the base's degenerate rate + DEGENERATE_MARGIN − degenerate rate, the base's share of empty replies +
    EMPTY_MARGIN − the share of empty replies): all ≥ 0 where the text is as fluent as the base's. ``base`` holds
    the base's four measures in that order."""
    base_distinct_2, base_rep_4, base_degenerate, base_empty = base
    return [
        (d2 / max(base_distinct_2, 1e-9) - share, base_rep_4 + REP_4_MARGIN - r4,
         base_degenerate + DEGENERATE_MARGIN + 1e-9 - dg, base_empty + EMPTY_MARGIN + 1e-9 - e)
        for d2, r4, dg, e in zip(distinct_2, rep_4, degenerate, empty, strict=True)
    ]  # fmt: skip


def recommend_alpha(
    alphas: Sequence[float], slacks: Sequence[tuple[float, ...]], share: float = DISTINCT_2_SHARE
) -> float:
    """The largest α whose guided text is as fluent as the base's: walking up the grid from α = 0 (the base itself,
    inside every bound), the first grid point outside a bound ends the walk, and the α where that measure crossed
    its bound is interpolated linearly from the point before; the grid's largest α when every point is inside."""
    previous_alpha, previous = 0.0, [1.0 - share, REP_4_MARGIN, DEGENERATE_MARGIN, EMPTY_MARGIN]
    for alpha, current in sorted(zip(alphas, slacks, strict=True)):
        if min(current) < 0:
            crossings = [p / (p - c) for p, c in zip(previous, current, strict=True) if c < 0]
            return previous_alpha + min(crossings) * (alpha - previous_alpha)
        previous_alpha, previous = alpha, list(current)
    return previous_alpha


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
    "samples": "u32",
    "base.name": "str",
    "base.file": "str",
    "base.sha256": "str",
    "max_tokens": "u32",
    "seed": "u32",
}
# keys a record may lack (written since; an older record without them is read with None)
OPTIONAL_FIELDS = {"empty": "f32[]", "base.empty": "f32", "distinct_2_share": "f32"}
_PARSE = {"f32[]": lambda v: tuple(map(float, v)), "u32[]": lambda v: tuple(map(int, v)), "f32": float, "u32": int}


def calibration_fields(calibration: Calibration) -> dict[str, tuple[object, str]]:
    """key -> (value, GGUF value kind: "f32", "u32", "str", "f32[]" or "u32[]") of a calibration record."""
    fields = {PREFIX + "version": (VERSION, "u32")}
    for name, kind in {**FIELDS, **OPTIONAL_FIELDS}.items():
        value = getattr(calibration, name.replace(".", "_"))
        if value is not None:
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
        values.update({name.replace(".", "_"): _PARSE[kind](fields[PREFIX + name])
                       for name, kind in OPTIONAL_FIELDS.items() if PREFIX + name in fields})  # fmt: skip
        return Calibration(**values)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptModelError(f"{path}: incomplete {PREFIX}* metadata ({exc}); calibrate the ARM again") from exc
