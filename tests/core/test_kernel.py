"""The fused guidance kernel (kernels/mix.c via genarm_local.core.mixing) against a float64 numpy reference."""

import ctypes
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import llama_cpp
import numpy as np
import pytest

from genarm_local.core import _fused
from genarm_local.core.errors import InvalidOptionError, NumericalError
from genarm_local.core.mixing import mix_logprobs


def logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return top + np.log(np.exp(x - top).sum())


def reference_logprobs(base, arms, alphas, base_weight=1.0):
    """log p with p ∝ p_base^w0 · Π p_arm_i^α_i, in float64, one row. A token that is -inf in any row with nonzero
    weight is masked (-inf), whatever the sign of the weight; rows longer than the base are cut to its length."""
    n_vocab = len(base)
    total = np.zeros(n_vocab)
    masked = np.zeros(n_vocab, dtype=bool)
    for weight, row in [(base_weight, base), *zip(alphas, arms, strict=True)]:
        if weight == 0:
            continue
        row = np.asarray(row[:n_vocab], dtype=np.float64)
        row_masked = np.isneginf(row)
        logprobs = row - logsumexp(row[~row_masked])
        total += weight * np.where(row_masked, 0.0, logprobs)
        masked |= row_masked
    total[masked] = -np.inf
    return total - logsumexp(total[~masked])


def guarded_reference(base, arms, alphas, min_p, base_weight=1.0):
    """The base-plausibility guard over reference_logprobs: a token whose raw base logit is below the base's max +
    ln(min_p) (base probability below min_p times the top token's) is -inf, the rest renormalised."""
    mixed = reference_logprobs(base, arms, alphas, base_weight)
    base = np.asarray(base, dtype=np.float64)
    if min_p > 0:
        mixed[base < base.max() + math.log(min_p)] = -np.inf
    return mixed - logsumexp(mixed[~np.isneginf(mixed)])


