"""AoA: surprisal as StepSurprisalExtractor computes it, sigmoid fits with known answers, the output file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_scoring import _bpe, _hf_llama, _torch_logits_fn

from jaxllava.errors import DataError
from jaxllava.eval import aoa, pipeline_layout
from jaxllava.train.milestones import BABYLM_MILESTONES


def test_word_file_drops_one_letter_words_and_names_bad_entries(tmp_path):
    path = tmp_path / "cdi_childes.json"
    path.write_text(json.dumps({"a": [{"context": "x"}], "dog": [{"context": "I saw a"}, {"context": "the"}],
                                "cat": [{"context": "my"}]}))
    words, contexts = aoa.read_aoa_words(path)
    assert words == ["dog", "cat"] and contexts == [["I saw a", "the"], ["my"]]
    assert aoa.read_aoa_words(path, min_context=2)[0] == ["dog"]
    path.write_text(json.dumps({"dog": [{"context": "ok"}, {"text": "no context"}]}))
    with pytest.raises(DataError, match=r"cdi_childes.json, context 1, id 'dog', field 'context'"):
        aoa.read_aoa_words(path)


def extractor_surprisal(model, tokenizer, context, word):
    """AoA_word/evaluation_functions.py::compute_surprisal_causal with process_causal_input."""
    context, word = context.strip() + " ", word.strip()
    text = context + word
    out = tokenizer(text=text, return_offsets_mapping=True)
    start = len(text) - len(word)
    mask = torch.LongTensor([[int(end > start) for _, end in out["offset_mapping"]]])[:, 1:]
    tokens = torch.LongTensor([out["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1], attention_mask=torch.ones_like(tokens[:, :-1])).logits
    log_probs = torch.gather(F.log_softmax(logits, -1), -1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return -torch.sum(log_probs * mask, dim=1)[0].item()


@pytest.mark.parametrize("variant", ["nobos", "bos"])
def test_surprisal_matches_the_extractor(variant):
    tokenizer = _bpe(variant)
    model = _hf_llama(len(tokenizer), seed=5)
    words = ["cat", " books", "store"]
    contexts = [["The", "  Every child has eaten some cake. The "], ["These"], ["A man walks to the"]]
    values = aoa.surprisals(_torch_logits_fn(model, len(tokenizer)), aoa.encode_aoa(tokenizer, words, contexts),
                            buckets=(32,))
    expected = [extractor_surprisal(model, tokenizer, c, w) for w, cs in zip(words, contexts) for c in cs]
    np.testing.assert_allclose(values, expected, atol=1e-4)
    assert min(values) > 0


def _curve(words_seen, a, b, c, d):
    return -aoa.sigmoid(np.log10(np.asarray(words_seen, float) + 1), a, b, c, d)  # surprisal falls as y rises


def _expected_log_aoa(surprisal, a, b, c, d):
    chance = np.log2(aoa.CHANCE_VOCAB)
    threshold = chance - 0.5 * (chance - np.min(surprisal))
    return c - np.log(a / (-threshold - d) - 1) / b


def test_sigmoid_fits_recover_known_ages_of_acquisition():
    steps = np.array(BABYLM_MILESTONES, float)
    midpoints = [6.6, 7.1, 7.5, 8.2]  # log10 words: the curves fall at different times
    model_expected, model_found = [], []
    for c in midpoints:
        curve = _curve(steps, 16.0, 4.0, c, -18.0)  # surprisal from ~18 nats down to ~2
        both_contexts = np.repeat(curve, 2)  # two identical contexts per checkpoint, as records repeat
        model_found.append(aoa.model_aoa(both_contexts, np.repeat(steps, 2)))
        model_expected.append(_expected_log_aoa(curve, 16.0, 4.0, c, -18.0))
    np.testing.assert_allclose(model_found, model_expected, atol=1e-4)
    assert all(6.0 < x < 9.0 for x in model_found)

    ages = np.arange(16, 31)
    child_midpoints = [19.0, 22.5, 24.0, 28.0]
    found = [aoa.child_aoa(ages, aoa.sigmoid(ages.astype(float), 1.0, 0.6, m, 0.0)) for m in child_midpoints]
    np.testing.assert_allclose(found, child_midpoints, atol=1e-3)  # a=1, d=0: p = 0.5 exactly at c
    assert aoa.child_aoa(ages, np.full(15, 0.9)) is None  # never crosses 0.5 inside the ages

    records = [{"step": f"chck_{int(s // 1e6)}M", "target_word": word, "surprisal": float(v)}
               for s_index, s in enumerate(steps) for word, c in zip("wxyz", midpoints)
               for v in [_curve([s], 16.0, 4.0, c, -18.0)[0]]]
    proportions = np.stack([aoa.sigmoid(ages.astype(float), 1.0, 0.6, m, 0.0) for m in child_midpoints])
    cdi = aoa.CDI(list("wxyz"), ages, proportions)
    fitness = aoa.curve_fitness(records, cdi)
    assert fitness["n_words"] == 4
    assert fitness["curve_fitness"] == pytest.approx(np.corrcoef(model_expected, child_midpoints)[0, 1], abs=1e-4)
    assert aoa.curve_fitness(records[:8], cdi)["curve_fitness"] == 0.0  # < 3 checkpoints per word: no AoA


def test_step_names_parse_like_the_pipeline():
    assert aoa.words_of_step("chck_10M") == 1e7 and aoa.words_of_step("chck_1.5M") == 1.5e6
    assert aoa.words_of_step("chck_500k") == 5e5 and aoa.words_of_step(3) == 3.0


def test_milestones_are_listed_by_words_and_written_where_collation_reads(tmp_path):
    milestones = tmp_path / "run" / "milestones"
    milestones.mkdir(parents=True)
    for words, name, step in [(20_000_000, "chck_20M", 40), (1_000_000, "chck_1M", 2), (10_000_000, "chck_10M", 20)]:
        (milestones / f"{name}.json").write_text(json.dumps({"milestone": words, "name": name, "step": step,
                                                             "checkpoint": f"checkpoints/{step}"}))
    found = aoa.milestone_checkpoints(str(tmp_path / "run"))
    assert [(m.name, m.words) for m in found] == [("chck_1M", 10**6), ("chck_10M", 10**7), ("chck_20M", 2 * 10**7)]
    assert found[0].path == str(milestones / "chck_1M")
    with pytest.raises(DataError, match="no milestone checkpoints"):
        aoa.milestone_checkpoints(str(tmp_path))

    records = aoa.surprisal_records(found[1], ["dog", "cat"], [["a", "b"], ["c"]], np.array([1.0, 2.0, 3.0]))
    assert records[2] == {"step": "chck_10M", "word_count": 10**7, "target_word": "cat", "context_id": 0,
                          "context": "c", "surprisal": 3.0}
    spec = next(s for s in pipeline_layout.FULL if s.kind == "aoa")
    out = {"metadata": {"model_name": "run"}, "results": records}
    directory = pipeline_layout.write_pipeline_layout(str(tmp_path / "results"), "run", spec, out, revision="chck_10M")
    saved = json.loads((tmp_path / "results/run/main/zero_shot/causal/AoA_word/surprisal.json").read_text())
    assert directory.endswith("main/zero_shot/causal/AoA_word") and saved["results"] == records
