"""Options dataclasses from plain mappings (recipes, ``--method-option KEY=VALUE``, Python dicts).

One helper for every place that turns user text into options: recipe stage configs, each pruner's,
allocator's and export format's own ``Options`` dataclass. Keys are looked up among the dataclass's
fields and values are checked against its type hints (an int is accepted where a float is
expected); an unknown key or a wrong type is ONE :class:`~sparse_runtime.errors.ConfigError` line
that names the option and the known ones. Nothing is evaluated: values are data, never code.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional

from .errors import ConfigError


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if tp in (int, float, str, bool):
        if tp is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        last = None
        for a in args:
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, where) if inner is not Any else v for v in value]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of KEY: VALUE, got {value!r}")
        return dict(value)
    return value


def make_config(cls: type, data: dict[str, Any], where: str, key_sep: str = "."):
    """Build a config dataclass from a mapping, rejecting unknown keys and wrong types, then call its
    ``validate()`` if it has one. A class that is not a dataclass gets the mapping unchanged.
    Errors start with ``where`` (and ``key_sep`` + the key for a wrong type)."""
    if not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(names) if names else 'none'}")
    kwargs = {k: _coerce(hints.get(k, Any), v, f"{where}{key_sep}{k}") for k, v in data.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def options_from_dict(cls: Optional[type], mapping: Optional[Mapping[str, Any]], what: str):
    """A method's validated options: ``cls`` (a dataclass, or None for a method without options)
    built from ``mapping``. ``what`` names the owner in errors, e.g. ``"method 'sparsegpt' option"``."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{what}s are a mapping of KEY: VALUE, got {mapping!r}")
    if cls is None:
        if mapping:
            raise ConfigError(f"{what}: this method takes no options, got {sorted(mapping)}")
        return None
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"options class {cls!r} must be a dataclass")
    return make_config(cls, dict(mapping), what, key_sep=" ")


def parse_option(text: str, flag: str = "--method-option") -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; the value is read as one YAML scalar (``yaml.safe_load``:
    numbers, true/false, null, strings), never evaluated."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"{flag} takes KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    k = k.strip()
    if not k:
        raise ConfigError(f"{flag} takes KEY=VALUE, got {text!r} (no KEY)")
    try:
        value = yaml.safe_load(v)
    except yaml.YAMLError:
        value = v  # not a YAML scalar: the text itself
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{flag} {k}: the value must be a single number, word or true/false, got {v!r}")
    return k, value


def parse_options(texts, flag: str = "--method-option") -> dict[str, Any]:
    """Repeated ``KEY=VALUE`` flags as one mapping (a key given twice is an error)."""
    out: dict[str, Any] = {}
    for t in texts or ():
        k, v = parse_option(t, flag)
        if k in out:
            raise ConfigError(f"{flag} {k} is given twice")
        out[k] = v
    return out
