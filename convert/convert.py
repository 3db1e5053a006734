"""HF checkpoint or GGUF (+ PEFT LoRA) → GGUF model or GGUF LoRA adapter (the `genarm-local convert` verb)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from genarm_local.core.atomic import atomic_output, check_output
from genarm_local.core.errors import InputNotFoundError, InvalidOptionError

from .checkpoint import open_source, read_adapter
from .export import BF16, F16, F32, export_adapter, export_model
from .quantize import QUANT_TYPES, run_quantizer, test_load

FLOAT_TYPES = {"f32": F32, "f16": F16, "bf16": BF16}
OUTTYPES = list(QUANT_TYPES)


def _intermediate_type(source_dtype: str):
    """The float type a quantized export passes through: the source's own precision, so nothing is rounded twice."""
    return {"bfloat16": BF16, "float16": F16}.get(source_dtype, F32)


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    outtype: str = "f16",
    lora: str | os.PathLike | None = None,
    adapter_only: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``source`` (an HF checkpoint directory or a GGUF file) to a GGUF file at ``output``.

    With ``lora`` the PEFT adapter is merged into the weights; with ``adapter_only`` too, the adapter itself is
    written as a GGUF LoRA adapter for the base (llama_adapter_lora_init). Quantized types go through llama.cpp's
    quantizer. The output appears only when complete and loaded back by llama.cpp.
    """
    source, output = Path(source), Path(output)
    outtype = outtype.lower()
    if outtype not in QUANT_TYPES:
        raise InvalidOptionError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if adapter_only and lora is None:
        raise InvalidOptionError("--adapter-only needs --lora ADAPTER_DIR")
    if adapter_only and outtype not in FLOAT_TYPES:
        raise InvalidOptionError(f"adapters are written as f32, f16 or bf16, not {outtype}")
    if not source.exists():
        raise InputNotFoundError(f"{source}: no such file or directory")
    check_output(output, force)  # fail before minutes of loading, not after

    if adapter_only:
        adapter = read_adapter(Path(lora))
        base = open_source(source) if source.is_dir() else _gguf_base(source, progress)
        with base as ckpt, atomic_output(output, force) as tmp:
            export_adapter(ckpt, adapter, tmp, FLOAT_TYPES[outtype], progress, label=output.name)
            if source.is_file():  # llama.cpp checks adapter tensors against a loaded base; we have one
                test_load_adapter(source, tmp)
        return output

    with open_source(source, Path(lora) if lora else None, progress) as ckpt, atomic_output(output, force) as tmp:
        if outtype in FLOAT_TYPES:
            export_model(ckpt, tmp, FLOAT_TYPES[outtype], progress, label=output.name)
        else:
            with tempfile.TemporaryDirectory(dir=output.parent, prefix=".genarm-convert-") as work:
                intermediate = Path(work) / "model.gguf"
                export_model(ckpt, intermediate, _intermediate_type(ckpt.source_dtype), progress, label=output.name)
                run_quantizer(intermediate, tmp, QUANT_TYPES[outtype])
        test_load(tmp)
    return output


def _gguf_base(source: Path, progress: bool = True):
    """A GGUF base for --adapter-only: only its architecture, config and tensor shapes are needed."""
    from .checkpoint import checkpoint_from_model, load_transformers_model

    model, reader = load_transformers_model(source, progress)
    return checkpoint_from_model(model, source, reader)


def test_load_adapter(base: Path, adapter: Path) -> None:
    """Load ``adapter`` over the GGUF ``base`` in llama.cpp: proof that its tensors fit the base."""
    from genarm_local.core.native import Adapter, Model

    with Model(base) as model:
        Adapter(model, adapter).close()
