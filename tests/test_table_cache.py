"""The tokenized-table cache: exact round trip, memory-mapped loading, atomic entries, pickling by path."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle

import numpy as np
import pytest
from conftest import image_record, text_record, write_jsonl, write_png

from jaxllava.data import table_cache
from jaxllava.data.config import DataConfig
from jaxllava.data.records import read_records
from jaxllava.data.samples import SampleTable, build_sample_table
from jaxllava.data.table_cache import (StringColumn, entry_directory, load_table, load_tables, save_table,
                                       save_tables)
from jaxllava.data.tokenizer import load_tokenizer

KEY = "ab12" * 16


@pytest.fixture(scope="module")
def table(tmp_path_factory, word_tokenizer_dir) -> SampleTable:
    folder = tmp_path_factory.mktemp("records")
    write_png(str(folder / "img.png"))
    records = [text_record(0, "the dog runs ."), image_record(1, "img.png", "a red circle"),
               text_record(2, "two cats see a big square ."), image_record(3, "img.png", "blue squares")]
    records[2]["id"] = "t2-é✓"  # a non-ASCII id takes the UTF-8 path
    recs = read_records(write_jsonl(folder / "r.jsonl", records))
    return build_sample_table([recs], load_tokenizer(word_tokenizer_dir), DataConfig(tokenizer="unused"),
                              image_tokens=6, max_len=64)


def assert_same(loaded: SampleTable, original: SampleTable) -> None:
    assert isinstance(loaded, SampleTable)
    for field in dataclasses.fields(SampleTable):
        a, b = getattr(loaded, field.name), getattr(original, field.name)
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), field.name
        else:
            assert a == b and list(a) == list(b), field.name


def test_round_trip_keeps_every_field(tmp_path, table):
    entry = entry_directory(str(tmp_path), KEY)
    assert save_tables(entry, {"train": table, "held_out": table}, meta={"records": {"r.jsonl": 4}})
    loaded = load_tables(entry)
    assert loaded.meta == {"records": {"r.jsonl": 4}} and set(loaded.tables) == {"train", "held_out"}
    for t in loaded.tables.values():
        assert_same(t, table)
    train = loaded.tables["train"]
    assert train.images[0] is None and train.images[1].endswith("img.png") and train.ids[2] == "t2-é✓"
    assert all(np.array_equal(x, y) for i in range(len(table)) for x, y in zip(train.sample(i), table.sample(i)))
    assert np.array_equal(train.lengths, table.lengths) and np.array_equal(train.has_image, table.has_image)


def test_loading_maps_the_arrays_instead_of_reading_them(tmp_path, table):
    big = dataclasses.replace(table, tokens=np.arange(32 * 2 ** 20, dtype=np.int32))  # 128 MiB
    entry = entry_directory(str(tmp_path), KEY)
    save_table(big, entry)
    del big

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    before = resident_mib()
    loaded = load_table(entry)
    assert len(loaded) == len(table) and loaded.ids[0] == table.ids[0]
    assert resident_mib() - before < 16
    assert isinstance(loaded.tokens, np.memmap) and loaded.tokens.filename.startswith(entry)
    assert int(loaded.tokens[-1]) == 32 * 2 ** 20 - 1


def test_string_columns_index_like_lists():
    values = ["a", None, "", "é✓ two", "x" * 300, None]
    column = StringColumn.from_strings(values)
    assert column == values and list(column) == values and len(column) == 6
    assert column[-3] == "é✓ two" and column[1:4] == values[1:4] and column[1] is None
    assert column.none is not None and column.data.dtype == np.uint8
    ascii_only = StringColumn.from_strings(["ab", "c"])
    assert ascii_only.none is None and ascii_only == ["ab", "c"] and ascii_only != ["ab", "d"]
    with pytest.raises(IndexError):
        column[6]
    with pytest.raises(TypeError, match="str or None, not int"):
        StringColumn.from_strings(["a", 3])


def test_a_loaded_table_pickles_as_its_entry(tmp_path, table):
    big = dataclasses.replace(table, tokens=np.arange(4 * 2 ** 20, dtype=np.int32))  # 16 MiB
    entry = entry_directory(str(tmp_path), KEY)
    save_table(big, entry)
    loaded = load_table(entry)
    data = pickle.dumps(loaded)
    assert len(data) < 4096
    copy = pickle.loads(data)
    assert_same(copy, big)
    assert isinstance(copy.tokens, np.memmap)
    changed = dataclasses.replace(loaded, words=loaded.words + 1)  # no longer what the entry holds
    copy = pickle.loads(pickle.dumps(changed))
    assert np.array_equal(copy.words, table.words + 1)


def test_absent_or_partial_entries_are_never_loaded(tmp_path, table, monkeypatch):
    entry = entry_directory(str(tmp_path), KEY)
    assert load_table(entry) is None

    # A writer that fails half-way leaves nothing behind: no entry, no scratch directory.
    real_save = np.save
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(table_cache.np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_table(table, entry)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [] and load_table(entry) is None

    # An entry whose files do not match its manifest (a partial copy), or with no readable manifest.
    assert save_table(table, entry)
    tokens = os.path.join(entry, "table.tokens.npy")
    with open(tokens, "r+b") as f:
        f.truncate(os.path.getsize(tokens) - 4)
    assert load_table(entry) is None
    os.remove(tokens)
    assert load_table(entry) is None
    with open(os.path.join(entry, "manifest.json"), "w") as f:
        f.write('{"format": 1, "tab')
    assert load_table(entry) is None
    os.remove(os.path.join(entry, "manifest.json"))
    assert load_table(entry) is None

    # The next save replaces such an entry.
    assert save_table(table, entry)
    assert_same(load_table(entry), table)
    assert sorted(os.listdir(tmp_path)) == [KEY]


def test_an_entry_of_another_format_is_a_miss_and_is_replaced(tmp_path, table, monkeypatch):
    entry = entry_directory(str(tmp_path), KEY)
    monkeypatch.setattr(table_cache, "FORMAT", 0)
    save_table(table, entry)
    monkeypatch.undo()
    assert load_table(entry) is None
    assert save_table(table, entry) and load_table(entry) is not None


def _write(entry: str, table: SampleTable, barrier, results) -> None:
    barrier.wait()
    results.put(save_table(table, entry))


def test_two_writers_of_one_key_leave_one_valid_entry(tmp_path, table):
    entry = entry_directory(str(tmp_path), KEY)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX threads
    barrier, results = context.Barrier(2), context.Queue()
    writers = [context.Process(target=_write, args=(entry, table, barrier, results)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert sorted([results.get(timeout=5), results.get(timeout=5)]) == [False, True]
    assert os.listdir(tmp_path) == [KEY]  # no scratch or discarded directory left
    assert_same(load_table(entry), table)

    # A later writer of the same key leaves the entry as it is.
    stamp = os.stat(os.path.join(entry, "manifest.json")).st_mtime_ns
    assert not save_table(table, entry)
    assert os.stat(os.path.join(entry, "manifest.json")).st_mtime_ns == stamp


def test_a_field_it_cannot_store_is_an_error_naming_it(tmp_path, table):
    with pytest.raises(TypeError, match="SampleTable.ids is a list"):
        save_table(dataclasses.replace(table, ids=list(range(len(table)))), entry_directory(str(tmp_path), KEY))
    assert os.listdir(tmp_path) == []


def test_keys_and_names_cannot_leave_the_cache(tmp_path, table):
    for key in ("../x", "a.b", "", "a/b"):
        with pytest.raises(ValueError, match="table cache key"):
            entry_directory(str(tmp_path), key)
    with pytest.raises(ValueError, match="table name"):
        save_tables(entry_directory(str(tmp_path), KEY), {"../t": table})
