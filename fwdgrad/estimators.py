"""Gradient estimators: one interface for backprop and for forward gradients.

Every estimator is a callable ``est(loss_fn, params) -> (loss, grads)`` where ``loss_fn`` maps the parameters
(a ``dict[str, Tensor]`` or a single ``Tensor``) to a scalar loss and ``grads`` has the structure of
``params``. The training loops never know which estimator they are driving.

Forward gradient (Baydin et al. 2022)
-------------------------------------
For a tangent ``v`` drawn with ``E[v v^T] = I`` the directional derivative ``d = <grad f, v>`` comes out of one
forward-mode pass alongside ``f`` itself, and

    g = d v = v v^T grad f,        E[g] = E[v v^T] grad f = grad f,

so ``g`` is an unbiased gradient estimate obtained without a backward pass.

Multiple tangents (Fluegel et al. 2024)
---------------------------------------
With ``k`` tangents ``v_1..v_k`` (the columns of ``B``, an ``n x k`` matrix over the *whole* concatenated
parameter vector) and ``d = B^T grad f`` (the k directional derivatives):

* ``mean``:       g = (1/k) sum_i d_i v_i = (1/k) B d       unbiased, variance / k
* ``sum``:        g = sum_i d_i v_i = B d                   k times the gradient in expectation
* ``projection``: g = B (B^T B)^{-1} B^T grad f             the orthogonal projection of grad f onto span(B):
                                                            exact when k = n, residual orthogonal to every v_i.

Tangent distributions
---------------------
* ``normal``: i.i.d. N(0, 1) entries. ``rademacher``: i.i.d. +-1 entries (|v|^2 = n exactly, lower variance).
* ``rank1`` (structured): every parameter with >= 2 dims (an m x n weight matrix; a conv kernel as
  ``out x (in*kh*kw)``) gets ``V = u v^T`` with u ~ N(0, I_m), v ~ N(0, I_n) independent; other parameters
  (biases) get normal tangents. Unbiased, because ``vec(u v^T) = v (x) u`` and
  ``E[(v (x) u)(v (x) u)^T] = E[v v^T] (x) E[u u^T] = I``. It needs m + n random numbers instead of m n, and a
  linear layer's tangent ``x V^T = (x v) u^T`` costs O(B (m + n)) instead of O(B m n) (see
  :mod:`fwdgrad.fast`). Per component (a = grad f over all parameters, A the weight's block of it), with
  E[u_i^2 u_k u_k'] = delta_kk' (1 + 2 delta_ik):

      Var g_ij = |a|^2 + 2 |A_i,:|^2 + 2 |A_:,j|^2 + 3 A_ij^2      (dense normal: |a|^2 + A_ij^2)

  so the total variance sum_ij Var g_ij exceeds the dense one only by O((m + n) |A|^2), against the shared
  O(m n |a|^2): in high dimension the two estimators are about equally good.

How the directional derivatives are computed (``backend``)
---------------------------------------------------------
* ``"fast"``: :func:`fwdgrad.fast.forward_tangents`, one forward pass carrying all k tangents, with
  hand-written batched rules for linear/conv layers (k tangents = one matrix product) and rank-one rules.
* ``"func"``: ``torch.func.jvp`` (``vmap`` over it for k > 1; the primal is computed once and only the
  tangents carry the extra batch dimension). The generic reference.
* ``"auto"`` (default): ``fast``, falling back to ``func`` for good (with one warning) the first time the loss
  uses an op the fast engine has no rule for.

Both give the same numbers up to rounding (tests check this). The tangents are drawn in one call into one
flat buffer (one RNG call instead of one per tensor; rademacher signs are unpacked from random bits, 32 per
random word); with one tangent and ``mean``/``sum``/``projection`` the estimate ``g = c v`` is then written
into that buffer in place, so a step allocates no second parameter-sized vector.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from fwdgrad.engine import RankOne, Regenerated, Tangent, Unsupported, forward_tangents, tangent_slice

__all__ = [
    "Params",
    "LossFn",
    "GradientEstimator",
    "Backprop",
    "ForwardGradient",
    "TANGENT_DISTRIBUTIONS",
    "AGGREGATIONS",
    "BACKENDS",
    "estimate_module_grads",
    "kept_prefix",
]

log = logging.getLogger(__name__)

Params = Union[Tensor, Dict[str, Tensor]]
LossFn = Callable[[Params], Tensor]
#: ``sampler(shape, generator, dtype, device) -> Tensor`` drawing ``shape = (k, *param_shape)`` tangents whose
#: flattened rows have mean 0 and covariance I.
TangentSampler = Callable[[Tuple[int, ...], torch.Generator, torch.dtype, torch.device], Tensor]

# Integer type of the same width as each float type, and the bit pattern of +1.0 in it (sign bit clear).
_SIGN_BITS = {
    torch.float32: (torch.int32, 32, 0x3F800000),
    torch.float64: (torch.int64, 64, 0x3FF0000000000000),
    torch.float16: (torch.int16, 16, 0x3C00),
    torch.bfloat16: (torch.int16, 16, 0x3F80),
}


#: Random numbers are drawn in chunks of this many entries, chunk c of a call from its own generator seeded
#: ``(base + c) mod 2^32`` (``base``: one draw from the estimator's generator per call). On CPU the chunks run
#: on a thread pool (torch's CPU generator is sequential; ATen releases the GIL, so they run in parallel), and
#: any chunk can be regenerated later on its own. The result depends only on the seed and the parameter
#: shapes, never on the thread count.
_RNG_CHUNK = 1 << 19
_RNG_POOL: Optional[ThreadPoolExecutor] = None
RandomOp = Callable[[Tensor, torch.Generator], object]


def _num_chunks(n: int) -> int:
    return max(1, -(-n // _RNG_CHUNK))


def _seeded(op: RandomOp, part: Tensor, seed: int) -> None:
    g = torch.Generator(device=part.device)
    g.manual_seed(seed % 2**32)
    op(part, g)


def _chunk_jobs(buf: Tensor, seed0: int, op: RandomOp) -> List[Callable[[], None]]:
    """Jobs applying the in-place random ``op`` to the 1-D ``buf``, chunk c seeded ``seed0 + c``."""
    return [
        partial(_seeded, op, buf[c * _RNG_CHUNK: (c + 1) * _RNG_CHUNK], seed0 + c)
        for c in range(_num_chunks(buf.numel()))
    ]


def _run_jobs(jobs: Sequence[Callable[[], None]]) -> None:
    threads = torch.get_num_threads()  # as many workers as torch may use for its own ops
    if len(jobs) < 2 or threads < 2 or not all(j.args[1].device.type == "cpu" for j in jobs):  # type: ignore[attr-defined]
        for job in jobs:
            job()
        return
    global _RNG_POOL
    if _RNG_POOL is None or _RNG_POOL._max_workers != threads:
        _RNG_POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fwdgrad-rng")
    for _ in _RNG_POOL.map(lambda job: job(), jobs):
        pass


def _normal_op(b: Tensor, g: torch.Generator) -> Tensor:
    return b.normal_(generator=g)


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


def _word_op(dtype: torch.dtype) -> RandomOp:
    w = _SIGN_BITS[dtype][1]
    lo, hi = -(2 ** (w - 1)), (2 ** (w - 1) if w < 64 else None)  # all w bits uniform
    return lambda b, g: b.random_(lo, hi, generator=g)


def _fill_rademacher_(buf: Tensor, generator: torch.Generator) -> Tensor:
    """Fill the 1-D ``buf`` (length a multiple of w, see :func:`_padded`) with +-1 from random bits."""
    words, unpack = _rademacher_words(buf)
    _run_jobs(_chunk_jobs(words, int(torch.randint(0, 2**32, (1,), generator=generator)), _word_op(buf.dtype)))
    return unpack()


def _padded(numel: int, dtype: torch.dtype) -> int:
    w = _SIGN_BITS[dtype][1] if dtype in _SIGN_BITS else 1
    return -(-numel // w) * w


def _normal(shape, generator, dtype, device) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def _rademacher(shape, generator, dtype, device) -> Tensor:
    # +-1 with probability 1/2 each: mean 0, variance 1, and |v|^2 = n exactly (lower variance than normal).
    numel = math.prod(shape)
    if dtype not in _SIGN_BITS:
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
    buf = torch.empty(_padded(numel, dtype), dtype=dtype, device=device)
    return _fill_rademacher_(buf, generator)[:numel].view(shape)


def _rank1(shape, generator, dtype, device) -> Tensor:
    # k rank-one tangents u v^T for tensors with >= 2 dims (materialised here; the estimator keeps the factors).
    k, pshape = shape[0], tuple(shape[1:])
    if len(pshape) < 2:
        return _normal(shape, generator, dtype, device)
    u = torch.randn((k, pshape[0]), generator=generator, dtype=dtype, device=device)
    v = torch.randn((k, math.prod(pshape[1:])), generator=generator, dtype=dtype, device=device)
    return RankOne(u, v, pshape).dense()


#: Tangent distributions by name. Each has E[v] = 0 and E[v v^T] = I, which is all unbiasedness needs.
#: The estimator draws the built-in ones through its own fast path (same distributions); a sampler added
#: here by a user is called per parameter tensor.
TANGENT_DISTRIBUTIONS: Dict[str, TangentSampler] = {
    "normal": _normal,
    "rademacher": _rademacher,
    "rank1": _rank1,
}
AGGREGATIONS = ("mean", "sum", "projection")
BACKENDS = ("auto", "fast", "func")


def _to_dict(params: Params) -> Tuple[Dict[str, Tensor], bool]:
    """Return ``(dict_of_tensors, was_single_tensor)`` so both call styles share one code path."""
    if isinstance(params, Tensor):
        return {"": params}, True
    if isinstance(params, Mapping):
        return dict(params), False
    raise TypeError(f"params must be a Tensor or a dict[str, Tensor], got {type(params).__name__}.")


def _from_dict(d: Dict[str, Tensor], single: bool) -> Params:
    return d[""] if single else d


def _check_scalar(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {shape}; reduce the loss (e.g. .mean()) "
            "before returning it."
        )


def _dense(t: Tangent) -> Tensor:
    return t if isinstance(t, Tensor) else t.dense()


class GradientEstimator(ABC):
    """Common interface: ``loss, grads = est(loss_fn, params)``."""

    @abstractmethod
    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        """Return the loss at ``params`` (detached) and a gradient estimate shaped like ``params``."""

    def describe(self) -> Dict[str, object]:
        """Settings worth logging next to a run (estimator name and hyper-parameters)."""
        return {"estimator": type(self).__name__}


class Backprop(GradientEstimator):
    """The exact gradient by reverse-mode autodiff: the baseline every forward gradient is compared with."""

    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        p, single = _to_dict(params)
        with torch.enable_grad():
            leaves = {name: t.detach().requires_grad_(True) for name, t in p.items()}
            loss = loss_fn(_from_dict(leaves, single))
            _check_scalar(loss)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out = {
            name: (g if g is not None else torch.zeros_like(leaves[name]))
            for name, g in zip(leaves.keys(), grads)
        }
        return loss.detach(), _from_dict(out, single)


@dataclass
class _Draw:
    """One step's tangents: per parameter a ``(k, *shape)`` tensor, a RankOne or a Regenerated.

    ``buffers`` are the flat buffers the dense tangents are views of; ``owned`` says they were allocated for
    this call only, so the estimate may be written into them and handed out.
    """

    tangents: Dict[str, Tangent]
    buffers: List[Tensor] = field(default_factory=list)
    owned: bool = False


class ForwardGradient(GradientEstimator):
    """Forward-gradient estimator with ``num_tangents`` tangents per step.

    Args:
        num_tangents: k >= 1 tangents per step.
        aggregation: ``"mean"``, ``"sum"`` or ``"projection"`` (see the module docstring for the maths).
        distribution: a key of :data:`TANGENT_DISTRIBUTIONS` (``"normal"``, ``"rademacher"``, ``"rank1"``).
        seed: seed of the ``torch.Generator`` the estimator owns; the same seed gives the same tangents, and
            hence the same estimates, for the same sequence of calls.
        backend: how the directional derivatives are computed: ``"auto"`` (default), ``"fast"`` or
            ``"func"`` (module docstring). All give the same estimates up to rounding.
        regenerate_tangents: ``True``: do not keep the (k, n) tangents through the forward pass; regenerate
            each weight's tangents from their seeds when a layer needs them and again for the estimate (one
            more round of random numbers, no parameter-sized buffer during the pass). ``False``: keep them
            all. ``"auto"`` (default): with k = 1, keep the leading parameters' tangents and regenerate only
            as many trailing ones as bring the step's peak memory within one parameter tensor of its floor
            ``max(n, pass)`` (:func:`kept_prefix`; keeping all costs ``n + pass``), sized from the previous
            call's pass (the first call regenerates all); with k > 1 as ``False``. Same estimates in every
            mode. Dense distributions with the fast backend only (else ignored).
        max_tangent_mib: the fast path runs the k tangents in groups so that no intermediate tangent tensor
            exceeds about this many MiB (each group repeats the primal pass). The group size is set from the
            previous call's largest tangent, the first call probing with one tangent.
    """

    def __init__(
        self,
        num_tangents: int = 1,
        aggregation: str = "mean",
        distribution: str = "normal",
        seed: int = 0,
        backend: str = "auto",
        regenerate_tangents: Union[bool, str] = "auto",
        max_tangent_mib: float = 256.0,
    ) -> None:
        if not isinstance(num_tangents, int) or isinstance(num_tangents, bool) or num_tangents < 1:
            raise ValueError(
                f"num_tangents must be an integer >= 1 (the number of tangents per step), got {num_tangents!r}."
            )
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}."
            )
        if distribution not in TANGENT_DISTRIBUTIONS:
            raise ValueError(
                f"unknown tangent distribution {distribution!r}; allowed: {', '.join(TANGENT_DISTRIBUTIONS)}."
            )
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}.")
        if regenerate_tangents not in (True, False, "auto"):
            raise ValueError(
                f"regenerate_tangents must be true, false or 'auto', got {regenerate_tangents!r}."
            )
        if not max_tangent_mib > 0:
            raise ValueError(f"max_tangent_mib must be > 0 (MiB per intermediate tangent), got {max_tangent_mib!r}.")
        self.num_tangents = num_tangents
        self.aggregation = aggregation
        self.distribution = distribution
        self.seed = int(seed)
        self.backend = backend
        self.regenerate_tangents: Union[bool, str] = (
            regenerate_tangents if regenerate_tangents == "auto" else bool(regenerate_tangents)
        )
        self.max_tangent_mib = float(max_tangent_mib)
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._fast_unsupported: Optional[str] = None  # why "auto" fell back to torch.func, once it has
        self._scratch: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}  # reused tangent buffers, k > 1
        self._bytes_per_tangent: Optional[float] = None  # largest intermediate tangent of the last fast pass

    # -- public API ------------------------------------------------------------------------------------
    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        p, single = _to_dict(params)
        p = {name: t.detach() for name, t in p.items()}
        if self.aggregation == "projection":
            n = sum(t.numel() for t in p.values())
            if self.num_tangents > n:
                raise ValueError(
                    f"projection needs num_tangents <= n (the number of parameters, {n}); got "
                    f"num_tangents={self.num_tangents}. With k = n the projection is already exact."
                )
        # With k > 1 the estimate is a new vector B c, so the k tangents can live in a buffer reused every
        # step; with k = 1 the estimate is written into the tangent buffer itself, which is then handed out.
        fast = self.backend != "func" and self._fast_unsupported is None
        draw = self._draw(p, reuse=self.num_tangents > 1, regenerate=fast)
        loss, d = self.directional_derivatives(loss_fn, p, draw.tangents, single)
        grads = self._aggregate(draw, d)
        return loss, _from_dict(grads, single)

    def describe(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "estimator": type(self).__name__,
            "num_tangents": self.num_tangents,
            "aggregation": self.aggregation,
            "distribution": self.distribution,
            "seed": self.seed,
        }
        # execution settings change speed and memory, never the estimates: logged only when not the default
        if self.backend != "auto":
            out["backend"] = self.backend
        if self.regenerate_tangents != "auto":
            out["regenerate_tangents"] = self.regenerate_tangents
        if self.max_tangent_mib != 256.0:
            out["max_tangent_mib"] = self.max_tangent_mib
        return out

    def generator(self, device: torch.device) -> torch.Generator:
        """The estimator's own generator on ``device`` (created on first use, seeded with ``seed``)."""
        device = torch.device(device)
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    # -- the three stages, separately overridable (e.g. to all-reduce ``d`` across workers) ---------------
    def sample_tangents(self, params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Draw ``k`` tangents per parameter tensor: a dict of ``(k, *shape)`` tensors.

        These are exactly the tangents ``__call__`` would use next (``rank1`` ones materialised as
        ``u v^T``; the estimator itself keeps the factors).
        """
        return {name: _dense(t) for name, t in self._draw(params, reuse=False).tangents.items()}

    def directional_derivatives(
        self,
        loss_fn: LossFn,
        params: Dict[str, Tensor],
        tangents: Mapping[str, Tangent],
        single: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Return ``(f(params), d)`` with ``d[i] = <grad f, v_i>``, a tensor of shape ``(k,)``.

        ``tangents`` holds ``(k, *shape)`` tensors (or :class:`~fwdgrad.fast.RankOne` factors, or
        :class:`~fwdgrad.fast.Regenerated` tangents).
        """

        def f(p: Dict[str, Tensor]) -> Tensor:
            return loss_fn(_from_dict(p, single))

        k = self.num_tangents
        if self.backend == "fast" or (self.backend == "auto" and self._fast_unsupported is None):
            try:
                loss, d = self._fast_passes(f, params, tangents)
            except Unsupported as e:
                if self.backend == "fast":
                    raise ValueError(
                        f"backend='fast' cannot differentiate this loss: {e}. Use backend='auto' (falls back "
                        "to torch.func) or backend='func'."
                    ) from None
                self._fast_unsupported = str(e)
                log.warning("forward gradient: fast path unavailable (%s); using torch.func.jvp from now on.", e)
            else:
                _check_scalar(loss)
                return loss, d
        dense = {name: _dense(t) for name, t in tangents.items()}
        if k == 1:
            loss, d = jvp(f, (params,), ({n: v[0] for n, v in dense.items()},))
            _check_scalar(loss)
            return loss.detach(), d.detach().reshape(1)

        def one_tangent(v: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
            return jvp(f, (params,), (v,))

        # in_dims=0 batches only the tangents; out_dims=(None, 0): the primal output is unbatched, i.e. it was
        # computed once for all k tangents. randomness="same": dropout masks etc. are shared by every tangent,
        # as they must be for all k derivatives to be taken at the same point.
        loss, d = vmap(one_tangent, in_dims=(0,), out_dims=(None, 0), randomness="same")(dense)
        _check_scalar(loss)
        return loss.detach(), d.detach().reshape(k)

    def aggregate(self, tangents: Mapping[str, Tangent], d: Tensor) -> Dict[str, Tensor]:
        """Combine the k tangents and their directional derivatives into one estimate (module docstring).

        Never modifies ``tangents`` (the same tangents may be aggregated several ways).
        """
        return self._aggregate(_Draw(dict(tangents)), d)

    # -- internals -------------------------------------------------------------------------------------
    #: Tangent-sized tensors a forward-mode layer holds at once: its input and output, each with its tangent.
    PASS_TENSORS = 4

    def _kept_blocks(self, sizes: Sequence[float]) -> int:
        """How many of the leading tangent blocks (``sizes``: bytes per parameter, in order) to keep through
        the pass; the rest are regenerated (:func:`kept_prefix`). Fast path, dense distributions only."""
        if self.regenerate_tangents is True:
            return 0
        if self.regenerate_tangents is False or self.num_tangents > 1:
            return len(sizes)
        if self._bytes_per_tangent is None:
            return 0  # first call: nothing measured yet, regenerate all (the leanest choice)
        return kept_prefix(sizes, self.PASS_TENSORS * self._bytes_per_tangent)

    def _fast_passes(
        self, f: Callable[[Dict[str, Tensor]], Tensor], params: Dict[str, Tensor], tangents: Mapping[str, Tangent]
    ) -> Tuple[Tensor, Tensor]:
        """The fast engine over all k tangents, in groups whose intermediate tangents fit ``max_tangent_mib``."""
        k = self.num_tangents
        budget = self.max_tangent_mib * 2**20
        if k == 1:
            stats: Dict[str, float] = {}
            out = forward_tangents(f, params, tangents, 1, stats)
            self._bytes_per_tangent = stats["max_bytes_per_tangent"]
            return out
        ds, i, loss = [], 0, None
        per = self._bytes_per_tangent
        largest = 0.0
        while i < k:
            # no measurement yet: probe with one tangent, then size the groups from what it allocated
            group = 1 if per is None else max(1, min(k - i, int(budget // max(per, 1.0))))
            part = tangents if group == k else {n: tangent_slice(t, i, i + group) for n, t in tangents.items()}
            stats = {}
            loss, d = forward_tangents(f, params, part, group, stats)
            if loss.dim() != 0:
                return loss, d  # the caller reports the non-scalar loss
            per = stats["max_bytes_per_tangent"]
            largest = max(largest, per)
            ds.append(d)
            i += group
        self._bytes_per_tangent = largest
        assert loss is not None
        return loss, torch.cat(ds)

    def _coefficients(self, tangents: Mapping[str, Tangent], d: Tensor) -> Tensor:
        """``c`` with ``g = B c``: ``d / k`` (mean), ``d`` (sum) or ``(B^T B)^{-1} d`` (projection)."""
        if self.aggregation == "projection":
            return self._projection_coefficients(tangents, d)
        return d / self.num_tangents if self.aggregation == "mean" else d

    def _aggregate(self, draw: _Draw, d: Tensor) -> Dict[str, Tensor]:
        coeff = self._coefficients(draw.tangents, d)
        if draw.owned and self.num_tangents == 1:
            # g = c v: scale the freshly drawn buffer in place and hand out its views (nothing else holds it);
            # regenerated tangents are drawn again here, one parameter at a time, and scaled in place too.
            for buf in draw.buffers:
                buf.mul_(coeff[0].to(buf.dtype))
            return {
                name: (t[0] if isinstance(t, Tensor) else self._combine(t, coeff))
                for name, t in draw.tangents.items()
            }
        return {name: self._combine(t, coeff) for name, t in draw.tangents.items()}

    @staticmethod
    def _combine(t: Tangent, coeff: Tensor) -> Tensor:
        """``g_p = sum_i c_i V_p[i]`` for one parameter tensor."""
        if isinstance(t, RankOne):
            # sum_i c_i u_i v_i^T = (U^T diag(c)) V: one (m x k)(k x n) product, never k dense matrices.
            c = coeff.to(t.u.dtype)
            if t.k == 1:
                return torch.outer(t.u[0] * c[0], t.v[0]).view(t.shape)
            return ((t.u.T * c) @ t.v).view(t.shape)
        if isinstance(t, Regenerated):
            v = t.dense()  # freshly regenerated: ours to scale in place when k = 1
            if t.k == 1:
                return v[0].mul_(coeff[0].to(v.dtype))
            return torch.tensordot(coeff.to(v.dtype), v, dims=1)
        # tensordot keeps it one GEMV over the (k, numel) block.
        return torch.tensordot(coeff.to(t.dtype), t, dims=1)

    @staticmethod
    def _projection_coefficients(tangents: Mapping[str, Tangent], d: Tensor) -> Tensor:
        """Solve ``(B^T B) c = d`` so that ``B c = B (B^T B)^{-1} B^T grad f`` (orthogonal projection).

        ``B^T B`` (k x k, the Gram matrix of the tangents over the whole concatenated parameter vector) is
        accumulated in float64 and solved by Cholesky; if it is numerically singular (tangents nearly
        linearly dependent) we fall back to the least-squares/pseudo-inverse solution, which still gives the
        orthogonal projection onto the span. Rank-one blocks need only their factors:
        ``<u_i v_i^T, u_j v_j^T> = (u_i . u_j)(v_i . v_j)``, i.e. ``(U U^T) * (V V^T)`` elementwise.
        """
        k = d.shape[0]
        gram = torch.zeros(k, k, dtype=torch.float64, device=d.device)
        for v in tangents.values():
            if isinstance(v, RankOne):
                gram += (v.u @ v.u.T).to(torch.float64) * (v.v @ v.v.T).to(torch.float64)
            else:
                flat = _dense(v).reshape(k, -1)
                gram += (flat @ flat.T).to(torch.float64)
        rhs = d.to(torch.float64).unsqueeze(1)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            coeff = torch.cholesky_solve(rhs, chol)
        else:
            coeff = torch.linalg.pinv(gram, hermitian=True) @ rhs
        return coeff.squeeze(1)

    def _draw(self, params: Dict[str, Tensor], reuse: bool, regenerate: bool = False) -> _Draw:
        """Draw this step's tangents (module docstring): built-in distributions in seeded chunks.

        Layout: every parameter gets a contiguous block (its ``(k, *shape)`` tangents, or for ``rank1``
        weights ``k*m`` then ``k*n`` factor entries; rademacher blocks padded to whole random words); chunk
        ids run over the blocks in order, so any block can be regenerated alone. ``regenerate``: the blocks
        after the first :meth:`_kept_blocks` are not drawn now but handed out as
        :class:`~fwdgrad.fast.Regenerated`; which ones never changes the numbers.
        """
        k = self.num_tangents
        sampler = TANGENT_DISTRIBUTIONS[self.distribution]
        kind = {_normal: "normal", _rademacher: "rademacher", _rank1: "rank1"}.get(sampler)
        if kind == "rademacher" and any(t.dtype not in _SIGN_BITS for t in params.values()):
            kind = None  # e.g. complex parameters: the generic sampler
        if kind is None:  # a user-registered sampler: one call per tensor
            return _Draw({
                name: sampler((k, *t.shape), self.generator(t.device), t.dtype, t.device)
                for name, t in params.items()
            })
        first = next(iter(params.values()))
        base = int(torch.randint(0, 2**32, (1,), generator=self.generator(first.device)))
        if kind == "rank1":
            regenerate = False  # rank-one factors are m + n numbers: nothing to save
        # per parameter: (name, tensor, block size, first chunk id)
        plan = []
        next_id = 0
        for name, t in params.items():
            factors = kind == "rank1" and t.dim() >= 2
            size = k * (t.shape[0] + t[0].numel()) if factors else k * t.numel()
            if kind == "rademacher":
                size = _padded(size, t.dtype)
            plan.append((name, t, size, next_id))
            next_id += _num_chunks(size // _SIGN_BITS[t.dtype][1] if kind == "rademacher" else size)

        def block_jobs(block: Tensor, seed0: int) -> Tuple[List[Callable[[], None]], Optional[Callable[[], Tensor]]]:
            if kind == "rademacher":
                words, unpack = _rademacher_words(block)
                return _chunk_jobs(words, seed0, _word_op(block.dtype)), unpack
            return _chunk_jobs(block, seed0, _normal_op), None

        tangents: Dict[str, Tangent] = {}
        kept = self._kept_blocks([size * t.element_size() for _, t, size, _ in plan]) if regenerate else len(plan)
        for name, t, size, id0 in plan[kept:]:
            tangents[name] = Regenerated(k, partial(self._regenerate, t, size, base + id0, block_jobs, k))
        plan = plan[:kept]
        groups: Dict[Tuple[torch.device, torch.dtype], List[Tuple[str, Tensor, int, int]]] = {}
        for item in plan:
            groups.setdefault((item[1].device, item[1].dtype), []).append(item)
        buffers, jobs, finish = [], [], []
        for key, items in groups.items():
            total = sum(size for _, _, size, _ in items)
            buf = self._scratch.get(key) if reuse else None
            if buf is None or buf.numel() != total:
                buf = torch.empty(total, dtype=key[1], device=key[0])
                if reuse:
                    self._scratch[key] = buf
            buffers.append(buf)
            off = 0
            for name, t, size, id0 in items:
                block = buf[off: off + size]
                js, fin = block_jobs(block, base + id0)
                jobs += js
                if fin is not None:
                    finish.append(fin)
                if kind == "rank1" and t.dim() >= 2:
                    m = t.shape[0]
                    tangents[name] = RankOne(block[: k * m].view(k, m), block[k * m:].view(k, -1), tuple(t.shape))
                else:
                    tangents[name] = block[: k * t.numel()].view(k, *t.shape)
                off += size
        _run_jobs(jobs)  # every chunk of every block, in parallel
        for fin in finish:
            fin()
        tangents = {name: tangents[name] for name in params}  # parameter order
        owned = not reuse and kind != "rank1"
        return _Draw(tangents, buffers if owned else [], owned)

    @staticmethod
    def _regenerate(t: Tensor, size: int, seed0: int, block_jobs: Callable, k: int) -> Tensor:
        block = torch.empty(size, dtype=t.dtype, device=t.device)
        jobs, fin = block_jobs(block, seed0)
        _run_jobs(jobs)
        if fin is not None:
            fin()
        return block[: k * t.numel()].view(k, *t.shape)


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


def estimate_module_grads(
    estimator: GradientEstimator,
    model: nn.Module,
    loss_of_output: Callable[[Tensor], Tensor],
    *inputs: Tensor,
) -> Tensor:
    """Estimate the gradient of ``loss_of_output(model(*inputs))`` and write it into ``p.grad``.

    This is the bridge to the ``torch.optim`` world: after it, any optimizer, scheduler or
    ``clip_grad_norm_`` works unchanged. Parameters with ``requires_grad=False`` are held fixed; buffers
    (e.g. batch-norm statistics) are passed through. Returns the (detached) loss.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_fn(p: Dict[str, Tensor]) -> Tensor:
        return loss_of_output(functional_call(model, (p, buffers), inputs))

    loss, grads = estimator(loss_fn, params)
    for name, param in model.named_parameters():
        if name in grads:
            param.grad = grads[name].to(param.dtype)
    return loss


def total_numel(params: Params) -> int:
    """Number of scalar parameters n (the dimension the tangents live in)."""
    p, _ = _to_dict(params)
    return int(sum(t.numel() for t in p.values()))


def cosine_similarity(a: Params, b: Params) -> float:
    """Cosine similarity of two parameter structures, taken over the whole concatenated vector."""
    da, _ = _to_dict(a)
    db, _ = _to_dict(b)
    dot = sum(float((da[n].double() * db[n].double()).sum()) for n in da)
    na = math.sqrt(sum(float(da[n].double().pow(2).sum()) for n in da))
    nb = math.sqrt(sum(float(db[n].double().pow(2).sum()) for n in db))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")
