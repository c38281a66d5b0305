"""``counter_normal`` tangents (fwdgrad.estimators.tangents.counter): N(0, 1) entries computed from (chunk seed,
place), one compiled kernel. Their statistics, the layout guarantees the estimators rely on (chunks and blocks
regenerated alone, any thread count), the compiled kernel against the eager formula, and the visible fallback.

Statistical bounds are 5 standard errors of the statistic under i.i.d. N(0, 1) entries (fixed seeds): the mean
has standard error 1/sqrt(n), the variance sqrt(2/n), the fourth moment sqrt((105 - 9)/n), a correlation
1/sqrt(n); the Kolmogorov-Smirnov distance exceeds 1.95/sqrt(n) with probability 0.001.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fwdgrad import ForwardGradient
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import TANGENT_DISTRIBUTIONS, CounterNormal
from fwdgrad.estimators.tangents import counter
from fwdgrad.estimators.tangents.seeded import chunk_reads_exact

LOG_CHUNK = 14  # chunks of 2^14 entries: a 2^20-entry block spans 64 of them


def _filled(n: int, seed0: int, chunk: int = 1 << LOG_CHUNK, dist: CounterNormal | None = None) -> torch.Tensor:
    return (dist or TANGENT_DISTRIBUTIONS["counter_normal"]).fill(torch.empty(n), seed0, chunk)


def _eager(n: int, seed0: int, chunk: int = 1 << LOG_CHUNK) -> torch.Tensor:
    return counter.counter_normal_(torch.empty(n), torch.tensor(counter._i32(seed0), dtype=torch.int32), chunk)


def test_entries_are_independent_standard_normals():
    n = 1 << 20
    z = _filled(n, 12345).double()
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float(z.pow(4).mean()) - 3) < 5 * math.sqrt(96) * se
    # Kolmogorov-Smirnov distance to the normal CDF
    s = z.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float(torch.maximum(ranks - cdf, cdf - (ranks - 1 / n)).max()) < 1.95 * se
    # neighbours, and the same place in consecutive chunks (consecutive keys), are uncorrelated
    assert abs(float((z[1:] * z[:-1]).mean())) < 5 * se
    chunks = z.view(-1, 1 << LOG_CHUNK)
    assert abs(float((chunks[1:] * chunks[:-1]).mean())) < 5 * se
    # consecutive steps' bases (seed0 and seed0 + 1) give unrelated blocks, not shifted copies
    w = _filled(n, 12346).double()
    assert abs(float((z * w).mean())) < 5 * se
    assert abs(float((z[: n - (1 << LOG_CHUNK)] * w[1 << LOG_CHUNK:]).mean())) < 5 * se


def test_compiled_kernel_computes_the_eager_formula():
    for n, seed0 in [(1 << 16, 0), (50_001, 2**32 - 3), (7, 99)]:  # whole chunks; a tail; seeds wrapping mod 2^32
        torch.testing.assert_close(_filled(n, seed0), _eager(n, seed0), rtol=1e-5, atol=1e-5)


def test_chunks_and_blocks_regenerated_alone_equal_the_whole_fill():
    e = 1 << LOG_CHUNK
    whole = _filled(7 * e // 2, 40)
    for c in range(4):  # chunk c alone, with its own seed, is entries [c e, (c+1) e) of the whole
        alone = _filled(min(e, whole.numel() - c * e), 40 + c)
        assert torch.equal(alone, whole[c * e: (c + 1) * e])
    assert torch.equal(_filled(2 * e + 5, 40)[: 2 * e], whole[: 2 * e])
    assert chunk_reads_exact(TANGENT_DISTRIBUTIONS["counter_normal"], torch.float32, torch.device("cpu"))


def test_numbers_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _filled(100_003, 5)
        torch.set_num_threads(2)
        two = _filled(100_003, 5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_blocks_beyond_one_kernel_call_are_filled_in_whole_chunk_pieces(monkeypatch):
    whole = _filled(5 << LOG_CHUNK, 77)
    monkeypatch.setattr(counter, "_MAX_PIECE", 2 << LOG_CHUNK)
    assert torch.equal(_filled(5 << LOG_CHUNK, 77), whole)


def test_forward_gradient_with_counter_normal_is_d_times_v_and_regenerates_exactly():
    torch.manual_seed(0)
    params = {"w": torch.randn(30, 20, dtype=torch.float64), "b": torch.randn(30, dtype=torch.float64)}

    def loss_fn(p):
        return (torch.tanh(p["w"] @ torch.linspace(-1, 1, 20, dtype=torch.float64) + p["b"]) ** 2).sum()

    exact = torch.func.grad(loss_fn)(params)
    tangents = ForwardGradient(3, distribution="counter_normal", seed=4).sample_tangents(params)
    d = sum((tangents[n].reshape(3, -1) @ exact[n].reshape(-1)) for n in params)
    _, kept = ForwardGradient(3, distribution="counter_normal", seed=4, regenerate_tangents=False)(loss_fn, params)
    _, regen = ForwardGradient(3, distribution="counter_normal", seed=4, regenerate_tangents=True)(loss_fn, params)
    for n in params:
        expected = (d.view(3, *[1] * exact[n].dim()) * tangents[n]).mean(0)
        torch.testing.assert_close(kept[n], expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(regen[n], kept[n], rtol=1e-12, atol=1e-14)


def test_a_failing_or_wrong_compiled_kernel_falls_back_to_the_eager_formula_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore text")

    dist = CounterNormal()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with pytest.warns(RuntimeWarning, match="compiling it failed .RuntimeError: no C.. compiler found"):
        got = _filled(1000, 3, dist=dist)
    torch.testing.assert_close(got, _eager(1000, 3))

    wrong = CounterNormal()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda out, seed, log: out.fill_(0.5)))
    with pytest.warns(RuntimeWarning, match="disagrees with the eager formula"):
        got = _filled(1000, 3, dist=wrong)
    torch.testing.assert_close(got, _eager(1000, 3))
    with warnings.catch_warnings():  # from then on the eager formula, without a new warning
        warnings.simplefilter("error")
        torch.testing.assert_close(_filled(1000, 4, dist=wrong), _eager(1000, 4))


def test_chunks_of_any_size_follow_the_same_formula_and_bad_sizes_are_refused():
    # a chunk that is not a power of two takes the reference formula (no compiled kernel): same guarantees
    whole = _filled(3500, 8, chunk=1000)
    torch.testing.assert_close(whole, _eager(3500, 8, chunk=1000), rtol=0, atol=0)
    assert torch.equal(_filled(500, 11, chunk=1000), whole[3000:])
    dist = TANGENT_DISTRIBUTIONS["counter_normal"]
    for chunk in (0, 2**30 + 1):
        with pytest.raises(ConfigError, match="need a chunk of 1 to 2.30 entries .int32 indices., got"):
            dist.fill(torch.empty(10), 0, chunk)
