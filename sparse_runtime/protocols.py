"""Named measurement protocols (``docs/protocols.md``): one place, one meaning.

A figure is meaningful only with its protocol, so every table the package prints names one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .errors import ConfigError
from .registry import Registry


@dataclass(frozen=True)
class Protocol:
    name: str
    calib_samples: int
    calib_seqlen: int
    calib_seed: int
    eval_seqlen: int
    eval_windows: Optional[int]  # None: all windows
    description: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


PROTOCOLS: Registry[Protocol] = Registry("protocol")
PROTOCOLS.register("quick")(Protocol(
    "quick", 32, 512, 0, 512, 40,
    "calibration 32 x 512 tokens (C4, seed 0); WikiText-2 test, first 40 windows of 512 tokens"))
PROTOCOLS.register("paper")(Protocol(
    "paper", 128, 2048, 0, 2048, None,
    "calibration 128 x 2048 tokens (C4, seed 0); WikiText-2 test, all windows of 2048 tokens"))
PROTOCOLS.register("scale")(Protocol(
    "scale", 8, 128, 0, 512, 4,
    "calibration 8 x 128 tokens (C4, seed 0); WikiText-2 test, first 4 windows of 512 tokens: memory and time "
    "at 7B and beyond on random-weight models (docs/scale.md); measures scaling, never quality"))
PROTOCOLS.register("test")(Protocol(
    "test", 4, 32, 0, 32, 4, "tiny numbers for unit tests; checks behaviour, not quality"))


def get_protocol(name_or_proto) -> Protocol:
    if isinstance(name_or_proto, Protocol):
        return name_or_proto
    return PROTOCOLS.get(name_or_proto)


def custom_protocol(base: str = "quick", **overrides) -> Protocol:
    p = get_protocol(base)
    bad = set(overrides) - set(asdict(p))
    if bad:
        raise ConfigError(f"unknown protocol fields {sorted(bad)}")
    d = asdict(p) | overrides | {"name": f"{p.name}+custom"}
    return Protocol(**d)
