"""Running the real `genarm-local` command in a subprocess, for the chat / generate / batch tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROMPT = "The history of the bicycle"
# One thread and exact arithmetic (f32 KV cache, no flash attention): a batched row and a single generation of the
# same prompt and seed give the same tokens.
EXACT = ["-t", "1", "--kv-cache-type", "f32", "-fa", "off"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "genarm_local.cli", *map(str, args)]


def run_cli(*args, cwd: Path, input: str | None = None, env: dict | None = None, timeout: float = 120):
    # From a scratch directory, as in test_cli_convert.py: the source tree never shadows the installed package.
    return subprocess.run(cli(*args), cwd=cwd, input=input, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(result, *words) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def model_files(gguf_model, hf_model, lora_adapter, workdir) -> dict[str, Path]:
    """The tiny base, a full-model ARM of its vocabulary, and a GGUF LoRA adapter ARM (shared with test_api.py)."""
    from genarm_local.convert import convert

    adapter = workdir / "engine-lora-adapter.gguf"
    if not adapter.exists():
        convert(hf_model("llama_small"), adapter, outtype="f32", lora=lora_adapter, adapter_only=True, progress=False)
    return {"base": gguf_model("llama_small", "f32"), "big": gguf_model("llama_base", "f32"), "lora": adapter}
