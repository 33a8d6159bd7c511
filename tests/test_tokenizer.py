"""Checks of a tokenizer against its data and against another tokenizer (data/tokenizer.py):
the `<unk>` rate and split-word fraction, and vocabulary differences."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import image_record, make_word_tokenizer, text_record, write_jsonl, write_png

from jaxllava.data.config import DataConfig
from jaxllava.data.records import read_records
from jaxllava.data.samples import build_sample_table
from jaxllava.data.tokenizer import (SPLIT_WARN_FRACTION, UNK_WARN_RATE, load_tokenizer, table_coverage,
                                     tokenizer_coverage, vocabulary_difference)


@pytest.fixture(scope="module")
def tok(word_tokenizer_dir):
    return load_tokenizer(word_tokenizer_dir)


def _subword_tokenizer():
    """A SentencePiece-style BPE (word starts marked "▁", as Llama's) that knows `the` and `dog`
    whole and spells `cat` as "▁c", "a", "t"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(["the dog"] * 50 + ["c a t"], trainers.BpeTrainer(
        vocab_size=100, special_tokens=["<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


# ---------------------------------------------------------------------------- coverage


def test_unknown_words_give_the_exact_unk_rate_and_a_warning(tok):
    # 10 words, each one token of the word-level tokenizer; `zorp` and `blib` are not in it.
    coverage = tokenizer_coverage(tok, ["the dog runs .", "the zorp runs .", "blib dogs"])
    assert (coverage.unk_tokens, coverage.text_tokens) == (2, 10) and coverage.unk_rate == 0.2
    assert coverage.split_word_fraction == 0.0 and coverage.words_sampled == 10
    [warning] = coverage.warnings()
    assert "20.00%" in warning and "'<unk>'" in warning and "data.tokenizer=" in warning
    assert coverage.as_dict()["unk_rate"] == 0.2 and coverage.as_dict()["warnings"] == [warning]
    assert "<unk> 20.00% of 10 trained text tokens" in coverage.summary_line()
    assert "of 10 sampled words" in coverage.summary_line()


def test_known_words_give_zero_and_no_warning(tok):
    coverage = tokenizer_coverage(tok, ["the dog runs .", "two red squares"])
    assert coverage.unk_rate == 0.0 and coverage.split_word_fraction == 0.0 and coverage.warnings() == []


def test_unk_warns_only_above_its_threshold(tok):
    # 1 unknown token in 100 is exactly the threshold (no warning); 2 in 100 is above it.
    known = ["the dog runs ."] * 24
    assert UNK_WARN_RATE == 0.01
    at = tokenizer_coverage(tok, known + ["zorp cat the dog"])
    assert at.unk_rate == 0.01 and at.warnings() == []
    above = tokenizer_coverage(tok, known + ["zorp zorp the dog"])
    assert above.unk_rate == 0.02 and len(above.warnings()) == 1


def test_a_tokenizer_without_unk_has_no_rate():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"the": 0, "dog": 1}))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    coverage = tokenizer_coverage(PreTrainedTokenizerFast(tokenizer_object=backend), ["the dog"])
    assert coverage.unk_token is None and coverage.unk_rate is None and coverage.warnings() == []
    assert "no unknown token" in coverage.summary_line()


def test_split_words_are_counted_in_context_and_warn_only_when_most_words_split():
    subword = _subword_tokenizer()
    assert subword.tokenize("the dog cat") == ["▁the", "▁dog", "▁c", "a", "t"]
    half = tokenizer_coverage(subword, ["the dog cat cat"])
    assert (half.split_words, half.words_sampled) == (2, 4) and half.split_word_fraction == SPLIT_WARN_FRACTION
    assert half.warnings() == []  # at the threshold: informational
    most = tokenizer_coverage(subword, ["cat cat dog"])
    [warning] = most.warnings()
    assert "66.7% of 3 sampled words" in warning


def test_word_sample_is_bounded_and_seeded(tok):
    texts = [f"the dog runs {'.' if k % 2 else 'zorp'}" for k in range(100)]  # 400 words
    coverage = tokenizer_coverage(tok, texts, max_words=30)
    assert coverage.words_sampled == 30
    assert coverage.text_tokens in (32, 36)  # whole texts until 30 words: 8 or 9 texts of 4 words
    assert tokenizer_coverage(tok, texts, max_words=30) == coverage
    assert tokenizer_coverage(tok, texts, max_words=1000).words_sampled == 400


def test_table_coverage_counts_target_text_tokens_only(tmp_path, tok):
    write_png(str(tmp_path / "img.png"))
    path = write_jsonl(tmp_path / "r.jsonl", [text_record(0, "the dog zorp ."), text_record(1, "blib cats run"),
                                              image_record(2, "img.png", "a red zorp")])
    # plain_lm with EOS: BOS (not a target), the text, EOS (a target but not text), the image span.
    table = build_sample_table([read_records(path)], tok, DataConfig(tokenizer="unused", add_eos=True),
                               image_tokens=4, max_len=64)
    assert int(table.is_target.sum()) == 13  # 10 text tokens + 3 EOS
    coverage = table_coverage(tok, table)
    assert (coverage.unk_tokens, coverage.text_tokens) == (3, 10) and coverage.unk_rate == 0.3
    # The words sampled are the known ones decoded from the targets: the dog . cats run a red.
    assert coverage.words_sampled == 7 and coverage.split_words == 0
    assert table_coverage(tok, table, max_words=3).words_sampled == 3


def test_table_coverage_measures_splits_of_the_trained_words(tmp_path):
    subword = _subword_tokenizer()
    subword.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<im_start>", "<im_patch>",
                                                                                   "<im_end>"]})
    path = write_jsonl(tmp_path / "r.jsonl", [text_record(0, "the cat"), text_record(1, "dog cat cat")])
    table = build_sample_table([read_records(path)], subword, DataConfig(tokenizer="unused"), image_tokens=0,
                               max_len=64)
    coverage = table_coverage(subword, table)
    assert (coverage.split_words, coverage.words_sampled) == (3, 5) and coverage.unk_rate == 0.0


