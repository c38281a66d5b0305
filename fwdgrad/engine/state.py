"""The state of one forward-mode pass, created by each :func:`~fwdgrad.engine.forward_tangents` call.

Nothing about a pass lives in module globals: the mode owns a :class:`PassState` and hands it to every rule.
So two threads can run passes at the same time (torch keeps the TorchFunctionMode stack per thread), and a
pass can run inside another one (a loss that itself calls ``forward_tangents``): each pass stores its
tangents under its own attribute name, so neither pass ever reads the other's tangents.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor

from fwdgrad.engine.tangent_types import Tangent
from fwdgrad.errors import Unsupported

__all__ = ["PassState"]


class PassState:
    """Where one pass keeps its tangents, and what it measures.

    Attributes:
        attr: the attribute under which this pass hangs tangents off primal tensors. It is unique per pass
            (64 random bits, never reused the way ``id()`` values are), so a tensor carrying the tangents of
            another pass, or of a finished one, carries none for this pass.
        stats: the caller's dict, or ``None``; receives ``max_bytes_per_tangent``, the largest intermediate
            tangent of the pass divided by k.
    """

    __slots__ = ("attr", "stats", "params")

    def __init__(self, stats: Optional[Dict[str, float]] = None) -> None:
        self.attr = "_fwdgrad_tangents_" + os.urandom(8).hex()
        self.stats = stats
        #: ids of the pass's parameter aliases (they share the caller's storage: never written in place)
        self.params: frozenset = frozenset()
        if stats is not None:
            stats["max_bytes_per_tangent"] = 0.0

    def tangent(self, x: Any) -> Optional[Tangent]:
        """The tangents of ``x`` in this pass (``None`` for non-tensors and tensors without: zero)."""
        return getattr(x, self.attr, None) if isinstance(x, Tensor) else None

    def attach(self, out: Tensor, t: Optional[Tangent]) -> Tensor:
        """Hang the tangents ``t`` off the fresh output ``out`` (and measure them); returns ``out``."""
        if t is not None:
            setattr(out, self.attr, t)
            stats = self.stats
            if stats is not None and isinstance(t, Tensor) and t.dim() > 0:
                per = t.numel() * t.element_size() / t.shape[0]
                if per > stats["max_bytes_per_tangent"]:
                    stats["max_bytes_per_tangent"] = per
        return out

    def check_in_place(self, x: Tensor, name: str) -> None:
        """Refuse (:class:`~fwdgrad.errors.Unsupported`, before anything is written) an in-place op on ``x`` that
        the pass cannot follow exactly: on a view (its base's tangent would not be updated) or on a parameter
        (the caller's tensor would be changed)."""
        if x._is_view() or id(x) in self.params:
            what = "a view" if x._is_view() else "a parameter"
            raise Unsupported(f"in-place {name} on {what} of a tangent-carrying tensor")

    def carries(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """Whether any tensor argument (or tensor in a list/tuple argument), positional or keyword, has tangents
        in this pass (``torch.cat(tensors=[w, 2 * w])`` passes its tensors in a list by keyword)."""
        attr = self.attr
        for group in (args, kwargs.values()):
            for a in group:
                if isinstance(a, Tensor):
                    if hasattr(a, attr):
                        return True
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if isinstance(b, Tensor) and hasattr(b, attr):
                            return True
        return False
