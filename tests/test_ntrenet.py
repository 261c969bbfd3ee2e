"""NTRENet: the distracting-object mask, the background loss and PCL by hand, the prototype bank as state,
the ablation switches and QGNet's prior map as an extra map; through the training entry point."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_methods import model_cfg, tiny

from finetune.methods import build_method
from finetune.methods.ntrenet import NTRENet, background_loss, distractor_mask, pcl_loss
from finetune.model.prototype_bank import PrototypeBank


def logits_for(labels: list[list[int]]) -> torch.Tensor:
    """[1,2,h,w] logits whose argmax is ``labels``."""
    lab = torch.tensor(labels)
    return torch.stack([(lab == 0).float(), (lab == 1).float()])[None]


def test_distractor_mask_from_given_argmaxes():
    bg = logits_for([[1, 0], [0, 1]])     # 1 = background per the miner
    fg = logits_for([[0, 0], [1, 1]])     # 1 = target per the initial prediction
    # distractor where neither: not background and not target -> only (0, 1)
    assert distractor_mask(bg, fg)[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_pcl_against_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    anchor, positive = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    negatives = [torch.randn(n, 8, generator=g) for n in (4, 1, 0)]
    expected = []
    for a, p, neg in zip(anchor, positive, negatives):
        if len(neg) == 0:
            expected.append(0.0)
            continue
        cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
        pos = math.exp(cos(a, p))
        expected.append(-math.log(pos / (pos + sum(math.exp(cos(a, n)) for n in neg))))
    assert pcl_loss(anchor, positive, negatives).item() == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_background_loss_by_hand():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, 0] = math.log(3)                   # pixel 0: P(background) = 0.75
    target = torch.tensor([[[1, 1, 0, 255]]])          # target pixels 0 and 1
    on_target = (-math.log(0.25) - math.log(0.5)) / 2  # "not background" on the target's pixels
    everywhere = (-math.log(0.75) - 3 * math.log(0.5)) / 4
    assert background_loss(logits, target).item() == pytest.approx(on_target + 0.5 * everywhere, rel=1e-4)


def test_bank_keeps_the_newest_per_class_and_round_trips_through_a_file(tmp_path):
    bank = PrototypeBank(dim=2, capacity=3)
    bank.add(torch.tensor([7, 7, 9]), torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    bank.add(torch.tensor([7, 7]), torch.tensor([[4.0, 0], [5, 0]]))
    assert bank.get(7)[:, 0].tolist() == [5.0, 4.0, 2.0] and bank.get(9)[:, 0].tolist() == [3.0]
    assert len(bank.get(1)) == 0 and len(bank) == 4
    state = {k: v.contiguous() for k, v in torch.nn.Sequential(bank).state_dict().items()}
    save_file(state, str(tmp_path / "bank.safetensors"))
    again = torch.nn.Sequential(PrototypeBank(dim=2, capacity=3))
    again.load_state_dict(load_file(str(tmp_path / "bank.safetensors")))
    torch.testing.assert_close(again[0].get(7), bank.get(7))
    with pytest.raises(ValueError, match=r"prototype bank state must be \[N, 3\]"):
        again[0].set_extra_state(torch.zeros(2, 5))


@pytest.mark.parametrize("shots", [1, 5])
def test_shapes_maps_and_every_parameter_trains(shots):
    torch.manual_seed(0)
    model = build_method(model_cfg("method=ntrenet"))
    assert isinstance(model, NTRENet)
    g = torch.Generator().manual_seed(1)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, shots, 3, 33, 33, generator=g)
    masks = torch.randint(0, 2, (2, shots, 33, 33), generator=g)
    model.eval()
    with torch.no_grad():
        out = model(query, supports, masks)
    assert out.logits.shape == (2, 2, 33, 33) and set(out.maps) == {"guided", "background", "distractor"}
    model.train()
    out = model(query, supports, masks)
    loss, parts = model.loss(out, torch.randint(0, 2, (2, 33, 33), generator=g), torch.tensor([3, 4]))
    assert set(parts) == {"main", "aux", "aux_init", "bg", "pcl"}
    expected = parts["main"] + parts["bg"] + 0.4 * parts["aux"] + 0.6 * parts["aux_init"] + 0.01 * parts["pcl"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert len(model.bank) == 4  # two query and two support distracting-object prototypes


def test_ablation_switches_and_the_prior_map():
    none = build_method(model_cfg("method=ntrenet", "ntre_modules=[]"))
    assert none.decoder.merge_bg is None and none.decoder.merge_do is None
    full = build_method(model_cfg("method=ntrenet", "extra_maps=[prior]"))
    assert full.prior is not None and full.decoder.merge_fg[0][0].in_channels == 2 * 16 + 2
    with torch.no_grad():
        out = full.eval()(torch.randn(1, 3, 33, 33), torch.randn(1, 1, 3, 33, 33), torch.ones(1, 1, 33, 33).long())
    assert "prior" in out.maps
    with pytest.raises(ValueError, match="model.ntre_modules: 'xyz'"):
        build_method(model_cfg("method=ntrenet", "ntre_modules=[xyz]"))
    with pytest.raises(ValueError, match="ntrenet takes \\[prior\\]"):
        build_method(model_cfg("method=ntrenet", "extra_maps=[ssp]"))


def test_ntrenet_trains_through_the_entry_point_and_saves_its_bank(tmp_path):
    from finetune.run import main as run_main

    results = run_main(tiny(tmp_path / "data", tmp_path, "model.method=ntrenet", "train.max_steps=2",
                            "train.val_every=1", "train.episodes_per_epoch=4"))
    assert set(results["per_seed"][0]["recall"]) == {"guided", "background", "distractor"}
    saved = load_file(str(tmp_path / "run" / "last_model.safetensors"))
    assert saved["bank._extra_state"].shape == (8, 1 + 8)  # 2 steps x batch 2 x (query + support), dim 8
    assert list((tmp_path / "run" / "eval").glob("grid_*.png"))



def test_balanced_loss_reweights_the_segmentation_terms():
    from finetune.methods.qgnet import balanced_cross_entropy

    torch.manual_seed(0)
    model = build_method(model_cfg("method=ntrenet", "balanced_loss=true", "ntre_modules=[bgem]")).train()
    g = torch.Generator().manual_seed(1)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 1, 3, 33, 33, generator=g)
    out = model(query, supports, torch.randint(0, 2, (2, 1, 33, 33), generator=g))
    target = torch.zeros(2, 33, 33, dtype=torch.long)
    target[:, :4, :4] = 1                                  # a small object: the plain mean would hide it
    _, parts = model.loss(out, target)
    assert parts["main"].item() == pytest.approx(balanced_cross_entropy(out.logits, target).item(), rel=1e-6)
