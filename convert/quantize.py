"""Re-quantize an F32/F16/BF16 GGUF with llama.cpp's own quantizer (the `genarm-local quantize` verb)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from genarm_local.core.atomic import atomic_output
from genarm_local.core.errors import CorruptModelError, InvalidOptionError, NotACheckpointError

QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
_FLOAT_TENSORS = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


def parse_type(name: str) -> gguf.LlamaFileType:
    try:
        return QUANT_TYPES[name.lower()]
    except KeyError:
        raise InvalidOptionError(f"unknown type {name!r}; choose one of {', '.join(QUANT_TYPES)}") from None


def inspect_input(path: Path) -> gguf.GGUFReader:
    """Read the whole header and tensor table: a truncated or corrupt file fails here, before llama.cpp sees it."""
    from genarm_local.core.native import check_gguf_path

    check_gguf_path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on bad bytes
        raise CorruptModelError(f"{path} is truncated or corrupt: {exc}") from exc
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() == "adapter":
        raise NotACheckpointError(f"{path} is a LoRA adapter, not a model; adapters are not quantized")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise CorruptModelError(f"{path} is truncated: tensor data ends at {end} bytes, file has {path.stat().st_size}")
    return reader


def run_quantizer(src: Path, dst: Path, file_type: gguf.LlamaFileType, allow_requantize: bool = False) -> None:
    """llama.cpp's quantizer from ``src`` to ``dst`` (both complete paths; no checks, no renames)."""
    from genarm_local.core.native import quantize_file

    quantize_file(src, dst, int(file_type), allow_requantize)


def test_load(path: Path) -> None:
    """The quantizer does not read the vocabulary; only a real load proves the file is usable."""
    from genarm_local.core.native import Model

    Model(path).close()


def quantize(
    input: str | os.PathLike,
    output: str | os.PathLike,
    type: str = "q4_k_m",
    force: bool = False,
    allow_requantize: bool = False,
) -> Path:
    """Quantize a float GGUF model to ``type``; the output appears only once it is complete and loads."""
    src, file_type = Path(input), parse_type(type)
    reader = inspect_input(src)
    quantized = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in _FLOAT_TENSORS})
    if quantized and not allow_requantize:
        raise InvalidOptionError(
            f"{src} is already quantized ({', '.join(quantized)}); quantizing again loses quality — convert from "
            "the original checkpoint, or pass --allow-requantize"
        )
    del reader  # release the memory map before llama.cpp opens the file
    with atomic_output(output, force) as tmp:
        run_quantizer(src, tmp, file_type, allow_requantize)
        test_load(tmp)
    return Path(output)
