"""DR-Adapter (statistics rescaling, perturbation, cyclic loss) and QSM (FSM mask, APFM votes and fusion, the
trained channel gate), by hand; both through the registry and the training entry point."""

from __future__ import annotations

import pytest
import torch
from test_methods import model_cfg, tiny

from finetune.methods import build_method
from finetune.methods.qsm import QSM, ChannelGate, apfm_fuse, fsm_mask, vote_fractions
from finetune.model.adapters import DRAdapter, channel_stats, perturb, pop_cyclic_loss


def test_perturbation_is_the_identity_when_a_and_b_are_zero():
    x = torch.randn(2, 3, 5, 5)
    mean, _ = channel_stats(x)
    zero = torch.zeros(2, 3, 1, 1)
    torch.testing.assert_close(perturb(x, zero, zero, mean), x)
    # a scales the deviations, b shifts the mean: the statistics move exactly so
    a, b = torch.full((2, 3, 1, 1), 0.5), torch.full((2, 3, 1, 1), -0.25)
    new_mean, new_std = channel_stats(perturb(x, a, b, mean))
    old_mean, old_std = channel_stats(x)
    torch.testing.assert_close(new_mean, 0.75 * old_mean)
    torch.testing.assert_close(new_std, 1.5 * old_std)


def test_adapter_rescales_the_channel_statistics():
    adapter = DRAdapter(2).eval()
    x = torch.randn(1, 2, 9, 9) * 3 + 1
    with torch.no_grad():
        for conv in (m for m in adapter.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.zero_()
            conv.bias.zero_()
        torch.testing.assert_close(adapter(x), x, atol=1e-5, rtol=1e-5)  # zero output: identity
        last = adapter.net[-1]
        last.bias.copy_(torch.tensor([0.5, -0.5]))  # constant output: beta = bias, alpha = 0
        y = adapter(x)
    mean, std = channel_stats(x)
    new_mean, new_std = channel_stats(y)
    torch.testing.assert_close(new_mean.flatten(), mean.flatten() * torch.tensor([1.5, 0.5]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_std, std, atol=1e-4, rtol=1e-4)


def test_training_adapter_records_a_cyclic_loss_and_keeps_every_parameter_in_the_graph():
    torch.manual_seed(0)
    adapters = torch.nn.ModuleDict({"layer0": DRAdapter(3)}).train()
    kinds = set()
    for _ in range(12):  # p = 0.5 per perturbation: both outcomes occur
        x = torch.randn(2, 3, 9, 9, requires_grad=True)
        y = adapters["layer0"](x)
        loss = pop_cyclic_loss(adapters, x.device)
        kinds.add(bool(loss.item() > 0))
        (y.sum() + loss).backward()
        assert all(p.grad is not None for p in adapters.parameters())
        adapters.zero_grad(set_to_none=True)
    assert kinds == {True, False}
    assert int(adapters["layer0"].style_seen) == 12  # the EMA style saw every training batch


def test_fsm_mask_by_hand():
    feats = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 3)
    mask = fsm_mask(feats, torch.tensor([[1.0, 0.0]]))       # cosines 1, 0.707, 0 -> >= 0.5
    assert mask.flatten().tolist() == [1.0, 1.0, 0.0]


def test_apfm_vote_fractions_by_hand():
    # 4 pixels on the unit circle; prototypes pf1 = e0, pf2 = e1, pb1 = -e0, pb2 = -e1 (all global)
    angles = torch.tensor([0.1, 1.4, 3.3, 4.6])              # near e0, near e1, near -e0, near -e1
    feats = torch.stack([angles.cos(), angles.sin()]).reshape(1, 2, 1, 4)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    c = vote_fractions(feats, e0, e1, -e0, -e1)[0]
    # fg wins at pixels 0, 1 (pf1 at 0, pf2 at 1); bg wins at 2, 3 (pb1 at 2, pb2 at 3): all fractions 1/2
    torch.testing.assert_close(c, torch.full((4,), 0.5))
    c = vote_fractions(feats, e0, e0 * 0.5, -e0, -e1)[0]      # pf2 parallel to pf1: ties go to pf2
    assert c[1].item() == pytest.approx(1.0, abs=1e-5) and c[0].item() == pytest.approx(0.0, abs=1e-5)


def test_apfm_fusion_and_gate_start_neutral():
    gate = ChannelGate()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(gate(x), 0.5 * x)  # zero-initialised: a uniform gate, cosines unchanged
    model = build_method(model_cfg("method=qsm")).eval()
    assert isinstance(model, QSM) and model.g2.item() == 1.0 and model.g4.item() == 1.0
    g = torch.Generator().manual_seed(0)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 1, 3, 33, 33, generator=g)
    with torch.no_grad():
        out = model(query, supports, torch.randint(0, 2, (2, 1, 33, 33), generator=g))
    assert out.logits.shape == (2, 2, 33, 33) and set(out.maps) == {"significant", "fsm", "qsm"}
    assert set(out.maps["fsm"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("shots", [1, 5])
def test_qsm_with_adapters_shapes_and_gradients(shots):
    torch.manual_seed(0)
    model = build_method(model_cfg("method=qsm", "adapter=dr")).train()
    assert set(model.backbone.adapters) == {"layer0", "layer1", "layer2"}
    g = torch.Generator().manual_seed(1)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, shots, 3, 33, 33, generator=g)
    out = model(query, supports, torch.randint(0, 2, (2, shots, 33, 33), generator=g))
    loss, parts = model.loss(out, torch.randint(0, 2, (2, 33, 33), generator=g))
    assert {"main", "self", "support", "cyclic"} == set(parts)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if not n.startswith("adapters."))


