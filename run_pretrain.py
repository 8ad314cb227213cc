#!/usr/bin/env python
"""Stage 1: train the class-token ViT on image-level labels, with Accelerate and datasets.

    python run_pretrain.py                                   # built-in synthetic shapes, CPU, ~10 minutes
    accelerate launch run_pretrain.py --dataset_name <hub id or folder> --init_from google/vit-base-patch16-224
    accelerate launch --cpu --num_processes 2 run_pretrain.py ...   # data parallel (gloo) on CPU
    python run_pretrain.py --voc_root VOCdevkit/VOC2012 --background_threshold 0.5
    python run_pretrain.py --dataset_name <folder> --mask_label_offset 1   # masks store class k as k + 1

Follows the layout of transformers' `*_no_trainer.py` examples: argparse, `Accelerator`, `datasets`,
`save_state`/`load_state` checkpoints, `--with_tracking`, `--push_to_hub`. The plumbing it shares with
`run_segmentation.py` lives in `modeling_clsmask/training/`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import datasets
import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from modeling_clsmask import (
    ClsMaskConfig,
    ClsMaskForMultiLabelClassification,
    ClsMaskImageProcessor,
)
from modeling_clsmask.backbones import backbone_depth
from modeling_clsmask.configuration_clsmask import CLASS_MAP_SOURCES, check_attention_map_scales
from modeling_clsmask.pseudo_masks import AUTO, MASK_ASSEMBLIES, resolve_threshold
from modeling_clsmask.training.arguments import (
    DataArguments,
    add_data_arguments,
    add_output_arguments,
    add_training_arguments,
    check_arguments,
    fraction_or_auto,
    optional_fraction,
    scale_or_auto,
    tracked_arguments,
)
from modeling_clsmask.training.baselines import frozen_baselines
from modeling_clsmask.training.data import (
    ExampleEncoder,
    augment_batch,
    cached_features_dataloader,
    collate,
    eval_dataloader,
    load_data,
    sample_training_rows,
    subsample_splits,
    train_dataloader,
    validate_splits,
    write_dataset_card,
)
from modeling_clsmask.training.loop import (
    ATTENTION_IMPLEMENTATIONS,
    attention_implementation,
    checkpointed_training_attention,
    choose_training_attention,
    make_accelerator,
    prepare_training,
    record_training_attention,
    resume_from,
    train_loop,
)
from modeling_clsmask.training.metrics import (
    class_assignment_counts,
    class_assignment_summary,
    classification_metrics,
    confusion_matrices,
    iou_from_confusion,
)
from modeling_clsmask.training.model_card import write_model_card
from modeling_clsmask.training.outputs import (
    claim_output_dir,
    finished_run_results,
    load_pretrained,
    mark_run_finished,
    push_folder,
    release_output_dir,
)
from modeling_clsmask.training.presets import (
    COARSE_GRID,
    PRESETS,
    RAW_BACKGROUND,
    REFINED_BACKGROUND,
    apply_preset,
    describe_preset,
    resolve_attention_map_scales,
    resolve_class_token_init,
    resolve_token_mask_rate,
)
from modeling_clsmask.training.visualization import attention_panel, stack_rows, to_display_image


logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)

    model = parser.add_argument_group(
        "model (options marked 'preset' default to modeling_clsmask/training/presets.py)"
    )
    model.add_argument(
        "--init_from",
        help="A pretrained backbone (folder or Hub id): ViT, DeiT, DINOv2 (with registers), CLIP. E.g. "
        "facebook/dinov2-small, google/vit-base-patch16-224, openai/clip-vit-base-patch16.",
    )
    model.add_argument(
        "--preset", choices=sorted(PRESETS), help="Defaults to use: 'pretrained' with --init_from, else 'scratch'."
    )
    model.add_argument("--image_size", type=int, help="Input side in pixels (preset).")
    model.add_argument("--patch_size", type=int, help="Patch side (preset; the backbone's with --init_from).")
    model.add_argument("--num_channels", type=int, help="Image bands (preset; new bands from RGB filters).")
    model.add_argument("--hidden_size", type=int, help="Transformer width (preset / the backbone's).")
    model.add_argument("--num_hidden_layers", type=int, help="Depth (preset / the backbone's first N blocks).")
    model.add_argument("--num_attention_heads", type=int, help="Heads per block (preset / the backbone's).")
    model.add_argument("--intermediate_size", type=int, help="MLP width (preset / the backbone's).")
    model.add_argument("--num_register_tokens", type=int, help="[REG] tokens (preset; paper: 1).")
    model.add_argument(
        "--token_mask_rate",
        type=fraction_or_auto,
        help="Class-specific token masking rate, or 'auto' (preset; paper: 0.5).",
    )
    model.add_argument(
        "--patch_embedding_type",
        choices=["conv", "patchify"],
        help="conv: small convolutional stem (learns from scratch); patchify: ViT's patch projection (preset).",
    )
    model.add_argument("--conv_stem_depth", type=int, help="3x3 convolutions per stem resolution (preset).")
    model.add_argument(
        "--classifier_type",
        choices=["shared", "flatten"],
        default="shared",
        help="shared: one readout vector for every class token (class-specific maps); flatten: the paper's Linear.",
    )
    model.add_argument(
        "--weight_init",
        choices=["fan_in", "normal"],
        help="fan_in: PyTorch's default init (trains from scratch); normal: ViT's std-0.02 init (preset).",
    )
    model.add_argument(
        "--class_token_isolation",
        action="store_true",
        help="Class-token queries attend only to patches and themselves (not other class tokens or [REG]).",
    )
    model.add_argument(
        "--hide_class_tokens",
        action=argparse.BooleanOptionalAction,
        help="Patch and [REG] queries do not attend to the class tokens, which only read (preset).",
    )
    model.add_argument(
        "--patch_dropout", type=float, default=0.0, help="Share of patch tokens dropped per image in training."
    )
    model.add_argument(
        "--class_token_layers", type=int, help="Class tokens join only the last N blocks; 0 = all blocks (preset)."
    )
    model.add_argument(
        "--image_branch_layers",
        type=int,
        help="The image logits come from a fine-tuned copy of the last N blocks (an image-classification branch); "
        "the maps keep the blocks as they are. 0 = no branch (preset).",
    )
    model.add_argument(
        "--image_branch_logit_weight",
        type=float,
        help="With an image branch, the image logits are this weight times the branch's plus the rest times the "
        "patch classifier's; 1 = the branch's alone (preset).",
    )
    model.add_argument(
        "--class_token_init",
        choices=CLASS_TOKEN_INITS,
        help="'embedding': the class tokens start as the model's (with --init_from: copies of the source's [CLS] "
        "embedding); 'class_mean': class c starts as the mean state of the [REG] token (the source's [CLS]) at the "
        "first block with class tokens, over training images with class c; 'auto': 'class_mean' where the classes "
        "include a background class, else 'embedding' (preset).",
    )
    model.add_argument(
        "--freeze_layers",
        type=int,
        help="Freeze the patch embedding, positions and the first N blocks; -1 = the whole backbone (preset).",
    )
    model.add_argument(
        "--cache_features",
        choices=[AUTO, "off"],
        default=AUTO,
        help="'auto': where nothing below the first block with class tokens learns and the only augmentation is the "
        "flip, compute those blocks once per training image and flip, with the patch rows of the blocks above where "
        "nothing learning reaches them (hidden class tokens, frozen blocks), and train from memory (at most "
        f"{FEATURE_CACHE_MAX_GIB:g} GiB); 'off': run the whole backbone every step.",
    )
    model.add_argument(
        "--training_attention",
        choices=[AUTO, *ATTENTION_IMPLEMENTATIONS],
        default=AUTO,
        help="Attention kernel of the training steps. 'auto': on a CPU the faster of sdpa and eager for a step on the "
        "first training batch (timed at start-up; a resumed run keeps its checkpoint's), elsewhere sdpa. The two "
        "differ in rounding only: name one for bit-identical reruns. Evaluation and the saved model keep the "
        "model's own (sdpa).",
    )
    model.add_argument(
        "--use_head_gates",
        action="store_true",
        help="Hard Concrete gates per head (sparse attention). With hidden class tokens (the pretrained preset) they "
        "gate the class tokens' rows of the blocks with class tokens and learn even where the blocks are frozen.",
    )
    model.add_argument("--gate_log_alpha_init", type=float, default=3.0, help="Initial gate log_alpha (3 = open).")
    model.add_argument("--l0_penalty", type=float, default=0.01, help="L0 penalty weight on the head gates.")
    model.add_argument(
        "--attention_map_layers", type=int, help="The last N blocks' class attention makes the maps (preset)."
    )
    model.add_argument(
        "--attention_map_layer_ids",
        type=int,
        nargs="+",
        help="Block indices (0 = first) whose class attention makes the maps, instead of --attention_map_layers.",
    )
    model.add_argument(
        "--attention_map_scales",
        type=scale_or_auto,
        nargs="+",
        help="Test-time input scales averaged into the maps, or 'auto': 1 and 1.5 where the input's patch grid is "
        f"coarser than {COARSE_GRID} patches a side, else 1 (preset).",
    )
    model.add_argument(
        "--attention_map_flip",
        action=argparse.BooleanOptionalAction,
        help="Also average the maps of flipped inputs (preset).",
    )
    model.add_argument(
        "--image_logits_over_scales",
        action=argparse.BooleanOptionalAction,
        help="Also average the image logits over the rescaled passes of --attention_map_scales (preset).",
    )
    model.add_argument(
        "--attention_map_refinement_iterations",
        type=int,
        help="Iterations of the pixel-adaptive refinement of the maps with the image; 0 = off (preset).",
    )
    model.add_argument(
        "--attention_map_refinement_sigma",
        type=float,
        default=0.5,
        help="Colour tolerance of the refinement, in units of the local spread of the input bands.",
    )
    model.add_argument(
        "--attention_map_refinement_dilations",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 12, 24],
        help="Dilations (input pixels) of the refinement's neighbourhood.",
    )
    model.add_argument(
        "--mask_assembly",
        choices=list(MASK_ASSEMBLIES),
        help="How maps become masks: the paper's above-mean painting by score, or the per-pixel argmax (preset).",
    )
    model.add_argument(
        "--attention_map_affinity_power",
        type=float,
        help="Propagate the maps over patches of like features (cosine ** power); 0 = off (preset).",
    )
    model.add_argument(
        "--use_patch_classifier",
        action=argparse.BooleanOptionalAction,
        help="Train a linear classifier on every patch token beside the class tokens (its scores: a CAM) (preset).",
    )
    model.add_argument(
        "--class_map_source",
        choices=list(CLASS_MAP_SOURCES),
        help="Maps from the class attention, the patch classifier's CAM, or the geometric mean or the mean of both "
        "(preset).",
    )
    model.add_argument(
        "--cam_probability",
        action=argparse.BooleanOptionalAction,
        help="The CAM enters the maps as the patch classifier's probability (sigmoid), not its logit (preset).",
    )
    model.add_argument(
        "--patch_classifier_loss_weight", type=float, default=1.0, help="Weight of the patch classifier's BCE."
    )
    model.add_argument(
        "--patch_classifier_top_fraction",
        type=float,
        help="The patch classifier's image logit: the mean of this fraction of its highest patch logits, 1 = all "
        "(preset).",
    )
    model.add_argument("--diversity_loss_coefficient", type=float, default=0.0, help="Public code's option: 0.1.")
    model.add_argument(
        "--background_threshold",
        type=optional_fraction,
        default=AUTO,
        help="Normalised class score under which a pixel is background: 'auto' (where masks hold background pixels: "
        f"the preset's, else {REFINED_BACKGROUND} with the map refinement, {RAW_BACKGROUND} without; else none), "
        "'none', or a number.",
    )
    model.add_argument(
        "--image_mean", type=float, nargs="+", help="Per-band mean (default: the backbone's, or ImageNet's for RGB)."
    )
    model.add_argument("--image_std", type=float, nargs="+", help="Per-band std (default: as --image_mean).")
    model.add_argument(
        "--test_split", default="test", help="Held-out split evaluated once after training (skipped when absent)."
    )
    model.add_argument(
        "--baseline_train_samples",
        type=int,
        default=2000,
        help="With --init_from and masks: training images for the frozen-backbone baselines printed beside the "
        "results (CAM, linear probe), drawn at random from the model's own training images; 0 = skip them.",
    )
    model.add_argument(
        "--new_parameter_lr_multiplier",
        type=float,
        help="Learning-rate factor for parameters the backbone does not have (class tokens, readout) (preset).",
    )
    model.add_argument(
        "--patch_classifier_lr_multiplier",
        type=float,
        help="Learning-rate factor for the patch classifier, a linear probe on the patch tokens (preset; default: "
        "--new_parameter_lr_multiplier).",
    )

    train = parser.add_argument_group("training")
    add_training_arguments(
        train, batch_size=None, learning_rate=None, weight_decay=0.05, epochs=None, crop_scale_min=None
    )
    train.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw", help="Optimizer.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0: off).")

    add_output_arguments(parser, "outputs/pretrain")
    parser.add_argument(
        "--eval_every_epochs", type=int, help="Evaluate on the validation split every N epochs (preset)."
    )
    parser.add_argument(
        "--recipe", help="A recipe name in recipes/ (voc, coco, dfc2020, endotect, ade20k) or a JSON path."
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    apply_recipe(parser, argv)
    args = parser.parse_args(argv)
    args.preset_applied = apply_preset(args)
    check_arguments(parser, args)
    return args


def recipes_folder() -> str:
    """The recipes: installed with the package (`modeling_clsmask.training.recipes`), or in this checkout."""
    try:
        spec = importlib.util.find_spec("modeling_clsmask.training.recipes")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")  # a checkout without an install


RECIPES = recipes_folder()


def apply_recipe(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Use a recipe's `args` as defaults (command-line arguments still win); unknown keys are an error."""
    known, _ = parser.parse_known_args(argv)
    if not known.recipe:
        return
    path = known.recipe if known.recipe.endswith(".json") else os.path.join(RECIPES, f"{known.recipe}.json")
    if not os.path.exists(path):
        available = sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".json"))
        parser.error(f"Recipe {known.recipe!r} not found; available: {available} (or a path to a .json file).")
    with open(path) as handle:
        recipe = json.load(handle)
    dests = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe.get("args", {})) - dests)
    if unknown:
        parser.error(f"Recipe {path} sets unknown options {unknown}.")
    parser.set_defaults(**recipe.get("args", {}))


