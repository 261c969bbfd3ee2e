"""SSP (self-support prototypes): the self-support rule by hand, the matching against a naive loop, shots,
the trained-stages switch, and SSP as QGNet's extra map / residual; plus QGNet's maps-only head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import model_cfg, tiny

from finetune.methods import build_method
from finetune.methods.ssp import SSP, confident_pixels, cosine_logits, self_support, ssp_loss, ssp_match


def test_confident_pixels_threshold_and_top_k_fallback():
    prob = torch.tensor([[0.9, 0.2, 0.71, 0.7],      # two pixels pass 0.7 (0.7 itself does not)
                         [0.1, 0.5, 0.3, 0.6]])      # none passes: the top 2 (fallback=2) do
    sel = confident_pixels(prob, 0.7, fallback=2)
    assert sel.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]


def test_self_support_by_hand():
    # 4 query pixels (1x4) with 2-d features; foreground probability 0.9 / 0.8 / 0.1 / 0.3
    feats = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 4)
    fg_prob = torch.tensor([[[0.9, 0.8, 0.1, 0.3]]])
    ssfp, ssbp, asbp = self_support(feats, fg_prob)
    # foreground: p > 0.7 -> pixels 0, 1; background: 1 - p > 0.6 -> pixels 2 (0.9), 3 (0.7)
    torch.testing.assert_close(ssfp, torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(ssbp, torch.tensor([[0.5, 1.5]]))
    # per-pixel background prototype of pixel 0 = (1, 0): cosines to the bg pixels (0, 2) and (1, 1)
    c = torch.tensor([0.0, 1 / math.sqrt(2)])
    w = (2 * c).softmax(0)
    expected = w[0] * torch.tensor([0.0, 2.0]) + w[1] * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(asbp[0, :, 0, 0], expected)


def naive_ssp(fq: torch.Tensor, fp: torch.Tensor, bp: torch.Tensor) -> torch.Tensor:
    """The issue's formulas, one episode and one pixel at a time (fq [C,h,w], fp/bp [C])."""
    c, h, w = fq.shape
    pix = fq.reshape(c, -1).T                                  # [N,C]

    def logits(fg, bg):                                        # fg [C] or [N,C]; bg [C] or [N,C]
        fg, bg = fg.expand(pix.shape[0], -1), bg.expand(pix.shape[0], -1)
        return 10 * torch.stack([F.cosine_similarity(pix, bg, dim=1), F.cosine_similarity(pix, fg, dim=1)])

    def support(out):
        p = out.softmax(0)[1]
        fg_idx = [i for i in range(len(p)) if p[i] > 0.7] or p.topk(min(12, len(p))).indices.tolist()
        bg_idx = [i for i in range(len(p)) if 1 - p[i] > 0.6] or (1 - p).topk(min(12, len(p))).indices.tolist()
        bg_pix = pix[bg_idx]
        local = torch.stack([(2 * F.cosine_similarity(pix[i:i + 1], bg_pix, dim=1)).softmax(0) @ bg_pix
                             for i in range(len(pix))])
        return pix[fg_idx].mean(0), bg_pix.mean(0), local

    out0 = logits(fp, bp)
    ssfp, ssbp, asbp = support(out0)
    fp1, bp1 = 0.5 * fp + 0.5 * ssfp, 0.3 * ssbp + 0.7 * asbp
    out1 = logits(fp1, bp1)
    ssfp, ssbp, asbp = support(out1)
    fp2 = 0.5 * fp + 0.2 * fp1 + 0.3 * (0.5 * fp + 0.5 * ssfp)
    bp2 = 0.5 * bp + 0.2 * bp1 + 0.3 * (0.3 * ssbp + 0.7 * asbp)
    return (0.7 * logits(fp2, bp2) + 0.3 * out1).reshape(2, h, w)