def assert_matches(got, want):
    """1e-4 absolute, plus 1e-6 relative: float32 itself rounds values beyond 1024 by more than 1e-4, and a row of
    logits x1000 has log-probabilities near -10^4."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    masked = np.isneginf(want)
    np.testing.assert_array_equal(np.isneginf(got), masked)
    assert np.isfinite(got[~masked]).all()
    np.testing.assert_allclose(got[~masked], want[~masked], rtol=1e-6, atol=1e-4)


def random_logits(rng, shape, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


ALPHAS = [(), (1.0,), (0.5, -0.7, 2.0), (0.0,), (-1.3,), (0.0, 0.8, -0.25)]
SCALES = [(1.0, 1.0), (1000.0, 1e-3), (1e-3, 1000.0), (30.0, 30.0)]


@pytest.mark.parametrize("n_vocab", [7, 32_000, 262_144])
@pytest.mark.parametrize("alphas", ALPHAS, ids=str)
@pytest.mark.parametrize("scales", SCALES, ids=str)
def test_matches_reference(n_vocab, alphas, scales):
    rng = np.random.default_rng(n_vocab + len(alphas))
    base = random_logits(rng, n_vocab, scales[0])
    arms = [random_logits(rng, n_vocab, scales[1]) for _ in alphas]
    dst = np.empty(n_vocab, dtype=np.float32)
    mix_logprobs(dst, base, arms, alphas)
    assert_matches(dst, reference_logprobs(base, arms, alphas))


@pytest.mark.parametrize("alphas", [(1.0,), (0.5, -0.3, 1.2)], ids=str)
def test_realistic_logits_are_as_accurate_as_float32_allows(alphas):
    """Logits spread like an LLM's (std 5, as Gemma-3's) take the float32 path, within a few roundings of float32."""
    rng = np.random.default_rng(15)
    base = random_logits(rng, 262_144, 5.0) - 4
    arms = [random_logits(rng, 262_144, 5.0) - 4 for _ in alphas]
    dst = np.empty_like(base)
    mix_logprobs(dst, base, arms, alphas)
    want = reference_logprobs(base, arms, alphas)
    likely = want > -20
    np.testing.assert_allclose(dst[likely], want[likely], rtol=0, atol=2e-5)
    np.testing.assert_allclose(dst, want, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("n_vocab", [7, 32_000, 262_144])
@pytest.mark.parametrize("alphas", [(1.0,), (-0.6,), (0.4, -2.0, 1.5)], ids=str)
def test_masked_tokens_stay_masked_for_any_sign_of_alpha(n_vocab, alphas):
    rng = np.random.default_rng(1)
    base = random_logits(rng, n_vocab)
    arms = [random_logits(rng, n_vocab) for _ in alphas]
    for row in [base, *arms]:
        row[rng.choice(n_vocab, size=max(1, n_vocab // 5), replace=False)] = -np.inf
    base[0] = arms[0][0] = 5.0  # at least one token every row allows
    dst = np.empty(n_vocab, dtype=np.float32)
    mix_logprobs(dst, base, arms, alphas)
    assert not np.isnan(dst).any() and not np.isposinf(dst).any()
    assert_matches(dst, reference_logprobs(base, arms, alphas))


def test_whole_masked_blocks_and_a_base_weight():
    rng = np.random.default_rng(2)
    base, arm = random_logits(rng, 50_000), random_logits(rng, 50_000)
    base[:20_000] = -np.inf  # whole blocks with nothing to sample
    dst = np.empty_like(base)
    mix_logprobs(dst, base, [arm], [0.7], base_weight=0.5)
    assert_matches(dst, reference_logprobs(base, [arm], [0.7], base_weight=0.5))


def test_output_is_a_distribution():
    rng = np.random.default_rng(3)
    base, arm = random_logits(rng, 262_144), random_logits(rng, 262_144)
    mix_logprobs(base, base, [arm], [1.0])
    assert abs(np.exp(base.astype(np.float64)).sum() - 1.0) < 1e-5


def test_in_place_equals_separate_dst():
    rng = np.random.default_rng(4)
    base, arm = random_logits(rng, 100_000), random_logits(rng, 100_000)
    separate = np.empty_like(base)
    mix_logprobs(separate, base, [arm], [0.8])
    mix_logprobs(base, base, [arm], [0.8])
    np.testing.assert_array_equal(base, separate)


def test_batch_equals_row_by_row():
    rng = np.random.default_rng(5)
    base, arms = random_logits(rng, (5, 40_000)), [random_logits(rng, (5, 40_000)) for _ in range(2)]
    batch = np.empty_like(base)
    mix_logprobs(batch, base, arms, [0.6, -0.3])
    assert batch.shape == (5, 40_000)
    for r in range(5):
        row = np.empty(40_000, dtype=np.float32)
        mix_logprobs(row, base[r], [arm[r] for arm in arms], [0.6, -0.3])
        np.testing.assert_array_equal(batch[r], row)
        assert_matches(batch[r], reference_logprobs(base[r], [arm[r] for arm in arms], [0.6, -0.3]))


@pytest.mark.parametrize("n_rows", [1, 3])
def test_threads_give_the_same_rows(n_rows):
    rng = np.random.default_rng(6)
    base, arm = random_logits(rng, (n_rows, 262_144)), random_logits(rng, (n_rows, 262_144))
    arm[0, 200_000:] = -np.inf  # the second thread of a split row sees masked blocks
    one, two = np.empty_like(base), np.empty_like(base)
    mix_logprobs(one, base, [arm], [1.0], n_threads=1)
    mix_logprobs(two, base, [arm], [1.0], n_threads=2)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    assert_matches(two[0], reference_logprobs(base[0], [arm[0]], [1.0]))


def test_the_gil_is_released_while_mixing():
    rng = np.random.default_rng(16)
    base, arm = random_logits(rng, (4, 262_144)), random_logits(rng, (4, 262_144))
    dst = np.empty_like(base)
    count, stop = 0, False

    def count_whenever_allowed():
        nonlocal count
        while not stop:
            count += 1
            time.sleep(0)  # hands the GIL back, so the main thread can return from the kernel

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1000)  # no forced switches: the counter runs only when the main thread lets go
    counter = threading.Thread(target=count_whenever_allowed)
    try:
        counter.start()
        during = 0
        for _ in range(20):  # the counter may not be scheduled during one call on a busy machine
            before = count
            mix_logprobs(dst, base, [arm], [1.0])
            during += count - before
            if during:
                break
    finally:
        stop = True
        counter.join()
        sys.setswitchinterval(switch_interval)
    assert during > 0


def test_addresses_equal_buffers():
    rng = np.random.default_rng(7)
    base, arm = random_logits(rng, (2, 30_000)), random_logits(rng, (2, 30_000))
    from_buffers, from_addresses = np.empty_like(base), np.empty_like(base)
    mix_logprobs(from_buffers, base, [arm], [1.5])
    mix_logprobs(from_addresses.ctypes.data, base.ctypes.data, [arm.ctypes.data], [1.5], n_vocab=30_000, n_rows=2)
    np.testing.assert_array_equal(from_addresses, from_buffers)


def test_ctypes_pointer_as_llama_get_logits_ith_returns():
    rng = np.random.default_rng(8)
    base, arm = random_logits(rng, 1000), random_logits(rng, 1000)
    want = np.empty_like(base)
    mix_logprobs(want, base, [arm], [1.0])
    pointer = base.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    mix_logprobs(pointer, pointer, [arm], [1.0], n_vocab=1000)
    np.testing.assert_array_equal(base, want)


def test_padded_arm_rows_use_the_first_n_vocab_entries():
    rng = np.random.default_rng(9)
    n_vocab, padded = 32_000, 32_128
    base = random_logits(rng, (3, n_vocab))
    arm = random_logits(rng, (3, padded))
    arm[:, n_vocab:] = np.nan  # never read
    dst = np.empty_like(base)
    mix_logprobs(dst, base, [arm], [0.9], arm_strides=[padded])
    for r in range(3):
        assert_matches(dst[r], reference_logprobs(base[r], [arm[r]], [0.9]))


def test_padded_base_rows_in_place():
    rng = np.random.default_rng(10)
    n_vocab, padded = 1000, 1024
    base = random_logits(rng, (2, padded))
    base[:, n_vocab:] = np.nan  # neither read nor written
    arm = random_logits(rng, (2, n_vocab))
    want = [reference_logprobs(base[r, :n_vocab], [arm[r]], [1.0]) for r in range(2)]
    mix_logprobs(base, base, [arm], [1.0], n_vocab=n_vocab, base_stride=padded)
    for r in range(2):
        assert_matches(base[r, :n_vocab], want[r])
    assert np.isnan(base[:, n_vocab:]).all()


def test_rows_of_weight_zero_are_not_read():
    rng = np.random.default_rng(11)
    base = random_logits(rng, 5000)
    poisoned = np.full(5000, np.nan, dtype=np.float32)
    dst = np.empty_like(base)
    unmapped = 8  # an address that would crash if read
    mix_logprobs(dst, base, [poisoned, None, 0, unmapped], [0.0, 0.0, 0.0, 0.0])
    assert_matches(dst, reference_logprobs(base, [], []))


def test_all_weights_zero_give_the_uniform_distribution():
    dst = np.empty(10, dtype=np.float32)
    mix_logprobs(dst, np.zeros(10, dtype=np.float32), base_weight=0.0)
    np.testing.assert_allclose(dst, np.log(0.1), rtol=1e-6)


# The base-plausibility guard (guard_min_p): the same mix over the tokens the base finds plausible.


def real_shaped_logits(rng, shape):
    """Spread like Gemma-3's logits (mean about -4, standard deviation about 5)."""
    return (rng.standard_normal(shape) * 5 - 4).astype(np.float32)


