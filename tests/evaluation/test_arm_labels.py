"""The shipped ARMs' preference labels (bench/arm_labels.py) on hand-made candidates: a flaw outranks the judge."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("vaderSentiment")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from arm_labels import flaws, judge, prompt_pairs, response  # noqa: E402
from build_arms import chat_prompt  # noqa: E402


def candidate(prompt: str, text: str, objective: str) -> dict:
    row = {"prompt": prompt, "text": text, "pieces": text.split(" "), "finish": "length"}
    return {**row, **judge(row, objective)}


def test_flaws_name_what_a_reader_punishes():
    prompt = "The hotel we stayed at was"
    assert flaws(" small but clean, and the staff were kind.", prompt) == []
    assert "repetition" in flaws(" great, I love it, I love it, I love it.", prompt)
    assert flaws(" lovely, and the staff were kind<br> to us and the rooms were clean.", prompt) == ["junk"]
    assert flaws(". Nice.", prompt) == ["fragment"]  # "The hotel we stayed at was." and "Nice."
    assert flaws(" ", prompt) == ["empty"]
    turn = "I got a promotion today."
    assert flaws(" I got a promotion today.", f"User: {turn}\nAssistant:", turn) == ["echo"]
    assert flaws(" Congratulations, that is great news!", f"User: {turn}\nAssistant:", turn) == []


def test_positive_pairs_rank_positivity_among_fluent_and_reject_the_hack():
    prompt = "The hotel we stayed at was"
    kind = candidate(prompt, " lovely, and the staff were kind and helpful.", "positive")
    rude = candidate(prompt, " dirty, and the staff were rude to us.", "positive")
    hack = candidate(prompt, " great great great great great great great, love love love it.", "positive")
    assert hack["positive"] > kind["positive"] > rude["positive"] and hack["flaws"]
    pairs = prompt_pairs(prompt, [kind, rude, hack], "positive", 0.5, random.Random(0))
    assert [(p["kind"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("objective", kind["text"], rude["text"]),
        ("fluency", kind["text"], hack["text"]),
    ]
    assert pairs[1]["margin"] < 0  # the flawed text scored higher with the judge: the reward hack is the loser


def test_concise_prefers_a_short_complete_sentence_over_a_fragment():
    prompt = "The bus to work was"
    short = candidate(
        prompt, " late again. We waited in the rain for it.", "concise"
    )  # 2 pieces to finish the sentence
    long = candidate(prompt, " slower than usual because of the roadworks on the bridge near the station.", "concise")
    stub = candidate(prompt, ". It.", "concise")  # 1 piece: shorter, but a fragment
    assert stub["concise"] > short["concise"] > long["concise"]
    pairs = prompt_pairs(prompt, [short, long, stub], "concise", 3, random.Random(0))
    assert [(p["kind"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("objective", short["text"], long["text"]),
        ("fluency", short["text"], stub["text"]),
    ]


def test_a_finished_chat_reply_is_trained_with_the_next_turn():
    turn = "What should I cook tonight?"
    reply = {"prompt": chat_prompt(turn), "turn": turn, "text": " Pasta with beans.", "finish": "stop"}
    assert response(reply) == " Pasta with beans.\nUser:"
    assert response({**reply, "finish": "length"}) == " Pasta with beans."  # cut at the token limit: left open
    assert response({"prompt": "The bus was", "text": " late.", "finish": "stop"}) == " late."  # not a chat


def test_no_pair_without_a_fluent_candidate_or_a_clear_margin():
    prompt = "The hotel we stayed at was"
    loop = candidate(prompt, " fine, fine, fine, fine, fine, fine, fine, fine.", "positive")
    assert prompt_pairs(prompt, [loop], "positive", 0.5, random.Random(0)) == []
    a = candidate(prompt, " small, with a view of the harbour.", "positive")
    b = candidate(prompt, " small, with a view of the old harbour wall.", "positive")
    assert abs(a["positive"] - b["positive"]) < 0.5
    assert prompt_pairs(prompt, [a, b], "positive", 0.5, random.Random(0)) == []
