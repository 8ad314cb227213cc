#!/usr/bin/env python
"""Stage 2: stage-1 checkpoint -> pseudo-masks -> a segmentation model trained on them, scored on real masks.

    python run_segmentation.py --model_name_or_path outputs/pretrain
    python run_segmentation.py --model_name_or_path outputs/pretrain --scales 1.0 --no-flip \\
        --fully_supervised_baseline
    accelerate launch run_segmentation.py --model_name_or_path <hub id> --voc_root VOCdevkit/VOC2012 \\
        --seg_model_name_or_path nvidia/mit-b0

1. Pseudo-masks for the training split, batched, from the image-level labels (the usual WSSS protocol; labels come
   from a labels column or the masks) or, with `--pseudo_label_source predictions`, from the model's predictions,
   through the same two calls as the pipeline: `predict_class_maps` (the checkpoint's scales, flips and refinement,
   overridable with `--scales` / `--flip` / `--refinement_iterations`) and the stage-1 image processor's
   `post_process_semantic_segmentation`, at each image's own size; saved as a `datasets` dataset (image +
   pseudo_mask) with `save_to_disk` (and `--push_pseudo_masks_to_hub`).
2. A segmentation model (a small UperNet-ResNet from scratch, `--seg_architecture segformer`, or
   `--seg_model_name_or_path`) trained on them with Accelerate and
   evaluated (mIoU, per class) on the validation split's real masks; `--fully_supervised_baseline` trains the same
   recipe on the real masks, on the same images, for a weak/full ratio. Both models checkpoint and resume.

Shares its plumbing (data, Accelerate loop, checkpoints, outputs) with `run_pretrain.py` through
`modeling_clsmask/training/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    ResNetConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from modeling_clsmask import ClsMaskForMultiLabelClassification, ClsMaskImageProcessor
from modeling_clsmask.backbones import normalisation
from modeling_clsmask.configuration_clsmask import check_attention_map_scales, check_refinement_iterations
from modeling_clsmask.pseudo_masks import AUTO, nearest_resize, resolve_threshold
from modeling_clsmask.training.arguments import (
    DataArguments,
    add_data_arguments,
    add_output_arguments,
    add_training_arguments,
    check_arguments,
    optional_fraction,
    tracked_arguments,
)
from modeling_clsmask.training.data import (
    IGNORE_INDEX,
    DataSpec,
    ExampleEncoder,
    augment_batch,
    eval_dataloader,
    load_data,
    subsample_splits,
    train_dataloader,
    validate_splits,
)
from modeling_clsmask.training.loop import make_accelerator, prepare_training, resume_from, train_loop
from modeling_clsmask.training.metrics import confusion_matrices, iou_from_confusion
from modeling_clsmask.training.model_card import write_model_card
from modeling_clsmask.training.outputs import (
    claim_output_dir,
    finished_run_results,
    load_pretrained,
    mark_run_finished,
    push_folder,
    release_output_dir,
)
from modeling_clsmask.training.visualization import colourise, stack_rows, titled_row, to_display_image


logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Stage-1 folder or Hub id.")
    add_data_arguments(parser)
    pseudo = parser.add_argument_group("pseudo-masks")
    # Stage 1's names for the same config fields are accepted too (--attention_map_scales, ...).
    pseudo.add_argument(
        "--scales",
        "--attention_map_scales",
        dest="scales",
        type=float,
        nargs="+",
        help="Test-time scales whose maps are averaged, e.g. 0.75 1 1.5 2 (default: the stage-1 config's "
        "attention_map_scales).",
    )
    pseudo.add_argument(
        "--flip",
        "--attention_map_flip",
        dest="flip",
        action=argparse.BooleanOptionalAction,
        help="Also average the maps of flipped inputs (default: the stage-1 config's attention_map_flip).",
    )
    pseudo.add_argument(
        "--refinement_iterations",
        "--attention_map_refinement_iterations",
        dest="refinement_iterations",
        type=int,
        help="Iterations of the refinement of the maps with the image, 0 = off (default: the stage-1 config's "
        "attention_map_refinement_iterations).",
    )
    pseudo.add_argument(
        "--background_threshold",
        type=optional_fraction,
        default=AUTO,
        help="'auto' (the stage-1 image processor's), 'none' (every pixel gets a class) or a number in [0, 1].",
    )
    pseudo.add_argument(
        "--ignore_margin",
        type=optional_fraction,
        default=None,
        help="Training pseudo-masks leave unlabelled (255, skipped by the loss) the pixels whose best class beats "
        "the runner-up (or background at its threshold) by less than this, in normalised map units; 'none' (default) "
        "labels every pixel. The validation split's pseudo-masks are always complete.",
    )
    pseudo.add_argument(
        "--pseudo_label_source",
        choices=["labels", "predictions"],
        default="labels",
        help="Classes painted per image: the given image labels (the WSSS protocol) or the model's predictions.",
    )
    pseudo.add_argument("--pseudo_batch_size", type=int, default=64, help="Batch size of pseudo-mask generation.")
    pseudo.add_argument("--pseudo_masks_dir", help="Where to save_to_disk the pseudo-labelled dataset.")
    pseudo.add_argument("--push_pseudo_masks_to_hub", action="store_true", help="Push it to --pseudo_masks_repo_id.")
    pseudo.add_argument("--pseudo_masks_repo_id", help="Hub dataset repo for --push_pseudo_masks_to_hub.")

    seg = parser.add_argument_group("segmentation model")
    seg.add_argument(
        "--seg_model_name_or_path",
        help="Any AutoModelForSemanticSegmentation checkpoint (default: a small model from scratch, see "
        "--seg_architecture).",
    )
    seg.add_argument(
        "--seg_architecture",
        choices=["upernet", "segformer"],
        default="upernet",
        help="The model trained from scratch without --seg_model_name_or_path: 'upernet' (UperNet on a small "
        "basic-block ResNet; fully supervised 0.67 vs 0.26 mIoU for the SegFormer on 3000 random-colour images, "
        "measured) or 'segformer' (the small SegFormer of earlier versions).",
    )
    seg.add_argument(
        "--seg_backbone",
        help="A pretrained backbone with an AutoBackbone class (e.g. facebook/dinov2-small, a folder): UperNet on "
        "four of its blocks instead of the model from scratch; its normalisation is used.",
    )
    seg.add_argument(
        "--seg_freeze_backbone",
        action="store_true",
        help="With --seg_backbone: train the UperNet head only (the backbone's forward runs without gradients).",
    )
    seg.add_argument("--seg_image_size", type=int, help="Default: the stage-1 image size.")
    seg.add_argument(
        "--fully_supervised_baseline",
        action="store_true",
        help="Also train on the real masks of the same images, for the weak/full ratio.",
    )
    add_training_arguments(seg, batch_size=32, learning_rate=1e-3, weight_decay=0.01, epochs=8)
    add_output_arguments(parser, "outputs/segmentation")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    args.ignore_margin = resolve_threshold(args.ignore_margin, None, "--ignore_margin")  # 'auto' = off
    if args.push_pseudo_masks_to_hub and not args.pseudo_masks_repo_id:
        parser.error("--push_pseudo_masks_to_hub needs --pseudo_masks_repo_id.")
    # The config's own checks, so the command line and the config accept the same values.
    for flag, value, check in (
        ("--scales", args.scales, check_attention_map_scales),
        ("--refinement_iterations", args.refinement_iterations, check_refinement_iterations),
    ):
        if value is not None:
            try:
                check(value)
            except ValueError as error:
                parser.error(f"{flag}: {error}")
    return args


def stage1_processor(args, config) -> ClsMaskImageProcessor:
    """The stage-1 checkpoint's image processor (its normalisation and mask settings), with this run's
    `--background_threshold`; a checkpoint without one gets the config's size and bands and no background."""
    try:
        processor = ClsMaskImageProcessor.from_pretrained(args.model_name_or_path)
    except OSError:
        logger.warning(f"{args.model_name_or_path} has no preprocessor_config.json: using the config's image size.")
        processor = ClsMaskImageProcessor.from_model_config(config)
    processor.background_threshold = resolve_threshold(args.background_threshold, processor.background_threshold)
    return processor


