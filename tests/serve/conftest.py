"""Fixtures of the server tests; the server process itself is in live_server.py."""

from __future__ import annotations

import pytest
from cli_helpers import model_files


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)
