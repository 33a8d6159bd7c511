"""The tokenizer: loading it from a local directory, its special ids, and copying it into a run.

The image markup strings live here, once: `<image>` is what records write where
their image goes; `<im_start>`, `<im_patch>`, `<im_end>` are the placeholder
tokens the pipeline expands it to (never accepted from data); `<video>` is
refused. `load_tokenizer` adds the placeholder tokens when a tokenizer lacks
them, so the model's vocabulary must cover them (`check_vocabulary`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from jaxllava.errors import ConfigError, DataError

IMAGE_TOKEN = "<image>"
PLACEHOLDER_TOKENS = ("<im_start>", "<im_patch>", "<im_end>")
VIDEO_TOKEN = "<video>"

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

    def image_span(self, n: int) -> list[int]:
        """The N ids one image occupies: `<im_start> + (N-2)×<im_patch> + <im_end>`."""
        if n < 2:
            raise ValueError(f"an image span needs at least 2 tokens (start and end), got N={n}")
        return [self.im_start] + [self.im_patch] * (n - 2) + [self.im_end]


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never the hub), with the image
    placeholder tokens added as special tokens when missing."""
    from transformers import AutoTokenizer

    if not path:
        raise DataError("data.tokenizer is not set: give a local tokenizer directory", field="data.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path!r}: {e}", file=path, field="data.tokenizer") from e
    missing = [t for t in PLACEHOLDER_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def special_ids(tokenizer) -> SpecialIds:
    vocab = tokenizer.get_vocab()
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return SpecialIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=pad,
                      im_start=vocab["<im_start>"], im_patch=vocab["<im_patch>"], im_end=vocab["<im_end>"])


def check_vocabulary(tokenizer, vocab_size: int, source: str) -> None:
    """Every id the tokenizer can produce must have an embedding row; a larger tokenizer
    would send ids past the table (a non-finite loss at best)."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"{source}: the tokenizer has {len(tokenizer)} tokens (image placeholders included) but "
                          f"model.lm.vocab_size is {vocab_size}: ids {vocab_size}..{len(tokenizer) - 1} would have "
                          f"no embedding row; raise model.lm.vocab_size to at least {len(tokenizer)}")


def copy_tokenizer(source: str, directory: str, vocab_size: int, *, portable: bool = False) -> int:
    """Put the tokenizer of `source` into `directory`; returns its size.

    When `source` already has the image placeholders, its files are copied verbatim
    (a slow SentencePiece model survives); otherwise the placeholders are added as in
    training (`load_tokenizer`) and the tokenizer is saved. A tokenizer with more
    tokens than `vocab_size` is a ConfigError. `portable`: rewrite the
    transformers-5-only fields of tokenizer_config.json so transformers 4.x loads it.
    """
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(source)
    check_vocabulary(tokenizer, vocab_size, source)
    os.makedirs(directory, exist_ok=True)
    original = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if all(token in original.get_vocab() for token in PLACEHOLDER_TOKENS):
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
