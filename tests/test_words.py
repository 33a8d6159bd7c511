import re

import pytest

from jaxllava.data.records import Record, Turn
from jaxllava.data.words import OBJECTIVES, WORD_RULES, count_words, count_words_reference, record_words


@pytest.mark.parametrize("text, words", [
    ("", 0),
    ("   \n\t ", 0),
    ("The cat sat.", 3),
    ("Don't go!", 2),  # a contraction is one whitespace word
    ("<image>\nA dog runs.", 3),  # the image placeholder is markup, not a word
    ("<image>", 0),
    ("a<image>b", 2),  # a tag separates the words around it
    ("<im_start><im_patch><im_patch><im_end> caption here", 2),
    ("x < y and z > w", 7),  # a comparison is not a tag: tags have no whitespace inside
    ("line one\\nline two", 3),  # backslash-n is not whitespace under this rule: "one\\nline" is one word
    ("café naïve 東京", 3),
])
def test_trained_rule_counts_hand_checked_examples(text, words):
    assert count_words(text) == words


@pytest.mark.parametrize("text, words", [
    ("", 0),
    ("Don't go!", 3),  # don, t, go (docs/reference.md#word-counting-and-milestones)
    ("<image>\nA dog runs.", 3),
    ("<image>", 0),
    ("a<image>b", 1),  # the reference removes tags without a space, joining the neighbours
    ("line one\\nline two", 4),  # the two-character sequence backslash-n is a separator
    ("well-known e-mail", 4),
    ("snake_case", 2),  # underscore is not alphanumeric
    ("café naïve", 2),  # Unicode letters are alphanumeric (str.isalnum)
    ("東京 タワー", 2),
    ("3.14 is pi", 4),
    ("x < y and z > w", 2),  # the reference's `<[^>]+>` swallows "< y and z >"
    ("...!!!", 0),
])
def test_reference_rule_counts_hand_checked_examples(text, words):
    assert count_words_reference(text) == words


def per_character_reference(text):
    # A literal reading of the reference's rule (docs/reference.md#word-counting-and-milestones),
    # to check the regex version against.
    text = re.sub(r"<[^>]+>", "", text).replace("\\n", " ")
    return len("".join(c.lower() if c.isalnum() else " " for c in text).split())


def test_reference_rule_matches_a_per_character_reading_on_mixed_text():
    text = "Ünïcödé <b>bold</b> İstanbul ½ ² x_y don't\\n\n\tend… 12,000 co-op (a) «b» ΑΒΓ"
    assert count_words_reference(text) == per_character_reference(text)
    assert count_words_reference(text) > 0


RECORD = Record(
    file="f.jsonl", where="line 1", id="r", image="img.png",
    turns=(Turn("user", "<image>\nDescribe it, please."), Turn("assistant", "A red ball."),
           Turn("user", "And?"), Turn("assistant", "It's big.")))


@pytest.mark.parametrize("objective, rule, words", [
    ("plain_lm", "trained", 3 + 3 + 1 + 2),  # every turn is trained on
    ("captions", "trained", 3 + 2),  # only the assistant turns are targets
    ("chat", "trained", 3 + 2),
    ("plain_lm", "reference", 3 + 3),  # the reference: assistant turns under every objective, "It's" = 2
    ("captions", "reference", 3 + 3),
    ("chat", "reference", 3 + 3),
])
def test_record_words_picks_the_turns_and_rule_of_the_objective(objective, rule, words):
    assert record_words(RECORD, objective=objective, rule=rule) == words


def test_word_rules_are_the_config_names():
    from typing import get_args, get_type_hints

    from jaxllava.data.config import DataConfig

    hints = get_type_hints(DataConfig)
    assert set(WORD_RULES) == set(get_args(hints["word_rule"]))
    assert set(OBJECTIVES) == set(get_args(hints["objective"]))
    assert record_words(RECORD, objective="captions") == record_words(RECORD, objective="captions", rule="trained")


def test_record_words_rejects_unknown_rule_and_objective():
    with pytest.raises(ValueError, match="word rule"):
        record_words(RECORD, objective="plain_lm", rule="whitespace")
    with pytest.raises(ValueError, match="objective"):
        record_words(RECORD, objective="captioning")