# Command-line options passed to ClsMaskConfig under the same name (the architecture ones: see build_model).
CONFIG_FROM_ARGS = (
    "num_register_tokens", "token_mask_rate", "use_head_gates", "l0_penalty", "diversity_loss_coefficient",
    "classifier_type", "class_token_isolation", "hide_class_tokens", "patch_dropout", "gate_log_alpha_init",
    "attention_map_layer_ids",
    "attention_map_scales", "attention_map_flip", "image_logits_over_scales", "attention_map_refinement_iterations",
    "attention_map_refinement_sigma", "attention_map_refinement_dilations", "attention_map_affinity_power",
    "use_patch_classifier", "class_map_source", "patch_classifier_loss_weight", "patch_classifier_top_fraction",
    "cam_probability", "image_branch_layers", "image_branch_logit_weight",
)  # fmt: skip
ARCHITECTURE_FROM_ARGS = (
    "patch_embedding_type", "conv_stem_depth", "image_size", "patch_size", "num_channels", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "intermediate_size", "weight_init",
)  # fmt: skip


def mask_settings(args, background_label_id: int | None, background_in_masks: bool = True) -> dict:
    """The image processor's mask settings from the arguments. `background_in_masks=False` (a background class that
    no mask contains): 'auto' leaves background off."""
    default_background = getattr(args, "auto_background_threshold", None)
    if default_background is None:
        default_background = REFINED_BACKGROUND if args.attention_map_refinement_iterations else RAW_BACKGROUND
    has_background = background_label_id is not None and background_in_masks
    return {
        "background_threshold": resolve_threshold(
            args.background_threshold, default_background if has_background else None
        ),
        "background_label_id": background_label_id or 0,
        "mask_assembly": args.mask_assembly,
    }


