import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor


def test_rgb_preprocess_and_post_process_sizes():
    config = tiny_config()
    processor = ClsMaskImageProcessor.from_model_config(config)
    images = [Image.fromarray(np.random.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(20, 50), (33, 17)]]
    inputs = processor(images, return_tensors="pt")
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    assert inputs.pixel_values.min() >= -1.0 and inputs.pixel_values.max() <= 1.0
    model = ClsMaskForSemanticSegmentation(config).eval()
    masks = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[(20, 50), (33, 17)])
    assert [tuple(m.shape) for m in masks] == [(20, 50), (33, 17)]
    assert all(m.dtype == torch.long for m in masks)


def test_multiband_arrays():
    config = tiny_config(num_channels=13)
    processor = ClsMaskImageProcessor.from_model_config(config)
    bands = np.random.rand(40, 40, 13).astype(np.float32)
    inputs = processor(bands, return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 13, 32, 32)
    np.testing.assert_allclose(inputs.pixel_values.mean().item(), bands.mean(), atol=0.02)


def test_mask_settings_live_in_the_processor(tmp_path):
    config = tiny_config()
    processor = ClsMaskImageProcessor.from_model_config(config, background_threshold=0.4, mask_assembly="argmax")
    processor.save_pretrained(tmp_path)
    loaded = ClsMaskImageProcessor.from_pretrained(tmp_path)
    assert (loaded.background_threshold, loaded.mask_assembly) == (0.4, "argmax")
    assert not hasattr(config, "background_threshold") and not hasattr(config, "mask_assembly")  # stored once
    model = ClsMaskForSemanticSegmentation(config).eval()
    torch.manual_seed(0)
    out = model(torch.randn(1, 3, 32, 32), image_labels=torch.tensor([[0, 1, 0]]))
    mask = loaded.post_process_semantic_segmentation(out)[0]
    assert set(mask.unique().tolist()) == {0, 1}  # background where class 1's normalised map is below 0.4
    forced = loaded.post_process_semantic_segmentation(out, background_threshold=None)[0]
    assert set(forced.unique().tolist()) == {1}
    other = loaded.post_process_semantic_segmentation(out, classes=torch.tensor([[False, False, True]]))[0]
    assert set(other.unique().tolist()) == {0, 2}
    for bad in ({"mask_assembly": "mean"}, {"background_threshold": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClsMaskImageProcessor(**bad)


def test_training_and_inference_preprocess_alike():
    # One implementation: the training encoder calls the processor; its resize is the torch one for every input.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    processor = ClsMaskImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pixels = processor(image, return_tensors="pt")["pixel_values"][0]
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(array, (32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(pixels, (expected[0] - 0.5) / 0.5, atol=1e-5, rtol=1e-5)


def test_target_sizes_length_checked():
    config = tiny_config()
    processor = ClsMaskImageProcessor.from_model_config(config)
    out = ClsMaskForSemanticSegmentation(config).eval()(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="2 images"):
        processor.post_process_semantic_segmentation(out, target_sizes=[(4, 4)])


def test_grey_palette_rgba_images_become_rgb():
    config = tiny_config()
    processor = ClsMaskImageProcessor.from_model_config(config)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    for image in (rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA")):
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        expected = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 32, 32)
        torch.testing.assert_close(pixels, expected)
