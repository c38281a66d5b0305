"""The loss at ``theta + eps v`` without writing ``theta``: the perturbation is applied where a parameter is used.

MeZO (Malladi et al. 2023) perturbs the parameters in place, ``theta += eps z; theta -= 2 eps z; theta += eps z``,
regenerating z from its seed each time. In floating point that does not give ``theta`` back: every addition
rounds to the parameter's precision, so ``fl(fl(fl(theta + eps z) - 2 eps z) + eps z)`` differs from ``theta`` in
the last bits of many entries (a drift of O(u |theta|) per step, u = 2^-24 in float32), and a loss that raises
between the additions leaves ``theta`` perturbed. Here the parameters are never written. The loss runs under
:class:`PerturbedPass`, a ``TorchFunctionMode`` that sees every torch operation; an operation that reads a
parameter gets the perturbed value instead, built in a temporary at that moment:

* ``F.linear(x, W, b)`` (every ``nn.Linear``): the output is computed in blocks of R rows of W. For each block the
  rows of v are regenerated (a chunk of the seeded layout at a time, :mod:`.seeded_tangents`), scaled by eps and
  added to W's rows in that same buffer, and ``addmm`` writes ``x (W + eps V)[rows]^T + (b + eps v_b)[rows]``
  straight into the output's columns. Beyond what the no-grad forward pass holds (the layer's input and output)
  this needs the R x in buffer, about one RNG chunk, and, when chunks and rows are not aligned, one cached chunk.
* any other operation reading a parameter (convolutions, indexing, a custom ``autograd.Function``, ...): the whole
  perturbed tensor ``theta_p + eps v_p`` is materialised for that call (exact; one parameter-sized temporary at
  a time). Which operations did so is recorded, and the estimator logs each once.
* operations that read only metadata (shape, dtype, device, ...) get the parameter itself.

In every path the perturbed entries come from one ``torch.add(theta, v, alpha=eps)``: ``theta + eps v`` rounded to
the parameter's precision. No forward-mode rule is involved: any op PyTorch can run forward works.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fwdgrad.engine import RankOne, Regenerated, Tangent
from fwdgrad.estimators.tangents.seeded import ChunkedTangent, ChunkReader

__all__ = ["Perturbation", "PerturbedPass", "METADATA_OPS", "ROW_BLOCK_ENTRIES"]

#: Entries of W's row block in F.linear when the tangent is not chunked (dense tensors, rank-one factors).
ROW_BLOCK_ENTRIES = 1 << 16

_TB = torch._C.TensorBase
#: Torch functions whose result does not depend on a tensor's values: they see the parameter itself.
METADATA_OPS = frozenset(
    [_TB.size, _TB.dim, _TB.numel, _TB.nelement, _TB.ndimension, _TB.stride, _TB.is_contiguous,
     _TB.element_size, _TB.is_floating_point, _TB.is_complex, _TB.get_device, _TB.__len__, torch.Tensor.__len__]
    + [getattr(_TB, name).__get__ for name in ("shape", "dtype", "device", "ndim", "requires_grad", "layout",
                                               "is_cuda", "is_leaf", "grad_fn", "is_sparse", "is_meta")]
)


class Perturbation:
    """``theta_p + eps v_i`` for one parameter ``theta_p``: tangent ``i`` of ``tangent`` (any tangent kind: a
    ``(k, *shape)`` tensor, rank-one factors, a :class:`ChunkedTangent` or another regenerated tangent), with
    the signed step ``eps``. The parameter is read, never written."""

    def __init__(self, param: Tensor, tangent: Tangent, index: int, eps: float) -> None:
        self.param, self.tangent, self.index, self.eps = param, tangent, index, float(eps)
        rows = param.shape[0] if param.dim() >= 1 else 1
        self.rows, self.cols = rows, (param.numel() // rows if rows else 0)

    def _tangent_rows(self, r0: int, r1: int, out: Tensor, reader: Optional[ChunkReader]) -> Tensor:
        """Rows ``r0:r1`` of ``v_i`` viewed as ``(rows, cols)``: written into ``out``, or a view of a kept tensor."""
        t, i = self.tangent, self.index
        if isinstance(t, ChunkedTangent):
            off = i * t.numel
            assert reader is not None
            return reader.read(off + r0 * self.cols, off + r1 * self.cols, out.view(-1)).view_as(out)
        if isinstance(t, Tensor):
            return t[i].reshape(self.rows, self.cols)[r0:r1]
        if isinstance(t, RankOne):  # u_i v_i^T: rows r0:r1 are u_i[r0:r1] v_i^T
            return torch.outer(t.u[i, r0:r1], t.v[i], out=out)
        return t.dense()[i].reshape(self.rows, self.cols)[r0:r1]  # another regenerated tangent: only whole

    def perturbed_rows(self, r0: int, r1: int, out: Tensor, reader: Optional[ChunkReader] = None) -> Tensor:
        """Rows ``r0:r1`` of ``theta_p + eps v_i`` (as ``(rows, cols)``) in ``out``, by one ``torch.add`` with
        ``alpha = eps`` (the same op in every path, so both passes and every layer round alike)."""
        v = self._tangent_rows(r0, r1, out, reader)
        return torch.add(self.param.reshape(self.rows, self.cols)[r0:r1], v, alpha=self.eps, out=out)

    def _reader(self) -> Optional[ChunkReader]:
        return self.tangent.reader() if isinstance(self.tangent, ChunkedTangent) else None

    def materialise(self) -> Tensor:
        """The whole perturbed parameter, a new tensor."""
        out = torch.empty(self.rows, self.cols, dtype=self.param.dtype, device=self.param.device)
        return self.perturbed_rows(0, self.rows, out, self._reader()).view(self.param.shape)

    def row_block(self) -> int:
        """Rows of W per block in :meth:`linear`: about one RNG chunk (or :data:`ROW_BLOCK_ENTRIES`) of entries."""
        entries = self.tangent.entries if isinstance(self.tangent, ChunkedTangent) else ROW_BLOCK_ENTRIES
        return max(1, entries // max(1, self.cols))

    def linear(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.linear(x, theta_p + eps v_i, bias)`` for the 2-D weight ``theta_p``, in blocks of output columns
        (module docstring); ``bias`` is already perturbed if it is a parameter."""
        x2 = x.reshape(-1, self.cols)
        out = torch.empty(x2.shape[0], self.rows, dtype=x.dtype, device=x.device)
        step = self.row_block()
        buf = torch.empty(min(step, self.rows), self.cols, dtype=self.param.dtype, device=self.param.device)
        reader = self._reader()
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            w = self.perturbed_rows(r0, r1, buf[: r1 - r0], reader)
            if bias is None:
                torch.mm(x2, w.T, out=out[:, r0:r1])  # a column block of out: BLAS writes it in place
            else:
                torch.addmm(bias[r0:r1], x2, w.T, out=out[:, r0:r1])
        return out.view(*x.shape[:-1], self.rows)

    def has_row_path(self, x: Any) -> bool:
        """Whether :meth:`linear` applies to ``F.linear(x, theta_p, ...)`` (else the weight is materialised)."""
        whole_only = isinstance(self.tangent, Regenerated) and not isinstance(self.tangent, ChunkedTangent)
        return (not whole_only and self.param.dim() == 2 and isinstance(x, Tensor) and x.dim() >= 1
                and x.dtype == self.param.dtype and x.shape[-1] == self.cols)


