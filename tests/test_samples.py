"""Records → samples: label masks per objective, placeholder expansion, text-only stays text-only."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import image_record, text_record, write_jsonl, write_png

from jaxllava.data.config import DataConfig
from jaxllava.data.records import SkipReport, read_records
from jaxllava.data.samples import build_sample_table
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.errors import DataError

N = 6  # image tokens in these tests


@pytest.fixture(scope="module")
def tok(word_tokenizer_dir):
    return load_tokenizer(word_tokenizer_dir)


def table_for(tmp_path, records, tok, *, max_len=64, **cfg):
    path = write_jsonl(tmp_path / "r.jsonl", records)
    write_png(str(tmp_path / "img.png"))
    data_cfg = DataConfig(tokenizer="unused", **cfg)
    recs = read_records(path)
    return build_sample_table([recs], tok, data_cfg, image_tokens=N, max_len=max_len)


def words_to_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_lm_text_record_is_exactly_bos_plus_tokens(tmp_path, tok):
    table = table_for(tmp_path, [text_record(0, "the dog runs .")], tok)
    tokens, is_target = table.sample(0)
    assert tokens.tolist() == tok("the dog runs .")["input_ids"]
    assert tokens[0] == tok.bos_token_id
    assert is_target.tolist() == [False, True, True, True, True]


def test_text_only_sample_has_no_image_ids_and_no_image_length(tmp_path, tok):
    ids = special_ids(tok)
    table = table_for(tmp_path, [text_record(0, "the dog runs ."), image_record(1, "img.png", "a red circle")], tok)
    tokens, _ = table.sample(0)
    assert not np.isin(tokens, [ids.im_start, ids.im_patch, ids.im_end]).any()
    assert table.image_start[0] == -1 and table.images[0] is None
    assert table.lengths[0] == 5  # BOS + 4 words, no image tokens


def test_image_sample_has_exactly_n_placeholders_never_targets(tmp_path, tok):
    ids = special_ids(tok)
    table = table_for(tmp_path, [image_record(0, "img.png", "a red circle")], tok)
    tokens, is_target = table.sample(0)
    start = table.image_start[0]
    assert start == 1  # right after BOS
    span = tokens[start:start + N].tolist()
    assert span == [ids.im_start] + [ids.im_patch] * (N - 2) + [ids.im_end]
    assert np.isin(tokens, [ids.im_start, ids.im_patch, ids.im_end]).sum() == N
    assert not is_target[start:start + N].any()
    assert tokens[start + N:].tolist() == words_to_ids(tok, "a red circle")
    assert is_target[start + N:].all()


def test_captions_objective_trains_assistant_turns_only(tmp_path, tok):
    rec = image_record(0, "img.png", "a red circle", prompt="<image> the dog")
    table = table_for(tmp_path, [rec], tok, objective="captions")
    tokens, is_target = table.sample(0)
    # BOS, span, caption: the human text is dropped under captions.
    assert len(tokens) == 1 + N + 3
    assert is_target.tolist() == [False] + [False] * N + [True] * 3


def test_chat_llama2_masks_user_turns_and_supervises_eos(tmp_path):
    from conftest import make_word_tokenizer
    # The template's markup must be in the vocabulary of a word-level tokenizer.
    tok = load_tokenizer(make_word_tokenizer(str(tmp_path / "tok"), extra_words=("[INST]", "[/INST]")))
    rec = {"id": "c", "conversations": [{"from": "human", "value": "the dog"}, {"from": "gpt", "value": "runs ."},
                                        {"from": "human", "value": "a cat"}, {"from": "gpt", "value": "sees ."}]}
    table = table_for(tmp_path, [rec], tok, objective="chat")
    tokens, is_target = table.sample(0)
    pieces = tok.convert_ids_to_tokens(tokens.tolist())
    assert pieces == ["<s>", "[INST]", "the", "dog", "[/INST]", "runs", ".", "</s>",
                      "<s>", "[INST]", "a", "cat", "[/INST]", "sees", ".", "</s>"]
    targets = [p for p, t in zip(pieces, is_target) if t]
    assert targets == ["runs", ".", "</s>", "sees", ".", "</s>"]


def test_empty_human_turn_is_trained_under_every_objective(tmp_path, tok):
    # The reference masked every label of such records under its chat template (README pitfall 7).
    for objective in ("plain_lm", "captions"):
        table = table_for(tmp_path, [text_record(0, "the dog runs .")], tok, objective=objective)
        _, is_target = table.sample(0)
        assert is_target[1:].sum() == 4, objective


def test_add_eos_is_explicit(tmp_path, tok):
    without = table_for(tmp_path, [text_record(0, "the dog")], tok).sample(0)[0]
    with_eos = table_for(tmp_path, [text_record(0, "the dog")], tok, add_eos=True).sample(0)[0]
    assert without[-1] != tok.eos_token_id
    assert with_eos[-1] == tok.eos_token_id and len(with_eos) == len(without) + 1


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from conftest import make_word_tokenizer
    # The llama_2 template's markup must be in the vocabulary of a word-level tokenizer.
    return load_tokenizer(make_word_tokenizer(str(tmp_path_factory.mktemp("chat_tok")),
                                              extra_words=("[INST]", "[/INST]")))


# What an image record (human "<image>", gpt "a red circle") becomes with use_images false.
TEXT_ONLY_PIECES = {
    "plain_lm": ["<s>", "a", "red", "circle"],
    "captions": ["<s>", "a", "red", "circle"],
    "chat": ["<s>", "[INST]", "[/INST]", "a", "red", "circle", "</s>"],
}


@pytest.mark.parametrize("objective", ["plain_lm", "captions", "chat"])
def test_use_images_false_trains_image_records_as_text(tmp_path, chat_tok, objective):
    ids = special_ids(chat_tok)
    table = table_for(tmp_path, [image_record(0, "img.png", "a red circle")], chat_tok, use_images=False,
                      objective=objective)
    tokens, _ = table.sample(0)
    assert table.image_start[0] == -1 and table.images[0] is None and not table.has_image.any()
    assert not np.isin(tokens, [ids.im_start, ids.im_patch, ids.im_end]).any()
    assert chat_tok.convert_ids_to_tokens(tokens.tolist()) == TEXT_ONLY_PIECES[objective]


@pytest.mark.parametrize("use_images", [True, False])
def test_chat_image_marker_inside_the_user_text_is_removed_never_tokenized(tmp_path, chat_tok, use_images):
    ids = special_ids(chat_tok)
    record = image_record(0, "img.png", "runs .", prompt="the <image> dog")
    table = table_for(tmp_path, [record], chat_tok, objective="chat", use_images=use_images)
    tokens, _ = table.sample(0)
    pieces = chat_tok.convert_ids_to_tokens(tokens.tolist())
    span = ["<im_start>"] + ["<im_patch>"] * (N - 2) + ["<im_end>"] if use_images else []
    # The marker's own text is gone: "the <image> dog" trains as "the  dog" (no <unk>). The image
    # sits right before the turn's text, inside the template's wrapper, as LLaVA places it.
    assert pieces == ["<s>", "[INST]"] + span + ["the", "dog", "[/INST]", "runs", ".", "</s>"]
    assert table.has_image[0] == use_images
    assert np.isin(tokens, [ids.im_start, ids.im_patch, ids.im_end]).sum() == (N if use_images else 0)


@pytest.mark.parametrize("objective", ["plain_lm", "captions", "chat"])
def test_image_marker_in_an_assistant_turn_still_gives_one_span_and_is_never_tokenized(tmp_path, chat_tok,
                                                                                       objective):
    # records.py accepts the one <image> in any turn; the span depends on the record having an image.
    record = {"id": "m", "image": "img.png", "conversations": [{"from": "human", "value": "the dog"},
                                                                {"from": "gpt", "value": "<image> runs ."}]}
    table = table_for(tmp_path, [record], chat_tok, objective=objective)
    tokens, is_target = table.sample(0)
    start = table.image_start[0]
    pieces = chat_tok.convert_ids_to_tokens(tokens.tolist())
    assert start == (2 if objective == "chat" else 1)  # chat: after "[INST]", before the turn's text
    assert pieces[start:start + N] == ["<im_start>"] + ["<im_patch>"] * (N - 2) + ["<im_end>"]
    assert "<unk>" not in pieces and pieces.count("<im_start>") == 1
    assert not is_target[start:start + N].any()
    trained = [p for p, t in zip(pieces, is_target) if t]
    assert trained[:2] == (["the", "dog"] if objective == "plain_lm" else ["runs", "."])


def test_the_vicuna_system_prompt_comes_before_the_user_wrapper_and_llama_2s_inside_it():
    from jaxllava.data.templates import TEMPLATES, user_turn

    assert user_turn(TEMPLATES["vicuna_v1"], "hi", first=True) == (
        "A chat between a curious user and an artificial intelligence assistant. USER: ", "hi ASSISTANT:")
    assert user_turn(TEMPLATES["vicuna_v1"], "hi", first=False) == ("USER: ", "hi ASSISTANT:")
    llama = TEMPLATES["llama_2"]
    with_system = dataclasses.replace(llama, system="be brief")
    assert user_turn(with_system, "hi", first=True) == ("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\n", "hi [/INST]")
    assert user_turn(llama, "hi", first=True) == ("[INST] ", "hi [/INST]")


def test_chat_image_record_without_a_user_turn_puts_the_span_after_bos(tmp_path, chat_tok):
    record = {"id": "a", "image": "img.png", "conversations": [{"from": "gpt", "value": "<image> a red circle"}]}
    table = table_for(tmp_path, [record], chat_tok, objective="chat")
    pieces = chat_tok.convert_ids_to_tokens(table.sample(0)[0].tolist())
    assert table.image_start[0] == 1
    assert pieces[N + 1:] == ["a", "red", "circle", "</s>"]


@pytest.mark.parametrize("use_images", [True, False])
def test_text_only_record_with_a_literal_image_marker_is_refused(tmp_path, chat_tok, use_images):
    record = {"id": "x", "conversations": [{"from": "human", "value": "<image> the dog"},
                                           {"from": "gpt", "value": "runs ."}]}
    with pytest.raises(DataError) as caught:
        table_for(tmp_path, [record], chat_tok, objective="chat", use_images=use_images)
    assert (caught.value.reason, caught.value.field, caught.value.record_id) == (
        "image_token", "conversations[0].value", "x")


def test_over_long_text_is_truncated_and_marked(tmp_path, tok):
    table = table_for(tmp_path, [text_record(0, " ".join(["dog"] * 20))], tok, max_len=8)
    assert table.lengths[0] == 8 and table.truncated[0]


def test_over_long_text_errors_when_truncation_is_off(tmp_path, tok):
    with pytest.raises(DataError, match=r"line 1.*id 't0'.*more than the largest bucket 8"):
        table_for(tmp_path, [text_record(0, " ".join(["dog"] * 20))], tok, max_len=8, truncate_text=False)


def test_over_long_image_sample_is_an_error_never_a_cut_span(tmp_path, tok):
    rec = image_record(0, "img.png", " ".join(["dog"] * 10))
    with pytest.raises(DataError, match=r"image span would be cut"):
        table_for(tmp_path, [rec], tok, max_len=12)


def test_over_long_image_sample_is_a_counted_skip_under_skip_policy(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", [image_record(0, "img.png", " ".join(["dog"] * 10)),
                                             text_record(1, "the dog")])
    write_png(str(tmp_path / "img.png"))
    skips = SkipReport()
    table = build_sample_table([read_records(path)], tok, DataConfig(tokenizer="x", on_bad_record="skip"),
                               image_tokens=N, max_len=12, skips=skips)
    assert len(table) == 1 and table.ids == ["t1"]
    assert skips.counts["too_long"] == 1


def test_sample_without_targets_is_an_error(tmp_path, tok):
    # Under captions a text-only record with only a user turn trains nothing.
    rec = {"id": "u", "conversations": [{"from": "human", "value": "the dog runs"}]}
    with pytest.raises(DataError, match=r"id 'u'.*no training target"):
        table_for(tmp_path, [rec], tok, objective="captions")


def test_word_counts_follow_the_objective(tmp_path, tok):
    rec = {"id": "w", "conversations": [{"from": "human", "value": "the dog"}, {"from": "gpt", "value": "runs ."}]}
    plain = table_for(tmp_path, [rec], tok)
    captions = table_for(tmp_path, [rec], tok, objective="captions")
    reference = table_for(tmp_path, [rec], tok, word_rule="reference")
    assert plain.words[0] == 4  # "the dog runs ." : all turns are trained under plain_lm
    assert captions.words[0] == 2  # assistant turn only
    assert reference.words[0] == 1  # reference rule: assistant only, "." is not a word
