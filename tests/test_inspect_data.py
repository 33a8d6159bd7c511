"""`launch.py inspect-data` on the bundled sample: the report and the per-batch JSON lines."""
from __future__ import annotations

import json

import launch
from conftest import image_record, text_record, write_json, write_jsonl


def run(capsys, *argv) -> tuple[int, list[str], str]:
    code = launch.main(["inspect-data", "--config", "configs/tiny.yaml", *argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_inspect_data_reports_the_dataset_and_both_modalities(capsys):
    code, lines, _ = run(capsys, "--batches", "6", "--set", "data.validation_fraction=0")
    assert code == 0
    report = dict(line.split(": ", 1) for line in lines[1:lines.index("== microbatches ==")])
    assert json.loads(report["text_samples"]) == 3300 and json.loads(report["image_samples"]) == 800
    assert json.loads(report["image_tokens_per_image"]) == 16
    batches = [json.loads(line) for line in lines[lines.index("== microbatches ==") + 1:]]
    assert len(batches) == 6 and {b["modality"] for b in batches} == {"text", "image"}
    for b in batches:
        if b["modality"] == "text":
            assert not b["has_pixels"] and b["image_tokens"] == 0
            assert all(p == [] for p in b["image_token_positions"])
        else:
            assert b["has_pixels"] and b["image_tokens"] == 16 * b["rows"]
            assert all(end - start == 16 for start, end in b["image_token_positions"])
        assert b["words"] > 0 and 0 <= b["padding_fraction"] < 1


def test_inspect_data_exits_non_zero_on_invalid_data(capsys, tmp_path):
    bad = write_json(tmp_path / "bad.json", [image_record(0, "img.png", "a caption", prompt="no marker")])
    code, _, err = run(capsys, "--set", f"data.sources=[{{path: {bad}}}]")
    assert code == 2
    assert "bad.json" in err and "record 0" in err and "<image>" in err


def _report(lines: list[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in lines[1:lines.index("== microbatches ==")])


def test_inspect_data_reports_the_tokenizer_coverage_of_the_bundled_data(capsys):
    code, lines, _ = run(capsys, "--batches", "0")
    assert code == 0
    report = _report(lines)
    tokenizer = json.loads(report["tokenizer"])
    # The bundled word-level tokenizer was built from the bundled data: nothing unknown, nothing split,
    # and the word sample is the bounded one (the data has 21,210 trained words).
    assert tokenizer["unk_rate"] == 0.0 and tokenizer["split_word_fraction"] == 0.0
    assert tokenizer["words_sampled"] == 20_000 and tokenizer["warnings"] == []
    assert "warning" not in report


def test_inspect_data_warns_about_unknown_tokens_with_the_exact_rate(capsys, tmp_path):
    records = [text_record(k, "the dog zorp .") for k in range(4)] + [text_record(4 + k, "the cat runs .")
                                                                       for k in range(4)]
    path = write_jsonl(tmp_path / "unknown.jsonl", records)
    code, lines, _ = run(capsys, "--batches", "0", "--set", f"data.sources=[{{path: {path}}}]")
    assert code == 0
    report = _report(lines)
    tokenizer = json.loads(report["tokenizer"])
    # plain_lm: BOS + 4 text tokens per record, every text token a target; 4 of 32 are <unk>.
    assert (tokenizer["unk_tokens"], tokenizer["text_tokens"]) == (4, 32) and tokenizer["unk_rate"] == 0.125
    assert report["warning"] == tokenizer["warnings"][0] and "12.50%" in report["warning"]


def test_words_per_epoch_follow_the_source_weight(capsys, tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [text_record(0, "the dog runs ."), text_record(1, "the cat runs .")])
    code, lines, _ = run(capsys, "--batches", "0", "--set", f"data.sources=[{{path: {path}, weight: 3}}]")
    assert code == 0
    report = _report(lines)
    assert json.loads(report["words"]) == 8 and json.loads(report["words_per_epoch"]) == 24
