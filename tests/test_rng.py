"""Seeded-chunk random numbers: chunk c seeded (base + c) mod 2^32, parallel, independent of the thread count,
any block regenerable alone, and the thread pool owned by an object."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fwdgrad import ForwardGradient
from fwdgrad.estimators.tangents import rng
from fwdgrad.estimators.tangents.rng import ChunkedRNG


def _normal(b, g):
    return b.normal_(generator=g)


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_chunk_c_is_seeded_base_plus_c_modulo_2_32():
    buf = ChunkedRNG(chunk=4).fill(torch.empty(10), 2**32 - 1, _normal)
    expected = []
    for seed, size in ((2**32 - 1, 4), (0, 4), (1, 2)):  # the last chunk is short; the seeds wrap around
        expected.append(torch.empty(size).normal_(generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(buf, torch.cat(expected))


def test_fill_is_independent_of_the_thread_count_and_uses_the_pool(threads):
    seen = set()

    def op(b, g):
        seen.add(threading.current_thread().name)
        return b.normal_(generator=g)

    draws = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        draws[t] = ChunkedRNG(chunk=100).fill(torch.empty(1050), 7, op)
    assert torch.equal(draws[1], draws[2])
    assert any(name.startswith("fwdgrad-rng") for name in seen)  # the 2-thread fill ran on the pool


def test_any_block_of_whole_chunks_regenerates_alone():
    r = ChunkedRNG(chunk=8)
    whole = r.fill(torch.empty(40), 100, _normal)
    # chunks 2..4 (entries 16..40) drawn again on their own, from chunk id 100 + 2
    assert torch.equal(r.fill(torch.empty(24), 102, _normal), whole[16:])
    assert r.num_chunks(40) == 5 and r.num_chunks(0) == 1  # an empty block still owns a chunk id


def test_each_rng_owns_its_pool_and_can_be_copied(threads):
    torch.set_num_threads(2)
    a, b = ChunkedRNG(chunk=10), ChunkedRNG(chunk=10)
    x = a.fill(torch.empty(50), 3, _normal)
    b.fill(torch.empty(50), 3, _normal)
    assert a._pool is not None and a._pool is not b._pool
    a.close()
    assert a._pool is None
    assert torch.equal(a.fill(torch.empty(50), 3, _normal), x)  # a new pool after close, same numbers
    c = copy.deepcopy(a)  # e.g. an estimator copied: the copy starts without a pool
    assert c.chunk == 10 and c._pool is None and torch.equal(c.fill(torch.empty(50), 3, _normal), x)
    est = copy.deepcopy(ForwardGradient(seed=1))
    assert est.rng._pool is None
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        ChunkedRNG(chunk=0)


def test_chunked_rng_is_reproducible_across_thread_counts(monkeypatch):
    monkeypatch.setattr(rng, "CHUNK", 1000)  # read when an estimator builds its RNG
    p = {"w": torch.zeros(3500)}
    threads = torch.get_num_threads()
    draws = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for dist in ("normal", "rademacher"):
                draws[t, dist] = ForwardGradient(distribution=dist, seed=3).sample_tangents(p)["w"]
    finally:
        torch.set_num_threads(threads)
    for dist in ("normal", "rademacher"):
        assert torch.equal(draws[1, dist], draws[2, dist])
    v = draws[1, "normal"].reshape(-1)
    assert not torch.equal(v[:1000], v[1000:2000])  # distinct chunk streams
    assert abs(float(v.std()) - 1) < 0.05
