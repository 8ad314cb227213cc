"""The defaults of `run_pretrain.py` in one place: a preset for training from scratch, one for a pretrained backbone.

Every option named here defaults to `None` on the command line; after parsing, the options the user (or a recipe) did
not set take the preset's value: `scratch` without `--init_from`, `pretrained` with it (`--preset` picks another).
Architecture options missing from `pretrained` come from the backbone itself. Why each value: docs/results.md.
"""

from __future__ import annotations

import argparse

from ..pseudo_masks import AUTO


PRESETS: dict[str, dict] = {
    # A small ViT learnt from the data alone (the built-in shapes): convolutional stem, fan-in init, maps of block 0
    # averaged over scales and flips and refined with the image.
    "scratch": {
        "image_size": 64,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "patch_embedding_type": "conv",
        "conv_stem_depth": 2,
        "weight_init": "fan_in",
        "num_register_tokens": 1,
        "token_mask_rate": 0.0,
        "class_token_layers": 0,
        "class_token_init": "embedding",
        "attention_map_layer_ids": [0],
        "attention_map_scales": [0.75, 1.0, 1.5, 2.0],
        "attention_map_flip": True,
        "image_logits_over_scales": False,
        "attention_map_refinement_iterations": 20,
        "attention_map_affinity_power": 0.0,
        "mask_assembly": "threshold",
        "hide_class_tokens": False,
        "use_patch_classifier": False,
        "class_map_source": "attention",
        "patch_classifier_top_fraction": 1.0,
        "cam_probability": False,
        "image_branch_layers": 0,
        "image_branch_logit_weight": 1.0,
        "freeze_layers": 0,
        "learning_rate": 1e-3,
        "new_parameter_lr_multiplier": 1.0,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 20,
        "crop_scale_min": 0.6,
        "eval_every_epochs": 1,
    },
    # An ImageNet-scale ViT (DINOv2, CLIP, DeiT, ViT), kept frozen with its [CLS] (as a [REG] token): the class tokens
    # join the last block only, hidden from the patches, so each is a learnt query over the pretrained patch keys and
    # the final patch tokens stay the source's; a patch classifier (a CAM) learns beside them. The maps are the mean
    # of class attention and CAM, spread over patches of like features, read by their per-pixel argmax.
    "pretrained": {
        "image_size": 112,
        # 'auto': `background_token_mask_rate` where the classes include a background class, else none (see
        # `resolve_token_mask_rate`).
        "token_mask_rate": AUTO,
        "background_token_mask_rate": 0.5,
        "class_token_layers": 1,
        # 'auto': each class token starts as its class's mean [CLS] state at that block where the classes include a
        # background class, else as a copy of the [CLS] embedding (see `resolve_class_token_init`).
        "class_token_init": AUTO,
        "attention_map_layers": 1,
        # 'auto': `coarse_grid_attention_map_scales` where the input's patch grid is coarser than `COARSE_GRID`
        # patches a side (112 px with patch 14: 8 x 8), else one pass (see `resolve_attention_map_scales`).
        "attention_map_scales": [AUTO],
        "coarse_grid_attention_map_scales": [1.0, 1.5],
        # Flips average the maps and the image logits of the flipped input: +0.005-0.013 mIoU and +0.01-0.02 mAP on
        # every validation split tried, for a second forward (docs/results.md, session 12).
        "attention_map_flip": True,
        # The image logits average the upscaled passes too: +0.004-0.01 mAP on 8 x 8 grids (session 23).
        "image_logits_over_scales": True,
        "attention_map_refinement_iterations": 0,
        # 16, not 8: +0.005-0.01 on the validation splits of CamVid tiles, CamVid-objects and the shapes (session 15).
        "attention_map_affinity_power": 16.0,
        "mask_assembly": "argmax",
        "hide_class_tokens": True,
        "use_patch_classifier": True,
        # The mean, not the geometric mean: where the class attention misses an object the CAM still marks it.
        "class_map_source": "attention_cam_mean",
        # The CAM as the patch classifier's probability: +0.004-0.03 on the four validation splits tried (session 15).
        "cam_probability": True,
        # Its image logit is the mean of the top quarter of its patch logits, not of all: a class covering part of
        # the image is then not pushed onto the other classes' patches (docs/results.md, session 14).
        "patch_classifier_top_fraction": 0.25,
        # 'auto' background threshold where the masks hold background (chosen on real photos with a background class
        # and on the built-in shapes; CamVid tiles have none).
        "auto_background_threshold": 0.5,
        # The image logits from a fine-tuned copy of the last 2 blocks: heads on the frozen features classify images
        # of unseen scenes worse (4 blocks: a little better, 1.5 times the run; docs/results.md, session 21).
        "image_branch_layers": 2,
        # Blended half and half with the patch classifier's (on the unchanged blocks): mAP +0.007 cross-sequence,
        # +0.017 on CamVid-objects validation (docs/results.md, session 22).
        "image_branch_logit_weight": 0.5,
        "freeze_layers": -1,
        "learning_rate": 1e-4,
        "new_parameter_lr_multiplier": 10.0,
        # The patch classifier is a linear probe on frozen features: at 10x it ends far from trained (docs/results.md,
        # session 9).
        "patch_classifier_lr_multiplier": 100.0,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 8,
        "crop_scale_min": 1.0,
        "eval_every_epochs": 4,
    },
}
# Background threshold 'auto' without a preset value: on normalised class scores, for datasets whose masks hold
# background pixels, by whether the maps are refined with the image.
REFINED_BACKGROUND = 0.5
RAW_BACKGROUND = 0.2


