"""Background generation of training pairs, reproducible whatever the timing.

A pair is a function of one integer seed, and the seed of the next pair is one draw from the
trainer's ``torch.Generator`` (:func:`pddreg.train.synth_engine.draw_seed`). The prefetcher
keeps a *shadow copy* of that generator, draws the next ``depth`` seeds from it ahead of time
and makes their pairs on background workers (threads, or processes). When the trainer asks
for a pair, the generator's state is compared with the state the shadow had before the seed
of the oldest queued pair: equal states mean the same seed, so the queued pair is exactly the
pair direct generation would have made; the generator is then advanced by the one draw, as
direct generation would have. Any other state (a resumed checkpoint, other draws from the
generator between pairs) drops the queue and restarts from the generator's state, so the
sequence of pairs is always the one of direct generation: the same seed gives the same
pairs, with or without the prefetcher, however fast the workers are, and a checkpointed
generator state resumes the sequence.

When the trainer draws other random numbers from the same generator between pairs (e.g.
``TrainConfig.augment`` or ``crop``), the states never match: after a few such misses the
prefetcher logs a warning and makes pairs in the caller's thread (still the same pairs).

Several generators (the trainer keeps one per batch slot) each get their own queue.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing
from collections.abc import Callable
from typing import Any

import torch

from .synth_engine import draw_seed

__all__ = ["Prefetcher"]

log = logging.getLogger(__name__)

#: After this many misses without a hit since the last hit, stop speculating.
MAX_MISSES = 4
#: At most this many generators are followed at once (one per batch slot of a trainer).
MAX_STREAMS = 64


class Prefetcher:
    """Make ``make(seed)`` for the next seeds of a generator on background workers.

    Args:
        make: ``seed -> item`` (deterministic in ``seed``). For ``executor="process"`` it must
            be picklable (a module-level function).
        depth: items made ahead (the bound of the queue).
        workers: background threads or processes.
        executor: ``"thread"`` (torch releases the GIL in its kernels) or ``"process"``
            (``spawn`` start method; items travel back pickled).
        initializer, initargs: run once in each worker process (``executor="process"``).

    Use :meth:`next` with the generator the items would otherwise be drawn from; close the
    prefetcher (or use it as a context manager) to stop its workers.
    """

    def __init__(
        self,
        make: Callable[[int], Any],
        depth: int = 4,
        workers: int = 1,
        executor: str = "thread",
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
    ) -> None:
        if depth < 1 or workers < 1:
            raise ValueError(f"Prefetcher: depth and workers must be >= 1, got {depth}, {workers}")
        if executor == "thread":
            self._pool: cf.Executor = cf.ThreadPoolExecutor(
                workers, thread_name_prefix="pddreg-prefetch"
            )
        elif executor == "process":
            self._pool = cf.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=initializer,
                initargs=initargs,
            )
        else:
            raise ValueError(
                f"Prefetcher: executor must be 'thread' or 'process', got {executor!r}"
            )
        self._make = make
        self.depth = int(depth)
        # one queue and shadow generator per generator passed to next() (keyed by id): a
        # trainer with one generator per batch slot gets each slot's pairs made ahead
        self._streams: dict[int, _Stream] = {}
        self.hits = 0
        self.misses = 0
        self._misses_since_hit = 0
        self._speculate = True
        self._closed = False

    # -------------------------------------------------------------- public
    def next(self, gen: torch.Generator) -> Any:
        """``make(draw_seed(gen))``, from the queue when it was made ahead (``gen`` advances
        by exactly one draw either way)."""
        if self._closed:
            raise RuntimeError("Prefetcher: closed")
        if not self._speculate:
            return self._make(draw_seed(gen))
        stream = self._streams.get(id(gen))
        if stream is None:
            if len(self._streams) >= MAX_STREAMS:
                self._drop()
            stream = self._streams[id(gen)] = _Stream()
        state = gen.get_state()
        if not (stream.queue and torch.equal(stream.queue[0][0], state)):
            if stream.queue or stream.shadow is not None:
                self.misses += 1
                self._misses_since_hit += 1
                if self._misses_since_hit >= MAX_MISSES:
                    log.warning(
                        "Prefetcher: the generator is drawn from between pairs (%d misses in a "
                        "row); making pairs in the caller's thread from now on",
                        self._misses_since_hit,
                    )
                    self._drop()
                    self._speculate = False
                    return self._make(draw_seed(gen))
            stream.drop()
            stream.shadow = torch.Generator()
            stream.shadow.set_state(state)
            self._fill(stream)
        else:
            self.hits += 1
            self._misses_since_hit = 0
        _, seed, future = stream.queue.popleft()
        drawn = draw_seed(gen)
        if drawn != seed:  # cannot happen with equal states; kept as a guard
            raise RuntimeError("Prefetcher: seed mismatch for equal generator states")
        self._fill(stream)
        return future.result()

    def close(self) -> None:
        """Stop the workers (queued items are dropped)."""
        if not self._closed:
            self._closed = True
            self._drop()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    # -------------------------------------------------------------- internals
    def _fill(self, stream: _Stream) -> None:
        assert stream.shadow is not None
        while len(stream.queue) < self.depth:
            state = stream.shadow.get_state()
            seed = draw_seed(stream.shadow)
            stream.queue.append((state, seed, self._pool.submit(self._make, seed)))

    def _drop(self) -> None:
        for stream in self._streams.values():
            stream.drop()
        self._streams.clear()


class _Stream:
    """The pairs made ahead for one generator: ``(state before the seed, seed, future)``."""

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[torch.Tensor, int, cf.Future]] = collections.deque()
        self.shadow: torch.Generator | None = None

    def drop(self) -> None:
        for _, _, fut in self.queue:
            fut.cancel()
        self.queue.clear()
        self.shadow = None
