"""Every verb's --help states real defaults once: no "(default: None)", "(default: [])" or a switch's True/False
after a help that already says what happens, and chat's help lists its / commands."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("verb", ["chat", "generate", "serve", "batch", "train", "calibrate", "convert"])
def test_help_states_each_default_once(verb, capsys):
    from genarm_local.cli import main

    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    text = " ".join(out.split())  # argparse wraps lines: join them
    for useless in ("(default: None)", "(default: [])", "(default: True)", "(default: False)"):
        assert useless not in text, useless
    # one flag's help, one "default": never "default: X (default: Y)"
    for entry in re.split(r"\n  (?=-)", out):
        assert len(re.findall(r"\bdefault:", " ".join(entry.split()))) <= 1, entry
    if verb == "chat":
        for command in ("/weights", "/prefer", "/load", "/save", "/quit"):
            assert command in text
    assert "(default: 0.8)" in text or verb in ("convert", "train", "calibrate")  # a real default is still shown
