"""Every supported backbone family initialises clsmask exactly: patch tokens equal the source's final normed states."""

import json

import pytest
import torch
from test_remote_code import run_isolated
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

from modeling_clsmask import ClsMaskForMultiLabelClassification, ClsMaskForSemanticSegmentation


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)


def perturb(model: torch.nn.Module) -> None:
    """Move every 1-D parameter (norms, biases, LayerScale) away from its init, so folding errors show."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.5)


def vit():
    return ViTModel(ViTConfig(intermediate_size=64, **TINY), add_pooling_layer=False), 0, lambda out: out


def deit():
    return DeiTModel(DeiTConfig(intermediate_size=64, **TINY), add_pooling_layer=False), 1, lambda out: out


def dinov2():
    return Dinov2Model(Dinov2Config(mlp_ratio=2, layerscale_value=0.3, **TINY)), 0, lambda out: out


def dinov2_registers():
    config = Dinov2WithRegistersConfig(mlp_ratio=2, layerscale_value=0.3, num_register_tokens=3, **TINY)
    return Dinov2WithRegistersModel(config), 3, lambda out: out


def clip_vision():
    model = CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **TINY))
    tower = getattr(model, "vision_model", model)
    return model, 0, lambda out: tower.post_layernorm(out)


def clip_full():
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    model = CLIPModel(CLIPConfig(vision_config=dict(intermediate_size=64, **TINY), text_config=text))
    tower = model.vision_model
    tower = getattr(tower, "vision_model", tower)
    model.forward = lambda pixel_values: tower(pixel_values=pixel_values)
    return model, 0, lambda out: tower.post_layernorm(out)


FAMILIES = {
    "vit": vit,
    "deit": deit,
    "dinov2": dinov2,
    "dinov2_with_registers": dinov2_registers,
    "clip_vision": clip_vision,
    "clip": clip_full,
}


def source_patch_states(source, extra: int, final_norm, pixels) -> torch.Tensor:
    """The source's final normalised states of the patch tokens (after [CLS] and its extra tokens)."""
    with torch.no_grad():
        return final_norm(source(pixel_values=pixels).last_hidden_state)[:, 1 + extra :]


def test_patch_tokens_match_the_source(tmp_path):
    # Per family: one class token and the source's own extra tokens, no gates; then every saved clsmask folder is
    # reloaded through remote code (one fresh interpreter where the package is not importable) and checked again.
    pixels = torch.randn(2, 3, 28, 28)
    cases = {}
    for family, build in sorted(FAMILIES.items()):
        source, extra, final_norm = build()
        perturb(source)
        source.eval().save_pretrained(tmp_path / family / "source")
        model = ClsMaskForMultiLabelClassification.from_pretrained_backbone(
            str(tmp_path / family / "source"), id2label={0: "only"}, num_register_tokens=extra
        ).eval()
        assert model.config.backbone_family == {"clip_vision": "clip"}.get(family, family)
        expected = source_patch_states(source, extra, final_norm, pixels)
        with torch.no_grad():
            got = model.clsmask(pixels).last_hidden_state
        # Order here: class token, patches, [REG] tokens.
        torch.testing.assert_close(got[:, 1 : 1 + expected.shape[1]], expected, atol=1e-4, rtol=1e-4, msg=family)
        model.save_pretrained(tmp_path / family / "clsmask")
        cases[str(tmp_path / family / "clsmask")] = expected
    torch.save({"pixels": pixels, "cases": cases}, tmp_path / "cases.pt")
    run_isolated(
        f"""
        import torch
        from transformers import AutoModel
        saved = torch.load({str(tmp_path / "cases.pt")!r})
        for folder, expected in saved["cases"].items():
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            with torch.no_grad():
                got = model(saved["pixels"]).last_hidden_state
            torch.testing.assert_close(got[:, 1 : 1 + expected.shape[1]], expected, atol=1e-4, rtol=1e-4, msg=folder)
        """,
        tmp_path,
    )


