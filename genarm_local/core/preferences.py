"""Preferences recorded where you chat: which of two replies to the same conversation was better, one row per choice
appended to a JSONL file that `genarm-local train --data FILE` trains an ARM from.

A row is TRL's conversational preference format, which train/data.py reads as chat data:

    {"prompt": [messages up to the user's last turn, system message included],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", "content": ...}]}

At training time the messages are rendered with the model's chat template, as the engine rendered them when the
replies were generated, so the ARM learns on the very tokens it will see. Replies are kept as generated (leading
whitespace included).

One os.write of one complete line to a file opened with O_APPEND, under an exclusive lock (flock) held from the look
at the file's last byte to the write: concurrent writers (a chat and a server on the same file) never interleave
inside a line nor see each other's line half-written, and a failed write leaves no half line behind. json.dumps
escapes every non-ASCII character, so no line separator a reader might split on (U+2028, U+0085, a lone \\r) can
appear inside a row's line.
"""

from __future__ import annotations

import json
import os

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the check below is then only as good as the timing
    fcntl = None
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InputNotFoundError, InvalidOptionError, OutputWriteError

# In the directory the chat or server was started from, where `genarm-local train --data genarm-prefs.jsonl` finds it.
DEFAULT_PATH = "genarm-prefs.jsonl"


def preferences_path(path: str | os.PathLike) -> Path:
    """The absolute path of a preference file to append to; a folder that does not exist is refused now, before
    the first choice, not after it."""
    path = Path(path).expanduser().absolute()
    if path.is_dir() or not path.parent.is_dir():
        raise InputNotFoundError(f"--prefs {path}: give a file in an existing folder")
    return path


def preference_row(messages: Sequence[Mapping[str, str]], chosen: str, rejected: str) -> dict:
    """The row for a choice between two replies to ``messages`` (the conversation up to the user's turn)."""
    if not messages:
        raise InvalidOptionError("a preference needs the conversation the two replies answer")
    for message in messages:
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise InvalidOptionError('each message needs a "role" and a "content", both strings')
    if messages[-1]["role"] == "assistant":
        raise InvalidOptionError("the conversation must end with the turn the two replies answer, not an assistant's")
    if not chosen.strip() or not rejected.strip():
        raise InvalidOptionError("one of the two replies is empty; there is nothing to prefer")
    if chosen == rejected:
        raise InvalidOptionError("the two replies are the same; there is nothing to prefer")
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def append_preference(path: str | os.PathLike, row: Mapping) -> Path:
    """Append ``row`` to the JSONL file at ``path`` (created if missing, readable by its owner only: it holds the
    conversations) as one line; returns the file's absolute path."""
    path = Path(path).expanduser().absolute()
    line = json.dumps(row) + "\n"  # ensure_ascii: the line is ASCII, its only newline the last character
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as exc:
        raise OutputWriteError(f"cannot write preferences to {path}: {exc.strerror or exc}") from None
    try:
        if fcntl is not None:  # the look at the last byte and the write are one step for every writer that locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.lseek(fd, 0, os.SEEK_END)
        if end:
            os.lseek(fd, end - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # a line someone left unfinished stays a line of its own
                line = "\n" + line
        data = line.encode("ascii")
        written = os.write(fd, data)
        if written != len(data):  # cut short (a full disk): take the part back
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
            raise OutputWriteError(f"cannot write preferences to {path}: the write was cut short (is the disk full?)")
    except OSError as exc:
        raise OutputWriteError(f"cannot write preferences to {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return path
