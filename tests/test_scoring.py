"""Minimal-pair scoring matches the BabyLM pipelines' math (2025 causal backend; 2024 lm-eval).

The reference below is a literal torch port of evaluation-pipeline-2025
`sentence_zero_shot/dataset.py::process_causal_sentences`, `get_causal_collate_fn` and
`compute_results.py::compute_causal_results` / `rank_and_evaluate`, run on a tiny random
transformers `LlamaForCausalLM`.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.nn.utils.rnn import pad_sequence
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from conftest import score_items

from jaxllava.errors import ConfigError
from jaxllava.eval import report
from jaxllava.eval.minimal_pairs import MinimalPairItem, read_minimal_pairs
from jaxllava.eval.scoring import (aggregate, choose, compile_count, encode_candidates, identical_candidates,
                                   module_logits_fn, score_encoded)
from jaxllava.model.sharding import make_mesh, mesh_of

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_TOKENIZER = ROOT / "data" / "sample" / "tokenizer"
IMAGE_TEMPLATE = "<image>\n{text}"  # the reference's template (docs/reference.md#evaluation)

CORPUS = [
    "The cat sleeps.", "The cats sleep on the mat.", "Who did the dog see?", "A man walks to the store.",
    "These books are red.", "This book is red.", "The girl who the boys like sings.",
    "David: Should you quit?\nSarah: No, I shouldn't.", "The cup is left of the box.",
    "The box is right of the cup.", "Every child has eaten some cake.", "Many people were fired.",
]

PAIRS = [  # (good, bad), unequal lengths on purpose; the last is an identical pair as in real BLiMP
    ("The cat sleeps.", "The cats sleeps on the mat."),
    ("Who did the dog see?", "Who did the dog see the man?"),
    ("These books are red.", "This books are red."),
    ("The girl who the boys like sings.", "The girl who the boys like sing."),
    ("David: Should you quit?\nSarah: No, I shouldn't.", "David: Should you quit?\nSarah: No, you shouldn't."),
    ("Many people were fired.", "Many people were fired."),
]
EWOK = [  # synthetic, EWoK-shaped (Context1 + " " + Target)
    ("The cup is left of the box.", "The box is right of the cup.", "The box is left of the cup."),
    ("A man walks to the store.", "He is outside.", "He is asleep in bed right now."),
]


def _items() -> list[MinimalPairItem]:
    items = [MinimalPairItem(id=f"toy_{k}", uid="toy" if k < 3 else "toy2", sentences=pair, completions=pair,
                             metadata={"field": "syntax", "UID": "toy" if k < 3 else "toy2",
                                       "linguistics_term": "t"}, source=f"test:{k}")
             for k, pair in enumerate(PAIRS)]
    for k, (context, t1, t2) in enumerate(EWOK):
        items.append(MinimalPairItem(id=f"ewok_{k}", uid="ewok", sentences=(f"{context} {t1}", f"{context} {t2}"),
                                     completions=(f" {t1}", f" {t2}"), metadata={"UID": "ewok"},
                                     source=f"ewok:{k}"))
    return items


# ---------------------------------------------------------------------------- tokenizers


def _bpe_backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _bpe(variant: str) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE: no BOS ('nobos'), BOS ('bos') or BOS and EOS ('bos_eos')."""
    tok = _bpe_backend()
    trim = processors.ByteLevel(trim_offsets=True)
    template = {"nobos": None, "bos": "<s> $A", "bos_eos": "<s> $A </s>"}[variant]
    tok.post_processor = trim if template is None else processors.Sequence(
        [trim, processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


TOKENIZERS = ["nobos", "bos", "bos_eos"] + (["sample"] if SAMPLE_TOKENIZER.is_dir() else [])
# No-BOS and BOS tokenizers with and without the template; EOS exclusion; the bundled tokenizer.
PARITY_CASES = [("nobos", None), ("nobos", IMAGE_TEMPLATE), ("bos", None), ("bos", IMAGE_TEMPLATE),
                ("bos_eos", None)] + [("sample", IMAGE_TEMPLATE)] * ("sample" in TOKENIZERS)


def _tokenizer(name: str):
    if name == "sample":  # the bundled word-level tokenizer (BOS, no EOS), when it has been generated
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(SAMPLE_TOKENIZER))
    return _bpe(name)


# ---------------------------------------------------------------------------- models


def _hf_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = HFLlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           initializer_range=0.3, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def _torch_logits_fn(model: LlamaForCausalLM, vocab_size: int):
    """A JAX logits_fn backed by the torch model (through a host callback)."""
    def host(input_ids, segment_ids):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(np.array(input_ids)).long(),
                        attention_mask=torch.from_numpy(np.array(segment_ids)).long()).logits
        return out.numpy().astype(np.float32)

    def logits_fn(input_ids, segment_ids, positions):
        shape = jax.ShapeDtypeStruct((*input_ids.shape, vocab_size), jnp.float32)
        return jax.pure_callback(host, shape, input_ids, segment_ids)
    return logits_fn


