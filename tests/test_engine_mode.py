"""The engine's structure: the rule registry, and per-pass state (threads, nested passes, tensors that outlive
their pass). References are ``torch.func.jvp`` and sequential runs of the same passes.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from fwdgrad import ForwardGradient
from fwdgrad.engine import forward_tangents, register, supported_functions
from fwdgrad.engine import rule_table as registry
from fwdgrad.errors import ConfigError

DT = torch.float64


def _jvps(fn, params, tangents, k):
    """``torch.func.jvp`` once per tangent: the reference directional derivatives."""
    names = list(params)
    f = lambda *xs: fn(dict(zip(names, xs)))  # noqa: E731
    prim = tuple(params[n] for n in names)
    return torch.stack([jvp(f, prim, tuple(tangents[n][i] for n in names))[1] for i in range(k)])


# -- registry -----------------------------------------------------------------------------------------------


def test_registering_a_function_twice_is_refused_and_changes_nothing():
    before = registry.lookup(torch.exp)

    def fresh(x):  # a function no rule knows
        return x

    with pytest.raises(ConfigError, match=r"registered twice for .*exp"):
        register(fresh, torch.exp)(lambda s, x: None)
    assert registry.lookup(torch.exp) is before
    assert registry.lookup(fresh) is None  # refused as a whole, not half-registered


def test_supported_functions_lists_every_family():
    names = supported_functions()
    assert list(names) == sorted(names)
    for n in ("linear", "conv2d", "max_pool2d", "relu", "add", "cross_entropy", "reshape", "cat",
              "autograd_function_apply"):
        assert n in names


def test_a_new_rule_joins_without_editing_the_engine():
    x = torch.randn(5, dtype=DT)
    fn = lambda p: torch.log1p(p["v"].square()).sum()  # noqa: E731  (log1p has no rule of its own)
    est = ForwardGradient(2, seed=0, backend="auto")
    params = {"v": x}
    try:

        @register(torch.log1p)
        def _log1p(s, x):  # d log(1 + x) = x_dot / (1 + x)
            return s.attach(torch.log1p(x), s.tangent(x) / (1 + x))

        _, g = est(fn, params)
        assert est.fallback_reason is None
    finally:
        registry._RULES.pop(torch.log1p, None)  # leave the table as other tests expect it
    torch.testing.assert_close(g["v"], ForwardGradient(2, seed=0, backend="func")(fn, params)[1]["v"])


# -- per-pass state -----------------------------------------------------------------------------------------


class _Reverse(torch.autograd.Function):
    """Gradient reversal: its jvp must be used in every thread (and k > 1 batches it with vmap)."""

    forward = staticmethod(lambda x: x.view_as(x))
    setup_context = staticmethod(lambda ctx, inputs, output: None)
    jvp = staticmethod(lambda ctx, t: -t)


def _problems():
    """Two passes using the rules shared by several functions (view/cat/to) and a custom Function, of
    different k and sizes."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    x = r(64, 96)
    a = (lambda p: torch.relu(F.linear(x, p["w"], p["b"])).view(64, 8, 16).sum(),
         {"w": r(128, 96), "b": r(128)})

    def fb(p):
        h = torch.cat([p["u"], 2 * p["u"]], 0).to(torch.float32).reshape(-1, 50).tanh()
        return _Reverse.apply(h).double().sum()

    b = (fb, {"u": r(300, 20)})
    out = []
    for (fn, params), k in ((a, 2), (b, 5)):
        tangents = {n: r(k, *p.shape) for n, p in params.items()}
        out.append((fn, params, tangents, k))
    return out


def _run(problem, stats):
    fn, params, tangents, k = problem
    return forward_tangents(fn, params, tangents, k, stats)


def test_passes_in_two_threads_at_once_match_sequential_passes():
    problems = _problems()
    refs = []
    for prob in problems:
        stats = {}
        refs.append((_run(prob, stats), stats["max_bytes_per_tangent"]))
    rounds = 25
    results = [[] for _ in problems]
    barrier = threading.Barrier(len(problems))
    errors = []

    def worker(i):
        try:
            barrier.wait()
            for _ in range(rounds):
                stats = {}
                results[i].append((_run(problems[i], stats), stats["max_bytes_per_tangent"]))
        except BaseException as e:  # reported below: an exception in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (ref, ref_bytes), got in zip(refs, results):
        assert len(got) == rounds
        for (loss, d), per in got:
            torch.testing.assert_close(loss, ref[0], rtol=0, atol=0)
            torch.testing.assert_close(d, ref[1], rtol=0, atol=0)
            assert per == ref_bytes  # each pass measured its own tangents


@pytest.mark.parametrize("act", [torch.tanh, torch.sigmoid, F.silu], ids=["tanh", "sigmoid", "silu"])
def test_a_pass_inside_a_pass_gives_both_their_derivatives(act):
    # (the activations' rules use fused backward kernels in a plain pass, elementwise ops the outer pass can see
    # when nested; gelu's would need erf, which has no rule, so a nested gelu is refused and falls back)
    g = torch.Generator().manual_seed(1)
    w, tw = torch.randn(4, generator=g, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)
    v, tv = torch.randn(4, generator=g, dtype=DT), torch.randn(2, 4, generator=g, dtype=DT)
    inner_seen = []

    def inner(q, w_):
        return act(q["v"] * w_).sum()

    def outer(p, record):
        w_ = p["w"]
        li, di = forward_tangents(lambda q: inner(q, w_), {"v": v}, {"v": tv}, 2)  # closes over w_
        record.append((li, di))
        return (w_.sin() * li).sum() + (w_ * di.sum()).sum()

    loss, d = forward_tangents(lambda p: outer(p, inner_seen), {"w": w}, {"w": tw}, 3)
    li_ref = inner({"v": v}, w)
    di_ref = _jvps(lambda q: inner(q, w), {"v": v}, {"v": tv}, 2)
    torch.testing.assert_close(inner_seen[0][0], li_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(inner_seen[0][1], di_ref, rtol=1e-12, atol=1e-14)
    # the inner results are detached: constants for the outer pass, as with torch.func
    outer_ref = lambda p: (p["w"].sin() * li_ref).sum() + (p["w"] * di_ref.sum()).sum()  # noqa: E731
    d_ref = _jvps(outer_ref, {"w": w}, {"w": tw}, 3)
    torch.testing.assert_close(loss, outer({"w": w}, []), rtol=1e-12, atol=0)
    torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-14)


def test_a_tensor_kept_from_an_earlier_pass_is_a_constant_in_a_later_one():
    g = torch.Generator().manual_seed(2)
    w, tw = torch.randn(3, generator=g, dtype=DT), torch.randn(2, 3, generator=g, dtype=DT)
    u, tu = torch.randn(3, generator=g, dtype=DT), torch.randn(2, 3, generator=g, dtype=DT)
    kept = []

    def first(p):
        h = p["w"] * 2  # carries the first pass's tangents
        kept.append(h)
        return h.sum()

    forward_tangents(first, {"w": w}, {"w": tw}, 2)
    _, d = forward_tangents(lambda p: (p["u"] * kept[0]).sum(), {"u": u}, {"u": tu}, 2)
    torch.testing.assert_close(d, tu @ (2 * w), rtol=1e-12, atol=0)


def test_a_pass_under_inference_mode_still_differentiates():
    fn, params, tangents, k = _problems()[0]
    ref = forward_tangents(fn, params, tangents, k)
    with torch.inference_mode():
        got = forward_tangents(fn, params, tangents, k)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
