"""The config reference (docs/config.md), generated from the typed schema.

    python -m jaxllava.config_reference > docs/config.md

Every field of `ExperimentConfig` and its nested dataclasses becomes one table row:
its dotted key (as `--set` takes it), its type (`jaxllava.config._type_name`, the
words of the loader's own type errors), its default, and one line of meaning. The
meaning is the field's comment in the source: the comment lines just above the
field and the comment at the end of its line(s), read with `ast` and `tokenize`, so
the page never repeats a description that could drift from the code. A field
redefined in a subclass without a comment keeps its base class's comment.

A field whose type is a dataclass is a section of its own (a heading, not a row);
when the section may be `null` (`model.vision`, `model.lm.rope_scaling`) it is a row
as well, since `null` is then a value. The elements of a list of dataclasses
(`data.sources`) are a section keyed `data.sources[]`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from typing import Any

import yaml

from jaxllava.config import ExperimentConfig, _dataclass_of, _is_tuple_of_dataclass, _type_name

COMMAND = "python -m jaxllava.config_reference > docs/config.md"
_DOC = "(docstring)"  # not a field name: a field name is an identifier


@dataclasses.dataclass(frozen=True)
class Row:
    key: str  # dotted, e.g. "model.lm.vocab_size"; "data.sources[].path" for list elements
    type: str
    default: str
    description: str  # the field's comment; "" when the source has none


@dataclasses.dataclass(frozen=True)
class Section:
    key: str  # "" for the top level, else e.g. "model.lm"
    cls: type
    intro: str  # the comment on the field that holds the section, then the class docstring's first sentence
    rows: tuple[Row, ...]


# ----------------------------------------------------------------------------- comments


@functools.lru_cache(maxsize=None)
def _module_comments(module_name: str) -> dict[str, dict[str, str]]:
    """class name -> field name -> comment, for every class defined at the top level of a module
    (and under the key `_DOC` the class's own docstring, "" when it has none: a dataclass
    without one gets a generated signature as `__doc__`, which is no description)."""
    source = inspect.getsource(sys.modules[module_name])
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()  # lines holding anything but a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        fields[_DOC] = ast.get_docstring(node) or ""
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            above = []
            line = statement.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in comments]
            fields[statement.target.id] = " ".join(part for part in above + trailing if part)
    return found


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source ("" when it has none), for a config dataclass.

    A field without a comment in `cls` takes the comment of the same field in the
    nearest base class that has one.
    """
    result = {}
    for field in dataclasses.fields(cls):
        result[field.name] = ""
        for klass in cls.__mro__:
            if field.name in getattr(klass, "__annotations__", {}):
                comment = _module_comments(klass.__module__).get(klass.__qualname__, {}).get(field.name, "")
                if comment:
                    result[field.name] = comment
                    break
    return result


def class_summary(cls: type) -> str:
    """The first sentence of the class's own docstring ("" when it has none)."""
    text = _module_comments(cls.__module__).get(cls.__qualname__, {}).get(_DOC, "")
    if not text:
        return ""
    paragraph = " ".join(text.split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return match.group(1) if match else paragraph


# ----------------------------------------------------------------------------- walking the schema


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def format_value(value: Any) -> str:
    """A default as it would be written in YAML flow style."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quoted when YAML would read it as something else ("2025" is a number, "" is null).
        return value if value and yaml.safe_load(value) == value else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def sections(root: type = ExperimentConfig) -> list[Section]:
    """Every section of the schema, depth first in field order, with its rows."""
    out: list[Section] = []

    def walk(cls: type, key: str, intro: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        rows, children = [], []
        for field in dataclasses.fields(cls):
            tp = hints[field.name]
            dotted = f"{key}.{field.name}" if key else field.name
            nested = _dataclass_of(tp)
            if nested is not None:
                if _is_optional(tp):
                    # The field is a row of this section too: null is one of its values.
                    children.append((nested, dotted, f"Read when `{dotted}` (a row of `{key or 'top level'}`) "
                                                     f"is not null."))
                else:
                    children.append((nested, dotted, comments[field.name]))
                    continue
            elif _is_tuple_of_dataclass(tp):
                children.append((typing.get_args(tp)[0], dotted + "[]", comments[field.name]))
                continue
            rows.append(Row(dotted, _type_name(tp), format_value(_default_of(field)), comments[field.name]))
        summary = class_summary(cls)
        out.append(Section(key, cls, " ".join(part for part in (intro, summary) if part), tuple(rows)))
        for nested, dotted, comment in children:
            walk(nested, dotted, comment)

    walk(root, "", "")
    return out


def rows(root: type = ExperimentConfig) -> list[Row]:
    return [row for section in sections(root) for row in section.rows]


# ----------------------------------------------------------------------------- Markdown

_CODE_SPAN = re.compile(r"(`[^`]*`)")


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: pipes escaped everywhere, '<' outside code spans
    (so `<workdir>` is shown, not taken for an HTML tag)."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join(parts).replace("|", "\\|")


_HEADER = f"""\
# Config reference

<!-- Generated from the schema by
    {COMMAND}
Do not edit by hand. A field's meaning is its comment in the source (jaxllava/data/config.py,
jaxllava/model/config.py, jaxllava/train/config.py, jaxllava/eval/config.py): change the comment
there and regenerate. tests/test_config_reference.py fails when this page is out of date or a field
has no comment. -->

Every key of an experiment file (`launch.py train|inspect-data|cache-images --config FILE`), as
`--set KEY=VALUE` takes it. How files are read (`base:`, `--set`, checking): the module docstring of
`jaxllava/config.py` and the README's Training section. The default is what a key left out gets; the
shipped files in `configs/` and `configs/presets/` set many of them. `KEY[]` stands for each element of a
list (`data.sources: [{{path: a.jsonl}}, {{path: b.json, weight: 2}}]`). A section that may be `null` has
a row of its own; its fields' defaults apply when the section is given (`model.vision: {{}}` is the
default tower). Checks that involve several fields (say, the largest of `data.buckets` against
`model.lm.max_position_embeddings`) are in each section's `__post_init__` and are not listed here.
The meanings are the comments in the Python source, where None is YAML's `null`.
"""


def render(root: type = ExperimentConfig) -> str:
    """docs/config.md: the whole reference as Markdown."""
    lines = [_HEADER]
    for section in sections(root):
        if not section.rows:
            continue
        lines.append(f"## {section.key or 'top level'}\n")
        if section.intro:
            intro = section.intro[0].upper() + section.intro[1:]
            lines.append(_cell(intro if intro.endswith(".") else intro + ".") + "\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for row in section.rows:
            default = row.default.replace("|", "\\|")
            lines.append(f"| `{row.key}` | {_cell(row.type)} | `{default}` | {_cell(row.description)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