def foreground_ids(processor: ClsMaskImageProcessor, num_labels: int) -> list[int]:
    """Class ids scored as objects: all, less the background class when the processor paints background."""
    background = processor.background_label_id if processor.background_threshold is not None else None
    return [i for i in range(num_labels) if i != background]


# The maps of one pass (no test-time scales, flips or refinement): `predict_class_maps` overrides for monitoring.
ONE_PASS = {"scales": [1.0], "flip": False, "refinement_iterations": 0}


def build_model(
    args, class_names: list[str], background_label_id: int | None = None
) -> ClsMaskForMultiLabelClassification:
    """A model from scratch, or around a pretrained backbone (`--init_from`), configured from the arguments.
    `background_label_id`: the data's background class, if any (it resolves `--token_mask_rate auto`)."""
    id2label = dict(enumerate(class_names))
    fields = {name: getattr(args, name) for name in CONFIG_FROM_ARGS}
    fields["token_mask_rate"] = resolve_token_mask_rate(args, background_label_id is not None)
    fields["class_token_layers"] = args.class_token_layers or None
    fields.pop("attention_map_scales")  # set below, once the patch grid is known ('auto')
    if "image_branch_logit_weight" in getattr(args, "preset_applied", {}) and not args.use_patch_classifier:
        fields["image_branch_logit_weight"] = 1.0  # the preset's blend reads the patch classifier the user turned off
    # Unless given (by the user or the preset): every block the class tokens take part in.
    map_layers = args.attention_map_layers or args.class_token_layers or args.num_hidden_layers
    if map_layers:
        fields["attention_map_layers"] = map_layers
    architecture = {name: getattr(args, name) for name in ARCHITECTURE_FROM_ARGS if getattr(args, name) is not None}
    if args.init_from:
        architecture.pop("weight_init", None)  # pretrained weights overwrite every initialised tensor that matters

        def from_backbone(path: str) -> ClsMaskForMultiLabelClassification:
            if "image_branch_layers" in getattr(args, "preset_applied", {}):
                # The preset's branch on a backbone of few blocks: every block but the first, at most.
                depth = args.num_hidden_layers or backbone_depth(path)
                fields["image_branch_layers"] = min(args.image_branch_layers, depth - 1)
            return ClsMaskForMultiLabelClassification.from_pretrained_backbone(
                path, id2label=id2label, **architecture, **fields
            )

        model = load_pretrained(from_backbone, args.init_from, "--init_from")
    else:
        config = ClsMaskConfig(
            id2label=id2label, label2id={v: k for k, v in id2label.items()}, **architecture, **fields
        )
        model = ClsMaskForMultiLabelClassification(config)
    if args.attention_map_scales is not None:
        grid = model.config.image_size // model.config.patch_size
        model.config.attention_map_scales = check_attention_map_scales(resolve_attention_map_scales(args, grid))
    freeze_early_layers(model, args.freeze_layers or 0)
    return model


