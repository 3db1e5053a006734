"""The GenARM guidance step on one row of float32 logits: the guided logits, and their log-probabilities.

The arithmetic runs in the C extension genarm_local.core._fused (kernels/mix.c, with its Python face kernels/fused.c)
with the GIL released; this module documents the formulas, resolves rows to addresses, checks the arguments and turns
the kernel's errors into genarm_local.core.errors classes. The float64 numpy reference it is tested against lives in
tests/core/test_kernel.py.
"""

from __future__ import annotations

import ctypes
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _fused
from .errors import InvalidOptionError, NumericalError

# A row source: a float32 buffer (numpy array, memoryview, ctypes array), an address as int (what
# np.ndarray.ctypes.data gives), or a ctypes pointer (what llama_cpp.llama_get_logits_ith returns).
Row = Any

_FLOAT32_FORMATS = {"f", "=f", "@f", "<f" if np.little_endian else ">f"}


def guide(
    dst: Row,
    base: Row,
    arms: Sequence[Row] = (),
    alphas: Sequence[float] = (),
    *,
    n_vocab: int | None = None,
    guard_min_p: float = 0.0,
) -> None:
    """Guided logits of GenARM (Xu et al., ICLR 2025, sec. 4) on the base's logit scale:
        dst[t] = base[t] + sum_i alpha_i * (arm_i[t] - logsumexp(arm_i))          (alpha_i > 0)
                         + sum_i alpha_i * max(0, log p_arm_i[t] - log p_base[t])   (alpha_i < 0)
    i.e. log p_base + sum_i alpha_i log p_arm_i up to a constant per row for positive weights: sampling
    softmax(dst / T) is sampling p_base * prod p_arm_i^alpha_i at temperature T. A negative weight steers away
    one-sidedly, p_base * min(1, p_base / p_arm)^|alpha|: it lowers the tokens the ARM rates above the base and
    leaves the others as the base has them (the plain p_arm^alpha would raise every token the ARM finds unlikely,
    junk included). At alpha = 0 dst is the base's raw logits, bit for bit, so llama.cpp's samplers (repeat penalty
    divides a positive logit, multiplies a negative one; biases; top-k...) act on it exactly as on the base alone.
    guard_min_p tau in (0, 1]: tokens whose raw base logit is below max(base) + ln(tau) are -inf (base-plausibility
    guard, Li et al. 2023 contrastive decoding); tau = 0: off, and nothing of it runs.
    A token that is -inf in the base or in any ARM row with alpha != 0 is -inf in dst, whatever the sign of alpha.
    ARM rows with alpha == 0 are not read (may be None). ARM rows may be longer than n_vocab (padded vocabulary): only
    their first n_vocab entries are used, logsumexp included.
    NaN or +inf in any row read -> NumericalError naming which input (base or ARM index); an ARM row that is -inf
    everywhere -> NumericalError; a result with no finite token left -> NumericalError. dst may be base itself (in
    place, the normal use on llama.cpp's logits buffer) but must not otherwise overlap an input.

    n_vocab defaults to dst's length (required when dst is an address). After a NumericalError about an ARM row dst
    is as it was; after any other, its contents are unspecified.
    """
    if len(arms) != len(alphas):
        raise InvalidOptionError(f"got {len(arms)} ARM rows but {len(alphas)} alphas; give one alpha per ARM")
    alphas = [_finite(alpha, f"alpha of ARM row {i}") for i, alpha in enumerate(alphas)]
    if not 0.0 <= _real(guard_min_p) <= 1.0:
        raise InvalidOptionError(
            f"guard_min_p must be a number between 0 and 1 (a fraction of the base's top probability), "
            f"got {guard_min_p!r}"
        )
    n_vocab = _n_vocab(dst, n_vocab)
    held: list[memoryview] = []  # buffers stay exported (not resizable) until the kernel returns
    dst_at = _address(dst, "dst", n_vocab, held, writable=True)
    base_at = _address(base, "base row", n_vocab, held)
    _check_overlap(dst_at, base_at, "base row", n_vocab, may_be_it=True)
    arm_ats = []
    for i, (arm, alpha) in enumerate(zip(arms, alphas, strict=True)):
        arm_ats.append(_address(arm, f"ARM row {i}", n_vocab, held) if alpha != 0 else 0)
        _check_overlap(dst_at, arm_ats[-1], f"ARM row {i}", n_vocab, may_be_it=False)
    _run(_fused.guide, dst_at, base_at, tuple(arm_ats), tuple(alphas), n_vocab, _real(guard_min_p))


