"""The real `genarm-local convert` / `quantize` commands: outputs, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, cwd):
    # Run from a scratch directory so the source tree never shadows the installed package.
    return subprocess.run(
        [sys.executable, "-m", "genarm_local.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def assert_clean_failure(result, out_dir, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix == ".gguf"]
    assert leftovers == [], leftovers


@pytest.fixture()
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_quiet_merge_over_a_gguf_base_writes_a_readable_file(gguf_model, lora_adapter, out_dir):
    """--no-progress means no output on stderr at all (transformers' own GGUF loading bar and deprecation notices
    included), and the output gets the umask's permissions, not the temporary file's private 0600."""
    import os

    base = gguf_model("llama_small", "f32")
    out = out_dir / "merged.gguf"
    result = run_cli(
        "convert", base, "--lora", lora_adapter, "-o", out, "--outtype", "f16", "--no-progress", cwd=out_dir
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("wrote")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_convert_then_quantize_q4_k_m(hf_model, gguf_model, out_dir):
    from genarm_local.core.native import Model

    result = run_cli("convert", hf_model("llama_base"), "-o", out_dir / "m.gguf", "--outtype", "q4_k_m", cwd=out_dir)
    assert result.returncode == 0, result.stderr
    result = run_cli("quantize", gguf_model("llama_base", "f16"), out_dir / "q.gguf", "--type", "q4_k_m", cwd=out_dir)
    assert result.returncode == 0, result.stderr
    for path in (out_dir / "m.gguf", out_dir / "q.gguf"):
        with Model(path) as model:
            assert model.meta("general.file_type") == "15"  # MOSTLY_Q4_K_M
    assert (out_dir / "q.gguf").stat().st_size < 0.5 * gguf_model("llama_base", "f16").stat().st_size


def test_missing_path(out_dir):
    r = run_cli("convert", out_dir / "nope", "-o", out_dir / "x.gguf", cwd=out_dir)
    assert_clean_failure(r, out_dir, "nope", "no such file")


def test_directory_that_is_not_a_checkpoint(out_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("convert", empty, "-o", out_dir / "x.gguf", cwd=out_dir)
    assert_clean_failure(r, out_dir, "not a Hugging Face checkpoint")


def test_unsupported_architecture_lists_supported(hf_model, out_dir, tmp_path):
    src = tmp_path / "gpt2ish"
    shutil.copytree(hf_model("llama_small"), src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    r = run_cli("convert", src, "-o", out_dir / "x.gguf", cwd=out_dir)
    assert_clean_failure(r, out_dir, "GPT2LMHeadModel", "LlamaForCausalLM", "Gemma3ForCausalLM")


@pytest.mark.parametrize("adapter_only", [False, True])
def test_adapter_that_does_not_fit(hf_model, lora_adapter, out_dir, adapter_only):
    extra = ["--adapter-only"] if adapter_only else []
    base = hf_model("llama_base")
    r = run_cli("convert", base, "-o", out_dir / "x.gguf", "--lora", lora_adapter, *extra, cwd=out_dir)
    assert_clean_failure(r, out_dir, "lora_small", "another model")


def test_unknown_outtype(hf_model, out_dir):
    r = run_cli("convert", hf_model("llama_small"), "-o", out_dir / "x.gguf", "--outtype", "q3_xyz", cwd=out_dir)
    assert_clean_failure(r, out_dir, "q3_xyz", "q4_k_m")


def test_truncated_gguf_to_quantize(gguf_model, out_dir, tmp_path):
    data = gguf_model("llama_small", "f32").read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: len(data) // 2])
    r = run_cli("quantize", broken, out_dir / "q.gguf", cwd=out_dir)
    assert_clean_failure(r, out_dir, "broken.gguf", "truncated")


def test_non_gguf_to_quantize(out_dir, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    r = run_cli("quantize", junk, out_dir / "q.gguf", cwd=out_dir)
    assert_clean_failure(r, out_dir, "junk.gguf", "not a GGUF file")


def test_existing_output_needs_force(hf_model, out_dir):
    target = out_dir / "exists.gguf"
    target.write_bytes(b"keep me")
    r = run_cli("convert", hf_model("llama_small"), "-o", target, cwd=out_dir)
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert target.read_bytes() == b"keep me"
    r = run_cli("convert", hf_model("llama_small"), "-o", target, "--force", "--no-progress", cwd=out_dir)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes()[:4] == b"GGUF"
