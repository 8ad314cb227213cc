"""Typed arguments for the data layer, and the one spelling of optional values on every command line.

An optional threshold is `auto` (the configured default), `none` (switched off) or a number, on the command line as in
Python (`"auto"`, `None`, a float): see `optional_fraction` and `modeling_clsmask.pseudo_masks.AUTO`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from ..pseudo_masks import AUTO
from .synthetic_shapes import DEFAULT_SPLITS, GENERATORS


def optional_fraction(text: str) -> float | str | None:
    """argparse type for `auto` / `none` / a number in [0, 1]."""
    lowered = text.strip().lower()
    if lowered == AUTO:
        return AUTO
    if lowered == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (or 'auto' / 'none'), got {text!r}")
    return value


def fraction_or_auto(text: str) -> float | str:
    """argparse type for `auto` / a number in [0, 1] (a rate that is never off by omission)."""
    value = optional_fraction(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {text!r} (0 turns it off)")
    return value


def scale_or_auto(text: str) -> float | str:
    """argparse type for one `--attention_map_scales` value: a number, or `auto`."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a scale (a number) nor 'auto'") from None


def steps_or_epoch(text: str) -> int | str:
    """argparse type for `--checkpointing_steps`: a positive integer or `epoch`."""
    if text == "epoch":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'epoch', got {text!r}")


def positive_int(text: str) -> int:
    """argparse type for a count of at least one."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


def _option(default=None, help: str = "", **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class DataArguments:
    """Which dataset, which columns and splits, and what its masks mean. Built-in shapes when no source is given."""

    dataset_name: str | None = _option(help="Hub id, save_to_disk folder, or any folder/file load_dataset reads.")
    dataset_config_name: str | None = _option(help="The dataset's configuration name, if it has several.")
    voc_root: str | None = _option(help="PASCAL VOC style tree (JPEGImages, SegmentationClass[Aug], ImageSets).")
    image_column: str | None = _option(help="Image column (default: the first of image, img, pixel_values, bands).")
    labels_column: str | None = _option(
        help="Image-level labels column: class ids, class names or multi-hot (default: labels, label, ...; without "
        "one, labels are read off the masks)."
    )
    mask_column: str | None = _option(help="Mask column for evaluation (default: mask, annotation, segmentation...).")
    label_names: list[str] | None = _option(nargs="+", help="Class names when the dataset has none.")
    background_label_id: int | None = _option(type=int, help="Label id of background in the masks, if any.")
    mask_label_offset: int = _option(
        0,
        type=int,
        choices=[0, 1],
        help="1 when masks store class k as k + 1 with 0 = background and 255 = void (VOC, MSRC and most Hub "
        "segmentation sets) while the labels column holds foreground ids 0..K-1: a 'background' class is put first.",
    )
    train_split: str = _option("train", help="Split to train on.")
    validation_split: str = _option("validation", help="Split evaluated during training (needs masks for mIoU).")
    max_train_samples: int | None = _option(type=int, help="Train on N examples drawn at random (seeded by --seed).")
    max_eval_samples: int | None = _option(type=int, help="Evaluate on N examples drawn at random (seeded by --seed).")
    train_size: int = _option(DEFAULT_SPLITS["train"], type=int, help="Built-in dataset: training images.")
    validation_size: int = _option(
        DEFAULT_SPLITS["validation"], type=int, help="Built-in dataset: validation and test images (each)."
    )
    synthetic_image_size: int = _option(64, type=int, help="Built-in dataset: image side in pixels.")
    synthetic_generator: str = _option(
        "shapes-random-colour",
        choices=sorted(GENERATORS),
        help="Built-in dataset: which generator (see modeling_clsmask/training/synthetic_shapes.py).",
    )
    data_seed: int = _option(0, type=int, help="Built-in dataset: seed of the generated images.")
    cache_dir: str | None = _option(help="Where datasets caches downloads.")

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> DataArguments:
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})

    def source_conflict(self) -> str | None:
        """Why these arguments name no single source, or None."""
        if self.voc_root and self.dataset_name:
            return "Give either --voc_root or --dataset_name, not both."
        return None


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The `DataArguments` fields as command-line options (one group, shared by both scripts)."""
    group = parser.add_argument_group("data (default: the built-in synthetic shapes dataset)")
    for item in dataclasses.fields(DataArguments):
        group.add_argument(f"--{item.name}", default=item.default, **item.metadata)