FEATURE_CACHE_MAX_GIB = 8.0  # --cache_features auto: the most memory the cached features may take
CLASS_TOKEN_INITS = (AUTO, "embedding", "class_mean")
CLASS_TOKEN_INIT_SAMPLES = 512  # training images whose [REG] states start the class tokens ('class_mean')


@torch.no_grad()
def init_class_tokens_from_data(model: ClsMaskForMultiLabelClassification, loader) -> None:
    """'class_mean': start class c at the mean [REG] state, at the first block with class tokens, over the images
    of `loader` that hold c (all images' mean for a class none holds). Copies of one embedding start every class
    alike, and in block 0's space rather than the space of the block they join."""
    base = model.clsmask
    was_training = base.training
    base.eval()
    sums, counts, total, images = 0.0, 0.0, 0.0, 0
    for batch in loader:
        states = base.class_block_register_states(batch["pixel_values"])[:, -1].float()  # (B, D): the source's [CLS]
        labels = batch["labels"].float()  # (B, C)
        sums = sums + labels.T @ states
        counts = counts + labels.sum(0)
        total, images = total + states.sum(0), images + states.shape[0]
    mean = total / images
    class_means = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], mean)
    base.init_class_tokens(class_means)
    base.train(was_training)


def feature_cache_blocker(args, model: ClsMaskForMultiLabelClassification) -> str | None:
    """Why the training images' `class_block_inputs` may change between steps (None: they cannot, so they can be
    computed once per image and flip)."""
    base, config = model.clsmask, model.config
    first = base.block_inputs_layer()
    if first == 0:
        if base.image_branch_layer() == 0:
            return "the image branch copies every block"
        return "the class tokens join at block 0"
    embeddings = base.embeddings
    below = [embeddings.patch_embeddings, *base.layers[:first], base.pre_layernorm]
    parameters = [p for module in below if module is not None for p in module.parameters()]
    parameters += [embeddings.position_embeddings, embeddings.register_tokens, embeddings.register_position_embeddings]
    if any(p is not None and p.requires_grad for p in parameters):
        return f"the blocks below block {first} learn"
    if args.crop_scale_min < 1.0:
        return "random crops change the features every epoch"
    if config.patch_dropout > 0 or config.hidden_dropout_prob > 0 or config.attention_probs_dropout_prob > 0:
        return "dropout changes the features every step"
    if config.diversity_loss_coefficient > 0:
        return "the diversity loss needs the class maps of the images"
    return None


@torch.no_grad()
def cache_block_inputs(
    model: ClsMaskForMultiLabelClassification, loader, accelerator, patch_states: bool = False
) -> dict[str, torch.Tensor]:
    """`class_block_inputs` of every image of `loader` as given and flipped (in the order of the loader), and with
    `patch_states` their `frozen_patch_states`, on the CPU: what `CachedFeatures` serves to the training loop."""
    base = model.clsmask
    was_training = base.training
    base.eval().to(accelerator.device)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    views = ("plain", "flipped")
    parts = {key: [] for key in (*views, *(f"{view}_patch_states" for view in views if patch_states), "labels")}
    with torch.random.fork_rng(devices=[]):  # iterating a loader draws a seed: the training's draws stay as they were
        for batch in tqdm(loader, desc="features", disable=not accelerator.is_local_main_process, leave=False):
            pixels = batch["pixel_values"].to(accelerator.device)
            for view, images in zip(views, (pixels, pixels.flip(-1))):
                with accelerator.autocast():
                    inputs = base.class_block_inputs(images)
                    parts[view].append(inputs.to("cpu", dtype))
                    if patch_states:
                        parts[f"{view}_patch_states"].append(base.frozen_patch_states(inputs).to("cpu", dtype))
            parts["labels"].append(batch["labels"])
    base.train(was_training)
    return {key: torch.cat(values) for key, values in parts.items()}


