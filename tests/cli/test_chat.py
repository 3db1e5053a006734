"""The real `genarm-local chat`, scripted through a pipe: turns with a kept history and a reused KV cache, live
/weights, /reset, /save, unknown commands, --compare, and Ctrl-C (SIGINT) in the middle of a reply."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time

import pytest
from cli_helpers import EXACT, assert_one_line_error, cli, model_files, run_cli

QUESTION = "Tell me about the bicycle."


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


def greedy_chat(files, *extra) -> list[str]:
    return ["chat", "-m", files["base"], "-n", 12, "--temp", 0, *EXACT, *extra]


def test_scripted_session(files, tmp_path):
    script = [
        QUESTION,
        "And then?",
        "/save first.json",
        "/reset",
        QUESTION,
        "/save again.json",
        "/weights",
        "/weights kind=0",
        "/weights nobody=1",
        "/frobnicate",
        "/reset",
        QUESTION,
        "/save unguided.json",
    ]
    # a system prompt longer than one prefill chunk, so the second turn has history to reuse
    system = ["-sys", "You answer questions about bicycles, briefly and kindly. " * 6]
    args = greedy_chat(files, "--arm", f"{files['lora']}:2", "--arm-name", "kind", "--verbose", *system)
    result = run_cli(*args, cwd=tmp_path, input="\n".join(script) + "\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    load = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    first, again, unguided = load("first.json"), load("again.json"), load("unguided.json")
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert first["messages"][1]["content"] == QUESTION and first["weights"] == {"kind": 2.0}
    reply = first["messages"][2]["content"]
    assert reply and again["messages"] == first["messages"][:3]  # /reset: the same question, the same greedy reply
    assert unguided["weights"] == {"kind": 0.0}
    assert unguided["messages"][2]["content"] != reply  # /weights kind=0 changed the output...
    alone = run_cli(
        "generate", "-m", files["base"], "--chat", "-p", QUESTION, "-n", 12, "--temp", 0, *EXACT, *system,
        cwd=tmp_path,
    )  # fmt: skip
    assert unguided["messages"][2]["content"] + "\n" == alone.stdout  # ...to the base's own reply
    # the second turn reused the cached history in whole chunks (--verbose prints the timings)
    timings = [line for line in result.stderr.splitlines() if line.startswith("prompt:")]
    (total, decoded) = (int(word) for word in timings[1].replace(",", "").split()[1:4:2])
    assert len(timings) == 4 and total > 128 and decoded <= total - 128
    assert "unknown command /frobnicate" in result.stderr and "nobody" in result.stderr
    assert "weights: kind=2" in result.stderr and "weights: kind=0" in result.stderr


def test_compare_shows_the_base_reply(files, tmp_path):
    args = greedy_chat(files, "--arm", f"{files['lora']}:2", "--compare")
    result = run_cli(*args, cwd=tmp_path, input=f"{QUESTION}\n/save t.json\n")
    assert result.returncode == 0, result.stderr
    message = json.loads((tmp_path / "t.json").read_text())["messages"][1]
    # shown without the reply's leading whitespace, stored as generated
    assert result.stdout == f"[base] {message['base_reply'].lstrip()}\n[guided] {message['content'].lstrip()}\n"
    assert message["base_reply"] != message["content"]
    side = run_cli(*args, "--compare-layout", "side", cwd=tmp_path, input=f"{QUESTION}\n")
    assert side.returncode == 0 and "[base]" in side.stdout and " | [guided]" in side.stdout
    assert_one_line_error(run_cli(*greedy_chat(files, "--compare"), cwd=tmp_path, input=""), "--compare")


class Output:
    """The child's stdout, read on a thread so the test can wait for text without blocking."""

    def __init__(self, stream):
        self.text = ""
        self._chunks: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for char in iter(lambda: stream.read(1), ""):
            self._chunks.put(char)

    def wait_for(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; output so far: {self.text!r}"
            try:
                self.text += self._chunks.get(timeout=remaining)
            except queue.Empty:
                pass
        return self.text


def saved_reply(path, proc, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return json.loads(path.read_text())["messages"][1]
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no transcript at {path}; chat exited with {proc.poll()}")


def foreground_sigint() -> None:
    """In the child before it starts: SIGINT as a terminal gives a foreground program (its default). A process
    inherits an ignored SIGINT (a background job of a non-interactive shell; whatever ran earlier in this pytest
    process), and Python then installs no KeyboardInterrupt handler: Ctrl-C at the prompt would be ignored, as
    Unix asks for a background job, which is not what this test is about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_stops_the_reply_and_the_session_goes_on(files, tmp_path):
    # A long reply (the grammar rules out an early end of turn) from a larger base, so that SIGINT lands mid-reply.
    args = ["chat", "-m", files["big"], "--arm", files["base"], "-c", 512, "-n", 480, "-t", 1]
    proc = subprocess.Popen(
        cli(*args, "--grammar", "root ::= [a-z ]{400,}"), preexec_fn=foreground_sigint,
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0,
    )  # fmt: skip
    try:
        out, err = Output(proc.stdout), Output(proc.stderr)
        proc.stdin.write("Tell me a long story\n")
        proc.stdin.flush()
        out.wait_for(lambda text: len(text) >= 3)  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        out.wait_for(lambda text: text.endswith("\n"))
        assert out.text.endswith(" [interrupted]\n"), out.text
        proc.stdin.write("/save t.json\n")
        proc.stdin.flush()
        reply = saved_reply(tmp_path / "t.json", proc)
        assert reply["interrupted"] is True and 0 < len(reply["content"]) < 400
        assert out.text == reply["content"].lstrip() + " [interrupted]\n"
        # The session goes on after the interrupted reply: a command works; then Ctrl-C at the prompt leaves cleanly.
        proc.stdin.write("/weights\n")
        proc.stdin.flush()
        err.wait_for(lambda text: "weights:" in text)  # done: chat waits for the next line
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in err.wait_for(lambda text: True)
    finally:
        proc.kill()
        proc.wait()
