"""The tokenizer: loading it from a local directory, its special ids, and copying it into a run.

The markup strings live here, once: `<image>` is what records write where
their image goes; `<im_start>`, `<im_patch>`, `<im_end>` are the placeholder
tokens the pipeline expands it to. `<video>` marks a video record's place, expanded
to a fast span `<vid_start> <vid_patch>… <vid_end>` then a slow span
`<slow_vid_start> <vid_patch>… <slow_vid_end>` (the reference's names). No
placeholder is ever accepted from data. `load_tokenizer` adds the image placeholders
when a tokenizer lacks them, and the video ones only for a model that reads video
(`video=True`), so the model's vocabulary must cover them (`check_vocabulary`).

Two checks of a tokenizer against what it is used with: `table_coverage` /
`tokenizer_coverage` (how much of the training text is the unknown token, how many
words split), and `vocabulary_difference` (a data tokenizer against the one a
model was trained with: same size is not same ids).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re
import shutil

import numpy as np

from jaxllava.errors import ConfigError, DataError

IMAGE_TOKEN = "<image>"
PLACEHOLDER_TOKENS = ("<im_start>", "<im_patch>", "<im_end>")
VIDEO_TOKEN = "<video>"
VIDEO_PLACEHOLDER_TOKENS = ("<vid_start>", "<vid_patch>", "<vid_end>", "<slow_vid_start>", "<slow_vid_end>")

# Files a transformers tokenizer directory may hold (copied verbatim when nothing is added).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.jinja")
# tokenizer_config.json keys written by transformers 5 that transformers 4.x (the BabyLM
# pipeline pins 4.51.3) cannot read, or passes on as stray constructor arguments.
_V5_ONLY_KEYS = ("backend", "is_local", "local_files_only")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int | None
    pad: int
    im_start: int
    im_patch: int
    im_end: int
    # The video placeholders' ids, in VIDEO_PLACEHOLDER_TOKENS order; None: the tokenizer has none
    # (loaded without video=True).
    video: tuple[int, int, int, int, int] | None = None

    def video_span(self, fast: int, slow: int) -> list[int]:
        """The fast + slow ids one video occupies: `<vid_start> + (fast-2)×<vid_patch> + <vid_end>`
        then `<slow_vid_start> + (slow-2)×<vid_patch> + <slow_vid_end>` (each span ≥ 2)."""
        if self.video is None:
            raise ValueError("the tokenizer has no video placeholder tokens (load it with video=True)")
        if fast < 2 or slow < 2:
            raise ValueError(f"each video span needs at least 2 tokens, got fast {fast}, slow {slow}")
        start, patch, end, slow_start, slow_end = self.video
        return [start] + [patch] * (fast - 2) + [end] + [slow_start] + [patch] * (slow - 2) + [slow_end]

    def image_span(self, n: int) -> list[int]:
        """The I ids one image occupies: `<im_start> + (I-2)×<im_patch> + <im_end>`, or a lone
        `<im_patch>` for I = 1 (one global feature vector, one image token)."""
        if n < 1:
            raise ValueError(f"an image span needs at least 1 token, got I={n}")
        if n == 1:
            return [self.im_patch]
        return [self.im_start] + [self.im_patch] * (n - 2) + [self.im_end]


def load_tokenizer(path: str, *, video: bool = False):
    """A Hugging Face tokenizer from a local directory (never the hub), with the image
    placeholder tokens (and with `video`, the video ones) added as special tokens when missing."""
    from transformers import AutoTokenizer

    if not path:
        raise DataError("data.tokenizer is not set: give a local tokenizer directory", field="data.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path!r}: {e}", file=path, field="data.tokenizer") from e
    wanted = PLACEHOLDER_TOKENS + (VIDEO_PLACEHOLDER_TOKENS if video else ())
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def special_ids(tokenizer) -> SpecialIds:
    vocab = tokenizer.get_vocab()
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    video = (tuple(vocab[t] for t in VIDEO_PLACEHOLDER_TOKENS)
             if all(t in vocab for t in VIDEO_PLACEHOLDER_TOKENS) else None)
    return SpecialIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=pad,
                      im_start=vocab["<im_start>"], im_patch=vocab["<im_patch>"], im_end=vocab["<im_end>"],
                      video=video)


def check_vocabulary(tokenizer, vocab_size: int, source: str) -> None:
    """Every id the tokenizer can produce must have an embedding row; a larger tokenizer
    would send ids past the table (a non-finite loss at best)."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"{source}: the tokenizer has {len(tokenizer)} tokens (image placeholders included) but "
                          f"model.lm.vocab_size is {vocab_size}: ids {vocab_size}..{len(tokenizer) - 1} would have "
                          f"no embedding row; raise model.lm.vocab_size to at least {len(tokenizer)}")