def normalisation(args, model) -> dict:
    """`image_mean` / `image_std`: the command line's, else the backbone's (its preprocessor_config.json), else the
    processor's defaults."""
    mean, std = getattr(model, "backbone_normalisation", (None, None))
    if model.config.num_channels != 3:
        mean = std = None  # the backbone's RGB statistics do not describe other bands
    chosen = {"image_mean": args.image_mean or mean, "image_std": args.image_std or std}
    return {key: value for key, value in chosen.items() if value}


def freeze_early_layers(model: ClsMaskForMultiLabelClassification, count: int) -> None:
    """Freeze the patch embedding, the patch positions, the pre-encoder norm and the first `count` blocks (all of
    them: the final norm too): a small labelled set then cannot wash out the pretrained features, and their backward
    pass is skipped."""
    base = model.clsmask
    count = len(base.layers) if count == -1 else count
    if count == 0:
        return
    if not 0 < count <= len(base.layers):
        raise ValueError(f"--freeze_layers {count}: the model has {len(base.layers)} blocks (-1 freezes all).")
    frozen = [base.embeddings.patch_embeddings, *base.layers[:count]]
    if base.pre_layernorm is not None:
        frozen.append(base.pre_layernorm)
    if count == len(base.layers):
        # The whole backbone: only the class tokens and the heads learn. The [REG] tokens (the source's extra tokens
        # and its [CLS]) run through every block, so a learnt one would move every frozen feature (it cost 0.04 mIoU
        # with 600 CamVid tiles; docs/results.md).
        frozen.append(base.layernorm)
        if base.embeddings.register_tokens is not None:
            base.embeddings.register_tokens.requires_grad_(False)
            base.embeddings.register_position_embeddings.requires_grad_(False)
    for module in frozen:
        module.requires_grad_(False)
    base.embeddings.position_embeddings.requires_grad_(False)
    if base.config.hide_class_tokens:
        # Gates on hidden class tokens act on the class rows only: like the class tokens they are the method's
        # parameters, not the backbone's, and learn in frozen blocks.
        for gate in base.head_gates():
            gate.requires_grad_(True)


@torch.no_grad()
def evaluate(
    model, dataloader, accelerator, class_names, processor, num_visualizations=0, augment_maps=True
) -> tuple[dict, list]:
    """Classification metrics and, where masks exist, pseudo-mask mIoU (image labels and predictions).

    `augment_maps=False` scores the one-pass maps (`ONE_PASS`: no test-time scales, flips or refinement): cheaper,
    for monitoring."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    config = unwrapped.config
    num_labels = len(class_names)
    foreground = foreground_ids(processor, num_labels)
    gathered = {"probs": [], "labels": [], "conf_gt": [], "conf_pred": [], "conf_base": [], "assign": []}
    panels = []
    for batch in tqdm(dataloader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        if "mask" not in batch:
            probs = model(batch["pixel_values"]).logits.float().sigmoid()
            gathered["probs"].append(accelerator.gather_for_metrics(probs).cpu())
            gathered["labels"].append(accelerator.gather_for_metrics(batch["labels"]).cpu())
            continue
        with accelerator.autocast():  # the prepared forward has it; this method is called on the unwrapped model
            outputs = unwrapped.predict_class_maps(batch["pixel_values"], **({} if augment_maps else ONE_PASS))
        probs = outputs.class_probs
        items = {"probs": probs, "labels": batch["labels"]}
        masks = batch["mask"]
        sizes = [tuple(masks.shape[-2:])] * masks.shape[0]
        from_labels = torch.stack(
            processor.post_process_semantic_segmentation(outputs, sizes, classes=batch["labels"].bool())
        )
        from_predictions = torch.stack(processor.post_process_semantic_segmentation(outputs, sizes))
        # Trivial baseline: every pixel takes the image's first (lowest-id) foreground label.
        first = (batch["labels"][:, foreground] > 0).float().argmax(1)
        baseline = torch.tensor(foreground, device=masks.device)[first][:, None, None].expand_as(masks)
        items.update(
            conf_gt=confusion_matrices(from_labels, masks, num_labels),
            conf_pred=confusion_matrices(from_predictions, masks, num_labels),
            conf_base=confusion_matrices(baseline, masks, num_labels),
            assign=class_assignment_counts(outputs.class_maps, masks, batch["labels"], foreground),
        )
        if accelerator.is_main_process and len(panels) < num_visualizations:
            for i in range(min(num_visualizations - len(panels), masks.shape[0])):
                present = batch["labels"][i].nonzero().flatten().tolist()
                panels.append(
                    attention_panel(
                        to_display_image(batch["pixel_values"][i], processor.image_mean, processor.image_std),
                        outputs.class_maps[i],
                        class_names,
                        [c for c in present if c in foreground],
                        from_labels[i].cpu().numpy(),
                        masks[i].cpu().numpy(),
                    )
                )
        for key, value in accelerator.gather_for_metrics(items).items():
            gathered[key].append(value.cpu())
    model.train()
    probs, labels = torch.cat(gathered["probs"]), torch.cat(gathered["labels"])
    metrics = classification_metrics(probs, labels, foreground, config.class_threshold, class_names)
    metrics["num_images"] = int(probs.shape[0])
    if gathered["conf_gt"]:
        for name, key in (("pseudo_mask", "conf_gt"), ("prediction_mask", "conf_pred"), ("baseline", "conf_base")):
            result = iou_from_confusion(torch.cat(gathered[key]).sum(0))
            metrics[f"{name}_mean_iou"] = result["mean_iou"]
            metrics[f"{name}_per_class_iou"] = dict(zip(class_names, result["per_class_iou"]))
        metrics.update(class_assignment_summary(torch.cat(gathered["assign"])))
    return metrics, panels


# Parameters without weight decay (matched by name): biases, norms, learned tokens and positions, gate parameters.
NO_DECAY = ("bias", "layernorm", "norm", "class_tokens", "position_embeddings", "register_tokens", "log_alpha")


# Parameters a pretrained backbone does not provide (matched by name): they may learn faster than the backbone.
NEW_PARAMETERS = ("class_tokens", "class_position_embeddings", "register_", "classifier", "log_alpha")


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or Adam) over the trainable parameters: no decay on NO_DECAY; `learning_rate` times
    `new_parameter_lr_multiplier` on NEW_PARAMETERS and times `patch_classifier_lr_multiplier` on the patch classifier
    (a linear head on frozen features needs a far larger step than a fine-tuned block)."""
    new_factor = args.new_parameter_lr_multiplier or 1.0
    patch_factor = args.patch_classifier_lr_multiplier or new_factor
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not any(key in name for key in NO_DECAY)
        if name.startswith("patch_classifier."):
            factor = patch_factor
        else:
            factor = new_factor if any(key in name for key in NEW_PARAMETERS) else 1.0
        groups.setdefault((decay, factor), []).append(parameter)
    param_groups = [
        {"params": params, "weight_decay": args.weight_decay if decay else 0.0, "lr": args.learning_rate * factor}
        for (decay, factor), params in groups.items()
    ]
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(param_groups, lr=args.learning_rate)


