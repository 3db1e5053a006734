"""Preferences learned where you chat, through the real `genarm-local chat`: /prefer after a --compare turn appends
the conversation and its two replies to the --prefs file, which train reads back as the very prompts the chat
rendered (and trains on); /load brings a new ARM into the running chat."""

from __future__ import annotations

import json

import pytest
from cli_helpers import EXACT, assert_one_line_error, model_files, run_cli

QUESTION = "Tell me about the bicycle."
SYSTEM = "You answer questions about bicycles."


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


def greedy_chat(files, *extra) -> list:
    return ["chat", "-m", files["base"], "-n", 12, "--temp", 0, *EXACT, *extra]


@pytest.fixture(scope="module")
def session(files, tmp_path_factory):
    """A compared chat of two turns, each with a choice, and the mistakes one can make on the way."""
    cwd = tmp_path_factory.mktemp("prefer")
    script = [
        "/prefer guided",  # no turn yet
        QUESTION,
        "/prefer sideways",
        "/prefer guided",
        "/prefer base",  # that turn is recorded already
        "And then?",
        "/prefer BASE",
        "/help",
        "/save t.json",
    ]
    args = greedy_chat(files, "--arm", f"kind={files['lora']}:2", "--compare", "-sys", SYSTEM, "--prefs", "p.jsonl")
    result = run_cli(*args, cwd=cwd, input="\n".join(script) + "\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    transcript = json.loads((cwd / "t.json").read_text())["messages"]
    rows = [json.loads(line) for line in (cwd / "p.jsonl").read_text().splitlines()]
    return cwd, result.stderr, transcript, rows


def test_each_choice_is_one_row_of_the_conversation_so_far(session):
    cwd, stderr, transcript, rows = session
    system, question, first, again, second = transcript
    assert [first["preferred"], second["preferred"]] == ["guided", "base"]
    assert first["content"] != first["base_reply"] and second["content"] != second["base_reply"]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    history = [system, question, {"role": "assistant", "content": first["content"]}, again]
    assert rows == [
        {"prompt": [system, question], "chosen": reply(first["content"]), "rejected": reply(first["base_reply"])},
        {"prompt": history, "chosen": reply(second["base_reply"]), "rejected": reply(second["content"])},
    ]
    path = cwd / "p.jsonl"
    assert f"guided preferred; preference pairs go to {path}" in stderr  # the file, shown at the first choice
    assert "base preferred (2 pairs recorded in this chat)" in stderr
    assert f"preferences go to {path}" in stderr  # and in /help
    for words in ("no reply to prefer yet", "/prefer base or /prefer guided, got 'sideways'", "already recorded"):
        assert words in stderr


def test_train_reads_the_prompts_the_chat_rendered(session, files):
    """The rows are chat data: rendered with the model's template for training, they are the tokens the chat
    decoded for each turn, and the replies follow them as generated."""
    from genarm_local import GuidedModel
    from genarm_local.train.data import chat_renderer, load_preferences, load_tokenizer, tokenize_pairs

    cwd, _, transcript, rows = session
    data = load_preferences(cwd / "p.jsonl")
    assert data.format == "chat" and not data.skipped and len(data.pairs) == 2
    tokenizer = load_tokenizer(files["base"])
    pairs = tokenize_pairs(data, tokenizer, 512, 256, chat_renderer(tokenizer))
    with GuidedModel(files["base"], {}, n_ctx=512, n_threads=1) as model:
        for pair, row in zip(pairs, rows, strict=True):
            assert pair.prompt == model.chat_prompt(row["prompt"]).tokens
            whole = model.chat_prompt(row["prompt"] + row["chosen"] + [{"role": "user", "content": "x"}]).tokens
            assert whole[: len(pair.prompt) + len(pair.chosen)] == pair.prompt + pair.chosen


@pytest.mark.slow
def test_train_runs_on_the_chat_preferences(session, files):
    from genarm_local.train import TrainConfig, train

    cwd = session[0]
    config = TrainConfig(
        model=str(files["base"]), data=str(cwd / "p.jsonl"), output=str(cwd / "arm"), max_steps=1, eval_split=0,
        progress=False,
    )  # fmt: skip
    result = train(config)
    assert (result.output / "adapter_model.safetensors").is_file()


def test_prefer_needs_compare_and_a_writable_file(files, tmp_path):
    result = run_cli(*greedy_chat(files, "--arm", files["lora"]), cwd=tmp_path, input=f"{QUESTION}\n/prefer base\n")
    assert result.returncode == 0 and "start the chat with --compare" in result.stderr
    assert not (tmp_path / "genarm-prefs.jsonl").exists()
    nowhere = run_cli(*greedy_chat(files, "--prefs", tmp_path / "no" / "p.jsonl"), cwd=tmp_path, input="")
    assert_one_line_error(nowhere, "--prefs", "existing folder")


def test_load_brings_an_arm_into_the_running_chat(files, tmp_path):
    script = ["/load nope.gguf", "/load 2:x", f"/load big={files['big']}:0.5", "/weights", QUESTION, "/save t.json"]
    args = greedy_chat(files, "--arm", f"kind={files['lora']}:2")
    result = run_cli(*args, cwd=tmp_path, input="\n".join(script) + "\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "/load: ARM nope.gguf: no such file" in result.stderr
    assert "/load: the weight 'x' is not a number" in result.stderr
    assert f"loaded ARM big from {files['big']}" in result.stderr
    assert result.stderr.count("weights: kind=2 big=0.5") == 2  # shown on loading, and by /weights
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["arms"] == {"kind": str(files["lora"]), "big": str(files["big"])}
    assert saved["weights"] == {"kind": 2.0, "big": 0.5}
    # the reply is the one both ARMs give when loaded at start-up
    both = ["--arm", f"{files['lora']}:2", "--arm", f"{files['big']}:0.5"]
    alone = run_cli("generate", "-m", files["base"], *both, "--chat", "-p", QUESTION, "-n", 12, "--temp", 0, *EXACT,
                    cwd=tmp_path)  # fmt: skip
    assert saved["messages"][1]["content"] + "\n" == alone.stdout
