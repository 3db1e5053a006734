"""Preference labels for the shipped ARMs: pairs that punish what a reader punishes, then rank the objective.

A judge alone is easy to game: the first shipped positive ARM was trained on best-vs-worst VADER pairs and learned
that repeating "I love it!" maximises VADER. So a candidate is first checked for fluency (``flaws``); the objective
(positivity, or a short first sentence) only ranks candidates that have no flaw. Two kinds of pair per prompt:

- objective pair: both candidates fluent; the chosen one clearly better on the objective;
- fluency pair: the chosen one fluent and good on the objective, the rejected one flawed and, among the flawed,
  the *best* on the objective, so that the ARM learns that reward bought with a flaw is a loss (the reward hack
  itself is the negative example).

For the positive objective the chosen candidate is drawn at random among the clearly positive fluent ones instead
of always the most positive: the most positive by VADER is the one with the most positive words, the stock phrase
the previous ARM converged on; any clearly positive fluent text is what a reader prefers.
The same for concise: the chosen one is drawn among the fluent candidates whose first sentence is short (at most
SHORT tokens), not always the shortest (" amazing!").

Both ARMs train on whole continuations. Training the concise ARM on first sentences only was tried and is worse:
with nothing after the first sentence to learn from, the ARM generalised "end the sentence now" to every sentence
and the guided text looped in three-word sentences (degenerate rate 0.83 at α = 1, against 0.19 with whole
continuations).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from genarm_local.evaluation.fluency import echo_share, fragments, is_degenerate, is_empty, junk_spans, rep_n
from genarm_local.evaluation.judges import positivity, sentence_tokens

FLUENT_REP4 = 0.1  # stricter than the degenerate rule (0.2): a chosen text should not loop at all
ECHO_SHARE = 0.5  # a chat reply whose word trigrams are mostly the user's own is an echo
POSITIVE = 0.5  # VADER compound of a clearly positive text (VADER's own cut-off for "positive" is 0.05)
SHORT = 8  # tokens to finish the first sentence of a clearly concise text (the base's mean is about 13)
# What follows a finished chat reply in the plain transcript (where `genarm-local chat` stops): trained after every
# reply that ended, so that the ARMs end their turns as the base does instead of writing on.
CHAT_TURN_END = "\nUser:"


def flaws(text: str, prompt: str, echo_source: str | None = None) -> list[str]:
    """What a reader would hold against ``text`` as a continuation of ``prompt`` (empty: fluent); a chat reply
    that mostly repeats ``echo_source`` (the user's turn, earlier replies) is an echo."""
    found = []
    if is_empty(text):
        found.append("empty")  # is_degenerate counts it too: named once, as what it is
    elif is_degenerate(text):
        found.append("degenerate")
    if rep_n(text, 4) > FLUENT_REP4:
        found.append("repetition")
    if junk_spans(text):
        found.append("junk")
    if fragments(text, prompt)[0]:
        found.append("fragment")
    if echo_source is not None and echo_share(text, echo_source) >= ECHO_SHARE:
        found.append("echo")
    return found


def response(row: dict) -> str:
    """The candidate's response as trained on: a chat reply that ended (at its line break) is followed by
    CHAT_TURN_END; anything cut at the token limit stays open (trained without EOS)."""
    ended = "turn" in row and row["finish"] == "stop"
    return row["text"] + CHAT_TURN_END if ended else row["text"]


def judge(row: dict, objective: str) -> dict:
    """One sampled candidate ({prompt, text, pieces, finish, and for chat turn, echo_source}) judged for
    ``objective``: the trained text, its flaws and its score (higher is better)."""
    text = response(row)
    if objective == "positive":
        score = positivity(row["text"])
    else:  # fewer tokens to finish the first sentence is better
        score = -sentence_tokens(row["pieces"])
    body = text.removesuffix(CHAT_TURN_END)
    return {"train_text": text, "flaws": flaws(body, row["prompt"], row.get("echo_source")), objective: score}


def _pair(prompt: str, chosen: dict, rejected: dict, objective: str, kind: str) -> dict:
    return {
        "prompt": prompt,
        "chosen": chosen["train_text"],
        "rejected": rejected["train_text"],
        "kind": kind,
        "margin": chosen[objective] - rejected[objective],
        "rejected_flaws": rejected["flaws"],
    }


def prompt_pairs(
    prompt: str, candidates: Sequence[dict], objective: str, min_gap: float, rng: random.Random
) -> list[dict]:
    """At most one objective pair and one fluency pair for one prompt's candidates judged for ``objective``."""
    fluent = sorted((c for c in candidates if not c["flaws"]), key=lambda c: c[objective])
    flawed = sorted((c for c in candidates if c["flaws"]), key=lambda c: c[objective])
    if not fluent:
        return []
    threshold = POSITIVE if objective == "positive" else -SHORT
    chosen = rng.choice([c for c in fluent if c[objective] >= threshold] or fluent[-1:])
    pairs = []
    worst = fluent[0]
    if chosen[objective] - worst[objective] >= min_gap and chosen["train_text"] != worst["train_text"]:
        pairs.append(_pair(prompt, chosen, worst, objective, "objective"))
    if flawed and flawed[-1]["train_text"] != chosen["train_text"]:
        pairs.append(_pair(prompt, chosen, flawed[-1], objective, "fluency"))
    return pairs


def make_pairs(rows: Sequence[dict], objective: str, min_gap: float, seed: int) -> list[dict]:
    """Pairs for ``objective`` over all prompts, in prompt order (rows: sampled candidates with "prompt")."""
    rng = random.Random(f"{objective}-{seed}")
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append({**row, **judge(row, objective)})
    pairs = []
    for prompt, group in by_prompt.items():
        pairs += prompt_pairs(prompt, group, objective, min_gap, rng)
    return pairs


def margin_summary(pairs: Sequence[dict]) -> dict:
    """How many pairs of each kind, the quartiles of their objective margins, and the rejected flaws' counts."""
    summary: dict[str, object] = {}
    for kind in ("objective", "fluency"):
        margins = sorted(p["margin"] for p in pairs if p["kind"] == kind)
        quartiles = [round(margins[int(q * len(margins))], 3) for q in (0.25, 0.5, 0.75)] if margins else []
        summary[kind] = {"pairs": len(margins), "margin_quartiles": quartiles}
    counts: dict[str, int] = {}
    for pair in pairs:
        for flaw in pair["rejected_flaws"]:
            counts[flaw] = counts.get(flaw, 0) + 1
    summary["rejected_flaws"] = counts
    return summary
