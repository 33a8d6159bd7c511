import dataclasses
import json
import os
import pickle

import pytest

from jaxllava.data.records import Record, SkipReport, Turn, read_records
from jaxllava.errors import DataError

IMAGE_NAME = "cat.png"


def text_record(text, record_id="t"):
    # The reference's text-only shape: an empty human turn, the text as the gpt turn (docs/reference.md#records).
    return {"id": record_id, "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": text}]}


def image_record(caption="a cat", record_id="i", image=IMAGE_NAME):
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}


def write_records(folder, name, records, *, jsonl):
    """Writes records as a .json list or one per line in a .jsonl; also creates the image file."""
    (folder / IMAGE_NAME).write_bytes(b"not decoded here")
    path = folder / (name + (".jsonl" if jsonl else ".json"))
    if jsonl:
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize("jsonl", [False, True])
def test_reads_text_and_image_records_in_file_order(tmp_path, jsonl):
    path = write_records(tmp_path, "data", [text_record("hello world", "a"), image_record("a cat", "b")], jsonl=jsonl)
    records = read_records(path)
    assert [record.id for record in records] == ["a", "b"]
    text, image = records
    assert text.turns == (Turn("user", ""), Turn("assistant", "hello world"))
    assert text.image is None and text.modality == "text"
    assert image.turns == (Turn("user", "<image>"), Turn("assistant", "a cat"))
    assert image.image == os.path.join(str(tmp_path), IMAGE_NAME) and image.modality == "image"
    assert [record.where for record in records] == (["line 1", "line 2"] if jsonl else ["record 0", "record 1"])
    assert all(record.file == path for record in records)


def test_jsonl_blank_lines_are_allowed_and_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + json.dumps(text_record("one", "a")) + "\n   \n" + json.dumps(text_record("two", "b")) + "\n\n")
    records = read_records(str(path))
    assert [(record.id, record.where) for record in records] == [("a", "line 2"), ("b", "line 4")]


def test_role_content_variant_and_crossed_spellings_are_accepted(tmp_path):
    record = {"id": "x", "conversations": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "human", "content": "q"}, {"from": "assistant", "value": "a"}, {"from": "user", "value": "b"},
        {"role": "gpt", "content": "c"}]}
    path = write_records(tmp_path, "data", [record], jsonl=True)
    (parsed,) = read_records(path)
    assert [turn.role for turn in parsed.turns] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [turn.text for turn in parsed.turns] == ["hi", "hello", "q", "a", "b", "c"]


def test_image_as_list_of_one_path_is_accepted(tmp_path):
    path = write_records(tmp_path, "data", [image_record(image=[IMAGE_NAME])], jsonl=False)
    (record,) = read_records(path)
    assert record.image == os.path.join(str(tmp_path), IMAGE_NAME)


def test_image_path_resolves_against_image_folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "dog.jpg").write_bytes(b"x")
    path = write_records(tmp_path, "data", [image_record(image="sub/dog.jpg")], jsonl=False)
    (record,) = read_records(path, image_folder=str(images))
    assert record.image == os.path.join(str(images), "sub/dog.jpg")


def test_missing_image_file_is_accepted_when_file_checks_are_off(tmp_path):
    path = write_records(tmp_path, "data", [image_record(image="absent.png")], jsonl=False)
    (record,) = read_records(path, check_image_files=False)
    assert record.image == os.path.join(str(tmp_path), "absent.png")


def test_empty_human_turn_text_only_record_is_accepted_unchanged(tmp_path):
    path = write_records(tmp_path, "data", [text_record("  The dog ran.\n")], jsonl=False)
    (record,) = read_records(path)
    assert record.turns == (Turn("user", ""), Turn("assistant", "  The dog ran.\n"))
    assert record.modality == "text"


def test_record_without_assistant_text_is_accepted_when_a_user_turn_has_text(tmp_path):
    # Only "no text in any turn" is rejected here; zero-target samples are rejected by the tokenizer step.
    record = {"id": "u", "conversations": [{"from": "human", "value": "said"}, {"from": "gpt", "value": ""}]}
    (parsed,) = read_records(write_records(tmp_path, "data", [record], jsonl=True))
    assert parsed.turns == (Turn("user", "said"), Turn("assistant", ""))


def test_missing_id_becomes_file_stem_and_where(tmp_path):
    record = text_record("hi")
    del record["id"]
    json_record, = read_records(write_records(tmp_path, "shard7", [record], jsonl=False))
    jsonl_record, = read_records(write_records(tmp_path, "shard8", [record], jsonl=True))
    assert json_record.id == "shard7:record 0"
    assert jsonl_record.id == "shard8:line 1"