GUARD_ALPHAS = [(1.0,), (-0.8,), (0.5, -0.7, 2.0)]


@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("alphas", GUARD_ALPHAS, ids=str)
@pytest.mark.parametrize("min_p", [1e-3, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("shape", ["flat", "real"])
def test_guard_matches_reference_in_a_strided_batch(shape, min_p, alphas, n_threads):
    """Rows of a batch with a padded base stride, ARMs with a padded vocabulary (NaN there: never read)."""
    rng = np.random.default_rng(round(min_p * 1000) + len(alphas) + 17 * n_threads)
    n_rows, n_vocab, base_padded, arm_padded = 3, 150_000, 150_016, 150_528
    logits = real_shaped_logits if shape == "real" else lambda rng, size: random_logits(rng, size, 1.0)
    base = logits(rng, (n_rows, base_padded))
    arms = [logits(rng, (n_rows, arm_padded)) for _ in alphas]
    for row in arms:
        row[:, n_vocab:] = np.nan
    dst = np.full_like(base, 7.0)
    mix_logprobs(
        dst,
        base,
        arms,
        alphas,
        n_vocab=n_vocab,
        n_rows=n_rows,
        base_stride=base_padded,
        arm_strides=[arm_padded] * len(arms),
        n_threads=n_threads,
        guard_min_p=min_p,
    )
    for r in range(n_rows):
        want = guarded_reference(base[r, :n_vocab], [arm[r, :n_vocab] for arm in arms], alphas, min_p)
        assert_matches(dst[r, :n_vocab], want)
        assert (dst[r, n_vocab:] == 7.0).all()
    if shape == "flat" and min_p == 1e-3:
        assert np.isneginf(dst[:, :n_vocab]).mean() < 0.1  # most tokens pass a small tau on flat rows...
    if shape == "real" and min_p >= 0.02:
        assert np.isneginf(dst[:, :n_vocab]).mean() > 0.99  # ...very few a larger one on peaked rows


@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("alphas", GUARD_ALPHAS, ids=str)
@pytest.mark.parametrize("min_p", [1e-3, 0.02, 0.5])
def test_guard_matches_reference_on_one_row(min_p, alphas, n_threads):
    """One row of Gemma-3's vocabulary, split between threads by blocks."""
    rng = np.random.default_rng(round(min_p * 1000) + len(alphas))
    base = random_logits(rng, 262_144, 2.0)
    arms = [random_logits(rng, 262_144, 2.0) for _ in alphas]
    dst = np.empty_like(base)
    mix_logprobs(dst, base, arms, alphas, n_threads=n_threads, guard_min_p=min_p)
    assert_matches(dst, guarded_reference(base, arms, alphas, min_p))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (1000.0, 1e-3)], ids=str)
