"""A DataLoader whose position survives a restart.

Lightning saves `state_dict()` of every training loader that has one in the checkpoint and calls
`load_state_dict()` on resume, before iterating (its "stateful dataloader" interface). The state is the number of
batches this epoch's iteration has handed out; a resumed iteration skips that many batches of indices (without
loading their data) and continues with the next one, so no example is repeated or skipped across a resume. Every
stage's training data is a seeded sequence (a sampler with its own generator, or items drawn from (seed, index)),
so the batches after the skip are exactly those the uninterrupted run would have drawn. Under DDP each process
skips its own share: the distributed sampler splits the same index sequence the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset


class _SkipFirst:
    """A batch sampler without its first `n` batches (of indices: no data is read for them)."""

    def __init__(self, batches: Iterable[list[int]], n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.n)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A DataLoader with `state_dict()` / `load_state_dict()`: the batches served so far in this epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.dataset, IterableDataset):
            raise ValueError("ResumableDataLoader skips batches by index: give it a map-style dataset")
        # batch_size=None: each item of the dataset is a batch already (made-up batches, e.g. grouped by length)
        self._served = 0  # batches handed out by the current iteration, those skipped on resume included
        self._resume_at = 0  # batches the next iteration skips (set by load_state_dict)
        self._skip = 0  # set only while the next iteration's index sampler is created

    @property
    def _index_sampler(self) -> Any:
        # torch's iterators read the loader's index sampler once, when created: a skipping view of it then
        # makes both the in-process and the worker-process iterators start at the resumed position
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def __iter__(self) -> Iterator[Any]:
        start, self._resume_at = self._resume_at, 0
        self._skip = start
        try:
            iterator = super().__iter__()
        finally:
            self._skip = 0
        self._served = start
        return self._count(iterator)

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state.get("batches_served", 0))
