"""The memory policy of the fast path: which tangents are kept or regenerated, and how many share a pass.

Both decisions depend on how much memory the forward pass itself takes, which is only known once a pass has
run. :class:`TangentMemoryPolicy` therefore carries one number from call to call, explicitly:
``bytes_per_tangent``, the largest intermediate tangent of the last fast pass divided by the number of
tangents in it (what :func:`fwdgrad.engine.forward_tangents` reports). It is ``None`` before the first pass,
and then the policy takes the leanest choices: regenerate every tangent (k = 1), probe with a group of one
tangent (k > 1). Neither decision ever changes the estimates, only speed and peak memory.

(Peak-memory *measurement* lives in :mod:`fwdgrad.memory`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from fwdgrad.errors import ConfigError

__all__ = ["PASS_TENSORS", "kept_prefix", "TangentMemoryPolicy"]

#: Tangent-sized tensors a forward-mode layer holds at once: its input and output, each with its tangent.
PASS_TENSORS = 4


def kept_prefix(sizes: Sequence[float], pass_bytes: float) -> int:
    """The fewest regenerated tangents that bring a k = 1 step's peak memory within one block of its floor.

    ``sizes``: bytes of each parameter's tangent block, in the order the forward pass uses them (n = their
    sum); ``pass_bytes``: the pass's own working memory T. Any step needs the n-byte estimate at the end
    and T during the pass, so its peak is at least ``max(n, T)``. Keeping the first blocks (K bytes) and
    regenerating the rest, the peak is about

        max(n, K + T + b),   b = the largest regenerated block (drawn while its layer runs),

    and ``n + T`` when nothing is regenerated. Returns the largest number of leading blocks to keep such
    that this is at most ``max(n, T) + max(sizes)``: within one parameter tensor of the floor, with as few
    random numbers drawn twice as that allows (none when the pass is small next to the parameters'
    largest tensor, all when the pass dominates).
    """
    if not sizes:
        return 0
    n = float(sum(sizes))
    bound = max(n, pass_bytes) + max(sizes)
    if n + pass_bytes <= bound:
        return len(sizes)
    kept, tail_max = float(n), 0.0
    for i in range(len(sizes) - 1, -1, -1):  # grow the regenerated tail until the bound holds
        kept -= sizes[i]
        tail_max = max(tail_max, sizes[i])
        if kept + pass_bytes + tail_max <= bound:
            return i
    return 0  # unreachable: with everything regenerated the peak is max(n, T + b) <= bound


@dataclass
class TangentMemoryPolicy:
    """Kept/regenerated tangents (k = 1) and tangent groups under a memory budget (k > 1).

    Args:
        num_tangents: k.
        regenerate: ``True``: regenerate every tangent block when its layer needs it (and again for the
            estimate). ``False``: keep them all. ``"auto"``: with k = 1, keep the leading blocks and regenerate
            a tail (:func:`kept_prefix` with the pass's memory ``PASS_TENSORS * bytes_per_tangent``); with
            k > 1 keep all.
        max_tangent_mib: run the k tangents in groups so that no intermediate tangent exceeds about this
            many MiB (each group repeats the primal pass).
        bytes_per_tangent: the state carried between calls (module docstring); None until a pass has run.
    """

    num_tangents: int = 1
    regenerate: Union[bool, str] = "auto"
    max_tangent_mib: float = 256.0
    bytes_per_tangent: Optional[float] = None

    def __post_init__(self) -> None:
        if self.regenerate not in (True, False, "auto"):
            raise ConfigError(f"regenerate_tangents must be true, false or 'auto', got {self.regenerate!r}.")
        if self.regenerate != "auto":
            self.regenerate = bool(self.regenerate)
        if not self.max_tangent_mib > 0:
            raise ConfigError(
                f"max_tangent_mib must be > 0 (MiB per intermediate tangent), got {self.max_tangent_mib!r}."
            )
        self.max_tangent_mib = float(self.max_tangent_mib)

    def kept_blocks(self, sizes: Sequence[float]) -> int:
        """How many leading tangent blocks (``sizes``: bytes per parameter, in order) to keep through the
        pass; the rest are regenerated."""
        if self.regenerate is True:
            return 0
        if self.regenerate is False or self.num_tangents > 1:
            return len(sizes)
        if self.bytes_per_tangent is None:
            return 0  # first call: nothing measured yet, regenerate all (the leanest choice)
        return kept_prefix(sizes, PASS_TENSORS * self.bytes_per_tangent)

    def group_size(self, remaining: int, bytes_per_tangent: Optional[float]) -> int:
        """Tangents in the next pass: as many as fit ``max_tangent_mib`` at ``bytes_per_tangent`` (the latest
        measurement; None: probe with one), at least one and at most ``remaining``."""
        if bytes_per_tangent is None:
            return 1
        budget = self.max_tangent_mib * 2**20
        return max(1, min(remaining, int(budget // max(bytes_per_tangent, 1.0))))

    def record(self, bytes_per_tangent: float) -> None:
        """Store the largest intermediate tangent (bytes per tangent) of this call's passes for the next call."""
        self.bytes_per_tangent = float(bytes_per_tangent)