def test_guard_on_the_exact_path_with_masked_tokens(scales, n_threads):
    """Masked tokens and logits scaled by 1000 take the double-precision path; the guard applies there too."""
    rng = np.random.default_rng(18)
    n_vocab = 262_144
    base = random_logits(rng, n_vocab, scales[0])
    arms = [random_logits(rng, n_vocab, scales[1]) for _ in range(2)]
    for row in [base, *arms]:
        row[rng.choice(n_vocab, size=n_vocab // 5, replace=False)] = -np.inf
    top = int(np.argmax(base))
    for arm in arms:
        arm[top] = 0.0  # the ARMs allow the base's favourite
    dst = np.empty_like(base)
    mix_logprobs(dst, base, arms, [0.7, -0.4], n_threads=n_threads, guard_min_p=1e-4)
    assert_matches(dst, guarded_reference(base, arms, [0.7, -0.4], 1e-4))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("base_weight", [0.0, 0.5, 2.0])
def test_guard_reads_the_base_raw_whatever_its_weight(base_weight, n_threads):
    rng = np.random.default_rng(19)
    base, arm = random_logits(rng, (2, 200_000), 2.0), random_logits(rng, (2, 200_000), 2.0)
    dst = np.empty_like(base)
    mix_logprobs(dst, base, [arm], [1.0], base_weight=base_weight, n_threads=n_threads, guard_min_p=0.05)
    for r in range(2):
        assert_matches(dst[r], guarded_reference(base[r], [arm[r]], [1.0], 0.05, base_weight=base_weight))


def test_guard_of_one_keeps_only_the_base_favourites():
    base = np.array([1.0, 3.0, -2.0, 3.0, 0.5], dtype=np.float32)
    arm = np.array([0.0, 2.0, 9.0, 0.0, 5.0], dtype=np.float32)
    dst = np.empty_like(base)
    mix_logprobs(dst, base, [arm], [1.0], guard_min_p=1.0)
    assert np.isneginf(dst[[0, 2, 4]]).all()  # the ARM's own favourites are implausible to the base
    np.testing.assert_allclose(np.exp(dst[[1, 3]]), [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))], rtol=1e-6)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_guard_cutoff_is_exact_between_neighbouring_floats(n_threads):
    """For several tau and maxima: the float just under max + ln(tau) (taken in float64) is masked, the next one up
    kept, in blocks of the fast path (finite logits) and of the exact path (a masked token in the block)."""
    rng = np.random.default_rng(28)
    base = random_logits(rng, 262_144, 0.1) - 100  # far under every cutoff below
    base[1024 * 70] = -np.inf
    tested = []
    for k, (top, min_p) in enumerate([(0.0, 0.5), (7.3, 0.02), (-3.1, 0.3), (12.0, 1e-3), (1.5, 0.9)]):
        threshold = float(np.float32(top)) + math.log(min_p)
        kept = np.float32(threshold)
        if float(kept) < threshold:  # compared in float64 (numpy would compare a float32 with a float in float32)
            kept = np.nextafter(kept, np.float32(np.inf))
        under = np.nextafter(kept, np.float32(-np.inf))
        for at in [1024 * (5 + k), 1024 * 70 + 1 + k]:  # a fast-path block, the exact-path block
            row = base.copy()
            row[at : at + 3] = [top, under, kept]
            dst = np.empty_like(row)
            mix_logprobs(dst, row, [row], [0.5], n_threads=n_threads, guard_min_p=min_p)
            assert np.isneginf(dst[at + 1]) and np.isfinite(dst[at + 2])
            assert_matches(dst, guarded_reference(row, [row], [0.5], min_p))
            tested.append(kept == np.float32(threshold))
    assert any(tested) and not all(tested)  # float32 rounding of the threshold went both ways


