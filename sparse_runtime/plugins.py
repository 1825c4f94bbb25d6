"""Methods from outside the package: ``SPARSE_RUNTIME_PLUGINS=my_pruners,lab.allocators``.

A plugin is an ordinary Python module that registers what it defines when it is imported
(``@PRUNERS.register("toy-random")``, docs/architecture.md "Adding a method"). The modules to import
are named by the USER, in the environment of the process, as a comma-separated list; importing them
is what the user asked for. Nothing else names a module to import: a recipe or a config file only
names registered methods and their options, so a recipe cannot make the process run code it did not
already choose to load. A module that fails to import stops the run with one line naming it.
"""
from __future__ import annotations

import importlib
import os
import re

from .errors import ConfigError

ENV = "SPARSE_RUNTIME_PLUGINS"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def plugin_modules() -> list[str]:
    """The module names listed in ``$SPARSE_RUNTIME_PLUGINS`` (commas or whitespace between them)."""
    return [n for n in re.split(r"[,\s]+", os.environ.get(ENV, "")) if n]


def load_plugins() -> list[str]:
    """Import every module named in ``$SPARSE_RUNTIME_PLUGINS`` (each once; Python caches modules).
    Returns their names. Raises ConfigError, naming the module, when one cannot be imported."""
    names = plugin_modules()
    for name in names:
        if not _MODULE_NAME.match(name):
            raise ConfigError(f"{ENV}: {name!r} is not a Python module name (give dotted names separated by commas)")
        try:
            importlib.import_module(name)
        except ConfigError:
            raise
        except Exception as e:  # the plugin's own error, reported as one line
            raise ConfigError(f"{ENV}: cannot import plugin module {name!r} ({type(e).__name__}: {e}); fix it or "
                              f"remove it from {ENV}") from e
    return names
