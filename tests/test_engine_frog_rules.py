"""The engine rules the frog models need (batch norm, layer norm, adaptive average pooling, unbind/chunk/split,
``x.T``/``x.mT``, scaled dot-product attention), each against ``torch.func.jvp`` on values *and* full output
tangents, k = 1 and k > 1, dense and rank-one weight tangents (attention against ``jvp`` of the kernel's documented
maths, as torch has no forward-mode rule for the kernel); and batch norm's running statistics, which must move
exactly as in one backprop step whatever the backend, the tangent groups or a fallback. float64, so tolerances
are rounding-level."""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from fwdgrad import Backprop, ForwardGradient, estimate_module_grads
from fwdgrad.engine import RankOne
from fwdgrad.engine.mode import TangentMode
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import dense
from fwdgrad.estimators import backends
from fwdgrad.nn.functional import cross_entropy

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(fn: Callable, params: Dict[str, Tensor], tangents: Dict[str, object]):
    """The engine's primal output of ``fn`` and its full ``(k, *shape)`` tangent (what forward_tangents does,
    keeping the output's tangent instead of reducing it to a scalar's)."""
    state = PassState()
    aliases = {}
    for name, p in params.items():
        a = p.detach()
        setattr(a, state.attr, tangents[name])
        aliases[name] = a
    with torch.no_grad(), TangentMode(state):
        out = fn(aliases)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return outs, [dense(state.tangent(o)) for o in outs]


def _reference(fn: Callable, params: Dict[str, Tensor], tangents: Dict[str, Tensor], k: int):
    """``torch.func.jvp`` once per tangent: primal outputs and ``(k, *shape)`` tangents."""
    names = list(params)
    per = [jvp(lambda *xs: fn(dict(zip(names, xs))), tuple(params[n] for n in names),
               tuple(tangents[n][i] for n in names)) for i in range(k)]
    outs = per[0][0] if isinstance(per[0][0], (tuple, list)) else (per[0][0],)
    tans = [p[1] if isinstance(p[1], (tuple, list)) else (p[1],) for p in per]
    return outs, [torch.stack([t[j] for t in tans]) for j in range(len(outs))]


