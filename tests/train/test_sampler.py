"""Length-grouped step-indexed batches and streamed batches: pure functions of (seed, step)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from train.sampler import StepBatchSampler, stream_batches


@dataclass
class Plan:
    steps: int = 12
    batch_size: int = 8
    micro_batch_size: int = 2
    seed: int = 3
    group_by_length: int = 0


N = 37
LENGTHS = torch.randint(1, 200, (N,), generator=torch.Generator().manual_seed(1)).tolist()


def _steps(sampler: StepBatchSampler, per_step: int) -> list[list[int]]:
    flat = list(sampler)
    return [sum(flat[i:i + per_step], []) for i in range(0, len(flat), per_step)]


def test_length_grouping_regroups_each_window_by_length() -> None:
    k = 3
    plain = _steps(StepBatchSampler(N, Plan(), 0, 0, 1), 4)
    grouped = _steps(StepBatchSampler(N, Plan(group_by_length=k), 0, 0, 1, LENGTHS), 4)
    for w in range(0, 12, k):
        # the same samples in each window of k steps, so epochs still cover the data once
        assert sorted(sum(grouped[w:w + k], [])) == sorted(sum(plain[w:w + k], []))
        batches = sorted(grouped[w:w + k], key=lambda b: -LENGTHS[b[0]])
        for batch in batches:  # each batch is sorted longest first ...
            assert [LENGTHS[i] for i in batch] == sorted((LENGTHS[i] for i in batch), reverse=True)
        for longer, shorter in zip(batches, batches[1:], strict=False):  # ... and a slice of the sorted window
            assert min(LENGTHS[i] for i in longer) >= max(LENGTHS[i] for i in shorter)

    def padded(steps: list[list[int]]) -> int:  # tokens a right-padded micro-batch of 2 occupies
        return sum(2 * max(LENGTHS[i] for i in step[m:m + 2]) for step in steps for m in range(0, 8, 2))

    assert padded(grouped) < 0.85 * padded(plain)


def test_length_grouping_is_a_function_of_the_step() -> None:
    cfg = Plan(group_by_length=4)
    full = list(StepBatchSampler(N, cfg, 0, 0, 1, LENGTHS))
    for start in (1, 5, 6):
        assert list(StepBatchSampler(N, cfg, start, 0, 1, LENGTHS)) == full[start * 4:]
    ranks = [list(StepBatchSampler(N, cfg, 0, r, 2, LENGTHS)) for r in (0, 1)]
    sampler = StepBatchSampler(N, cfg, 0, 0, 1, LENGTHS)
    for step in range(cfg.steps):  # ranks alternate micro-batches of the step's global batch
        together = [ranks[m % 2][step * 2 + m // 2] for m in range(4)]
        assert sum(together, []) == sampler.global_batch(step)
    with pytest.raises(ValueError, match="group_by_length needs one length per sample"):
        StepBatchSampler(N, cfg, 0, 0, 1, None)


class Stream:
    """An iterable without len(): read in order, each pass the same."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def test_stream_batches_read_the_stream_in_step_order() -> None:
    cfg = Plan(steps=5, batch_size=4, micro_batch_size=2)
    full = list(stream_batches(Stream(6), cfg, 0, 0, 1))
    assert full == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1]]
    assert list(stream_batches(Stream(6), cfg, 3, 0, 1)) == full[6:]
    assert list(stream_batches(Stream(6), cfg, 0, 1, 2)) == full[1::2]
    with pytest.raises(ValueError, match="yielded no sample"):
        list(stream_batches(Stream(0), cfg, 0, 0, 1))
    with pytest.raises(ValueError, match="does not apply to a streamed data set"):
        list(stream_batches(Stream(6), Plan(group_by_length=2), 0, 0, 1))