def print_results(metrics: dict, args) -> None:
    """The figures a user reads first, with the chance level beside class assignment."""
    if "pseudo_mask_mean_iou" not in metrics:
        print(f"mAP: {metrics.get('mAP', float('nan')):.4f}  F1: {metrics.get('f1_micro', float('nan')):.4f}")
        return
    for prefix, split in (("", args.validation_split), ("test_", args.test_split)):
        if f"{prefix}pseudo_mask_mean_iou" not in metrics:
            continue
        m = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        print(
            f"[{split}] pseudo-mask mIoU (image labels): {m['pseudo_mask_mean_iou']:.4f} | "
            f"from predictions: {m['prediction_mask_mean_iou']:.4f} | "
            f"baseline (every pixel = first image label): {m['baseline_mean_iou']:.4f} | mAP: {m['mAP']:.4f} | "
            f"class assignment: {m['class_assignment_accuracy']:.4f} (chance {m['class_assignment_chance']:.4f}, "
            f"margin {m['class_assignment_margin']:+.4f})"
        )
        if "baseline_frozen_cam_mean_iou" in m:
            print(
                f"[{split}] frozen backbone, same data and metric: CAM {m['baseline_frozen_cam_mean_iou']:.4f} "
                f"(mAP {m['baseline_frozen_cam_mAP']:.4f}) | label-only {m['baseline_label_only_mean_iou']:.4f} | "
                f"fully supervised linear probe {m.get('baseline_linear_probe_mean_iou', float('nan')):.4f} | "
                f"this model - CAM: {m['pseudo_mask_mean_iou'] - m['baseline_frozen_cam_mean_iou']:+.4f}"
            )
        if "baseline_frozen_cam_tuned_mean_iou" in m:
            print(
                f"[{split}] CAM at its best background threshold on this split (optimistic for CAM): "
                f"{m['baseline_frozen_cam_tuned_mean_iou']:.4f} at {m['baseline_frozen_cam_tuned_threshold']} | "
                f"this model - tuned CAM: {m['pseudo_mask_mean_iou'] - m['baseline_frozen_cam_tuned_mean_iou']:+.4f}"
            )


def training_attention_for(args, accelerator, model, loss_fn, train_loader, checkpoint: str | None) -> str:
    """`--training_attention`, with 'auto' resolved: the resumed `checkpoint`'s, else `choose_training_attention`'s on
    the first rows of `train_loader`'s dataset (read directly: iterating the loader would draw on its generator; the
    step times are logged). Every checkpoint records it (`record_training_attention`)."""
    choice = args.training_attention
    if choice == AUTO:
        choice = checkpointed_training_attention(checkpoint)
        if choice is not None:
            logger.info(f"Training attention 'auto': {choice}, as in the checkpoint resumed from.")
    if choice is None:  # 'auto' and no checkpoint (or one saved before the choice was recorded)
        data = train_loader.dataset
        batch = train_loader.collate_fn([data[i] for i in range(min(args.per_device_train_batch_size, len(data)))])
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        unwrapped = accelerator.unwrap_model(model)
        choice, times = choose_training_attention(accelerator, model, unwrapped.config, loss_fn, batch)
        timed = f" (a step on the first batch: {', '.join(f'{name} {s:.3f} s' for name, s in times.items())})"
        logger.info(f"Training attention 'auto': {choice}" + (timed if times else ""))
    record_training_attention(accelerator, choice)
    return choice


