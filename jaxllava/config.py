"""The experiment config: one typed schema, read from YAML with inheritance and overrides.

A config file is YAML whose top-level keys are the fields of `ExperimentConfig`
(model, data, optim, train, mesh, checkpoint, eval, logging), plus an optional
`base:` key: a path, or a list of paths, relative to the file. Bases are read
first, in order, and deep-merged (mappings merge key by key, anything else is
replaced), then the file itself, then each `--set a.b=value` override (the value
is parsed as a YAML scalar or flow collection: `--set optim.lr=1e-4`,
`--set data.buckets=[128,256]`, `--set model.vision=null`).

Paths (the fields made with `schema.path_field`: record files, image folders, the tokenizer,
the preprocessor config, evaluation tasks, `train.init_from`) resolve like `base:`, against the
folder of the file that sets them; a path given with `--set` resolves against the working
directory. The loaded config holds them absolute, and so do `config.yaml` and run.json.
`train.workdir` is an output location and stays relative to the working directory.

Every key is checked against the dataclass fields: a misspelt key is a
`ConfigError` naming the file (or override) and the dotted key, with the nearest
valid key suggested; a value of the wrong type names the key, the expected type
and the value given. Fields left out take the dataclass defaults. Each dataclass
then checks its values in `__post_init__`; a `FieldError` there names a field,
which the error message extends to the full dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from jaxllava.data.config import DataConfig
from jaxllava.errors import ConfigError, FieldError
from jaxllava.schema import require
from jaxllava.model.config import ModelConfig
from jaxllava.eval.config import EvalConfig
from jaxllava.train.config import (PARTS, CheckpointConfig, LoggingConfig, MeshConfig, OptimConfig,
                                   TrainConfig)

BASE_KEY = "base"

# Keys that were renamed, old -> new: difflib finds nothing close to these, so the
# unknown-key error names the new key itself.
RENAMED_KEYS = {
    **{f"optim.{part}_lr": f"optim.parts.{part}.lr" for part in PARTS},
    **{f"optim.train_{part}": f"optim.parts.{part}.train" for part in PARTS},
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        longest, positions = max(self.data.buckets), self.model.lm.max_position_embeddings
        # The reference trained 32768-token samples on a 2048-position LM unchecked (README pitfall 27).
        require(longest <= positions, "data.buckets",
                f"go up to {longest} tokens but model.lm.max_position_embeddings is {positions}: lower the "
                f"buckets or raise the position range")
        vision = self.model.vision
        require(self.data.text_only_images == "none" or (vision is not None and vision.kind != "features"),
                "data.text_only_images", "'black' needs a vision tower to see the black image; the model has "
                f"{'none' if vision is None else 'precomputed features as its vision input'}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read `path` (with its bases), apply `--set` overrides, and build a checked config."""
    raw: dict = {}
    origins: dict[str, str] = {}
    _merge_file(os.fspath(path), raw, origins, chain=())
    for override in overrides:
        _apply_override(override, raw, origins)
    return build_config(raw, origins)


def build_config(raw: dict, origins: Optional[dict[str, str]] = None,
                 cls: type = ExperimentConfig) -> Any:
    """Type-check a plain nested dict against the schema and build the dataclasses.

    `origins` maps dotted keys to where they were set (a file or an override), for
    error messages.
    """
    origins = origins or {}
    _check_keys(raw, cls, "", lambda key: _origin_of(key, origins))
    return _convert(raw, cls, "", origins)


def _merge_file(path: str, raw: dict, origins: dict[str, str], chain: tuple[str, ...]) -> None:
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: base chain loops back to itself ({' -> '.join(chain + (real,))})")
    via = f" (a base of {chain[-1]})" if chain else ""
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found{via}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file{via}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file{via}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}){via}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(content).__name__}")
    bases = content.pop(BASE_KEY, None)
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"{path}: '{BASE_KEY}' must be a path or a list of paths, got {bases!r}")
        for base in bases:
            _merge_file(os.path.join(os.path.dirname(path), base), raw, origins, chain + (real,))
    # Keys are checked per file so the error names the file that has the typo.
    _check_keys(content, ExperimentConfig, "", lambda key: path)
    _deep_merge(raw, content, origins, path, "")


def _deep_merge(into: dict, new: dict, origins: dict[str, str], source: str, prefix: str,
                cls: type = ExperimentConfig) -> None:
    """Merge `new` into `into` section by section; a field's value, even a mapping such
    as `eval.tasks`, is replaced whole (so `eval.tasks={}` clears the tasks)."""
    hints = typing.get_type_hints(cls)
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        section = _dataclass_of(hints[key]) if key in hints else None
        if section is not None and isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value, origins, source, dotted + ".", section)
        else:
            into[key] = value
            for stale in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[stale]
            origins[dotted] = source


def _apply_override(override: str, raw: dict, origins: dict[str, str]) -> None:
    source = f"--set {override}"
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: an override must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: value is not valid YAML: {e}") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    _check_keys(nested, ExperimentConfig, "", lambda k: source)
    _deep_merge(raw, nested, origins, source, "")


def _origin_of(key: str, origins: dict[str, str]) -> str:
    """Where a dotted key (or its nearest parent) was set."""
    probe = key
    while probe:
        if probe in origins:
            return origins[probe]
        probe = probe.rpartition(".")[0]
    return "config"


# ----------------------------------------------------------------------------- checking


