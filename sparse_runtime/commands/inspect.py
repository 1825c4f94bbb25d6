"""``sparse-runtime inspect MODEL``: per-layer and total sparsity, and N:M compliance."""
from __future__ import annotations

import json

from ._common import add_model_args
from . import Command


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    p.add_argument("--summary", action="store_true", help="only the totals, not every layer")


def run(args) -> int:
    from ..inspect import inspect_sparsity
    from ..models import load_model
    from ..report import markdown_table

    lm = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    rep = inspect_sparsity(lm.model, lm.family)
    if not args.summary:
        print(markdown_table(rep.rows()))
    manifest = "verified" if lm.manifest is not None else "none (plain model)"
    print(f"model: {lm.source} ({lm.family.name}); block linears: {len(rep.layers)}; "
          f"total sparsity: {rep.total:.4f}; N:M compliant everywhere: {', '.join(rep.nm_all) or 'no'}; "
          f"sparsity manifest: {manifest}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": lm.source, "total": rep.total, "nm_all": rep.nm_all, "layers": rep.rows()}, f, indent=1)
    return 0


COMMAND = Command("inspect", "print per-layer and total sparsity of the block linears and N:M compliance",
                  add_arguments, run)
