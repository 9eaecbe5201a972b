"""How a command's options and its `--config FILE` become a stage's config (`stage_kwargs`): by the config
dataclass's fields, never by hand-typed name lists; and the help of such a command (`ConfigCommand`), which
lists the fields that have no option."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: --config takes JSON only
    tomllib = None

config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML (or .json) file: a table of the stage's configuration fields, the ones without an option among "
    "them (listed below); an option given on the command line wins over the file.",
)


def read_config_file(path: Path) -> dict[str, Any]:
    """The table of a `--config` file: JSON for a `.json` name, else TOML."""
    if Path(path).suffix != ".json" and tomllib is None:
        raise ValueError(f"--config {path}: reading TOML needs Python 3.11 (tomllib); pass a .json file")
    try:
        text = Path(path).read_text()
        table = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(table, dict):
        raise ValueError(f"--config {path}: expected a table of fields, got {type(table).__name__}")
    return table


def stage_kwargs(
    ctx: click.Context,
    options: dict[str, Any],
    config_file: Path | None,
    config: type,
    nested: tuple[str, type] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `config` (a dataclass) from a command's options and the fields of `config_file`
    (where an option was not given on the command line, the file's value replaces its default). A name goes to
    `config`'s field of that name; with `nested` (FIELD, TYPE), a name that only TYPE has goes into a dict under
    `config`'s FIELD (`run`: the fine-tuning step's fields). A field of neither in the file is a ValueError."""
    targets = [config] if nested is None else [config, nested[1]]
    values = dict(options)
    if config_file is not None:
        hints = {}
        for cls in reversed(targets):
            hints.update({k: v for k, v in field_types(cls).items() if nested is None or k != nested[0]})
        table = read_config_file(config_file)
        unknown = sorted(set(table) - set(hints))
        if unknown:
            names = " or ".join(c.__name__ for c in targets)
            raise ValueError(f"--config {config_file}: {', '.join(unknown)}: no such field of {names}")
        for name, value in table.items():
            if name not in values or ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
                values[name] = _as_field(name, hints[name], value, config_file)
    if nested is None:
        return values
    own = {f.name for f in dataclasses.fields(config)}
    inner = {k: v for k, v in values.items() if k not in own}
    return {**{k: v for k, v in values.items() if k in own}, nested[0]: inner}


def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field types (its annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings under a dataclass's fields (the string literal that follows each annotated name)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = inspect.cleandoc(str(after.value.value))
    return docs


def _as_field(name: str, hint: Any, value: Any, source: Path) -> Any:
    """`value` read from a file as the field's type (a list as a tuple, a string as a Path), or ValueError."""
    ok, got = _convert(hint, value)
    if not ok:
        raise ValueError(f"--config {source}: {name} must be {_type_name(hint)}, got {value!r}")
    return got


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    """(whether `value` fits the type `hint`, the value as that type): a union tries each member, a tuple takes a
    list, a Path a string, a float an int too; other generic types (a Mapping) take the value as it is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return next(((True, v) for ok, v in (_convert(a, value) for a in args) if ok), (False, None))
    if hint is type(None):
        return value is None, None
    if origin is tuple:
        if not isinstance(value, list):
            return False, None
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        items = [_convert(k, v) for k, v in zip(kinds, value, strict=False)]
        return len(kinds) == len(value) and all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is not None or hint is Any:
        return True, value
    simple = {bool: (bool,), int: (int,), float: (int, float), str: (str,), Path: (str,)}
    if not isinstance(value, simple.get(hint, (hint,))) or (hint is not bool and isinstance(value, bool)):
        return False, None
    return True, hint(value)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return "a list" + (f" of {len(args)} numbers" if Ellipsis not in args else "")
    return {type(None): "null (JSON)", Path: "a path (string)"}.get(hint, getattr(hint, "__name__", str(hint)))


class ConfigCommand(click.Command):
    """A stage's command: its help ends with the fields of its configs that have no option (set with `--config
    FILE`; each field's docstring says what it is; `hidden_fields` are not listed) and, given `notes`, more lists
    (the recipes). Both are read when the help is shown, importing the stage then."""

    def __init__(
        self,
        *args,
        configs: Callable[[], Sequence[type]],
        notes: Callable[[], dict] | None = None,
        hidden_fields: tuple[str, ...] = (),
        **kw,
    ):
        super().__init__(*args, **kw)
        self.configs, self.notes, self.hidden_fields = configs, notes, hidden_fields

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows, seen = [], {p.name for p in self.params} | set(self.hidden_fields)
        for cls in self.configs():
            docs = field_docs(cls)
            for f in dataclasses.fields(cls):
                if f.name not in seen:
                    seen.add(f.name)
                    rows.append((f.name, docs.get(f.name, "").split("\n\n")[0].replace("\n", " ")))
        sections = {"Fields without an option (--config FILE)": rows, **(self.notes() if self.notes else {})}
        for title, items in sections.items():
            if items:
                with formatter.section(title):
                    formatter.write_dl(items)
        super().format_epilog(ctx, formatter)
