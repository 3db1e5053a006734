"""HF checkpoint → GGUF: llama.cpp reproduces the HF model's logits (per architecture and output type)."""

from __future__ import annotations

import pytest
from fixture_models import FIDELITY_TEXT, MODEL_SPECS
from helpers import F32_BOUND, hf_logits, llama_logits, mean_kl, relative_max_error, top1_agreement

# Bounds asserted, as a fraction of the HF logits' range (max - min over the whole text):
# F32 (weights, KV cache, attention without flash-attn) differs from HF by summation order (observed 2e-5) and,
# for Gemma, ggml's CPU GELU, which goes through an F16 lookup table (observed 1.1e-4); F16 also rounds weights
# to 11 significant bits.
F16_BOUND = 5e-3


def _ids(model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(FIDELITY_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 64
    return ids


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_float_exports_match_hf_logits(name, hf_model, gguf_model):
    ids = _ids(hf_model(name))
    reference = hf_logits(hf_model(name), ids)
    f32 = llama_logits(gguf_model(name, "f32"), ids)
    f16 = llama_logits(gguf_model(name, "f16"), ids)
    assert reference.shape == f32.shape
    assert relative_max_error(reference, f32) < F32_BOUND
    assert relative_max_error(reference, f16) < F16_BOUND


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_q8_0_keeps_top1_and_low_kl(name, hf_model, gguf_model):
    ids = _ids(hf_model(name))
    reference = hf_logits(hf_model(name), ids)
    q8 = llama_logits(gguf_model(name, "q8_0"), ids)
    assert top1_agreement(reference, q8) >= 0.98
    assert mean_kl(reference, q8) <= 0.01
