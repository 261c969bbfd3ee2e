"""MoCoPrior: shapes, momentum update, which side gets gradients, split-BN folding at export."""

import pytest
import torch

from common.config import load_config
from common.weights import trunk_features
from pretrain.config import PretrainConfig
from pretrain.export import check_loads_into_torchvision, extract_encoder
from pretrain.losses import info_nce
from pretrain.model import MoCoPrior

TINY = ["model.arch=resnet18", "model.head_hidden_dim=32", "model.out_dim=8", "model.split_bn_splits=2"]


def tiny(*extra):
    return load_config(PretrainConfig, None, TINY + list(extra))


def batch(mode, b=4, s=32):
    g = torch.Generator().manual_seed(0)
    out = {"view_q": torch.randn(b, 3, s, s, generator=g), "view_k": torch.randn(b, 3, s, s, generator=g)}
    if mode == "patch":
        out.update(patch_q=torch.randn(b, 3, s, s, generator=g), patch_k=torch.randn(b, 3, s, s, generator=g))
    if mode == "pooled":
        ids = torch.arange(s * s).view(s, s) // (s * s // 4)  # 4 horizontal bands, ids 0..3
        out.update(labels_q=ids.expand(b, s, s).clone(), labels_k=ids.flip(0).expand(b, s, s).clone())
    return out


@pytest.mark.parametrize("mode", ["patch", "pooled"])
def test_output_shapes_and_normalisation(mode):
    model = MoCoPrior(tiny(f"loss.local_mode={mode}", "loss.pooled_regions=3"))
    out = model(batch(mode))
    assert out["q"].shape == out["k"].shape == (4, 8)
    n = 4 if mode == "patch" else 4 * 3
    assert out["local_q"].shape == out["local_k"].shape == (n, 8) and out["local_valid"].shape == (n,)
    for key in ("q", "k", "local_q", "local_k"):
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(out[key].shape[0]))


def test_pooled_pairs_regions_present_in_both_views():
    # 32 px -> 1x1 feature grid: each view has exactly one id per image, so only some rows can be valid
    model = MoCoPrior(tiny("loss.local_mode=pooled", "loss.pooled_regions=2"))
    b = batch("pooled")
    b["labels_k"] = torch.full_like(b["labels_k"], 7)  # id 7 never appears in view q
    out = model(b)
    assert not out["local_valid"].any()  # no shared id: every row invalid, counted, not a crash


def test_momentum_update_is_ema_of_parameters_only():
    model = MoCoPrior(tiny("model.momentum=0.9"))
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(1.0)
    before_k = {k: v.clone() for k, v in model.key_encoder.state_dict().items()}
    query = dict(model.query_encoder.named_parameters())
    model.momentum_update()
    for name, p in model.key_encoder.named_parameters():
        torch.testing.assert_close(p, 0.9 * before_k[name] + 0.1 * query[name])
    for name, buf in model.key_encoder.named_buffers():
        assert torch.equal(buf, before_k[name])  # BN running statistics are not averaged


def test_gradient_reaches_only_query_side():
    model = MoCoPrior(tiny("loss.local_mode=patch"))
    out = model(batch("patch"))
    queue = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    loss = info_nce(out["q"], out["k"], queue, 0.2)[0] + info_nce(out["local_q"], out["local_k"], queue, 0.2)[0]
    loss.backward()
    for part in model.key_modules():
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())
    assert all(p.grad is not None for p in model.query_encoder.parameters())
    assert model.global_head_q.layers[0].weight.grad.abs().sum() > 0
    assert model.local_head_q.layers[0].weight.grad.abs().sum() > 0


def test_split_bn_folds_into_plain_torchvision_resnet():
    model = MoCoPrior(tiny())
    model.train()
    with torch.no_grad():  # a few train-mode passes so the per-split running statistics differ
        for i in range(3):
            trunk_features(model.key_encoder, torch.randn(4, 3, 32, 32) * (i + 1) + i)
    state = extract_encoder(model.state_dict(), "key")
    net = check_loads_into_torchvision(state, "resnet18").eval()
    model.key_encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = trunk_features(model.key_encoder, x)
    net.fc = torch.nn.Identity()  # torchvision's own forward: global-average-pooled layer4
    torch.testing.assert_close(net(x), ref.mean((2, 3)), rtol=1e-5, atol=1e-5)


def test_shuffle_bn_needs_several_processes():
    with pytest.raises(ValueError, match="several processes"):
        MoCoPrior(tiny("model.bn_mode=shuffle"))


def test_init_weights_load_fully_or_fail(tmp_path):
    import torchvision
    from safetensors.torch import save_file
    full = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r18.safetensors"
    save_file(full, str(path))
    model = MoCoPrior(tiny(f"model.init_weights={path}"))  # split BN: statistics repeated per split
    torch.testing.assert_close(model.query_encoder.conv1.weight, full["conv1.weight"])
    assert torch.equal(model.key_encoder.layer4[1].conv2.weight, full["layer4.1.conv2.weight"])
    save_file({k: v for k, v in full.items() if not k.startswith("layer4")}, str(path))
    with pytest.raises(ValueError, match=r"missing \['layer4"):
        MoCoPrior(tiny(f"model.init_weights={path}"))
