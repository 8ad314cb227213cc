"""The image-segmentation pipeline of clsmask checkpoints: one mask per predicted class, with its real probability.

Saved with every checkpoint (`custom_pipelines` in config.json), so
`pipeline("image-segmentation", model=..., trust_remote_code=True)` uses it where this package is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .pseudo_masks import masks_from_class_maps


_UNSET = object()


class ClsMaskSegmentationPipeline(Pipeline):
    """Returns, per image, `[{"score": probability, "label": name, "mask": PIL "L" image}]`, one per painted class.

    Parameters (call time): `threshold` (class probability at which a class counts as predicted, default the config's
    `class_threshold`), `background_threshold` (default the config's; `None` paints every pixel with a class), and
    `labels` (class names or ids known to be in the image: masks are restricted to them, the WSSS protocol).
    Background, where the model has a background threshold, is returned with `score=None`: it is not a predicted
    class but what is left over.
    """

    def _sanitize_parameters(self, threshold=None, background_threshold=_UNSET, labels=None, timeout=None, **kwargs):
        preprocess = {}
        if labels is not None:
            preprocess["labels"] = labels
        if timeout is not None:
            preprocess["timeout"] = timeout
        postprocess = {}
        if threshold is not None:
            postprocess["threshold"] = threshold
        if background_threshold is not _UNSET:
            postprocess["background_threshold"] = background_threshold
        return preprocess, {}, postprocess

    def _label_vector(self, labels) -> torch.Tensor:
        config = self.model.config
        vector = torch.zeros(1, config.num_labels, dtype=torch.long)
        for label in [labels] if isinstance(labels, (str, int)) else labels:
            if isinstance(label, str):
                if label not in config.label2id:
                    raise ValueError(f"Unknown label {label!r}; the model knows {list(config.label2id)}.")
                label = config.label2id[label]
            if not 0 <= int(label) < config.num_labels:
                raise ValueError(f"Label id {label} out of range 0..{config.num_labels - 1}.")
            vector[0, int(label)] = 1
        return vector

    def preprocess(self, image, labels=None, timeout=None):
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
                image = np.moveaxis(image, 0, -1)
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        image = load_image(image, timeout=timeout)
        if self.model.config.num_channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        inputs = self.image_processor(images=image, return_tensors="pt")
        inputs["target_size"] = (image.height, image.width)
        if labels is not None:
            inputs["image_labels"] = self._label_vector(labels)
        return inputs

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        outputs = self.model(**model_inputs)
        return {
            "class_maps": outputs.class_maps,
            "class_probs": outputs.class_probs,
            "present": outputs.present,
            "image_labels_given": "image_labels" in model_inputs,
            "target_size": target_size,
        }

    def postprocess(self, model_outputs, threshold=None, background_threshold=_UNSET):
        config = self.model.config
        probs = model_outputs["class_probs"].float()
        present = model_outputs["present"]
        if threshold is not None and not model_outputs["image_labels_given"]:
            present = probs >= threshold
        if background_threshold is _UNSET:
            background_threshold = config.background_threshold
        background = config.background_label_id
        mask = masks_from_class_maps(
            model_outputs["class_maps"], probs, present, model_outputs["target_size"], background_threshold, background
        )[0]
        results = []
        for label in mask.unique().tolist():
            is_background = background_threshold is not None and label == background
            results.append(
                {
                    "score": None if is_background else round(float(probs[0, label]), 4),
                    "label": config.id2label[label],
                    "mask": Image.fromarray((mask == label).numpy().astype(np.uint8) * 255, mode="L"),
                }
            )
        results.sort(key=lambda r: -1.0 if r["score"] is None else r["score"], reverse=True)
        return results


__all__ = ["ClsMaskSegmentationPipeline"]