_LINEAR_ARGS = ("input", "weight", "bias")


class PerturbedPass(TorchFunctionMode):
    """A ``TorchFunctionMode`` under which every parameter of ``perturbations`` reads as ``theta + eps v``.

    Parameters are recognised by identity (the tensors the loss function was given). ``seen``: the names of the
    parameters some operation read; ``materialised``: the operations that got a whole perturbed parameter.
    """

    def __init__(self, perturbations: Mapping[str, Perturbation]) -> None:
        super().__init__()
        self._by_id: Dict[int, Tuple[str, Perturbation]] = {id(p.param): (n, p) for n, p in perturbations.items()}
        self.seen: Set[str] = set()
        self.materialised: Set[str] = set()

    def _lookup(self, obj: Any) -> Optional[Perturbation]:
        hit = self._by_id.get(id(obj)) if isinstance(obj, Tensor) else None
        if hit is None or hit[1].param is not obj:
            return None
        self.seen.add(hit[0])
        return hit[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in METADATA_OPS:
            return func(*args, **kwargs)
        if func is F.linear:
            out = self._linear(args, kwargs)
            if out is not None:
                return out
        new_args, new_kwargs = self._swap(args), self._swap(kwargs)
        if new_args is None and new_kwargs is None:
            return func(*args, **kwargs)
        self.materialised.add(getattr(func, "__name__", repr(func)))
        return func(*(args if new_args is None else new_args), **(kwargs if new_kwargs is None else new_kwargs))

    def _swap(self, obj: Any) -> Any:
        """``obj`` with every parameter in it (also inside lists, tuples and dicts) replaced by its whole perturbed
        copy, or None when it holds none (the common case, checked without copying anything)."""
        if isinstance(obj, Tensor):
            p = self._lookup(obj)
            return None if p is None else p.materialise()
        if isinstance(obj, (list, tuple)):
            new = [self._swap(o) for o in obj]
            if all(n is None for n in new):
                return None
            items = [o if n is None else n for o, n in zip(obj, new)]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples by field
        if isinstance(obj, dict):
            new_d = {key: self._swap(o) for key, o in obj.items()}
            if all(n is None for n in new_d.values()):
                return None
            return {key: (obj[key] if n is None else n) for key, n in new_d.items()}
        return None

    def _linear(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Tensor]:
        """The row-block path of ``F.linear`` when its weight is a parameter it applies to, else None."""
        if len(args) > 3 or set(kwargs) - set(_LINEAR_ARGS[len(args):]):
            return None
        x, weight, bias = list(args) + [kwargs.get(name) for name in _LINEAR_ARGS[len(args):]]
        pw = self._lookup(weight)
        if pw is None or not pw.has_row_path(x) or self._lookup(x) is not None:
            return None
        pb = self._lookup(bias)
        return pw.linear(x, pb.materialise() if pb is not None else bias)