def test_ssp_match_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    fq = torch.randn(3, 6, 5, 5, generator=g).relu()
    fg, bg = fq[:, :, :2, :2].mean((2, 3)), fq[:, :, 3:, 3:].mean((2, 3))  # prototypes that match some pixels
    out = ssp_match(fq, fg, bg)["out"]
    for b in range(3):
        torch.testing.assert_close(out[b], naive_ssp(fq[b], fg[b], bg[b]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shots", [1, 5])
def test_ssp_shapes_and_shot_averaging(shots):
    torch.manual_seed(0)
    model = build_method(model_cfg("method=ssp")).eval()
    assert isinstance(model, SSP) and not model.trains  # frozen backbone: the training-free variant
    g = torch.Generator().manual_seed(1)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, shots, 3, 33, 33, generator=g)
    masks = torch.randint(0, 2, (2, shots, 33, 33), generator=g)
    with torch.no_grad():
        out = model(query, supports, masks)
        state = model.encode_supports(supports, masks)
        per_shot = [model.encode_supports(supports[:, i:i + 1], masks[:, i:i + 1]) for i in range(shots)]
    assert out.logits.shape == (2, 2, 33, 33) and set(out.maps) == {"similarity", "self_support"}
    assert out.maps["self_support"].shape == (2, 1, 5, 5)
    torch.testing.assert_close(state["fg"], torch.stack([s["fg"] for s in per_shot]).mean(0))


def test_train_layers_train_only_those_convolutions():
    model = build_method(model_cfg("method=ssp", "train_layers=[layer2,layer3]"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("backbone.layer2.", "backbone.layer3.")) for n in names)
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert not any(n.rsplit(".", 1)[0] in bn for n in names)  # BatchNorm stays frozen
    with pytest.raises(ValueError, match="model.train_layers: 'layer9'"):
        build_method(model_cfg("method=ssp", "train_layers=[layer9]"))


def test_ssp_loss_is_the_four_terms_and_trains_the_stages():
    torch.manual_seed(0)
    model = build_method(model_cfg("method=ssp", "train_layers=[layer3]")).train()
    g = torch.Generator().manual_seed(3)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 1, 3, 33, 33, generator=g)
    masks, target = torch.randint(0, 2, (2, 1, 33, 33), generator=g), torch.randint(0, 2, (2, 33, 33), generator=g)
    out = model(query, supports, masks)
    loss, parts = ssp_loss(out, target)
    assert set(parts) == {"main", "first", "self", "support"}
    expected = parts["main"] + parts["first"] + parts["self"] + 0.2 * parts["support"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the query self-matching term by hand: the query against its own ground-truth prototypes
    fq = out.loss_inputs["query_features"]
    m = F.interpolate(target[:, None].float(), size=fq.shape[-2:], mode="bilinear", align_corners=True)
    fg, bg = (fq * m).sum((2, 3)) / (m.sum((2, 3)) + 5e-4), (fq * (1 - m)).sum((2, 3)) / ((1 - m).sum((2, 3)) + 5e-4)
    up = F.interpolate(cosine_logits(fq, fg, bg), size=(33, 33), mode="bilinear", align_corners=True)
    assert parts["self"].item() == pytest.approx(F.cross_entropy(up, target).item(), rel=1e-5)
    loss.backward()
    assert model.backbone.layer3[0].conv[0][0].weight.grad.abs().sum() > 0


def test_maps_only_head_reads_no_appearance_feature():
    model = build_method(model_cfg("method=qgnet", "extra_maps=[prototype,ssp]", "residual=prototype",
                                   "head_inputs=maps"))
    assert model.down_query is None and model.down_supp is None
    assert model.fem.init_merge[0][0].in_channels == 2 + 3  # guided + prior + prototype + ssp fg/bg
    model.train()
    g = torch.Generator().manual_seed(0)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 1, 3, 33, 33, generator=g)
    out = model(query, supports, torch.randint(0, 2, (2, 1, 33, 33), generator=g))
    model.loss(out, torch.randint(0, 2, (2, 33, 33), generator=g))[0].backward()
    assert all(p.grad is not None for p in model.trainable_parameters())  # nothing unused (DDP would refuse)


def test_trained_ssp_runs_through_the_entry_point(tmp_path):
    from finetune.run import main as run_main

    results = run_main(tiny(tmp_path / "data", tmp_path, "model.method=ssp", "model.train_layers=[layer3]",
                            "train.max_steps=2", "train.val_every=1", "train.episodes_per_epoch=4"))
    assert results["method"] == "ssp" and (tmp_path / "run" / "best_model.safetensors").is_file()
    assert set(results["per_seed"][0]["recall"]) == {"similarity", "self_support"}
    assert list((tmp_path / "run" / "eval").glob("grid_*.png"))  # PNG grids with the self-support map


def test_step_schedule_divides_by_ten_at_the_milestones():
    from finetune.engine import step_lr

    lrs = [step_lr(1e-3, s, 9, [1 / 3, 2 / 3]) for s in range(9)]
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 3 + [1e-5] * 3)