def generate_pseudo_masks(
    model, processor: ClsMaskImageProcessor, spec: DataSpec, split: str, args, accelerator
) -> tuple[datasets.Dataset, dict]:
    """Pseudo-label a split at each image's own size: returns a dataset (image, pseudo_mask[, mask]) and, with real
    masks, its mIoU. Maps: `predict_class_maps` with this run's overrides; masks: the stage-1 processor."""
    config = model.config
    size = (processor.size.height, processor.size.width)
    encoder = ExampleEncoder(spec, processor, keep_sizes=True)
    data = spec.dataset[split]  # cut to --max_train_samples / --max_eval_samples by `subsample_splits`
    source = args.pseudo_label_source
    overrides = {"scales": args.scales, "flip": args.flip, "refinement_iterations": args.refinement_iterations}
    loader = eval_dataloader(data, encoder, args.pseudo_batch_size)
    ignore_margin = args.ignore_margin if split == args.train_split else None
    masks, confusion, labelled, pixels_total = [], 0, 0, 0
    num_labels = config.num_labels
    model.eval().to(accelerator.device)
    for batch in tqdm(loader, desc=f"pseudo-masks ({split})", disable=not accelerator.is_local_main_process):
        pixels = batch["pixel_values"].to(accelerator.device)
        labels = batch["labels"].to(pixels.device) if source == "labels" else None
        with accelerator.autocast():  # bf16 with --mixed_precision bf16 (masks are made in fp32)
            outputs = model.predict_class_maps(pixels, image_labels=labels, **overrides)
        sizes = batch["original_size"].tolist()
        pseudo = processor.post_process_semantic_segmentation(outputs, sizes, ignore_margin=ignore_margin)
        masks.extend(mask.cpu().to(torch.uint8).numpy() for mask in pseudo)
        labelled += sum(int((mask != IGNORE_INDEX).sum()) for mask in pseudo)
        pixels_total += sum(mask.numel() for mask in pseudo)
        if "mask" in batch:
            resized = torch.stack([nearest_resize(mask, size) for mask in pseudo]).cpu()
            # Scored where both are labelled: with --ignore_margin, the quality of what the segmenter learns from.
            truth = torch.where(resized == IGNORE_INDEX, IGNORE_INDEX, batch["mask"])
            confusion = confusion + confusion_matrices(resized, truth, num_labels).sum(0)

    image_column = spec.image_column

    def attach(example, index):
        return {"pseudo_mask": Image.fromarray(masks[index], mode="L")}

    features = data.features.copy()
    features["pseudo_mask"] = datasets.Image()
    pseudo_data = data.map(attach, with_indices=True, features=features, desc="attaching pseudo-masks")
    keep = [c for c in (image_column, "pseudo_mask", spec.mask_column, spec.labels_column) if c]
    pseudo_data = pseudo_data.select_columns(keep)
    report = {
        "pseudo_label_source": source,
        "scales": config.attention_map_scales if args.scales is None else args.scales,
        "flip": config.attention_map_flip if args.flip is None else args.flip,
        "refinement_iterations": (
            config.attention_map_refinement_iterations
            if args.refinement_iterations is None
            else args.refinement_iterations
        ),
        "background_threshold": processor.background_threshold,
        "ignore_margin": ignore_margin,
        "labelled_fraction": labelled / max(1, pixels_total),
        "mixed_precision": accelerator.mixed_precision,
    }
    if isinstance(confusion, torch.Tensor):
        result = iou_from_confusion(confusion)
        report.update(
            pseudo_mask_mean_iou=result["mean_iou"],
            pseudo_mask_per_class_iou=dict(zip(spec.class_names, result["per_class_iou"])),
        )
    return pseudo_data, report


