"""Tangents kept only as seeds: a parameter's block of the seeded-chunk layout, regenerated a chunk at a time.

The dense tangent distributions lay a step's tangents out in seeded chunks (:mod:`.tangents`, :mod:`.rng`):
parameter p's *block* holds its k tangents ``(k, *p.shape)`` flattened, tangent i at entries
``[i numel(p), (i+1) numel(p))``, and the block's chunk c, its entries ``[c E, (c+1) E)``, is filled by a generator
of its own seeded ``base + chunk0(p) + c``. ``E`` is the RNG's chunk (random numbers) times the entries each random
number makes (1 for ``normal``; 32 for ``rademacher`` in float32, whose random words are unpacked into signs).
So any chunk can be regenerated alone, and a reader that needs entries ``[start, stop)`` of a block regenerates
only the chunks those entries lie in.

:class:`ChunkedTangent` is such a block. It is a :class:`~fwdgrad.engine.Regenerated` tangent (``dense()``
regenerates the whole block, as the aggregations' Gram matrix needs), and it adds what the zeroth-order
estimator uses to never hold a tangent: :meth:`ChunkedTangent.reader` (consecutive reads, one chunk of memory)
and :meth:`ChunkedTangent.combine` (``g_p = sum_i c_i v_i`` accumulated chunk by chunk; k = 1 regenerated in place
into the output). :func:`draw_chunked` draws a step's blocks exactly as the forward gradient draws its regenerated
ones (same base, same chunk ids), so with the same RNG chunk and seed both estimators use the same tangents.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from fwdgrad.engine import Regenerated
from fwdgrad.estimators.base import total_numel
from fwdgrad.estimators.tangents.distributions import (
    Block,
    ChunkedDistribution,
    TangentDraw,
    dense_tangent,
    plan_blocks,
)
from fwdgrad.estimators.tangents.rng import ChunkedRNG

__all__ = ["ChunkedTangent", "ChunkReader", "draw_chunked", "entries_per_random", "chunk_reads_exact"]

#: Length of the probe tensor used to ask a distribution how many entries one random number makes
#: (a multiple of every word width, so padding does not blur the ratio).
_PROBE = 1 << 12


def entries_per_random(dist: ChunkedDistribution, dtype: torch.dtype) -> int:
    """Block entries per random number of ``dist`` for parameters of ``dtype`` (normal: 1, rademacher: 32 in
    float32), asked from the distribution itself with a shape-only (meta) probe."""
    probe = torch.empty(_PROBE, dtype=dtype, device="meta")
    size = dist.block_size(1, probe)
    return max(1, size // max(1, dist.random_count(size, dtype)))


class ChunkedTangent(Regenerated):
    """The k tangents of one parameter as its block of the seeded-chunk layout (module docstring)."""

    def __init__(self, dist: ChunkedDistribution, rng: ChunkedRNG, block: Block, base: int, k: int) -> None:
        super().__init__(k, self._regenerate_all)
        self.dist, self.rng, self.block = dist, rng, block
        self.seed0 = base + block.chunk0
        #: entries of the block per chunk (E)
        self.entries = rng.chunk * entries_per_random(dist, block.param.dtype)

    @property
    def numel(self) -> int:
        """Entries of one tangent (the parameter's size)."""
        return self.block.param.numel()

    def new_buffer(self, n: int) -> Tensor:
        """An uninitialised 1-D buffer of ``n`` entries in the parameter's dtype and device."""
        return torch.empty(n, dtype=self.block.param.dtype, device=self.block.param.device)

    def fill(self, out: Tensor, chunk: int = 0) -> Tensor:
        """Regenerate the block's entries from chunk ``chunk`` on into the 1-D ``out`` (whole chunks, the last one
        possibly ending at the block's end); several chunks run on the RNG's thread pool."""
        jobs, finish = self.dist.fill_jobs(self.rng, out, self.seed0 + chunk)
        self.rng.run(jobs)
        if finish is not None:
            finish()
        return out

    def _regenerate_all(self) -> Tensor:
        buf = self.fill(self.new_buffer(self.block.size))
        return dense_tangent(self.dist.view(buf, self.k, self.block.param))

    def reader(self) -> "ChunkReader":
        """A reader for consecutive ranges of this block (create one per use; it caches one chunk)."""
        return ChunkReader(self)

    def combine(self, c: Tensor) -> Tensor:
        """``g_p = sum_i c_i v_i`` shaped like the parameter, regenerating each chunk of the block once.

        k = 1: the block is regenerated straight into the output buffer and scaled in place (no second buffer).
        k > 1: ``g_p`` starts at zero and each chunk, once regenerated, adds ``c_i`` times its part of tangent i
        (one chunk of memory beyond the output).
        """
        n, shape = self.numel, self.block.param.shape
        if self.k == 1:
            buf = self.fill(self.new_buffer(self.block.size))
            return buf[:n].view(shape).mul_(c[0].to(buf.dtype))
        out = torch.zeros(n, dtype=self.block.param.dtype, device=self.block.param.device)
        coef = [float(x) for x in c]
        for lo in range(0, min(self.block.size, self.k * n), self.entries):
            hi = min(lo + self.entries, self.block.size)
            buf = self.fill(self.new_buffer(hi - lo), lo // self.entries)
            for i in range(lo // n, min(self.k, -(-hi // n))):  # the tangents this chunk overlaps
                a, b = max(lo, i * n), min(hi, (i + 1) * n)
                out[a - i * n: b - i * n].add_(buf[a - lo: b - lo], alpha=coef[i])
        return out.view(shape)


class ChunkReader:
    """Consecutive reads of a :class:`ChunkedTangent`'s block.

    A read regenerates a whole chunk straight into the caller's buffer when the range covers it exactly, and
    otherwise copies from the chunk, which it keeps until a read moves past it, so that consecutive reads
    regenerate each chunk once: at most one chunk of memory.
    """

    def __init__(self, tangent: ChunkedTangent) -> None:
        self.tangent = tangent
        self._index = -1
        self._chunk: Optional[Tensor] = None

    def read(self, start: int, stop: int, out: Tensor) -> Tensor:
        """Write the block's entries ``[start, stop)`` into the contiguous 1-D ``out``; returns ``out``."""
        t, pos = self.tangent, start
        if not 0 <= start <= stop <= t.block.size:
            raise ValueError(f"entries [{start}, {stop}) are not within the block of {t.block.size} entries.")
        while pos < stop:
            c = pos // t.entries
            lo = c * t.entries
            hi = min(lo + t.entries, t.block.size)
            # whole chunks from here on: regenerated straight into place, in one call (parallel on the pool)
            whole = stop if stop == t.block.size else lo + (stop - lo) // t.entries * t.entries
            if pos == lo and whole > pos:
                t.fill(out[pos - start: whole - start], c)
                pos = whole
                continue
            end = min(stop, hi)
            out[pos - start: end - start].copy_(self._cached(c, hi - lo)[pos - lo: end - lo])
            pos = end
        return out

    def _cached(self, c: int, size: int) -> Tensor:
        if self._index != c:
            self._chunk = None  # free the previous chunk before regenerating the next
            self._chunk = self.tangent.fill(self.tangent.new_buffer(size), c)
            self._index = c
        assert self._chunk is not None
        return self._chunk


def draw_chunked(
    dist: ChunkedDistribution,
    params: Mapping[str, Tensor],
    k: int,
    generator: Callable[[torch.device], torch.Generator],
    rng: ChunkedRNG,
) -> TangentDraw:
    """A step's tangents as :class:`ChunkedTangent` blocks, nothing generated yet.

    One draw from the estimator's generator gives the step's base seed, as in
    :func:`~fwdgrad.estimators.tangents.distributions.draw_blocks`, and the blocks are planned by the same
    :func:`~fwdgrad.estimators.tangents.distributions.plan_blocks`: the same seed and RNG chunk give the same tangents.
    """
    first = next(iter(params.values()))
    base = int(torch.randint(0, 2**32, (1,), generator=generator(first.device)))
    tangents = {b.name: ChunkedTangent(dist, rng, b, base, k) for b in plan_blocks(dist, params, k, rng)}
    return TangentDraw(tangents, n=total_numel(dict(params)))


def chunk_reads_exact(dist: ChunkedDistribution, dtype: torch.dtype, device: torch.device, chunk: int = 64) -> bool:
    """Whether ``dist``'s chunks read alone reproduce its whole-block fill (for ``dtype`` on ``device``).

    True for the built-in distributions (a test checks it); a distribution registered later might fill a chunk
    in a way that depends on its neighbours, which chunk-wise reads would then get wrong. Checked on a probe
    block of 2.5 chunks of ``chunk`` random numbers (small: a few KiB), reading a range that starts and ends
    inside chunks.
    """
    rng = ChunkedRNG(chunk)
    e = rng.chunk * entries_per_random(dist, dtype)
    param = torch.empty(5 * e // 2 + 7, dtype=dtype, device=device)
    probe = ChunkedTangent(dist, rng, Block("probe", param, dist.block_size(1, param), 0), 0x5EED, 1)
    whole = probe.dense().reshape(-1)
    start, stop = e // 2 + 3, min(2 * e + 5, param.numel())
    part = probe.reader().read(start, stop, probe.new_buffer(stop - start))
    return bool(torch.equal(whole[start:stop], part))
