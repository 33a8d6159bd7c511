"""Reading: the CSV as pandas reads it, word surprisal as get_p2 computes it, OLS ΔR² as run.py fits it."""
from __future__ import annotations

import csv
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_scoring import _bpe, _hf_llama, _torch_logits_fn

from jaxllava.errors import DataError
from jaxllava.eval import reading

COLUMNS = ["item", "word", "prev_item", "prev_word", "Subtlex_log10", "length", "context_length", "prev_length",
           "RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound", "self_paced_reading_time"]


def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def _sentence_rows(rng, sentences):
    """One row per word after the first, prev_* naming the previous row's pair (empty on the first)."""
    rows = []
    for sentence in sentences:
        words = sentence.split()
        for k in range(1, len(words)):
            prev = (" ".join(words[:k - 1]), " " + words[k - 1]) if k > 1 else ("", "")
            rts = rng.normal(300, 40, size=5).round(1)
            rows.append([" ".join(words[:k]), " " + words[k], *prev, round(rng.normal(3, 1), 3), len(words[k]), k,
                         len(words[k - 1]), *rts])
    return rows


def test_csv_missing_values_follow_pandas_and_run_py(tmp_path):
    rows = [["", " cat", "", "", "3.1", "3", "0", "", "200", "NA", "250", "260", "310"],
            ["The", " dog", "NA", "x", "2.5", "3", "1", "3", "210", "220", "", "270", "nan"]]
    data = reading.read_reading_csv(_csv(tmp_path / "r.csv", rows))
    assert data.items == ["None", "The"]  # run.py: df["item"].fillna("None")
    assert data.prev_items == [None, None] and data.prev_words == [None, None]
    assert np.isnan(data.columns["prev_length"][0]) and np.isnan(data.columns["RTfirstpass"][0])
    assert np.isnan(data.columns["self_paced_reading_time"][1]) and data.columns["RTfirstfix"][1] == 210.0


def test_a_malformed_row_names_file_line_and_field(tmp_path):
    good = ["The", " cat", "", "", "3.1", "3", "1", "", "200", "210", "250", "260", "310"]
    bad = ["The", " dog", "", "", "3.1", "three", "1", "", "200", "210", "250", "260", "310"]
    with pytest.raises(DataError, match=r"r.csv, line 3, field 'length': expected a number, got 'three'"):
        reading.read_reading_csv(_csv(tmp_path / "r.csv", [good, bad]))
    (tmp_path / "short.csv").write_text("item,word\nThe, cat\n")
    with pytest.raises(DataError, match=r"short.csv, line 1: missing columns"):
        reading.read_reading_csv(tmp_path / "short.csv")
    with pytest.raises(DataError, match=r"line 2, field 'prev_word'"):
        reading.read_reading_csv(_csv(tmp_path / "p.csv", [["The", " cat", "A", "", *good[4:]]]))


# ---------------------------------------------------------------------------- regressions


def _r2_normal_equations(y, columns):
    x = np.column_stack([np.ones(len(y))] + columns)
    beta = np.linalg.solve(x.T @ x, x.T @ y)
    return 1 - np.sum((y - x @ beta) ** 2) / np.sum((y - y.mean()) ** 2), beta[-1]


def test_delta_r2_matches_normal_equations_with_each_models_own_complete_rows():
    rng = np.random.default_rng(0)
    n = 60
    c = {"Subtlex_log10": rng.normal(3, 1, n), "length": rng.integers(2, 9, n).astype(float),
         "context_length": rng.integers(1, 12, n).astype(float), "pred": rng.gamma(3, 2, n)}
    c["RTfirstfix"] = (200 + 10 * c["length"] - 5 * c["Subtlex_log10"] + 4 * c["pred"] + rng.normal(0, 20, n))
    c["pred"][[3, 7]] = np.nan  # dropped from the model fit only
    c["RTfirstfix"][11] = np.nan  # dropped from both
    fit = reading.delta_r2(c, "RTfirstfix", reading.ET_BASELINE)

    s, ln, cl = c["Subtlex_log10"], c["length"], c["context_length"]
    base_rows = ~np.isnan(c["RTfirstfix"])
    model_rows = base_rows & ~np.isnan(c["pred"])
    terms = lambda rows: [s[rows], ln[rows], cl[rows], s[rows] * ln[rows], s[rows] * cl[rows], ln[rows] * cl[rows]]  # noqa
    r2_base, _ = _r2_normal_equations(c["RTfirstfix"][base_rows], terms(base_rows))
    r2_model, coef = _r2_normal_equations(c["RTfirstfix"][model_rows], terms(model_rows) + [c["pred"][model_rows]])
    assert (fit["n_baseline"], fit["n_model"]) == (59, 57)
    assert fit["R2_baseline"] == pytest.approx(r2_base, abs=1e-10)
    assert fit["R2_model"] == pytest.approx(r2_model, abs=1e-10)
    assert fit["coefficient"] == pytest.approx(coef, rel=1e-8)
    assert fit["score"] == pytest.approx(100 * (r2_model - r2_base) / (1 - r2_base), abs=1e-8)
    assert fit["score"] > 5  # pred carries real signal here


