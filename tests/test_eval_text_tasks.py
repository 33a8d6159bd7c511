"""Entity tracking, COMPS and WUG: reading as the 2025 pipeline reads, scoring as it scores.

The reference in `pipeline_decisions` restates evaluation-pipeline-2025
`sentence_zero_shot/dataset.py::process_causal_sentences` + `get_causal_collate_fn` +
`compute_results.py::compute_causal_results` / `rank_and_evaluate(_wug)` +
`run.py::process_results` in torch, for any number of candidates, on a tiny random
transformers Llama.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerFast

from test_scoring import _bpe, _hf_llama, _torch_logits_fn

from jaxllava.errors import DataError
from jaxllava.eval import pipeline_layout, text_tasks

ET_REGULAR = [
    {"sample_id": 0, "numops": 0, "input_prefix": "Box A contains the cat. Box A contains ",
     "options": ["the cat.", "the dog.", "nothing.", "the mat.", "a book."], "example_id": 0},
    {"sample_id": 1, "numops": 1, "input_prefix": "The box is red. Box B contains ",
     "options": ["the book.", "the cat.", "the cup.", "nothing.", "the dog."], "example_id": 1},
    {"sample_id": 2, "numops": 1, "input_prefix": "Move the cat. Box C contains ",
     "options": ["nothing.", "the cat.", "the man.", "the red box.", "a cup."], "example_id": 2},
]
ET_AMBIREF = [
    {"sample_id": 0, "numops": 0, "input_prefix": "Who did the dog see? The dog saw ",
     "options": ["the man.", "the cat.", "the girl.", "the book.", "the box."], "example_id": 0},
]
COMPS = [
    {"prefix_acceptable": "A cat", "prefix_unacceptable": "A book", "property_phrase": "can sleep."},
    {"prefix_acceptable": "A dog", "prefix_unacceptable": "A cup", "property_phrase": "can see the man."},
]
WUG = [
    {"sentences": "The dog is red. The dog sees\tThe dog is red. The dog saw", "ratio": 0.25},
    {"sentences": "The cat walks.\tThe cat walked.", "ratio": "0.75"},
    {"sentences": "A man sleeps.\tA man slept.", "ratio": 0.5},
]


def _write(directory, name, records):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------- reading


def test_entity_tracking_reads_prefix_plus_options_and_uids_by_split_and_ops(tmp_path):
    path = _write(tmp_path / "et", "regular.jsonl", ET_REGULAR)
    task = text_tasks.read_text_task("entity_tracking", path)
    first = task.items[0]
    assert first.sentences[0] == "Box A contains the cat. Box A contains the cat."  # no separator added
    assert first.completions == tuple(ET_REGULAR[0]["options"])
    assert [i.uid for i in task.items] == ["regular_0_ops", "regular_1_ops", "regular_1_ops"]
    assert [i.id for i in task.items] == ["regular_0_ops_0", "regular_1_ops_0", "regular_1_ops_1"]


def test_comps_joins_prefix_and_phrase_and_names_the_subset_by_file(tmp_path):
    path = _write(tmp_path / "comps", "comps_wugs_dist-before.jsonl", COMPS)
    task = text_tasks.read_text_task("comps", path)
    assert task.items[0].sentences == ("A cat can sleep.", "A book can sleep.")
    assert task.items[0].completions == ("can sleep.", "can sleep.")
    assert task.items[1].uid == "wugs_dist_before"
    _write(tmp_path / "bad", "comps_other.jsonl", COMPS)
    with pytest.raises(DataError, match=r"comps_other.jsonl, line 1: unknown COMPS file name"):
        text_tasks.read_text_task("comps", tmp_path / "bad")


def test_wug_splits_candidates_on_tabs_and_reads_the_ratio_as_float(tmp_path):
    path = _write(tmp_path / "wug", "wug_past_tense.jsonl", WUG)
    task = text_tasks.read_text_task("wug_past", path)
    assert task.items[1].sentences == ("The cat walks.", "The cat walked.")
    assert task.items[1].completions == task.items[1].sentences
    assert task.ratios.tolist() == [0.25, 0.75, 0.5]
    assert {i.uid for i in task.items} == {"wug_past"}


@pytest.mark.parametrize("kind, record, field", [
    ("entity_tracking", {**ET_REGULAR[0], "options": "the cat."}, "options"),
    ("entity_tracking", {**ET_REGULAR[0], "numops": "1"}, "numops"),
    ("entity_tracking", {k: v for k, v in ET_REGULAR[0].items() if k != "input_prefix"}, "input_prefix"),
    ("comps", {**COMPS[0], "property_phrase": 3}, "property_phrase"),
    ("wug_adj", {"sentences": "only one candidate", "ratio": 0.5}, "sentences"),
    ("wug_adj", {"sentences": "a\tb", "ratio": "high"}, "ratio"),
])
def test_a_malformed_line_names_file_line_and_field(tmp_path, kind, record, field):
    name = {"entity_tracking": "regular.jsonl", "comps": "comps_base.jsonl"}.get(kind, "wug.jsonl")
    good = {"entity_tracking": ET_REGULAR[1], "comps": COMPS[1]}.get(kind, WUG[0])
    _write(tmp_path, name, [good, record])
    with pytest.raises(DataError) as error:
        text_tasks.read_text_task(kind, tmp_path)
    assert f"{name}, line 2" in str(error.value) and f"field '{field}'" in str(error.value)


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "regular.jsonl").write_text(json.dumps(ET_REGULAR[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"regular.jsonl, line 2: invalid JSON"):
        text_tasks.read_text_task("entity_tracking", tmp_path)


# ---------------------------------------------------------------------------- the pipeline, restated


def pipeline_decisions(model, tokenizer, items, batch_size):
    """(scores (items, k), chosen) as compute_causal_results computes them, k candidates."""
    pad_id = tokenizer.pad_token_id
    scores = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        per_candidate = []
        for k in range(len(batch[0].sentences)):
            tokens, attention, phrase = [], [], []
            for item in batch:
                sentence, completion = item.sentences[k], item.completions[k]
                out = tokenizer(text=sentence, return_offsets_mapping=True)
                offsets = out["offset_mapping"]
                start_char = len(sentence) - len(completion) + offsets[0][0]
                tokens.append(torch.LongTensor(out["input_ids"]))
                attention.append(torch.LongTensor(out["attention_mask"]))
                phrase.append(torch.LongTensor([int(end > start_char) for _, end in offsets]))
            padded = pad_sequence(tokens, batch_first=True, padding_value=pad_id)
            mask = pad_sequence(phrase, batch_first=True)[:, 1:]
            with torch.no_grad():
                logits = model(input_ids=padded[:, :-1],
                               attention_mask=pad_sequence(attention, batch_first=True)[:, :-1]).logits
            log_probs = torch.gather(F.log_softmax(logits, -1), -1, padded[:, 1:].unsqueeze(-1)).squeeze(-1)
            per_candidate.append(torch.sum(log_probs * mask, dim=1))
        scores.append(torch.stack(per_candidate, dim=1))
    stacked = torch.cat(scores)
    return stacked.double().numpy(), torch.max(stacked, dim=1)[1].numpy(), torch.softmax(stacked, 1)[:, 0].numpy()


def _split_means(items, chosen):
    """run.py::process_results for entity tracking: per-UID %, then per split, then the mean."""
    per_uid = {}
    for item, c in zip(items, chosen):
        per_uid.setdefault(item.uid, []).append(c == 0)
    acc = {uid: 100.0 * sum(v) / len(v) for uid, v in per_uid.items()}
    splits = [np.mean([a for u, a in acc.items() if u.startswith(s)]) for s in ("regular", "ambiref", "move_contents")
              if any(u.startswith(s) for u in acc)]
    return float(np.mean(splits))


@pytest.mark.parametrize("variant", ["nobos", "bos"])
def test_entity_tracking_scores_and_split_mean_match_the_pipeline(tmp_path, variant):
    _write(tmp_path, "regular.jsonl", ET_REGULAR)
    _write(tmp_path, "ambiref.jsonl", ET_AMBIREF)
    tokenizer = _bpe(variant)
    model = _hf_llama(len(tokenizer), seed=1)
    r = text_tasks.evaluate_text_task("entity_tracking", _torch_logits_fn(model, len(tokenizer)), tokenizer,
                                      tmp_path, batch_size=3, buckets=(64,))
    scores, chosen, _ = pipeline_decisions(model, tokenizer, r.task.items, batch_size=2)
    np.testing.assert_allclose(np.stack(r.results.scores), scores, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(r.results.chosen, chosen)
    assert r.average == pytest.approx(_split_means(r.task.items, chosen))
    assert set(r.split_accuracy) == {"regular", "ambiref"}
    # predictions.json: the chosen option; re-scored like calculate_results_from_pred.py (pred == options[0])
    preds = text_tasks.pipeline_predictions(r)
    assert [p["pred"] for p in preds["regular_1_ops"]["predictions"]] == [
        r.task.items[k].completions[chosen[k]] for k in (1, 2)]
    rescored = {uid: 100.0 * np.mean([p["pred"].strip() == i.completions[0].strip() for p, i in
                                      zip(v["predictions"], [i for i in r.task.items if i.uid == uid])])
                for uid, v in preds.items()}
    assert rescored == pytest.approx(r.results.accuracy["UID"])
    report_text = text_tasks.pipeline_report(r)
    assert "### UID ACCURACY\n" in report_text and f"regular: {r.split_accuracy['regular']:.2f}" in report_text
    assert report_text.endswith(f"### AVERAGE ACCURACY\n{r.average:.2f}\n\n")


def test_comps_and_wug_match_the_pipeline_and_write_its_prediction_format(tmp_path):
    _write(tmp_path / "comps", "comps_base.jsonl", COMPS)
    _write(tmp_path / "wug", "wug_adj_nominalization.jsonl", WUG)
    tokenizer = _bpe("bos")
    model = _hf_llama(len(tokenizer), seed=2)
    fn = _torch_logits_fn(model, len(tokenizer))
    comps = text_tasks.evaluate_text_task("comps", fn, tokenizer, tmp_path / "comps", buckets=(64,))
    scores, chosen, _ = pipeline_decisions(model, tokenizer, comps.task.items, batch_size=2)
    np.testing.assert_allclose(np.stack(comps.results.scores), scores, atol=1e-4, rtol=0)
    assert [p["pred"] for p in text_tasks.pipeline_predictions(comps)["base"]["predictions"]] == [
        item.sentences[c] for item, c in zip(comps.task.items, chosen)]  # COMPS: the whole sentence

    wug = text_tasks.evaluate_text_task("wug_adj", fn, tokenizer, tmp_path / "wug", buckets=(64,))
    _, chosen, prob0 = pipeline_decisions(model, tokenizer, wug.task.items, batch_size=3)
    np.testing.assert_allclose(wug.probs, prob0, atol=1e-5)
    from scipy.stats import spearmanr
    assert wug.average == pytest.approx(spearmanr(prob0, [0.25, 0.75, 0.5])[0])
    preds = text_tasks.pipeline_predictions(wug)["wug_adj"]["predictions"]
    assert [p["id"] for p in preds] == ["wug_adj_0", "wug_adj_1", "wug_adj_2"]
    assert [p["prob"] for p in preds] == pytest.approx(prob0.tolist(), abs=1e-5)
    assert text_tasks.pipeline_report(wug) == ("TEMPERATURE: 1.00\n\n### UID SPEARMAN'S RHO\n"
                                               f"avg: {wug.average:.2f}\n\n### AVERAGE SPEARMAN'S RHO\n"
                                               f"{wug.average:.2f}\n\n")


# ---------------------------------------------------------------------------- WUG by hand


def _word_tokenizer(words):
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: k + 3 for k, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")


def test_wug_probability_and_spearman_by_hand(tmp_path):
    # A model whose logits never change: a candidate's score is the sum over its tokens of
    # w[token] - logsumexp(w), so two prompts that differ in the last word only have
    # p(first) = sigmoid(w[a] - w[b]), and the ranks are known.
    endings = [("blickity", "blickness"), ("dax", "daxed"), ("wugged", "wug"), ("zib", "zibness")]
    tokenizer = _word_tokenizer(["Make", "a", "noun", ":"] + [w for pair in endings for w in pair])
    weights = np.zeros(len(tokenizer), np.float32)
    margins = [2.0, -1.0, 0.5, 3.0]  # w[first] - w[second] per item
    for (a, b), m in zip(endings, margins):
        weights[tokenizer.convert_tokens_to_ids(a)] = m
    humans = [0.9, 0.2, 0.3, 0.6]
    records = [{"sentences": f"Make a noun : {a}\tMake a noun : {b}", "ratio": h} for (a, b), h in zip(endings, humans)]
    _write(tmp_path, "wug.jsonl", records)

    def constant_logits(input_ids, segment_ids, positions):
        import jax.numpy as jnp
        return jnp.broadcast_to(jnp.asarray(weights), (*input_ids.shape, len(weights)))

    r = text_tasks.evaluate_text_task("wug_adj", constant_logits, tokenizer, tmp_path, buckets=(16,))
    expected_probs = 1 / (1 + np.exp(-np.array(margins)))
    np.testing.assert_allclose(r.probs, expected_probs, rtol=1e-5)
    # model ranks 3 1 2 4 (0.88, 0.27, 0.62, 0.95), human ranks 4 1 2 3: d = (-1, 0, 0, 1)
    assert r.average == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))
    assert r.results.chosen.tolist() == [0, 1, 0, 0]


# ---------------------------------------------------------------------------- layout


def test_task_sets_find_files_and_map_to_the_collation_paths(tmp_path):
    fast = tmp_path / "evaluation_data" / "fast_eval"
    _write(fast / "entity_tracking_fast", "regular.jsonl", ET_REGULAR)
    _write(fast / "wug_past_tense", "wug_past_tense.jsonl", WUG)
    found, skipped = pipeline_layout.find_tasks(str(tmp_path / "evaluation_data"), "babylm2025_fast")
    assert [s.name for s, _ in found] == ["entity_tracking_fast", "wug_past"]
    assert {s.name for s, _ in skipped} == {"blimp_fast", "supplement_fast", "ewok_fast", "wug_adj", "reading"}
    spec = found[0][0]
    r = text_tasks.evaluate_text_task("entity_tracking", lambda i, s, p: np.zeros((*i.shape, 320), np.float32),
                                      _bpe("bos"), found[0][1], buckets=(64,))
    directory = pipeline_layout.write_pipeline_layout(str(tmp_path / "results"), "mymodel", spec, r,
                                                      revision="chck_10M")
    assert directory == str(tmp_path / "results/mymodel/chck_10M/zero_shot/causal/entity_tracking/"
                                       "entity_tracking_fast")
    saved = json.loads((tmp_path / directory / "predictions.json").read_text())
    assert list(saved) == ["regular_0_ops", "regular_1_ops"]
    counts = {uid: len(v["predictions"]) for uid, v in saved.items()}
    assert pipeline_layout.size_problems(spec, counts)[0] == "regular_0_ops: 1 items, the pipeline expects 606"
    # Uniform logits: each target token costs ln V, so the option with the fewest tokens wins.
    masks = text_tasks.prepare_text_task("entity_tracking", found[0][1], _bpe("bos")).encoded.target_mask
    fewest = [int(np.argmin([m.sum() for m in masks[5 * k:5 * k + 5]])) for k in range(3)]
    assert r.results.chosen.tolist() == fewest
