"""Tokenized sample tables on disk, keyed by the data fingerprint: a warm start maps them
instead of reading and tokenizing every record again.

    <root>/<key>/                      one entry (`entry_directory(root, key)`)
        manifest.json                  format, every field of every table, every file's size, meta
        <table>.<field>.npy            an array field, memory-mapped on load
        <table>.<field>.utf8.npy       a field of strings (or None): their UTF-8 bytes end to end,
        <table>.<field>.offsets.npy      where each starts (n + 1), and which are None
        <table>.<field>.none.npy         (only when some are): `StringColumn`, decoded per item

An entry is written in a temporary sibling directory and renamed into place once every file
is flushed to disk, so a reader never sees half an entry; of two writers of one key, the
second's rename fails and its copy is removed. An entry that is there but not whole (a
manifest missing or unreadable, a file missing or of another size than the manifest says:
a partial copy, a full disk) is never loaded, and the next save replaces it.

Loaded tables are `MappedTable`s: their arrays are `np.memmap`s (pages are read when used,
and shared between processes), and they pickle as their entry's path, so a loader worker
maps the same files instead of receiving gigabytes of tokens.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from jaxllava.data.samples import SampleTable

FORMAT = 1  # bump when the layout changes: an entry of another format is a miss, then replaced
MANIFEST = "manifest.json"
_KEY = re.compile(r"^[0-9A-Za-z_-]+$")  # no dots: temporary and discarded siblings have them


class StringColumn(collections.abc.Sequence):
    """A sequence of str (or None) kept as one UTF-8 byte array and offsets: 10M of them cost
    two arrays, not 10M Python objects, and mapped from disk they cost nothing until read."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, none: Optional[np.ndarray] = None):
        self.data, self.offsets, self.none = data, offsets, none

    @classmethod
    def from_strings(cls, values: Iterable[Optional[str]]) -> "StringColumn":
        values = list(values)
        none = np.fromiter((v is None for v in values), bool, len(values))
        texts = [("" if v is None else v) for v in values] if none.any() else values
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"a string column holds str or None, not {type(bad).__name__}")
        joined = "".join(texts)
        if joined.isascii():  # one encode of the whole; a character is a byte
            data, sizes = joined.encode("ascii"), map(len, texts)
        else:
            encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
            data, sizes = b"".join(encoded), map(len, encoded)
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(np.fromiter(sizes, np.int64, len(texts)), out=offsets[1:])
        return cls(np.frombuffer(data, np.uint8), offsets, none if none.any() else None)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, and IndexError past the end
        if self.none is not None and self.none[i]:
            return None
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")

    def __eq__(self, other) -> bool:
        if not isinstance(other, collections.abc.Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        head = ", ".join(repr(v) for v in self[:3])
        return f"StringColumn([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class MappedTable(SampleTable):
    """A SampleTable loaded from an entry: pickles as (entry, name) while its fields are the ones
    loaded (a changed copy, e.g. dataclasses.replace, pickles by value like any SampleTable)."""

    def __reduce__(self):
        origin = self.__dict__.get("_origin")
        fields = [f.name for f in dataclasses.fields(SampleTable)]
        if origin is not None and all(getattr(self, f) is origin[2][f] for f in fields):
            return _load_one, origin[:2]
        return _plain_table, ({f: getattr(self, f) for f in fields},)


def _load_one(directory: str, name: str) -> SampleTable:
    entry = load_tables(directory)
    if entry is None:
        raise FileNotFoundError(f"the table cache entry {directory} is gone or damaged")
    return entry.tables[name]


def _plain_table(fields: dict) -> SampleTable:
    return SampleTable(**fields)


@dataclasses.dataclass
class CacheEntry:
    directory: str
    tables: dict[str, SampleTable]
    meta: dict  # what the writer passed (JSON): record counts, skips, ...


def entry_directory(root: str, key: str) -> str:
    """The entry of `key` (the data fingerprint, a sha256 hex string) under the cache root."""
    if not _KEY.match(key):
        raise ValueError(f"a table cache key is letters, digits, '_' and '-', got {key!r}")
    return os.path.join(os.path.abspath(root), key)


def save_table(table: SampleTable, directory: str, *, meta: Optional[dict] = None) -> bool:
    """`save_tables` of one table, named "table"."""
    return save_tables(directory, {"table": table}, meta=meta)


def load_table(directory: str) -> Optional[SampleTable]:
    """The table `save_table` wrote, or None when the entry is absent or not whole."""
    entry = load_tables(directory)
    return None if entry is None else entry.tables["table"]


def save_tables(directory: str, tables: Mapping[str, SampleTable], *, meta: Optional[dict] = None) -> bool:
    """Write the tables (by name) and `meta` (JSON) as the entry `directory`, atomically. True if
    this call made the entry; False if a whole entry was already there (another writer of the
    same key, which wrote the same tables): it is left as it is."""
    directory = os.path.abspath(directory)
    parent, base = os.path.split(directory)
    for name in tables:
        if not _KEY.match(name):
            raise ValueError(f"a table name is letters, digits, '_' and '-', got {name!r}")
    if _manifest(directory) is not None:
        return False
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"{base}.tmp-", dir=parent)
    try:
        files: dict[str, int] = {}
        layout = {name: _write_table(scratch, name, table, files) for name, table in tables.items()}
        manifest = {"format": FORMAT, "tables": layout, "files": files, "meta": meta or {}}
        _write_file(os.path.join(scratch, MANIFEST), json.dumps(manifest, indent=1).encode())
        _fsync(scratch)
        for attempt in range(2):
            try:
                os.rename(scratch, directory)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if _manifest(directory) is not None:
                    return False  # another writer finished first
                if attempt:
                    raise
                _discard(directory)  # not whole (interrupted copy, older format): replace it
            else:
                break
        _fsync(parent)
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_tables(directory: str) -> Optional[CacheEntry]:
    """The entry's tables, their arrays memory-mapped; None when the entry is absent or not whole."""
    directory = os.path.abspath(directory)
    manifest = _manifest(directory)
    if manifest is None:
        return None
    tables = {name: _read_table(directory, name, layout) for name, layout in manifest["tables"].items()}
    return CacheEntry(directory, tables, manifest["meta"])


