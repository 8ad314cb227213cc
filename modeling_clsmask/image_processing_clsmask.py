"""Image processor for the class-token ViT: resize, rescale, normalise (NumPy/torch), and pseudo-masks. Training
preprocesses through it too, so a model sees the same pixels in training and in the pipeline."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling
from transformers.utils import logging

from .pseudo_masks import AUTO, MASK_ASSEMBLIES, masks_from_class_maps, resolve_threshold


logger = logging.get_logger(__name__)


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit(image):
    """An 8-bit view of an image, scaling high bit depths by their range instead of clipping them.

    Pillow converts a 16-bit PNG (mode I;16) or a float image (mode F) to RGB by clipping to 0..255: a 16-bit image
    turns white and a [0, 1] float image black, and the model then answers confidently about a picture nobody gave
    it. Here: 16-bit images and uint16 arrays are divided by 257 (65535 -> 255); float images and arrays must lie in
    [0, 1] (else a ValueError says so) and are multiplied by 255; bool arrays become 0/255. uint8 input and other
    PIL modes are returned as they are. Arrays keep their layout (H x W, H x W x C or C x H x W).
    """
    if isinstance(image, Image.Image):
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
            return Image.fromarray(to_8bit(np.asarray(image)))
        return image
    if not isinstance(image, np.ndarray):
        return image
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if image.dtype == np.uint16:
        return (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if image.size and not np.isfinite(image).all():
            raise ValueError("The image array holds NaN or infinite values.")
        low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"A float image must hold values in [0, 1]; this one spans [{low:.4g}, {high:.4g}]. Scale it to "
                "[0, 1] or pass uint8 / uint16 data."
            )
        return (image.astype(np.float32) * 255.0).round().astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        if image.size and (image.min() < 0 or image.max() > 65535):
            raise ValueError(f"Integer image values must lie in 0..65535 (got {image.min()}..{image.max()}).")
        if image.size and image.max() > 255:  # a 16-bit image in a wider integer type (e.g. Pillow's mode I)
            return (image.astype(np.float32) / 257.0).round().astype(np.uint8)
        return image.astype(np.uint8)
    raise ValueError(f"Unsupported image array dtype {image.dtype}.")


def channels_first(array: np.ndarray, num_channels: int) -> np.ndarray:
    """(C, H, W) view of an (H, W), (H, W, C) or (C, H, W) array with `num_channels` bands; a ValueError otherwise.

    The layout is the one whose band axis has `num_channels` entries. When both ends do (e.g. 3 x 64 x 3),
    channels-last is assumed, as numpy and Pillow write images, and a warning says so. When neither does, the error
    names the band count the model expects, the one this input has, and the layout it was read in.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"An image array must be H x W, H x W x C or C x H x W; got shape {tuple(array.shape)}.")
    first, last = array.shape[0] == num_channels, array.shape[-1] == num_channels
    if first and last:
        logger.warning(
            "Image array of shape %s: both its first and last axes could hold the %d bands; read as channels-last "
            "(H x W x C). Pass a C x H x W array with input_data_format='channels_first' to read it the other way.",
            tuple(array.shape),
            num_channels,
        )
    if last:
        return np.moveaxis(array, -1, 0)
    if first:
        return array
    channels_last = array.shape[-1] <= array.shape[0]
    bands = array.shape[-1] if channels_last else array.shape[0]
    layout = "channels-last (H x W x C)" if channels_last else "channels-first (C x H x W)"
    raise ValueError(
        f"The model expects {num_channels} bands; this input has {bands} (array of shape {tuple(array.shape)}, read "
        f"as {layout}). Select or convert its bands (e.g. to RGB), or use a model built for {bands} bands "
        f"(num_channels={bands})."
    )