def test_guard_in_place_equals_separate_dst():
    rng = np.random.default_rng(20)
    base, arm = real_shaped_logits(rng, 262_144), real_shaped_logits(rng, 262_144)
    separate = np.empty_like(base)
    mix_logprobs(separate, base, [arm], [1.0], guard_min_p=0.02, n_threads=2)
    mix_logprobs(base, base, [arm], [1.0], guard_min_p=0.02, n_threads=2)
    np.testing.assert_array_equal(base, separate)


@pytest.mark.parametrize("shape", ["flat", "real", "masked"])
def test_guard_zero_is_the_unguarded_kernel_bit_for_bit(shape):
    """tau = 0, and a tau too small to mask anything, change no bit, on any number of threads."""
    rng = np.random.default_rng(21)
    for n_rows, n_vocab in [(1, 262_144), (5, 40_000)]:
        logits = real_shaped_logits if shape == "real" else random_logits
        base, arms = logits(rng, (n_rows, n_vocab)), [logits(rng, (n_rows, n_vocab)) for _ in range(2)]
        if shape == "masked":
            arms[1][:, rng.choice(n_vocab, size=n_vocab // 3, replace=False)] = -np.inf
        unguarded = np.empty_like(base)
        mix_logprobs(unguarded, base, arms, [0.6, -0.3])
        for n_threads in [1, 2, 3, 4]:
            for min_p in [0.0, 1e-300]:
                dst = np.empty_like(base)
                mix_logprobs(dst, base, arms, [0.6, -0.3], n_threads=n_threads, guard_min_p=min_p)
                assert dst.tobytes() == unguarded.tobytes(), (n_rows, n_threads, min_p)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_guard_and_an_arm_masking_the_base_favourite_leave_no_token(n_threads):
    rng = np.random.default_rng(22)
    base, arm = random_logits(rng, 262_144), random_logits(rng, 262_144)
    arm[np.argmax(base)] = -np.inf
    original = base.copy()
    with pytest.raises(NumericalError, match="no token of sequence 0"):
        mix_logprobs(base, base, [arm], [1.0], n_threads=n_threads, guard_min_p=1.0)
    np.testing.assert_array_equal(base, original)  # in place: the rows are left as they were


@pytest.mark.parametrize("n_threads", [1, 2])
def test_guard_errors_in_the_base_name_it_even_at_weight_zero(n_threads):
    rng = np.random.default_rng(23)
    arm = random_logits(rng, (3, 262_144))
    for bad, message in [(np.nan, r"NaN in base row \(sequence 1\)"), (np.inf, r"\+inf in base row \(sequence 1\)")]:
        base = random_logits(rng, (3, 262_144))
        base[1, 100_000] = bad
        with pytest.raises(NumericalError, match=message):
            mix_logprobs(np.empty_like(base), base, [arm], [1.0], base_weight=0.0, guard_min_p=0.1, n_threads=n_threads)
    base = np.full(262_144, -np.inf, dtype=np.float32)
    with pytest.raises(NumericalError, match=r"base row \(sequence 0\) is -inf for every token"):
        mix_logprobs(np.empty_like(base), base, [arm[0]], [1.0], base_weight=0.0, guard_min_p=0.1, n_threads=n_threads)


@pytest.mark.parametrize("min_p", [-0.1, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_guard_min_p_outside_zero_to_one_is_refused(min_p):
    with pytest.raises(InvalidOptionError, match="guard_min_p must be a number between 0 and 1"):
        mix_logprobs(ROW.copy(), ROW, guard_min_p=min_p)


# Threads: a pool of workers, the same bits whatever their number, safe from several Python threads at once.


@pytest.mark.parametrize("min_p", [0.0, 0.02])
@pytest.mark.parametrize(("n_rows", "n_vocab"), [(1, 262_144), (1, 1_000_000), (6, 100_000)])
def test_threads_give_the_same_bits(n_rows, n_vocab, min_p):
    rng = np.random.default_rng(24)
    base, arm = real_shaped_logits(rng, (n_rows, n_vocab)), real_shaped_logits(rng, (n_rows, n_vocab))
    arm[0, n_vocab // 2 :] = -np.inf  # a thread of a split row sees whole masked blocks
    one = np.empty_like(base)
    mix_logprobs(one, base, [arm], [0.8], guard_min_p=min_p)
    for n_threads in [2, 3, 4, 8]:
        for attempt in range(40):  # a race between threads shows only now and then
            many = np.full_like(base, np.nan)
            mix_logprobs(many, base, [arm], [0.8], n_threads=n_threads, guard_min_p=min_p)
            assert many.tobytes() == one.tobytes(), (n_threads, attempt)


def test_calls_from_several_python_threads_at_once():
    rng = np.random.default_rng(25)
    cases = [(real_shaped_logits(rng, (n, 262_144)), real_shaped_logits(rng, (n, 262_144))) for n in [1, 1, 2, 3]]
    wanted = []
    for base, arm in cases:
        wanted.append(np.empty_like(base))
        mix_logprobs(wanted[-1], base, [arm], [1.0], guard_min_p=0.01)
    failures = []

    def mix_repeatedly(case):
        base, arm = cases[case]
        dst = np.empty_like(base)
        for _ in range(30):
            mix_logprobs(dst, base, [arm], [1.0], n_threads=2, guard_min_p=0.01)
            if dst.tobytes() != wanted[case].tobytes():
                failures.append(case)

    threads = [threading.Thread(target=mix_repeatedly, args=(case,)) for case in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def mix_in_child(queue):
    rng = np.random.default_rng(26)
    base, arm = random_logits(rng, 262_144), random_logits(rng, 262_144)
    dst = np.empty_like(base)
    mix_logprobs(dst, base, [arm], [1.0], n_threads=2)
    queue.put(bool(np.allclose(dst, reference_logprobs(base, [arm], [1.0]), rtol=1e-6, atol=1e-4)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_mixes_without_the_parents_workers():
    rng = np.random.default_rng(27)
    base = random_logits(rng, 262_144)
    mix_logprobs(np.empty_like(base), base, [base], [1.0], n_threads=2)  # the pool has started in this process
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=mix_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5)


def test_the_worker_pool_stops_when_the_interpreter_exits(tmp_path):
    script = (
        "import numpy as np\n"
        "from genarm_local.core.mixing import mix_logprobs\n"
        "row = np.zeros((4, 262_144), np.float32)\n"
        "mix_logprobs(row, row, n_threads=4)\n"
        "print('mixed')\n"
    )
    # run outside the repository: from its root, `python -c` would import the source tree, whose extension is built
    # only by an editable install
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "mixed\n"


# Sampling through llama.cpp's own sampler chain, as the runtime does.


def llama_sample(chain, logprobs: np.ndarray, draws: int) -> np.ndarray:
    """Token counts from applying `chain` to a fresh llama_token_data_array of `logprobs`, `draws` times."""
    n_vocab = len(logprobs)
    template = (llama_cpp.llama_token_data * n_vocab)(
        *[llama_cpp.llama_token_data(i, float(logprobs[i]), 0.0) for i in range(n_vocab)]
    )
    data = (llama_cpp.llama_token_data * n_vocab)()
    candidates = llama_cpp.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)
    counts = np.zeros(n_vocab, dtype=np.int64)
    for _ in range(draws):
        ctypes.memmove(data, template, ctypes.sizeof(template))  # samplers reorder and rescale in place
        candidates.selected, candidates.sorted = -1, False
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
        counts[data[candidates.selected].id] += 1
    return counts


def sampler_chain(*samplers):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in samplers:
        llama_cpp.llama_sampler_chain_add(chain, sampler)  # the chain owns and frees it
    return chain


def test_llama_dist_sampler_reproduces_the_reference_distribution():
    base = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 1.0], dtype=np.float32)
    arm = np.array([0.0, 1.0, -1.0, 2.0, 0.5, 0.0, 1.5, -np.inf], dtype=np.float32)
    alphas = [-0.5]  # steering away, with a masked token that must stay masked
    mixed = np.empty_like(base)
    mix_logprobs(mixed, base, [arm], alphas)
    want = np.exp(reference_logprobs(base, [arm], alphas))

    draws = 100_000
    chain = sampler_chain(llama_cpp.llama_sampler_init_dist(1234))
    try:
        counts = llama_sample(chain, mixed, draws)
    finally:
        llama_cpp.llama_sampler_free(chain)
    assert counts[7] == 0
    expected = want[:7] * draws
    assert expected.min() > 1000
    chi_square = ((counts[:7] - expected) ** 2 / expected).sum()
    assert chi_square < 22.458, (chi_square, counts, expected)  # chi-square critical value, 6 d.o.f., p = 0.001


def test_llama_greedy_sampler_picks_the_reference_argmax():
    rng = np.random.default_rng(12)
    base, arm = random_logits(rng, 5000), random_logits(rng, 5000)
    mixed = np.empty_like(base)
    mix_logprobs(mixed, base, [arm], [1.3])
    chain = sampler_chain(llama_cpp.llama_sampler_init_greedy())
    try:
        counts = llama_sample(chain, mixed, 1)
    finally:
        llama_cpp.llama_sampler_free(chain)
    assert counts.argmax() == reference_logprobs(base, [arm], [1.3]).argmax()


# Numerical errors name the row and the sequence.


def test_nan_names_the_arm_and_the_sequence():
    rng = np.random.default_rng(13)
    base, arms = random_logits(rng, (5, 3000)), [random_logits(rng, (5, 3000)) for _ in range(2)]
    arms[1][3, 2500] = np.nan
    with pytest.raises(NumericalError, match=r"NaN in ARM row 1 \(sequence 3\)"):
        mix_logprobs(base, base, arms, [1.0, 0.5])


def test_nan_in_the_base_is_named_even_in_place():
    rng = np.random.default_rng(14)
    base, arm = random_logits(rng, 262_144), random_logits(rng, 262_144)
    base[250_000] = np.nan
    with pytest.raises(NumericalError, match=r"NaN in base row \(sequence 0\)"):
        mix_logprobs(base, base, [arm], [1.0], n_threads=2)


def test_nan_hidden_behind_a_masked_token_is_still_found():
    base, arm = np.zeros(100, dtype=np.float32), np.zeros(100, dtype=np.float32)
    base[10], arm[10] = -np.inf, np.nan
    with pytest.raises(NumericalError, match=r"NaN in ARM row 0"):
        mix_logprobs(np.empty_like(base), base, [arm], [-1.0])


def test_positive_infinity_is_refused():
    base = np.zeros(100, dtype=np.float32)
    base[5] = np.inf
    with pytest.raises(NumericalError, match=r"\+inf in base row"):
        mix_logprobs(np.empty_like(base), base)


def test_a_row_masking_everything_is_refused_and_left_intact():
    base, arm = np.zeros(3000, dtype=np.float32), np.full(3000, -np.inf, dtype=np.float32)
    with pytest.raises(NumericalError, match=r"ARM row 0 \(sequence 0\) is -inf for every token"):
        mix_logprobs(base, base, [arm], [1.0])
    assert (base == 0).all()


def test_masks_that_do_not_overlap_are_refused():
    base, arm = np.zeros(10, dtype=np.float32), np.zeros(10, dtype=np.float32)
    base[:5] = -np.inf
    arm[5:] = -np.inf
    with pytest.raises(NumericalError, match="no token of sequence 0"):
        mix_logprobs(np.empty_like(base), base, [arm], [0.2])


def test_overflowing_weights_are_refused():
    base = np.full(10, 3e38, dtype=np.float32)
    with pytest.raises(NumericalError, match="overflow"):
        mix_logprobs(np.empty_like(base), base, base_weight=1e300)


# Bad arguments are exceptions, never crashes.

ROW = np.zeros(100, dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mix_logprobs(np.empty(100, np.float32), np.zeros(50, np.float32)), "base row holds 50 floats"),
        (lambda: mix_logprobs(ROW.copy(), ROW, [ROW], [1.0, 2.0]), "1 ARM rows but 2 alphas"),
        (lambda: mix_logprobs(ROW.copy(), ROW, [np.zeros(100)], [1.0]), "ARM row 0 must hold float32"),
        (lambda: mix_logprobs(np.empty(100), ROW), "dst must hold float32"),
        (lambda: mix_logprobs(ROW.copy(), np.zeros((100, 2), np.float32)[:, 0]), "C-contiguous"),
        (lambda: mix_logprobs(np.frombuffer(bytes(400), np.float32), ROW), "dst is read-only"),
        (lambda: mix_logprobs(ROW.copy(), 0, n_vocab=100), "base row is a null address"),
        (lambda: mix_logprobs(ROW.copy(), ROW, [None], [1.0]), "ARM row 0 is a null address"),
        (lambda: mix_logprobs(ROW.copy(), ROW, n_vocab=-5), "n_vocab and n_rows must be positive"),
        (lambda: mix_logprobs(ROW.copy(), ROW, n_rows=0), "n_vocab and n_rows must be positive"),
        (lambda: mix_logprobs(ROW.copy(), ROW, n_rows=2), "holds 100 floats but needs 200"),
        (lambda: mix_logprobs(ROW.copy(), [0.0] * 100), "base row must be a float32 buffer or an address"),
        (lambda: mix_logprobs(ROW.copy(), True, n_vocab=100), "base row must be a float32 buffer"),
        (lambda: mix_logprobs(ROW.copy(), ROW, [ROW], [float("nan")]), "weight of ARM row 0 must be finite"),
        (lambda: mix_logprobs(ROW.copy(), ROW, [ROW], ["x"]), "weight of ARM row 0 must be a number, not str"),
        (lambda: mix_logprobs(ROW.copy(), ROW, base_weight=float("inf")), "base_weight must be finite"),
        (lambda: mix_logprobs(ROW.copy(), ROW, [ROW], [1.0], arm_strides=[50]), "stride of ARM row 0 is 50"),
        (lambda: mix_logprobs(ROW.copy(), ROW, n_threads=0), "n_threads must be at least 1"),
        (lambda: mix_logprobs(0, ROW, n_vocab=100), "dst is a null address"),
        (lambda: mix_logprobs(ROW.copy(), -8, n_vocab=100), "base row is not an address: -8"),
        (lambda: mix_logprobs(12345, ROW), "n_vocab is required when dst is an address"),
    ],
)
def test_bad_arguments_raise_invalid_option(call, message):
    with pytest.raises(InvalidOptionError, match=message):
        call()


def test_dst_overlapping_an_input_is_refused():
    rows = np.zeros(200, dtype=np.float32)
    with pytest.raises(InvalidOptionError, match="dst overlaps base row"):
        mix_logprobs(rows[50:150], rows[:100])


def test_the_extension_validates_on_its_own():
    row = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="null address"):
        _fused.mix(row, 0, [], [], 1.0, 10, 1, 10, [], 1)
    with pytest.raises(ValueError, match="they must match"):
        _fused.mix(row, row, [row], [], 1.0, 10, 1, 10, [], 1)
    with pytest.raises(TypeError, match="float32"):
        _fused.mix(row, np.zeros(10, np.int32), [], [], 1.0, 10, 1, 10, [], 1)
    with pytest.raises(ValueError, match="needs 11"):
        _fused.mix(row, row, [], [], 1.0, 11, 1, 11, [], 1)
    with pytest.raises(ValueError, match="must be positive"):
        _fused.mix(row, row, [], [], 1.0, -10, 1, 10, [], 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _fused.mix(row, np.zeros(20, np.float32)[::2], [], [], 1.0, 10, 1, 10, [], 1)
    with pytest.raises(TypeError, match="buffer or an address"):
        _fused.mix(row, row, [object()], [1.0], 1.0, 10, 1, 10, [10], 1)
