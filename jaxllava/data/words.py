"""BabyLM word counting: the words of the text the model trains on, markup stripped.

The BabyLM budget limits the words the model is trained on, so which turns count
depends on the objective (the caller passes `roles`):
  - `plain_lm`: the model trains on every turn, so all turns count:
    roles=("user", "assistant").
  - `captions` / `chat`: only assistant turns are targets, so only they count:
    roles=("assistant",).
  - The reference counted assistant (gpt) turns only, under every objective, with
    its own rule (REFERENCE.md §3.3): roles=("assistant",), rule="reference".
    Under `plain_lm` that undercounts, because human turns are trained on too.

Rules:
  "whitespace" (default): markup tags such as `<image>` are replaced by a space,
      then the whitespace-separated pieces are counted: "Don't go!" = 2.
  "reference": the reference's rule, re-derived from REFERENCE.md §3.3: tags
      `<[^>]+>` are removed (joining their neighbours), the two-character sequence
      backslash-n becomes a space, and every maximal run of alphanumeric
      characters (str.isalnum, so Unicode letters count) is a word:
      "Don't go!" = 3 (don, t, go).
"""
from __future__ import annotations

import re

from jaxllava.data.records import Record

WORD_RULES = ("whitespace", "reference")

# A tag never contains whitespace, so "a < b and c > d" keeps its words; the
# tokens we strip (`<image>`, `<im_patch>`, `<TEMP-3>`) are all single pieces.
_MARKUP_TAG = re.compile(r"<[^<>\s]+>")
_REFERENCE_TAG = re.compile(r"<[^>]+>")
# [^\W_] matches exactly the characters for which str.isalnum() is true.
_ALNUM_RUN = re.compile(r"[^\W_]+")


def count_words(text: str) -> int:
    """Whitespace words of `text` with markup tags stripped (`<image>` is not a word)."""
    if "<" in text:
        text = _MARKUP_TAG.sub(" ", text)
    return len(text.split())


def count_words_reference(text: str) -> int:
    """The reference's BabyLM word count of one turn (REFERENCE.md §3.3)."""
    text = _REFERENCE_TAG.sub("", text).replace("\\n", " ")
    return len(_ALNUM_RUN.findall(text))


_COUNTERS = {"whitespace": count_words, "reference": count_words_reference}


def record_words(record: Record, *, roles: tuple[str, ...], rule: str = "whitespace") -> int:
    """BabyLM words of the record's turns whose role is in `roles` ("user", "assistant")."""
    if rule not in _COUNTERS:
        raise ValueError(f"unknown word rule {rule!r}; expected one of {WORD_RULES}")
    unknown = set(roles) - {"user", "assistant"}
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; expected 'user' and/or 'assistant'")
    count = _COUNTERS[rule]
    return sum(count(turn.text) for turn in record.turns if turn.role in roles)