def cached_train_loader(args, model, train_loader, accelerator):
    """With `--cache_features auto` where `feature_cache_blocker` finds nothing: a loader over the training images'
    cached block inputs (same rows, order and batches as `train_loader`), else None (the reason is logged)."""
    if args.cache_features == "off":
        return None
    base = model.clsmask
    blocker = feature_cache_blocker(args, model)
    rows = len(train_loader.dataset)
    grid = (model.config.image_size // model.config.patch_size) ** 2
    tokens = grid + model.config.num_register_tokens
    width = 2 if accelerator.mixed_precision == "bf16" else 4
    gib = 2 * rows * tokens * model.config.hidden_size * width / 2**30
    if blocker is None and gib > FEATURE_CACHE_MAX_GIB:
        blocker = f"they would take {gib:.1f} GiB (more than {FEATURE_CACHE_MAX_GIB:g})"
    if blocker is not None:
        logger.info(f"Features not cached ({blocker}): the whole backbone runs every step.")
        return None
    first, first_class = base.block_inputs_layer(), base.first_class_token_layer()
    # The frozen patch rows of the blocks with class tokens too, where they fit: entering each and leaving the last.
    states_gib = gib * (len(base.layers) - first_class + 1) if base.patch_rows_are_frozen() else None
    with_states = states_gib is not None and gib + states_gib <= FEATURE_CACHE_MAX_GIB
    # train_loader's own encoded rows, in their stored order (the cache is indexed like the dataset).
    rows_loader = torch.utils.data.DataLoader(
        train_loader.dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate
    )
    features = cache_block_inputs(model, rows_loader, accelerator, patch_states=with_states)
    cached = f"the inputs of block {first} for {rows} training images as given and flipped"
    skipped = f"blocks 0-{first - 1} do not run again in training"
    if with_states:
        cached += f", with the frozen patch rows of blocks {first_class}-{len(base.layers) - 1}"
        skipped += ", nor do the patch rows of the blocks above"
    elif states_gib is not None:
        skipped += (f" (the frozen patch rows above, {states_gib:.1f} GiB more, exceed {FEATURE_CACHE_MAX_GIB:g} GiB: "
                    "they run every step, without autograd)")  # fmt: skip
    total = gib + (states_gib if with_states else 0.0)
    logger.info(f"Features cached: {cached} ({total:.2f} GiB); {skipped}.")
    return cached_features_dataloader(features, args.per_device_train_batch_size, args.seed)


def sampled_training_loader(args, spec, encoder: ExampleEncoder, count: int):
    """Batches, in order, of at most `count` of the model's training rows (`spec`'s, already cut to
    --max_train_samples by `subsample_splits`) drawn at random."""
    rows = sample_training_rows(spec.dataset[args.train_split], None, count, args.seed)
    return eval_dataloader(rows, encoder, args.per_device_eval_batch_size)


def backbone_baselines(args, spec, encoder, config, processor, has_test: bool, bf16: bool) -> dict:
    """What the frozen `--init_from` backbone gives without the method, on the same splits and metric (label-only,
    CAM of a linear head, fully supervised linear probe): `baseline_*` and `test_baseline_*` entries; `bf16`: the
    backbone's features under bf16 autocast (as the run's own precision)."""
    foreground = foreground_ids(processor, len(spec.class_names))
    train = sampled_training_loader(args, spec, encoder, args.baseline_train_samples)
    logger.info(f"Baselines of the frozen backbone ({len(train.dataset)} of the model's training images, drawn at "
                "random) ...")  # fmt: skip
    splits = {"": args.validation_split, **({"test_": args.test_split} if has_test else {})}
    loaders = {
        prefix: eval_dataloader(spec.dataset[split], encoder, args.per_device_eval_batch_size)
        for prefix, split in splits.items()
    }
    background = None
    if processor.background_threshold is not None:
        background = (processor.background_label_id, processor.background_threshold)
    figures = frozen_baselines(
        args.init_from,
        config.image_size,
        train,
        loaders,
        len(spec.class_names),
        foreground,
        background,
        bf16=bf16,
    )
    return {f"{prefix}baseline_{key}": value for prefix, values in figures.items() for key, value in values.items()}


def save_outputs(args, model, processor, metrics: dict, panels: list, spec, save_function=torch.save) -> None:
    """The final folder: weights, processor, results, data description, panels and model card."""
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir, save_function=save_function)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "eval_results.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    write_dataset_card(os.path.join(args.output_dir, "training_data.json"), spec)
    if panels:
        stack_rows(panels).save(os.path.join(args.output_dir, "validation_panels.png"))
    write_model_card(args.output_dir, model.config, metrics, spec, vars(args), stage="pretrain")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(
        args.gradient_accumulation_steps,
        args.mixed_precision,
        args.with_tracking and args.report_to,
        args.output_dir,
        args.allow_slow_bf16,
    )
    if claim_output_dir(args, accelerator, "run_pretrain").get("finished_before"):
        release_output_dir(args.output_dir)
        return finished_run_results(args.output_dir)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    # Data: every split used is checked now, so a bad validation or test split does not cost a training epoch.
    with accelerator.main_process_first():
        spec = load_data(DataArguments.from_namespace(args))
    has_test = args.test_split in spec.dataset and args.test_split != args.validation_split
    validate_splits(spec, [args.train_split, args.validation_split] + ([args.test_split] if has_test else []))
    spec = subsample_splits(
        spec, {args.train_split: args.max_train_samples, args.validation_split: args.max_eval_samples}, args.seed
    )
    logger.info(describe_preset(args.preset, args.preset_applied))
    if spec.background_label_id is not None and not spec.background_in_masks:
        background = spec.class_names[spec.background_label_id]
        logger.warning(
            f"Class {background!r} (id {spec.background_label_id}) is in no mask of any split: background is not "
            + ("painted (pass --background_threshold to paint it anyway)." if args.background_threshold == AUTO else
               f"painted at --background_threshold {args.background_threshold} although no mask has it.")
        )  # fmt: skip
    model = build_model(args, spec.class_names, spec.background_label_id)
    # What the preset's 'auto' choices (token masking, class-token start) turn on, for the start-up log.
    which = "include a background class" if spec.background_label_id is not None else "have no background class"
    if args.token_mask_rate == AUTO:
        logger.info(f"Token masking 'auto': rate {model.config.token_mask_rate} (the classes {which}).")
    if args.attention_map_scales == [AUTO]:
        grid = model.config.image_size // model.config.patch_size
        logger.info(f"Test-time scales 'auto': {model.config.attention_map_scales} (patch grid {grid} x {grid}; "
                    f"grids under {COARSE_GRID} x {COARSE_GRID} get an upscaled pass).")  # fmt: skip
    processor = ClsMaskImageProcessor.from_model_config(
        model.config,
        **normalisation(args, model),
        **mask_settings(args, spec.background_label_id, spec.background_in_masks),
    )
    encoder = ExampleEncoder(spec, processor)
    train_loader = train_dataloader(
        spec.dataset[args.train_split], encoder, args.per_device_train_batch_size, args.seed
    )
    eval_loader = eval_dataloader(spec.dataset[args.validation_split], encoder, args.per_device_eval_batch_size)

    class_token_init = resolve_class_token_init(args, spec.background_label_id is not None)
    if args.class_token_init == AUTO:
        logger.info(f"Class-token start 'auto': {class_token_init} (the classes {which}).")
    if class_token_init == "class_mean":
        if model.clsmask.pre_layernorm is None:
            init_loader = sampled_training_loader(args, spec, encoder, CLASS_TOKEN_INIT_SAMPLES)
            init_class_tokens_from_data(model, init_loader)
            block = model.clsmask.first_class_token_layer()
            logger.info(f"Class tokens start as their class's mean [REG] state at block {block} "
                        f"({len(init_loader.dataset)} training images).")  # fmt: skip
        elif args.class_token_init == AUTO:
            logger.info("Class tokens start as the source's [CLS] embedding: its pre-encoder norm (CLIP) rules out "
                        "the 'class_mean' start.")  # fmt: skip
        else:
            raise ValueError("--class_token_init class_mean: the class tokens pass the backbone's pre-encoder norm "
                             "(CLIP) before their first block; use --class_token_init embedding.")  # fmt: skip
    train_loader = cached_train_loader(args, model, train_loader, accelerator) or train_loader
    optimizer = build_optimizer(args, model)
    model, optimizer, train_loader, eval_loader, schedule = prepare_training(
        accelerator, args, model, optimizer, train_loader, eval_loader
    )
    if args.with_tracking:
        accelerator.init_trackers("clsmask_pretrain", tracked_arguments(args))
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running stage-1 training *****")
    logger.info(f"  Data = {spec.source}: {len(train_loader.dataset)} train / {len(eval_loader.dataset)} eval, "
                f"classes {spec.class_names}, skipped undecodable: {spec.skipped or 'none'}")  # fmt: skip
    logger.info(f"  Epochs = {schedule.num_epochs}, total batch = {total_batch}, steps = {schedule.max_steps}")
    checkpoint_root = os.path.join(args.output_dir, "checkpoints")
    state = resume_from(accelerator, args.resume_from_checkpoint, checkpoint_root, args.output_dir, schedule)

    unwrapped = accelerator.unwrap_model(model)
    results = {"metrics": {}, "panels": []}

    def step_loss(model, batch):
        if "plain" in batch:  # cached features: the same flip draw as augment_batch's (it has no crop here)
            flip = torch.rand(batch["plain"].shape[0], 4, device=batch["plain"].device)[:, 3] < args.flip_prob

            def view(suffix: str) -> torch.Tensor:  # each image's flipped or plain cache entry, bf16 in memory
                plain = batch[f"plain{suffix}"]
                return torch.where(flip.view(-1, *[1] * (plain.dim() - 1)), batch[f"flipped{suffix}"], plain).float()

            states = view("_patch_states") if "plain_patch_states" in batch else None
            return model(block_inputs=view(""), frozen_patch_states=states, labels=batch["labels"]).loss
        pixels, _ = augment_batch(batch["pixel_values"], None, args.flip_prob, (args.crop_scale_min, 1.0))
        return model(pixels, labels=batch["labels"]).loss

    training_attention = training_attention_for(args, accelerator, model, step_loss, train_loader, state.checkpoint)

    def loss_fn(model, batch):
        with attention_implementation(unwrapped.config, training_attention):
            return step_loss(model, batch)

    def open_gates() -> dict:
        gates = unwrapped.clsmask.gate_values()
        return {} if gates is None else {"gates_open": f"{(gates > 0).float().mean().item():.2f}"}

    def on_epoch_end(epoch: int, steps: int, is_last: bool, train_loss: float) -> None:
        if (epoch + 1) % args.eval_every_epochs and not is_last:
            return
        shown = args.num_visualizations if is_last else 0
        # Epochs before the last score the one-pass maps (the test-time scales and flips cost ~5x the evaluation).
        metrics, panels = evaluate(
            model, eval_loader, accelerator, spec.class_names, processor, shown, augment_maps=is_last
        )
        metrics.update(epoch=epoch, step=steps, train_loss=train_loss)
        gates = unwrapped.clsmask.gate_values()
        if gates is not None:
            metrics["open_gate_fraction"] = float((gates > 0).float().mean())
        shown_metrics = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        logger.info(f"epoch {epoch} ({'maps as configured' if is_last else 'one-pass maps'}): {shown_metrics}")
        if args.with_tracking:
            scalars = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            accelerator.log(scalars, step=steps)
        results.update(metrics=metrics, panels=panels)

    train_loop(
        accelerator, model, optimizer, train_loader, schedule, loss_fn, state=state,
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        checkpoint_root=checkpoint_root, output_dir=args.output_dir,
        max_grad_norm=args.max_grad_norm, clip_separately=("image_branch",), with_tracking=args.with_tracking,
        name="train", postfix=open_gates,
        on_epoch_end=on_epoch_end,
    )  # fmt: skip
    metrics = results["metrics"]
    if has_test:
        test_loader = accelerator.prepare(
            eval_dataloader(spec.dataset[args.test_split], encoder, args.per_device_eval_batch_size)
        )
        test_metrics, _ = evaluate(model, test_loader, accelerator, spec.class_names, processor)
        metrics.update({f"test_{k}": v for k, v in test_metrics.items()})
        logger.info(f"test: { {k: round(v, 4) for k, v in test_metrics.items() if isinstance(v, float)} }")
    if args.init_from and spec.has_masks and args.baseline_train_samples and accelerator.is_main_process:
        bf16 = accelerator.mixed_precision == "bf16"
        metrics.update(backbone_baselines(args, spec, encoder, unwrapped.config, processor, has_test, bf16))
    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(args, unwrapped, processor, metrics, results["panels"], spec, accelerator.save)
        print_results(metrics, args)
        mark_run_finished(args.output_dir)
        if args.push_to_hub:
            push_folder(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.wait_for_everyone()
    release_output_dir(args.output_dir)
    return metrics


if __name__ == "__main__":
    main()
