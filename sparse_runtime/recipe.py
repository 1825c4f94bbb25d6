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
output). Re-running the same recipe skips a finished step only when its key is unchanged and its
outputs still exist, so a failed run resumes from the last good step. The key (:func:`step_key`)
covers the step's own settings, the recipe's protocol and data directory, the identity of its input
model (the bytes of its sparsity manifest, or the names, sizes and times of a plain directory's
files) and the previous step's key: changing a step reruns it and every step after it. Stage names
and config keys are looked up in registries and dataclasses: nothing from a recipe file ever
becomes code.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .options import _coerce, make_config  # noqa: F401  (re-exported: older imports)
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
    prunes: bool = False  # makes the model sparse (an export before such a step exports the dense model)

    def run(self, ctx: StageContext, cfg: Any, out_dir: Path) -> StageResult:  # pragma: no cover
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("recipe stage")


def _discover_stages() -> None:
    import importlib
    import pkgutil

    from . import stages as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


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
        resolved = [(STAGES.get(name), make_config(STAGES.get(name).Config, cfg, f"step {i} ({name})"))
                    for i, (name, cfg) in enumerate(self.steps)]
        self._check_order(resolved)
        return resolved

    def _check_order(self, resolved: list[tuple[type[Stage], Any]]) -> None:
        """An ``export`` of the dense model placed before the step that prunes it is almost always a
        misordered recipe: refuse it unless the step says ``dense: true``."""
        from .manifest import MANIFEST_NAME

        if (Path(self.model) / MANIFEST_NAME).is_file():  # the input is already one of our checkpoints
            return
        first_prune = next((i for i, (cls, _) in enumerate(resolved) if cls.prunes), None)
        if first_prune is None:
            return
        for i, (cls, cfg) in enumerate(resolved[:first_prune]):
            if cls.name == "export" and not getattr(cfg, "dense", False):
                raise ConfigError(f"step {i} (export) comes before step {first_prune} "
                                  f"({resolved[first_prune][0].name}) and would export the dense model; move it after the pruning step, or set "
                                  "`dense: true` on it to export the dense model on purpose")


def run_recipe(recipe: Recipe, workdir: os.PathLike, *, overwrite: bool = False, fresh: bool = False) -> StageContext:
    resolved = recipe.validate()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(model=recipe.model, workdir=work, protocol=recipe.protocol, data_dir=recipe.data_dir,
                       overwrite=overwrite)
    previous_key = ""
    for i, ((name, raw), (stage_cls, cfg)) in enumerate(zip(recipe.steps, resolved)):
        step_dir = work / f"{i:02d}-{name}"
        marker = step_dir / "step.json"
        key = step_key(name, raw, ctx.model, previous_key, recipe.protocol, recipe.data_dir)
        previous_key = key
        record = {"stage": name, "config": raw, "input_model": ctx.model, "key": key}
        if marker.is_file() and not fresh:
            try:
                done = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                done = {}
            why = _why_not_done(done, record)
            if why is None:
                print(f"[{i}] {name}: done earlier, skipped (resume)")
                ctx.model = done.get("output_model") or ctx.model
                ctx.results.append(done)
                continue
            print(f"[{i}] {name}: rerun ({why})")
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
        record |= {"output_model": ctx.model, "metrics": result.metrics, "seconds": time.perf_counter() - t0,
                   "outputs": _outputs(record["input_model"], ctx.model, result.metrics, work)}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, marker)
        ctx.results.append(record)
    return ctx


def input_identity(model: str) -> str:
    """What a step's input is, beyond its name: the SHA-256 of a checkpoint's sparsity manifest (it
    changes whenever the checkpoint is rewritten: mask digests, creation time), or of the names,
    sizes and modification times of a plain directory's files; a model name is its own identity."""
    import hashlib

    from .manifest import MANIFEST_NAME

    p = Path(str(model))
    if not p.is_dir():
        return f"spec:{model}"
    h = hashlib.sha256()
    f = p / MANIFEST_NAME
    if f.is_file():
        h.update(f.read_bytes())
        return "manifest:" + h.hexdigest()
    for q in sorted(p.iterdir()):
        if q.is_file():
            st = q.stat()
            h.update(f"{q.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return "files:" + h.hexdigest()


def step_key(stage: str, config: dict[str, Any], input_model: str, previous_key: str, protocol: str,
             data_dir: Optional[str]) -> str:
    """The identity of one step's work: its settings, the run's protocol and data, its input's
    identity and the previous step's key (so a change reruns every later step)."""
    import hashlib

    payload = {"stage": stage, "config": config, "input_model": str(input_model),
               "input_identity": input_identity(input_model), "previous": previous_key,
               "protocol": protocol, "data_dir": data_dir}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _outputs(input_model: str, output_model: str, metrics: dict[str, Any], work: Path) -> list[str]:
    """Paths a step produced that a later run relies on: a new model directory and any path in its
    metrics that lies inside the run's directory."""
    out = []
    if output_model and output_model != input_model and Path(str(output_model)).exists():
        out.append(str(output_model))
    root = work.resolve()
    for v in (metrics or {}).values():
        if isinstance(v, str) and v and len(v) < 4096:
            p = Path(v)
            try:
                if p.exists() and root in p.resolve().parents and str(p) not in out:
                    out.append(str(p))
            except OSError:
                continue
    return out


def _why_not_done(done: dict[str, Any], record: dict[str, Any]) -> Optional[str]:
    """None when the finished step ``done`` can stand for ``record``; else the reason to rerun it."""
    if done.get("key") != record["key"]:
        return "its settings or its input changed" if done.get("key") else "recorded by an older version"
    missing = [p for p in done.get("outputs", []) if not Path(p).exists()]
    if missing:
        return f"its output {missing[0]} is missing"
    return None
