"""Offline judges for the shipped ARMs' objectives: the rewards the preference pairs are built from and the
evaluation reports.

- positivity: vaderSentiment's compound score of the text, in [-1, 1] (Hutto & Gilbert 2014), a rule-based
  sentiment judge that runs anywhere without a model.
- sentence_tokens: how many tokens the continuation takes to finish its first sentence (the "concise" objective);
  a continuation that never finishes one counts all its tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from ..core.errors import require

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets), or at a line break.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")


@lru_cache(maxsize=1)
def _vader():
    vader = require("vaderSentiment.vaderSentiment", "demo")
    return vader.SentimentIntensityAnalyzer()


def positivity(text: str) -> float:
    """VADER compound sentiment of ``text``: -1 (negative) … +1 (positive)."""
    return float(_vader().polarity_scores(text)["compound"])


def first_sentence(text: str) -> str:
    """``text`` up to and including the end of its first sentence (all of it if none ends)."""
    match = SENTENCE_END.search(text)
    return text if match is None else text[: match.end()]


def sentence_tokens(pieces: Sequence[str]) -> int:
    """Tokens until the first sentence is finished, given the continuation's text piece per token."""
    text = ""
    for count, piece in enumerate(pieces, start=1):
        text += piece
        if SENTENCE_END.search(text.lstrip()):
            return count
    return len(pieces)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all n-grams in ``texts`` (Li et al. 2016), a diversity measure."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
