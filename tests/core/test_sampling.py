"""Sampling options under guidance: llama.cpp's logit bias and penalties act on the guided logits (mixing.guide) as on
the base's own logits, checked against the formulas written here in numpy, for α = 0 and α > 0 alike."""

from __future__ import annotations

import ctypes

import llama_cpp as lc
import numpy as np
import pytest

from genarm_local.core.config import SamplingConfig


@pytest.fixture(scope="module")
def base_model(gguf_model):
    from genarm_local.core.native import Model

    with Model(gguf_model("llama_small", "f32")) as model:
        yield model


def guided_logits(base: np.ndarray, arm: np.ndarray, alpha: float) -> np.ndarray:
    """The row the sampler chain reads: the base's logits, plus α·log p_arm when α ≠ 0 (mixing.guide)."""
    from genarm_local.core.mixing import guide

    row = base.copy()
    if alpha != 0.0:
        guide(row, row, [arm], [alpha])
    return row


def chain_logits(row: np.ndarray, config: SamplingConfig, model, history: list[int]) -> np.ndarray:
    """What llama.cpp's chain (SamplerChain, greedy at the end) leaves of ``row``'s logits after ``history``."""
    from genarm_local.core.sampling import SamplerChain

    n = len(row)
    data = (lc.llama_token_data * n)()
    for token in range(n):
        data[token].id, data[token].logit, data[token].p = token, float(row[token]), 0.0
    array = lc.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    with SamplerChain(config, model, history=history, n_ctx=256) as chain:
        lc.llama_sampler_apply(chain._ptr, ctypes.byref(array))
        out = np.array([data[i].logit for i in range(n)], dtype=np.float32)
        order = np.array([data[i].id for i in range(n)])
        logits = np.empty(n, dtype=np.float32)
        logits[order] = out
        return logits, int(data[array.selected].id)


def reference(row: np.ndarray, config: SamplingConfig, history: list[int]) -> np.ndarray:
    """llama.cpp's rules, written out: biases added, then for each of the last repeat_last_n tokens seen c times: a
    positive logit divided by the repeat penalty, a negative one multiplied, then c·frequency + [c > 0]·presence
    subtracted."""
    z = row.astype(np.float64)
    for token, bias in (config.logit_bias or {}).items():
        z[token] += bias
    counts = np.bincount(history[-config.repeat_last_n :], minlength=len(z))
    seen = counts > 0
    z[seen] = np.where(z[seen] > 0, z[seen] / config.repeat_penalty, z[seen] * config.repeat_penalty)
    z -= counts * config.frequency_penalty + seen * config.presence_penalty
    return z


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0, -0.5])
def test_penalties_and_biases_act_on_the_guided_logits_as_on_the_base(base_model, alpha):
    rng = np.random.default_rng(3)
    n = base_model.n_vocab
    base = (rng.standard_normal(n) * 4 + 2).astype(np.float32)  # real logits: positive and negative
    arm = (rng.standard_normal(n) * 4).astype(np.float32)
    history = [int(t) for t in rng.integers(0, 40, size=30)]
    config = SamplingConfig(
        temperature=0.0,
        repeat_penalty=1.6,
        repeat_last_n=20,
        frequency_penalty=0.3,
        presence_penalty=0.7,
        logit_bias={5: 3.0, 7: -100.0, 11: 1.5},
    )
    row = guided_logits(base, arm, alpha)
    got, selected = chain_logits(row, config, base_model, history)
    want = reference(row, config, history)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert selected == int(np.argmax(want))
    assert (got != row).sum() >= 10  # the options did change the row


def test_at_alpha_zero_the_row_is_the_bases_own_logits(base_model):
    rng = np.random.default_rng(4)
    base = (rng.standard_normal(base_model.n_vocab) * 4).astype(np.float32)
    arm = (rng.standard_normal(base_model.n_vocab) * 4).astype(np.float32)
    np.testing.assert_array_equal(guided_logits(base, arm, 0.0), base)
    # and a small α moves it a little: no jump as α → 0 (the scale stays the base's)
    assert np.abs(guided_logits(base, arm, 1e-3) - base).max() < 0.1


def test_logit_bias_outside_the_vocabulary_is_refused(base_model):
    from genarm_local.core.errors import InvalidOptionError
    from genarm_local.core.sampling import SamplerChain

    with pytest.raises(InvalidOptionError, match="logit_bias"):
        SamplerChain(SamplingConfig(logit_bias={base_model.n_vocab: 1.0}), base_model)
    with pytest.raises(InvalidOptionError, match="logit_bias"):
        SamplingConfig.from_options({"logit_bias": {"x": 1}})
