"""The config reference, generated from the schema: `python -m sage.config_reference > docs/config.md`.

Every key of every section, with its type, its default and what it does, read from the dataclasses
that define the schema (sage/config.py, the model's StudentConfig in sage/model.py, TeacherConfig in
sage/teacher/settings.py): a section's docstring introduces it, the comment lines above a field or
at the end of its line say what it does. The schema is the one source; tests/test_config.py fails
when docs/config.md no longer matches it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import textwrap
from typing import Any, Iterator

import yaml

from sage.config import ExperimentConfig

COMMAND = "python -m sage.config_reference > docs/config.md"


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the comment lines right above it, then the one at the end of its line."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines():
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        if line.startswith("    ") and not line.startswith("     ") and name in names:
            trailing = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
            comments[name] = " ".join(above + [trailing]).strip()
        above = []
    return comments


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _yaml(value: Any) -> str:
    """A default as it would be written in a YAML config."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())


def sections(cls: type = ExperimentConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted section name, dataclass) for every section and nested section, in schema order."""
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            name = prefix + f.name
            yield name, type(default)
            yield from sections(type(default), name + ".")


def reference() -> str:
    """docs/config.md's text."""
    out = [
        "# Config reference",
        "",
        f"Generated from the schema by `{COMMAND}`; do not edit by hand (tests/test_config.py fails when",
        "this file and the schema disagree). One YAML file describes one experiment: every key is",
        "optional and takes the default below when absent; an unknown key or a wrong type is an error",
        "naming the file and the key. `--set section.key=value` overrides one key on the command line",
        "(the value is read as YAML). Each run saves its resolved config as logs/<run>/config.yaml.",
    ]
    for name, cls in sections():
        out += ["", f"## `{name}`", ""]
        if _doc(cls):
            out += [_doc(cls), ""]
        out += ["| key | type | default | what it does |", "|---|---|---|---|"]
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            default = _default(f)
            if dataclasses.is_dataclass(default):
                comment = f"a section of its own: [`{name}.{f.name}`](#{name.replace('.', '')}{f.name})"
                out.append(f"| `{name}.{f.name}` | section | | {comment} |")
                continue
            out.append(f"| `{name}.{f.name}` | `{_cell(str(f.type))}` | `{_cell(_yaml(default))}` | "
                       f"{_cell(comments.get(f.name, ''))} |")
    return "\n".join(out) + "\n"


def main() -> None:
    sys.stdout.write(reference())


if __name__ == "__main__":
    main()
