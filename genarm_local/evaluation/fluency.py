"""Fluency judges: what a reader punishes in generated text, measured without a model.

Reward guidance can buy reward with degenerate text (loops, stock phrases, markup); these measures put that next to
every reward figure. All work on words: lower-cased runs of letters/digits (apostrophes inside a word kept), so a
measure does not depend on the tokenizer and punctuation does not hide a repeat ("it!" and "it." are one word).

- rep_n (rep-4): share of repeated word n-grams within one text, 1 − unique/total (seq-rep-n of Welleck et al.
  2019, "Neural Text Generation with Unlikelihood Training", on words instead of BPE tokens).
- line_repeats / repeated_line_share / distinct_lines: repeated non-empty lines (case and spacing ignored).
- junk_spans / markup_spam: HTML-like tags and entities, markdown markers, control, format, private-use and
  replacement characters, runs of punctuation, runs of emoji and other symbols.
- fragments: finished sentences under 3 words, or ending on a word no English sentence ends on ("and.", "the."),
  or the prompt's sentence ended by the continuation without a word of its own ("The bus to work was" + ".").
- foreign_script_share: share of letters outside the expected script (Latin for English): a language switch.
- echo_share: how much of a reply repeats the message it answers (a chat reply that parrots the user).
- is_degenerate: the definition the evaluations report as "degenerate rate" (see DEGENERATE).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# As judges.SENTENCE_END: . ! or ? (optionally closed by quotes/brackets) before a space or the end, or a line break.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")
# A speaker label ending a prompt ("User: …\nAssistant:") is not the start of the reply's first sentence.
SPEAKER_LABEL = re.compile(r"^\s*\w+:\s*$")
FRAGMENT_WORDS = 3
# Words an English sentence does not end on: articles, possessive determiners, coordinating conjunctions, "I".
DANGLING = frozenset("a an the my your our their its and or but nor i".split())
# A full stop after these (or after a single capital letter, an initial) does not end the sentence.
ABBREVIATIONS = frozenset("dr mr mrs ms mt st jr sr prof gen rev no vs".split())
ABBREVIATION_BEFORE = re.compile(r"(?:^|[^\w.])([A-Za-z]{1,4})$")

MARKUP = re.compile(
    r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>\n]{0,80})?/?>"  # HTML/XML-like tags
    r"|&(?:[A-Za-z]{2,8}|#\d{2,6});"  # HTML entities
    r"|\*{2,}|_{2,}|`{3,}|~{2,}"  # markdown emphasis, code fences, strike-through
    r"|^[ \t]*#{1,6}(?=[ \t])"  # markdown headings
    r"|\[[^\]\n]{0,80}\]\([^)\n]{0,200}\)",  # markdown links
    re.MULTILINE,
)
PUNCTUATION_RUN = re.compile(r"([^\w\s])\1{3,}|[^\w\s]{6,}")  # "!!!!", "?!?!?!" (an ellipsis "..." is fine)
JUNK_CATEGORIES = {"Cc", "Cf", "Co", "Cs", "Cn"}  # control, format (zero-width…), private use, surrogate, unassigned
SYMBOL_RUN = 3  # this many symbols (emoji, dingbats) in a row, spaces between them allowed
MARKUP_SPAM_SPANS = 3
MARKUP_SPAM_SHARE = 0.1

DEGENERATE_REP4 = 0.2
DEGENERATE_LINE_REPEATS = 3
DEGENERATE_FOREIGN_SCRIPT = 0.2
DEGENERATE = (
    f"no word at all (an empty reply), or rep-4 > {DEGENERATE_REP4}, or a non-empty line occurring "
    f"{DEGENERATE_LINE_REPEATS}+ times, or markup spam "
    f"({MARKUP_SPAM_SPANS}+ junk spans or junk ≥ {MARKUP_SPAM_SHARE:.0%} of the non-space characters), or "
    f"> {DEGENERATE_FOREIGN_SCRIPT:.0%} of the letters in another script than expected"
)


def words(text: str) -> list[str]:
    """The text's words, lower-cased, punctuation dropped."""
    return WORD.findall(text.lower())


