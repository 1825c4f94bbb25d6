"""Sizes written by people: ``8GiB``, ``512MiB``, ``5GB``, ``100M``, or a number of bytes.

One reading for every flag and plan that takes a size (memory caps, shard sizes): ``KiB``/``MiB``/
``GiB``/``TiB`` and a bare ``K``/``M``/``G``/``T`` are binary (as cgroup files and ``free`` read
them); ``KB``/``MB``/``GB``/``TB`` are decimal (as Hugging Face's ``max_shard_size="5GB"`` is).
"""
from __future__ import annotations

import re
from typing import Union

from .errors import ConfigError


def parse_bytes(text: Union[str, int, float], what: str = "size") -> int:
    """Bytes from ``text`` (see the module docstring); a positive number, else one ConfigError line."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
        if not m:
            raise ConfigError(f"cannot read {what} {text!r}: write it like 8GiB, 512MiB or 5GB")
        base = 1000 if m.group(3) == "B" else 1024
        value = int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return value
