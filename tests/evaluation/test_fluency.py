"""Fluency judges on hand-made strings; every expected value is counted by hand in the comment beside it."""

from __future__ import annotations

import pytest

from genarm_local.evaluation.fluency import (
    distinct_lines,
    echo_share,
    finished_sentences,
    fluency_summary,
    foreign_script_share,
    fragments,
    is_degenerate,
    junk_share,
    junk_spans,
    line_repeats,
    markup_spam,
    rep_n,
    repeated_line_share,
    words,
)


def test_words_ignore_case_and_punctuation_but_keep_apostrophes():
    assert words("I love it! I LOVE it.") == ["i", "love", "it", "i", "love", "it"]
    assert words("Don't stop—it's fine_ish") == ["don't", "stop", "it's", "fine", "ish"]


def test_rep4_of_a_loop():
    # words: i love it i love it i love it (9) -> 6 four-grams, 3 distinct (i love it i / love it i love /
    # it i love it, each twice): 1 - 3/6
    assert rep_n("I love it! I love it! I love it!") == pytest.approx(0.5)


def test_rep4_of_plain_text_and_short_text():
    assert rep_n("The hotel was small but clean and the staff were kind.") == 0.0  # 11 words, no 4-gram twice
    assert rep_n("Too short.") == 0.0  # 2 words: no 4-gram at all
    # words: a b c d a b c d e (9) -> 6 four-grams: abcd, bcda, cdab, dabc, abcd, bcde; 5 distinct: 1 - 5/6
    assert rep_n("a b c d a b c d e") == pytest.approx(1 / 6)
    # bigrams of "x y x y": xy, yx, xy -> 2 distinct of 3
    assert rep_n("x y x y", n=2) == pytest.approx(1 / 3)


def test_repeated_lines():
    text = "What a great day!\n\nwhat a  GREAT day!\nSee you.\nWhat a great day!\n"
    # non-empty lines, spacing and case ignored: [great, great, see you, great] -> most frequent 3 times,
    # 2 distinct of 4 -> share 1 - 2/4
    assert line_repeats(text) == 3
    assert repeated_line_share(text) == pytest.approx(0.5)
    assert line_repeats("") == 0 and repeated_line_share("   \n") == 0.0
    # over texts: lines a, b | a, c, a -> 3 distinct of 5
    assert distinct_lines(["a\nb", "a\nc\na"]) == pytest.approx(3 / 5)


def test_junk_spans_find_markup_and_junk():
    assert junk_spans("It was <strong>great</strong> and &amp; fine") == ["<strong>", "</strong>", "&amp;"]
    assert junk_spans("## Title\nSome **bold** text") == ["##", "**", "**"]
    assert junk_spans("Wow!!!! Really?!?!?! ok...") == ["!!!!", "?!?!?!"]
    assert junk_spans("bad \ufffd byte and \x07 bell") == ["\ufffd", "\x07"]
    assert junk_spans("party 🎉🎉 🎉 time") == ["🎉🎉 🎉"]  # three symbols in a row, spaces between allowed
    assert junk_spans("one 🎉 here, two 🎉🎉 there") == []  # fewer than three in a row
    assert junk_spans("See [the docs](http://x.y) now") == ["[the docs](http://x.y)"]
    assert junk_spans("Dr. Smith said: fine... really. Line\ttab\nnew line") == []


def test_junk_share_and_markup_spam():
    # "<b>hi</b>": 9 non-space characters, of which <b> and </b> are 7
    assert junk_share("<b>hi</b>") == pytest.approx(7 / 9)
    assert markup_spam("<b>hi</b>")  # 78% junk
    # one tag in a long sentence: 1 span, 3 of 44 non-space characters (under 10%)
    one_tag = "The hotel was lovely and the <b> staff were kind to us."
    assert junk_share(one_tag) == pytest.approx(3 / 44)
    assert not markup_spam(one_tag)
    # three spans are spam even when they are a small share of a long text
    assert markup_spam("a <i> b <i> c <i> " + "word " * 100)


def test_finished_sentences_join_the_prompt_tail_and_drop_the_cut_end():
    # the prompt's unfinished "The hotel was" is the start of the first sentence; "and then we" is cut
    assert finished_sentences(" lovely. We stayed two nights. And then we", "Hello. The hotel was") == [
        "The hotel was lovely.",
        "We stayed two nights.",
    ]
    # a speaker label is not part of the reply's first sentence; a line break ends a sentence
    assert finished_sentences(" Pasta.\nMaybe rice", "User: What to cook?\nAssistant:") == ["Pasta."]
    # full stops after abbreviations and initials do not end a sentence
    assert finished_sentences("Dr. J. Smith met Mrs. Lee at St. Paul. Fine.") == [
        "Dr. J. Smith met Mrs. Lee at St. Paul.",
        "Fine.",
    ]


