"""One exception type per kind of user mistake; messages name the file, record and field."""
from __future__ import annotations


class JaxllavaError(Exception):
    """Base class for errors that point at the user's input rather than at a bug."""


class ConfigError(JaxllavaError):
    """A bad config file, key, value or override."""


class DataError(JaxllavaError):
    """A malformed record, missing or corrupt image, or over-long sample."""

    def __init__(self, message: str, *, file: str | None = None, record: int | str | None = None,
                 record_id: str | None = None, field: str | None = None, reason: str = "invalid"):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if record is not None:
            # Callers pass "record 3" / "line 4" strings, or a bare index.
            where.append(record if isinstance(record, str) else f"record {record}")
        if record_id is not None:
            where.append(f"id {record_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.file, self.record, self.record_id, self.field = file, record, record_id, field
        self.reason = reason  # short machine-readable key used to count skips


class ConversionError(JaxllavaError):
    """A checkpoint that cannot be converted: missing file, tensor or a shape mismatch."""


class TrainingError(JaxllavaError):
    """The run cannot go on (non-finite loss, inconsistent resume)."""


class FieldError(ConfigError):
    """A bad value of one field. `key` is dotted relative to the dataclass that raised it
    ("num_kv_heads", "resampler.num_latents"), so the loader, which knows where that
    dataclass sits, can name the full key ("model.lm.num_kv_heads") and where it was set."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"'{key}': {detail}")
        self.key, self.detail = key, detail