def _dataclass_of(tp) -> Optional[type]:
    """The dataclass inside `tp` (itself, or the non-None arm of an Optional)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return None


def _check_keys(raw: Any, cls: type, prefix: str, where) -> None:
    """Raise on the first key that is not a field (recursing into nested dataclasses)."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            if dotted in RENAMED_KEYS:
                hint = f"; it is now '{RENAMED_KEYS[dotted]}'"
            elif near:
                hint = f"; did you mean '{prefix}{near[0]}'?"
            else:
                hint = f"; valid keys here: {', '.join(fields)}"
            raise ConfigError(f"{where(dotted)}: unknown key '{dotted}'{hint}")
        tp = hints[key]
        inner = _dataclass_of(tp)
        if inner is not None:
            _check_keys(value, inner, dotted + ".", where)
        elif _is_tuple_of_dataclass(tp) and isinstance(value, list):
            element = typing.get_args(tp)[0]
            for i, item in enumerate(value):
                _check_keys(item, element, f"{dotted}.{i}.", where)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _is_tuple_of_dataclass(tp) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis \
        and dataclasses.is_dataclass(args[0])


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return str(tp)


class _Mismatch(Exception):
    """A value that does not fit a type (turned into ConfigError at the field level)."""


def _mismatch(value: Any, tp, key: str, origins: dict[str, str], detail: str = "") -> ConfigError:
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    return ConfigError(f"{_origin_of(key, origins)}: '{key}': expected {_type_name(tp)}, "
                       f"got {type(value).__name__} {shown}{detail}")


def _convert(value: Any, tp, key: str, origins: dict[str, str]) -> Any:
    """`value` checked against the annotation `tp` and built (dataclasses, tuples, scalars)."""
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, key, origins)
    if _is_union(tp):
        return _convert_union(value, tp, key, origins)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(value, tp, key, origins)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}.{i}", origins) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _mismatch(value, tp, key, origins, f" (needs exactly {len(args)} items)")
        return tuple(_convert(v, a, f"{key}.{i}", origins) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _mismatch(value, tp, key, origins)
        return {_convert(k, args[0], key, origins): _convert(v, args[1], f"{key}.{k}", origins)
                for k, v in value.items()}
    return _convert_scalar(value, tp, key, origins)


def _convert_dataclass(value: Any, tp, key: str, origins: dict[str, str]) -> Any:
    if not isinstance(value, dict):
        raise _mismatch(value, tp, key, origins)
    hints = typing.get_type_hints(tp)
    kwargs = {}
    for field in dataclasses.fields(tp):
        if field.name in value:
            sub = f"{key}.{field.name}" if key else field.name
            kwargs[field.name] = _convert(value[field.name], hints[field.name], sub, origins)
            if field.metadata.get("path"):
                kwargs[field.name] = _absolute(kwargs[field.name], _origin_of(sub, origins))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_origin_of(key, origins)}: '{key}.{field.name}' is required")
    try:
        return tp(**kwargs)
    except FieldError as e:
        full = f"{key}.{e.key}" if key else e.key
        raise ConfigError(f"{_origin_of(full, origins)}: '{full}': {e.detail}") from None
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{_origin_of(key, origins)}: '{key or tp.__name__}': {e}") from None


def _absolute(value: Any, origin: str) -> Any:
    """A path (or a mapping's path values) made absolute against the folder of the config file it
    came from; a `--set` value or one built in code resolves against the working directory."""
    if isinstance(value, dict):
        return {k: _absolute(v, origin) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_absolute(v, origin) for v in value)
    if not isinstance(value, str) or not value:
        return value
    base = os.path.dirname(os.path.abspath(origin)) if os.path.isfile(origin) else os.getcwd()
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _convert_union(value: Any, tp, key: str, origins: dict[str, str]) -> Any:
    arms = typing.get_args(tp)
    if value is None:
        if type(None) in arms:
            return None
        raise _mismatch(value, tp, key, origins)
    value_arms = [a for a in arms if a is not type(None)]
    for arm in value_arms:
        try:
            return _convert(value, arm, key, origins)
        except ConfigError as e:
            error = e
    # A mistake inside a nested value (a dataclass or list) is reported where it is.
    if len(value_arms) == 1 and (dataclasses.is_dataclass(value_arms[0]) or typing.get_args(value_arms[0])
                                 and typing.get_origin(value_arms[0]) is not Literal):
        raise error
    raise _mismatch(value, tp, key, origins)


def _convert_scalar(value: Any, tp, key: str, origins: dict[str, str]) -> Any:
    if typing.get_origin(tp) is Literal:
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads 5e-4 (no dot) as a string (YAML 1.1); accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is Any:
        return value
    else:
        raise ConfigError(f"{_origin_of(key, origins)}: '{key}': unsupported schema type {tp!r}")
    raise _mismatch(value, tp, key, origins)


# ----------------------------------------------------------------------------- writing


def config_to_dict(config: Any) -> Any:
    """Plain nested dicts/lists/scalars (tuples become lists), in field order."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def config_differences(first: Any, second: Any, prefix: str = "") -> list[str]:
    """'key: first vs second' for every leaf that differs between two configs (or their dicts),
    dotted from `prefix`, so an error can name each differing field with both values."""
    first, second = config_to_dict(first), config_to_dict(second)
    if isinstance(first, dict) and isinstance(second, dict):
        lines = []
        for key in list(first) + [k for k in second if k not in first]:
            lines += config_differences(first.get(key), second.get(key), f"{prefix}.{key}" if prefix else str(key))
        return lines
    return [] if first == second else [f"{prefix}: {first!r} vs {second!r}"]


def dump_yaml(config: ExperimentConfig) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
