"""Tables, machine descriptions and result files: how every figure leaves the package.

A figure means something only with its protocol, versions and machine, so :func:`save_results`
always writes them beside the table (markdown for people, JSON for tools).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma", "neon", "asimd", "sve")


def machine_info() -> dict[str, Any]:
    """CPU model and the ISA flags that decide kernel paths and engine behaviour."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python": platform.python_version(), "cores": os.cpu_count()}
    cpu, flags = "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = set(m.group(2).split()) if m else set()
    except OSError:
        pass
    info["cpu"] = cpu
    info["isa"] = [f for f in ISA_FLAGS if f in flags]
    info["isa_summary"] = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else
                           "NEON" if flags & {"neon", "asimd"} else "baseline")
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def versions() -> dict[str, str]:
    from .manifest import package_versions

    return package_versions()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5 or (0 < abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.2f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def header_lines(title: str, protocol: str, model: str = "", notes: Iterable[str] = (),
                 measured: Optional[dict[str, Any]] = None) -> list[str]:
    """``measured`` = the source run's saved ``machine``/``versions``/``date`` for a table derived
    from another machine's results (the header then names that machine, not this one)."""
    m = (measured or {}).get("machine") or machine_info()
    v = (measured or {}).get("versions") or versions()
    date = (measured or {}).get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# {title}", "",
             f"- protocol: {protocol}",
             *( [f"- model: {model}"] if model else [] ),
             f"- machine: CPU {m['cpu']} ({m['isa_summary']}; flags {', '.join(m['isa']) or 'none'}), "
             f"{m['cores']} cores, torch threads {m.get('torch_threads')}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- date: {date}" + (" (of the source run)" if measured else "")]
    lines += [f"- {n}" for n in notes]
    return lines + [""]


def save_results(name: str, title: str, rows: Sequence[dict[str, Any]], *, protocol: str, model: str = "",
                 notes: Iterable[str] = (), columns: Optional[Sequence[str]] = None,
                 out_dir: os.PathLike = "benchmarks/results", extra: Optional[dict[str, Any]] = None,
                 measured: Optional[dict[str, Any]] = None) -> Path:
    """Write ``<out_dir>/<name>.md`` and ``.json`` (atomically) and print the table. ``measured``:
    see :func:`header_lines` (for tables derived from a saved run on another machine)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    md = "\n".join(header_lines(title, protocol, model, notes, measured)) + "\n" + markdown_table(rows, columns)
    payload = {"title": title, "protocol": protocol, "model": model, "notes": notes,
               "machine": (measured or {}).get("machine") or machine_info(),
               "versions": (measured or {}).get("versions") or versions(), "rows": list(rows), **(extra or {})}
    for suffix, text in ((".md", md), (".json", json.dumps(payload, indent=1, default=str))):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{name}{suffix}")
    print(md)
    return out / f"{name}.md"
