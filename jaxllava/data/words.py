"""BabyLM word counting: the words of the text the model trains on, markup stripped.

`record_words(record, objective, rule)` is the one definition; `data.word_rule`
names the rule:

  "trained" (default): the turns the model is trained on under the objective:
      every turn under `plain_lm`; the assistant turns under `captions` and
      `chat` (only they are targets). Markup tags such as `<image>` are replaced
      by a space, then the whitespace-separated pieces are counted:
      "Don't go!" = 2.
  "reference": the reference's rule (docs/reference.md#word-counting-and-milestones): the
      assistant (gpt) turns under every objective (under `plain_lm` that
      undercounts, since the human turns are trained on too); tags `<[^>]+>` are
      removed (joining their neighbours), the two-character sequence backslash-n
      becomes a space, and every maximal run of alphanumeric characters
      (str.isalnum, so Unicode letters count) is a word: "Don't go!" = 3
      (don, t, go).
"""
from __future__ import annotations

import re

from jaxllava.data.records import Record

WORD_RULES = ("trained", "reference")
OBJECTIVES = ("plain_lm", "captions", "chat")

# A tag never contains whitespace, so "a < b and c > d" keeps its words; the
# tokens we strip (`<image>`, `<im_patch>`, `<TEMP-3>`) are all single pieces.
_MARKUP_TAG = re.compile(r"<[^<>\s]+>")
_REFERENCE_TAG = re.compile(r"<[^>]+>")
# [^\W_] matches exactly the characters for which str.isalnum() is true.
_ALNUM_RUN = re.compile(r"[^\W_]+")


def count_words(text: str) -> int:
    """Whitespace words of `text` with markup tags stripped (`<image>` is not a word): the "trained" rule."""
    if "<" in text:
        text = _MARKUP_TAG.sub(" ", text)
    return len(text.split())


def count_words_reference(text: str) -> int:
    """The reference's BabyLM word count of one turn (docs/reference.md#word-counting-and-milestones)."""
    text = _REFERENCE_TAG.sub("", text).replace("\\n", " ")
    return len(_ALNUM_RUN.findall(text))


def record_words(record: Record, *, objective: str, rule: str = "trained") -> int:
    """BabyLM words of a record trained under `objective` with word rule `rule` (see the module doc)."""
    if rule not in WORD_RULES:
        raise ValueError(f"unknown word rule {rule!r}; expected one of {WORD_RULES}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if rule == "reference":
        return sum(count_words_reference(turn.text) for turn in record.turns if turn.role == "assistant")
    every_turn = objective == "plain_lm"
    return sum(count_words(turn.text) for turn in record.turns if every_turn or turn.role == "assistant")
