"""Run the steps of a plan, each in its own memory cgroup with a cap the kernel enforces.

    python benchmarks/cgroup_run.py PLAN.yaml [--only NAME ...] [--name RESULT] [--dry-run]

A plan (YAML or JSON) names the result and lists the steps; ``cap`` and ``timeout_s`` may be set once
for all and per step, ``env`` adds variables (strings) to every step:

    name: scale_7b
    cap: 8GiB
    env: {SPARSE_RUNTIME_QUIET: "1"}
    notes: ["LLaMA-2-7B shapes, random fp32 weights (sparse-runtime synth)"]
    steps:
      - name: inspect-7b-fp32
        cmd: sparse-runtime inspect runs/llama2-7b-fp32 --summary
        cap: 1GiB
      - name: prune-wanda70
        cmd: [sparse-runtime, prune, runs/llama2-7b-fp32, --method, wanda, --sparsity, "0.7", --out, runs/w70]

Per step (sparse_runtime/measure/cgroup.py): wall time, exit code, the kernel's OOM kill, the peak of
anonymous memory (the figure the table compares with targets: what the step holds and cannot give
back) and the cgroup's own peak, which also counts the reclaimable page cache of the files it read.
Results: ``benchmarks/results/<name>.md`` and ``.json`` with the machine and versions, and each step's
output in ``benchmarks/results/<name>-logs/``. Swap is capped with memory (none on our machines).
Steps run one after another; a failed step is recorded and the next one runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def load_plan(path: Path) -> dict:
    """Read and check a plan: one line naming the fault for a bad one."""
    from sparse_runtime.measure.cgroup import parse_bytes
    from sparse_runtime.errors import ConfigError

    text = path.read_text()
    if path.suffix.lower() == ".json":
        plan = json.loads(text)
    else:
        import yaml

        plan = yaml.safe_load(text)
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list) or not plan["steps"]:
        raise ConfigError(f"{path}: a plan is a mapping with a non-empty 'steps' list")
    known = {"name", "cmd", "cap", "timeout_s", "env", "cwd"}
    for i, step in enumerate(plan["steps"]):
        if not isinstance(step, dict) or "cmd" not in step or "name" not in step:
            raise ConfigError(f"{path}: step {i + 1} needs 'name' and 'cmd'")
        extra = set(step) - known
        if extra:
            raise ConfigError(f"{path}: step {step['name']!r} has unknown keys {sorted(extra)}; known: {sorted(known)}")
        if step.get("cap", plan.get("cap")) is None:
            raise ConfigError(f"{path}: step {step['name']!r} has no cap (set 'cap' on it or on the plan)")
        parse_bytes(step.get("cap", plan.get("cap")))
    return plan


def run_plan(plan: dict, only: list[str], log_dir: Path, dry_run: bool = False, on_step=None) -> list[dict]:
    """Run the steps in order; ``on_step(results)`` after each one (the results are saved as they
    come, so a long plan that is stopped keeps what it measured)."""
    from sparse_runtime.measure.cgroup import parse_bytes, run_capped

    results = []
    env = dict(os.environ, **{str(k): str(v) for k, v in (plan.get("env") or {}).items()})
    for step in plan["steps"]:
        if only and step["name"] not in only:
            continue
        cap = parse_bytes(step.get("cap", plan.get("cap")))
        if dry_run:
            print(f"{step['name']}: cap {cap / MIB:.0f} MiB: {step['cmd']}")
            continue
        step_env = dict(env, **{str(k): str(v) for k, v in (step.get("env") or {}).items()})
        r = run_capped(step["cmd"], cap, step["name"], env=step_env, cwd=step.get("cwd") or ROOT,
                       timeout_s=step.get("timeout_s", plan.get("timeout_s")), log_dir=log_dir)
        print(f"{r['name']}: exit {r['exit_code']}{' (OOM kill)' if r['oom_killed'] else ''}, {r['wall_s']:.1f} s, "
              f"peak anon {r['peak_anon_bytes'] / MIB:.0f} MiB, cgroup peak {r['peak_bytes'] / MIB:.0f} MiB",
              flush=True)
        results.append(r)
        if on_step is not None:
            on_step(results)
    return results


def table_rows(results: list[dict]) -> list[dict]:
    return [{"step": r["name"], "cap MiB": round(r["cap_bytes"] / MIB), "ok": "yes" if r["ok"] else "no",
             "exit": r["exit_code"], "OOM kill": "yes" if r["oom_killed"] else "no",
             "wall s": round(r["wall_s"], 1), "peak anon MiB": round(r["peak_anon_bytes"] / MIB),
             "cgroup peak MiB": round(r["peak_bytes"] / MIB)} for r in results]


def main(argv=None) -> int:
    from sparse_runtime.measure.cgroup import cgroup_support
    from sparse_runtime.errors import SparseRuntimeError
    from sparse_runtime.report import save_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--only", nargs="*", default=[], help="run only these steps")
    ap.add_argument("--name", default=None, help="result name (default: the plan's 'name')")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--dry-run", action="store_true", help="check the plan and list the steps")
    a = ap.parse_args(argv)
    try:
        plan = load_plan(a.plan)
        name = a.name or plan.get("name") or a.plan.stem
        if not a.dry_run:
            cg, why = cgroup_support()
            if cg is None:
                raise SparseRuntimeError(f"cannot cap memory here: {why}")
        def save(results: list[dict]) -> None:
            notes = list(plan.get("notes") or []) + [
                f"each step in its own memory cgroup ({results[0]['cgroup'] if results else '?'}), cap enforced by "
                "the kernel; swap capped with memory",
                "peak anon = anonymous memory (memory.stat anon / v1 rss) polled every 50 ms: the figure compared "
                "with targets; cgroup peak = the group's own peak, which also counts reclaimable page cache of "
                "files read"]
            save_results(name, f"Capped runs: {name}", table_rows(results), protocol=plan.get("protocol", "cgroup-cap"),
                         model=plan.get("model", ""), notes=notes, out_dir=a.out_dir, extra={"steps": results})

        results = run_plan(plan, a.only, Path(a.out_dir) / f"{name}-logs", a.dry_run,
                           on_step=None if a.dry_run else save)
    except SparseRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        return 0
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
