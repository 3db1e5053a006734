"""The guidance kernel (kernels/mix.c via genarm_local.core.mixing) against a float64 numpy reference."""

import ctypes
import math
import sys
import threading
import time

import llama_cpp
import numpy as np
import pytest

from genarm_local.core import _fused
from genarm_local.core.errors import InvalidOptionError, NumericalError
from genarm_local.core.mixing import guide, log_softmax

# The reference, in float64, written from the formulas (GenARM, Xu et al., ICLR 2025, sec. 4; the guard of
# contrastive decoding, Li et al. 2023), not from the kernel.


def logsumexp(x: np.ndarray) -> float:
    x = x[~np.isneginf(x)]
    top = x.max()
    return top + np.log(np.exp(x - top).sum())


def reference_guide(base, arms, alphas, guard_min_p=0.0) -> np.ndarray:
    """base + sum_i alpha_i (arm_i - logsumexp(arm_i)) over positive alphas; for negative ones the one-sided
    alpha_i max(0, log p_arm_i - log p_base); -inf where the base or an ARM with alpha != 0 is -inf, and where the
    raw base logit is below max(base) + ln(guard_min_p). ARM rows are cut to the base's length."""
    base = np.asarray(base, dtype=np.float64)
    log_p_base = base - logsumexp(base)
    out = base.copy()
    for alpha, arm in zip(alphas, arms, strict=True):
        if alpha == 0:
            continue
        arm = np.asarray(arm[: len(base)], dtype=np.float64)
        masked = np.isneginf(arm)
        log_p_arm = np.where(masked, 0.0, arm - logsumexp(arm))
        with np.errstate(invalid="ignore"):
            term = log_p_arm if alpha > 0 else np.maximum(0.0, log_p_arm - log_p_base)
        out = np.where(masked | np.isneginf(out), -np.inf, out + alpha * term)
    if guard_min_p > 0:
        out[base < base.max() + math.log(guard_min_p)] = -np.inf
    return out


def reference_log_softmax(x, scale=1.0) -> np.ndarray:
    x = scale * np.asarray(x, dtype=np.float64)
    return x - logsumexp(x)


def assert_matches(got, want):
    """The accuracy target: 1e-4 absolute plus 1e-6 relative, and the same -inf tokens."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    masked = np.isneginf(want)
    np.testing.assert_array_equal(np.isneginf(got), masked)
    assert np.isfinite(got[~masked]).all()
    np.testing.assert_allclose(got[~masked], want[~masked], rtol=1e-6, atol=1e-4)


def logits(rng, shape, scale=4.0, mean=0.0):
    return (rng.standard_normal(shape) * scale + mean).astype(np.float32)


ALPHAS = [(), (1.0,), (-0.7,), (0.5, -0.7, 2.0), (0.0,), (0.0, 0.8, -0.25)]


@pytest.mark.parametrize("n_vocab", [7, 1000, 32_000, 262_144])
@pytest.mark.parametrize("alphas", ALPHAS, ids=str)
@pytest.mark.parametrize("scale", [1.0, 4.0, 10.0])
def test_guide_matches_reference(n_vocab, alphas, scale):
    rng = np.random.default_rng(n_vocab + len(alphas))
    base = logits(rng, n_vocab, scale)
    arms = [logits(rng, n_vocab, scale) for _ in alphas]
    dst = np.empty_like(base)
    guide(dst, base, arms, alphas)
    assert_matches(dst, reference_guide(base, arms, alphas))


@pytest.mark.parametrize("alphas", [(1.0,), (0.5, -0.3, 1.2)], ids=str)
def test_real_scale_logits_give_a_correct_log_distribution(alphas):
    """Logits spread like Gemma-3's (mean -4, standard deviation 5); log_softmax of the result is the reference's
    normalised distribution, at scale 1 and at the paper's 1/(1 + sum alpha)."""
    rng = np.random.default_rng(15)
    base = logits(rng, 262_144, 5.0, -4.0)
    arms = [logits(rng, 262_144, 5.0, -4.0) for _ in alphas]
    dst = np.empty_like(base)
    guide(dst, base, arms, alphas)
    want = reference_guide(base, arms, alphas)
    assert_matches(dst, want)
    for scale in [1.0, 1 / (1 + sum(alphas))]:
        logprobs = np.empty_like(dst)
        log_softmax(logprobs, dst, scale=scale)
        assert_matches(logprobs, reference_log_softmax(want, scale))
        assert abs(np.exp(logprobs.astype(np.float64)).sum() - 1.0) < 1e-5


