"""Look-up by name: ``config.model.name = 'two_tower'`` imports ``bigvl.models.two_tower``.

A new model, task, evaluator or dataset is added by adding a file, never by editing a switch.
Unknown names raise :class:`bigvl.config.ConfigError` (exit status 2 in ``bigvl.main``).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from bigvl.config import ConfigError


def available(package: str) -> list[str]:
  pkg = importlib.import_module(f"bigvl.{package}")
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load(package: str, name: str, what: str | None = None) -> ModuleType:
  """Imports ``bigvl.<package>.<name>``; a name that is not a module there is a ConfigError."""
  if not isinstance(name, str) or name not in available(package):
    raise ConfigError(f"unknown {what or package} name {name!r}; known: "
                      f"{', '.join(available(package))}")
  return importlib.import_module(f"bigvl.{package}.{name}")
