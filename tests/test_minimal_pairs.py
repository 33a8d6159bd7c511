"""Reading BLiMP, BLiMP-supplement and EWoK files as the BabyLM 2025 pipeline reads them.

All data here is written by hand; the EWoK lines only have EWoK's shape (its items must
never be copied, docs/evaluation.md#ewok-terms-of-use).
"""
from __future__ import annotations

import json

import pytest

from jaxllava.errors import DataError
from jaxllava.eval.minimal_pairs import MinimalPairItem, read_minimal_pairs


def _blimp(uid, good, bad, field="morphology", term="anaphor_agreement", pair_id=0):
    return {"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term, "UID": uid,
            "simple_LM_method": True, "one_prefix_method": False, "two_prefix_method": False,
            "lexically_identical": True, "pair_id": pair_id}


def _ewok(domain, context, target1, target2):
    return {"Domain": domain, "ConceptA": "left", "ConceptB": "right", "ContextType": "spatial",
            "ContextDiff": "concept swap", "TargetDiff": "concept swap", "Context1": context,
            "Context2": context.replace("left", "right"), "Target1": target1, "Target2": target2}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_blimp_line_gives_good_first_whole_sentence_completions_and_pipeline_metadata(tmp_path):
    path = _write(tmp_path / "anaphor_gender_agreement.jsonl", [
        _blimp("anaphor_gender_agreement", "Kim helped herself.", "Kim helped himself."),
        _blimp("anaphor_gender_agreement", "Tom saw himself.", "Tom saw herself.", field="syntax_semantics"),
    ])
    items = read_minimal_pairs(path, "blimp")
    assert [it.sentences for it in items] == [("Kim helped herself.", "Kim helped himself."),
                                              ("Tom saw himself.", "Tom saw herself.")]
    assert all(it.completions == it.sentences for it in items)
    assert items[0].metadata == {"field": "morphology", "UID": "anaphor_gender_agreement",
                                 "linguistics_term": "anaphor_agreement"}
    assert items[1].metadata["field"] == "syntax/semantics"  # read_files.py standardises this spelling
    assert [it.id for it in items] == ["anaphor_gender_agreement_0", "anaphor_gender_agreement_1"]
    assert items[1].source.endswith("anaphor_gender_agreement.jsonl:2")


def test_directory_is_read_in_pipeline_iterdir_order_and_skips_non_jsonl(tmp_path):
    names = ["wh_island", "adjunct_island", "passive_1", "causative"]
    for n, name in enumerate(names):
        _write(tmp_path / f"{name}.jsonl", [_blimp(name, f"Good {n}.", f"Bad {n}."),
                                            _blimp(name, f"Good {n}b.", f"Bad {n}b.")])
    (tmp_path / "README.md").write_text("not data")
    _write(tmp_path / "extra.json", [_blimp("extra", "A.", "B.")])
    expected = [p.stem for p in tmp_path.iterdir() if p.suffix == ".jsonl"]
    items = read_minimal_pairs(tmp_path, "blimp")
    assert [it.uid for it in items] == [uid for uid in expected for _ in range(2)]
    assert {it.id for it in items} == {f"{uid}_{k}" for uid in names for k in range(2)}


def test_supplement_takes_uid_from_file_stem_and_keeps_newlines(tmp_path):
    turn = {"sentence_good": "David: Should you go?\nSarah: No, I shouldn't.",
            "sentence_bad": "David: Should you go?\nSarah: No, you shouldn't.", "row": 3, "contrast": "pronoun"}
    items = read_minimal_pairs(_write(tmp_path / "turn_taking.jsonl", [turn]), "blimp")
    (item,) = items
    assert item.uid == "turn_taking" and item.id == "turn_taking_0"
    assert item.metadata == {"field": "supplement", "UID": "turn_taking", "linguistics_term": "supplement"}
    assert item.sentences == (turn["sentence_good"], turn["sentence_bad"])
    assert "\n" in item.completions[0]


def test_ewok_candidates_are_context_plus_target_and_only_the_target_is_scored(tmp_path):
    record = _ewok("spatial-relations", "The cup is left of the box.", "The box is right of the cup.",
                   "The box is left of the cup.")
    path = _write(tmp_path / "spatial-relations.jsonl", [record])
    (item,) = read_minimal_pairs(path, "ewok")
    assert item.sentences == ("The cup is left of the box. The box is right of the cup.",
                              "The cup is left of the box. The box is left of the cup.")
    assert item.completions == (" The box is right of the cup.", " The box is left of the cup.")
    assert item.metadata == {"UID": "spatial-relations", "context_type": "spatial",
                             "context_contrast": "concept swap", "target_contrast": "concept swap"}
    (full,) = read_minimal_pairs(path, "ewok", full_sentence_scores=True)
    assert full.completions == full.sentences


@pytest.mark.parametrize("line, field, fragment", [
    ('{"sentence_good": "A.", "sentence_bad": "B.", "field": "syntax"', None, "invalid JSON"),
    ("", None, "invalid JSON"),
    ('["A.", "B."]', None, "JSON object"),
    ('{"sentence_bad": "B.", "field": "syntax", "UID": "u", "linguistics_term": "t"}', "sentence_good",
     "missing"),
    ('{"sentence_good": "A.", "sentence_bad": "B.", "field": "syntax", "linguistics_term": "t"}', "UID", "missing"),
    ('{"sentence_good": "A.", "sentence_bad": 3}', "sentence_bad", "string"),
    ('{"sentence_good": "", "sentence_bad": "B."}', "sentence_good", "empty"),
])
def test_malformed_blimp_line_raises_data_error_naming_file_line_and_field(tmp_path, line, field, fragment):
    path = tmp_path / "paradigm.jsonl"
    good = json.dumps(_blimp("paradigm", "A.", "B."))
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=fragment) as info:
        read_minimal_pairs(path, "blimp")
    assert info.value.file == str(path) and info.value.record == "line 2"
    assert info.value.field == field
    assert str(path) in str(info.value) and "line 2" in str(info.value)


@pytest.mark.parametrize("missing", ["Context1", "Context2", "Target2", "Domain", "TargetDiff"])
def test_ewok_line_missing_a_field_the_pipeline_reads_raises(tmp_path, missing):
    record = _ewok("agent-properties", "The girl is tall.", "She can reach the shelf.", "She cannot reach the shelf.")
    del record[missing]
    path = _write(tmp_path / "agent-properties.jsonl", [record])
    with pytest.raises(DataError, match="missing") as info:
        read_minimal_pairs(path, "ewok")
    assert info.value.field == missing and info.value.record == "line 1"


def test_item_rejects_a_completion_that_is_not_a_suffix_of_its_sentence():
    with pytest.raises(DataError, match="suffix"):
        MinimalPairItem(id="u_0", uid="u", sentences=("A b.", "A c."), completions=(" b.", " x."),
                        metadata={"UID": "u"}, source="test:1")


def test_directory_without_jsonl_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no \\*.jsonl"):
        read_minimal_pairs(tmp_path, "blimp")