def rep_n(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 1 − unique/total (0 with no n-gram)."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()).lower() for line in text.splitlines() if line.strip()]


def line_repeats(text: str) -> int:
    """How often the text's most frequent non-empty line occurs (0 for a blank text)."""
    counts = Counter(_lines(text))
    return max(counts.values(), default=0)


def repeated_line_share(text: str) -> float:
    """Share of the text's non-empty lines that repeat an earlier line: 1 − unique/total (0 with no line)."""
    lines = _lines(text)
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def distinct_lines(texts: Sequence[str]) -> float:
    """Unique non-empty lines over all non-empty lines of ``texts`` together (1 with no line)."""
    lines = [line for text in texts for line in _lines(text)]
    return len(set(lines)) / len(lines) if lines else 1.0


def _is_symbol(char: str) -> bool:
    return unicodedata.category(char) == "So"


def junk_spans(text: str) -> list[str]:
    """Markup and junk in ``text``, one string per span, in order of position."""
    spans = [(m.start(), m.end()) for m in MARKUP.finditer(text)]
    spans += [(m.start(), m.end()) for m in PUNCTUATION_RUN.finditer(text)]
    spans += [(i, i + 1) for i, char in enumerate(text) if char not in "\n\r\t" and _bad_char(char)]
    i = 0
    while i < len(text):  # runs of symbols (emoji), with spaces and variation selectors between them
        if not _is_symbol(text[i]):
            i += 1
            continue
        end, last, count = i, i, 0
        while end < len(text) and (_is_symbol(text[end]) or text[end] in " \ufe0f\u200d"):
            if _is_symbol(text[end]):
                count, last = count + 1, end + 1
            end += 1
        if count >= SYMBOL_RUN:
            spans.append((i, last))
        i = end
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return [text[start:end] for start, end in merged]


def _bad_char(char: str) -> bool:
    return char == "\ufffd" or (unicodedata.category(char) in JUNK_CATEGORIES and char not in "\u200d\ufe0f")


def junk_share(text: str) -> float:
    """Non-space characters inside junk spans over all non-space characters (0 for a blank text)."""
    total = sum(not c.isspace() for c in text)
    junk = sum(not c.isspace() for span in junk_spans(text) for c in span)
    return junk / total if total else 0.0


def markup_spam(text: str) -> bool:
    """More markup/junk than a stray tag: MARKUP_SPAM_SPANS+ spans, or MARKUP_SPAM_SHARE of the characters."""
    return len(junk_spans(text)) >= MARKUP_SPAM_SPANS or junk_share(text) >= MARKUP_SPAM_SHARE


def _sentence_ends(text: str) -> list[int]:
    """Where the sentences of ``text`` end (after the terminator), skipping full stops after abbreviations."""
    ends = []
    for match in SENTENCE_END.finditer(text):
        before = ABBREVIATION_BEFORE.search(text[: match.start()]) if match.group().startswith(".") else None
        if before and (before.group(1).lower() in ABBREVIATIONS or re.fullmatch("[A-Z]", before.group(1))):
            continue
        ends.append(match.end())
    return ends


def _prompt_tail(prompt: str) -> str:
    """The prompt's unfinished last sentence, which the continuation's first sentence completes ("" after a
    speaker label such as "Assistant:")."""
    ends = _sentence_ends(prompt)
    tail = prompt[ends[-1] :] if ends else prompt
    return "" if SPEAKER_LABEL.match(tail) else tail


def reply(text: str, prompt: str) -> str:
    """What a reader gets of a continuation of ``prompt``: after a transcript that ends in a speaker's label
    ("User: …\nAssistant:"), the reply up to the next line opening with a label, where chat stops
    (SamplingConfig.stop_at_turns); any other continuation whole. Cutting a sample where the product stops
    it leaves the text it shows with the same distribution."""
    from ..core.text import TURN_LABEL

    last_line = prompt.rsplit("\n", 1)[-1]
    if not SPEAKER_LABEL.match(last_line):
        return text
    label = TURN_LABEL.search(text)
    return text[: label.start()] if label else text


def finished_sentences(text: str, prompt: str = "") -> list[str]:
    """The sentences the continuation ``text`` finishes, the first one including the prompt's unfinished tail;
    a last sentence left unfinished (cut at a length limit) is not one."""
    full, sentences, start = _prompt_tail(prompt) + text, [], 0
    for end in _sentence_ends(full):
        sentence = full[start:end].strip()
        start = end
        if words(sentence):
            sentences.append(sentence)
    return sentences


def is_fragment(sentence: str) -> bool:
    """Under FRAGMENT_WORDS words, or ending on a word that leaves the sentence unfinished."""
    tokens = words(sentence)
    return len(tokens) < FRAGMENT_WORDS or tokens[-1] in DANGLING


def fragments(text: str, prompt: str = "") -> tuple[int, int]:
    """(fragments, finished sentences) of the continuation ``text`` of ``prompt``. A continuation that ends the
    prompt's sentence before adding a word ("The bus to work was" + ".") makes that sentence a fragment too."""
    sentences = finished_sentences(text, prompt)
    tail = _prompt_tail(prompt)
    first_end = _sentence_ends(tail + text)[:1]
    cut_short = bool(words(tail) and first_end and not words((tail + text)[len(tail) : first_end[0]]))
    count = sum(map(is_fragment, sentences))
    if cut_short and sentences and not is_fragment(sentences[0]):
        count += 1
    return count, len(sentences)


def _script(char: str) -> str:
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


def foreign_script_share(text: str, script: str = "LATIN") -> float:
    """Share of the text's letters whose Unicode script (first word of the character name) is not ``script``."""
    letters = [c for c in text if c.isalpha()]
    return sum(_script(c) != script for c in letters) / len(letters) if letters else 0.0


def echo_share(text: str, source: str, n: int = 3) -> float:
    """Share of the text's word n-grams that occur in ``source`` (n shrinks to the text's length; 0 with no word)."""
    tokens, reference = words(text), words(source)
    n = min(n, len(tokens))
    if n == 0:
        return 0.0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    known = {tuple(reference[i : i + n]) for i in range(len(reference) - n + 1)}
    return sum(gram in known for gram in grams) / len(grams)


def is_empty(text: str) -> bool:
    """No word at all: a reply that ended before it began."""
    return not WORD.search(text)


def is_degenerate(text: str, script: str = "LATIN") -> bool:
    """Degenerate output as the evaluations count it (DEGENERATE says the rule in words). An empty reply is one: a
    reader gets nothing (an ARM that learned to answer briefly, pushed too hard, ends the turn before a word)."""
    return (
        is_empty(text)
        or rep_n(text, 4) > DEGENERATE_REP4
        or line_repeats(text) >= DEGENERATE_LINE_REPEATS
        or markup_spam(text)
        or foreign_script_share(text, script) > DEGENERATE_FOREIGN_SCRIPT
    )


def fluency_summary(texts: Sequence[str], prompts: Sequence[str] | None = None) -> dict[str, float]:
    """Corpus figures for an evaluation table: distinct-2 over all texts; mean rep-4 and repeated-line share per
    text; rates (share of texts) of degenerate output, empty replies (no word; degenerate too), markup spam and
    script switches; fragments per finished sentence, pooled."""
    from .judges import distinct_n

    prompts = prompts if prompts is not None else [""] * len(texts)
    counts = [fragments(t, p) for t, p in zip(texts, prompts, strict=True)]
    n = max(len(texts), 1)
    return {
        "distinct_2": distinct_n(texts, 2),
        "rep_4": sum(rep_n(t, 4) for t in texts) / n,
        "repeated_lines": sum(repeated_line_share(t) for t in texts) / n,
        "degenerate": sum(map(is_degenerate, texts)) / n,
        "empty": sum(map(is_empty, texts)) / n,
        "markup_spam": sum(map(markup_spam, texts)) / n,
        "script_switch": sum(foreign_script_share(t) > DEGENERATE_FOREIGN_SCRIPT for t in texts) / n,
        "fragments": sum(f for f, _ in counts) / max(sum(s for _, s in counts), 1),
    }
