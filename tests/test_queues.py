import pytest
import torch
import torch.nn.functional as F

from queues.feature_queue import FeatureQueue


def naive_queue(size, dim, batches):
    """Reference: write one key at a time into a ring buffer."""
    keys = [None] * size
    ptr = 0
    for batch in batches:
        for row in batch:
            keys[ptr] = row
            ptr = (ptr + 1) % size
    return keys, ptr


def test_init_is_l2_normalised():
    q = FeatureQueue(16, 4, torch.Generator().manual_seed(0))
    assert q.keys.shape == (16, 4)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(16))
    assert int(q.ptr) == 0 and q.fill_fraction == 0.0


@pytest.mark.parametrize("sizes", [[3, 3, 3, 3], [5, 7, 1], [10], [13], [2, 11, 4, 40]])
def test_wraparound_matches_one_key_at_a_time(sizes):
    size, dim = 10, 3
    q = FeatureQueue(size, dim)
    batches = [F.normalize(torch.randn(n, dim), dim=1) for n in sizes]
    for b in batches:
        q.enqueue(b)
    ref, ptr = naive_queue(size, dim, batches)
    assert int(q.ptr) == ptr
    for slot, key in enumerate(ref):
        if key is not None:
            torch.testing.assert_close(q.keys[slot], key)
    assert int(q.filled) == min(sum(sizes), size)


def test_valid_mask_leaves_rows_out():
    q = FeatureQueue(8, 2)
    keys = torch.arange(12, dtype=torch.float32).view(6, 2)
    valid = torch.tensor([True, False, True, False, False, True])
    q.enqueue(keys, valid)
    torch.testing.assert_close(q.keys[:3], keys[valid])
    assert int(q.ptr) == 3


def test_state_dict_round_trip_is_exact():
    q = FeatureQueue(12, 5)
    q.enqueue(torch.randn(7, 5))
    restored = FeatureQueue(12, 5, torch.Generator().manual_seed(99))
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.keys, q.keys) and int(restored.ptr) == 7 and int(restored.filled) == 7
    assert set(q.state_dict()) == {"keys", "ptr", "filled"}  # persistent: saved with the checkpoint


def test_rejects_wrong_dim():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        FeatureQueue(8, 4).enqueue(torch.randn(2, 3))


def test_valid_masks_across_the_end_match_one_key_at_a_time():
    size, dim = 10, 3
    gen = torch.Generator().manual_seed(3)
    q = FeatureQueue(size, dim, gen)
    untouched = q.keys.clone()
    batches, masks = [], []
    for n in (4, 6, 9, 7):
        batches.append(F.normalize(torch.randn(n, dim, generator=gen), dim=1))
        masks.append(torch.rand(n, generator=gen) < 0.6)
        q.enqueue(batches[-1], masks[-1])
    ref, ptr = naive_queue(size, dim, [b[m] for b, m in zip(batches, masks)])
    assert int(q.ptr) == ptr and int(q.filled) == min(sum(int(m.sum()) for m in masks), size)
    for slot, key in enumerate(ref):
        torch.testing.assert_close(q.keys[slot], untouched[slot] if key is None else key)