def test_numeric_id_is_kept_as_string(tmp_path):
    (record,) = read_records(write_records(tmp_path, "data", [text_record("hi", record_id=42)], jsonl=False))
    assert record.id == "42"


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


# (case name, bad record, field named in the error, reason)
BAD_RECORDS = [
    ("no_conversations", {"id": "bad"}, "conversations", "conversations"),
    ("conversations_not_list", {"id": "bad", "conversations": "hello"}, "conversations", "conversations"),
    ("empty_conversations", {"id": "bad", "conversations": []}, "conversations", "conversations"),
    ("turn_not_object", {"id": "bad", "conversations": [{"from": "human", "value": ""}, "hello"]},
     "conversations[1]", "turn"),
    ("system_role", {"id": "bad", "conversations": turns(("human", ""), ("gpt", "a"), ("system", "b"))},
     "conversations[2].from", "role"),
    ("typo_role", {"id": "bad", "conversations": turns(("humna", "x"), ("gpt", "a"))},
     "conversations[0].from", "role"),
    ("unknown_role_under_role_key",
     {"id": "bad", "conversations": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "conversations[1].role", "role"),
    ("missing_role", {"id": "bad", "conversations": [{"value": "a"}]}, "conversations[0].from", "role"),
    ("value_not_string", {"id": "bad", "conversations": turns(("human", ""), ("gpt", 7))},
     "conversations[1].value", "turn_text"),
    ("value_null", {"id": "bad", "conversations": turns(("human", ""), ("gpt", None))},
     "conversations[1].value", "turn_text"),
    ("content_missing", {"id": "bad", "conversations": [{"role": "assistant"}]},
     "conversations[0].content", "turn_text"),
    ("no_text_in_any_turn", {"id": "bad", "conversations": turns(("human", ""), ("gpt", " \n\t"))},
     "conversations", "no_text"),
    ("image_token_in_text_only", {"id": "bad", "conversations": turns(("human", "<image>"), ("gpt", "a"))},
     "conversations[0].value", "image_token"),
    ("image_record_without_image_token", {**image_record(), "id": "bad",
                                          "conversations": turns(("human", ""), ("gpt", "a"))},
     "conversations", "image_token"),
    ("image_record_with_two_image_tokens", {**image_record(), "id": "bad",
                                            "conversations": turns(("human", "<image>"), ("gpt", "a <image>"))},
     "conversations[1].value", "image_token"),
    ("im_start_literal", text_record("a <im_start> b", "bad"), "conversations[1].value", "placeholder"),
    ("im_patch_literal", {**image_record("x<im_patch>"), "id": "bad"}, "conversations[1].value", "placeholder"),
    ("im_end_literal", text_record("<im_end>", "bad"), "conversations[1].value", "placeholder"),
    ("video_record_without_video_token", {**text_record("a", "bad"), "video": "clip.mp4"}, "conversations",
     "video_token"),
    ("video_token_in_text_only", {"id": "bad", "conversations": turns(("human", "<video>"), ("gpt", "a"))},
     "conversations[0].value", "video_token"),
    ("image_and_video", {**image_record(), "id": "bad", "video": "clip.mp4"}, "video", "image_and_video"),
    ("image_token_in_video_record", {"id": "bad", "video": "clip.mp4",
                                     "conversations": turns(("human", "<video> <image>"), ("gpt", "a"))},
     "conversations[0].value", "image_token"),
    ("two_video_tokens", {"id": "bad", "video": "clip.mp4",
                          "conversations": turns(("human", "<video>"), ("gpt", "a <video>"))},
     "conversations[1].value", "video_token"),
    ("video_list_of_two", {"id": "bad", "video": ["a.mp4", "b.mp4"],
                           "conversations": turns(("human", "<video>"), ("gpt", "a"))}, "video", "video_field"),
    ("video_not_string", {"id": "bad", "video": 3, "conversations": turns(("human", "<video>"), ("gpt", "a"))},
     "video", "video_field"),
    ("missing_video", {"id": "bad", "video": "absent.mp4",
                       "conversations": turns(("human", "<video>"), ("gpt", "a"))}, "video", "missing_video"),
    ("video_path_leaving_the_folder", {"id": "bad", "video": "../clip.mp4",
                                       "conversations": turns(("human", "<video>"), ("gpt", "a"))}, "video",
     "video_outside"),
    ("vid_patch_literal", text_record("a <vid_patch>", "bad"), "conversations[1].value", "placeholder"),
    ("slow_vid_end_literal", text_record("<slow_vid_end>", "bad"), "conversations[1].value", "placeholder"),
    ("multi_image", {**image_record(), "id": "bad", "image": [IMAGE_NAME, IMAGE_NAME]}, "image", "multi_image"),
    ("empty_image_list", {**image_record(), "id": "bad", "image": []}, "image", "image_field"),
    ("image_not_string", {**image_record(), "id": "bad", "image": 3}, "image", "image_field"),
    ("missing_image_file", {**image_record(), "id": "bad", "image": "absent.png"}, "image", "missing_image"),
    # Valid JSON ("\\ud800"), but not text any tokenizer or file system can encode.
    ("lone_surrogate_in_text", text_record("a \ud800 b", "bad"), "conversations[1].value", "encoding"),
    ("lone_surrogate_in_user_text", {**image_record(), "id": "bad",
                                     "conversations": turns(("human", "<image> \udfff"), ("gpt", "a"))},
     "conversations[0].value", "encoding"),
    ("lone_surrogate_in_image_path", {**image_record(), "id": "bad", "image": "cat\ud800.png"}, "image", "encoding"),
    ("nul_in_image_path", {**image_record(), "id": "bad", "image": "sub\0dir/cat.png"}, "image", "image_field"),
    ("image_path_leaving_the_folder", {**image_record(), "id": "bad", "image": "../cat.png"}, "image",
     "image_outside"),
]


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize("case, bad, field, reason", BAD_RECORDS, ids=[case[0] for case in BAD_RECORDS])
def test_bad_record_error_names_file_record_id_and_field(tmp_path, jsonl, case, bad, field, reason):
    good = [text_record("fine", f"g{i}") for i in range(3)]
    path = write_records(tmp_path, "data", good + [bad], jsonl=jsonl)
    with pytest.raises(DataError) as caught:
        read_records(path)
    error = caught.value
    message = str(error)
    where = "line 4" if jsonl else "record 3"
    assert path in message and where in message and "'bad'" in message and repr(field) in message
    assert (error.file, error.record, error.record_id, error.field, error.reason) == (path, where, "bad", field, reason)


def test_multi_image_error_says_not_supported(tmp_path):
    path = write_records(tmp_path, "data", [{**image_record(), "image": ["a.png", "b.png"]}], jsonl=False)
    with pytest.raises(DataError, match="multi-image records are not supported"):
        read_records(path)


def test_video_record_is_a_video_sample_with_its_path_joined_to_the_video_folder(tmp_path):
    videos = tmp_path / "clips"
    (videos / "frames").mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"")
    records = [{"id": "v1", "video": "a.mp4", "conversations": turns(("human", "<video>"), ("gpt", "a"))},
               {"id": "v2", "video": ["frames"], "conversations": turns(("human", "see <video>"), ("gpt", "b"))},
               text_record("c", "t")]
    path = write_records(tmp_path, "data", records, jsonl=True)
    first, second, text = read_records(path, video_folder=str(videos))
    assert (first.modality, first.video, first.image) == ("video", str(videos / "a.mp4"), None)
    assert (second.modality, second.video) == ("video", str(videos / "frames"))
    assert (text.modality, text.video) == ("text", None)