def _check(fn: Callable, params: Dict[str, Tensor], k: int, rank1: bool = False, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    tangents: Dict[str, object] = {}
    for n, p in params.items():
        if rank1 and p.dim() >= 2:
            tangents[n] = RankOne(torch.randn(k, p.shape[0], generator=g, dtype=DT),
                                  torch.randn(k, p[0].numel(), generator=g, dtype=DT), tuple(p.shape))
        else:
            tangents[n] = torch.randn(k, *p.shape, generator=g, dtype=DT)
    outs, touts = _engine(fn, params, tangents)
    ref_outs, ref_touts = _reference(fn, params, {n: dense(t) for n, t in tangents.items()}, k)
    assert len(outs) == len(ref_outs)
    for o, r, t, rt in zip(outs, ref_outs, touts, ref_touts):
        torch.testing.assert_close(o, r, **TOL)
        assert t is not None and t.shape == (k, *r.shape)
        torch.testing.assert_close(t, rt, **TOL)


def _r(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


X4, X3, X2 = _r(5, 3, 4, 4), _r(6, 3, 7), _r(8, 3)


# -- batch norm -------------------------------------------------------------------------------------------------
def _bn(x: Tensor, p: Dict[str, Tensor], training: bool, running: bool, affine: bool) -> Tensor:
    c = x.shape[1]
    # fresh running statistics inside the function: torch.func may update only tensors it created
    rm, rv = (torch.linspace(-0.5, 0.5, c, dtype=DT), torch.linspace(0.5, 2.0, c, dtype=DT)) if running else (None, None)
    w, b = (p["w"], p["b"]) if affine else (None, None)
    return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("training,running", [(True, True), (True, False), (False, True)])  # eval needs stats
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("x", [X4, X3, X2], ids=["NCHW", "NCL", "NC"])
def test_batch_norm_on_a_tangent_carrying_input(k, training, running, affine, x):
    params = {"x": x, "w": _r(3, seed=2).abs() + 0.5, "b": _r(3, seed=3)}
    _check(lambda p: _bn(p["x"], p, training, running, affine), params, k)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("rank1", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_after_a_conv_batch_major_tangents(k, rank1, training):
    # a conv's tangents are batch-major in memory; the weight/bias of the norm carry tangents too
    x = _r(4, 2, 6, 6)
    params = {"cw": _r(3, 2, 3, 3, seed=4), "w": _r(3, seed=2).abs() + 0.5, "b": _r(3, seed=3)}
    _check(lambda p: torch.relu(_bn(F.conv2d(x, p["cw"]), p, training, True, True)), params, k, rank1)


def test_batch_norm_with_only_weight_and_bias_tangents():
    _check(lambda p: _bn(X4, p, True, True, True), {"w": _r(3, seed=2), "b": _r(3, seed=3)}, 2)
    _check(lambda p: F.batch_norm(X4, None, None, None, p["b"], training=True), {"b": _r(3, seed=3)}, 2)


# -- layer norm -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", [(7,), (4, 7)], ids=["last_dim", "last_two_dims"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rank1", [False, True])
def test_layer_norm(k, shape, affine, rank1):
    x = _r(2, 3, 4, 7)
    params = {"lin": _r(7, 7, seed=5), "w": _r(*shape, seed=2), "b": _r(*shape, seed=3)}

    def fn(p):
        h = F.linear(x, p["lin"])  # batch-major tangents into the norm
        return F.layer_norm(h, shape, p["w"] if affine else None, p["b"] if affine else None, eps=1e-6)

    _check(fn, params, k, rank1)


def test_layer_norm_of_a_parameter_directly():
    _check(lambda p: F.layer_norm(p["x"], (5,)), {"x": _r(3, 5)}, 3)
    _check(lambda p: torch.layer_norm(p["x"], [5], None, None, 1e-5, False), {"x": _r(3, 5)}, 2)


# -- adaptive average pooling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("size", [1, (2, 3), (3, 3)])
@pytest.mark.parametrize("after_conv", [True, False])
def test_adaptive_avg_pool2d(k, size, after_conv):
    x = _r(2, 2, 7, 6)
    if after_conv:
        _check(lambda p: F.adaptive_avg_pool2d(F.conv2d(x, p["w"], padding=1), size), {"w": _r(3, 2, 3, 3)}, k)
    else:
        _check(lambda p: F.adaptive_avg_pool2d(p["x"], size), {"x": x}, k)


def test_adaptive_avg_pool2d_module_and_flatten_like_resnet():
    pool = nn.AdaptiveAvgPool2d(1)
    _check(lambda p: pool(torch.relu(F.conv2d(X4, p["w"]))).flatten(1), {"w": _r(2, 3, 3, 3)}, 3, rank1=True)


# -- shapes: unbind, chunk, split, tensor_split, .T, .mT ----------------------------------------------------------
SHAPE_OPS = [
    ("unbind", lambda t: t.unbind(1)),
    ("unbind_kw", lambda t: torch.unbind(t, dim=-1)),
    ("chunk", lambda t: t.chunk(3, dim=-1)),
    ("torch_chunk", lambda t: torch.chunk(t, 2, 0)),
    ("split_size", lambda t: t.split(2, dim=1)),
    ("split_sections", lambda t: torch.split(t, [1, 3, 2], dim=-1)),
    ("tensor_split", lambda t: t.tensor_split([1, 3], dim=2)),
    ("split_by_name", lambda t: torch.split(t, split_size_or_sections=4)),
    ("chunk_by_name", lambda t: t.chunk(chunks=2, dim=1)),
    ("T", lambda t: (t[0].T,)),
    ("mT", lambda t: (t.mT,)),
    ("qkv_like_attention", lambda t: t.view(2, 4, 3, 2).permute(2, 0, 1, 3).unbind(0)),
]


@pytest.mark.parametrize("name,op", SHAPE_OPS, ids=[s[0] for s in SHAPE_OPS])
@pytest.mark.parametrize("k", [1, 3])
def test_shape_ops(name, op, k):
    x = _r(2, 4, 6)
    _check(lambda p: tuple(torch.tanh(o) for o in op(p["x"])), {"x": x}, k)
    # after a linear layer (batch-major tangents)
    _check(lambda p: tuple(o * 2 for o in op(F.linear(x, p["w"]))), {"w": _r(6, 6, seed=4)}, k, rank1=True)


def test_matrix_T_of_a_weight():
    x = _r(5, 4)
    _check(lambda p: x @ p["w"].T, {"w": _r(3, 4)}, 2)


# -- running statistics: moved once per step, as by backprop ----------------------------------------------------
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)


def _one_step_buffers(est, net: nn.Module, x: Tensor, y: Tensor, loss=None) -> Dict[str, Tensor]:
    net.train()
    estimate_module_grads(est, net, loss or (lambda o: cross_entropy(o, y)), x)
    return {n: b.clone() for n, b in net.named_buffers()}


@pytest.mark.parametrize("backend", ["fast", "func", "auto"])
@pytest.mark.parametrize("k,mib", [(1, 256.0), (4, 256.0), (4, 1e-4)], ids=["k1", "k4", "k4_in_groups"])
def test_running_stats_after_one_step_equal_backprops(backend, k, mib, monkeypatch):
    passes = []
    real = backends.forward_tangents
    monkeypatch.setattr(backends, "forward_tangents", lambda *a, **kw: passes.append(a[3]) or real(*a, **kw))
    x = _r(6, 2, 6, 6, seed=7)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = _one_step_buffers(Backprop(), _bn_net(), x, y)
    net = _bn_net()
    est = ForwardGradient(k, seed=0, backend=backend, max_tangent_mib=mib)
    got = _one_step_buffers(est, net, x, y)
    assert ref.keys() == got.keys() and int(got["1.num_batches_tracked"]) == 1
    for n in ref:
        assert torch.equal(got[n], ref[n]), n  # exactly: the same primal forward, run once
    assert est.fallback_reason is None
    # the primal ran more than once in this step wherever k > 1 (the first call probes with one tangent, then
    # groups under the budget; a tiny budget gives one pass per tangent), yet the statistics moved once
    assert passes == ([] if backend == "func" else [1] * k if mib < 1 else [1, k - 1] if k > 1 else [1])
    # the module's buffers are plain tensors (torch.func's copy was read out of its transform)
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(b) for b in net.buffers())


def test_running_stats_after_a_fallback_equal_backprops():
    # the fast pass gets through the batch norms, then meets log1p (no rule) and is abandoned; torch.func redoes
    # the step: the statistics still move once
    x = _r(6, 2, 6, 6, seed=7)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = lambda o: torch.log1p(cross_entropy(o, y))  # noqa: E731
    ref = _one_step_buffers(Backprop(), _bn_net(), x, y, loss)
    est = ForwardGradient(3, seed=0, backend="auto")
    got = _one_step_buffers(est, _bn_net(), x, y, loss)
    assert est.fallback_reason is not None and "log1p" in est.fallback_reason
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_running_stats_follow_backprop_over_several_steps_and_eval_uses_them():
    x = _r(6, 2, 6, 6, seed=7)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    bp_net, fg_net = _bn_net(), _bn_net()
    for step in range(3):
        xs = x + 0.1 * step
        _one_step_buffers(Backprop(), bp_net, xs, y)
        _one_step_buffers(ForwardGradient(2, seed=step), fg_net, xs, y)  # no optimizer step: same parameters
    for (n, b), (_, c) in zip(bp_net.named_buffers(), fg_net.named_buffers()):
        assert torch.equal(b, c), n
    assert int(dict(fg_net.named_buffers())["1.num_batches_tracked"]) == 3
    bp_net.eval()
    fg_net.eval()
    torch.testing.assert_close(fg_net(x), bp_net(x), rtol=0, atol=0)


# -- scaled dot-product attention (torch.func has no rule for the kernel: the reference is its math) ------------
def _attention_reference(q, k, v, mask=None, is_causal=False, scale=None):
    """The fused kernel's definition, from its documentation: softmax(scale q k^T + bias) v."""
    scale = 1 / q.shape[-1] ** 0.5 if scale is None else scale
    bias = torch.zeros(q.shape[-2], k.shape[-2], dtype=q.dtype)
    if is_causal:
        bias = bias.masked_fill(~torch.ones_like(bias, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
    return torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1) @ v


MASKS = {"none": {}, "causal": {"is_causal": True}, "bool": {"mask": torch.rand(5, 6, generator=torch.Generator()
         .manual_seed(0)) > 0.3}, "float": {"mask": _r(5, 6, seed=9)}, "scale": {"scale": 0.3}}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("which", ["qkv", "q", "k", "v"])
def test_scaled_dot_product_attention(k, mask, which):
    opts = dict(MASKS[mask])
    if mask == "bool":
        opts["mask"][:, 0] = True  # every query sees at least one key
    lq = 6 if mask == "causal" else 5
    q, kk, v = _r(2, 3, lq, 4, seed=1), _r(2, 3, 6, 4, seed=2), _r(2, 3, 6, 5, seed=3)
    sdpa_kw = {"attn_mask": opts.get("mask"), "is_causal": opts.get("is_causal", False), "scale": opts.get("scale")}

    def pick(p):
        return (p.get("q", q), p.get("k", kk), p.get("v", v))

    params = {n: t for n, t in (("q", q), ("k", kk), ("v", v)) if n in which}
    tangents = {n: _r(k, *t.shape, seed=11 + i) for i, (n, t) in enumerate(params.items())}
    outs, touts = _engine(lambda p: F.scaled_dot_product_attention(*pick(p), **sdpa_kw), params, tangents)

    def reference(p):
        return _attention_reference(*pick(p), opts.get("mask"), opts.get("is_causal", False), opts.get("scale"))

    ref_outs, ref_touts = _reference(reference, params, tangents, k)
    torch.testing.assert_close(outs[0], ref_outs[0], **TOL)
    torch.testing.assert_close(touts[0], ref_touts[0], **TOL)


@pytest.mark.parametrize("rank1", [False, True])
def test_sdpa_in_a_projection_matches_the_written_out_attention(rank1):
    # the same network with the kernel and with attention written out (fwdgrad.nn.models.layers.SelfAttention)
    from fwdgrad.nn.models.layers import SelfAttention

    torch.manual_seed(0)
    att = SelfAttention(8, 2).to(DT)
    x = _r(3, 5, 8, seed=4)

    def with_kernel(p):
        q, kk, v = F.linear(x, p["in_proj.weight"], p["in_proj.bias"]).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.linear(F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(3, 5, 8),
                        p["out_proj.weight"], p["out_proj.bias"])

    params = {n: p.detach() for n, p in att.named_parameters()}
    tangents = {n: _r(4, *p.shape, seed=20 + i) for i, (n, p) in enumerate(params.items())}
    if rank1:
        tangents["in_proj.weight"] = RankOne(_r(4, 24, seed=30), _r(4, 8, seed=31), (24, 8))
    (o1,), (t1,) = _engine(with_kernel, params, tangents)
    (o2,), (t2,) = _engine(lambda p: functional_call(att, p, (x,)), params, tangents)
    torch.testing.assert_close(o1, o2, **TOL)
    torch.testing.assert_close(t1, t2, **TOL)


def test_sdpa_with_dropout_is_refused_not_approximated():
    from fwdgrad.engine import Unsupported, forward_tangents

    q = _r(2, 4, 3)
    with pytest.raises(Unsupported, match="dropout_p"):
        forward_tangents(lambda p: F.scaled_dot_product_attention(p["q"], q, q, dropout_p=0.1).sum(), {"q": q},
                         {"q": _r(1, 2, 4, 3)}, 1)


# -- smooth activations through their fused backward kernels ----------------------------------------------------
@pytest.mark.parametrize("act", [torch.tanh, torch.sigmoid, F.silu, F.gelu, lambda z: F.gelu(z, approximate="tanh"),
                                 Tensor.tanh, Tensor.sigmoid],
                         ids=["tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "Tensor.tanh", "Tensor.sigmoid"])
@pytest.mark.parametrize("k,rank1", [(1, False), (3, False), (3, True)])
def test_smooth_activations_match_jvp(act, k, rank1):
    # after a linear layer, so the tangent arrives batch-major (and, with rank-1 weight tangents, structured)
    _check(lambda p: (act(F.linear(X3, p["w"], p["b"])),), {"w": _r(5, 7, seed=2), "b": _r(5, seed=3)}, k, rank1)
