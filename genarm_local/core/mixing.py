"""The GenARM guidance step: base and ARM logits in, one row of log-probabilities out.

The arithmetic runs in the C extension genarm_local.core._fused (kernels/mix.c, with its Python face kernels/fused.c);
this module documents the formula, fills in defaults and turns the kernel's errors into genarm_local.core.errors
classes. The float64 numpy reference it is tested against lives in tests/core/test_kernel.py.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from numbers import Real
from typing import Any

from . import _fused
from .errors import InvalidOptionError, NumericalError

# A row source: a float32 buffer (numpy array, memoryview, ctypes array), an address as int (what
# np.ndarray.ctypes.data gives), or a ctypes pointer (what llama_cpp.llama_get_logits_ith returns).
Row = Any


def mix_logprobs(
    dst: Row,
    base: Row,
    arms: Sequence[Row] = (),
    alphas: Sequence[float] = (),
    *,
    base_weight: float = 1.0,
    n_vocab: int | None = None,
    n_rows: int | None = None,
    base_stride: int | None = None,
    arm_strides: Sequence[int] | None = None,
    n_threads: int = 1,
    guard_min_p: float = 0.0,
) -> None:
    """Write the GenARM decoding distribution's log-probabilities into ``dst``.

    For each of ``n_rows`` sequences, the guided decoding distribution of GenARM (Xu et al., ICLR 2025, section 4):

        dst = w0 * log_softmax(base) + sum_i alpha_i * log_softmax(arms[i])  -  logsumexp(same)

    i.e. log p with p proportional to p_base^w0 * prod_i p_arm_i^alpha_i, where w0 is ``base_weight`` (1 in the
    paper) and alpha_i = 1/beta_i. Several ARMs give multi-objective alignment, a negative alpha steers away, and an
    ARM with alpha 0 is not read at all (it may be None). Temperature is left to the sampler: sampling this row at
    temperature T is the paper's T.

    The base-plausibility guard (``guard_min_p`` = tau > 0) first masks every token whose base probability is below
    tau times that of the base's most likely token, i.e. whose raw base logit is below max(base) + ln tau; the
    tokens left are mixed and renormalised as above:

        dst = log p_guarded,   p_guarded ∝ p * [p_base >= tau * max_v p_base(v)]

    So the ARMs re-rank what the base finds plausible and can never promote what it finds absurd: the adaptive
    plausibility constraint of contrastive decoding (Li et al., "Contrastive Decoding: Open-ended Text Generation
    as Optimization", ACL 2023). The guard reads the base row raw whatever ``base_weight`` is (even 0). The base's
    most likely token always passes, so the guard alone never empties a row. tau = 0 (the default) is no guard, bit
    for bit; tau = 1 keeps only the base's most likely token(s).

    A token that is -inf in any row with nonzero weight (a masked token) is -inf in dst, whatever the sign of the
    weight. NaN or +inf in a row, or a row with nothing left to sample, raises NumericalError naming the row and
    the sequence; dst's contents are then unspecified.

    Args:
        dst: where the result goes; normally the base row itself (in place). Uses the base's stride.
        base: the base model's logits.
        arms: each ARM's logits; a vocabulary longer than n_vocab (padding) is cut to its first n_vocab entries.
        alphas: one weight per ARM.
        base_weight: w0.
        n_vocab: tokens per row; default: dst's last dimension (required when dst is an address).
        n_rows: sequences laid out one after another; default: the product of dst's other dimensions (1 for a
            1-D row or an address).
        base_stride: floats from one base (and dst) row to the next; default n_vocab.
        arm_strides: the same for each ARM; default n_vocab each (an ARM with a padded vocabulary needs its own).
        n_threads: threads to share the work: a batch by rows, a single row by blocks. Worth it between decode steps,
            when llama.cpp's own threads are idle; the kernel uses fewer where a thread would have under 65,536
            tokens to do. The result does not depend on it, bit for bit. The helper threads are a pool started on
            first use; a call made while another thread's call holds the pool runs on its own thread.
        guard_min_p: tau of the base-plausibility guard, in [0, 1]; 0 turns it off.

    Rows are float32 buffers, addresses (int) or ctypes pointers, never copied. The GIL is released while the
    kernel runs.
    """
    if len(arms) != len(alphas):
        raise InvalidOptionError(f"got {len(arms)} ARM rows but {len(alphas)} alphas; give one alpha per ARM")
    if isinstance(guard_min_p, bool) or not isinstance(guard_min_p, Real) or not 0.0 <= guard_min_p <= 1.0:
        raise InvalidOptionError(
            f"guard_min_p must be a number between 0 and 1 (a fraction of the base's top probability), "
            f"got {guard_min_p!r}"
        )
    dst, base, arms = _address_or_buffer(dst), _address_or_buffer(base), [_address_or_buffer(arm) for arm in arms]
    if isinstance(dst, int):
        if n_vocab is None:
            raise InvalidOptionError("n_vocab is required when dst is an address rather than a buffer")
        n_rows = 1 if n_rows is None else n_rows
    elif n_vocab is None or n_rows is None:
        vocab_from_dst, rows_from_dst = _row_shape(dst)
        n_vocab = vocab_from_dst if n_vocab is None else n_vocab
        n_rows = rows_from_dst if n_rows is None else n_rows
    if base_stride is None:
        base_stride = n_vocab
    if arm_strides is None:
        arm_strides = [n_vocab] * len(arms)
    try:
        _fused.mix(
            dst,
            base,
            arms,
            list(alphas),
            base_weight,
            n_vocab,
            n_rows,
            base_stride,
            list(arm_strides),
            n_threads,
            float(guard_min_p),
        )
    except FloatingPointError as exc:
        raise NumericalError(str(exc)) from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidOptionError(f"mix_logprobs: {exc}") from exc


def _address_or_buffer(row: Row) -> Row:
    """ctypes pointers become their address; None (allowed for rows of weight 0) becomes address 0."""
    if row is None:
        return 0
    if isinstance(row, ctypes._Pointer):
        return ctypes.cast(row, ctypes.c_void_p).value or 0
    return row


def _row_shape(dst: Row) -> tuple[int, int]:
    """(n_vocab, n_rows) read off dst's buffer shape."""
    try:
        shape = memoryview(dst).shape
    except TypeError:
        raise InvalidOptionError(f"dst must be a float32 buffer or an address, not {type(dst).__name__}") from None
    if not shape:
        raise InvalidOptionError("dst must be a row of floats, not a scalar buffer")
    n_rows = 1
    for size in shape[:-1]:
        n_rows *= size
    return shape[-1], n_rows
