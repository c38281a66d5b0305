"""Tangent distributions (a registry), how a step's tangents are laid out and drawn, and the drawn result.

Every distribution has ``E[v] = 0`` and ``E[v v^T] = I`` over the whole parameter vector, which is all the
unbiasedness of ``g = <grad f, v> v`` needs (``E[g] = E[v v^T] grad f``).

Built-in distributions
----------------------
* ``normal``: i.i.d. N(0, 1) entries.
* ``rademacher``: i.i.d. +-1 entries (``|v|^2 = n`` exactly, lower variance than normal); the signs are
  unpacked from random bits, 16, 32 or 64 per random word (the float's width).
* ``rank1`` (structured): every parameter with >= 2 dims (an m x n weight; a conv kernel read as
  ``out x (in*kh*kw)``) gets ``V = u v^T`` with u ~ N(0, I_m), v ~ N(0, I_n) independent, kept as its factors
  (:class:`~fwdgrad.engine.RankOne`, never materialised by the estimator); other parameters get normal
  tangents. Unbiased: ``vec(u v^T) = v (x) u`` and ``E[(v (x) u)(v (x) u)^T] = E[v v^T] (x) E[u u^T] = I``.
  It needs m + n random numbers instead of m n, and a linear layer's tangent ``x V^T = (x v) u^T`` costs
  O(B (m + n)) instead of O(B m n). Its variance is in :mod:`fwdgrad.experiments.quality.structured`.

Adding a distribution (no edit to the estimator)
-----------------------------------------------
* a function ``sampler(shape, generator, dtype, device) -> Tensor`` drawing ``shape = (k, *param_shape)``
  tangents for one parameter tensor, decorated with ``@register_distribution("name")`` (it is wrapped in a
  :class:`SamplerDistribution` and called once per parameter tensor with the estimator's generator);
* a :class:`ChunkedDistribution` subclass, for the estimator's fast layout below (seeded chunks, reusable
  buffers, regenerated tangents), decorated the same way;
* a :class:`TangentDistribution` subclass overriding :meth:`~TangentDistribution.draw`, for tangents that are
  joint across parameter tensors (e.g. k mutually orthogonal tangents over the whole vector).

The chunked layout
------------------
One flat buffer per (device, dtype); in it, every parameter a contiguous block (its ``(k, *shape)`` tangents,
or for ``rank1`` weights ``k*m`` then ``k*n`` factor entries; rademacher blocks padded to whole random words).
Chunk ids run over the blocks in parameter order (:class:`~fwdgrad.estimators.tangents.rng.ChunkedRNG`: chunk c is
seeded ``base + c``, ``base`` one draw from the estimator's generator per step), so any block can be
regenerated alone, and which blocks are kept or regenerated never changes the numbers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fwdgrad.engine import RankOne, Regenerated, Tangent
from fwdgrad.estimators.registry import Registry
from fwdgrad.estimators.tangents import (
    rng as _rng,  # the module: its CHUNK is read at call time (a test may patch it)
)
from fwdgrad.estimators.tangents.rng import ChunkedRNG, ChunkJob

__all__ = [
    "TangentSampler",
    "TangentDraw",
    "DrawContext",
    "TangentDistribution",
    "SamplerDistribution",
    "ChunkedDistribution",
    "Normal",
    "Rademacher",
    "RankOneNormal",
    "Block",
    "plan_blocks",
    "draw_blocks",
    "TANGENT_DISTRIBUTIONS",
    "register_distribution",
    "dense_tangent",
]

#: ``sampler(shape, generator, dtype, device) -> Tensor`` drawing ``shape = (k, *param_shape)`` tangents whose
#: flattened rows have mean 0 and covariance I.
TangentSampler = Callable[[Tuple[int, ...], torch.Generator, torch.dtype, torch.device], Tensor]
#: Jobs filling a block, and what to run once they are done (e.g. unpacking random bits into signs).
FillJobs = Tuple[List[ChunkJob], Optional[Callable[[], object]]]


def dense_tangent(t: Tangent) -> Tensor:
    """The ``(k, *shape)`` tensor of a tangent (materialises rank-one factors, regenerates a Regenerated)."""
    return t if isinstance(t, Tensor) else t.dense()


@dataclass
class TangentDraw:
    """One step's tangents: per parameter a ``(k, *shape)`` tensor, a RankOne or a Regenerated.

    ``buffers`` are the flat buffers the dense tangents are views of, given only when ``owned``: they were
    allocated for this draw alone, so the estimate may be written into them and handed out. ``n`` is the
    number of scalar parameters (the tangents' dimension).
    """

    tangents: Dict[str, Tangent]
    buffers: List[Tensor] = field(default_factory=list)
    owned: bool = False
    n: Optional[int] = None

    def dense(self) -> Dict[str, Tensor]:
        """Every tangent as a ``(k, *shape)`` tensor."""
        return {name: dense_tangent(t) for name, t in self.tangents.items()}


@dataclass
class DrawContext:
    """What a distribution draws with, all owned by the estimator.

    ``generator(device)``: the estimator's seeded generator on a device. ``rng``: its chunked RNG.
    ``kept_blocks(bytes_per_block) -> int``: how many leading blocks to keep, the rest being regenerated
    (None: keep all). ``scratch``: buffers reused from step to step, by (device, dtype) (None: fresh buffers
    that the draw owns).
    """

    generator: Callable[[torch.device], torch.Generator]
    rng: ChunkedRNG
    kept_blocks: Optional[Callable[[Sequence[float]], int]] = None
    scratch: Optional[Dict[Tuple[torch.device, torch.dtype], Tensor]] = None


class TangentDistribution(ABC):
    """A distribution of tangents with ``E[v] = 0`` and ``E[v v^T] = I``."""

    @abstractmethod
    def draw(self, params: Mapping[str, Tensor], k: int, ctx: DrawContext) -> TangentDraw:
        """Draw k tangents for the parameters ``params`` (only their shapes, dtypes and devices matter)."""

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        """``shape = (k, *param_shape)`` materialised tangents for one parameter tensor."""
        raise TypeError(f"{type(self).__name__} draws jointly over all parameters; use draw().")

    def __call__(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
        return self.sample(shape, generator, dtype, device)


def _numel(params: Mapping[str, Tensor]) -> int:
    return int(sum(t.numel() for t in params.values()))


class SamplerDistribution(TangentDistribution):
    """A user's ``sampler(shape, generator, dtype, device)``, called once per parameter tensor."""

    def __init__(self, sampler: TangentSampler) -> None:
        self.sampler = sampler

    def draw(self, params: Mapping[str, Tensor], k: int, ctx: DrawContext) -> TangentDraw:
        tangents: Dict[str, Tangent] = {
            name: self.sampler((k, *t.shape), ctx.generator(t.device), t.dtype, t.device)
            for name, t in params.items()
        }
        return TangentDraw(tangents, n=_numel(params))

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        return self.sampler(shape, generator, dtype, device)

    def __repr__(self) -> str:
        return f"SamplerDistribution({getattr(self.sampler, '__qualname__', self.sampler)!r})"


class ChunkedDistribution(TangentDistribution):
    """Per-parameter blocks of one flat buffer per (device, dtype), filled in seeded chunks (module docstring).

    A subclass says how big a parameter's block is (:meth:`block_size`), how to fill it (:meth:`fill_jobs`)
    and how to read the tangents from it (:meth:`view`); :meth:`sample` is its per-tensor form, used when
    :meth:`supports` refuses the parameters.
    """

    #: True when a block *is* its parameter's ``(k, *shape)`` tangents: then a block can be regenerated from
    #: its seeds instead of kept, and a k = 1 estimate can be written into the buffer in place.
    dense_blocks: bool = True

    def supports(self, params: Mapping[str, Tensor]) -> bool:
        """Whether the chunked layout applies to these parameters (else :meth:`sample`, per tensor)."""
        return True

    def block_size(self, k: int, param: Tensor) -> int:
        """Entries of ``param``'s block in the flat buffer."""
        return k * param.numel()

    def random_count(self, size: int, dtype: torch.dtype) -> int:
        """Random numbers drawn for a block of ``size`` entries (what its chunk ids count)."""
        return size

    @abstractmethod
    def fill_jobs(self, rng: ChunkedRNG, block: Tensor, seed0: int) -> FillJobs:
        """Jobs filling the 1-D ``block`` from chunk id ``seed0`` on, and a finishing step (or None)."""

    def view(self, block: Tensor, k: int, param: Tensor) -> Tangent:
        """The tangents of ``param`` read from its filled block."""
        return block[: k * param.numel()].view(k, *param.shape)

    def draw(self, params: Mapping[str, Tensor], k: int, ctx: DrawContext) -> TangentDraw:
        if not self.supports(params):
            return SamplerDistribution(self.sample).draw(params, k, ctx)
        return draw_blocks(self, params, k, ctx)


# -- the chunked layout -------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Block:
    """A parameter's block: ``size`` entries of its (device, dtype) buffer, random chunks from ``chunk0`` on."""

    name: str
    param: Tensor
    size: int
    chunk0: int

    @property
    def nbytes(self) -> int:
        return self.size * self.param.element_size()


def plan_blocks(dist: ChunkedDistribution, params: Mapping[str, Tensor], k: int, rng: ChunkedRNG) -> List[Block]:
    """The blocks of ``params`` in order, chunk ids running on from one block to the next."""
    blocks, next_id = [], 0
    for name, t in params.items():
        size = dist.block_size(k, t)
        blocks.append(Block(name, t, size, next_id))
        next_id += rng.num_chunks(dist.random_count(size, t.dtype))
    return blocks


def _regenerate(dist: ChunkedDistribution, rng: ChunkedRNG, block: Block, base: int, k: int) -> Tensor:
    buf = torch.empty(block.size, dtype=block.param.dtype, device=block.param.device)
    jobs, finish = dist.fill_jobs(rng, buf, base + block.chunk0)
    rng.run(jobs)
    if finish is not None:
        finish()
    return dense_tangent(dist.view(buf, k, block.param))


def _buffer(key: Tuple[torch.device, torch.dtype], numel: int, scratch: Optional[Dict[Any, Tensor]]) -> Tensor:
    buf = scratch.get(key) if scratch is not None else None
    if buf is None or buf.numel() != numel:
        buf = torch.empty(numel, dtype=key[1], device=key[0])
        if scratch is not None:
            scratch[key] = buf
    return buf


def draw_blocks(dist: ChunkedDistribution, params: Mapping[str, Tensor], k: int, ctx: DrawContext) -> TangentDraw:
    """Draw ``params``' tangents in the chunked layout: the leading ``ctx.kept_blocks`` blocks into buffers
    (every chunk of every block filled in one parallel run), the rest as :class:`Regenerated`."""
    first = next(iter(params.values()))
    base = int(torch.randint(0, 2**32, (1,), generator=ctx.generator(first.device)))
    blocks = plan_blocks(dist, params, k, ctx.rng)
    kept = len(blocks)
    if ctx.kept_blocks is not None and dist.dense_blocks:
        kept = ctx.kept_blocks([b.nbytes for b in blocks])
    tangents: Dict[str, Tangent] = {
        b.name: Regenerated(k, partial(_regenerate, dist, ctx.rng, b, base, k)) for b in blocks[kept:]
    }
    groups: Dict[Tuple[torch.device, torch.dtype], List[Block]] = {}
    for b in blocks[:kept]:
        groups.setdefault((b.param.device, b.param.dtype), []).append(b)
    buffers, jobs, finish = [], [], []
    for key, group in groups.items():
        buf = _buffer(key, sum(b.size for b in group), ctx.scratch)
        buffers.append(buf)
        offset = 0
        for b in group:
            block = buf[offset: offset + b.size]
            block_jobs, done = dist.fill_jobs(ctx.rng, block, base + b.chunk0)
            jobs += block_jobs
            finish += [done] if done is not None else []
            tangents[b.name] = dist.view(block, k, b.param)
            offset += b.size
    ctx.rng.run(jobs)
    for done in finish:
        done()
    owned = ctx.scratch is None and dist.dense_blocks
    return TangentDraw({name: tangents[name] for name in params}, buffers if owned else [], owned, _numel(params))


# -- the registry and the built-in distributions ------------------------------------------------------------------
def _as_distribution(obj: Any) -> TangentDistribution:
    if isinstance(obj, TangentDistribution):
        return obj
    if isinstance(obj, type) and issubclass(obj, TangentDistribution):
        return obj()
    if callable(obj):
        return SamplerDistribution(obj)
    raise TypeError(f"a tangent distribution must be a TangentDistribution or a sampler function, got {obj!r}.")


#: Tangent distributions by name (a :class:`~fwdgrad.estimators.registry.Registry`; assigning or registering
#: a plain sampler function wraps it in a :class:`SamplerDistribution`).
TANGENT_DISTRIBUTIONS: Registry[TangentDistribution] = Registry("tangent distribution", _as_distribution)
#: ``@register_distribution("name")`` on a sampler function or a TangentDistribution subclass.
register_distribution = TANGENT_DISTRIBUTIONS.register


def _normal_op(b: Tensor, g: torch.Generator) -> Tensor:
    return b.normal_(generator=g)


@register_distribution("normal")
class Normal(ChunkedDistribution):
    """i.i.d. N(0, 1) entries."""

    def fill_jobs(self, rng: ChunkedRNG, block: Tensor, seed0: int) -> FillJobs:
        return rng.jobs(block, seed0, _normal_op), None

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)


