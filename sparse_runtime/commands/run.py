"""``sparse-runtime run RECIPE.yaml``: run (or resume) a recipe."""
from __future__ import annotations

from pathlib import Path

from . import Command


def add_arguments(p):
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--model", default=None, help="override the recipe's model")
    p.add_argument("--data-dir", default=None, help="override the recipe's data directory")
    p.add_argument("--protocol", default=None, help="override the recipe's protocol (e.g. test: a smoke run on a tiny model)")
    p.add_argument("--fresh", action="store_true", help="ignore finished steps and run everything again")
    p.add_argument("--overwrite", action="store_true", help="stages may replace existing outputs")


def run(args) -> int:
    from ..recipe import Recipe, run_recipe

    recipe = Recipe.from_yaml(args.recipe)
    if args.model:
        recipe.model = args.model
    if args.data_dir:
        recipe.data_dir = args.data_dir
    if args.protocol:
        recipe.protocol = args.protocol
    work = Path(args.workdir or Path("runs") / recipe.name)
    _check_workdir(work)
    ctx = run_recipe(recipe, work, overwrite=args.overwrite, fresh=args.fresh)
    print(f"recipe {recipe.name!r} finished; outputs in {work}; final model: {ctx.model}")
    return 0


def _check_workdir(work: Path) -> None:
    """The run directory is a directory (existing: resumed) we can write, before any step runs."""
    from ..errors import ConfigError
    from ._common import check_output

    if work.exists() and not work.is_dir():
        raise ConfigError(f"--workdir {work} is a file, not a directory: choose another --workdir or remove the file")
    if not work.exists():
        check_output(work, flag="--workdir")


COMMAND = Command("run", "run a recipe (a YAML list of stages); resumes from the last finished step",
                  add_arguments, run)
