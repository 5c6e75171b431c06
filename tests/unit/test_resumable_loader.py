"""The stateful training loader: a loader restored from the state of one that served k batches serves exactly the
batches after those k, for every kind of sampler the data modules use, without reading the skipped ones."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from stagelm.data.resumable import ResumableDataLoader


class CountingDataset(Dataset):
    """Items are their own index; remembers which were read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.read.append(i)
        return i


def _loader(dataset: Dataset, sampled: bool) -> ResumableDataLoader:
    sampler = None
    if sampled:  # what the SFT, preference and prompt data modules use
        generator = torch.Generator().manual_seed(7)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=40, generator=generator)
    return ResumableDataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True)


def test_resumed_loader_serves_exactly_the_remaining_batches() -> None:
    for sampled in (False, True):
        reference = _loader(CountingDataset(40), sampled)
        uninterrupted, next_epoch = [b.tolist() for b in reference], [b.tolist() for b in reference]
        first = _loader(CountingDataset(40), sampled)
        it = iter(first)
        before = [next(it).tolist() for _ in range(3)]
        state = first.state_dict()
        assert state == {"batches_served": 3}

        dataset = CountingDataset(40)
        resumed = _loader(dataset, sampled)
        resumed.load_state_dict(state)
        assert len(resumed) == len(first)  # the epoch's length stays the full one: Lightning counts from there
        after = [b.tolist() for b in resumed]
        assert before + after == uninterrupted  # nothing repeated, nothing skipped
        assert sorted(dataset.read) == sorted(i for b in after for i in b)  # skipped batches were never read
        assert resumed.state_dict() == {"batches_served": 10}
        assert [b.tolist() for b in resumed] == next_epoch  # and the next epoch is the uninterrupted run's
