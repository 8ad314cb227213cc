"""The saved custom pipeline: real class probabilities, masks at input size, labels restriction, fresh process."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_remote_code import run_isolated

from modeling_clsmask import (
    ClsMaskForMultiLabelClassification,
    ClsMaskForSemanticSegmentation,
    ClsMaskImageProcessor,
    ClsMaskSegmentationPipeline,
    masks_from_class_maps,
)
from modeling_clsmask.training.visualization import attention_panel, draw_segments, overlay


MASK_SETTINGS = ("background_threshold", "background_label_id", "mask_assembly")


def biased_model(**overrides):
    """Tiny model whose classifier predicts classes 0 and 2 (cat, car) for any image, confidently; mask settings
    among `overrides` go to the processor."""
    masks = {key: overrides.pop(key) for key in MASK_SETTINGS if key in overrides}
    config = tiny_config(**overrides)
    model = ClsMaskForSemanticSegmentation(config).eval()
    with torch.no_grad():
        readout = model.classifier  # shared readout (default) or the paper's flattened Linear
        (readout.dense if config.classifier_type == "shared" else readout).weight.zero_()
        model.classifier.bias.copy_(torch.tensor([4.0, -4.0, 3.0]))
    return model, ClsMaskImageProcessor.from_model_config(config, **masks)


def test_pipeline_in_process_masks_scores_labels():
    model, processor = biased_model()
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    image = Image.fromarray(np.random.randint(0, 255, (37, 53, 3), dtype=np.uint8))
    result = pipe(image)
    assert {r["label"] for r in result} <= {"cat", "car"} and len(result) >= 1
    for r in result:
        assert r["mask"].mode == "L" and r["mask"].size == (53, 37)
        expected = torch.sigmoid(torch.tensor(4.0 if r["label"] == "cat" else 3.0)).item()
        assert r["score"] == pytest.approx(expected, abs=1e-4)
    union = sum((np.asarray(r["mask"]) > 0).astype(int) for r in result)
    assert (union == 1).all(), "every pixel in exactly one mask"
    # Restrict to known image labels (WSSS protocol): only "dog", though the model does not predict it.
    only_dog = pipe(image, labels=["dog"])
    assert [r["label"] for r in only_dog] == ["dog"]
    # A threshold above every probability: the most probable class still covers the image (no background).
    assert [r["label"] for r in pipe(image, threshold=0.999)] == ["cat"]
    drawn = draw_segments(image, result)
    assert drawn.size == (53, 37 + 14 * len(result))
    # Batched inputs of several kinds: numpy array, PIL image.
    results = pipe([np.asarray(image), image])
    assert len(results) == 2 and all(isinstance(r, list) for r in results)


def test_pipeline_background():
    model, processor = biased_model(background_threshold=0.6)
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    result = pipe(Image.fromarray(np.random.randint(0, 255, (32, 32, 3), dtype=np.uint8)))
    labels = {r["label"]: r["score"] for r in result}
    assert set(labels) <= {"cat", "car"}  # cat (id 0) is background here
    assert "cat" not in labels or labels["cat"] is None
    # At threshold 1 nearly every pixel is background (score None); with None no pixel is.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    everything = {r["label"]: r for r in pipe(image, background_threshold=1.0)}
    assert everything["cat"]["score"] is None and (np.asarray(everything["cat"]["mask"]) > 0).mean() > 0.9
    assert all(r["score"] is not None for r in pipe(image, background_threshold=None))
    with pytest.raises(ValueError, match="Unknown label 'horse'"):
        pipe(Image.new("RGB", (32, 32)), labels=["horse"])


def test_pictures():
    image = Image.new("RGB", (40, 30), "gray")
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[:, 20:] = 2
    picture = overlay(image, mask, num_classes=3)
    assert picture.size == (40, 30)
    assert picture.getpixel((5, 5)) == (128, 128, 128)  # background left unpainted
    assert picture.getpixel((30, 5)) != (128, 128, 128)
    panel = attention_panel(image, torch.rand(3, 4, 5), ["bg", "a", "b"], [1, 2], mask, mask, tile_size=64)
    assert panel.size == (64 * 5, 64 + 14)


def test_fresh_process_pipelines(tmp_path):
    # With test-time scales, flips and refinement: the remote-code copy of the model must make those maps itself.
    model, processor = biased_model(
        attention_map_scales=[1.0, 2.0], attention_map_flip=True, attention_map_refinement_iterations=2
    )
    folder = tmp_path / "ckpt"
    ClsMaskForMultiLabelClassification.save_pretrained(model, folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["image-segmentation"]["impl"] == "pipeline_clsmask.ClsMaskSegmentationPipeline"
    assert (folder / "pipeline_clsmask.py").exists()
    Image.fromarray(np.random.randint(0, 255, (41, 67, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = run_isolated(
        """
        import math
        from transformers import pipeline
        seg = pipeline("image-segmentation", model="ckpt", trust_remote_code=True)
        assert type(seg).__name__ == "ClsMaskSegmentationPipeline", type(seg)
        assert seg.model.config.attention_map_scales == [1.0, 2.0] and seg.model.config.attention_map_flip
        assert seg.model.config.attention_map_refinement_iterations == 2
        result = seg("img.png")
        assert {r["label"] for r in result} <= {"cat", "car"}, result
        assert all(r["mask"].size == (67, 41) for r in result)
        assert all(r["score"] is not None and r["score"] > 0.9 for r in result)
        clf = pipeline("image-classification", model="ckpt", trust_remote_code=True, top_k=None)
        scores = {r["label"]: r["score"] for r in clf("img.png")}
        assert abs(scores["cat"] - 1 / (1 + math.exp(-4))) < 1e-4, scores  # sigmoid, not softmax
        assert abs(scores["car"] - 1 / (1 + math.exp(-3))) < 1e-4, scores
        print("OK")
        """,
        tmp_path,
    )
    assert "OK" in out


def _mask_arrays(result):
    return {r["label"]: np.asarray(r["mask"]) for r in result}


def _same_result(a, b):
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for x, y in zip(a, b):
        assert x["score"] == y["score"]
        np.testing.assert_array_equal(np.asarray(x["mask"]), np.asarray(y["mask"]))


def test_pipeline_batching_and_empty_list():
    model, processor = biased_model(background_threshold=0.3)
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    rng = np.random.default_rng(0)
    sizes = ((37, 53), (32, 32), (60, 41))
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    one_by_one = [pipe(image) for image in images]
    for batch_size in (2, 3):
        batched = pipe(images, batch_size=batch_size)
        for got, expected in zip(batched, one_by_one):
            _same_result(got, expected)
    with_labels = pipe(images, batch_size=2, labels=["car"])
    assert all({r["label"] for r in result} <= {"car", "cat"} for result in with_labels)
    assert pipe([]) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": -0.5}, "`threshold`"),
        ({"threshold": 1.5}, "`threshold`"),
        ({"threshold": float("nan")}, "`threshold`"),
        ({"threshold": True}, "`threshold`"),
        ({"background_threshold": 2.0}, "`background_threshold`"),
        ({"labels": [1.7]}, "`labels`"),
        ({"labels": True}, "`labels`"),
        ({"labels": []}, "`labels`"),
        ({"labels": ["zebra"]}, "zebra"),
        ({"labels": [7]}, "out of range"),
    ],
)
def test_pipeline_arguments_are_validated(kwargs, message):
    model, processor = biased_model()
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=message):
        pipe(image, **kwargs)


def test_high_bit_depth_and_float_inputs_are_scaled_not_clipped(tmp_path):
    model, processor = biased_model(background_threshold=0.3)
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    grey8 = (grey16 / 257).round().astype(np.uint8)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    expected = pipe(Image.fromarray(grey8))
    _same_result(pipe(str(tmp_path / "grey16.png")), expected)
    _same_result(pipe(grey16), expected)
    _same_result(pipe(grey8.astype(np.float32) / 255), expected)  # 2-D float in [0, 1]
    rgb8 = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    _same_result(pipe(rgb8.astype(np.float32) / 255), pipe(rgb8))  # H x W x 3 float
    # The processor alone agrees with the pipeline's reading.
    torch.testing.assert_close(
        processor(Image.open(tmp_path / "grey16.png"), return_tensors="pt")["pixel_values"],
        processor(Image.fromarray(grey8), return_tensors="pt")["pixel_values"],
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(rgb8.astype(np.float32))  # floats in 0..255: said, not clipped


def test_pipeline_messages_name_the_file(tmp_path):
    model, processor = biased_model()
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe(str(tmp_path / "missing.png"))
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        pipe(str(tmp_path / "truncated.png"))


def test_bf16_pipeline_and_masks_agree_with_fp32():
    """`dtype=torch.bfloat16` (the transformers way): same classes, masks agreeing with fp32; and on hand-made maps,
    bf16 maps give exactly the fp32 masks (thresholds, normalisation and the fill run in fp32)."""
    model, processor = biased_model(background_threshold=0.3)
    fp32 = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    bf16_model = ClsMaskForSemanticSegmentation(model.config).eval()
    bf16_model.load_state_dict(model.state_dict())
    bf16 = ClsMaskSegmentationPipeline(model=bf16_model.to(torch.bfloat16), image_processor=processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    a, b = fp32(image), bf16(image)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b):
        assert (np.asarray(ra["mask"]) == np.asarray(rb["mask"])).mean() >= 0.9
        assert ra["score"] == pytest.approx(rb["score"], abs=0.02) if ra["score"] is not None else rb["score"] is None

    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    maps = torch.stack([xx, 5 - xx, yy])[None] + 0.5  # three ramps of values bf16 holds exactly
    scores, present = torch.tensor([[0.875, 0.75, 0.625]]), torch.tensor([[True, True, True]])
    expected = masks_from_class_maps(maps, scores, present, (37, 53), 0.2, 0)
    assert torch.equal(masks_from_class_maps(maps.bfloat16(), scores.bfloat16(), present, (37, 53), 0.2, 0), expected)


def test_pipeline_large_photo_masks_at_working_size():
    """Above `max_working_size` the pipeline's per-class masks equal `masks_from_class_maps` with that working size
    (label map made small, each class enlarged as uint8); below it, and with `None`, the full-size masks."""
    model, processor = biased_model(background_threshold=0.3)
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    with torch.no_grad():
        out = model(**processor(images=image, return_tensors="pt"))
    for limit in (24, None):
        pipe.max_working_size = limit
        expected = masks_from_class_maps(out.class_maps, out.class_probs, out.present, (90, 120), 0.3, 0, limit)[0]
        result = pipe(image)
        names = sorted(model.config.id2label[i] for i in expected.unique().tolist())
        assert sorted(r["label"] for r in result) == names
        for r in result:
            label = model.config.label2id[r["label"]]
            assert np.array_equal(np.asarray(r["mask"]) > 0, (expected == label).numpy()), (limit, r["label"])
