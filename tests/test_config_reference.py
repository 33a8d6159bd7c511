"""docs/config.md is generated from the schema and its comments, and stays so."""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re
import sys
import textwrap
import typing

from jaxllava.config import ExperimentConfig, load_config
from jaxllava.config_reference import COMMAND, field_comments, render, rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"
TABLE_ROW = re.compile(r"^\| `([^`]+)` \| (.*) \| `(.*)` \| (.*) \|$")


def _table_rows(markdown: str) -> dict[str, tuple[str, str, str]]:
    """key -> (type, default, meaning) of every table row of the page."""
    found = {}
    for line in markdown.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            key, *rest = match.groups()
            assert key not in found, f"{key} is listed twice"
            found[key] = tuple(rest)
    return found


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key, walked here without the generator: a field holding a dataclass is a
    section (and a key too when it may be null); list elements of a dataclass are KEY[]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp, key = hints[field.name], prefix + field.name
        args = typing.get_args(tp)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)] if optional else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            if optional:
                keys.append(key)
            keys.extend(_schema_keys(inner[0], key + "."))
        elif typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis \
                and dataclasses.is_dataclass(args[0]):
            keys.extend(_schema_keys(args[0], key + "[]."))
        else:
            keys.append(key)
    return keys


def test_committed_page_equals_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == render(), \
        f"docs/config.md is out of date with the schema; regenerate it: {COMMAND}"


def test_every_field_has_a_one_line_meaning():
    missing = [row.key for row in rows() if not row.description.strip()]
    assert not missing, (f"config fields without a comment in their dataclass (add one on the line above the "
                         f"field or at the end of its line, then run {COMMAND}): {missing}")
    assert all("\n" not in row.description for row in rows())


def test_listed_keys_are_exactly_the_schema_fields():
    expected = _schema_keys(ExperimentConfig)
    assert len(expected) == len(set(expected))
    assert sorted(_table_rows(render())) == sorted(expected)
    assert "optim.parts.vision.train" in expected and "data.sources[].weight" in expected


def test_rows_show_the_loaders_type_names_and_the_defaults():
    table = _table_rows(render())
    assert table["model.vision"][:2] == ("VisionConfig or null", "null")
    assert table["data.buckets"][:2] == ("list of int", "[128, 256, 512, 1024, 2048]")
    assert table["data.objective"][:2] == ("one of 'plain_lm', 'captions', 'chat'", "plain_lm")
    assert table["data.sources[].path"][1] == "required"
    assert table["optim.parts.vision.train"][1] == "false" and table["optim.parts.lm.train"][1] == "true"
    assert table["data.tokenizer"][2] == "a local Hugging Face tokenizer directory"
    # A '|' in a comment is escaped, so it does not split the table cell.
    assert "\\|" in table["model.projector.kind"][2]


def test_every_listed_key_is_accepted_by_set(tmp_path):
    """The page's keys are real: each one, set to its listed default, loads (list elements through
    a one-element list, sections that may be null through an empty mapping)."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {sources: [{path: x.jsonl}]}\n", encoding="utf-8")
    load_config(config)
    for key, (_, default, _) in _table_rows(render()).items():
        if default == "required" or "[]" in key:
            continue
        value = "{}" if default == "null" and key in ("model.vision", "model.lm.rope_scaling") else default
        # a video is read by the tower: its keys need one (an error otherwise, test_video_model.py)
        tower = ["model.vision={}"] if key.startswith("model.video.") else []
        load_config(config, tower + [f"{key}={value}"])
    load_config(config, ["data.sources=[{path: a.jsonl, weight: 2.0, image_folder: null, allow_outside: true}]"])


def test_comments_are_read_above_and_at_the_end_of_a_field(tmp_path, monkeypatch):
    (tmp_path / "cfgmod_for_reference_test.py").write_text(textwrap.dedent('''
        import dataclasses

        @dataclasses.dataclass
        class Base:
            # first line
            # second line
            above: int = 1
            end: int = 2  # at the end
            # a comment separated by a blank line does not belong to the field

            none: int = 3
            split: tuple = (
                1, 2)  # on the last line
            inherited: int = 4  # from the base


        @dataclasses.dataclass
        class Child(Base):
            inherited: int = 5
    '''), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("cfgmod_for_reference_test")
    try:
        assert field_comments(module.Base) == {"above": "first line second line", "end": "at the end", "none": "",
                                               "split": "on the last line", "inherited": "from the base"}
        assert field_comments(module.Child)["inherited"] == "from the base"
        assert field_comments(module.Child)["none"] == ""
    finally:
        sys.modules.pop("cfgmod_for_reference_test", None)