@pytest.mark.parametrize("build", [dinov2, dinov2_registers, deit])
def test_late_class_tokens_see_the_source_features(tmp_path, build):
    # With class tokens only in the last block, the blocks before run without them: the default [REG] tokens (the
    # source's extra tokens and its [CLS]) keep the patch tokens entering the last block equal to the source's.
    source, extra, _ = build()
    perturb(source)
    source.eval().save_pretrained(tmp_path / "source")
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = source(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1 + extra :]
    model = ClsMaskForMultiLabelClassification.from_pretrained_backbone(
        str(tmp_path / "source"), id2label={0: "a", 1: "b"}, class_token_layers=1
    ).eval()
    assert model.config.num_register_tokens == extra + 1
    with torch.no_grad():
        states = model.clsmask(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(states[:, 2 : 2 + expected.shape[1]], expected, atol=1e-4, rtol=1e-4)
    # Hidden from the patches, the class tokens leave the final patch tokens equal to the source's as well.
    model.config.hide_class_tokens = True
    final = source_patch_states(source, extra, lambda out: out, pixels)
    with torch.no_grad():
        got = model.clsmask(pixels).last_hidden_state[:, 2 : 2 + final.shape[1]]
    torch.testing.assert_close(got, final, atol=1e-4, rtol=1e-4)
    model.config.hide_class_tokens = False
    with torch.no_grad():
        seen = model.clsmask(pixels).last_hidden_state[:, 2 : 2 + final.shape[1]]
    assert not torch.allclose(seen, final, atol=1e-3)


def test_dinov2_position_grid_is_interpolated_and_registers_carried(tmp_path):
    source, _, _ = dinov2_registers()
    source.save_pretrained(tmp_path / "source")
    model = ClsMaskForSemanticSegmentation.from_pretrained_backbone(
        str(tmp_path / "source"), id2label={0: "a", 1: "b"}, image_size=56
    )
    embeddings = model.clsmask.embeddings
    assert embeddings.position_embeddings.shape == (1, 16, 32)  # 2 x 2 grid -> 4 x 4
    # The source's 3 registers, then the [REG] that carries [CLS] through blocks without class tokens.
    assert model.config.num_register_tokens == 4
    torch.testing.assert_close(embeddings.register_tokens[:, :3], source.embeddings.register_tokens)
    torch.testing.assert_close(embeddings.register_tokens[:, 3:], source.embeddings.cls_token)
    assert model(torch.randn(1, 3, 56, 56)).class_maps.shape[-2:] == (4, 4)


def test_normalisation_comes_from_the_backbone(tmp_path):
    source, _, _ = clip_vision()
    source.save_pretrained(tmp_path / "source")
    clip_mean, clip_std = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]
    (tmp_path / "source" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": clip_mean, "image_std": clip_std})
    )
    model = ClsMaskForMultiLabelClassification.from_pretrained_backbone(str(tmp_path / "source"), id2label={0: "a"})
    assert model.backbone_normalisation == (clip_mean, clip_std)
    assert model.config.pre_layernorm and model.config.hidden_act == "quick_gelu"


def test_overrides_are_honoured_or_refused(tmp_path):
    source, _, _ = dinov2()
    source.save_pretrained(tmp_path / "source")
    path = str(tmp_path / "source")
    thirteen = ClsMaskForMultiLabelClassification.from_pretrained_backbone(path, num_channels=13, num_hidden_layers=1)
    assert thirteen.config.num_channels == 13 and len(thirteen.clsmask.layers) == 1
    rgb = source.embeddings.patch_embeddings.projection.weight
    weight = thirteen.clsmask.embeddings.patch_embeddings.projection.weight
    # Bands repeat the RGB filters, each divided by how many bands share it (R 5 times, G and B 4 times).
    torch.testing.assert_close(weight[:, 3:6], rgb / torch.tensor([5.0, 4.0, 4.0]).view(1, 3, 1, 1))
    # An input whose bands are all equal responds as the RGB model does to the same grey image.
    grey = torch.randn(1, 1, 28, 28)
    conv = torch.nn.functional.conv2d
    torch.testing.assert_close(conv(grey.expand(1, 13, -1, -1), weight), conv(grey.expand(1, 3, -1, -1), rgb))
    for name, value in (("hidden_size", 64), ("patch_size", 7), ("num_attention_heads", 2)):
        with pytest.raises(ValueError, match=name):
            ClsMaskForMultiLabelClassification.from_pretrained_backbone(path, **{name: value})
    with pytest.raises(ValueError, match="blocks"):
        ClsMaskForMultiLabelClassification.from_pretrained_backbone(path, num_hidden_layers=5)


