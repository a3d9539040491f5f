"""Monitor classes by name: a class with a default instance, not a global singleton.

A monitor folder declares its class with ``@register_monitor("name")``; a registry's
``discover(package)`` imports the folders of ``package`` and registers the classes
declared there, so a fresh ``MonitorRegistry`` can discover ``agent.monitors`` and any
extra package (a test's temporary one) without touching ``default_registry``. A test may
also ``registry.register`` classes directly. Duplicate names fail loudly.
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
            self.add(_named(cls, name, description))
            return cls

        return decorate

    def add(self, cls: type[BaseMonitor]) -> None:
        existing = self._classes.get(cls.name)
        # Re-registering the very same class (a module imported twice) is harmless.
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__, cls.__qualname__)
        if existing is not None and not same:
            raise DuplicateMonitorError(
                f"monitor name {cls.name!r} registered twice: {existing.__module__}."
                f"{existing.__qualname__} and {cls.__module__}.{cls.__qualname__}"
            )
        self._classes[cls.name] = cls

    def discover(self, package: str = "agent.monitors") -> None:
        """Import every sub-package (one folder per monitor) of ``package`` and register
        the classes their ``@register_monitor`` declared. Plain modules (the contract,
        the registry, the BCC base) are not monitors."""
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            if info.ispkg:
                importlib.import_module(info.name)
        for cls in list(_DECLARED):
            if cls.__module__.startswith(f"{package}."):
                self.add(cls)

    def get(self, name: str) -> type[BaseMonitor]:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[BaseMonitor]]:
        return iter(sorted(self._classes.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted(self._classes)


# Classes declared by @register_monitor, in import order: discover() registers those of
# its package.
_DECLARED: list[type[BaseMonitor]] = []


def _named(cls: M, name: str, description: str) -> M:
    cls.name = name
    doc_lines = (cls.__doc__ or "").strip().splitlines()
    cls.description = description or (doc_lines[0] if doc_lines else name)
    return cls


def register_monitor(name: str, description: str = "") -> Callable[[M], M]:
    """Declare a monitor class (in its folder's module); registries find it through
    ``discover()`` of the package holding the folder."""

    def decorate(cls: M) -> M:
        _DECLARED.append(_named(cls, name, description))
        return cls

    return decorate


default_registry = MonitorRegistry()


def discover_monitors() -> MonitorRegistry:
    default_registry.discover()
    return default_registry