def add_training_arguments(
    group, batch_size: int | None, learning_rate: float | None, weight_decay: float, epochs: int | None,
    crop_scale_min: float | None = 0.6,
) -> None:
    """The optimisation options both scripts have, with each script's defaults (`None`: set by a preset)."""
    group.add_argument(
        "--per_device_train_batch_size", type=int, default=batch_size, help="Training batch per device."
    )
    group.add_argument("--per_device_eval_batch_size", type=int, default=64, help="Evaluation batch per device.")
    group.add_argument("--learning_rate", type=float, default=learning_rate, help="Peak learning rate.")
    group.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW weight decay.")
    group.add_argument("--num_train_epochs", type=int, default=epochs, help="Training epochs.")
    group.add_argument("--max_train_steps", type=int, help="Optimizer steps in all; overrides --num_train_epochs.")
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step."
    )
    group.add_argument(
        "--lr_scheduler_type", default="cosine", help="Any transformers scheduler: cosine, linear, constant, ..."
    )
    group.add_argument("--warmup_ratio", type=float, default=0.05, help="Share of the steps spent warming up.")
    group.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: Accelerate's setting (accelerate config)."
    )
    group.add_argument(
        "--allow_slow_bf16",
        action="store_true",
        help="Keep bf16 on a CPU where it measures slower than fp32 (without this, such a run uses fp32 and says so).",
    )
    group.add_argument("--flip_prob", type=float, default=0.5, help="Augmentation: horizontal flip probability.")
    group.add_argument(
        "--crop_scale_min", type=float, default=crop_scale_min, help="Augmentation: random resized crop, min area."
    )
    group.add_argument("--seed", type=int, default=42, help="Seed of the model init, shuffling and augmentation.")


def add_output_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """Output folder, checkpoints, tracking and Hub options (both scripts)."""
    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default=output_dir, help="Where the final model, results and panels go.")
    out.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write into a non-empty --output_dir that another run (or something else) wrote.",
    )
    out.add_argument(
        "--checkpointing_steps", type=steps_or_epoch, help="Save a resumable checkpoint every N steps, or 'epoch'."
    )
    out.add_argument(
        "--checkpoints_total_limit",
        type=positive_int,
        default=2,
        help="Keep this run's newest N checkpoints (the one 'latest' resumes from included); older ones are deleted.",
    )
    out.add_argument(
        "--resume_from_checkpoint", help="A checkpoint folder, or 'latest' (this run's newest, from its run marker)."
    )
    out.add_argument("--num_visualizations", type=int, default=4, help="Validation images drawn into the PNG panel.")
    out.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    out.add_argument("--report_to", default="tensorboard", help="tensorboard, trackio, wandb, all, ...")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the final folder to --hub_model_id.")
    out.add_argument("--hub_model_id", help="Hub repo for --push_to_hub (created if needed).")
    out.add_argument("--hub_token", help="Hub token (default: the logged-in user's); never written to disk.")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Contradictions a parser cannot express, reported as usage errors before anything runs."""
    conflict = DataArguments.from_namespace(args).source_conflict()
    if conflict:
        parser.error(conflict)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    scales = getattr(args, "attention_map_scales", None) or []
    if AUTO in scales and len(scales) > 1:
        parser.error("--attention_map_scales: 'auto' stands alone (the preset's scales for the input's patch grid); "
                     "to choose yourself give numbers only, e.g. --attention_map_scales 1 1.5.")  # fmt: skip


def tracked_arguments(args: argparse.Namespace) -> dict:
    """The arguments a tracker can store (numbers, strings and booleans), without the Hub token."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