def test_unknown_family_names_the_supported_ones(tmp_path):
    from transformers import BeitConfig, BeitModel

    BeitModel(BeitConfig(intermediate_size=64, **TINY)).save_pretrained(tmp_path / "beit")
    with pytest.raises(ValueError, match="dinov2.*clip"):
        ClsMaskForMultiLabelClassification.from_pretrained_backbone(str(tmp_path / "beit"))
    with pytest.raises(ValueError, match="from_pretrained_backbone"):
        ClsMaskForMultiLabelClassification.from_vit_pretrained(str(tmp_path / "beit"))


def test_class_tokens_start_from_cls_and_the_readout_from_zero(tmp_path):
    # Every class token starts as [CLS] (+ its position); the shared readout starts at zero, so the first steps learn
    # what separates present from absent tokens instead of pushing the tokens along a random direction.
    source, _, _ = dinov2()
    source.save_pretrained(tmp_path / "source")
    model = ClsMaskForMultiLabelClassification.from_pretrained_backbone(
        str(tmp_path / "source"), id2label={0: "a", 1: "b", 2: "c"}
    )
    embeddings = model.clsmask.embeddings
    torch.testing.assert_close(embeddings.class_tokens, source.embeddings.cls_token.expand(1, 3, -1))
    assert torch.count_nonzero(model.classifier.dense.weight) == 0
    logits = model(torch.randn(2, 3, 28, 28)).logits
    torch.testing.assert_close(logits, model.classifier.bias.expand(2, 3))


def test_frozen_baselines_known_answers(tmp_path):
    # Each image is one class painted over its whole area: label-only is exact (mIoU 1), CAM can only paint that
    # label (1 too), the probe is a real fit (in [0, 1]); the heads are fitted once for all evaluated splits.
    from modeling_clsmask.training.baselines import frozen_baselines, patch_majority_labels

    source, _, _ = dinov2()
    source.save_pretrained(tmp_path / "source")

    def loader(count, seed):
        generator = torch.Generator().manual_seed(seed)
        classes = torch.randint(0, 3, (count,), generator=generator)
        pixels = torch.randn(count, 3, 28, 28, generator=generator) + classes.view(-1, 1, 1, 1).float()
        labels = torch.nn.functional.one_hot(classes, 3)
        masks = classes.view(-1, 1, 1).expand(-1, 28, 28).clone()
        return [{"pixel_values": pixels, "labels": labels, "mask": masks}]

    results = frozen_baselines(str(tmp_path / "source"), 28, loader(24, 0), {"a": loader(8, 1), "b": loader(8, 2)}, 3)
    assert set(results) == {"a", "b"}
    for figures in results.values():
        assert figures["label_only_mean_iou"] == 1.0 and figures["frozen_cam_mean_iou"] == 1.0
        assert 0.0 <= figures["linear_probe_mean_iou"] <= 1.0 and 0.0 <= figures["frozen_cam_mAP"] <= 1.0
    # With background (id 0 here, threshold 1.01: every pixel is background) CAM is also scored at its best threshold.
    painted = frozen_baselines(str(tmp_path / "source"), 28, loader(24, 0), {"a": loader(8, 1)}, 3, [1, 2], (0, 1.01))
    figures = painted["a"]
    assert figures["frozen_cam_tuned_threshold"] in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    assert figures["frozen_cam_tuned_mean_iou"] > figures["frozen_cam_mean_iou"]
    # Majority label per patch, void where a patch holds only void pixels.
    masks = torch.tensor([[[0, 0, 1, 255], [0, 1, 1, 255]]])
    assert patch_majority_labels(masks, (1, 2), 2).tolist() == [[[0, 1]]]
    assert patch_majority_labels(torch.full((1, 2, 2), 255), (1, 1), 2).tolist() == [[[255]]]