class ClsMaskImageProcessor(PilBackend):
    """ViT-style preprocessing that also accepts any number of bands (e.g. 13-band Sentinel-2 arrays), and the one
    place where class maps become masks (`post_process_semantic_segmentation`).

    Mask settings (saved in preprocessor_config.json, nowhere else): `background_threshold` (`None`: every pixel
    gets a class; a number in [0, 1]: pixels whose best normalised class score is below it become
    `background_label_id`, whose own map never paints) and `mask_assembly` (`"threshold"`, the paper: above-mean
    regions painted in score order, gaps filled by the nearest class; `"argmax"`: each pixel takes the present class
    with the highest normalised map).
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        background_threshold: float | None = None,
        background_label_id: int = 0,
        mask_assembly: str = "threshold",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mask_assembly not in MASK_ASSEMBLIES:
            raise ValueError(f"mask_assembly must be one of {MASK_ASSEMBLIES}, got {mask_assembly!r}.")
        self.background_threshold = resolve_threshold(background_threshold, None)
        self.background_label_id = int(background_label_id)
        self.mask_assembly = mask_assembly

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "ClsMaskImageProcessor":
        """A processor matching a `ClsMaskConfig` (its image size and band count); `kwargs` set the rest (e.g.
        `background_threshold`, `image_mean`)."""
        height, width = config.image_grid_size
        defaults = {"size": {"height": height, "width": width}}
        if config.num_channels != 3:
            defaults["image_mean"] = [0.0] * config.num_channels
            defaults["image_std"] = [1.0] * config.num_channels
            defaults["do_rescale"] = False
        defaults.update(kwargs)
        return cls(**defaults)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        """Like the Pillow backend, but channel-last arrays with any band count are accepted, and (when rescaling
        from 8 bits) 16-bit and [0, 1] float images are scaled by their range, not clipped (see `to_8bit`)."""
        if self.do_rescale:
            image = to_8bit(image)
        bands = len(np.atleast_1d(self.image_mean))
        if isinstance(image, Image.Image):
            if bands not in (1, 3):
                raise ValueError(
                    f"The model expects {bands} bands; this input is a {image.mode} image with "
                    f"{len(image.getbands())}. Pass a {bands}-band array (H x W x C or C x H x W)."
                )
            if image.mode != "RGB" and bands == 3:
                image = image.convert("RGB")  # grey, palette, RGBA inputs for an RGB model
            elif image.mode != "L" and bands == 1:
                image = image.convert("L")
        elif isinstance(image, np.ndarray) and input_data_format is None:
            rgb_like = bands == 3 and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (1, 3, 4)
            if image.ndim == 2 and bands == 3:
                rgb_like = image.dtype == np.uint8
            if not rgb_like:
                return channels_first(image, bands)  # a clear error when the band count is wrong
            if image.ndim == 3 and image.shape[0] == image.shape[-1]:
                channels_first(image, bands)  # both ends could be the bands: read channels-last, and say so
                input_data_format = "channels_last"
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )

    def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
        """Bilinear, antialiased torch interpolation in float32 for every input (8-bit or not, any band count): the
        one resize of training (`training.data.ExampleEncoder` calls this processor) and inference."""
        if tuple(image.shape[-2:]) == (size.height, size.width):
            return image.astype(np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        out = torch.nn.functional.interpolate(
            tensor, size=(size.height, size.width), mode="bilinear", align_corners=False, antialias=True
        )
        return out[0].numpy()

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        background_threshold: float | str | None = AUTO,
        classes: torch.Tensor | None = None,
        ignore_margin: float | None = None,
    ) -> list[torch.Tensor]:
        """Pseudo-masks (paper, Sec. 3) as a list of (H, W) label tensors, one per image: the one path from model
        outputs to masks (the pipeline, the training scripts and the benchmarks all call it).

        `outputs`: from `model.predict_class_maps` (or the segmentation model's `forward`, one raw pass); the classes
        painted are `outputs.present` (predicted, or the given image labels) unless `classes` ((B, C) bool) is
        given. `target_sizes` gives each image's (H, W); without it, masks have the class maps' own resolution.
        `background_threshold="auto"` (default) means "this processor's setting"; `None` forces every pixel to a
        class; a number in [0, 1] sets it for this call. `ignore_margin` (stage-2 training labels): pixels whose
        best class beats the runner-up by less than it get 255 (`masks_from_class_maps`).
        """
        background_threshold = resolve_threshold(background_threshold, self.background_threshold)
        class_maps = getattr(outputs, "class_maps", None)
        if class_maps is None:
            logits = outputs.logits
            sizes = target_sizes or [tuple(logits.shape[-2:])] * logits.shape[0]
            return [
                torch.nn.functional.interpolate(logit[None], size=tuple(size), mode="bilinear", align_corners=False)[
                    0
                ].argmax(0)
                for logit, size in zip(logits, sizes)
            ]
        batch, num_classes = class_maps.shape[:2]
        present = outputs.present if classes is None else classes
        if present is None:
            raise ValueError(
                "outputs has no `present` classes: pass `classes`, or use the outputs of `predict_class_maps`."
            )
        if background_threshold is not None and not 0 <= self.background_label_id < num_classes:
            raise ValueError(
                f"background_label_id {self.background_label_id} is not a class of this model ({num_classes})."
            )
        if target_sizes is not None and len(target_sizes) != batch:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch} images.")
        sizes = [tuple(int(s) for s in size) for size in target_sizes] if target_sizes is not None else None
        settings = {
            "background_threshold": background_threshold,
            "background_label_id": self.background_label_id,
            "assembly": self.mask_assembly,
            "ignore_margin": resolve_threshold(ignore_margin, None, "ignore_margin"),
        }
        if sizes is None or len(set(sizes)) == 1:
            size = sizes[0] if sizes else tuple(class_maps.shape[-2:])
            return list(masks_from_class_maps(class_maps, outputs.class_probs, present, size, **settings).unbind(0))
        return [
            masks_from_class_maps(
                class_maps[i : i + 1], outputs.class_probs[i : i + 1], present[i : i + 1], sizes[i], **settings
            )[0]
            for i in range(batch)
        ]


__all__ = ["ClsMaskImageProcessor", "channels_first", "to_8bit"]

ClsMaskImageProcessor.register_for_auto_class("AutoImageProcessor")
