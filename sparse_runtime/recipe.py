"""The recipe runner: a YAML list of registered stages, each with a validated config dataclass.

```yaml
name: demo
model: smollm2-135m          # any load_model spec
protocol: quick              # default protocol for stages that measure
steps:
  - stage: evaluate
    zeroshot_limit: 50
  - stage: report
```

Each step runs in ``<workdir>/<NN>-<stage>/``; a step that transforms the model writes a checkpoint
(HF dir + sparsity manifest) there, and every finished step writes ``step.json`` (its config and
output). Re-running the same recipe skips finished steps whose config is unchanged, so a failed run
resumes from the last good step. Stage names and config keys are looked up in registries and
dataclasses: nothing from a recipe file ever becomes code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .registry import Registry


@dataclass
class StageContext:
    """What every stage sees: the current model spec (a path or a name), the run's settings, and
    the results gathered so far (for the report)."""

    model: str
    workdir: Path
    protocol: str = "quick"
    data_dir: Optional[str] = None
    results: list[dict[str, Any]] = field(default_factory=list)
    overwrite: bool = False


@dataclass
class StageResult:
    model: Optional[str] = None  # new model spec (a checkpoint dir) if the stage transformed it
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Base class: subclasses set ``name`` and ``Config`` (a dataclass) and implement ``run``."""

    name: str = ""
    Config: type = object
    writes_checkpoint: bool = False

    def run(self, ctx: StageContext, cfg: Any, out_dir: Path) -> StageResult:  # pragma: no cover
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("recipe stage")


def _discover_stages() -> None:
    import importlib
    import pkgutil

    from . import stages as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


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
    return value


def make_config(cls: type, data: dict[str, Any], where: str):
    """Build a config dataclass from a mapping, rejecting unknown keys and wrong types."""
    if not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints.get(k, Any), v, f"{where}.{k}") for k, v in data.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


@dataclass
class Recipe:
    name: str
    model: str
    steps: list[tuple[str, dict[str, Any]]]
    protocol: str = "quick"
    data_dir: Optional[str] = None

    @classmethod
    def from_yaml(cls, path: os.PathLike) -> "Recipe":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML: {e}") from e
        return cls.from_dict(data, str(p))

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict) or "steps" not in data:
            raise ConfigError(f"{where}: a recipe is a mapping with 'steps' (a list of {{stage: NAME, ...}})")
        unknown = set(data) - {"name", "model", "steps", "protocol", "data_dir"}
        if unknown:
            raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}")
        steps = []
        for i, s in enumerate(data["steps"]):
            if not isinstance(s, dict) or "stage" not in s:
                raise ConfigError(f"{where}: step {i} needs a 'stage' key")
            s = dict(s)
            steps.append((str(s.pop("stage")), s))
        from .models.loading import DEFAULT_MODEL

        return cls(name=str(data.get("name", Path(where).stem)), model=str(data.get("model", DEFAULT_MODEL)),
                   steps=steps, protocol=str(data.get("protocol", "quick")), data_dir=data.get("data_dir"))

    def validate(self) -> list[tuple[type[Stage], Any]]:
        """Resolve every stage and config before any work is done."""
        _discover_stages()
        from .protocols import get_protocol

        get_protocol(self.protocol)
        return [(STAGES.get(name), make_config(STAGES.get(name).Config, cfg, f"step {i} ({name})"))
                for i, (name, cfg) in enumerate(self.steps)]


def run_recipe(recipe: Recipe, workdir: os.PathLike, *, overwrite: bool = False, fresh: bool = False) -> StageContext:
    resolved = recipe.validate()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(model=recipe.model, workdir=work, protocol=recipe.protocol, data_dir=recipe.data_dir,
                       overwrite=overwrite)
    for i, ((name, raw), (stage_cls, cfg)) in enumerate(zip(recipe.steps, resolved)):
        step_dir = work / f"{i:02d}-{name}"
        marker = step_dir / "step.json"
        record = {"stage": name, "config": raw, "input_model": ctx.model}
        if marker.is_file() and not fresh:
            done = json.loads(marker.read_text())
            if {k: done.get(k) for k in record} == record:
                print(f"[{i}] {name}: done earlier, skipped (resume)")
                ctx.model = done.get("output_model") or ctx.model
                ctx.results.append(done)
                continue
        print(f"[{i}] {name} ...")
        t0 = time.perf_counter()
        stage = stage_cls()
        if step_dir.exists():
            import shutil

            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
        result = stage.run(ctx, cfg, step_dir)
        if result.model:
            ctx.model = result.model
        record |= {"output_model": ctx.model, "metrics": result.metrics, "seconds": time.perf_counter() - t0}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, marker)
        ctx.results.append(record)
    return ctx
