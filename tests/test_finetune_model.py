"""QGNet model: backbone surgery, region-map maths against hand references, FEM shapes, weights loading, loss."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

from common.config import ConfigError, load_config
from common.weights import load_into, load_state_dict_file
from fewshot.segmenter import SegmenterOutput
from finetune.methods.qgnet import build_qgnet, qgnet_loss
from finetune.model.backbones import build_backbone, build_prior
from finetune.model.config import ModelConfig
from finetune.model.region_maps import (
    guided_region_map,
    masked_max_cosine,
    minmax_normalize,
    prior_region_map,
    projection,
    weighted_gap,
)

RELATIVE_BINS = "bins=[1.0,0.5,0.25,0.125]"


def model_cfg(*overrides):
    base = ["backbone_weights=random", "prior=random", RELATIVE_BINS]
    return load_config(ModelConfig, None, base + list(overrides))


def episode(b=2, k=1, s=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, k, s, s, dtype=torch.long)
    masks[..., s // 4: 3 * s // 4, s // 3: 2 * s // 3] = 1
    masks[..., :3, :] = 255
    return torch.randn(b, 3, s, s, generator=g), torch.randn(b, k, 3, s, s, generator=g), masks


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return build_qgnet(model_cfg())


@pytest.fixture(scope="module")
def mnv2():
    torch.manual_seed(0)
    return build_qgnet(model_cfg("backbone=mobilenet_v2", "prior_arch=mobilenet_v2"))


# ------------------------------------------------------------------------------------------ region maps


def naive_max_cosine(target, source, eps=1e-7):
    b, _, n = target.shape
    out = torch.empty(b, n, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            t = target[i, :, j]
            out[i, j] = max(float(t @ source[i, :, m]) / (float(t.norm() * source[i, :, m].norm()) + eps)
                            for m in range(source.shape[2]))
    return out


@pytest.mark.parametrize("chunk", [0, 2, 3])
def test_max_cosine_matches_double_loop(chunk):
    g = torch.Generator().manual_seed(1)
    target, source = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g)
    source[:, :, 0] = 0  # a masked-out (background) pixel: cosine exactly 0
    got = masked_max_cosine(target, source, chunk=chunk)
    torch.testing.assert_close(got.double(), naive_max_cosine(target.double(), source.double()), atol=1e-6, rtol=0)
    assert (got >= 0).all()  # the zero vector's 0 is always a candidate


def test_cosine_eps_is_added_to_the_product_of_norms():
    a = torch.tensor([[[1e-4], [0.0]]])  # |a| = |b| = 1e-4, a.b = 1e-8
    got = masked_max_cosine(a, a.clone())
    # eps on the product: 1e-8 / (1e-8 + 1e-7) = 1/11; eps on each norm would give ~0.998
    torch.testing.assert_close(got, torch.tensor([[1 / 11]]), rtol=1e-4, atol=0)


def test_chunked_similarity_equals_full_in_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(2, 16, 50, generator=g).requires_grad_()
    source = torch.rand(2, 16, 37, generator=g).requires_grad_()
    weights = torch.rand(2, 50, generator=g)
    results = []
    for chunk in (0, 7):
        s = masked_max_cosine(target, source, chunk=chunk)
        grads = torch.autograd.grad((s * weights).sum(), (target, source))
        results.append((s.detach(), *grads))
    for full, chunked in zip(*results):
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-5)


def test_minmax_and_weighted_gap_by_hand():
    s = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 4.0]])
    expected = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]]) / torch.tensor([[2 + 1e-7], [1 + 1e-7]])
    torch.testing.assert_close(minmax_normalize(s), expected)
    feat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    feat[:, 1] *= -1
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).view(1, 1, 2, 2)
    expected = torch.tensor([2.5 / 1.5005, -2.5 / 1.5005]).view(1, 2, 1, 1)  # (1*1 + 3*0.5) / (1.5 + 5e-4)
    torch.testing.assert_close(weighted_gap(feat, mask), expected)


def test_region_maps_are_minmax_normalised_and_prior_map_trains_both_projections():
    g = torch.Generator().manual_seed(3)
    bridge, prior = torch.rand(2, 8, 5, 5, generator=g), torch.rand(2, 6, 5, 5, generator=g)
    proj_b, proj_p = projection(8, 4, dropout=0.0), projection(6, 4, dropout=0.0)
    mp = prior_region_map(bridge, prior, proj_b, proj_p)
    mg = guided_region_map(bridge, bridge * (torch.rand(2, 1, 5, 5, generator=g) > 0.5))
    for m in (mp, mg):
        assert m.shape == (2, 1, 5, 5)
        torch.testing.assert_close(m.amin(dim=(1, 2, 3)), torch.zeros(2))
        torch.testing.assert_close(m.amax(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    assert not mg.requires_grad
    (mp * torch.rand(mp.shape, generator=g)).sum().backward()
    assert proj_b[0].weight.grad.abs().sum() > 0 and proj_p[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ backbones


@pytest.mark.parametrize("name,deep_stem,channels", [
    ("resnet50", False, (512, 1024, 2048)), ("resnet50", True, (512, 1024, 2048)),
    ("resnet18", False, (128, 256, 512)), ("mobilenet_v2", False, (32, 96, 1280))])
def test_backbone_taps_have_output_stride_8(name, deep_stem, channels):
    net = build_backbone(name, "random", deep_stem=deep_stem).eval()
    assert (net.layer2_channels, net.layer3_channels, net.layer4_channels) == channels
    feats = net(torch.randn(1, 3, 65, 97))
    assert [tuple(f.shape) for f in feats] == [(1, c, 9, 13) for c in channels]  # (65-1)/8+1, (97-1)/8+1
    assert not any(p.requires_grad for p in net.parameters()) and not feats[2].requires_grad


def test_resnet_dilation_is_pfenet_surgery_not_torchvision_pattern():
    net = build_backbone("resnet50", "random")
    for layer, d in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:  # every block, the first included (torchvision would keep dilation 1 there)
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d) and block.conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv2.dilation == (1, 1)
    stem = build_backbone("resnet50", "random", deep_stem=True).layer0
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [64, 64, 128]


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats(freeze):
    net = build_backbone("mobilenet_v2", "random", freeze_bn_stats=freeze).train()
    bn = net.layer0[0][1]
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 33, 33))
    assert bn.training is not freeze
    assert torch.equal(bn.running_mean, before) is freeze
    model = build_qgnet(model_cfg("backbone=mobilenet_v2", "prior=none", f"freeze_bn_stats={str(freeze).lower()}"))
    assert model.train().backbone.layer4[-1][1].training is not freeze  # QGNet.train() keeps the choice


# ------------------------------------------------------------------------------------------ weights


def test_prior_loads_exported_torchvision_state_dicts_and_rejects_wrong_keys(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    save_file(state, str(tmp_path / "prior.safetensors"))
    prior = build_prior(str(tmp_path / "prior.safetensors"), "resnet18")
    assert torch.equal(prior.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert prior.layer4[1].conv2.dilation == (4, 4)

    save_file({**state, "layer5.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['layer5.weight'\]"):
        build_prior(str(tmp_path / "extra.safetensors"), "resnet18")
    del state["layer2.0.bn1.running_mean"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['layer2.0.bn1.running_mean'\]") as err:
        build_prior(str(tmp_path / "missing.safetensors"), "resnet18")
    assert "missing.safetensors" in str(err.value)


def test_resnet50_pth_checkpoint_with_wrapper_and_prefixes(tmp_path):
    full = torchvision.models.resnet50().state_dict()  # classifier included: it is dropped, not an error
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}, "epoch": 3}, tmp_path / "r50.pth.tar")
    state = load_state_dict_file(tmp_path / "r50.pth.tar")
    assert set(state) == set(full)
    prior = build_prior(str(tmp_path / "r50.pth.tar"), "resnet50")
    assert torch.equal(prior.layer3[0].conv1.weight, full["layer3.0.conv1.weight"])
    with pytest.raises(ValueError, match=r"shape mismatch.* conv1.weight .*deep_stem=True"):  # needs PSPNet weights
        build_backbone("resnet50", str(tmp_path / "r50.pth.tar"), deep_stem=True)


def test_load_into_requires_exactly_the_expected_missing_keys():
    net = torch.nn.Linear(2, 2)
    load_into(net, {"weight": torch.ones(2, 2)}, expected_missing={"bias"})
    with pytest.raises(ValueError, match=r"present but expected absent \['bias'\]"):
        load_into(net, {"weight": torch.ones(2, 2), "bias": torch.ones(2)}, expected_missing={"bias"})


def test_missing_weight_files_name_the_path_and_the_fix(tmp_path):
    path = tmp_path / "nowhere" / "resnet50_imagenet.pth"
    with pytest.raises(FileNotFoundError, match="model.backbone_weights") as err:
        build_backbone("resnet50", str(path))
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="pretrain.export") as err:
        build_prior(str(tmp_path / "prior.safetensors"), "resnet50")
    assert str(tmp_path / "prior.safetensors") in str(err.value)


def test_real_mobilenet_weights_load_into_the_backbone(mobilenet_weights):
    net = build_backbone("mobilenet_v2", str(mobilenet_weights))  # raises on any missing/unexpected key
    ref = load_file(str(mobilenet_weights))
    assert torch.equal(net.layer0[0][0].weight, ref["features.0.0.weight"])
    assert torch.equal(net.layer4[-1][1].running_var, ref["features.18.1.running_var"])


# ------------------------------------------------------------------------------------------ QGNet


@pytest.mark.parametrize("arch", ["rn50", "mnv2"])
@pytest.mark.parametrize("shots", [1, 2])
def test_qgnet_output_shapes_and_maps(arch, shots, request):
    model = request.getfixturevalue(arch).train()
    query, supports, masks = episode(k=shots)
    out = model(query, supports, masks)
    assert out.logits.shape == (2, 2, 97, 97)
    assert [a.shape for a in out.aux_logits] == [(2, 2, b, b) for b in (13, 6, 3, 1)]  # relative bins at 13
    assert out.maps["prior"].shape == out.maps["guided"].shape == (2, 1, 13, 13)
    # a mean over shots is not min-max normalised itself
    maps = [out.maps["prior"]] if shots > 1 else [out.maps["prior"], out.maps["guided"]]
    for m in maps:
        torch.testing.assert_close(m.amin(dim=(1, 2, 3)), torch.zeros(2))
        torch.testing.assert_close(m.amax(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    assert 0 <= out.maps["guided"].min() and out.maps["guided"].max() <= 1


def test_gradients_reach_the_head_never_the_backbones(mnv2):
    mnv2.train().zero_grad(set_to_none=True)
    query, supports, masks = episode(k=2)
    loss, _ = qgnet_loss(mnv2(query, supports, masks), masks[:, 0])
    loss.backward()
    for name in ("down_learn_super", "down_learn_unsuper", "down_query", "down_supp", "fem"):
        grads = [p.grad for p in getattr(mnv2, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    for frozen in (mnv2.backbone, mnv2.prior):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    head = {id(p) for p in mnv2.trainable_parameters()}
    assert head.isdisjoint(id(p) for p in [*mnv2.backbone.parameters(), *mnv2.prior.parameters()])


def test_trainable_parameter_count_matches_the_reference_table(rn50):
    assert sum(p.numel() for p in rn50.trainable_parameters()) == 20_255_242
    baseline = build_qgnet(model_cfg("prior=none"))
    assert baseline.prior is None and baseline.down_learn_super is None
    assert sum(p.numel() for p in baseline.trainable_parameters()) == 10_817_034  # FEM input 513 channels


def test_kshot_fusion_and_255_as_background(mnv2):
    mnv2.eval()
    query, supports, masks = episode(k=1, seed=4)
    with torch.no_grad():
        one = mnv2(query, supports, masks)
        two = mnv2(query, supports.repeat(1, 2, 1, 1, 1), masks.repeat(1, 2, 1, 1))
        no_ignore = mnv2(query, supports, masks.masked_fill(masks == 255, 0))
    torch.testing.assert_close(two.logits, one.logits, atol=1e-5, rtol=1e-5)  # identical shots: mean = one
    torch.testing.assert_close(two.maps["guided"], one.maps["guided"])
    assert torch.equal(no_ignore.logits, one.logits)


def test_eval_is_deterministic_and_chunked_similarity_gives_the_same_output(mnv2):
    mnv2.eval()
    query, supports, masks = episode(k=1, seed=5)
    with torch.no_grad():
        a, b = mnv2(query, supports, masks), mnv2(query, supports, masks)
        mnv2.sim_chunk = 16
        try:
            c = mnv2(query, supports, masks)
        finally:
            mnv2.sim_chunk = 0
    assert torch.equal(a.logits, b.logits)
    torch.testing.assert_close(c.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.maps["prior"], a.maps["prior"], atol=1e-5, rtol=1e-5)


def test_absolute_bins_and_input_size_check():
    model = build_qgnet(model_cfg("backbone=mobilenet_v2", "prior=none", "bins=[60,30,15,8]"))
    query, supports, masks = episode(b=1, s=65)
    out = model.eval()(query, supports, masks)
    assert [a.shape[-1] for a in out.aux_logits] == [60, 30, 15, 8] and "prior" not in out.maps
    with pytest.raises(ValueError, match="8n\\+1"):
        model(query[..., :64], supports[..., :64], masks[..., :64])


def test_paper_literal_has_no_projections_and_needs_equal_channels():
    model = build_qgnet(model_cfg("backbone=mobilenet_v2", "prior_arch=mobilenet_v2", "paper_literal=true"))
    assert model.down_learn_super is None and model.down_learn_unsuper is None
    out = model.train()(*episode(b=1, s=65))
    assert not out.maps["prior"].requires_grad
    with pytest.raises(ValueError, match="1280 channels and the prior 512"):
        build_qgnet(model_cfg("backbone=mobilenet_v2", "prior_arch=resnet18", "paper_literal=true"))


def test_config_rejects_inconsistent_settings():
    for bad in (["bins=[1.0,30]"], ["bins=[60.5]"], ["backbone=mobilenet_v2", "deep_stem=true"],
                ["backbone_weights=torchvision", "deep_stem=true"], ["prior=none", "paper_literal=true"]):
        with pytest.raises(ConfigError):
            load_config(ModelConfig, None, bad)


def test_loss_matches_hand_computed_cross_entropy():
    g = torch.Generator().manual_seed(6)
    logits, aux = torch.randn(1, 2, 9, 9, generator=g), [torch.randn(1, 2, 3, 3, generator=g)]
    target = torch.randint(0, 2, (1, 9, 9), generator=g)
    target[0, 0] = 255
    valid = target != 255

    def ce(x):
        logp = x.log_softmax(1)[0]
        picked = torch.where(target[0] == 1, logp[1], logp[0])
        return -picked[valid[0]].mean()

    up = F.interpolate(aux[0], size=(9, 9), mode="bilinear", align_corners=True)
    loss, parts = qgnet_loss(SegmenterOutput(logits, {"guided": torch.zeros(1, 1, 2, 2)}, aux), target, aux_weight=0.4)
    torch.testing.assert_close(parts["main"], ce(logits))
    torch.testing.assert_close(parts["aux"], ce(up))
    torch.testing.assert_close(loss, ce(logits) + 0.4 * ce(up))
    assert math.isfinite(loss.item())