def _toy_apply(params, input_ids, segment_ids, positions):
    """A small causal JAX LM: running mean of embeddings, tanh, projection."""
    x = params["embed"][input_ids] * segment_ids[..., None]
    running = jnp.cumsum(x, axis=1) / (positions[..., None] + 1.0)
    return jnp.tanh(running + params["embed"][input_ids]) @ params["out"]


def _toy_params(vocab_size: int, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"embed": jax.random.normal(k1, (vocab_size, 16)), "out": 2.0 * jax.random.normal(k2, (16, vocab_size))}


# ---------------------------------------------------------------------------- the pipeline, ported


def reference_2025(model, tokenizer, items, batch_size, template=None):
    """Scores (items, candidates) and chosen indices, as evaluation-pipeline-2025 computes them."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    all_scores, all_chosen = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        per_candidate = []
        for k in range(2):
            tokens, attention, phrase = [], [], []
            for item in batch:
                sentence = item.sentences[k] if template is None else template.format(text=item.sentences[k])
                completion = item.completions[k]
                out = tokenizer(text=sentence, return_offsets_mapping=True)
                ids, offsets = out["input_ids"], out["offset_mapping"]
                start_idx = 0
                start_char_idx = len(sentence) - len(completion) + offsets[start_idx][0]
                mask = [0] * len(ids)
                for i, (_, end) in enumerate(offsets[start_idx:]):
                    if end > start_char_idx:
                        mask[i + start_idx] = 1
                tokens.append(torch.LongTensor(ids))
                attention.append(torch.LongTensor(out["attention_mask"]))
                phrase.append(torch.LongTensor(mask))
            padded = pad_sequence(tokens, batch_first=True, padding_value=pad_id)
            inputs, targets = padded[:, :-1], padded[:, 1:]
            attn_mask = pad_sequence(attention, batch_first=True, padding_value=0)[:, :-1]
            phrase_mask = pad_sequence(phrase, batch_first=True, padding_value=0)[:, 1:]
            with torch.no_grad():
                logits = model(input_ids=inputs, attention_mask=attn_mask).logits
            log_probs = F.log_softmax(logits / 1.0, dim=-1)
            target_log_probs = torch.gather(log_probs, -1, targets.unsqueeze(-1)).squeeze(-1)
            per_candidate.append(torch.sum(target_log_probs * phrase_mask, dim=1))
        stacked = torch.stack(per_candidate, dim=1)
        all_scores.append(stacked.numpy())
        all_chosen += torch.max(stacked, dim=1)[1].tolist()
    return np.concatenate(all_scores).astype(np.float64), np.array(all_chosen)


# ---------------------------------------------------------------------------- (a) parity


@pytest.mark.parametrize("tokenizer_name, template", PARITY_CASES)
def test_scores_and_decisions_match_the_2025_pipeline_on_a_torch_llama(tokenizer_name, template):
    tokenizer = _tokenizer(tokenizer_name)
    items = _items()
    vocab_size = len(tokenizer)
    model = _hf_llama(vocab_size)
    expected_scores, expected_chosen = reference_2025(model, tokenizer, items, batch_size=4, template=template)

    results = score_items(_torch_logits_fn(model, vocab_size), tokenizer, items, image_template=template,
                       batch_size=7, buckets=(64,))

    np.testing.assert_allclose(np.stack(results.scores), expected_scores, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(results.chosen, expected_chosen)
    assert results.correct[len(PAIRS) - 1]  # identical pair: tie goes to the good sentence
    assert len(set(np.round(np.stack(results.scores)[:, 0], 3))) > 3  # scores are spread, not degenerate


def test_image_template_prefix_is_context_only():
    tokenizer = _bpe("nobos")
    items = _items()[:3]
    plain = encode_candidates(tokenizer, items)
    templated = encode_candidates(tokenizer, items, image_template=IMAGE_TEMPLATE)
    for row in range(plain.num_rows):
        scored_plain = plain.token_ids[row][plain.target_mask[row]]
        scored_templated = templated.token_ids[row][templated.target_mask[row]]
        # Without BOS the first piece of the plain sentence is context; after the prefix it is scored.
        assert tokenizer.decode(scored_templated) == items[row // 2].sentences[row % 2]
        assert list(scored_templated[-len(scored_plain):]) == list(scored_plain)
    with pytest.raises(ConfigError, match="literal text"):
        encode_candidates(tokenizer, items, image_template="{image_token}{text}")


def test_first_piece_is_scored_only_with_bos_and_eos_is_never_scored():
    sentence = _items()[0].sentences[0]
    items = _items()[:1]
    for variant in ("nobos", "bos", "bos_eos"):
        tokenizer = _bpe(variant)
        encoded = encode_candidates(tokenizer, items)
        ids, mask = encoded.token_ids[0], encoded.target_mask[0]
        assert not mask[0]
        if variant == "nobos":  # the first word piece is only context
            assert mask[1:].all() and tokenizer.decode(ids[mask]) == tokenizer.decode(ids[1:]) != sentence
        else:  # every word piece is scored given BOS
            assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[mask]) == sentence
        if variant == "bos_eos":
            assert ids[-1] == tokenizer.eos_token_id and not mask[-1]


def test_offset_rule_shifts_start_by_the_first_token_start_like_the_pipeline():
    # dataset.py: start_char_idx = len(sentence) - len(completion) + offsets[0][0]. A pre-tokenizer
    # that drops spaces gives a leading-space sentence offsets[0][0] == 1, which pushes the start
    # one character into the completion and drops its first one-letter word.
    tokenizer = _word_tokenizer(bos=False)
    item = MinimalPairItem(id="u_0", uid="u", sentences=(" a b c", " a c b"), completions=("b c", "c b"),
                           metadata={"UID": "u"}, source="t")
    encoded = encode_candidates(tokenizer, [item])
    assert tokenizer(" a b c", return_offsets_mapping=True)["offset_mapping"][0] == (1, 2)
    assert encoded.target_mask[0].tolist() == [False, False, True]


def test_ewok_mask_decodes_to_the_space_and_target():
    for variant in ("nobos", "bos", "bos_eos"):
        tokenizer = _bpe(variant)
        items = _items()[len(PAIRS):]
        encoded = encode_candidates(tokenizer, items)
        for row in range(encoded.num_rows):
            scored = encoded.token_ids[row][encoded.target_mask[row]]
            assert tokenizer.decode(scored) == items[row // 2].completions[row % 2]


# ---------------------------------------------------------------------------- (b) invariance


def test_scores_do_not_depend_on_batch_size_or_buckets():
    tokenizer = _bpe("bos")
    items = _items()
    encoded = encode_candidates(tokenizer, items)
    logits_fn = jax.tree_util.Partial(_toy_apply, _toy_params(len(tokenizer)))
    baseline = score_encoded(logits_fn, encoded, batch_size=1, buckets=(64,))
    for batch_size, buckets in ((3, (16, 64)), (64, (128,))):
        scores = score_encoded(logits_fn, encoded, batch_size=batch_size, buckets=buckets)
        np.testing.assert_allclose(scores, baseline, atol=1e-4, rtol=0)  # float32 sums of ~300
    assert scores.dtype == np.float64 and scores.shape == (encoded.num_rows,)
    assert np.ptp(baseline) > 1.0

    # Padding positions cannot leak into a score, even as -inf logits (the pipeline's
    # `log_probs * mask` would turn those into NaN).
    def inf_on_padding(ids, seg, pos):
        return jnp.where(seg[..., None] == 1, logits_fn(ids, seg, pos), -jnp.inf)
    scores = score_encoded(inf_on_padding, encoded, batch_size=3, buckets=(16, 64))
    np.testing.assert_allclose(scores, baseline, atol=1e-4, rtol=0)


def test_closure_and_partial_logits_fn_give_the_same_scores():
    tokenizer = _bpe("nobos")
    encoded = encode_candidates(tokenizer, _items())
    params = _toy_params(len(tokenizer), seed=3)
    via_partial = score_encoded(jax.tree_util.Partial(_toy_apply, params), encoded, buckets=(64,))
    via_closure = score_encoded(lambda i, s, p: _toy_apply(params, i, s, p), encoded, buckets=(64,))
    np.testing.assert_allclose(via_partial, via_closure, atol=1e-6, rtol=0)


def test_parameters_on_a_mesh_take_the_batches_there_and_score_the_same():
    # One device here; tests/test_evaluator.py runs an 8-device mesh and two processes.
    tokenizer = _bpe("nobos")
    encoded = encode_candidates(tokenizer, _items())
    params = _toy_params(len(tokenizer), seed=3)
    mesh = make_mesh(devices=jax.devices()[:1])
    on_mesh = jax.device_put(params, NamedSharding(mesh, P()))
    assert mesh_of(on_mesh) == mesh
    assert mesh_of(params) is None and mesh_of(jax.tree.map(np.asarray, params)) is None  # one device, host
    with pytest.raises(ValueError, match="different meshes"):
        mesh_of([on_mesh, jax.device_put(params, NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P()))])
    expected = score_encoded(jax.tree_util.Partial(_toy_apply, params), encoded, batch_size=5, buckets=(64,))
    got = score_encoded(jax.tree_util.Partial(_toy_apply, on_mesh), encoded, batch_size=5, buckets=(64,))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_logits_with_prepended_positions_keep_the_last_ones_like_the_pipeline():
    # compute_results.py: a model that prepends positions (e.g. image vectors) is scored on the last T.
    tokenizer = _bpe("bos")
    encoded = encode_candidates(tokenizer, _items()[:3])
    logits_fn = jax.tree_util.Partial(_toy_apply, _toy_params(len(tokenizer)))

    def with_prefix(ids, seg, pos):
        logits = logits_fn(ids, seg, pos)
        return jnp.concatenate([jnp.full_like(logits[:, :3], 5.0), logits], axis=1)
    np.testing.assert_allclose(score_encoded(with_prefix, encoded, buckets=(64,)),
                               score_encoded(logits_fn, encoded, buckets=(64,)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- (c) ties


def test_ties_and_nan_in_the_good_slot_count_as_correct_like_torch_max():
    assert choose(np.array([-5.0, -5.0])) == 0
    assert choose(np.array([-np.inf, -np.inf])) == 0
    assert choose(np.array([np.nan, 1.0])) == 0
    assert choose(np.array([1.0, np.nan])) == 1
    assert choose(np.array([-7.0, -5.0, -5.0])) == 1
    for scores in ([-5.0, -5.0], [np.nan, 1.0], [1.0, np.nan], [-3.0, -2.0, -2.0]):
        assert choose(np.array(scores)) == int(torch.max(torch.tensor([scores]), dim=1)[1])


def test_identical_pairs_and_a_constant_model_score_all_correct():
    tokenizer = _bpe("bos")
    vocab_size = len(tokenizer)
    # Both candidates with the same number of target tokens under a model with constant logits.
    same_length = [MinimalPairItem(id=f"u_{k}", uid="u", sentences=(a, a[::-1]), completions=(a, a[::-1]),
                                   metadata={"UID": "u"}, source="t")
                   for k, a in enumerate(["abc", "xyz", "ab"])]
    for item in same_length:
        lengths = [len(tokenizer(s)["input_ids"]) for s in item.sentences]
        assert lengths[0] == lengths[1]
    constant = lambda ids, seg, pos: jnp.zeros((*ids.shape, vocab_size), jnp.float32)  # noqa: E731
    results = score_items(constant, tokenizer, same_length, buckets=(16,))
    assert results.correct.all() and results.average == 100.0 and results.ties == len(same_length)

    nan_model = lambda ids, seg, pos: jnp.full((*ids.shape, vocab_size), jnp.nan)  # noqa: E731
    results = score_items(nan_model, tokenizer, _items(), buckets=(64,))
    assert results.correct.all() and results.nonfinite == len(_items())  # NaN in slot 0 wins, as in torch.max

    identical = [it for it in _items() if it.sentences[0] == it.sentences[1]]
    results = score_items(jax.tree_util.Partial(_toy_apply, _toy_params(vocab_size)), tokenizer, identical,
                       buckets=(16,))
    assert results.scores[0][0] == results.scores[0][1] and results.correct.all()


def test_identical_candidates_need_equal_ids_and_equal_target_masks():
    tokenizer = _tokenizer("sample") if "sample" in TOKENIZERS else _bpe("bos")
    def item(k, sentences, completions):
        return MinimalPairItem(id=f"i_{k}", uid="u", sentences=sentences, completions=completions,
                               metadata={"UID": "u"}, source="t")
    items = [item(0, ("the dog runs .", "the dog runs ."), ("the dog runs .", "the dog runs .")),
             item(1, ("the dog runs .", "the dogs run ."), ("the dog runs .", "the dogs run .")),
             # the same ids, but the second candidate scores only its last token
             item(2, ("the dog runs .", "the dog runs ."), ("the dog runs .", "."))]
    encoded = encode_candidates(tokenizer, items)
    assert list(encoded.token_ids[4]) == list(encoded.token_ids[5])
    assert identical_candidates(encoded).tolist() == [True, False, False]


def test_identical_pairs_are_counted_and_shown_beside_the_ties(tmp_path):
    tokenizer = _bpe("bos")
    items = _items()  # one pair, "Many people were fired.", has identical sentences
    logits_fn = jax.tree_util.Partial(_toy_apply, _toy_params(len(tokenizer)))
    results = score_items(logits_fn, tokenizer, items, buckets=(64,))
    assert results.identical == 1 and results.ties == 1 and results.correct[len(PAIRS) - 1]
    assert "ties: 1 (1 of them identical after tokenization), counted correct as the pipeline does" in (
        report.format_table(results))
    assert report.summary(results)["identical_after_tokenization"] == 1 and report.summary(results)["ties"] == 1
    distinct = [item for item in items if item.sentences[0] != item.sentences[1]]
    templated = score_items(logits_fn, tokenizer, distinct, image_template=IMAGE_TEMPLATE, buckets=(64,))
    comparison = report.format_comparison(results, templated)
    row = next(line for line in comparison.splitlines() if line.startswith("ties (identical after tokenization)"))
    assert row.split()[-4:] == ["1", "(1)", "0", "(0)"]
    assert "ties count as correct, as the pipeline does" in comparison


# ---------------------------------------------------------------------------- (d) compiles


def test_compiles_once_per_bucket_used_and_reuses_them():
    tokenizer = _bpe("bos")
    items = _items()
    encoded = encode_candidates(tokenizer, items)
    buckets = (8, 16, 64)
    lengths = [len(ids) - 1 for ids in encoded.token_ids]
    used = {min(b for b in buckets if b >= n) for n in lengths}
    assert len(used) >= 2
    params = _toy_params(len(tokenizer), seed=5)

    def fresh_logits_fn(ids, seg, pos):  # a new function: nothing cached for it yet
        return _toy_apply(params, ids, seg, pos)

    first = score_items(fresh_logits_fn, tokenizer, items, batch_size=2, buckets=buckets)
    assert first.compiles == len(used)
    again = score_items(fresh_logits_fn, tokenizer, items, batch_size=2, buckets=buckets)
    assert again.compiles == 0
    np.testing.assert_array_equal(np.stack(first.scores), np.stack(again.scores))

    before = compile_count()
    score_encoded(fresh_logits_fn, encoded, batch_size=3, buckets=(64,))  # a new batch shape
    assert compile_count() - before == 1


def test_sequence_longer_than_the_largest_bucket_is_a_config_error():
    tokenizer = _bpe("bos")
    encoded = encode_candidates(tokenizer, _items())
    with pytest.raises(ConfigError, match="largest bucket"):
        score_encoded(jax.tree_util.Partial(_toy_apply, _toy_params(len(tokenizer))), encoded, buckets=(4,))


# ---------------------------------------------------------------------------- (e) 2024 protocol


def _word_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "a": 4, "b": 5, "c": 6, "d": 7}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                   pad_token="<pad>")


def test_protocols_on_a_bigram_model_match_hand_computed_sums():
    table = np.asarray(3.0 * jax.random.normal(jax.random.key(7), (8, 8)), np.float32)
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(table), axis=-1), np.float64)  # lp[prev, next]
    bigram = lambda ids, seg, pos: jnp.asarray(table)[ids]  # noqa: E731
    a, b, c, d, bos, eos = 4, 5, 6, 7, 1, 2
    blimp = MinimalPairItem(id="u_0", uid="u", sentences=("a b c", "a c b"), completions=("a b c", "a c b"),
                            metadata={"UID": "u"}, source="t")
    ewok = MinimalPairItem(id="e_0", uid="e", sentences=("a b c d", "a b d c"), completions=(" c d", " d c"),
                           metadata={"UID": "e"}, source="t")
    # A context ending in a space: lm-eval moves the space into the continuation (_encode_pair).
    spaced = MinimalPairItem(id="s_0", uid="s", sentences=("a b c d", "a b d c"), completions=("c d", "d c"),
                             metadata={"UID": "s"}, source="t")
    items = [blimp, ewok, spaced]

    def scores(tokenizer, protocol):
        return np.stack(score_items(bigram, tokenizer, items, protocol=protocol, buckets=(8,)).scores)

    no_bos, with_bos = _word_tokenizer(bos=False), _word_tokenizer(bos=True)
    expected_2025_no_bos = [[lp[a, b] + lp[b, c], lp[a, c] + lp[c, b]],  # first word only context
                            [lp[b, c] + lp[c, d], lp[b, d] + lp[d, c]],
                            [lp[b, c] + lp[c, d], lp[b, d] + lp[d, c]]]
    expected_2025_bos = [[lp[bos, a] + lp[a, b] + lp[b, c], lp[bos, a] + lp[a, c] + lp[c, b]],
                         *expected_2025_no_bos[1:]]
    expected_2024_eos = [[lp[eos, a] + lp[a, b] + lp[b, c], lp[eos, a] + lp[a, c] + lp[c, b]],
                         *expected_2025_no_bos[1:]]  # context items: no prefix token, targets only
    np.testing.assert_allclose(scores(no_bos, "2025"), expected_2025_no_bos, atol=1e-5)
    np.testing.assert_allclose(scores(with_bos, "2025"), expected_2025_bos, atol=1e-5)
    np.testing.assert_allclose(scores(with_bos, "2024"), expected_2025_bos, atol=1e-5)  # BOS as the prefix
    np.testing.assert_allclose(scores(no_bos, "2024"), expected_2024_eos, atol=1e-5)  # no BOS: EOS


def test_2024_protocol_scores_space_prefixed_sentence_after_the_prefix_token():
    tokenizer = _bpe("nobos")
    item = _items()[0]
    encoded = encode_candidates(tokenizer, [item], protocol="2024")
    expected = tokenizer(" " + item.sentences[0], add_special_tokens=False)["input_ids"]
    assert list(encoded.token_ids[0]) == [tokenizer.bos_token_id] + expected
    assert list(encoded.target_mask[0]) == [False] + [True] * len(expected)
    spaced = MinimalPairItem(id="s_0", uid="s", sentences=("The cat sleeps.", "The cat sleep."),
                             completions=("sleeps.", "sleep."), metadata={"UID": "s"}, source="t")
    encoded = encode_candidates(tokenizer, [spaced], protocol="2024")
    context = tokenizer("The cat", add_special_tokens=False)["input_ids"]
    whole = tokenizer("The cat sleeps.", add_special_tokens=False)["input_ids"]
    assert list(encoded.token_ids[0]) == context + whole[len(context):]
    with pytest.raises(ConfigError, match="2025"):
        encode_candidates(tokenizer, [item], protocol="2024", image_template=IMAGE_TEMPLATE)


# ---------------------------------------------------------------------------- aggregation, report


def test_task_average_is_the_mean_over_uids_not_over_items():
    items = [MinimalPairItem(id=f"{u}_{k}", uid=u, sentences=("x", "y"), completions=("x", "y"),
                             metadata={"field": "f", "UID": u}, source="t")
             for u, n in (("A", 1), ("B", 3)) for k in range(n)]
    accuracy, counts, average = aggregate(items, np.array([True, False, False, False]))
    assert accuracy["UID"] == {"A": 100.0, "B": 0.0} and average == 50.0
    assert accuracy["field"] == {"f": 25.0} and counts["UID"] == {"A": 1, "B": 3}


def test_report_files_hold_scores_and_the_official_layout(tmp_path):
    tokenizer = _bpe("bos")
    items = _items()
    logits_fn = jax.tree_util.Partial(_toy_apply, _toy_params(len(tokenizer)))
    plain = score_items(logits_fn, tokenizer, items, buckets=(64,))
    templated = score_items(logits_fn, tokenizer, items, image_template=IMAGE_TEMPLATE, buckets=(64,))

    report.write_predictions(plain, str(tmp_path / "predictions.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [it.id for it in items]
    np.testing.assert_allclose([line["scores"] for line in lines], np.stack(plain.scores))
    assert [line["correct"] for line in lines] == plain.correct.tolist()

    report.write_summary(plain, str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["average"] == pytest.approx(np.mean(list(plain.accuracy["UID"].values())))
    assert summary["n"] == len(items) and summary["chance"] == 50.0
    assert summary["by"]["UID"]["toy"]["n"] == 3

    report.write_pipeline_files(plain, str(tmp_path / "official"))
    text = (tmp_path / "official" / "best_temperature_report.txt").read_text()
    assert text.startswith("TEMPERATURE: 1.00\n\n### FIELD ACCURACY\nsyntax: ")
    assert f"### AVERAGE ACCURACY\n{plain.average:.2f}\n" in text
    predictions = json.loads((tmp_path / "official" / "predictions.json").read_text())
    assert predictions["ewok"]["predictions"][0] == {"id": "ewok_0", "pred": items[len(PAIRS)].completions[
        plain.chosen[len(PAIRS)]]}

    table = report.format_comparison(plain, templated)
    assert "UID toy" in table and "average over UIDs" in table
    assert f"{templated.average - plain.average:+.2f}" in table
    assert "chance" in report.format_table(plain)


# ---------------------------------------------------------------------------- end to end, JAX Llama


def test_jax_llama_loaded_from_transformers_scores_like_the_torch_reference():
    from jaxllava.convert.hf_configs import llama_config_from_hf
    from jaxllava.convert.weights import load_hf_llama_weights
    from jaxllava.model.llama import Llama

    tokenizer = _tokenizer("sample" if "sample" in TOKENIZERS else "bos")
    sample_pairs = ROOT / "data" / "sample" / "minimal_pairs.jsonl"
    items = _items() + (read_minimal_pairs(sample_pairs, "blimp")[::75] if sample_pairs.is_file() else [])
    vocab_size = len(tokenizer)
    hf_model = _hf_llama(vocab_size, seed=1)
    expected_scores, expected_chosen = reference_2025(hf_model, tokenizer, items, batch_size=8)

    model = Llama(llama_config_from_hf(hf_model.config.to_dict()), dtype=jnp.float32, attention_impl="xla",
                  rngs=nnx.Rngs(0))
    unused = load_hf_llama_weights(model, {k: v.numpy() for k, v in hf_model.state_dict().items()})
    assert unused == []
    for template in (None, IMAGE_TEMPLATE):
        results = score_items(module_logits_fn(model), tokenizer, items, image_template=template, batch_size=4,
                           buckets=(64,))
        if template is None:
            np.testing.assert_allclose(np.stack(results.scores), expected_scores, atol=1e-4, rtol=0)
            np.testing.assert_array_equal(results.chosen, expected_chosen)
        else:
            expected_t, chosen_t = reference_2025(hf_model, tokenizer, items, batch_size=8, template=template)
            np.testing.assert_allclose(np.stack(results.scores), expected_t, atol=1e-4, rtol=0)
            np.testing.assert_array_equal(results.chosen, chosen_t)