# Integer type of the same width as each float type, and the bit pattern of +1.0 in it (sign bit clear).
_SIGN_BITS = {
    torch.float32: (torch.int32, 32, 0x3F800000),
    torch.float64: (torch.int64, 64, 0x3FF0000000000000),
    torch.float16: (torch.int16, 16, 0x3C00),
    torch.bfloat16: (torch.int16, 16, 0x3F80),
}


def _padded(numel: int, dtype: torch.dtype) -> int:
    w = _SIGN_BITS[dtype][1] if dtype in _SIGN_BITS else 1
    return -(-numel // w) * w


def _rademacher_words(buf: Tensor) -> Tuple[Tensor, Callable[[], Tensor]]:
    """For a 1-D float ``buf`` (length a multiple of w): the w-bit random words to fill, and the unpacking.

    Word bit j, shifted into the sign bit, becomes the sign of entry j; OR-ing in the bits of 1.0 makes every
    entry exactly +1.0 or -1.0. One random number per w entries (w = 16, 32 or 64) instead of one per entry,
    and three passes of cheap integer ops.
    """
    itype, w, one = _SIGN_BITS[buf.dtype]
    bits = buf.view(itype).view(-1, w)
    words = torch.empty(bits.shape[0], 1, dtype=itype, device=buf.device)

    def unpack() -> Tensor:
        shifts = torch.arange(w, dtype=itype, device=buf.device)
        torch.bitwise_left_shift(words, shifts, out=bits)
        return bits.bitwise_and_(-(2 ** (w - 1))).bitwise_or_(one).view(buf.dtype)

    return words.view(-1), unpack


def _word_op(dtype: torch.dtype) -> _rng.RandomOp:
    w = _SIGN_BITS[dtype][1]
    lo, hi = -(2 ** (w - 1)), (2 ** (w - 1) if w < 64 else None)  # all w bits uniform
    return lambda b, g: b.random_(lo, hi, generator=g)


@register_distribution("rademacher")
class Rademacher(ChunkedDistribution):
    """i.i.d. +-1 entries: mean 0, variance 1, and ``|v|^2 = n`` exactly; signs unpacked from random bits."""

    def supports(self, params: Mapping[str, Tensor]) -> bool:
        return all(t.dtype in _SIGN_BITS for t in params.values())  # e.g. not complex parameters

    def block_size(self, k: int, param: Tensor) -> int:
        return _padded(k * param.numel(), param.dtype)

    def random_count(self, size: int, dtype: torch.dtype) -> int:
        return size // _SIGN_BITS[dtype][1]

    def fill_jobs(self, rng: ChunkedRNG, block: Tensor, seed0: int) -> FillJobs:
        words, unpack = _rademacher_words(block)
        return rng.jobs(words, seed0, _word_op(block.dtype)), unpack

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        numel = math.prod(shape)
        if dtype not in _SIGN_BITS:
            return torch.empty(shape, dtype=dtype, device=device).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        buf = torch.empty(_padded(numel, dtype), dtype=dtype, device=device)
        words, unpack = _rademacher_words(buf)
        base = int(torch.randint(0, 2**32, (1,), generator=generator))
        _rng.run_serial(_rng.chunk_jobs(words, base, _word_op(dtype), _rng.CHUNK))
        unpack()
        return buf[:numel].view(shape)


@register_distribution("rank1")
class RankOneNormal(Normal):
    """Rank-one tangents ``u v^T`` (factors kept) for parameters with >= 2 dims, normal for the others."""

    dense_blocks = False  # factor blocks: nothing to regenerate (m + n numbers), and not the tangents themselves

    def block_size(self, k: int, param: Tensor) -> int:
        if param.dim() < 2:
            return k * param.numel()
        return k * (param.shape[0] + math.prod(param.shape[1:]))

    def view(self, block: Tensor, k: int, param: Tensor) -> Tangent:
        if param.dim() < 2:
            return super().view(block, k, param)
        m = param.shape[0]
        return RankOne(block[: k * m].view(k, m), block[k * m:].view(k, -1), tuple(param.shape))

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        k, pshape = shape[0], tuple(shape[1:])
        if len(pshape) < 2:
            return super().sample(shape, generator, dtype, device)
        u = torch.randn((k, pshape[0]), generator=generator, dtype=dtype, device=device)
        v = torch.randn((k, math.prod(pshape[1:])), generator=generator, dtype=dtype, device=device)
        return RankOne(u, v, pshape).dense()
