"""PEFT LoRA adapters: merged export and adapter-only export both reproduce the PEFT model in llama.cpp."""

from __future__ import annotations

import pytest
from fixture_models import FIDELITY_TEXT
from helpers import F32_BOUND, hf_logits, llama_logits, relative_max_error


@pytest.fixture(scope="module")
def peft_reference(hf_model, lora_adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = hf_model("llama_small")
    ids = AutoTokenizer.from_pretrained(base_dir)(FIDELITY_TEXT, add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain = hf_logits(None, ids, model=base)
    model = PeftModel.from_pretrained(base, lora_adapter).eval()
    return ids, plain, hf_logits(None, ids, model=model)


def test_adapter_changes_the_model(peft_reference):
    ids, plain, adapted = peft_reference
    assert relative_max_error(adapted, plain) > 100 * F32_BOUND  # otherwise the tests below prove nothing


def test_merged_export_matches_peft(peft_reference, hf_model, lora_adapter, workdir):
    from genarm_local.convert import convert

    ids, _, reference = peft_reference
    out = convert(hf_model("llama_small"), workdir / "merged.gguf", outtype="f32", lora=lora_adapter, progress=False)
    assert relative_max_error(reference, llama_logits(out, ids)) < F32_BOUND


def test_adapter_only_export_matches_peft(peft_reference, hf_model, gguf_model, lora_adapter, workdir):
    from genarm_local.convert import convert

    ids, plain, reference = peft_reference
    adapter = convert(
        hf_model("llama_small"),
        workdir / "adapter.gguf",
        outtype="f32",
        lora=lora_adapter,
        adapter_only=True,
        progress=False,
    )
    base = gguf_model("llama_small", "f32")
    assert adapter.stat().st_size < base.stat().st_size
    assert relative_max_error(reference, llama_logits(base, ids, adapter=adapter)) < F32_BOUND
    # the same loaded model without the adapter is still the plain base
    assert relative_max_error(plain, llama_logits(base, ids)) < F32_BOUND


def test_adapter_only_from_gguf_base(peft_reference, gguf_model, lora_adapter, workdir):
    """A GGUF base (the demo's case): transformers loads it dequantized; the adapter is test-loaded over it."""
    from genarm_local.convert import convert

    ids, _, reference = peft_reference
    base = gguf_model("llama_small", "f32")
    out = convert(
        base, workdir / "adapter-from-gguf.gguf", outtype="f32", lora=lora_adapter, adapter_only=True, progress=False
    )
    assert relative_max_error(reference, llama_logits(base, ids, adapter=out)) < F32_BOUND
