"""The preference file that chat's /prefer and the server's POST /v1/preferences append to: rows train/data.py reads
back as the same conversations (line-breaking characters included), whole lines under concurrent writers, and one
clear error for what cannot be a preference or cannot be written."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from genarm_local.core.errors import InputNotFoundError, InvalidOptionError, OutputWriteError
from genarm_local.core.preferences import append_preference, preference_row, preferences_path
from genarm_local.train.data import load_preferences

# every character Python's str.splitlines breaks at, and the ones a text reader in universal-newline mode does
BREAKS = "\r \x0b \x0c \x1c \x1d \x1e \x85 \u2028 \u2029 \r\n"
CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me about the sea."},
    {"role": "assistant", "content": " It is wide."},
    {"role": "user", "content": f"And the sky?{BREAKS}é 字 🙂"},
]


def test_rows_read_back_as_the_same_conversation(tmp_path):
    path = tmp_path / "prefs.jsonl"
    written = append_preference(path, preference_row(CONVERSATION, f" Blue{BREAKS}and high.", " No."))
    assert written == path.absolute()
    append_preference(path, preference_row(CONVERSATION[:2], " Deep.", " Wet."))
    raw = path.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 2 and raw.endswith(b"\n")  # one line per row, nothing else
    data = load_preferences(path)
    assert data.format == "chat" and [pair.line for pair in data.pairs] == [1, 2]
    first, second = data.pairs
    assert first.prompt == CONVERSATION
    assert first.chosen == [{"role": "assistant", "content": f" Blue{BREAKS}and high."}]  # as generated
    assert first.rejected == [{"role": "assistant", "content": " No."}]
    assert second.prompt == CONVERSATION[:2] and second.chosen[0]["content"] == " Deep."


def test_a_line_left_unfinished_stays_apart(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "x"')  # someone's half-written line, no newline
    append_preference(path, preference_row(CONVERSATION[:2], "a", "b"))
    lines = path.read_text().split("\n")
    assert lines[0] == '{"prompt": "x"' and json.loads(lines[1])["chosen"][0]["content"] == "a" and lines[2] == ""


def _append_many(path: str, writer: int, n: int) -> None:
    for index in range(n):
        reply = f"writer {writer} row {index} " + "x" * 5000  # longer than a pipe buffer, in case it mattered
        append_preference(path, preference_row(CONVERSATION[:2], reply, "other"))


def test_concurrent_writers_never_interleave_inside_a_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    threads = [threading.Thread(target=_append_many, args=(path, w, 40)) for w in range(3)]
    processes = [
        multiprocessing.get_context("spawn").Process(target=_append_many, args=(str(path), w, 40)) for w in (3, 4)
    ]
    for worker in threads + processes:
        worker.start()
    for worker in threads + processes:
        worker.join()
    assert all(process.exitcode == 0 for process in processes)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line is whole JSON
    seen = sorted(row["chosen"][0]["content"].split(" x")[0] for row in rows)
    assert seen == sorted(f"writer {w} row {i}" for w in range(5) for i in range(40))
    assert len(load_preferences(path).pairs) == 200
    assert os.stat(path).st_mode & 0o077 == 0  # conversations: readable by their owner only


@pytest.mark.parametrize(
    "messages, chosen, rejected, words",
    [
        ([], "a", "b", "conversation"),
        ([{"role": "user"}], "a", "b", "role"),
        ([{"role": "user", "content": 3}], "a", "b", "role"),
        (CONVERSATION[:3], "a", "b", "not an assistant"),
        (CONVERSATION[:2], " ", "b", "empty"),
        (CONVERSATION[:2], "same", "same", "the same"),
    ],
)
def test_what_is_no_preference_is_refused(messages, chosen, rejected, words):
    with pytest.raises(InvalidOptionError, match=words):
        preference_row(messages, chosen, rejected)


def test_paths_that_cannot_be_written(tmp_path):
    with pytest.raises(InputNotFoundError, match="existing folder"):
        preferences_path(tmp_path / "no" / "prefs.jsonl")
    with pytest.raises(InputNotFoundError, match="existing folder"):
        preferences_path(tmp_path)
    assert preferences_path("prefs.jsonl") == Path.cwd() / "prefs.jsonl"
    with pytest.raises(OutputWriteError, match="cannot write preferences"):
        append_preference(tmp_path / "no" / "prefs.jsonl", preference_row(CONVERSATION[:2], "a", "b"))