def log_softmax(dst: Row, src: Row, *, n_vocab: int | None = None, scale: float = 1.0) -> None:
    """dst = log_softmax(scale * src) over n_vocab tokens; -inf stays -inf; in place allowed. For reported
    log-probs (the row after guide(), normalised) and the paper's normalised form (scale = 1/(1+sum alpha)).
    NaN/+inf -> NumericalError; nothing finite -> NumericalError; scale must be finite and > 0 (InvalidOptionError;
    in practice between 1e-30 and 1e30, so that scale * log2(e) is a positive float32).
    """
    if not 1e-30 <= _real(scale) <= 1e30:  # so that scale * log2(e) is a positive float32
        raise InvalidOptionError(f"scale must be a finite number > 0 (between 1e-30 and 1e30), got {scale!r}")
    n_vocab = _n_vocab(dst, n_vocab)
    held: list[memoryview] = []
    dst_at = _address(dst, "dst", n_vocab, held, writable=True)
    src_at = _address(src, "src", n_vocab, held)
    _check_overlap(dst_at, src_at, "src", n_vocab, may_be_it=True)
    _run(_fused.log_softmax, dst_at, src_at, n_vocab, _real(scale))


def _run(kernel, *args) -> None:
    try:
        kernel(*args)
    except FloatingPointError as exc:
        raise NumericalError(str(exc)) from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidOptionError(f"{kernel.__name__}: {exc}") from exc


def _real(value: object) -> float:
    """value as a float; NaN for what is not a real number (a bool, a string, None...)."""
    if isinstance(value, (bool, str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(value: object, name: str) -> float:
    if not math.isfinite(_real(value)):
        raise InvalidOptionError(f"{name} must be a finite number, got {value!r}")
    return _real(value)


def _n_vocab(dst: Row, n_vocab: int | None) -> int:
    """n_vocab as given, or dst's length when dst is a buffer."""
    if n_vocab is None:
        if isinstance(_address_or_buffer(dst), int) and not isinstance(dst, bool):
            raise InvalidOptionError("n_vocab is required when dst is an address rather than a buffer")
        n_vocab, n_rows = _row_shape(dst)
        if n_rows != 1:
            raise InvalidOptionError(f"dst holds {n_rows} rows of {n_vocab}; the kernel writes one row: pass dst[i]")
    try:
        if not isinstance(n_vocab, bool) and operator.index(n_vocab) > 0:
            return operator.index(n_vocab)
    except TypeError:
        pass
    raise InvalidOptionError(f"n_vocab must be a positive int, got {n_vocab!r}")


def _address(row: Row, name: str, n_vocab: int, held: list[memoryview], writable: bool = False) -> int:
    """The address of a row's first float. A buffer must hold at least n_vocab C-contiguous float32; its view is
    appended to held."""
    row = _address_or_buffer(row)
    if isinstance(row, int) and not isinstance(row, bool):
        if not 0 <= row < 2**64:
            raise InvalidOptionError(f"{name} is not an address: {row}")
        if row == 0:
            raise InvalidOptionError(f"{name} is a null address")
        return row
    view = _view(row, name)
    if view.format not in _FLOAT32_FORMATS:
        raise InvalidOptionError(f"{name} must hold float32, got buffer format {view.format!r}")
    if not view.c_contiguous:
        raise InvalidOptionError(f"{name} must be a C-contiguous buffer")
    if writable and view.readonly:
        raise InvalidOptionError(f"{name} is read-only")
    if view.nbytes // 4 < n_vocab:
        raise InvalidOptionError(f"{name} holds {view.nbytes // 4} floats but n_vocab is {n_vocab}")
    held.append(view)
    return np.frombuffer(view, np.uint8).ctypes.data


def _check_overlap(dst: int, src: int, name: str, n_vocab: int, may_be_it: bool) -> None:
    """dst must not overlap an input row (src 0: a row not read), unless it is that row and may be."""
    if src and not (may_be_it and dst == src) and dst < src + 4 * n_vocab and src < dst + 4 * n_vocab:
        where = f"{name} itself or " if may_be_it else ""
        raise InvalidOptionError(f"dst overlaps {name}; write into {where}a separate buffer")


def _address_or_buffer(row: Row) -> Row:
    """ctypes pointers become their address; None (allowed for rows of weight 0) becomes address 0."""
    if row is None:
        return 0
    if isinstance(row, ctypes._Pointer):
        return ctypes.cast(row, ctypes.c_void_p).value or 0
    return row


def _view(row: Row, name: str) -> memoryview:
    try:
        return memoryview(row)
    except TypeError:
        raise InvalidOptionError(
            f"{name} must be a float32 buffer or an address (int), not {type(row).__name__}"
        ) from None


def _row_shape(dst: Row) -> tuple[int, int]:
    """(n_vocab, n_rows) read off dst's buffer shape."""
    shape = _view(dst, "dst").shape
    if not shape:
        raise InvalidOptionError("dst must be a row of floats, not a scalar buffer")
    return shape[-1], math.prod(shape[:-1])
