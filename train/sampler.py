"""Step-indexed data order: which samples each optimizer step reads is a pure function of (seed, step).

A resumed run therefore reads exactly the batches the uninterrupted run would have read, whatever
the step it restarts from, and the processes of a distributed run split each global batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler


class BatchPlan(Protocol):
    """The fields of ``TrainConfig`` the data order depends on."""

    steps: int
    batch_size: int
    micro_batch_size: int
    seed: int
    group_by_length: int


class StepBatchSampler(Sampler[list[int]]):
    """Yields micro-batches of dataset indices; the order depends only on (seed, step).

    Epoch e is the permutation ``randperm(n, generator=seed + e)``; global step s takes the next
    ``batch_size`` indices of the endless stream (positions ``[s B, (s + 1) B)``), and this process
    takes its slice of them: micro-batch m of rank r is ``[(m W + r) M, (m W + r + 1) M)``.

    Length grouping (``group_by_length = k > 0``, with per-sample ``lengths``): the k global batches
    of steps ``[w k, (w + 1) k)`` form a mega-batch; its indices are sorted longest first (ties keep
    their random order), cut into k batches, and dealt to those k steps in an order drawn from
    ``(seed, w)``. Each micro-batch thus holds samples of similar length (less padding), each step
    still reads a pure function of (seed, step), and every sample is still read once per epoch.
    """

    def __init__(
        self, n: int, cfg: BatchPlan, start_step: int, rank: int, world: int, lengths: Sequence[int] | None = None
    ) -> None:
        if cfg.group_by_length and (lengths is None or len(lengths) != n):
            raise ValueError(f"group_by_length needs one length per sample ({n}), got {None if lengths is None else len(lengths)}")
        self.n, self.cfg, self.start_step, self.rank, self.world = n, cfg, start_step, rank, world
        self.lengths = lengths
        self._perms: dict[int, torch.Tensor] = {}
        self._window: dict[int, list[list[int]]] = {}

    def _index(self, flat: int) -> int:
        epoch, pos = divmod(flat, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))}
        return int(self._perms[epoch][pos])

    def global_batch(self, step: int) -> list[int]:
        """The ``batch_size`` indices of ``step``, over all processes, in micro-batch order."""
        size, k = self.cfg.batch_size, self.cfg.group_by_length
        if not k:
            return [self._index(step * size + j) for j in range(size)]
        window, slot = divmod(step, k)
        if window not in self._window:
            assert self.lengths is not None  # checked in __init__
            lengths = self.lengths
            mega = sorted((self._index(window * k * size + j) for j in range(k * size)), key=lambda i: -lengths[i])
            order = np.random.default_rng([self.cfg.seed, window]).permutation(k)
            self._window = {window: [mega[c * size:(c + 1) * size] for c in order]}
        return self._window[window][slot]

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.cfg.micro_batch_size
        for step in range(self.start_step, self.cfg.steps):
            batch = self.global_batch(step)
            for m in range(self.cfg.batch_size // (micro * self.world)):
                start = (m * self.world + self.rank) * micro
                yield batch[start:start + micro]

    def __len__(self) -> int:
        return (self.cfg.steps - self.start_step) * (self.cfg.batch_size // (self.cfg.micro_batch_size * self.world))


def _endless(samples: Iterable[Any]) -> Iterator[Any]:
    """``samples`` read again from the start each time it ends (epochs of a stream)."""
    while True:
        empty = True
        for sample in samples:
            empty = False
            yield sample
        if empty:
            raise ValueError("the streamed data set yielded no sample")


def stream_batches(samples: Iterable[Any], cfg: BatchPlan, start_step: int, rank: int, world: int) -> Iterator[list[Any]]:
    """Micro-batches of an iterable data set (a stream: no random access), step-indexed like
    :class:`StepBatchSampler`: step s reads stream positions ``[s B, (s + 1) B)`` (epochs repeat the
    stream), a resumed run first skips the ``start_step * B`` samples already trained on, and each
    process takes its slice. The stream's own order is used: shuffle it upstream with a fixed seed."""
    if cfg.group_by_length:
        raise ValueError("group_by_length needs random access; it does not apply to a streamed data set")
    stream = _endless(samples)
    for _ in range(start_step * cfg.batch_size):
        next(stream)
    micro = cfg.micro_batch_size
    for _ in range(start_step, cfg.steps):
        batch = [next(stream) for _ in range(cfg.batch_size)]
        for m in range(cfg.batch_size // (micro * world)):
            start = (m * world + rank) * micro
            yield batch[start:start + micro]
