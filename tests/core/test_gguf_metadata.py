"""The header reader the engine uses before loading (general.type, an ARM's calibration) against gguf-py's full
GGUFReader, and its errors on damaged files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest


def plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def test_every_key_reads_as_gguf_py_reads_it(gguf_model):
    from genarm_local.core.gguf_metadata import read_metadata

    path = gguf_model("llama_small", "q8_0")
    ours = read_metadata(path, lambda key: True)
    theirs = {k: plain(f.contents()) for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys() and len(ours["tokenizer.ggml.tokens"]) > 100
    for key, value in theirs.items():
        if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            np.testing.assert_allclose(ours[key], value, rtol=1e-7)
        else:
            assert ours[key] == value, key
    assert read_metadata(path, lambda key: key == "general.architecture") == {"general.architecture": "llama"}


def test_damaged_headers_are_one_error(gguf_model, tmp_path):
    from genarm_local.core.errors import CorruptModelError
    from genarm_local.core.native import gguf_header

    data = gguf_model("llama_small", "f32").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:2000])  # inside the vocabulary
    with pytest.raises(CorruptModelError, match="ends early|past the end"):
        gguf_header(cut)
    version = tmp_path / "version.gguf"
    version.write_bytes(data[:4] + (99).to_bytes(4, "little") + data[8:])
    with pytest.raises(CorruptModelError, match="version 99"):
        gguf_header(version)
