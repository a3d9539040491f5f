"""Monitor classes by name: a class with a default instance, not a global singleton.

``@register_monitor("name")`` registers into ``default_registry``; a test builds a fresh
``MonitorRegistry`` and registers into that. Duplicate names fail loudly at import.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import TypeVar

from agent.monitors.contract import BaseMonitor


class DuplicateMonitorError(Exception):
    pass


M = TypeVar("M", bound=type[BaseMonitor])


class MonitorRegistry:
    """Monitor classes by name. A fresh instance per test; ``default_registry`` for the app."""

    def __init__(self) -> None:
        self._classes: dict[str, type[BaseMonitor]] = {}

    def register(self, name: str, description: str = "") -> Callable[[M], M]:
        def decorate(cls: M) -> M:
            existing = self._classes.get(name)
            # Re-registering the very same class (a module imported twice) is harmless.
            same = existing is not None and (existing.__module__, existing.__qualname__) == (
                cls.__module__, cls.__qualname__)
            if existing is not None and not same:
                raise DuplicateMonitorError(
                    f"monitor name {name!r} registered twice: {existing.__module__}."
                    f"{existing.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                )
            cls.name = name
            doc_lines = (cls.__doc__ or "").strip().splitlines()
            cls.description = description or (doc_lines[0] if doc_lines else name)
            self._classes[name] = cls
            return cls

        return decorate

    def discover(self, package: str = "agent.monitors") -> None:
        """Import every sub-package (one folder per monitor) of ``package`` so that their
        ``@register_monitor`` decorators run. Plain modules (the contract, the registry, the
        BCC base) are not monitors."""
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            if info.ispkg:
                importlib.import_module(info.name)

    def get(self, name: str) -> type[BaseMonitor]:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[BaseMonitor]]:
        return iter(sorted(self._classes.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted(self._classes)


default_registry = MonitorRegistry()
register_monitor = default_registry.register


def discover_monitors() -> MonitorRegistry:
    default_registry.discover()
    return default_registry
