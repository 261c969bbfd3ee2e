"""MMT's meta-memory: the slot update against a loop written from the equations, the orthogonality loss, the
enhancement, the frozen evaluation, the state through a checkpoint and across processes, the losses by hand,
and the plug-in under pfenet and qgnet through the registry and the training entry point."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from test_methods import model_cfg, tiny
from torch import nn

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import load_config
from finetune.config import FinetuneConfig
from finetune.methods import build_method
from finetune.model.meta_memory import (
    ATTENTION_TEMPERATURE,
    MetaMemory,
    memory_losses,
    orthogonality_loss,
    update_memory,
)


def naive_update(slots: list[list[float]], stats: list[list[float]], momentum: float) -> list[list[float]]:
    """m_j <- lambda m_j + (1 - lambda) sum_b softmax_b(cos(m_j - c, mu_b - c) / T) mu_b, c = the slots' mean, one
    slot and one row at a time."""
    center = [sum(m[c] for m in slots) / len(slots) for c in range(len(slots[0]))]

    def cos(a, b):
        a, b = [x - z for x, z in zip(a, center)], [y - z for y, z in zip(b, center)]
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    out = []
    for m in slots:
        e = [math.exp(cos(m, mu) / ATTENTION_TEMPERATURE) for mu in stats]
        w = [v / sum(e) for v in e]
        out.append([momentum * m[c] + (1 - momentum) * sum(w[b] * stats[b][c] for b in range(len(stats)))
                    for c in range(len(m))])
    return out


def test_memory_update_matches_a_naive_loop():
    torch.manual_seed(0)
    slots, stats = torch.rand(3, 4), torch.rand(5, 4)
    new_mean, new_std = update_memory(slots, slots * 2, stats, stats * 3, momentum=0.7)
    expected = torch.tensor(naive_update(slots.tolist(), stats.tolist(), 0.7))
    torch.testing.assert_close(new_mean, expected)
    # the std slots take the weights of the means: (2 m, 3 mu) -> 2 * 0.7 m + 3 * 0.3 W mu
    torch.testing.assert_close(new_std, 0.7 * 2 * slots + 3 * (expected - 0.7 * slots))


def test_memory_fills_its_free_slots_first_then_updates_every_slot():
    memory = MetaMemory(4, slots=3, momentum=0.8).train()
    rows = torch.rand(4, 4) + 0.1                                          # channel means of four images
    memory.write(rows[:2], rows[:2] * 0.5)
    assert int(memory.filled) == 2
    torch.testing.assert_close(memory.mean_slots[:2], rows[:2])
    memory.write(rows[2:], rows[2:] * 0.5)  # row 2 fills slot 2; row 3 then updates all three
    assert int(memory.filled) == 3
    expected = naive_update(rows[:3].tolist(), rows[3:].tolist(), 0.8)
    torch.testing.assert_close(memory.mean_slots, torch.tensor(expected))
    torch.testing.assert_close(memory.std_slots, memory.mean_slots * 0.5)


def test_orthogonality_loss_of_orthogonal_identical_and_sixty_degree_slots():
    assert orthogonality_loss(torch.eye(4)).item() == pytest.approx(0.0)
    assert orthogonality_loss(torch.ones(3, 5) * 2).item() == pytest.approx(1.0)
    sixty = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])             # cos = 0.5
    assert orthogonality_loss(sixty).item() == pytest.approx(0.5)
    assert orthogonality_loss(torch.rand(1, 3)).item() == 0.0


def test_alpha_one_is_the_identity_and_alpha_zero_takes_the_memory_style():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6) * 4 + 1
    for alpha in (1.0, 0.0):
        memory = MetaMemory(3, slots=1, alpha=alpha).eval()
        memory.mean_slots.copy_(torch.tensor([[2.0, 3.0, 4.0]]))
        memory.std_slots.copy_(torch.tensor([[0.5, 1.0, 2.0]]))
        memory.filled.fill_(1)
        y = memory(x)
        if alpha == 1.0:  # f_norm * v + mu = f
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        else:             # one slot: every image gets its mean and std
            torch.testing.assert_close(y.mean((2, 3)), torch.tensor([[2.0, 3.0, 4.0]] * 2), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y.std((2, 3), unbiased=False), torch.tensor([[0.5, 1.0, 2.0]] * 2),
                                       atol=1e-5, rtol=1e-5)
    empty = MetaMemory(3, alpha=0.3).eval()                                 # nothing remembered yet: identity
    torch.testing.assert_close(empty(x), x, atol=1e-5, rtol=1e-5)


def test_memory_is_written_in_training_and_frozen_in_evaluation():
    memory = MetaMemory(3, slots=2)
    x = torch.rand(2, 3, 5, 5)
    memory.eval()(x)
    assert int(memory.filled) == 0 and not memory.orth_terms
    memory.train()(x)
    assert int(memory.filled) == 2 and len(memory.orth_terms) == 1
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    memory.eval()(torch.rand(4, 3, 5, 5))
    assert all(torch.equal(state[k], v) for k, v in memory.state_dict().items())


def test_losses_by_hand():
    # query: left column foreground [1, 0], right column background [0, 1]; supports have the same prototypes
    query = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])   # [1,2,2,2]
    target = torch.tensor([[[1, 0], [1, 0]]])
    fg, bg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    parts = memory_losses(query, fg, bg, target, torch.tensor([7]))
    # L_pro: every pixel scores 10 for its own prototype and 0 for the other
    assert parts["pro"].item() == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)
    # L_cont: positive cos 1, negatives (support bg, query bg) cos 0, no episode of another class
    assert parts["cont"].item() == pytest.approx(math.log(1 + 2 * math.exp(-10)), abs=1e-6)
    # a second episode of another class whose support fg equals ours becomes a negative of score 10
    two = memory_losses(query.repeat(2, 1, 1, 1), fg.repeat(2, 1), bg.repeat(2, 1), target.repeat(2, 1, 1),
                        torch.tensor([7, 8]))
    assert two["cont"].item() == pytest.approx(math.log(2 + 2 * math.exp(-10)), abs=1e-6)
    same = memory_losses(query.repeat(2, 1, 1, 1), fg.repeat(2, 1), bg.repeat(2, 1), target.repeat(2, 1, 1),
                         torch.tensor([7, 7]))
    assert same["cont"].item() == pytest.approx(parts["cont"].item(), abs=1e-6)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.memory = nn.Linear(3, 1), MetaMemory(3, slots=4)


def test_memory_state_round_trips_through_a_checkpoint(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(Holder().train())
        for _ in range(3):
            model.memory(torch.rand(2, 3, 4, 4))
        folder = save_checkpoint(accelerator, tmp_path, 3, {}, {"step": 3}, keep_last=0)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        assert int(saved["memory.filled"]) == 4
        model.memory(torch.rand(2, 3, 4, 4) * 5)  # the memory moves on after the save ...
        assert not torch.equal(model.memory.mean_slots, saved["memory.mean_slots"])
        load_checkpoint(accelerator, folder)      # ... and comes back with the checkpoint
        for key, value in accelerator.unwrap_model(model).state_dict().items():
            assert torch.equal(value, saved[key]), key
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("method", ["pfenet", "qgnet"])
def test_plug_in_under_pfenet_and_qgnet_trains_and_freezes(method):
    torch.manual_seed(0)
    model = build_method(model_cfg(f"method={method}", "meta_memory=true", "meta_memory_slots=3",
                                   "meta_memory_layer=layer3")).train()
    assert model.backbone.memory_layer == "layer3" and model.backbone.memory.mean_slots.shape == (3, 96)
    assert getattr(model.prior, "memory", None) is None  # the prior extractor has no memory
    query, supports = torch.randn(2, 3, 33, 33), torch.randn(2, 1, 3, 33, 33)
    masks, target = (torch.rand(2, 1, 33, 33) > 0.5).long(), (torch.rand(2, 33, 33) > 0.5).long()
    out = model(query, supports, masks)
    loss, parts = model.loss(out, target, torch.tensor([0, 1]))
    assert {"main", "aux", "orth", "cont", "pro"} <= set(parts) and int(model.backbone.memory.filled) == 3
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items() if ".memory." in k}
    with torch.no_grad():
        assert not model(query, supports, masks).loss_inputs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_meta_memory_is_refused_where_no_head_features_reach_its_losses():
    with pytest.raises(Exception, match="model.meta_memory is a qgnet / pfenet option"):
        model_cfg("method=ssp", "meta_memory=true")
    with pytest.raises(Exception, match="model.meta_memory is a qgnet / pfenet option"):
        model_cfg("head_inputs=maps", "meta_memory=true")
    with pytest.raises(Exception, match="meta_memory_loss_weights"):
        model_cfg("meta_memory=true", "meta_memory_loss_weights=[1.0,1.0]")
    with pytest.raises(Exception, match="train.task=fss only"):
        load_config(FinetuneConfig, None, ["model.meta_memory=true", "train.task=fscs"])


def _two_process_write(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each process sees other images
    memory = MetaMemory(3, slots=2, momentum=0.5).train()
    for _ in range(2):
        memory(torch.rand(2, 3, 4, 4) + rank)
    torch.save(memory.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_identical_memories_equal_to_one_process_on_the_gathered_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_process_write, args=(29613, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    single = MetaMemory(3, slots=2, momentum=0.5).train()
    draws = []
    for rank in (0, 1):
        torch.manual_seed(rank)
        draws.append([torch.rand(2, 3, 4, 4) + rank for _ in range(2)])
    for step in range(2):  # rank order: rank 0's rows, then rank 1's
        x = torch.cat([draws[0][step], draws[1][step]])
        single.write(x.mean((2, 3)), x.std((2, 3), unbiased=False))
    for key in a:
        torch.testing.assert_close(a[key], single.state_dict()[key])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pfenet", "qgnet"])
def test_plug_in_trains_and_evaluates_through_the_entry_point(tmp_path, method):
    from finetune.run import main as run_main

    results = run_main(tiny(tmp_path / "data", tmp_path, f"model.method={method}", "model.prior=random",
                            "model.prior_arch=resnet18", "model.meta_memory=true", "model.meta_memory_slots=4",
                            "train.max_steps=2", "train.val_every=1", "train.episodes_per_epoch=4"))
    assert results["method"] == method
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "last_model.safetensors"))
    assert int(weights["backbone.memory.filled"]) == 4 and weights["backbone.memory.mean_slots"].abs().sum() > 0
