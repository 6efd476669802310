"""Run a callback when a module finishes importing, without importing it ourselves.

``import starquant_plugin`` must stay fast, yet llm-compressor must know ``STaRQuantModifier``
before it parses a recipe, and lm-eval must know our model name before it looks one up.
Importing those frameworks eagerly costs seconds (and llm-compressor logs on import), so
registration is deferred: if the framework is already imported, the callback runs now;
otherwise a finder on ``sys.meta_path`` wraps the framework's loader and runs the callback
right after the framework's ``__init__`` has executed, whichever order the user imports in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks; the module keeps the real
    loader in ``__loader__``/``__spec__.loader`` so resource lookups are unaffected."""

    def __init__(self, loader: importlib.abc.Loader, callbacks: list[Callable[[], None]]):
        self._loader = loader
        self._callbacks = callbacks

    def __getattr__(self, name: str):
        # the rest of the real loader's interface (get_code for ``python -m``, is_package,
        # get_resource_reader, ...)
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for a watched module name it asks the other finders (once) and
    wraps the loader they return."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[], None]]] = {}

    def find_spec(self, fullname, path=None, target=None):
        callbacks = self.callbacks.pop(fullname, None)
        if callbacks is None:
            return None
        spec = importlib.util.find_spec(fullname)  # other finders; we no longer watch it
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CallbackLoader(spec.loader, callbacks)
        return spec


def _finder() -> _PostImportFinder:
    for finder in sys.meta_path:
        if type(finder).__name__ == _PostImportFinder.__name__ and hasattr(finder, "callbacks"):
            return finder
    finder = _PostImportFinder()
    sys.meta_path.insert(0, finder)
    return finder


def when_imported(module_name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once ``module_name`` (a module's full dotted name) is imported: now
    if it already is, else right after its code has run. A module that is never imported
    costs nothing, and neither does one whose import is blocked (``sys.modules[name] =
    None``). ``callback`` must be idempotent; the same function is queued once."""
    if module_name in sys.modules:
        if sys.modules[module_name] is not None:
            callback()
        return
    callbacks = _finder().callbacks.setdefault(module_name, [])
    if not any(getattr(c, "__qualname__", None) == callback.__qualname__
               and getattr(c, "__module__", None) == callback.__module__ for c in callbacks):
        callbacks.append(callback)


def half_imported(error: BaseException) -> bool:
    """Whether ``error`` says a module was used before its code had finished running (an
    import chain that is still in progress), rather than that something is missing."""
    return "partially initialized module" in str(error)


class _RetryAfterImports(importlib.abc.MetaPathFinder):
    """Wraps the loader of every module imported from now on, so that ``callback`` is retried
    right after each one's code has run, until it returns True; then it leaves
    ``sys.meta_path``."""

    def __init__(self, callback: Callable[[], bool]) -> None:
        self.callback = callback
        self._resolving: set[str] = set()
        self._running = False

    def retry(self) -> None:
        if self._running or self not in sys.meta_path:  # the callback's own imports
            return
        self._running = True
        try:
            done = self.callback()
        finally:
            self._running = False
        if done and self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders
        finally:
            self._resolving.discard(fullname)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, [self.retry])
        return spec


def retry_after_imports(callback: Callable[[], bool]) -> None:
    """Call ``callback()`` now and, until it returns True, again after every module imported
    from now on has run its code. For a registration that needs a framework imported and must
    wait out an import chain in progress (it returns False when it cannot run yet, e.g. on a
    ``half_imported`` error). ``callback`` is queued once."""
    if callback():
        return
    if not any(isinstance(finder, _RetryAfterImports) and finder.callback is callback
               for finder in sys.meta_path):
        sys.meta_path.insert(0, _RetryAfterImports(callback))
