"""Write a Checkpoint (or a LoRA adapter over one) as GGUF, streaming one tensor at a time.

The header and tensor table are written first from shapes alone, then each tensor is loaded, transformed,
encoded and written, so peak memory is one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from genarm_local.core.errors import NotACheckpointError

from .architectures import llama3_rope_factors
from .checkpoint import Checkpoint, LoraAdapter, check_adapter_fits
from .vocab import copy_gguf_fields

F32, F16, BF16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16
FILE_TYPE = {F32: gguf.LlamaFileType.ALL_F32, F16: gguf.LlamaFileType.MOSTLY_F16, BF16: gguf.LlamaFileType.MOSTLY_BF16}
# Keys of a source GGUF that describe the file rather than the model; everything else under general.* and
# {arch}.* is carried over when re-exporting a GGUF-only base.
_FILE_KEYS = ("general.file_type", "general.quantization_version", "general.alignment", "general.architecture")


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy (torch) order: [out, in]
    ggml_type: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def storage_type(gguf_name: str, shape: Sequence[int], float_type: gguf.GGMLQuantizationType):
    """llama.cpp wants norms, biases and every 1-D tensor in F32; only 2-D weights take the chosen float type."""
    if len(shape) == 1 or not gguf_name.endswith(".weight") or gguf_name.endswith("norm.weight"):
        return F32
    return float_type


def _encode(data: np.ndarray, ggml_type) -> np.ndarray:
    if ggml_type == F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), ggml_type)


def write_gguf(
    path: Path,
    arch_name: str,
    add_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: list[PlannedTensor],
    desc: str,
    progress: bool = True,
) -> None:
    writer = gguf.GGUFWriter(path, arch_name)
    try:
        add_metadata(writer)
        for t in tensors:
            if t.ggml_type == BF16:  # gguf-py takes BF16 as raw bytes: last dimension doubled
                byte_shape = (*t.shape[:-1], t.shape[-1] * 2)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(t.shape)) * 2, BF16)
            else:
                dtype = np.dtype(np.float32 if t.ggml_type == F32 else np.float16)
                writer.add_tensor_info(t.name, t.shape, dtype, int(np.prod(t.shape)) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(tensors, desc=desc, unit="tensor", disable=not progress, leave=False):
            data = t.load()
            if tuple(data.shape) != tuple(t.shape):
                raise NotACheckpointError(f"tensor {t.name}: expected shape {t.shape}, got {data.shape}")
            writer.write_tensor_data(_encode(data, t.ggml_type))
    finally:
        writer.close()


def _vocab_rows(ckpt: Checkpoint) -> int | None:
    """Token count of a GGUF source, whose embedding rows are trimmed to it; None for HF checkpoints."""
    if ckpt.gguf_reader is None:
        return None
    return len(ckpt.gguf_reader.fields["tokenizer.ggml.tokens"].data)


def _add_model_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, n_vocab: int, file_type: int) -> None:
    reader = ckpt.gguf_reader
    if reader is not None:
        # The source GGUF's own hyperparameters are known-good to llama.cpp; transformers' config drops some
        # (Gemma3's SWA pattern and local rope base among them), so copy them rather than re-derive.
        # genarm.* (an ARM's calibration) travels with the weights it was measured on, not with a merge.
        dropped = ("tokenizer.", "genarm.") if ckpt.weights_changed else ("tokenizer.",)
        copy_gguf_fields(writer, reader, lambda key: not key.startswith(dropped) and key not in _FILE_KEYS)
    else:
        ckpt.arch.write_hparams(writer, ckpt.config)
        writer.add_name(ckpt.source.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    ckpt.write_vocab(writer, n_vocab)


def plan_model(ckpt: Checkpoint, float_type) -> tuple[list[PlannedTensor], int]:
    """Every tensor of the exported model with its GGUF name, shape and type; and the vocabulary size."""
    config = ckpt.config
    tensor_map = ckpt.arch.tensor_name_map(config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in ckpt.shapes
    embed_name = next((n for n in ckpt.shapes if n.endswith("embed_tokens.weight")), None)
    if embed_name is None:
        raise NotACheckpointError(f"{ckpt.source}: no embed_tokens.weight tensor")
    n_vocab = _vocab_rows(ckpt) or ckpt.shapes[embed_name][0]
    planned: list[PlannedTensor] = []
    for hf_name, shape in ckpt.shapes.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise NotACheckpointError(f"{ckpt.source}: tensor {hf_name} has no GGUF name for {ckpt.arch.name}")
        rows = shape[0]
        if name in ("token_embd.weight", "output.weight") and rows > n_vocab:
            shape = (n_vocab, *shape[1:])  # padding rows beyond the tokenizer are never produced

        def load(hf_name=hf_name, rows=shape[0]):
            return ckpt.arch.transform(hf_name, ckpt.load(hf_name)[:rows], config)

        planned.append(PlannedTensor(name, tuple(shape), storage_type(name, shape, float_type), load))
    factors = llama3_rope_factors(config)
    if factors is not None:
        planned.append(PlannedTensor("rope_freqs.weight", factors.shape, F32, lambda: factors))
    return planned, n_vocab


def export_model(ckpt: Checkpoint, path: Path, float_type, progress: bool = True, label: str | None = None) -> None:
    tensors, n_vocab = plan_model(ckpt, float_type)
    write_gguf(
        path,
        ckpt.arch.name,
        lambda writer: _add_model_metadata(writer, ckpt, n_vocab, FILE_TYPE[float_type]),
        tensors,
        desc=f"writing {label or path.name}",
        progress=progress,
    )


def export_adapter(
    ckpt: Checkpoint, adapter: LoraAdapter, path: Path, float_type, progress: bool = True, label: str | None = None
) -> None:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter for llama_adapter_lora_init.

    llama.cpp scales B·A by alpha / rank with rank read from the tensors, so alpha is written such that this
    equals PEFT's own factor (alpha/r, or alpha/sqrt(r) with rsLoRA).
    """
    check_adapter_fits(adapter, ckpt.shapes, ckpt.source)
    config = ckpt.config
    tensor_map = ckpt.arch.tensor_name_map(config["num_hidden_layers"])
    planned: list[PlannedTensor] = []
    for hf_name, a, b in adapter.pairs():
        name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise NotACheckpointError(f"{adapter.path}: adapted layer {hf_name} has no GGUF name")
        if ckpt.arch.permutes_qk:  # W' = P·W, so (B·A)' = (P·B)·A: permute B's rows like the weight's
            b = ckpt.arch.transform(hf_name, b, config)
        planned.append(PlannedTensor(f"{name}.lora_a", a.shape, float_type, lambda a=a: a))
        planned.append(PlannedTensor(f"{name}.lora_b", b.shape, float_type, lambda b=b: b))
    if not planned:
        raise NotACheckpointError(f"{adapter.path}: the adapter has no LoRA tensors")

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.scale * adapter.rank)
        writer.add_name(adapter.path.name)
        if ckpt.gguf_reader is None:
            ckpt.arch.write_hparams(writer, config)
        else:
            copy_gguf_fields(writer, ckpt.gguf_reader, lambda key: key.startswith(f"{ckpt.arch.name}."))
        writer.add_file_type(FILE_TYPE[float_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    write_gguf(path, ckpt.arch.name, add_metadata, planned, desc=f"writing {label or path.name}", progress=progress)
