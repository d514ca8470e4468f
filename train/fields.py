"""A YAML mapping read into a dataclass, and the ``key=value`` overrides every recipe file takes.

The dataclass holds every default (with its one-line comment); what the file or an override gives is checked against
it, each problem a one-line ``UserError`` naming the key: an unknown key with the nearest valid one
(``unknown key 'data.regions_per_imgae'; did you mean 'regions_per_image'?``), a value of the wrong type with the type
the field needs (``data.sizes.train: 'abc' is not an integer``). train/recipe.py (GranViT recipes) and
train/parts/recipe.py (the parts' recipe) read their files through it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing

import yaml

from ..console import UserError


# ============================================================================================ typed mappings
def typed(cls, values: dict | None, where: str, source: str):
    """``cls(**values)`` with every key and value checked; fields that are dataclasses, or mappings of them, too.
    A mapping field given ``null`` takes its default (``data.synth: null`` = no generator settings)."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    refuse_unknown(values, fields, where, source)
    for name, value in list(values.items()):
        if value is None and fields[name].default_factory is not dataclasses.MISSING and not _allows_none(hints[name]):
            del values[name]
        else:
            values[name] = _checked(value, hints[name], _join(where, name), source)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # a rule of the class itself (its __post_init__)
        raise UserError(f"{source}: {where}: {error}") from None


def refuse_unknown(values, known, where: str, source: str) -> None:
    """One line per recipe: the first key of `values` not in `known`, with the nearest known key (difflib)."""
    for key in values:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(sorted(known))}"
            raise UserError(f"{source}: unknown key {_join(where, key)!r}; {hint}")


def _checked(value, hint, key: str, source: str):
    """`value` if it is of type `hint` (a dataclass field's annotation), else a UserError naming `key` and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if value is None and len(others) < len(args):
            return None
        if len(others) == 1:  # Optional[X]: X's own message, down to the inner key
            return _checked(value, others[0], key, source)
    elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return typed(hint, value, key, source)
    elif (origin or hint) is dict and isinstance(value, dict):
        return {k: _checked(v, args[1], f"{key}.{k}", source) for k, v in value.items()} if args else value
    if not _matches(value, hint):
        raise UserError(f"{source}: {key}: {value!r} is not {_name(hint)}")
    return value


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer is a number too (YAML's `1` for a share of 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint) or (origin or hint) is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values()) if args else isinstance(
            value, dict)
    if (origin or hint) in (list, tuple):  # YAML has lists only; a tuple field takes one
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else isinstance(
            value, (list, tuple))
    return True


def _name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in args)
    if dataclasses.is_dataclass(hint) or (origin or hint) is dict:
        return f"a mapping of {_name(args[1]).partition(' ')[2] or _name(args[1])}s" if args else "a mapping"
    if (origin or hint) in (list, tuple):
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _allows_none(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


# ============================================================================================ overrides
def apply_overrides(raw: dict, overrides: list[str], example: str) -> dict:
    """`raw` with each ``dotted.key=value`` of `overrides` set (the value read as YAML, see override_value)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} is not key=value (e.g. {example})")
        set_dotted(raw, key, override_value(value))
    return raw


def override_value(text: str):
    """A ``key=value`` override's value as YAML, except where YAML 1.1 (which PyYAML follows) surprises: ``1e-3`` is a
    number (read as a string there: a learning rate must not become text) and only ``true`` / ``false`` are booleans
    (``no`` / ``off`` stay words: ``training.save_strategy=no`` is the strategy, not False)."""
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def set_dotted(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = config.get(p)
        if child is None:
            child = config[p] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {dotted}: {p} is not a section")
        config = child
    config[leaf] = value