def apply_preset(args: argparse.Namespace) -> dict:
    """Fill the options left at `None` from the chosen preset; returns {option: value} of what the preset set."""
    name = args.preset or ("pretrained" if args.init_from else "scratch")
    args.preset = name
    applied = {}
    for key, value in PRESETS[name].items():
        if getattr(args, key, None) is None:
            if key == "attention_map_layer_ids" and args.attention_map_layers is not None:
                continue  # the user asked for the last N blocks: explicit block ids would override that
            if key == "attention_map_layers" and args.attention_map_layer_ids is not None:
                continue
            setattr(args, key, value)
            applied[key] = value
    return applied


def resolve_token_mask_rate(args: argparse.Namespace, has_background_class: bool) -> float:
    """`--token_mask_rate`, with 'auto' resolved: the preset's `background_token_mask_rate` for classes that include a
    background class (object classes on a background, as VOC or COCO), else 0.

    Why split on background: with the pretrained preset masking helped on data with a background class and hurt on
    data whose classes tile the image (docs/results.md, session 9). Give a number to choose yourself.
    """
    if args.token_mask_rate != AUTO:
        return args.token_mask_rate
    return PRESETS[args.preset].get("background_token_mask_rate", 0.0) if has_background_class else 0.0


def resolve_class_token_init(args: argparse.Namespace, has_background_class: bool) -> str:
    """`--class_token_init`, with 'auto' resolved: 'class_mean' for classes that include a background class, else
    'embedding'.

    Why split on background: [CLS] attends to the salient object, a good start for object classes on a background
    and a poor one for classes that tile the image (sky, road); with the pretrained preset the class-mean start
    helped on real photos with a background class and lost with all CamVid tiles (docs/results.md, session 11).
    """
    if args.class_token_init != AUTO:
        return args.class_token_init
    return "class_mean" if has_background_class else "embedding"


# Patch grids with fewer patches a side than this count as coarse for `--attention_map_scales auto`.
COARSE_GRID = 12


def resolve_attention_map_scales(args: argparse.Namespace, grid: int) -> list[float]:
    """`--attention_map_scales`, with 'auto' resolved for an input of `grid` patches a side: the preset's
    `coarse_grid_attention_map_scales` when `grid` < `COARSE_GRID`, else one pass ([1.0]).

    Why split on the grid: an upscaled pass adds a finer patch grid to the maps. On 8 x 8 grids (112 px, patch 14) a
    1.5x pass gave +0.01 to +0.05 mIoU on three validation splits; on 16 x 16 (224 px) +0.002 for three times the
    inference (docs/results.md, session 23). Give scales to choose yourself.
    """
    if args.attention_map_scales != [AUTO]:
        return args.attention_map_scales
    coarse = PRESETS[args.preset].get("coarse_grid_attention_map_scales", [1.0])
    return list(coarse) if grid < COARSE_GRID else [1.0]


def describe_preset(name: str, applied: dict) -> str:
    """One line for the start-up log: which preset, and the values it set."""
    values = ", ".join(f"{key}={value}" for key, value in applied.items())
    return f"Preset {name!r} (options you gave win): {values or 'nothing left to set'}"


__all__ = [
    "PRESETS", "RAW_BACKGROUND", "REFINED_BACKGROUND", "apply_preset", "describe_preset", "resolve_token_mask_rate",
]  # fmt: skip