def _manifest(directory: str) -> Optional[dict]:
    """The manifest of a whole entry of this format, else None."""
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
        if manifest.get("format") != FORMAT:
            return None
        for name, size in manifest["files"].items():
            if os.path.getsize(os.path.join(directory, name)) != size:
                return None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return manifest


def _discard(directory: str) -> None:
    """Move a damaged entry aside, then delete it (another process may be doing the same)."""
    aside = f"{directory}.discard-{uuid.uuid4().hex}"
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _write_table(scratch: str, name: str, table: SampleTable, files: dict[str, int]) -> dict:
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(SampleTable):
        value = getattr(table, field.name)
        stem = f"{name}.{field.name}"
        if isinstance(value, np.ndarray):
            _write_array(scratch, f"{stem}.npy", value, files)
            fields[field.name] = {"kind": "array"}
        elif isinstance(value, StringColumn) or (isinstance(value, (list, tuple)) and
                                                 all(v is None or isinstance(v, str) for v in value)):
            column = value if isinstance(value, StringColumn) else StringColumn.from_strings(value)
            _write_array(scratch, f"{stem}.utf8.npy", column.data, files)
            _write_array(scratch, f"{stem}.offsets.npy", column.offsets, files)
            if column.none is not None:
                _write_array(scratch, f"{stem}.none.npy", column.none, files)
            fields[field.name] = {"kind": "strings", "none": column.none is not None}
        else:
            raise TypeError(f"SampleTable.{field.name} is a {type(value).__name__}: the table cache stores "
                            f"arrays and sequences of str or None")
    return fields


def _read_table(directory: str, name: str, layout: dict) -> MappedTable:
    values: dict[str, Any] = {}
    for field, spec in layout.items():
        stem = os.path.join(directory, f"{name}.{field}")
        if spec["kind"] == "array":
            values[field] = _map(f"{stem}.npy")
        else:
            values[field] = StringColumn(_map(f"{stem}.utf8.npy"), _map(f"{stem}.offsets.npy"),
                                         _map(f"{stem}.none.npy") if spec["none"] else None)
    table = MappedTable(**values)
    table._origin = (directory, name, dict(values))
    return table


def _map(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _write_array(scratch: str, filename: str, array: np.ndarray, files: dict[str, int]) -> None:
    path = os.path.join(scratch, filename)
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    files[filename] = os.path.getsize(path)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(directory: str) -> None:
    """Make the directory's entries (new files, a rename) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
