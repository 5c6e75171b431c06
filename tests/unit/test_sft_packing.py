"""Packed SFT rows: the packing keeps every drawn example once and within its row, and a packed forward gives
each conversation exactly the logits it gets alone, so packing changes the speed of SFT, not what it learns."""

from __future__ import annotations

import torch

from stagelm.data.instruct import IGNORE_INDEX, PackedCollator, SFTCollator, pack_rows
from stagelm.model import Transformer
from tests.conftest import tiny_model_config


def test_rows_stay_within_width_and_fill_most_of_it() -> None:
    lengths = [5, 9, 3, 7, 10, 2, 6, 8]
    rows = pack_rows(lengths, width=10, n_rows=3000, generator=torch.Generator().manual_seed(0))
    assert len(rows) == 3000
    sizes = [sum(lengths[i] for i in row) for row in rows]
    assert max(sizes) <= 10
    assert sum(sizes) / (10 * len(rows)) > 0.85  # first-fit over 16 open rows leaves little room unused
    # uniform draws, each used once: every example appears equally often up to sampling noise (counts ~ Poisson),
    # long ones too (2 of the 8 lengths take more than half a row)
    counts = torch.bincount(torch.tensor([i for row in rows for i in row]), minlength=8).float()
    assert ((counts - counts.mean()).abs() < 4 * counts.mean().sqrt()).all()


def test_rows_are_reproducible_from_the_seed() -> None:
    lengths = list(range(1, 30))
    again = [pack_rows(lengths, 40, 50, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert again[0] == again[1]
    assert again[0] != pack_rows(lengths, 40, 50, torch.Generator().manual_seed(4))


def test_packed_collator_positions_labels_and_mask_by_hand() -> None:
    a = ([1, 2, 3], [False, True, True])  # inputs [1, 2], targets [2, 3]
    b = ([4, 5, 6, 7], [False, False, True, True])  # inputs [4, 5, 6], targets [5, 6, 7] (5 masked)
    batch = PackedCollator(pad_id=0)([[a, b], [b]])
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 6], [4, 5, 6, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["positions"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # b's first token does not see a
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert batch["attention_mask"][1, 0, 3].int().tolist() == [0, 0, 0, 1, 0]  # padding sees padding only


def test_a_packed_row_gives_each_conversation_its_logits_alone() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(vocab_size=16)).eval()
    examples = [(torch.randint(1, 16, (n,)).tolist(), [False] + [True] * (n - 1)) for n in (7, 12, 5)]
    packed = PackedCollator(pad_id=0)([examples])
    out = model(packed["input_ids"], attention_mask=packed["attention_mask"], positions=packed["positions"])
    at = 0
    for ids, mask in examples:
        alone = SFTCollator(pad_id=0)([(ids, mask)])
        expected = model(alone["input_ids"]).logits[0]
        n = len(ids) - 1
        torch.testing.assert_close(out.logits[0, at : at + n], expected, atol=1e-5, rtol=1e-5)
        at += n
