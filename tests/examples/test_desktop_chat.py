"""examples/desktop_chat.py in a real X server (Xvfb), driven by its --script hook as a user would drive it, against
the embedded Gemma-3-270M base with the shipped ARMs: type a message, press Send, watch both panes stream, press
Stop after the first pieces, and check that Stop ended both replies and the program exits 0; close the window in the
middle of a reply and check that it does not hang. The screenshot goes into the test's temporary directory (the
README's docs/desktop_chat.png is made by the command the README gives).

Xvfb comes from apt (`apt-get install -y xvfb python3-tk`; .ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "desktop_chat.py"
# seed 3: both replies run 60+ tokens, so Stop after the first pieces lands while both are still being written
PROMPT, SEED = "Describe the sea.", "3"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("Xvfb") is None, reason="the desktop example needs an X server: apt-get install -y xvfb"
    ),
]


@pytest.fixture(scope="module")
def display():
    """A private Xvfb; it picks a free display number and writes it to the pipe (-displayfd)."""
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=[write_end],
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    yield f":{number}"
    server.terminate()
    server.wait(timeout=10)


def run_example(display: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--script", PROMPT, "--seed", SEED, *args],
        env={**os.environ, "DISPLAY": display},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_stop_ends_both_streamed_replies(display, tmp_path):
    from PIL import Image

    screenshot = tmp_path / "desktop_chat.png"
    summary = run_example(display, "--stop-after", "1", "--screenshot", str(screenshot))

    assert summary["controls_shown"]  # the prompt entry, Send and Stop fit in the window
    assert set(summary["weights"]) == {"positive", "concise"}  # one slider per shipped ARM, at its weight
    for pane in ("base", "guided"):
        shown = summary["panes"][pane]
        assert shown["shown"].startswith(f"You: {PROMPT}\n"), shown
        # streamed: the pane had shown text before Stop was pressed, and Stop, not the reply's end, finished it
        assert shown["pieces"] >= 1 and shown["shown"].split("\n")[1].strip(), shown
        assert shown["finish_reason"] == "cancelled", shown
        assert "[stopped]" in shown["shown"], shown
    with Image.open(screenshot) as image:
        assert image.size[0] >= 800 and image.size[1] >= 400
        assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 8  # text painted, not a blank window


def test_closing_the_window_mid_reply_ends_promptly(display):
    # closed as the window manager's close button does (WM_DELETE_WINDOW): the model is closed with both replies
    # running, and every worker thread has seen its stream end before the window goes
    summary = run_example(display, "--close-after", "2")
    assert summary == {"closed": True, "workers_alive": 0}