@pytest.mark.parametrize("n_vocab", [7, 32_000, 262_144])
@pytest.mark.parametrize("alphas", [(1.0,), (-0.6,), (0.4, -2.0, 1.5)], ids=str)
def test_masked_tokens_stay_masked_for_any_sign_of_alpha(n_vocab, alphas):
    rng = np.random.default_rng(1)
    base = logits(rng, n_vocab)
    arms = [logits(rng, n_vocab) for _ in alphas]
    for row in [base, *arms]:
        row[rng.choice(n_vocab, size=max(1, n_vocab // 5), replace=False)] = -np.inf
    base[0] = arms[0][0] = 5.0  # at least one token every row allows
    dst = np.empty_like(base)
    guide(dst, base, arms, alphas)
    assert not np.isnan(dst).any() and not np.isposinf(dst).any()
    assert_matches(dst, reference_guide(base, arms, alphas))


def test_whole_masked_blocks_at_the_start_of_every_row():
    rng = np.random.default_rng(3)
    base, arm = logits(rng, 50_000), logits(rng, 50_000)
    base[:20_000] = arm[10_000:30_000] = arm[:5_000] = -np.inf
    for alpha, guard_min_p in [(0.7, 0.0), (-0.7, 0.0), (0.7, 1e-4), (-0.7, 1e-4)]:
        dst = np.empty_like(base)
        guide(dst, base, [arm], [alpha], guard_min_p=guard_min_p)
        assert_matches(dst, reference_guide(base, [arm], [alpha], guard_min_p))
    log_softmax(dst, arm)
    assert_matches(dst, reference_log_softmax(arm))


def test_alpha_zero_is_the_base_bit_for_bit():
    rng = np.random.default_rng(2)
    base = logits(rng, 50_000)
    base[:3] = [-0.0, -np.inf, 0.0]
    nan_arm = np.full_like(base, np.nan)
    for arms, alphas in [((), ()), ([nan_arm], [0.0]), ([None, nan_arm], [0.0, 0.0])]:
        dst = np.full_like(base, 7.0)
        guide(dst, base, arms, alphas)
        assert dst.tobytes() == base.tobytes()
    guide(dst, base, guard_min_p=0.3)  # the guard's -inf, and elsewhere the base's bits
    cutoff = base.max() + math.log(0.3)
    assert dst.tobytes() == np.where(base.astype(np.float64) < cutoff, np.float32(-np.inf), base).tobytes()


def test_in_place_equals_separate_dst():
    rng = np.random.default_rng(4)
    base, arms = logits(rng, 100_000), [logits(rng, 100_000) for _ in range(2)]
    for guard_min_p in [0.0, 0.02]:
        separate = np.empty_like(base)
        guide(separate, base, arms, [0.8, -0.3], guard_min_p=guard_min_p)
        in_place = base.copy()
        guide(in_place, in_place, arms, [0.8, -0.3], guard_min_p=guard_min_p)
        assert in_place.tobytes() == separate.tobytes()


def test_addresses_and_ctypes_pointers_equal_buffers():
    rng = np.random.default_rng(7)
    base, arm = logits(rng, 30_000), logits(rng, 30_000)
    from_buffers, from_addresses = np.empty_like(base), np.empty_like(base)
    guide(from_buffers, base, [arm], [1.5])
    guide(from_addresses.ctypes.data, base.ctypes.data, [arm.ctypes.data], [1.5], n_vocab=30_000)
    assert from_addresses.tobytes() == from_buffers.tobytes()
    pointer = base.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # as llama_get_logits_ith returns
    arm_pointer = arm.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    guide(pointer, pointer, [arm_pointer], [1.5], n_vocab=30_000)
    assert base.tobytes() == from_buffers.tobytes()
    logprobs, logprobs_by_address = np.empty_like(base), np.empty_like(base)
    log_softmax(logprobs, base)
    log_softmax(logprobs_by_address.ctypes.data, pointer, n_vocab=30_000)
    assert logprobs_by_address.tobytes() == logprobs.tobytes()


def test_padded_arm_rows_use_their_first_n_vocab_entries():
    rng = np.random.default_rng(9)
    n_vocab, padded = 32_000, 32_128
    base, arm = logits(rng, n_vocab), logits(rng, padded)
    arm[n_vocab:] = 1e30  # never read: it would dominate the logsumexp
    dst = np.empty_like(base)
    guide(dst, base, [arm], [0.9])
    assert_matches(dst, reference_guide(base, [arm[:n_vocab]], [0.9]))


def test_rows_of_alpha_zero_are_not_read():
    rng = np.random.default_rng(11)
    base, arm = logits(rng, 5000), logits(rng, 5000)
    poisoned = np.full(5000, np.nan, dtype=np.float32)
    dst = np.empty_like(base)
    unmapped = 8  # an address that would crash if read
    guide(dst, base, [poisoned, None, arm, unmapped, np.zeros(3)], [0.0, 0.0, 0.6, 0.0, 0.0])
    assert_matches(dst, reference_guide(base, [arm], [0.6]))


# The base-plausibility guard (guard_min_p = tau).


@pytest.mark.parametrize("alphas", [(1.0,), (-0.8,), (0.5, -0.7, 2.0)], ids=str)
@pytest.mark.parametrize("guard_min_p", [1e-3, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("spread", [1.0, 5.0])
def test_guard_matches_reference(spread, guard_min_p, alphas):
    rng = np.random.default_rng(round(guard_min_p * 1000) + len(alphas))
    base = logits(rng, 150_000, spread, -4.0)
    arms = [logits(rng, 150_000, spread, -4.0) for _ in alphas]
    dst = np.empty_like(base)
    guide(dst, base, arms, alphas, guard_min_p=guard_min_p)
    assert_matches(dst, reference_guide(base, arms, alphas, guard_min_p))


def test_guard_cutoff_is_exact_between_neighbouring_floats():
    """The float just under max + ln(tau) (taken in float64) is masked, the next one up kept."""
    rng = np.random.default_rng(28)
    base = logits(rng, 262_144, 0.1, -100.0)  # far under every cutoff below
    tested = []
    for k, (top, tau) in enumerate([(0.0, 0.5), (7.3, 0.02), (-3.1, 0.3), (12.0, 1e-3), (1.5, 0.9)]):
        threshold = float(np.float32(top)) + math.log(tau)
        kept = np.float32(threshold)
        if float(kept) < threshold:  # compared in float64 (numpy would compare a float32 with a float in float32)
            kept = np.nextafter(kept, np.float32(np.inf))
        under = np.nextafter(kept, np.float32(-np.inf))
        row = base.copy()
        at = 1000 * (k + 1)
        row[at : at + 3] = [top, under, kept]
        dst = np.empty_like(row)
        guide(dst, row, [row.copy()], [0.5], guard_min_p=tau)
        assert np.isneginf(dst[at + 1]) and np.isfinite(dst[at + 2])
        assert_matches(dst, reference_guide(row, [row], [0.5], tau))
        tested.append(kept == np.float32(threshold))
    assert any(tested) and not all(tested)  # float32 rounding of the threshold went both ways


@pytest.mark.parametrize("masked", [False, True])
def test_guard_zero_is_the_unguarded_result_bit_for_bit(masked):
    """tau = 0, and a tau too small to mask anything, change no bit."""
    rng = np.random.default_rng(21)
    base, arms = logits(rng, 262_144), [logits(rng, 262_144) for _ in range(2)]
    if masked:
        arms[1][rng.choice(262_144, size=80_000, replace=False)] = -np.inf
    unguarded = np.empty_like(base)
    guide(unguarded, base, arms, [0.6, -0.3])
    for guard_min_p in [0.0, 1e-300]:
        dst = np.empty_like(base)
        guide(dst, base, arms, [0.6, -0.3], guard_min_p=guard_min_p)
        assert dst.tobytes() == unguarded.tobytes()


def test_guard_of_one_keeps_only_the_base_favourites():
    base = np.array([1.0, 3.0, -2.0, 3.0, 0.5], dtype=np.float32)
    arm = np.array([0.0, 2.0, 9.0, 0.0, 5.0], dtype=np.float32)
    dst = np.empty_like(base)
    guide(dst, base, [arm], [1.0], guard_min_p=1.0)
    assert np.isneginf(dst[[0, 2, 4]]).all()  # the ARM's own favourites are implausible to the base
    np.testing.assert_allclose(dst[[1, 3]], reference_guide(base, [arm], [1.0])[[1, 3]], rtol=1e-6)


def test_guard_reads_the_base_raw():
    """The cutoff comes from the base's own logits, not from the guided ones: an ARM cannot rescue a token the base
    finds implausible, nor mask one it finds plausible."""
    base = np.array([5.0, 4.0, 0.0, -1.0], dtype=np.float32)
    arm = np.array([-20.0, -20.0, 30.0, 30.0], dtype=np.float32)  # guided, tokens 2 and 3 lead by far
    dst = np.empty_like(base)
    guide(dst, base, [arm], [2.0], guard_min_p=0.1)  # cutoff: 5 + ln 0.1 = 2.70
    assert np.isfinite(dst[:2]).all() and np.isneginf(dst[2:]).all()
    assert_matches(dst, reference_guide(base, [arm], [2.0], 0.1))


# log_softmax


@pytest.mark.parametrize("scale", [1.0, 1 / 1.5, 1 / 3.2, 2.5])
def test_log_softmax_matches_reference(scale):
    rng = np.random.default_rng(30)
    src = logits(rng, 262_144, 5.0, -4.0)
    src[rng.choice(262_144, size=1000, replace=False)] = -np.inf
    dst = np.empty_like(src)
    log_softmax(dst, src, scale=scale)
    assert_matches(dst, reference_log_softmax(src, scale))
    log_softmax(src, src, scale=scale)  # in place
    assert src.tobytes() == dst.tobytes()


def test_the_gil_is_released_while_computing():
    rng = np.random.default_rng(16)
    base, arms = logits(rng, 4_000_000), [logits(rng, 4_000_000) for _ in range(3)]
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
            guide(dst, base, arms, [1.0, 0.5, -0.5])
            during += count - before
            if during:
                break
    finally:
        stop = True
        counter.join()
        sys.setswitchinterval(switch_interval)
    assert during > 0


# Sampling through llama.cpp's own sampler chain, as the runtime does.


def llama_sample(chain, row: np.ndarray, draws: int) -> np.ndarray:
    """Token counts from applying `chain` to a fresh llama_token_data_array of `row`, `draws` times."""
    n_vocab = len(row)
    template = (llama_cpp.llama_token_data * n_vocab)(
        *[llama_cpp.llama_token_data(i, float(row[i]), 0.0) for i in range(n_vocab)]
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
    guided = np.empty_like(base)
    guide(guided, base, [arm], alphas)  # raw guided logits: the sampler normalises them itself
    want = np.exp(reference_log_softmax(reference_guide(base, [arm], alphas)))

    draws = 200_000
    chain = sampler_chain(llama_cpp.llama_sampler_init_dist(1234))
    try:
        counts = llama_sample(chain, guided, draws)
    finally:
        llama_cpp.llama_sampler_free(chain)
    assert counts[7] == 0
    expected = want[:7] * draws
    assert expected.min() > 1000
    chi_square = ((counts[:7] - expected) ** 2 / expected).sum()
    assert chi_square < 22.458, (chi_square, counts, expected)  # chi-square critical value, 6 d.o.f., p = 0.001


def test_llama_greedy_sampler_picks_the_reference_argmax():
    rng = np.random.default_rng(12)
    base, arm = logits(rng, 5000), logits(rng, 5000)
    guided = np.empty_like(base)
    guide(guided, base, [arm], [1.3])
    chain = sampler_chain(llama_cpp.llama_sampler_init_greedy())
    try:
        counts = llama_sample(chain, guided, 1)
    finally:
        llama_cpp.llama_sampler_free(chain)
    assert counts.argmax() == reference_guide(base, [arm], [1.3]).argmax()


# Numerical errors name the row at fault.

ROW = np.zeros(100, dtype=np.float32)
ONLY_7 = np.where(np.arange(100) == 7, 0.0, -np.inf).astype(np.float32)  # a base allowing token 7 alone


def with_value(value, at=50, size=100):
    row = np.zeros(size, dtype=np.float32)
    row[at] = value
    return row


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: guide(ROW.copy(), ROW, [ROW, with_value(np.nan)], [1.0, 0.5]), r"^NaN in ARM row 1$"),
        (lambda: guide(ROW.copy(), ROW, [with_value(np.inf)], [-1.0]), r"^\+inf in ARM row 0: logits must be"),
        (lambda: guide(ROW.copy(), with_value(np.nan), [ROW], [1.0]), r"^NaN in base row$"),
        (lambda: guide(ROW.copy(), with_value(np.inf)), r"^\+inf in base row: logits must be finite or -inf"),
        (lambda: guide(ROW.copy(), with_value(np.nan), guard_min_p=0.1), r"^NaN in base row$"),
        (lambda: guide(ROW.copy(), ROW, [ROW, with_value(-np.inf) - np.inf], [1, 2]), r"^ARM row 1 is -inf for every"),
        (lambda: guide(ROW.copy(), ROW - np.inf, [ROW], [1.0]), r"^base row is -inf for every token: nothing to"),
        (lambda: guide(ROW.copy(), ROW - np.inf, guard_min_p=0.5), r"^base row is -inf for every token"),
        (lambda: guide(ROW.copy(), ONLY_7, [with_value(-np.inf, 7)], [1.0]), "^no token is left: the -inf masks"),
        (
            lambda: guide(ROW.copy(), with_value(1.0), [with_value(-np.inf)], [0.3], guard_min_p=1.0),
            "^no token is left",
        ),
        (lambda: guide(ROW.copy(), ROW, [ROW], [1e300]), "overflow float32"),
        (lambda: guide(ROW.copy(), ROW, [ROW + 3e38], [1.0]), "overflow float32"),
        (lambda: log_softmax(ROW.copy(), with_value(np.nan)), r"^NaN in src$"),
        (lambda: log_softmax(ROW.copy(), with_value(np.inf)), r"^\+inf in src"),
        (lambda: log_softmax(ROW.copy(), ROW - np.inf), r"^src is -inf for every token"),
        (lambda: log_softmax(ROW.copy(), ROW + 3e38, scale=2.0), "overflow float32"),
    ],
)
def test_numerical_errors_name_the_row(call, message):
    with pytest.raises(NumericalError, match=message):
        call()


def test_an_arm_error_leaves_dst_as_it_was():
    rng = np.random.default_rng(14)
    base, arm = logits(rng, 262_144), logits(rng, 262_144)
    arm[250_000] = np.nan
    original = base.copy()
    with pytest.raises(NumericalError, match="NaN in ARM row 0"):
        guide(base, base, [arm], [1.0])
    assert base.tobytes() == original.tobytes()


def test_nan_in_the_base_is_named_in_place_behind_a_masked_token():
    base, arm = np.zeros(3000, dtype=np.float32), np.zeros(3000, dtype=np.float32)
    base[2500], arm[2500] = np.nan, -np.inf
    with pytest.raises(NumericalError, match="^NaN in base row$"):
        guide(base, base, [arm], [-1.0])


# Bad arguments are InvalidOptionError, never crashes.


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: guide(ROW.copy(), ROW, [ROW], [1.0, 2.0]), "1 ARM rows but 2 alphas"),
        (lambda: guide(ROW.copy(), ROW, [ROW], [float("nan")]), "alpha of ARM row 0 must be a finite number"),
        (lambda: guide(ROW.copy(), ROW, [ROW], [float("-inf")]), "alpha of ARM row 0 must be a finite number"),
        (lambda: guide(ROW.copy(), ROW, [ROW], ["x"]), "alpha of ARM row 0 must be a finite number, got 'x'"),
        (lambda: guide(np.empty(100, np.float32), np.zeros(50, np.float32)), "base row holds 50 floats but n_vocab"),
        (lambda: guide(ROW.copy(), ROW, [np.zeros(100)], [1.0]), "ARM row 0 must hold float32, got buffer format 'd'"),
        (lambda: guide(np.empty(100), ROW), "dst must hold float32"),
        (lambda: guide(ROW.copy(), np.zeros(100, ">f4")), "base row must hold float32"),
        (lambda: guide(ROW.copy(), np.zeros((100, 2), np.float32)[:, 0]), "base row must be a C-contiguous buffer"),
        (lambda: guide(np.frombuffer(bytes(400), np.float32), ROW), "dst is read-only"),
        (lambda: guide(ROW.copy(), 0, n_vocab=100), "base row is a null address"),
        (lambda: guide(ROW.copy(), ROW, [None], [1.0]), "ARM row 0 is a null address"),
        (lambda: guide(ROW.copy(), -8, n_vocab=100), "base row is not an address: -8"),
        (lambda: guide(ROW.copy(), [0.0] * 100), "base row must be a float32 buffer or an address .int., not list"),
        (lambda: guide(ROW.copy(), True, n_vocab=100), "base row must be a float32 buffer or an address .int., not"),
        (lambda: guide(ROW.copy(), ROW, n_vocab=-5), "n_vocab must be a positive int, got -5"),
        (lambda: guide(ROW.copy(), ROW, n_vocab=50.0), "n_vocab must be a positive int, got 50.0"),
        (lambda: guide(ROW.copy(), ROW, n_vocab=200), "dst holds 100 floats but n_vocab is 200"),
        (lambda: guide(12345, ROW), "n_vocab is required when dst is an address"),
        (lambda: guide(np.zeros((2, 50), np.float32), ROW), "dst holds 2 rows of 50"),
        (lambda: log_softmax(ROW.copy(), ROW, scale=0.0), r"scale must be a finite number > 0 \(between 1e-30 and"),
        (lambda: log_softmax(ROW.copy(), ROW, scale=-1.0), "scale must be a finite number > 0"),
        (lambda: log_softmax(ROW.copy(), ROW, scale=float("inf")), "scale must be a finite number > 0"),
        (lambda: log_softmax(ROW.copy(), ROW, scale="1"), "scale must be a finite number > 0"),
        (lambda: log_softmax(ROW.copy(), np.zeros(10, np.float32)), "src holds 10 floats but n_vocab is 100"),
        (lambda: log_softmax(ROW.copy(), ROW, scale=1e-300), r"1e30\), got 1e-300"),
    ],
)
def test_bad_arguments_raise_invalid_option(call, message):
    with pytest.raises(InvalidOptionError, match=message):
        call()


