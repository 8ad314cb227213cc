"""The image-segmentation pipeline of clsmask checkpoints: one mask per predicted class, with its real probability.

Saved with every checkpoint (`custom_pipelines` in config.json), so
`pipeline("image-segmentation", model=..., trust_remote_code=True)` uses it where this package is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .image_processing_clsmask import channels_first, to_8bit
from .modeling_clsmask import ClsMaskSemanticSegmenterOutput
from .pseudo_masks import AUTO, MAX_WORKING_SIZE, nearest_resize, resolve_threshold, working_size


class ClsMaskSegmentationPipeline(Pipeline):
    """Returns, per image, `[{"score": probability, "label": name, "mask": PIL "L" image}]`, one per painted class.

    Parameters (call time): `threshold` (class probability at which a class counts as predicted, default the
    config's `class_threshold`), `background_threshold` (`"auto"`, the default: the image processor's; `None`
    paints every pixel with a class; or a number in [0, 1]), and `labels` (class names or ids known to be in the
    image: masks are restricted to them, the WSSS protocol). Maps: `model.predict_class_maps`; masks: the image
    processor's `post_process_semantic_segmentation`.
    Background, where the processor has a background threshold, is returned with `score=None`: it is not a predicted
    class but what is left over. Inputs: paths, URLs, PIL images, numpy arrays (uint8, uint16 or floats in [0, 1];
    H x W, H x W x C or C x H x W), or lists of them; `batch_size` batches the model calls (same results).
    """

    # Longest side at which masks are made; larger photos get them enlarged (nearest). `None`: always full size.
    max_working_size: int | None = MAX_WORKING_SIZE

    def __call__(self, inputs, **kwargs):
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, threshold=None, labels=None, timeout=None, **kwargs):
        preprocess = {}
        if labels is not None:
            self._label_vector(labels)  # validate once, at call time, with a message naming the argument
            preprocess["labels"] = labels
        if timeout is not None:
            preprocess["timeout"] = timeout
        postprocess = {}
        if threshold is not None:
            if isinstance(threshold, str):
                raise ValueError(f"`threshold` must be a number in [0, 1]; got {threshold!r}.")
            postprocess["threshold"] = resolve_threshold(threshold, None, "threshold")
        if "background_threshold" in kwargs:  # only when given: a call must not undo the pipeline's own setting
            resolve_threshold(kwargs["background_threshold"], None)  # validated now, with a message naming it
            postprocess["background_threshold"] = kwargs["background_threshold"]
        return preprocess, {}, postprocess

    def _label_vector(self, labels) -> torch.Tensor:
        config = self.model.config
        vector = torch.zeros(1, config.num_labels, dtype=torch.long)
        items = [labels] if isinstance(labels, (str, int, np.integer)) else labels
        if not isinstance(items, (list, tuple, set)) or len(items) == 0:
            raise ValueError(
                f"`labels` must be a class name or id, or a non-empty list of them; got {labels!r}. Omit `labels` "
                "to use the predicted classes."
            )
        for label in items:
            if isinstance(label, str):
                if label not in config.label2id:
                    raise ValueError(f"Unknown label {label!r} in `labels`; the model knows {list(config.label2id)}.")
                label = config.label2id[label]
            elif isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise ValueError(f"`labels` entries must be class names or integer ids; got {label!r}.")
            if not 0 <= int(label) < config.num_labels:
                raise ValueError(f"Label id {label} in `labels` is out of range 0..{config.num_labels - 1}.")
            vector[0, int(label)] = 1
        return vector

    def preprocess(self, image, labels=None, timeout=None):
        bands = self.model.config.num_channels
        if isinstance(image, np.ndarray) and bands not in (1, 3):
            # Multispectral: the array goes to the image processor as it is (C x H x W), its band count checked.
            array = channels_first(image, bands)
            return self._model_inputs(array, array.shape[1:], labels)
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
                image = np.moveaxis(channels_first(image, bands), 0, -1)  # a clear error for a wrong band count
            image = to_8bit(image)
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        source = image if isinstance(image, str) else None
        try:
            if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
                looks_like_path = os.sep in image or "/" in image or os.path.splitext(image)[1] != ""
                if looks_like_path and not os.path.exists(image):
                    raise FileNotFoundError(f"Image file {image!r} does not exist.")
                if os.path.isfile(image):
                    image = Image.open(image)
                    image.load()
            # Before load_image, whose RGB conversion would clip 16-bit and float images.
            image = load_image(to_8bit(image), timeout=timeout)
        except (OSError, ValueError, SyntaxError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(f"Could not read image {source or type(image).__name__!r}: {error}") from error
        if self.model.config.num_channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        return self._model_inputs(image, (image.height, image.width), labels)

    def _model_inputs(self, image, size: tuple[int, int], labels=None) -> dict:
        inputs = self.image_processor(images=image, return_tensors="pt")
        # Tensors only, one row per image, so batch_size > 1 collates and unbatches them like pixel_values.
        inputs["target_size"] = torch.tensor([[int(size[0]), int(size[1])]])
        if labels is not None:
            inputs["image_labels"] = self._label_vector(labels)
        return inputs

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        outputs = self.model.predict_class_maps(**model_inputs)
        given = torch.full((target_size.shape[0],), "image_labels" in model_inputs, dtype=torch.bool)
        return {
            "class_maps": outputs.class_maps,
            "class_probs": outputs.class_probs,
            "present": outputs.present,
            "image_labels_given": given,
            "target_size": target_size,
        }

    def postprocess(self, model_outputs, threshold=None, background_threshold=AUTO):
        config, processor = self.model.config, self.image_processor
        outputs = ClsMaskSemanticSegmenterOutput(
            class_probs=model_outputs["class_probs"].float(),
            class_maps=model_outputs["class_maps"],
            present=model_outputs["present"],
        )
        probs = outputs.class_probs
        classes = None
        if threshold is not None and not bool(model_outputs["image_labels_given"][0]):
            classes = probs >= threshold
        background_threshold = resolve_threshold(background_threshold, processor.background_threshold)
        target = tuple(int(v) for v in model_outputs["target_size"][0])
        # The label map is made at the bounded working size; each class's binary mask is then enlarged on its own as
        # uint8, so a large photo never holds a full-size int64 label map (see `max_working_size`).
        size = working_size(target, self.max_working_size)
        mask = processor.post_process_semantic_segmentation(outputs, [size], background_threshold, classes)[0]
        results = []
        for label in mask.unique().tolist():
            is_background = background_threshold is not None and label == processor.background_label_id
            binary = (mask == label).to(torch.uint8).mul_(255)
            binary = binary if size == target else nearest_resize(binary, target)
            results.append(
                {
                    "score": None if is_background else round(float(probs[0, label]), 4),
                    "label": config.id2label[label],
                    "mask": Image.fromarray(binary.numpy(), mode="L"),
                }
            )
        results.sort(key=lambda r: -1.0 if r["score"] is None else r["score"], reverse=True)
        return results


__all__ = ["ClsMaskSegmentationPipeline"]