def copy_tokenizer(source: str, directory: str, vocab_size: int, *, portable: bool = False,
                   video: bool = False) -> int:
    """Put the tokenizer of `source` into `directory`; returns its size.

    When `source` already has the image placeholders (and with `video`, the video ones), its
    files are copied verbatim (a slow SentencePiece model survives); otherwise the placeholders
    are added as in training (`load_tokenizer`) and the tokenizer is saved. A tokenizer with more
    tokens than `vocab_size` is a ConfigError. `portable`: rewrite the
    transformers-5-only fields of tokenizer_config.json so transformers 4.x loads it.
    """
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(source, video=video)
    check_vocabulary(tokenizer, vocab_size, source)
    os.makedirs(directory, exist_ok=True)
    original = AutoTokenizer.from_pretrained(source, local_files_only=True)
    wanted = PLACEHOLDER_TOKENS + (VIDEO_PLACEHOLDER_TOKENS if video else ())
    if all(token in original.get_vocab() for token in wanted):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), directory)
    else:
        tokenizer.save_pretrained(directory)
    if portable:
        _make_tokenizer_config_portable(os.path.join(directory, "tokenizer_config.json"))
    return len(tokenizer)


def _make_tokenizer_config_portable(path: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's generic fast tokenizer
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x writes a list; 4.x knows additional_special_tokens (4.x's own key is a dict)
        config["additional_special_tokens"] = list(dict.fromkeys(config.get("additional_special_tokens", []) + extra))
        del config["extra_special_tokens"]
    for key in _V5_ONLY_KEYS:
        config.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- coverage of the data

# `TokenizerCoverage.warnings` thresholds.
# An unknown token erases the word it stands for: the model never trains on it, and minimal
# pairs that differ only in such words tokenize identically. A tokenizer made for the data has
# none (byte-level BPE cannot produce one; a word-level vocabulary built from the corpus covers
# it), so a rate above 1% (one word in a hundred) means a tokenizer made for other text, as
# in the run that trained 38% `<unk>` silently.
UNK_WARN_RATE = 0.01
# Splitting rare words is how subword tokenizers work (a word-level one splits nothing), so the
# fraction is reported, not judged; only when most words split is the tokenizer likely made for
# another language or casing, or character-level.
SPLIT_WARN_FRACTION = 0.5
# 20,000 words put the split fraction within ±0.7 percentage points (two standard errors of a
# proportion, sqrt(0.25 / 20000) ≈ 0.35 pp), plenty against a 50% threshold, and cost well under
# a second whatever the corpus size.
WORD_SAMPLE = 20_000


@dataclasses.dataclass(frozen=True)
class TokenizerCoverage:
    """How well a tokenizer covers the text it trains on (`tokenizer_coverage`, `table_coverage`)."""

    name: str  # the tokenizer's directory (name_or_path), for messages
    unk_token: str | None  # None: the tokenizer has no unknown token, so no rate
    unk_tokens: int  # counted text tokens that are the unknown token
    text_tokens: int  # text tokens counted (special tokens other than the unknown one left out)
    split_words: int  # sampled whitespace words the tokenizer makes 2 or more tokens of
    words_sampled: int

    @property
    def unk_rate(self) -> float | None:
        if self.unk_token is None:
            return None
        return self.unk_tokens / self.text_tokens if self.text_tokens else 0.0

    @property
    def split_word_fraction(self) -> float | None:
        return self.split_words / self.words_sampled if self.words_sampled else None

    def as_dict(self) -> dict:
        """JSON-able figures and warnings (the dataset report's and run.json's `tokenizer` entry)."""
        return {"unk_rate": self.unk_rate, "split_word_fraction": self.split_word_fraction,
                "words_sampled": self.words_sampled, "split_words": self.split_words,
                "unk_token": self.unk_token, "unk_tokens": self.unk_tokens, "text_tokens": self.text_tokens,
                "warnings": self.warnings()}

    def summary_line(self) -> str:
        """One line for a start banner."""
        if self.unk_token is None:
            unk = "no unknown token"
        else:
            unk = f"{self.unk_token} {self.unk_rate:.2%} of {self.text_tokens:,} trained text tokens"
        split = ("no words to sample" if self.split_word_fraction is None else
                 f"{self.split_word_fraction:.1%} of {self.words_sampled:,} sampled words split into 2+ tokens")
        return f"tokenizer {self.name}: {unk}; {split}"

    def warnings(self) -> list[str]:
        """Human-readable lines for the figures past their thresholds (UNK_WARN_RATE, SPLIT_WARN_FRACTION)."""
        lines = []
        rate, split = self.unk_rate, self.split_word_fraction
        if rate is not None and rate > UNK_WARN_RATE:
            lines.append(f"data.tokenizer={self.name}: {rate:.2%} of the {self.text_tokens:,} trained text tokens "
                         f"({self.unk_tokens:,}) are the unknown token {self.unk_token!r}, above "
                         f"{UNK_WARN_RATE:.0%}: the words they replace are never trained, and minimal pairs "
                         f"differing only in them tokenize identically; use a tokenizer made for this data")
        if split is not None and split > SPLIT_WARN_FRACTION:
            lines.append(f"data.tokenizer={self.name}: {split:.1%} of {self.words_sampled:,} sampled words split "
                         f"into 2 or more tokens, above {SPLIT_WARN_FRACTION:.0%}: the tokenizer was likely made "
                         f"for another language or casing")
        return lines


def tokenizer_coverage(tokenizer, texts, *, max_words: int = WORD_SAMPLE, seed: int = 0) -> TokenizerCoverage:
    """Unknown-token rate and split-word fraction over texts, every token of which is trained.

    Both figures come from the same seeded random subset of whole texts holding about
    `max_words` words (all of them when there are fewer), so the cost is bounded whatever the
    corpus size; the split fraction is over at most `max_words` of those words.
    """
    order = np.random.default_rng(seed).permutation(len(texts))
    chosen, words = [], 0
    for index in order:
        if words >= max_words:
            break
        chosen.append(texts[int(index)])
        words += len(chosen[-1].split())
    encoded = tokenizer(chosen, add_special_tokens=False)["input_ids"] if chosen else []
    ids = np.fromiter((i for row in encoded for i in row), np.int64)
    unk_tokens, text_tokens = _count_unknown(tokenizer, ids, _text_mask(tokenizer, ids, np.ones(len(ids), bool)))
    return _coverage(tokenizer, unk_tokens, text_tokens, _word_token_counts(tokenizer, chosen), max_words, seed)


def table_coverage(tokenizer, table, *, max_words: int = WORD_SAMPLE, seed: int = 0) -> TokenizerCoverage:
    """Unknown-token rate over every target token of a `SampleTable` (samples.py), exact, and
    split-word fraction over at most `max_words` words of a seeded random subset of samples.

    The words are those of the samples' trained text: each run of target tokens that are neither
    special nor unknown is decoded, and its whitespace words are counted as the tokenizer makes
    them in context (fast tokenizers' offsets; a slow one encodes each word on its own). Decoding
    restores words through the tokenizer's decoder (byte-level "Ġ", SentencePiece "▁", WordPiece
    "##"); a subword tokenizer without one decodes pieces as words and shows no splits.
    """
    known = _text_mask(tokenizer, table.tokens, table.is_target)
    unk_tokens, text_tokens = _count_unknown(tokenizer, table.tokens, known)
    if tokenizer.unk_token_id is not None:
        known &= table.tokens != tokenizer.unk_token_id
    texts, words = [], 0
    order = np.random.default_rng(seed).permutation(len(table.offsets) - 1)
    for start in range(0, len(order), 256):  # decode a chunk of samples at a time, until enough words
        if words >= max_words:
            break
        runs = []
        for i in order[start:start + 256]:
            lo, hi = int(table.offsets[i]), int(table.offsets[i + 1])
            mask = known[lo:hi]
            edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
            runs += [table.tokens[lo + a:lo + b].tolist() for a, b in zip(edges[::2], edges[1::2])]
        decoded = tokenizer.batch_decode(runs, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts += decoded
        words += sum(len(text.split()) for text in decoded)
    return _coverage(tokenizer, unk_tokens, text_tokens, _word_token_counts(tokenizer, texts), max_words, seed)


def _text_mask(tokenizer, ids: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """`counted` less the special ids that are not text (BOS, EOS, pad, image placeholders); the
    unknown token is text the tokenizer failed on, so it stays."""
    others = sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
    return counted & ~np.isin(ids, others)


def _count_unknown(tokenizer, ids: np.ndarray, text: np.ndarray) -> tuple[int, int]:
    """(unknown tokens, text tokens) among `ids[text]`."""
    unk = tokenizer.unk_token_id
    return (0 if unk is None else int(np.sum(ids[text] == unk))), int(np.sum(text))


def _word_token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per whitespace word of each text, in order, as the tokenizer makes them in context."""
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [len(tokenizer.encode(word, add_special_tokens=False)) for text in texts for word in text.split()]
    counts = []
    offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for text, token_spans in zip(texts, offsets):
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        starts = [s for s, _ in spans]
        per_word = [0] * len(spans)
        for lo, hi in token_spans:
            # A token belongs to the word it ends in; a token of whitespace only (e.g. a lone
            # SentencePiece "▁") ends before its word starts and is not counted.
            j = bisect.bisect_right(starts, hi - 1) - 1
            if hi > lo and j >= 0 and spans[j][1] > lo:
                per_word[j] += 1
        counts += per_word
    return counts


def _coverage(tokenizer, unk_tokens: int, text_tokens: int, word_counts: list[int], max_words: int,
              seed: int) -> TokenizerCoverage:
    counts = np.asarray(word_counts, np.int64)
    if len(counts) > max_words:
        counts = counts[np.random.default_rng([seed, 1]).choice(len(counts), max_words, replace=False)]
    unk = tokenizer.unk_token if tokenizer.unk_token_id is not None else None
    return TokenizerCoverage(name=str(getattr(tokenizer, "name_or_path", "")), unk_token=unk,
                             unk_tokens=unk_tokens, text_tokens=text_tokens, split_words=int(np.sum(counts > 1)),
                             words_sampled=len(counts))


# ----------------------------------------------------------------------------- two vocabularies


def vocabulary_difference(first, second, *, names: tuple[str, str] = ("first", "second"),
                          limit: int = 5) -> str | None:
    """None when both tokenizers map every token (special and added ones included) to the same id
    and agree on the BOS, EOS, unknown and pad tokens; else a short description naming `names`:
    the sizes when they differ, then the first `limit` (by id) tokens whose ids differ, with both
    ids, the tokens only one of them has, and the special-token roles that differ."""
    a, b = first.get_vocab(), second.get_vocab()
    parts = []
    if len(first) != len(second):
        parts.append(f"{names[0]} has {len(first)} tokens, {names[1]} has {len(second)}")

    def listed(entries: list, what: str) -> None:
        if entries:
            more = f", and {len(entries) - limit} more" if len(entries) > limit else ""
            parts.append(f"{len(entries)} {what}: {', '.join(text for _, text in entries[:limit])}{more}")

    listed(sorted((a[t], f"{t!r} {a[t]} vs {b[t]}") for t in a.keys() & b.keys() if a[t] != b[t]),
           f"token(s) with different ids ({names[0]} vs {names[1]})")
    listed(sorted((a[t], f"{t!r} (id {a[t]})") for t in a.keys() - b.keys()), f"token(s) only in {names[0]}")
    listed(sorted((b[t], f"{t!r} (id {b[t]})") for t in b.keys() - a.keys()), f"token(s) only in {names[1]}")
    for role in ("bos", "eos", "unk", "pad"):
        mine, theirs = getattr(first, f"{role}_token", None), getattr(second, f"{role}_token", None)
        if mine != theirs:
            parts.append(f"{role} token {mine!r} in {names[0]}, {theirs!r} in {names[1]}")
    return "; ".join(parts) if parts else None