def test_placeholder_literal_error_says_generated_by_pipeline(tmp_path):
    path = write_records(tmp_path, "data", [text_record("x <im_patch> y")], jsonl=False)
    with pytest.raises(DataError, match="literal placeholder <im_patch>.*generated by the pipeline"):
        read_records(path)


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_record_that_is_not_an_object_names_file_and_record(tmp_path, jsonl):
    path = write_records(tmp_path, "data", [text_record("a"), text_record("b"), text_record("c"), ["list"]],
                         jsonl=jsonl)
    where = "line 4" if jsonl else "record 3"
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert path in str(caught.value) and where in str(caught.value) and "must be a JSON object" in str(caught.value)
    assert (caught.value.record, caught.value.record_id, caught.value.reason) == (where, f"data:{where}", "not_object")


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(text_record("a"))] * 3) + '\n{"id": "x", "conversations": [\n')
    with pytest.raises(DataError) as caught:
        read_records(str(path))
    assert str(path) in str(caught.value) and "line 4" in str(caught.value) and "invalid JSON" in str(caught.value)
    assert caught.value.reason == "json"


def test_non_utf8_jsonl_line_names_file_and_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps(text_record("fine", "g")).encode()
    path.write_bytes(good + b"\n" + b'{"id": "x", "conversations": "\xff\xfe"}\n' + good + b"\n")
    with pytest.raises(DataError, match="not UTF-8") as caught:
        read_records(str(path))
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)
    skips = SkipReport()
    assert [record.where for record in read_records(str(path), on_bad_record="skip", skips=skips)] == ["line 1", "line 3"]
    assert skips.counts == {"json": 1}


