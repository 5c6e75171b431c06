"""SFT's length-grouped batches: reproducible from the seed, every draw used once (frequencies stay uniform),
lengths alike within a batch, so little of it is padding, and resumable like any training loader."""

from __future__ import annotations

import torch

from stagelm.data.instruct import Batches, SFTCollator, length_grouped_batches
from stagelm.data.resumable import ResumableDataLoader


def test_batches_by_hand_one_group() -> None:
    # one group of 2 batches of 2: the 4 draws sorted by length, cut in two, served in a random order
    lengths = [30, 10, 20, 40]
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(4, (4,), generator=g).tolist()
    order = torch.randperm(2, generator=g).tolist()
    by_length = sorted(draws, key=lambda i: lengths[i])
    expected = [[by_length[:2], by_length[2:]][k] for k in order]
    assert length_grouped_batches(lengths, 2, 2, torch.Generator().manual_seed(0), group=2) == expected


def test_batches_are_reproducible_uniform_and_alike_in_length() -> None:
    lengths = [5 + 7 * i for i in range(40)]
    batches = length_grouped_batches(lengths, 8, 800, torch.Generator().manual_seed(1))
    assert batches == length_grouped_batches(lengths, 8, 800, torch.Generator().manual_seed(1))
    assert batches != length_grouped_batches(lengths, 8, 800, torch.Generator().manual_seed(2))
    assert len(batches) == 800 and all(len(b) == 8 for b in batches)
    counts = torch.bincount(torch.tensor([i for b in batches for i in b]), minlength=40).float()
    assert ((counts - counts.mean()).abs() < 4 * counts.mean().sqrt()).all()  # ~Poisson around 160 each
    # padding: each batch padded to its longest; random batches of these lengths are about 40% padding
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths[i] for b in batches for i in b) / padded > 0.85


def test_a_resumed_loader_serves_the_remaining_batches() -> None:
    examples = [(list(range(1, n + 1)), [False] + [True] * (n - 1)) for n in range(2, 30)]
    batches = length_grouped_batches([len(ids) for ids, _ in examples], 4, 10, torch.Generator().manual_seed(0))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(Batches(examples, batches), batch_size=None, collate_fn=SFTCollator(0))

    full = [b["input_ids"].tolist() for b in loader()]
    first = loader()
    it = iter(first)
    seen = [next(it)["input_ids"].tolist() for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert seen + [b["input_ids"].tolist() for b in resumed] == full
