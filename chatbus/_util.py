"""The public surface's plumbing: public ``__module__`` names, no public constructors.

Owns what trio's ``_util`` does for it: :func:`fixup_module_metadata` (public classes
and functions say ``chatbus``, not ``chatbus._bus``) and :class:`NoPublicConstructor`
(objects made only by their ``open_*`` function). Imports nothing from chatbus.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

_T = TypeVar("_T")


def fixup_module_metadata(module_name: str, namespace: Mapping[str, object]) -> None:
    """Make every public name of ``namespace`` defined in chatbus claim ``module_name``.

    Also fixes ``__qualname__`` of their methods, so ``help()`` and tracebacks name
    the public path.
    """
    seen: set[int] = set()

    def fix(name: str, obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        module = getattr(obj, "__module__", None)
        if module is None or not module.startswith("chatbus."):
            return
        if module.split(".")[-1].startswith("_"):
            obj.__module__ = module_name
        if isinstance(obj, type):
            for attr_name, value in obj.__dict__.items():
                if callable(value) and getattr(value, "__module__", "") == module:
                    fix(attr_name, value)

    for name, obj in namespace.items():
        if not name.startswith("_"):
            fix(name, obj)


class NoPublicConstructor(type):
    """A metaclass whose classes cannot be called directly; use ``cls._create(...)``.

    For objects that only an ``open_*`` function may make (a :class:`chatbus.Bus` is
    made by :func:`chatbus.open_bus`): calling the class raises a TypeError that says
    so, instead of building an object whose tasks nobody runs.
    """

    def __call__(cls, *args: object, **kwargs: object) -> Any:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor;"
            " it is made by its open_* function"
        )

    def _create(cls: type[_T], *args: object, **kwargs: object) -> _T:
        made: _T = super().__call__(*args, **kwargs)  # type: ignore[misc]
        return made