def test_fragments():
    # "The bus to work was late." (6 words) fine; "It." (1 word) a fragment; "I was nervous." (3) fine
    assert fragments(" late. It. I was nervous. I", "The bus to work was") == (1, 3)
    # the continuation ends the prompt's sentence without a word of its own: "The bus to work was." is a fragment
    assert fragments(". The ride was long.", "The bus to work was") == (1, 2)
    # a sentence ending on an article or a conjunction is unfinished
    assert fragments("We went to the. Then we ate and.") == (2, 2)
    # a chat reply of two words is a fragment (the speaker label does not count as words)
    assert fragments(" Pasta tonight.", "User: What should I cook?\nAssistant:") == (1, 1)
    assert fragments(" no sentence ends here") == (0, 0)


def test_foreign_script_share():
    assert foreign_script_share("Hello world") == 0.0
    # letters: H i (Latin) + こ ん に ち は (Hiragana): 5 of 7 foreign
    assert foreign_script_share("Hi こんにちは!") == pytest.approx(5 / 7)
    assert foreign_script_share("Привет", script="CYRILLIC") == 0.0
    assert foreign_script_share("123 !!") == 0.0  # no letters


def test_echo_share():
    # reply trigrams: (how are you) (are you doing) (you doing today) (doing today friend); the first three are in
    # the source -> 3 of 4
    assert echo_share("How are you doing today, friend?", "Hi! How are you doing today?") == pytest.approx(3 / 4)
    assert echo_share("Hi!", "Hi! How are you?") == 1.0  # one word: unigrams
    assert echo_share("I had a quiet weekend.", "Tell me about your weekend.") == 0.0
    assert echo_share("", "anything") == 0.0


def test_degenerate():
    assert not is_degenerate("The hotel was small but clean, and the staff were kind.")
    assert is_degenerate("I love it! I love it! I love it!")  # rep-4 0.5
    assert is_degenerate("Great.\nOk then.\nGreat.\nSure.\nGreat.")  # "great." three times; rep-4 0 (6 words)
    assert is_degenerate("<strong>Hi</strong> <strong>there</strong>")  # 4 tags
    assert is_degenerate("今日はとても良い天気 yes")  # 10 of 13 letters are not Latin
    assert not is_degenerate("It was fine.\nIt was fine.")  # a line twice is not yet a loop; its 3 four-grams differ
    assert is_degenerate("") and is_degenerate(" \n") and is_degenerate("…")  # an empty reply: nothing to read
    assert not is_degenerate("Yes.")  # one word is a reply


def test_fluency_summary():
    texts = ["I love it! I love it! I love it!", " lovely. It."]
    prompts = ["", "The hotel was"]
    summary = fluency_summary(texts, prompts)
    # rep-4: (0.5 + 0) / 2; degenerate: the first text only; fragments: "It." of 5 sentences
    # (the first text's three "I love it!" of 3 words each, then "The hotel was lovely." and "It.")
    assert summary["rep_4"] == pytest.approx(0.25)
    assert summary["degenerate"] == pytest.approx(0.5) and summary["empty"] == 0.0
    # an empty reply is degenerate and counted apart too
    with_empty = fluency_summary([*texts, " \n", "…"], [*prompts, "", ""])
    assert with_empty["degenerate"] == pytest.approx(3 / 4) and with_empty["empty"] == pytest.approx(2 / 4)
    assert summary["fragments"] == pytest.approx(1 / 5)
    # distinct-2 on whitespace words: "I love it! I love it! I love it!" has 8 bigrams, 3 distinct
    # ("I love", "love it!", "it! I"); "lovely. It." has 1 -> 4 of 9
    assert summary["distinct_2"] == pytest.approx(4 / 9)
    assert summary["markup_spam"] == 0.0 and summary["script_switch"] == 0.0 and summary["repeated_lines"] == 0.0


def test_reply_is_what_chat_shows_of_a_transcript_continuation():
    from genarm_local.evaluation.fluency import reply

    transcript = "User: How fast is light?\nAssistant:"
    # the base writes on past its turn; chat stops at the next speaker's label, whoever it is
    assert reply(" Very fast.\nUser: How fast?\nAssistant: Very fast.", transcript) == " Very fast."
    assert reply(" It depends.\n\nStudent: Why?", transcript) == " It depends.\n"
    assert reply(" Fast, about 300,000 km/s. Note: roughly.", transcript) == " Fast, about 300,000 km/s. Note: roughly."
    # a plain continuation is judged whole, labels and all
    assert reply(" was late.\nUser: hi", "The train") == " was late.\nUser: hi"
