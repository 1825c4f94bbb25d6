"""The ``--dtype`` option of the engine commands (``generate``, ``bench``): the compute dtype an
engine loads the model in, checked against what each engine runs before anything is loaded."""
from __future__ import annotations

from typing import Optional

COMPUTE_DTYPES = ("float32", "bfloat16")


def add_dtype_argument(p) -> None:
    p.add_argument("--dtype", default=None, choices=COMPUTE_DTYPES,
                   help="compute dtype the engine loads the model in (default: the engine's own, float32 on CPU "
                        "engines); bfloat16 halves weight memory: sparse-cpu keeps bf16 packed values with fp32 "
                        "accumulation, lean-cpu / torch-cpu are the dense bf16 baselines")


def engine_dtype_options(engine: str, dtype: Optional[str]) -> dict:
    """``{"dtype": dtype}`` for ``engine``'s options ({} when not given); one line naming the fix
    when the engine cannot run it."""
    if dtype is None:
        return {}
    from ..errors import ConfigError
    from ..runtime import get_engine

    cls = get_engine(engine)
    dtypes = tuple(getattr(cls, "dtypes", ("float32",)))
    if dtype not in dtypes:
        from ..runtime import engine_names

        able = [n for n in engine_names() if dtype in getattr(get_engine(n), "dtypes", ("float32",))]
        raise ConfigError(f"engine {engine} runs {' or '.join(dtypes)}, not {dtype}: use --dtype {dtypes[0]}, or an "
                          f"engine that runs {dtype} ({', '.join(able)})")
    return {"dtype": dtype}
