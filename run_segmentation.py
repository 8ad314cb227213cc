#!/usr/bin/env python
"""Stage 2: stage-1 checkpoint -> pseudo-masks -> a segmentation model trained on them, scored on real masks.

    python run_segmentation.py --model_name_or_path outputs/pretrain
    python run_segmentation.py --model_name_or_path outputs/pretrain --scales 1.0 0.75 1.25 --flip \\
        --fully_supervised_baseline
    accelerate launch run_segmentation.py --model_name_or_path <hub id> --voc_root VOCdevkit/VOC2012 \\
        --seg_model_name_or_path nvidia/mit-b0

1. Pseudo-masks for the training split, batched, from the image-level labels (the usual WSSS protocol; labels come
   from a labels column or the masks) or, with `--pseudo_label_source predictions`, from the model's predictions,
   with optional multi-scale / flip test-time augmentation; saved as a
   `datasets` dataset (image + pseudo_mask) with `save_to_disk` (and `--push_pseudo_masks_to_hub`).
2. A SegFormer (small config from scratch, or `--seg_model_name_or_path`) trained on them with Accelerate and
   evaluated (mIoU, per class) on the validation split's real masks; `--fully_supervised_baseline` trains the same
   recipe on the real masks for a weak/full ratio.
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSemanticSegmentation,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
)

from modeling_clsmask import ClsMaskForMultiLabelClassification, ClsMaskImageProcessor, masks_from_class_maps
from modeling_clsmask.data import (
    IGNORE_INDEX,
    DataSpec,
    ExampleEncoder,
    add_data_arguments,
    augment_batch,
    collate,
    load_data,
    validate_splits,
)
from modeling_clsmask.metrics import confusion_matrices, iou_from_confusion
from modeling_clsmask.model_card import write_model_card
from modeling_clsmask.visualization import colourise, stack_rows, titled_row
from run_pretrain import (
    claim_output_dir,
    find_checkpoint,
    finished_run_results,
    load_pretrained,
    make_accelerator,
    make_schedule,
    mark_run_finished,
    push_folder,
    resume,
    save_checkpoint,
    to_display_image,
)


logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Stage-1 folder or Hub id.")
    add_data_arguments(parser)
    pseudo = parser.add_argument_group("pseudo-masks")
    pseudo.add_argument("--scales", type=float, nargs="+", default=[1.0], help="Test-time scales, e.g. 1.0 0.75 1.25.")
    pseudo.add_argument("--flip", action="store_true", help="Also average horizontally flipped inputs.")
    pseudo.add_argument(
        "--background_threshold", type=float, default=-1.0, help="Default: the stage-1 config's; 'none' via -2."
    )
    pseudo.add_argument("--pseudo_label_source", choices=["auto", "labels", "predictions"], default="auto")
    pseudo.add_argument("--pseudo_batch_size", type=int, default=64)
    pseudo.add_argument("--pseudo_masks_dir", help="Where to save_to_disk the pseudo-labelled dataset.")
    pseudo.add_argument("--push_pseudo_masks_to_hub", action="store_true")
    pseudo.add_argument("--pseudo_masks_repo_id")

    seg = parser.add_argument_group("segmentation model")
    seg.add_argument("--seg_model_name_or_path", help="Any AutoModelForSemanticSegmentation checkpoint.")
    seg.add_argument("--seg_image_size", type=int, help="Default: the stage-1 image size.")
    seg.add_argument("--fully_supervised_baseline", action="store_true")
    seg.add_argument("--per_device_train_batch_size", type=int, default=32)
    seg.add_argument("--per_device_eval_batch_size", type=int, default=64)
    seg.add_argument("--learning_rate", type=float, default=1e-3)
    seg.add_argument("--weight_decay", type=float, default=0.01)
    seg.add_argument("--num_train_epochs", type=int, default=8)
    seg.add_argument("--max_train_steps", type=int)
    seg.add_argument("--gradient_accumulation_steps", type=int, default=1)
    seg.add_argument("--lr_scheduler_type", default="cosine")
    seg.add_argument("--warmup_ratio", type=float, default=0.05)
    seg.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    seg.add_argument("--flip_prob", type=float, default=0.5)
    seg.add_argument("--crop_scale_min", type=float, default=0.6)
    seg.add_argument("--seed", type=int, default=42)

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default="outputs/segmentation")
    out.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write into a non-empty --output_dir that another run (or something else) wrote.",
    )
    out.add_argument("--checkpointing_steps", help="An integer (every N steps) or 'epoch'.")
    out.add_argument("--resume_from_checkpoint")
    out.add_argument("--num_visualizations", type=int, default=4)
    out.add_argument("--with_tracking", action="store_true")
    out.add_argument("--report_to", default="tensorboard")
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id")
    out.add_argument("--hub_token")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    if args.push_pseudo_masks_to_hub and not args.pseudo_masks_repo_id:
        parser.error("--push_pseudo_masks_to_hub needs --pseudo_masks_repo_id.")
    return args


def scaled_size(height: int, width: int, scale: float, patch: int) -> tuple[int, int]:
    """(H, W) times `scale`, rounded to the nearest multiple of the patch size (at least one patch)."""
    return max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch)


@torch.no_grad()
def tta_class_maps(model, pixel_values: torch.Tensor, scales: list[float], flip: bool):
    """Class maps and probabilities averaged over scales (and flips), at the scale-1 patch grid. Batched."""
    patch = model.config.patch_size
    height, width = pixel_values.shape[-2:]
    grid = (max(1, height // patch), max(1, width // patch))
    maps, probs, count = 0, 0, 0
    for scale in scales:
        size = scaled_size(height, width, scale, patch)
        scaled = (
            pixel_values
            if size == (height, width)
            else F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
        )
        for flipped in [False, True] if flip else [False]:
            inputs = scaled.flip(-1) if flipped else scaled
            out = model(inputs, output_class_maps=True)
            class_maps = out.class_maps.flip(-1) if flipped else out.class_maps
            maps = maps + F.interpolate(class_maps.float(), size=grid, mode="bilinear", align_corners=False)
            probs = probs + out.logits.float().sigmoid()
            count += 1
    return maps / count, probs / count


def generate_pseudo_masks(model, spec: DataSpec, split: str, args, accelerator) -> tuple[datasets.Dataset, dict]:
    """Pseudo-label a split: returns a dataset (image, pseudo_mask[, mask]) and, with real masks, its mIoU."""
    config = model.config
    processor = ClsMaskImageProcessor.from_model_config(config)
    size = config.image_grid_size
    encoder = ExampleEncoder(spec, config.num_channels, size, processor.image_mean, processor.image_std)
    data = spec.dataset[split]
    limit = args.max_train_samples if split == args.train_split else args.max_eval_samples
    if limit:
        data = data.select(range(min(limit, len(data))))
    # Every dataset the scripts accept has image labels (a labels column, or masks they are derived from), so
    # "auto" means the WSSS protocol: paint the given labels.
    source = "labels" if args.pseudo_label_source == "auto" else args.pseudo_label_source
    background = config.background_threshold
    if args.background_threshold is not None and args.background_threshold >= 0:
        background = args.background_threshold
    elif args.background_threshold is not None and args.background_threshold <= -2:
        background = None
    loader = DataLoader(data.with_transform(encoder), batch_size=args.pseudo_batch_size, collate_fn=collate)
    masks, confusion = [], 0
    num_labels = config.num_labels
    model.eval().to(accelerator.device)
    for batch in tqdm(loader, desc=f"pseudo-masks ({split})", disable=not accelerator.is_local_main_process):
        pixels = batch["pixel_values"].to(accelerator.device)
        class_maps, probs = tta_class_maps(model, pixels, args.scales, args.flip)
        present = batch["labels"].bool().to(pixels.device) if source == "labels" else probs >= config.class_threshold
        pseudo = masks_from_class_maps(class_maps, probs, present, size, background, config.background_label_id)
        masks.append(pseudo.cpu())
        if "mask" in batch:
            confusion = confusion + confusion_matrices(pseudo.cpu(), batch["mask"], num_labels).sum(0)
    masks = torch.cat(masks).to(torch.uint8).numpy()

    image_column = spec.image_column

    def attach(example, index):
        image = example[image_column]
        original = (image.height, image.width) if isinstance(image, Image.Image) else np.asarray(image).shape[:2]
        pseudo = Image.fromarray(masks[index], mode="L")
        if tuple(original) != tuple(size):
            pseudo = pseudo.resize((original[1], original[0]), Image.NEAREST)
        return {"pseudo_mask": pseudo}

    features = data.features.copy()
    features["pseudo_mask"] = datasets.Image()
    pseudo_data = data.map(attach, with_indices=True, features=features, desc="attaching pseudo-masks")
    keep = [c for c in (image_column, "pseudo_mask", spec.mask_column, spec.labels_column) if c]
    pseudo_data = pseudo_data.select_columns(keep)
    report = {
        "pseudo_label_source": source,
        "scales": args.scales,
        "flip": args.flip,
        "background_threshold": background,
    }
    if isinstance(confusion, torch.Tensor):
        result = iou_from_confusion(confusion)
        report.update(
            pseudo_mask_mean_iou=result["mean_iou"],
            pseudo_mask_per_class_iou=dict(zip(spec.class_names, result["per_class_iou"])),
        )
    return pseudo_data, report


def build_segmenter(args, class_names: list[str], image_size: int, num_channels: int):
    id2label = dict(enumerate(class_names))
    label2id = {v: k for k, v in id2label.items()}
    if args.seg_model_name_or_path:
        return AutoModelForSemanticSegmentation.from_pretrained(
            args.seg_model_name_or_path, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
    config = SegformerConfig(
        num_channels=num_channels,
        hidden_sizes=[32, 64, 128, 160],  # a small SegFormer that trains in minutes on a CPU
        depths=[1, 1, 1, 1],
        decoder_hidden_size=128,
        num_labels=len(class_names),
        id2label=id2label,
        label2id=label2id,
        semantic_loss_ignore_index=IGNORE_INDEX,
        image_size=image_size,
    )
    return SegformerForSemanticSegmentation(config)


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


def train_segmenter(
    args, accelerator, train_spec: DataSpec, eval_spec: DataSpec, image_size, num_channels, name, pseudo_masks=None
):
    """Train one segmentation model on `train_spec`'s mask column; evaluate on `eval_spec`'s real masks."""
    set_seed(args.seed)
    class_names = eval_spec.class_names
    model = build_segmenter(args, class_names, image_size, num_channels)
    processor = (
        SegformerImageProcessorPil(size={"height": image_size, "width": image_size}, do_reduce_labels=False)
        if not args.seg_model_name_or_path
        else _seg_processor(args.seg_model_name_or_path, image_size)
    )
    if num_channels != len(processor.image_mean):
        processor.image_mean, processor.image_std, processor.do_rescale = (
            [0.0] * num_channels,
            [1.0] * num_channels,
            False,
        )
    mean, std = processor.image_mean, processor.image_std
    size = (image_size, image_size)
    train_encoder = ExampleEncoder(train_spec, num_channels, size, mean, std)
    eval_encoder = ExampleEncoder(eval_spec, num_channels, size, mean, std)
    train_loader = DataLoader(
        train_spec.dataset[args.train_split].with_transform(train_encoder),
        shuffle=True,
        collate_fn=collate,
        batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_data = eval_spec.dataset[args.validation_split]
    if args.max_eval_samples:
        eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
    eval_loader = DataLoader(
        eval_data.with_transform(eval_encoder), collate_fn=collate, batch_size=args.per_device_eval_batch_size
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch, max_steps, epochs, scheduler = make_schedule(args, optimizer, train_loader, accelerator)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    checkpoint_root = os.path.join(args.output_dir, f"checkpoints_{name}")
    completed, start_epoch, resume_step = 0, 0, 0
    if args.resume_from_checkpoint and name == "weak":
        path = find_checkpoint(args.resume_from_checkpoint, checkpoint_root, args.output_dir)
        completed, start_epoch, resume_step = resume(
            accelerator, path, steps_per_epoch, args.gradient_accumulation_steps
        )
    step_every = (
        int(args.checkpointing_steps) if args.checkpointing_steps and args.checkpointing_steps.isdigit() else None
    )
    progress = tqdm(
        range(max_steps), initial=completed, desc=f"train ({name})", disable=not accelerator.is_local_main_process
    )
    crop = (args.crop_scale_min, 1.0)
    for epoch in range(start_epoch, epochs):
        model.train()
        train_loader.set_epoch(epoch)
        loader = (
            accelerator.skip_first_batches(train_loader, resume_step)
            if epoch == start_epoch and resume_step
            else train_loader
        )
        for batch in loader:
            with accelerator.accumulate(model):
                pixels, masks = augment_batch(batch["pixel_values"], batch["mask"], args.flip_prob, crop)
                loss = model(pixel_values=pixels, labels=masks).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if args.with_tracking:
                    accelerator.log({f"{name}_train_loss": loss.item()}, step=completed)
                if step_every and completed % step_every == 0:
                    save_checkpoint(accelerator, os.path.join(checkpoint_root, f"step_{completed}"), args.output_dir)
            if completed >= max_steps:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, os.path.join(checkpoint_root, f"epoch_{epoch}"), args.output_dir)
        if completed >= max_steps:
            break
    metrics, panels = evaluate_segmenter(
        model,
        eval_loader,
        accelerator,
        len(class_names),
        args.num_visualizations,
        class_names,
        mean,
        std,
        pseudo_masks,
    )
    logger.info(f"{name} segmentation: mIoU {metrics['mean_iou']:.4f}")
    return accelerator.unwrap_model(model), processor, metrics, panels


def _seg_processor(name_or_path: str, image_size: int):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(name_or_path)
    processor.size = {"height": image_size, "width": image_size}
    return processor


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    marker = claim_output_dir(args, accelerator, "run_segmentation")
    if marker.get("finished_before"):
        return finished_run_results(args.output_dir)
    set_seed(args.seed)
    if args.with_tracking:
        accelerator.init_trackers(
            "clsmask_segmentation", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    stage1 = load_pretrained(
        ClsMaskForMultiLabelClassification.from_pretrained, args.model_name_or_path, "--model_name_or_path"
    )
    with accelerator.main_process_first():
        spec = load_data(args)
    if list(spec.class_names) != [stage1.config.id2label[i] for i in range(stage1.config.num_labels)]:
        raise ValueError(
            f"The dataset's classes {spec.class_names} differ from the stage-1 model's "
            f"{[stage1.config.id2label[i] for i in range(stage1.config.num_labels)]}."
        )
    if not spec.has_masks:
        raise ValueError(
            "Stage 2 evaluates against real masks: the dataset needs a mask column in its validation split."
        )
    validate_splits(spec, [args.train_split, args.validation_split])

    # 1. Pseudo-masks (computed on the main process, shared through the saved dataset).
    pseudo_dir = args.pseudo_masks_dir or os.path.join(args.output_dir, "pseudo_masks")
    report = {}
    if accelerator.is_main_process:
        pseudo_train, report = generate_pseudo_masks(stage1, spec, args.train_split, args, accelerator)
        pseudo_val, val_report = generate_pseudo_masks(stage1, spec, args.validation_split, args, accelerator)
        report.update({f"validation_{k}": v for k, v in val_report.items() if k.startswith("pseudo_mask")})
        splits = {args.train_split: pseudo_train, args.validation_split: pseudo_val}
        datasets.DatasetDict(splits).save_to_disk(pseudo_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "pseudo_mask_results.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        if "pseudo_mask_mean_iou" in report:
            print(
                f"pseudo-mask mIoU ({args.train_split}, {report['pseudo_label_source']}): "
                f"{report['pseudo_mask_mean_iou']:.4f}"
            )
        if args.push_pseudo_masks_to_hub:
            datasets.load_from_disk(pseudo_dir).push_to_hub(args.pseudo_masks_repo_id, token=args.hub_token)
    accelerator.wait_for_everyone()
    image_size = args.seg_image_size or stage1.config.image_grid_size[0]
    num_channels = stage1.config.num_channels
    del stage1
    pseudo = datasets.load_from_disk(pseudo_dir)

    # 2. Segmentation on pseudo-masks (and, optionally, on the real masks with the same recipe).
    # Segmentation training reads masks only (labels_format "mask"): pseudo-masks here, real masks for the baseline.
    weak_spec = dataclasses.replace(
        spec, dataset=pseudo, mask_column="pseudo_mask", labels_column=None, labels_format="mask",
        source=f"pseudo-masks of {spec.source}",
    )  # fmt: skip
    first = pseudo[args.validation_split].select(
        range(min(args.num_visualizations, len(pseudo[args.validation_split])))
    )
    shown = [np.asarray(example["pseudo_mask"].resize((image_size, image_size), Image.NEAREST)) for example in first]
    model, processor, metrics, panels = train_segmenter(
        args, accelerator, weak_spec, spec, image_size, num_channels, "weak", shown
    )
    results = {
        "segmentation_mean_iou": metrics["mean_iou"],
        "segmentation_per_class_iou": metrics["per_class_iou"],
        **report,
    }
    results["weak_train_images"] = len(pseudo[args.train_split])
    if args.fully_supervised_baseline:
        # The same training images as the weak model (its pseudo-masks were made for the first max_train_samples),
        # so that the weak/full ratio compares like with like.
        full_data = datasets.DatasetDict(dict(spec.dataset))
        full_data[args.train_split] = full_data[args.train_split].select(range(results["weak_train_images"]))
        full_spec = dataclasses.replace(spec, dataset=full_data, labels_column=None, labels_format="mask")
        _, _, full, _ = train_segmenter(args, accelerator, full_spec, spec, image_size, num_channels, "full")
        results.update(
            full_train_images=len(full_data[args.train_split]),
            fully_supervised_mean_iou=full["mean_iou"],
            fully_supervised_per_class_iou=full["per_class_iou"],
            weak_to_full_ratio=metrics["mean_iou"] / max(full["mean_iou"], 1e-12),
        )
    if args.with_tracking:
        accelerator.log({k: v for k, v in results.items() if isinstance(v, float)})
        accelerator.end_training()

    if accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        if panels:
            stack_rows(panels).save(os.path.join(args.output_dir, "validation_panels.png"))
        card_metrics = {
            "mean_iou": results["segmentation_mean_iou"],
            **{k: v for k, v in results.items() if isinstance(v, float)},
        }
        write_model_card(
            args.output_dir,
            model.config,
            card_metrics,
            spec,
            {**vars(args), "init_from": args.seg_model_name_or_path},
            stage="segmentation",
        )
        line = f"segmentation mIoU (validation, trained on pseudo-masks): {results['segmentation_mean_iou']:.4f}"
        if "fully_supervised_mean_iou" in results:
            line += (
                f" | fully supervised: {results['fully_supervised_mean_iou']:.4f}"
                f" | ratio {results['weak_to_full_ratio']:.3f} (both trained on {results['weak_train_images']} images)"
            )
        print(line)
        mark_run_finished(args.output_dir)
        if args.push_to_hub:
            push_folder(
                args.output_dir, args.hub_model_id, args.hub_token, "Upload clsmask stage-2 segmentation model"
            )
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
