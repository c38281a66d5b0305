"""Counter-based normal tangents: every entry a function of its seed and position, drawn by one parallel kernel.

torch's CPU generator (mt19937) is sequential, so a dense tangent of n numbers is drawn on one core (the chunked
RNG's thread pool helps only while OpenMP's idle workers leave it a core). Here entry ``i`` of a block whose chunk
ids start at ``seed0`` is computed from ``(seed0, i)`` alone, as counter-based generators do (Salmon et al. 2011):

    c = i // E, j = i mod E          (E = the chunked RNG's chunk)
    key = seed0 + c (mod 2^32),  k1 = H(key),  k2 = H(key ^ 0x5bd1e995)
    a = H(H(2j + k1) ^ k2),  b = H(H(2j + 1 + k1) ^ k2)
    u1 = ((a >> 8) + 1/2) / 2^24 in (0, 1),  u2 = (b >> 8) / 2^24 in [0, 1)
    entry i = sqrt(-2 ln u1) cos(2 pi u2)                       (Box-Muller's first output: N(0, 1))

``H`` is ``lowbias32`` (C. Wellons' hash prospector), a bijection of 32-bit words with low avalanche bias; with
the key entering twice, two chunks' streams are unrelated (not shifted copies of one sequence). Each entry has
its own two uniforms (Box-Muller's second output, ``sin``, is not used: the entry is then one loop iteration with
no neighbour, and the kernel writes the block in place). Each uniform has 24 random bits, so
``|z| <= sqrt(2 ln 2^25) = 5.9`` (a standard normal exceeds that with probability 4e-9).

Because an entry depends only on its chunk's seed and its place in the chunk, the layout's guarantees hold as for
the built-in ``normal``: the numbers never depend on the thread count, and any chunk or block regenerated alone
equals the same entries of a whole fill. The stream is not ``normal``'s: the same seed gives other (equally
distributed) tangents.

On the CPU, with a chunk that is a power of two (the default ``2^19``: the division is a shift), the formula runs as
one ``torch.compile``-d kernel (inductor: a fused loop, vectorised, split across torch's threads, writing the
block in place; compiled on the first draw, which takes seconds, and again when the thread count changes). The
first compiled fill is checked against the eager formula; if compiling fails or the two disagree (inductor has
been seen to multiply 64-bit integers wrongly; the kernel uses 32-bit integers only), a warning says so and the
eager formula (the same integers, so the same numbers up to rounding in the last bit) is used from then on. On
other devices, and for chunks of other sizes, the eager formula runs (elementwise ops; parallel, but several passes
over memory).
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from fwdgrad.errors import ConfigError
from fwdgrad.estimators.tangents import (
    rng as _rng,  # the module: its CHUNK is read at call time (a test may patch it)
)
from fwdgrad.estimators.tangents.distributions import ChunkedDistribution, FillJobs, register_distribution
from fwdgrad.estimators.tangents.rng import ChunkedRNG

__all__ = ["CounterNormal", "counter_normal_", "hash32"]

_MASK16, _MASK17, _MASK24 = 0xFFFF, 0x1FFFF, 0xFFFFFF
_MAX_PIECE = 1 << 30  # entries one kernel call fills (its int32 indices, doubled, stay below 2^31)


def _i32(v: int) -> int:
    """The int32 with the bits of the 32-bit word ``v`` (two's complement)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


_M1, _M2, _KEY2 = _i32(0x7FEB352D), _i32(0x846CA68B), _i32(0x5BD1E995)


def hash32(x: Tensor) -> Tensor:
    """``lowbias32`` on int32 words: xor-shift, multiply, xor-shift, multiply, xor-shift (multiplication wraps
    mod 2^32; the masks make ``>>`` a logical shift)."""
    x = x ^ ((x >> 16) & _MASK16)
    x = x * _M1
    x = x ^ ((x >> 15) & _MASK17)
    x = x * _M2
    return x ^ ((x >> 16) & _MASK16)


def _normal_of(key: Tensor, j: Tensor) -> Tensor:
    """The entries at places ``j`` of the chunks seeded ``key`` (int32 tensors; module docstring)."""
    j2 = j * 2
    k1, k2 = hash32(key), hash32(key ^ _KEY2)
    a = hash32(hash32(j2 + k1) ^ k2)
    b = hash32(hash32(j2 + 1 + k1) ^ k2)
    u1 = (((a >> 8) & _MASK24).float() + 0.5) * (1.0 / 16777216)  # (0, 1): 2^24 values
    theta = ((b >> 8) & _MASK24).float() * (6.283185307179586 / 16777216)  # 2 pi u2, u2 in [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def counter_normal_(out: Tensor, seed0: Union[Tensor, int], chunk: int) -> Tensor:
    """Fill the 1-D ``out`` with the block whose chunks (of ``chunk`` entries) have seeds from ``seed0`` on (an
    int32 0-dim tensor or an int in the int32 range; int32 arithmetic wraps mod 2^32). The reference formula, in
    eager torch ops."""
    i = torch.arange(out.numel(), dtype=torch.int32, device=out.device)
    c = i // chunk
    return out.copy_(_normal_of(c + seed0, i - c * chunk))


def _counter_normal_pow2_(out: Tensor, seed0: Tensor, log_chunk: int) -> Tensor:
    """:func:`counter_normal_` for chunks of ``2**log_chunk`` entries: a shift and a mask instead of a division,
    which inductor vectorises (compiled by :class:`CounterNormal` into one loop writing ``out`` in place)."""
    i = torch.arange(out.numel(), dtype=torch.int32, device=out.device)
    return out.copy_(_normal_of((i >> log_chunk) + seed0, i & ((1 << log_chunk) - 1)))


Kernel = Callable[[Tensor, Tensor, int], Tensor]


@register_distribution("counter_normal")
class CounterNormal(ChunkedDistribution):
    """i.i.d. N(0, 1) entries from a counter-based generator (module docstring): the built-in ``normal``'s
    distribution and layout, another random stream, drawn in parallel."""

    def __init__(self) -> None:
        self._kernel: Optional[Kernel] = None  # the compiled CPU kernel, checked on its first fill
        self._checked = False

    def fill_jobs(self, rng: ChunkedRNG, block: Tensor, seed0: int) -> FillJobs:
        return [], lambda: self.fill(block, seed0, rng.chunk)

    def fill(self, block: Tensor, seed0: int, chunk: int) -> Tensor:
        """Fill the 1-D ``block`` (chunk ids from ``seed0``, chunks of ``chunk`` entries)."""
        if not 1 <= chunk <= _MAX_PIECE:
            raise ConfigError(f"counter_normal tangents need a chunk of 1 to 2^30 entries (int32 indices), got "
                              f"{chunk}; use e.g. {1 << 19}.")
        piece = _MAX_PIECE // chunk * chunk
        if block.numel() > piece:  # int32 indices: pieces of at most 2^30 entries, a whole number of chunks each
            for start in range(0, block.numel(), piece):
                self.fill(block[start:start + piece], seed0 + start // chunk, chunk)
            return block
        # outside any TorchFunctionMode (a regenerated tangent is drawn inside the forward-mode pass's): the
        # kernel sees plain tensors only, and dynamo would otherwise trace the mode's handler at every op
        with torch._C.DisableTorchFunction(), torch.no_grad():
            pow2 = chunk & (chunk - 1) == 0
            kernel = self._cpu_kernel() if pow2 and block.device.type == "cpu" and block.numel() > 0 else None
            if kernel is None:  # another device (elementwise ops, parallel there), or a chunk of another size
                return counter_normal_(block, _i32(seed0), chunk)  # a Python int: no host-to-device copy
            seed = torch.tensor(_i32(seed0), dtype=torch.int32)  # a tensor: the compiled kernel is not re-specialised
            log_chunk = chunk.bit_length() - 1
            try:
                kernel(block, seed, log_chunk)
            except Exception as err:  # e.g. no C++ compiler: the eager formula, said once
                self._fall_back(f"compiling it failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
                return counter_normal_(block, seed, chunk)
            if not self._checked:  # the first compiled fill against the reference formula
                self._checked = True
                eager = counter_normal_(torch.empty_like(block), seed, chunk)
                if not torch.allclose(block, eager, rtol=1e-4, atol=1e-5):
                    self._fall_back("the compiled kernel disagrees with the eager formula")
                    block.copy_(eager)
        return block

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        base = int(torch.randint(0, 2**32, (1,), generator=generator, device=device))
        self.fill(out.view(-1), base, _rng.CHUNK)
        return out

    def _cpu_kernel(self) -> Optional[Kernel]:
        if self._kernel is None and not self._checked:
            self._kernel = torch.compile(_counter_normal_pow2_, dynamic=True)
        return self._kernel

    def _fall_back(self, why: str) -> None:
        self._kernel, self._checked = None, True
        warnings.warn(f"counter_normal tangents: {why}; drawing them with the eager formula from now on (the same "
                      "numbers up to rounding, several times slower).", RuntimeWarning, stacklevel=3)

    # the compiled kernel is not copied or pickled: a copy compiles its own (torch caches the code)
    def __getstate__(self) -> Dict[str, object]:
        return {}

    def __setstate__(self, state: Mapping[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    def __repr__(self) -> str:
        return "counter_normal"
