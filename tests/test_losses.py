import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import info_nce


def naive_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ n) / t) for n in queue)
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("n,d,k,t", [(1, 2, 1, 0.2), (4, 8, 16, 0.2), (7, 3, 5, 0.07), (3, 16, 32, 1.0)])
def test_matches_naive_reference(n, d, k, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    key = F.normalize(torch.randn(n, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    loss, _ = info_nce(q, key, queue, t)
    assert loss.item() == pytest.approx(naive_info_nce(q, key, queue, t), rel=1e-5)


def test_closed_form_identical_embeddings():
    # all queries, keys and queue entries equal: every logit is 1/t, so the loss is log(K + 1)
    K = 9
    v = F.normalize(torch.ones(1, 4), dim=1)
    loss, acc = info_nce(v.repeat(3, 1), v.repeat(3, 1), v.repeat(K, 1), 0.2)
    assert loss.item() == pytest.approx(math.log(K + 1), rel=1e-6)


def test_orthogonal_negatives_closed_form():
    # q = k, queue orthogonal to q: loss = -log(e^{1/t} / (e^{1/t} + K))
    t, K = 0.5, 4
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0]]).repeat(K, 1)
    loss, acc = info_nce(q, q, queue, t)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + K))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and acc.item() == 1.0


def test_valid_mask_ignores_rows():
    q = F.normalize(torch.randn(4, 6), dim=1)
    k = F.normalize(torch.randn(4, 6), dim=1)
    queue = F.normalize(torch.randn(8, 6), dim=1)
    valid = torch.tensor([True, False, True, False])
    loss, _ = info_nce(q, k, queue, 0.2, valid)
    ref, _ = info_nce(q[valid], k[valid], queue, 0.2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_gradient_reaches_query_only():
    q = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    k = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    loss, _ = info_nce(q, k.detach(), queue.detach(), 0.2)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None