# ---------------------------------------------------------------------------- vocabularies


def _swapped_copy(source: str, directory: str, a: str, b: str) -> str:
    """The tokenizer of `source` with the ids of tokens `a` and `b` exchanged (same size)."""
    shutil.copytree(source, directory)
    path = os.path.join(directory, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(data, f)
    return directory


def test_same_vocabulary_is_none(tmp_path, tok):
    other = load_tokenizer(make_word_tokenizer(str(tmp_path / "other")))
    assert vocabulary_difference(tok, other) is None


def test_swapped_tokens_are_named_with_both_ids(tmp_path, word_tokenizer_dir, tok):
    swapped = load_tokenizer(_swapped_copy(word_tokenizer_dir, str(tmp_path / "swapped"), "dog", "dogs"))
    assert len(swapped) == len(tok)
    dog, dogs = tok.convert_tokens_to_ids(["dog", "dogs"])
    text = vocabulary_difference(swapped, tok, names=("data.tokenizer", "the model's tokenizer"))
    assert text == (f"2 token(s) with different ids (data.tokenizer vs the model's tokenizer): "
                    f"'dogs' {dog} vs {dogs}, 'dog' {dogs} vs {dog}")


def test_different_sizes_name_both_sizes_and_the_extra_tokens(tmp_path, tok):
    bigger = load_tokenizer(make_word_tokenizer(str(tmp_path / "bigger"), extra_words=("zebra", "yak")))
    text = vocabulary_difference(tok, bigger, names=("data", "model"))
    assert text.startswith(f"data has {len(tok)} tokens, model has {len(tok) + 2}")
    assert "2 token(s) only in model: 'zebra' (id" in text and "'yak' (id" in text
    # Only the first `limit` differences are listed, then how many more.
    zebra = bigger.convert_tokens_to_ids("zebra")
    assert vocabulary_difference(tok, bigger, limit=1).endswith(f"'zebra' (id {zebra}), and 1 more")


def test_a_different_special_token_role_is_a_difference(tmp_path, tok):
    without_bos = load_tokenizer(make_word_tokenizer(str(tmp_path / "nobos"), bos=False))
    assert without_bos.get_vocab() == tok.get_vocab()
    assert vocabulary_difference(without_bos, tok, names=("data", "model")) == "bos token None in data, '<s>' in model"

