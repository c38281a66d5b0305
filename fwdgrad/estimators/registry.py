"""A name -> object registry that new entries join by a decorator and that refuses duplicate names.

The tangent distributions (:data:`fwdgrad.estimators.tangents.distributions.TANGENT_DISTRIBUTIONS`) and the aggregations
(:data:`fwdgrad.estimators.aggregation.AGGREGATIONS`) are registries: a new one is registered where it is
defined, and every estimator that takes a name finds it, with no edit anywhere else (as nevergrad's optimizer
registry). A registry is filled at import time; it is a mapping, so ``name in REGISTRY``, ``list(REGISTRY)``
and ``REGISTRY[name]`` work as for a dict.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, MutableMapping, TypeVar

from fwdgrad.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F")


class Registry(MutableMapping[str, T], Generic[T]):
    """Named entries of one kind (``kind``: e.g. ``"aggregation"``, used in messages).

    ``coerce`` turns what is registered into the stored entry (e.g. a plain sampler function into a
    distribution object); by default the object itself is stored.
    """

    def __init__(self, kind: str, coerce: Callable[[Any], T] = lambda obj: obj) -> None:
        self.kind = kind
        self._coerce = coerce
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@REGISTRY.register("name")`` stores the decorated object under ``name``.

        Returns the object unchanged, so a decorated function or class stays usable under its own name.
        Raises ``ValueError`` if ``name`` is taken.
        """

        def decorate(obj: F) -> F:
            self[name] = obj
            return obj

        return decorate

    def lookup(self, name: str) -> T:
        """The entry called ``name``; :class:`~fwdgrad.errors.ConfigError` naming the allowed ones if none is."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self._entries)}.")
        return self._entries[name]

    def __setitem__(self, name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}.")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); register yours under "
                f"another name, or delete the old entry first (del registry[{name!r}])."
            )
        self._entries[name] = self._coerce(obj)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