def test_adapter_is_refused_on_the_training_free_baseline():
    with pytest.raises(Exception, match="model.adapter trains DR-Adapters"):
        model_cfg("method=prototype", "adapter=dr")


def test_qsm_starts_from_an_ssp_run_and_trains(tmp_path):
    from finetune.run import main as run_main

    ssp = run_main(tiny(tmp_path / "data", tmp_path, "model.method=ssp", "model.train_layers=[layer3]",
                        "train.max_steps=1", "train.val_every=0", "train.episodes_per_epoch=2", "eval.episodes=2",
                        "train.run_name=ssp"))
    assert ssp["method"] == "ssp"
    qsm = run_main(tiny(tmp_path / "data", tmp_path, "model.method=qsm", "model.adapter=dr",
                        "model.train_layers=[layer3]", f"model.init_from={tmp_path / 'ssp'}", "train.max_steps=2",
                        "train.val_every=1", "train.episodes_per_epoch=4", "train.run_name=qsm"))
    assert set(qsm["per_seed"][0]["recall"]) == {"significant", "fsm", "qsm"}
    # what init_from loaded: every SSP tensor; only QSM's own modules keep their initialisation
    from safetensors.torch import load_file

    from finetune.evaluate import init_weights

    model = build_method(model_cfg("method=qsm", "adapter=dr"))
    kept = init_weights(model, tmp_path / "ssp" / "last_model.safetensors")
    assert kept and all(k.startswith(("gate.", "g2", "g4", "backbone.adapters.")) for k in kept)
    start = load_file(str(tmp_path / "ssp" / "last_model.safetensors"))
    name = next(k for k in start if k.startswith("backbone.layer3") and k.endswith("weight"))
    torch.testing.assert_close(model.state_dict()[name], start[name])


def test_init_from_refuses_a_file_of_another_network(tmp_path):
    from safetensors.torch import save_file

    from common.errors import WeightsError
    from finetune.run import main as run_main

    save_file({"head.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="model.init_from=.*keys the model lacks \\['head.weight'\\]"):
        run_main(tiny(tmp_path / "data", tmp_path, "model.method=qsm", f"model.init_from={tmp_path}/other.safetensors"))


def test_dr_adapter_on_the_pfenet_head_adds_its_cyclic_loss():
    torch.manual_seed(0)
    model = build_method(model_cfg("method=pfenet", "adapter=dr")).train()
    g = torch.Generator().manual_seed(1)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 1, 3, 33, 33, generator=g)
    out = model(query, supports, torch.randint(0, 2, (2, 1, 33, 33), generator=g))
    loss, parts = model.loss(out, torch.randint(0, 2, (2, 33, 33), generator=g))
    assert set(parts) == {"main", "aux", "cyclic"}
    assert loss.item() == pytest.approx((parts["main"] + parts["aux"] + 2 * parts["cyclic"]).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.adapters.parameters())


def test_apfm_fusion_by_hand():
    c = torch.tensor([[0.25, 0.75, 0.5, 0.5]])
    pf1, pf2, pb1 = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 8.0]]), torch.tensor([[2.0, 2.0]])
    pb2 = torch.ones(1, 2, 1, 2)
    pf, pb = apfm_fuse(c, torch.tensor(1.5), torch.tensor(0.5), pf1, pf2, pb1, pb2)
    # Pf = 0.25 * (2 - 1.5) * [4, 0] + 0.75 * 1.5 * [0, 8] = [0.5, 9]
    torch.testing.assert_close(pf, torch.tensor([[0.5, 9.0]]))
    # Pb = 0.5 * (2 - 0.5) * [2, 2] + 0.5 * 0.5 * 1 = 1.5 + 0.25 per channel and pixel
    torch.testing.assert_close(pb, torch.full((1, 2, 1, 2), 1.75))
