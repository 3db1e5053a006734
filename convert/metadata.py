"""Rewrite a GGUF file's metadata in place, atomically: an ARM's calibration (core/arm_metadata.py) is stored this
way after training or by `genarm-local calibrate`.

GGUF keeps its key-value pairs before the tensor data, so a new key means a new file: every other key and every
tensor (quantized blocks as they are, byte for byte) is copied into a temporary file beside the original, which is
then renamed over it. Any failure leaves the original untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import gguf

from genarm_local.core.arm_metadata import PREFIX, Calibration, calibration_fields
from genarm_local.core.atomic import atomic_output
from genarm_local.core.errors import CorruptModelError

_KINDS = {
    "f32": (gguf.GGUFValueType.FLOAT32, None),
    "u32": (gguf.GGUFValueType.UINT32, None),
    "str": (gguf.GGUFValueType.STRING, None),
    "f32[]": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
    "u32[]": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
}


def rewrite_metadata(path: str | os.PathLike, replace_prefix: str, fields: Mapping[str, tuple[object, str]]) -> Path:
    """Rewrite the GGUF at ``path`` with every key under ``replace_prefix`` dropped and ``fields`` (key -> (value,
    kind), kinds as in core.arm_metadata) added; tensors and all other keys unchanged. Atomic: temporary file +
    rename, the file's permissions kept."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError... on damaged files
        raise CorruptModelError(f"{path}: unreadable GGUF ({exc})") from exc
    architecture = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if architecture is None:
        raise CorruptModelError(f"{path}: no general.architecture key; not a llama.cpp model or adapter")
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    mode = path.stat().st_mode
    with atomic_output(path, force=True) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture.contents())  # writes general.architecture itself
        try:
            if alignment is not None:
                writer.data_alignment = int(alignment.contents())
            for key, field in reader.fields.items():
                # GGUF.* are the reader's view of the header; the writer adds general.architecture/alignment
                if key.startswith(("GGUF.", replace_prefix)) or key == gguf.Keys.General.ARCHITECTURE:
                    continue
                main_type = field.types[0]
                sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), main_type, sub_type)
            for key, (value, kind) in fields.items():
                main_type, sub_type = _KINDS[kind]
                writer.add_key_value(key, value, main_type, sub_type)
            for tensor in reader.tensors:
                # quantized tensors come as raw bytes: the writer derives their element shape from the byte shape
                writer.add_tensor_info(
                    tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in reader.tensors:
                writer.write_tensor_data(tensor.data)
        finally:
            writer.close()
    os.chmod(path, mode & 0o7777)  # a rewrite, not a new file: keep the original's permissions
    return path


def write_calibration(path: str | os.PathLike, calibration: Calibration) -> Path:
    """Store ``calibration`` in the ARM file at ``path`` (replacing any earlier one), atomically."""
    return rewrite_metadata(path, PREFIX, calibration_fields(calibration))
