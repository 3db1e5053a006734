"""Shared checks for the tests: logits from HF and from llama.cpp over the same token ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

# F32 export vs the HF model: max |Δlogit| as a share of the logit range (shared by the converter tests).
F32_BOUND = 3e-4


def hf_logits(model_dir: Path | None, ids: list[int], model=None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(gguf_path: Path, ids: list[int], adapter: Path | None = None, scale: float = 1.0) -> np.ndarray:
    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Context
    from genarm_local.core.native import Adapter, Model

    with Model(gguf_path) as model:
        lora = Adapter(model, adapter) if adapter else None
        try:
            # F32 KV cache and no flash attention: llama.cpp's CPU flash-attention path rounds K, V and the scores
            # through F16 whatever the cache type, which would dominate an F32 comparison.
            adapters = [(lora, scale)] if lora else ()
            with Context(model, LoadConfig(kv_cache_type="f32", flash_attn=False), n_ctx=512, adapters=adapters) as ctx:
                return ctx.logits_all(ids)
        finally:
            if lora:
                lora.close()


def last_logits(gguf_path: Path, ids: list[int], adapter: Path | None = None, **load_options) -> np.ndarray:
    """The next-token logits after ``ids`` from a plain llama.cpp context (one batch), as float64: an engine-free
    reference for the guided mix. ``load_options`` are LoadConfig's (use the settings of the engine compared)."""
    import llama_cpp as lc

    from genarm_local.core.config import LoadConfig
    from genarm_local.core.context import Context
    from genarm_local.core.native import Adapter, Model

    with Model(gguf_path) as model:
        lora = Adapter(model, adapter) if adapter else None
        try:
            with Context(model, LoadConfig(**load_options), adapters=[(lora, 1.0)] if lora else ()) as ctx:
                ctx.decode(ids)
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx.ptr, -1), shape=(model.n_vocab,))
                return row.astype(np.float64)
        finally:
            if lora:
                lora.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(reference || other), in nats."""
    p, q = log_softmax(reference), log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def relative_max_error(reference: np.ndarray, other: np.ndarray) -> float:
    """max |Δ| divided by the range of the reference logits."""
    return float(np.abs(reference - other).max() / (reference.max() - reference.min()))


def swapped_vocabulary(source, out):
    """A copy of ``source`` with two equally long token strings swapped in place (a different tokenizer)."""
    from gguf import GGUFReader

    shutil.copy(source, out)
    field = GGUFReader(out, "r+").fields["tokenizer.ggml.tokens"]
    parts = [field.parts[i] for i in field.data]
    first = next(i for i in range(300, len(parts)) if len(parts[i]) == len(parts[i + 1]) and parts[i][0] != 0xC4)
    a, b = parts[first].copy(), parts[first + 1].copy()
    parts[first][:], parts[first + 1][:] = b, a
    return first, bytes(a).decode(), bytes(b).decode()
