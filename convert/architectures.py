"""What differs between the supported architectures: GGUF hyperparameters and per-tensor transforms.

One small function per difference, collected in ARCHITECTURES keyed by the HF ``architectures`` name. Tensor
names come from gguf-py's own map (gguf.get_tensor_name_map), never from a table of ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from genarm_local.core.errors import NotACheckpointError, UnsupportedArchitectureError


def _rope_params(config: dict, layer_type: str = "full_attention") -> dict:
    """Rope settings whether written the transformers-4 way (rope_theta, rope_scaling) or the 5.x way
    (rope_parameters, possibly one dict per attention layer type as Gemma3 does)."""
    params = config.get("rope_parameters") or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    merged = dict(config.get("rope_scaling") or {})
    merged.update(params)
    if "rope_theta" not in merged and "rope_theta" in config:
        merged["rope_theta"] = config["rope_theta"]
    return merged


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _need(config: dict, *keys: str) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise NotACheckpointError(f"config.json lacks {', '.join(missing)}")


def write_common_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """Keys every decoder-only arch here needs; llama.cpp throws at load on a missing or mistyped one."""
    _need(config, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    n_head = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings") or 2048)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = _rope_params(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    # llama.cpp defaults key/value length to n_embd / n_head; explicit heads (Qwen3, Gemma3) differ.
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    _write_rope_scaling(writer, rope, config)


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict, config: dict) -> None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default" or kind == "llama3":  # llama3 is carried by the rope_freqs tensor instead of keys
        return
    factor = float(rope.get("factor", 1.0))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        original = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(int(original))
    else:
        raise UnsupportedArchitectureError(f"rope scaling type {kind!r} is not supported (linear, yarn, llama3)")
    writer.add_rope_scaling_factor(factor)


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors for Llama-3-style rope scaling (llama.cpp reads them from rope_freqs.weight).

    Frequencies with a wavelength shorter than original_ctx/high_freq_factor are kept, longer than
    original_ctx/low_freq_factor are divided by `factor`, and those in between are interpolated smoothly.
    """
    rope = _rope_params(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope["original_max_position_embeddings"])
    freqs = base ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    return divisor.astype(np.float32)


def _llama_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    write_common_hparams(writer, config)
    writer.add_rope_dimension_count(head_dim(config))  # must equal key_length for the llama graph
    writer.add_vocab_size(config["vocab_size"])


def _gemma3_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    write_common_hparams(writer, config)
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != head_dim(config):
        # llama.cpp hard-codes the attention scale to 1/sqrt(key_length) for gemma3.
        raise UnsupportedArchitectureError(
            f"gemma3 with query_pre_attn_scalar={scalar} != head_dim={head_dim(config)} is not supported by llama.cpp"
        )
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern(gemma3_swa_layers(config))
    local = _rope_params(config, "sliding_attention").get("rope_theta") or config.get("rope_local_base_freq")
    writer.add_rope_freq_base_swa(float(local or 10000.0))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("attn_logit_softcapping"):
        raise UnsupportedArchitectureError("gemma3 with attn_logit_softcapping is not supported by llama.cpp")


def gemma3_swa_layers(config: dict) -> list[bool]:
    """Which layers use sliding-window attention, from layer_types or the periodic pattern (every 6th global)."""
    n = config["num_hidden_layers"]
    if config.get("layer_types"):
        return [t == "sliding_attention" for t in config["layer_types"]]
    period = config.get("sliding_window_pattern") or 6
    return [(i + 1) % period != 0 for i in range(n)]


def _permute_for_norm_rope(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k output rows from HF's rotate-half pairing to llama.cpp's interleaved (NORM) rope pairing."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama_tensor(hf_name: str, data: np.ndarray, config: dict) -> np.ndarray:
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute_for_norm_rope(data, config["num_attention_heads"])
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
        return _permute_for_norm_rope(data, n_kv)
    return data


def _gemma3_tensor(hf_name: str, data: np.ndarray, config: dict) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by the stored weight.
    if hf_name.endswith("norm.weight"):
        return data + 1.0
    return data


def _unchanged(hf_name: str, data: np.ndarray, config: dict) -> np.ndarray:
    return data


@dataclass(frozen=True)
class Architecture:
    gguf_arch: gguf.MODEL_ARCH
    write_hparams: Callable[[gguf.GGUFWriter, dict], None]
    transform: Callable[[str, np.ndarray, dict], np.ndarray]
    # The permutation of q/k rows for NORM rope also applies to the LoRA B matrix of those projections.
    permutes_qk: bool = False

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def tensor_name_map(self, n_blocks: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_blocks)


_LLAMA = Architecture(gguf.MODEL_ARCH.LLAMA, _llama_hparams, _llama_tensor, permutes_qk=True)
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2, write_common_hparams, _unchanged),
    "Qwen3ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN3, write_common_hparams, _unchanged),
    "Gemma3ForCausalLM": Architecture(gguf.MODEL_ARCH.GEMMA3, _gemma3_hparams, _gemma3_tensor),
}

# transformers' GGUF loader names its architectures after llama.cpp's; map back to the HF class.
HF_CLASS_FOR_GGUF_ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def architecture_for(config: dict, source: str) -> tuple[str, Architecture]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    found = ", ".join(names) or config.get("model_type") or "none"
    raise UnsupportedArchitectureError(
        f"{source}: architecture {found} is not supported; supported: {', '.join(ARCHITECTURES)}"
    )