def test_spillover_baseline_has_five_effects_and_all_ten_products():
    assert len(reading.SPR_BASELINE) == 15
    assert reading.SPR_BASELINE[5:] == ("Subtlex_log10:length", "Subtlex_log10:context_length",
                                        "Subtlex_log10:prev_length", "Subtlex_log10:prev_pred",
                                        "length:context_length", "length:prev_length", "length:prev_pred",
                                        "context_length:prev_length", "context_length:prev_pred",
                                        "prev_length:prev_pred")


# ---------------------------------------------------------------------------- surprisal


def get_p2_reference(model, tokenizer, sentence, word):
    """evaluation_functions.py::get_p2 (causal): first subword from the context's last logits,
    later ones re-tokenising the sentence with the decoded pieces appended; returns -ln p."""
    def p_next(text, piece_id):
        ids = torch.LongTensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :]
        return torch.softmax(logits[0], -1)[piece_id].item()

    target = tokenizer(word, add_special_tokens=False)["input_ids"]
    probs = [p_next(sentence, target[0])]
    sentence = sentence + tokenizer.decode(target[0])
    for token in target[1:]:
        piece = tokenizer.decode(token)
        probs.append(p_next(sentence, tokenizer(piece, add_special_tokens=False)["input_ids"][0]))  # get_p
        sentence = sentence + piece
    return -math.log(np.prod(probs))


@pytest.mark.parametrize("variant", ["nobos", "bos"])
def test_word_surprisal_chains_subwords_like_get_p2(variant):
    tokenizer = _bpe(variant)
    model = _hf_llama(len(tokenizer), seed=3)
    pairs = [("The cat", " sleeps."), ("Who did the dog", " see?"), ("These books are", " red."),
             ("A man", " walks to")]
    assert max(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for _, w in pairs) >= 2  # subwords
    got = reading.word_surprisals(_torch_logits_fn(model, len(tokenizer)), tokenizer, pairs, buckets=(32,))
    expected = [get_p2_reference(model, tokenizer, s, w) for s, w in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_evaluate_reading_by_hand_with_a_bigram_model(tmp_path):
    # A bigram model: logits depend on the current input token only, so -ln p(word | item) is a
    # sum of table lookups that this test computes itself.
    tokenizer = _bpe("bos")
    vocab = len(tokenizer)
    table = np.random.default_rng(4).normal(0, 2, (vocab, vocab)).astype(np.float32)
    log_softmax = table - np.log(np.exp(table).sum(-1, keepdims=True))

    def bigram(input_ids, segment_ids, positions):
        return jnp.asarray(table)[input_ids]

    rng = np.random.default_rng(5)
    sentences = ["The cat sleeps on the mat.", "Who did the dog see?", "A man walks to the store.",
                 "These books are red.", "The girl who the boys like sings.", "Every child has eaten some cake.",
                 "The cup is left of the box.", "Many people were fired."] * 2
    path = _csv(tmp_path / "reading_data.csv", _sentence_rows(rng, sentences))
    r = reading.evaluate_reading(bigram, tokenizer, path, buckets=(32,))

    def by_hand(item, word):
        ids = tokenizer(item)["input_ids"] + tokenizer(word, add_special_tokens=False)["input_ids"]
        n_word = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        return -sum(log_softmax[ids[t - 1], ids[t]] for t in range(len(ids) - n_word, len(ids)))

    data = r.data
    np.testing.assert_allclose(r.pred, [by_hand(i, w) for i, w in zip(data.items, data.words)], rtol=1e-5)
    firsts = [k for k, p in enumerate(data.prev_items) if p is None]
    assert np.isnan(r.prev_pred[firsts]).all() and not np.isnan(np.delete(r.prev_pred, firsts)).any()
    assert r.prev_pred[1] == pytest.approx(r.pred[0])  # the previous row's word, in the previous row's context
    assert r.eye_tracking_score == pytest.approx(np.mean([r.no_spillover[m]["score"] for m in reading.EYE_TRACKING]))

    reading.write_reading(r, str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out/pipeline/predictions.json").read_text())["reading"]["predictions"]
    assert saved[0]["id"] == 0 and math.isnan(saved[0]["prev_pred"]) and len(saved) == len(data)
    report_lines = (tmp_path / "out/pipeline/report.txt").read_text().splitlines()
    assert report_lines == [f"EYE TRACKING SCORE: {r.eye_tracking_score:.2f}",
                            f"SELF-PACED READING SCORE: {r.self_paced_score:.2f}"]
