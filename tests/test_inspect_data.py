"""`launch.py inspect-data` on the bundled sample: the report and the per-batch JSON lines."""
from __future__ import annotations

import json

import launch
from conftest import image_record, write_json


def run(capsys, *argv) -> tuple[int, list[str], str]:
    code = launch.main(["inspect-data", "--config", "configs/tiny.yaml", *argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_inspect_data_reports_the_dataset_and_both_modalities(capsys):
    code, lines, _ = run(capsys, "--batches", "6")
    assert code == 0
    report = dict(line.split(": ", 1) for line in lines[1:lines.index("== microbatches ==")])
    assert json.loads(report["text_samples"]) == 3000 and json.loads(report["image_samples"]) == 400
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
