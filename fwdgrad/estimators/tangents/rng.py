"""Seeded-chunk random numbers: reproducible, filled in parallel, independent of the thread count.

A call fills a flat buffer in chunks of ``chunk`` entries; chunk ``c`` comes from its own ``torch.Generator``
seeded ``(base + c) mod 2^32``, where ``base`` is one draw from the estimator's own generator per step. Hence

* the numbers depend only on the seed and the buffer layout, never on how many threads fill it;
* any chunk, and so any block of whole chunks, can be regenerated later on its own (regenerated tangents);
* on CPU the chunks run on a thread pool: torch's CPU generator is sequential, but ATen releases the GIL
  while filling, so the chunks really run in parallel.

The pool belongs to a :class:`ChunkedRNG` object (one per estimator), not to the module: it is created on
first use with as many workers as ``torch.get_num_threads()``, rebuilt if that changes, and shut down when
its owner is garbage-collected or :meth:`ChunkedRNG.close` is called.
"""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["CHUNK", "ChunkedRNG", "ChunkJob", "RandomOp", "SeededGenerators", "chunk_jobs", "num_chunks", "run_serial"]

#: Default chunk length (entries). Read when a :class:`ChunkedRNG` is built, so a test may patch it.
CHUNK = 1 << 19
#: An in-place random fill of a 1-D tensor from a generator, e.g. ``lambda b, g: b.normal_(generator=g)``.
RandomOp = Callable[[Tensor, torch.Generator], object]


def num_chunks(n: int, chunk: int) -> int:
    """Chunks needed for ``n`` random numbers (at least one, so every block owns a chunk id)."""
    return max(1, -(-n // chunk))


@dataclass(frozen=True, eq=False)
class ChunkJob:
    """Apply ``op`` to ``part`` with a fresh generator seeded ``seed mod 2^32``."""

    op: RandomOp
    part: Tensor
    seed: int

    def __call__(self) -> None:
        g = torch.Generator(device=self.part.device)
        g.manual_seed(self.seed % 2**32)
        self.op(self.part, g)


def chunk_jobs(buf: Tensor, seed0: int, op: RandomOp, chunk: int) -> List[ChunkJob]:
    """Jobs applying the random ``op`` to the 1-D ``buf``, chunk c (``chunk`` entries) seeded ``seed0 + c``."""
    return [ChunkJob(op, buf[c * chunk: (c + 1) * chunk], seed0 + c) for c in range(num_chunks(buf.numel(), chunk))]


def run_serial(jobs: Sequence[Callable[[], None]]) -> None:
    """Run the jobs one after another (same numbers as in parallel: each job owns its generator)."""
    for job in jobs:
        job()


class ChunkedRNG:
    """Chunked random fills run on this object's own thread pool (module docstring)."""

    def __init__(self, chunk: Optional[int] = None) -> None:
        self.chunk = CHUNK if chunk is None else int(chunk)
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 entries, got {self.chunk}.")
        self._pool: Optional[ThreadPoolExecutor] = None
        self._workers = 0
        self._finalizer: Optional[weakref.finalize] = None

    @property
    def workers(self) -> int:
        """Threads in this object's pool now: 0 before the first parallel fill, after :meth:`close` and in a copy."""
        return self._workers

    def num_chunks(self, n: int) -> int:
        """Chunk ids a block of ``n`` random numbers takes."""
        return num_chunks(n, self.chunk)

    def jobs(self, buf: Tensor, seed0: int, op: RandomOp) -> List[ChunkJob]:
        """The jobs filling the 1-D ``buf`` with ``op``, chunk c seeded ``seed0 + c`` (run them with :meth:`run`)."""
        return chunk_jobs(buf, seed0, op, self.chunk)

    def run(self, jobs: Sequence[ChunkJob]) -> None:
        """Run ``jobs``: on the pool when there are several CPU jobs and torch may use several threads."""
        threads = torch.get_num_threads()  # as many workers as torch may use for its own ops
        if len(jobs) < 2 or threads < 2 or any(job.part.device.type != "cpu" for job in jobs):
            run_serial(jobs)  # GPU generators are asynchronous already; one chunk needs no pool
            return
        for _ in self._executor(threads).map(ChunkJob.__call__, jobs):
            pass

    def fill(self, buf: Tensor, seed0: int, op: RandomOp) -> Tensor:
        """Fill the 1-D ``buf`` in seeded chunks starting at id ``seed0``; returns ``buf``."""
        self.run(self.jobs(buf, seed0, op))
        return buf

    def close(self) -> None:
        """Shut the pool down (a later :meth:`run` starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # calls pool.shutdown once
        self._pool, self._finalizer, self._workers = None, None, 0

    def _executor(self, threads: int) -> ThreadPoolExecutor:
        if self._pool is None or self._workers != threads:
            self.close()
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fwdgrad-rng")
            self._workers = threads
            # Idle workers would otherwise live until the process exits; the finalizer holds the pool, not self.
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    # A pool cannot be pickled or copied: a copy (e.g. of an estimator) starts without one.
    def __getstate__(self) -> Dict[str, int]:
        return {"chunk": self.chunk}

    def __setstate__(self, state: Dict[str, int]) -> None:
        self.__init__(state["chunk"])  # type: ignore[misc]


class SeededGenerators:
    """Mixin for an estimator that draws its own random numbers: one ``torch.Generator`` per device, created on
    first use and seeded with ``self.seed``, so its estimates never depend on torch's global random state (or on
    what else the process draws). The generators live in ``self._generators`` (a checkpoint saves their states)."""

    seed: int

    def generator(self, device: torch.device) -> torch.Generator:
        """The estimator's own generator on ``device`` (created on first use, seeded with ``seed``)."""
        generators: Dict[torch.device, torch.Generator] = self.__dict__.setdefault("_generators", {})
        device = torch.device(device)
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return generators[device]

    def generator_states(self) -> Dict[str, Tensor]:
        """The generators' states by device name (for a checkpoint: the next random numbers)."""
        generators: Dict[torch.device, torch.Generator] = self.__dict__.get("_generators", {})
        return {str(d): g.get_state() for d, g in generators.items()}

    def load_generator_states(self, states: Dict[str, Tensor]) -> None:
        """Restore what :meth:`generator_states` returned."""
        for device, state in dict(states).items():
            self.generator(torch.device(device)).set_state(state)
