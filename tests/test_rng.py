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
    assert a.workers == 0  # no pool before the first parallel fill
    x = a.fill(torch.empty(50), 3, _normal)
    b.fill(torch.empty(50), 3, _normal)
    assert a.workers == b.workers == 2
    a.close()
    assert a.workers == 0 and b.workers == 2  # closing one pool leaves the other's
    assert torch.equal(a.fill(torch.empty(50), 3, _normal), x)  # a new pool after close, same numbers
    c = copy.deepcopy(a)  # e.g. an estimator copied: the copy starts without a pool
    assert c.chunk == 10 and c.workers == 0 and torch.equal(c.fill(torch.empty(50), 3, _normal), x)
    est = ForwardGradient(seed=1)
    est.sample_tangents({"w": torch.zeros(3 * rng.CHUNK)})
    assert est.rng.workers == 2 and copy.deepcopy(est).rng.workers == 0
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        ChunkedRNG(chunk=0)


def test_an_estimators_tangents_come_in_distinct_chunk_streams(monkeypatch, threads):
    # (independence of the thread count: test_fill_is_independent_of_the_thread_count_and_uses_the_pool)
    monkeypatch.setattr(rng, "CHUNK", 1000)  # read when an estimator builds its RNG
    torch.set_num_threads(2)
    v = ForwardGradient(distribution="normal", seed=3).sample_tangents({"w": torch.zeros(3500)})["w"].reshape(-1)
    assert not torch.equal(v[:1000], v[1000:2000])  # distinct chunk streams
    assert abs(float(v.std()) - 1) < 0.05