@pytest.mark.parametrize("guard_min_p", [-0.1, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_guard_min_p_outside_zero_to_one_is_refused(guard_min_p):
    with pytest.raises(InvalidOptionError, match="guard_min_p must be a number between 0 and 1"):
        guide(ROW.copy(), ROW, guard_min_p=guard_min_p)


def test_dst_overlapping_an_input_is_refused():
    rows = np.zeros(300, dtype=np.float32)
    with pytest.raises(InvalidOptionError, match="dst overlaps base row; write into base row itself or a separate"):
        guide(rows[50:150], rows[:100])
    with pytest.raises(InvalidOptionError, match="dst overlaps ARM row 0; write into a separate buffer"):
        guide(rows[:100], rows[200:], [rows[:100]], [1.0])  # dst may be the base, never an ARM
    with pytest.raises(InvalidOptionError, match="dst overlaps src"):
        log_softmax(rows[50:150], rows[:100])


def test_the_extension_refuses_null_rows_on_its_own():
    row = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="base row is a null address"):
        _fused.guide(row.ctypes.data, 0, (), (), 10, 0.0)
    with pytest.raises(ValueError, match="ARM row 1 is a null address"):
        _fused.guide(row.ctypes.data, row.ctypes.data, (0, 0), (0.0, 1.0), 10, 0.0)
    with pytest.raises(ValueError, match="one alpha per ARM row"):
        _fused.guide(row.ctypes.data, row.ctypes.data, (row.ctypes.data,), (), 10, 0.0)
    with pytest.raises(ValueError, match="src is a null address"):
        _fused.log_softmax(row.ctypes.data, 0, 10, 1.0)


def test_a_negative_weight_lowers_only_what_the_arm_rates_above_the_base():
    """Steering away is one-sided: a token the ARM finds far less likely than the base does (here -3e38, which
    p_base * p_arm^-1.5 would raise past float32) keeps its base log-prob; the tokens the ARM favours are lowered."""
    base = np.array([2.0, 1.0, 0.0, -1.0, 0.5], dtype=np.float32)
    arm = np.array([2.0, 3.0, -3e38, -1.0, 0.5], dtype=np.float32)
    dst = np.empty_like(base)
    guide(dst, base, [arm], [-1.5])
    log_p = reference_log_softmax(dst)
    base_log_p = reference_log_softmax(base)
    favoured = reference_log_softmax(arm) > base_log_p
    assert favoured.tolist() == [False, True, False, False, False]
    assert log_p[1] < base_log_p[1] - 1.0  # the ARM's favourite, lowered
    # the rest keep their ratios to each other, as the base has them
    rest = ~favoured
    np.testing.assert_allclose(dst[rest] - dst[0], base[rest] - base[0], atol=1e-5)
    assert_matches(dst, reference_guide(base, [arm], [-1.5]))