def test_json_file_with_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([text_record("caf\u00e9")], ensure_ascii=False).encode())
    (record,) = read_records(str(path))
    assert record.turns[1].text == "caf\u00e9"


def test_invalid_json_file_names_the_error_position(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": "b",,}\n]')
    with pytest.raises(DataError, match=r"invalid JSON at line 3 column 14") as caught:
        read_records(str(path))
    assert str(path) in str(caught.value)


def test_json_top_level_that_is_not_a_list_is_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(text_record("a")))
    with pytest.raises(DataError, match="top level must be a JSON list") as caught:
        read_records(str(path))
    assert str(path) in str(caught.value)


def test_unknown_extension_and_missing_file_are_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="expected a .json"):
        read_records(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="cannot open") as caught:
        read_records(str(tmp_path / "absent.jsonl"))
    assert str(tmp_path / "absent.jsonl") in str(caught.value)


def test_unknown_policy_and_skip_without_report_are_value_errors(tmp_path):
    path = write_records(tmp_path, "data", [text_record("a")], jsonl=False)
    with pytest.raises(ValueError, match="on_bad_record"):
        read_records(path, on_bad_record="repair")
    with pytest.raises(ValueError, match="SkipReport"):
        read_records(path, on_bad_record="skip")


def test_skip_policy_counts_by_reason_keeps_good_records_in_order_and_never_repairs(tmp_path):
    rows = [
        text_record("first", "g1"),
        {"id": "b1", "conversations": turns(("human", "<image>"), ("gpt", "no image field"))},
        image_record("cat", "g2"),
        {**image_record(), "id": "b2", "image": "absent.png"},
        {**image_record(), "id": "b3", "image": "absent2.png"},
        text_record("  last  ", "g3"),
        {"id": "b4", "conversations": turns(("system", "x"), ("gpt", "y"))},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    (tmp_path / IMAGE_NAME).write_bytes(b"x")
    skips = SkipReport()
    records = read_records(str(path), on_bad_record="skip", skips=skips)
    assert [record.id for record in records] == ["g1", "g2", "g3"]
    assert [record.modality for record in records] == ["text", "image", "text"]
    assert records[2].turns[1].text == "  last  "
    assert skips.counts == {"image_token": 1, "missing_image": 2, "role": 1, "json": 1}
    assert skips.total == 5
    assert "line 2" in skips.examples["image_token"][0] and "'b1'" in skips.examples["image_token"][0]
    assert len(skips.examples["missing_image"]) == 2


def test_skip_report_merge_and_summary_keep_counts_and_cap_examples():
    first, second = SkipReport(), SkipReport()
    for index in range(4):
        first.add(DataError("bad", file="a.json", record=f"record {index}", reason="role"))
    second.add(DataError("gone", file="b.json", record="line 1", reason="missing_image"))
    second.add(DataError("bad", file="b.json", record="line 2", reason="role"))
    first.merge(second)
    assert first.counts == {"role": 5, "missing_image": 1}
    assert len(first.examples["role"]) == 3 and first.examples["missing_image"] == [str(second.examples["missing_image"][0])]
    lines = first.summary_lines()
    assert lines[0] == "skipped 6 bad records"
    assert "  role: 5" in lines and "  missing_image: 1" in lines
    assert lines.index("  role: 5") < lines.index("  missing_image: 1")


def test_record_is_immutable():
    record = Record("f.json", "record 0", "x", (Turn("assistant", "a"),), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.image = "img.png"


def test_records_survive_pickling_for_data_loader_workers():
    record = Record("f.json", "record 0", "x", (Turn("user", ""), Turn("assistant", "a")), "img.png")
    restored = pickle.loads(pickle.dumps(record))
    assert restored == record and restored.modality == "image"


def test_lone_surrogate_is_refused_where_a_surrogate_pair_is_text(tmp_path):
    path = tmp_path / "data.jsonl"
    # As JSON writers escape them: a pair (one emoji), then a lone high surrogate.
    path.write_text('{"id": "ok", "conversations": [{"from": "gpt", "value": "hi \\ud83d\\ude00"}]}\n'
                    '{"id": "bad", "conversations": [{"from": "gpt", "value": "hi \\ud83d"}]}\n')
    skips = SkipReport()
    (record,) = read_records(str(path), on_bad_record="skip", skips=skips)
    assert record.turns[0].text == "hi \U0001F600"
    assert skips.counts == {"encoding": 1} and "line 2" in skips.examples["encoding"][0]
    with pytest.raises(DataError, match="lone UTF-16 surrogate") as caught:
        read_records(str(path))
    assert (caught.value.record, caught.value.record_id, caught.value.field) == (
        "line 2", "bad", "conversations[0].value")


def test_lone_surrogate_in_the_id_is_refused(tmp_path):
    path = write_records(tmp_path, "data", [text_record("fine", "ok\udc80")], jsonl=True)
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert (caught.value.field, caught.value.reason, caught.value.record) == ("id", "encoding", "line 1")
    str(caught.value).encode("utf-8")  # the message itself is printable


@pytest.mark.parametrize("bad_id", [["x"], {"a": 1}, True])
def test_id_that_is_not_a_string_or_number_is_refused(tmp_path, bad_id):
    path = write_records(tmp_path, "data", [text_record("fine", bad_id)], jsonl=False)
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert (caught.value.field, caught.value.reason, caught.value.record_id) == ("id", "id", "data:record 0")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_jsonl_line_nested_too_deeply_is_a_bad_line_not_a_recursion_error(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps(text_record("fine", "g"))
    path.write_text(f"{good}\n{nested(200_000)}\n{good}\n")
    with pytest.raises(DataError, match="nested too deeply") as caught:
        read_records(str(path))
    assert (caught.value.file, caught.value.record, caught.value.reason) == (str(path), "line 2", "too_deep")
    skips = SkipReport()
    assert [r.where for r in read_records(str(path), on_bad_record="skip", skips=skips)] == ["line 1", "line 3"]
    assert skips.counts == {"too_deep": 1}


def test_json_list_nested_too_deeply_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(f"[{json.dumps(text_record('fine'))}, {nested(200_000)}]")
    for policy in ("error", "skip"):  # one parse for the whole file: no record can be skipped alone
        with pytest.raises(DataError, match="nested too deeply") as caught:
            read_records(str(path), on_bad_record=policy, skips=SkipReport())
        assert (caught.value.file, caught.value.record, caught.value.reason) == (str(path), None, "too_deep")


@pytest.mark.parametrize("field", ["id", "image", "conversations", "turn"])
def test_deep_nesting_in_a_field_is_a_bad_record_at_every_depth_near_the_parser_limit(tmp_path, field):
    """A value nested just under the parser's recursion limit parses; validating it and showing
    it in an error must not recurse further (a RecursionError names no record). Every depth
    around the limit gives a DataError naming the line."""
    depths = range(850, 1001)
    lines = []
    for depth in depths:
        value = "DEEP"
        record = {"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}
        if field == "id":
            record["id"] = value
        elif field == "image":
            record.update(image=value, conversations=[{"from": "human", "value": "<image>"}])
        elif field == "conversations":
            record["conversations"] = {"turns": value}
        else:
            record["conversations"] = [{"from": "gpt", "value": value}]
        lines.append(json.dumps(record).replace('"DEEP"', nested(depth)))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skips = SkipReport()
    assert read_records(str(path), on_bad_record="skip", skips=skips) == []
    assert skips.total == len(depths)
    assert skips.counts["too_deep"] < len(depths), "no depth parsed: the field's validation was not reached"
    for message in (m for examples in skips.examples.values() for m in examples):
        assert str(path) in message and "line " in message


@pytest.mark.parametrize("field, value", [
    ("image", [{str(k): k for k in range(100_000)}]),
    ("conversations", "x" * 100_000),
    ("id", [list(range(100_000))]),
])
def test_errors_about_huge_values_stay_short(tmp_path, field, value):
    record = {**image_record(), field: value}
    path = write_records(tmp_path, "data", [record], jsonl=True)
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert caught.value.field == field and len(str(caught.value)) < 400


def outside_layout(tmp_path):
    """data/records next to data/images/, and a secret file beside data/."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "inside.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    return data


def escaping_path(kind, data):
    if kind == "dotdot":
        return "../../secret.png"
    if kind == "absolute":
        return str(data.parent / "secret.png")
    (data / "images" / "link.png").symlink_to(data.parent / "secret.png")
    return "link.png"


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_path_leaving_the_image_folder_is_refused_unless_allowed(tmp_path, kind, jsonl):
    data = outside_layout(tmp_path)
    image = escaping_path(kind, data)
    path = write_records(data, "recs", [text_record("fine", "g"), image_record(image=image, record_id="esc")],
                         jsonl=jsonl)
    folder = str(data / "images")
    with pytest.raises(DataError, match="outside the image folder") as caught:
        read_records(path, image_folder=folder)
    error = caught.value
    assert (error.file, error.record_id, error.field, error.reason) == (path, "esc", "image", "image_outside")
    assert error.record == ("line 2" if jsonl else "record 1")
    assert str(tmp_path / "secret.png") in str(error)  # where it really leads
    skips = SkipReport()
    assert [r.id for r in read_records(path, image_folder=folder, on_bad_record="skip", skips=skips)] == ["g"]
    assert skips.counts == {"image_outside": 1}
    (_, allowed) = read_records(path, image_folder=folder, allow_outside=True)
    assert allowed.image == os.path.join(folder, image)  # the path to open, as before


def test_image_folder_defaults_to_the_records_folder_for_confinement(tmp_path):
    data = outside_layout(tmp_path)
    inside = write_records(data, "ok", [image_record(image="images/inside.png")], jsonl=True)
    assert read_records(inside)[0].image == os.path.join(str(data), "images/inside.png")
    outside = write_records(data, "bad", [image_record(image="../secret.png")], jsonl=True)
    with pytest.raises(DataError, match="outside the image folder"):
        read_records(outside)


def test_symlinks_and_dotdot_that_stay_inside_the_folder_are_fine(tmp_path):
    data = outside_layout(tmp_path)
    images = data / "images"
    (images / "sub").mkdir()
    (images / "sub" / "alias.png").symlink_to(images / "inside.png")
    (images / "linked_dir").symlink_to(images / "sub", target_is_directory=True)
    names = ["sub/alias.png", "sub/../inside.png", "linked_dir/alias.png", "./inside.png"]
    path = write_records(data, "recs", [image_record(image=name, record_id=name) for name in names], jsonl=True)
    records = read_records(path, image_folder=str(images))
    assert [r.image for r in records] == [os.path.join(str(images), name) for name in names]


def test_image_folder_that_is_itself_a_symlink_confines_to_its_target(tmp_path):
    data = outside_layout(tmp_path)
    (tmp_path / "alias").symlink_to(data / "images", target_is_directory=True)
    path = write_records(data, "recs", [image_record(image="inside.png"), image_record(image="../secret.png",
                                                                                       record_id="esc")],
                         jsonl=True)
    skips = SkipReport()
    records = read_records(path, image_folder=str(tmp_path / "alias"), on_bad_record="skip", skips=skips)
    assert [r.image for r in records] == [str(tmp_path / "alias" / "inside.png")]
    assert skips.counts == {"image_outside": 1}


def test_pipeline_passes_the_source_allow_outside_flag(tmp_path, word_tokenizer_dir):
    from conftest import write_png

    from jaxllava.data.config import DataConfig, SourceConfig
    from jaxllava.data.pipeline import DataPipeline

    write_png(str(tmp_path / "shared" / "pic.png"))
    (tmp_path / "data").mkdir()
    path = write_records(tmp_path / "data", "recs", [image_record("a red circle", "i", image="../shared/pic.png")],
                         jsonl=True)
    cfg = DataConfig(sources=(SourceConfig(path),), tokenizer=word_tokenizer_dir, buckets=(16,), image_rows=1)
    with pytest.raises(DataError, match="outside the image folder"):
        DataPipeline(cfg, image_tokens=6, image_size=8)
    allowed = dataclasses.replace(cfg, sources=(SourceConfig(path, allow_outside=True),))
    assert DataPipeline(allowed, image_tokens=6, image_size=8).summary.image_samples == 1


def test_a_missing_record_file_is_named_not_a_traceback(capsys):
    import launch

    code = launch.main(["train", "--config", "configs/tiny.yaml", "--set", 'data.sources=[{path: /no/such.jsonl}]'])
    assert code == 2
    assert "error: file /no/such.jsonl, field 'data.sources': no such record file" in capsys.readouterr().err