def reduction_ratios(image_size: int, strides=(4, 2, 2, 2), defaults=(8, 4, 2, 1), min_keys: int = 8) -> list[int]:
    """SegFormer's key/value spatial reduction per stage, capped so that every stage keeps at least min_keys x
    min_keys keys: the default ratios, made for 512 px inputs, leave each stage 2 x 2 keys at 64 px."""
    side, ratios = image_size, []
    for stride, default in zip(strides, defaults):
        side //= stride
        ratios.append(max(1, min(default, side // min_keys)))
    return ratios


def build_segmenter(args, class_names: list[str], image_size: int, num_channels: int):
    id2label = dict(enumerate(class_names))
    label2id = {v: k for k, v in id2label.items()}
    if args.seg_model_name_or_path:
        return AutoModelForSemanticSegmentation.from_pretrained(
            args.seg_model_name_or_path, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
    if args.seg_backbone:
        return pretrained_upernet(args.seg_backbone, id2label, args.seg_freeze_backbone)
    if args.seg_architecture == "upernet":
        # A 4-stage ResNet of basic blocks (widths 32-256, one block each) under UperNet's pyramid-pooling and FPN
        # head: convolutional features learn shapes from a few thousand images where the small SegFormer learned
        # little beyond background (README, Stage 2), at about the same cost per step on a CPU.
        backbone = ResNetConfig(
            num_channels=num_channels,
            embedding_size=32,
            hidden_sizes=[32, 64, 128, 256],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        config = UperNetConfig(
            backbone_config=backbone,
            hidden_size=64,
            use_auxiliary_head=False,
            num_labels=len(class_names),
            id2label=id2label,
            label2id=label2id,
            loss_ignore_index=IGNORE_INDEX,
        )
        return UperNetForSemanticSegmentation(config)
    config = SegformerConfig(
        num_channels=num_channels,
        hidden_sizes=[32, 64, 128, 160],  # a small SegFormer that trains in minutes on a CPU
        depths=[1, 1, 1, 1],
        sr_ratios=reduction_ratios(image_size),
        decoder_hidden_size=128,
        num_labels=len(class_names),
        id2label=id2label,
        label2id=label2id,
        semantic_loss_ignore_index=IGNORE_INDEX,
        image_size=image_size,
    )
    return SegformerForSemanticSegmentation(config)


def pretrained_upernet(path: str, id2label: dict, freeze: bool = False) -> UperNetForSemanticSegmentation:
    """UperNet on a pretrained `AutoBackbone` (DINOv2, ...): features of the blocks at 1/4, 1/2, 3/4 and all of the
    depth, a 128-wide head; `freeze` leaves the backbone as it is."""
    from transformers import AutoBackbone, AutoConfig

    backbone_config = AutoConfig.from_pretrained(path)
    depth = backbone_config.num_hidden_layers
    indices = [depth // 4, depth // 2, 3 * depth // 4, depth]
    if type(backbone_config) not in AutoBackbone._model_mapping:
        raise ValueError(f"--seg_backbone {path}: a {backbone_config.model_type!r} model has no AutoBackbone class.")
    backbone = AutoBackbone._model_mapping[type(backbone_config)].from_pretrained(path, out_indices=indices)
    config = UperNetConfig(
        backbone_config=backbone.config,
        hidden_size=128,
        use_auxiliary_head=False,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        loss_ignore_index=IGNORE_INDEX,
    )
    model = UperNetForSemanticSegmentation(config)
    model.backbone.load_state_dict(backbone.state_dict())
    model.backbone.requires_grad_(not freeze)
    return model


@torch.no_grad()
def evaluate_segmenter(
    model, loader, accelerator, num_labels, num_visualizations, class_names, mean, std, pseudo_masks=None
):
    """Per-class mIoU on real masks; panels (image, pseudo-mask, prediction, ground truth) for the first images."""
    model.eval()
    confusions, panels = [], []
    for batch in tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        logits = model(pixel_values=batch["pixel_values"]).logits
        logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
        prediction = logits.argmax(1)
        confusions.append(accelerator.gather_for_metrics(confusion_matrices(prediction, batch["mask"], num_labels)))
        if accelerator.is_main_process and len(panels) < num_visualizations:
            for i in range(min(num_visualizations - len(panels), prediction.shape[0])):
                index = len(panels)
                tiles = [("image", to_display_image(batch["pixel_values"][i], mean, std))]
                if pseudo_masks is not None and index < len(pseudo_masks):
                    tiles.append(("pseudo-mask", colourise(pseudo_masks[index], num_labels)))
                tiles += [
                    ("prediction", colourise(prediction[i].cpu().numpy(), num_labels)),
                    ("ground truth", colourise(batch["mask"][i].cpu().numpy(), num_labels)),
                ]
                panels.append(titled_row(tiles))
    model.train()
    result = iou_from_confusion(torch.cat(confusions).sum(0).cpu())
    return {
        "mean_iou": result["mean_iou"],
        "per_class_iou": dict(zip(class_names, result["per_class_iou"])),
        "pixel_accuracy": result["pixel_accuracy"],
    }, panels


def resume_point(args, name: str) -> tuple[str | None, bool]:
    """(what model `name` resumes from, whether a checkpoint is required). With `latest`, each model resumes from its
    own newest checkpoint (the weak model must have one; the baseline starts afresh if it has none yet). A checkpoint
    folder resumes the model it belongs to (`checkpoints_<name>/`); when it is the baseline's, the weak model, which
    trained first, comes back from its own latest."""
    given = args.resume_from_checkpoint
    if not given or given == "latest":
        return given, name == "weak"
    owner = os.path.basename(os.path.dirname(os.path.normpath(given)))
    if owner == f"checkpoints_{name}":
        return given, True
    return ("latest", False) if name == "weak" and owner == "checkpoints_full" else (None, False)


def segmentation_processor(args, image_size: int, num_channels: int):
    """The segmentation model's processor at `image_size`; non-RGB data is fed unnormalised (mean 0, std 1)."""
    if args.seg_model_name_or_path:
        processor = AutoImageProcessor.from_pretrained(args.seg_model_name_or_path)
        processor.size = {"height": image_size, "width": image_size}
    else:
        processor = SegformerImageProcessorPil(
            size={"height": image_size, "width": image_size}, do_reduce_labels=False
        )
        if args.seg_backbone:
            mean, std = normalisation(args.seg_backbone)
            processor.image_mean, processor.image_std = mean or processor.image_mean, std or processor.image_std
    if num_channels != len(processor.image_mean):
        processor.image_mean, processor.image_std = [0.0] * num_channels, [1.0] * num_channels
        processor.do_rescale = False
    return processor


def train_segmenter(
    args, accelerator, train_spec: DataSpec, eval_spec: DataSpec, image_size, num_channels, name, pseudo_masks=None
):
    """Train one segmentation model on `train_spec`'s mask column; evaluate on `eval_spec`'s real masks."""
    set_seed(args.seed)
    class_names = eval_spec.class_names
    model = build_segmenter(args, class_names, image_size, num_channels)
    processor = segmentation_processor(args, image_size, num_channels)
    # The segmenter's normalisation, through the one preprocessing implementation of stage 1 and its pipeline.
    pixels = ClsMaskImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        do_rescale=processor.do_rescale,
    )
    train_loader = train_dataloader(
        train_spec.dataset[args.train_split],
        ExampleEncoder(train_spec, pixels),
        args.per_device_train_batch_size,
        args.seed,
    )
    eval_loader = eval_dataloader(
        eval_spec.dataset[args.validation_split],
        ExampleEncoder(eval_spec, pixels),
        args.per_device_eval_batch_size,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader, eval_loader, schedule = prepare_training(
        accelerator, args, model, optimizer, train_loader, eval_loader
    )
    checkpoint_root = os.path.join(args.output_dir, f"checkpoints_{name}")
    resume, required = resume_point(args, name)
    state = resume_from(accelerator, resume, checkpoint_root, args.output_dir, schedule, required=required)

    def loss_fn(model, batch):
        pixels, masks = augment_batch(batch["pixel_values"], batch["mask"], args.flip_prob, (args.crop_scale_min, 1.0))
        return model(pixel_values=pixels, labels=masks).loss

    train_loop(
        accelerator, model, optimizer, train_loader, schedule, loss_fn, state=state,
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        checkpoint_root=checkpoint_root, output_dir=args.output_dir,
        with_tracking=args.with_tracking, name=name,
    )  # fmt: skip
    metrics, panels = evaluate_segmenter(
        model, eval_loader, accelerator, len(class_names), args.num_visualizations, class_names,
        processor.image_mean, processor.image_std,
        pseudo_masks,
    )  # fmt: skip
    logger.info(f"{name} segmentation: mIoU {metrics['mean_iou']:.4f}")
    return accelerator.unwrap_model(model), processor, metrics, panels


def make_pseudo_masks(args, accelerator, stage1, spec: DataSpec) -> tuple[datasets.DatasetDict, dict]:
    """Pseudo-mask the training and validation splits on the main process and share them through `save_to_disk`."""
    pseudo_dir = args.pseudo_masks_dir or os.path.join(args.output_dir, "pseudo_masks")
    report = {}
    if accelerator.is_main_process:
        processor = stage1_processor(args, stage1.config)
        pseudo_train, report = generate_pseudo_masks(stage1, processor, spec, args.train_split, args, accelerator)
        pseudo_val, val_report = generate_pseudo_masks(
            stage1, processor, spec, args.validation_split, args, accelerator
        )
        report.update({f"validation_{k}": v for k, v in val_report.items() if k.startswith("pseudo_mask")})
        datasets.DatasetDict({args.train_split: pseudo_train, args.validation_split: pseudo_val}).save_to_disk(
            pseudo_dir
        )
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "pseudo_mask_results.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        if "pseudo_mask_mean_iou" in report:
            coverage = ""
            if report["ignore_margin"] is not None:
                coverage = f" on the {report['labelled_fraction']:.1%} of pixels labelled (--ignore_margin)"
            print(
                f"pseudo-mask mIoU ({args.train_split}, {report['pseudo_label_source']}): "
                f"{report['pseudo_mask_mean_iou']:.4f}{coverage}"
            )
        if args.push_pseudo_masks_to_hub:
            datasets.load_from_disk(pseudo_dir).push_to_hub(args.pseudo_masks_repo_id, token=args.hub_token)
    accelerator.wait_for_everyone()
    return datasets.load_from_disk(pseudo_dir), report


def save_outputs(args, model, processor, results: dict, panels: list, spec: DataSpec) -> None:
    """The final folder: the weak model, its processor, results, panels and model card; prints the summary line."""
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "eval_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    if panels:
        stack_rows(panels).save(os.path.join(args.output_dir, "validation_panels.png"))
    card_metrics = {"mean_iou": results["segmentation_mean_iou"]}
    card_metrics.update({k: v for k, v in results.items() if isinstance(v, float)})
    card_args = {**vars(args), "init_from": args.seg_model_name_or_path}
    write_model_card(args.output_dir, model.config, card_metrics, spec, card_args, stage="segmentation")
    line = (
        f"segmentation mIoU ({args.validation_split}, trained on pseudo-masks): {results['segmentation_mean_iou']:.4f}"
    )
    if "fully_supervised_mean_iou" in results:
        line += (
            f" | fully supervised: {results['fully_supervised_mean_iou']:.4f}"
            f" | ratio {results['weak_to_full_ratio']:.3f} (both trained on {results['weak_train_images']} images)"
        )
    print(line)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(
        args.gradient_accumulation_steps,
        args.mixed_precision,
        args.with_tracking and args.report_to,
        args.output_dir,
        args.allow_slow_bf16,
    )
    if claim_output_dir(args, accelerator, "run_segmentation").get("finished_before"):
        release_output_dir(args.output_dir)
        return finished_run_results(args.output_dir)
    set_seed(args.seed)
    if args.with_tracking:
        accelerator.init_trackers("clsmask_segmentation", tracked_arguments(args))

    stage1 = load_pretrained(
        ClsMaskForMultiLabelClassification.from_pretrained, args.model_name_or_path, "--model_name_or_path"
    )
    with accelerator.main_process_first():
        spec = load_data(DataArguments.from_namespace(args))
    stage1_classes = [stage1.config.id2label[i] for i in range(stage1.config.num_labels)]
    if list(spec.class_names) != stage1_classes:
        raise ValueError(f"The dataset's classes {spec.class_names} differ from the stage-1 model's {stage1_classes}.")
    if not spec.has_masks:
        raise ValueError(
            "Stage 2 evaluates against real masks: the dataset needs a mask column in its validation split."
        )
    validate_splits(spec, [args.train_split, args.validation_split])
    spec = subsample_splits(
        spec, {args.train_split: args.max_train_samples, args.validation_split: args.max_eval_samples}, args.seed
    )

    # 1. Pseudo-masks for the training and validation splits.
    pseudo, report = make_pseudo_masks(args, accelerator, stage1, spec)
    image_size = args.seg_image_size or stage1.config.image_grid_size[0]
    num_channels = stage1.config.num_channels
    del stage1

    # 2. Segmentation on the pseudo-masks (training reads masks only: labels_format "mask").
    weak_spec = dataclasses.replace(
        spec, dataset=pseudo, mask_column="pseudo_mask", labels_column=None, labels_format="mask",
        source=f"pseudo-masks of {spec.source}",
    )  # fmt: skip
    validation = pseudo[args.validation_split]
    shown = validation.select(range(min(args.num_visualizations, len(validation))))  # none with 0 visualizations
    shown = [np.asarray(example["pseudo_mask"].resize((image_size, image_size), Image.NEAREST)) for example in shown]
    model, processor, metrics, panels = train_segmenter(
        args, accelerator, weak_spec, spec, image_size, num_channels, "weak", shown
    )
    results = {
        "segmentation_mean_iou": metrics["mean_iou"],
        "segmentation_per_class_iou": metrics["per_class_iou"],
        **report,
        "weak_train_images": len(pseudo[args.train_split]),
    }
    # 3. Optionally the same recipe on the real masks of the same images (`spec` holds the rows drawn for
    # --max_train_samples), so that the weak/full ratio compares like with like.
    if args.fully_supervised_baseline:
        full_spec = dataclasses.replace(spec, labels_column=None, labels_format="mask")
        _, _, full, _ = train_segmenter(args, accelerator, full_spec, spec, image_size, num_channels, "full")
        results.update(
            full_train_images=len(full_spec.dataset[args.train_split]),
            fully_supervised_mean_iou=full["mean_iou"],
            fully_supervised_per_class_iou=full["per_class_iou"],
            weak_to_full_ratio=metrics["mean_iou"] / max(full["mean_iou"], 1e-12),
        )
    if args.with_tracking:
        accelerator.log({k: v for k, v in results.items() if isinstance(v, float)})
        accelerator.end_training()

    if accelerator.is_main_process:
        save_outputs(args, model, processor, results, panels, spec)
        mark_run_finished(args.output_dir)
        if args.push_to_hub:
            push_folder(
                args.output_dir, args.hub_model_id, args.hub_token, "Upload clsmask stage-2 segmentation model"
            )
    accelerator.wait_for_everyone()
    release_output_dir(args.output_dir)
    return results


if __name__ == "__main__":
    main()
