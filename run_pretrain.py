#!/usr/bin/env python
"""Stage 1: train the class-token ViT on image-level labels, with Accelerate and datasets.

    python run_pretrain.py                                   # built-in synthetic shapes, CPU, ~10 minutes
    accelerate launch run_pretrain.py --dataset_name <hub id or folder> --init_from google/vit-base-patch16-224
    accelerate launch --cpu --num_processes 2 run_pretrain.py ...   # data parallel (gloo) on CPU
    python run_pretrain.py --voc_root VOCdevkit/VOC2012 --background_threshold 0.5

Follows the layout of transformers' `*_no_trainer.py` examples: argparse, `Accelerator`, `datasets`,
`save_state`/`load_state` checkpoints, `--with_tracking`, `--push_to_hub`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_clsmask import (
    ClsMaskConfig,
    ClsMaskForMultiLabelClassification,
    ClsMaskImageProcessor,
    masks_from_class_maps,
)
from modeling_clsmask.data import (
    ExampleEncoder,
    add_data_arguments,
    augment_batch,
    collate,
    load_data,
    validate_splits,
    write_dataset_card,
)
from modeling_clsmask.metrics import (
    class_assignment_counts,
    class_assignment_summary,
    classification_metrics,
    confusion_matrices,
    iou_from_confusion,
)
from modeling_clsmask.model_card import write_model_card
from modeling_clsmask.visualization import attention_panel, stack_rows


logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--init_from", help="A transformers ViT or DeiT checkpoint to initialise from.")
    model.add_argument("--image_size", type=int, default=64)
    model.add_argument("--patch_size", type=int, default=8)
    model.add_argument("--num_channels", type=int, default=3)
    model.add_argument("--hidden_size", type=int, default=128)
    model.add_argument("--num_hidden_layers", type=int, default=4)
    model.add_argument("--num_attention_heads", type=int, default=4)
    model.add_argument("--intermediate_size", type=int, default=256)
    model.add_argument("--num_register_tokens", type=int, default=1)
    model.add_argument(
        "--token_mask_rate",
        type=float,
        default=0.0,
        help="Class-specific token masking rate (paper: 0.5). Off by default: under the shared readout it slowed "
        "learning and did not make maps more class-specific in our measurements (README, ablation).",
    )
    model.add_argument(
        "--patch_embedding_type",
        choices=["conv", "patchify"],
        default="conv",
        help="conv: small convolutional stem (learns from scratch); patchify: ViT's patch projection (paper).",
    )
    model.add_argument("--conv_stem_depth", type=int, default=2, help="3x3 convolutions per stem resolution.")
    model.add_argument(
        "--classifier_type",
        choices=["shared", "flatten"],
        default="shared",
        help="shared: one readout vector for every class token (class-specific maps); flatten: the paper's Linear.",
    )
    model.add_argument(
        "--weight_init",
        choices=["fan_in", "normal"],
        default="fan_in",
        help="fan_in: PyTorch's default init (trains from scratch); normal: ViT's std-0.02 init.",
    )
    model.add_argument(
        "--class_token_isolation",
        action="store_true",
        help="Class-token queries attend only to patches and themselves (not other class tokens or [REG]).",
    )
    model.add_argument(
        "--patch_dropout", type=float, default=0.0, help="Share of patch tokens dropped per image in training."
    )
    model.add_argument(
        "--class_token_layers", type=int, help="Class tokens join only the last N blocks (default: all blocks)."
    )
    model.add_argument("--use_head_gates", action="store_true")
    model.add_argument("--gate_log_alpha_init", type=float, default=3.0, help="Initial gate log_alpha (3 = open).")
    model.add_argument("--l0_penalty", type=float, default=0.01)
    model.add_argument(
        "--attention_map_layers", type=int, help="Last layers summed into class maps (default: all of them)."
    )
    model.add_argument(
        "--attention_map_layer_ids",
        type=int,
        nargs="+",
        help="Block indices (0 = first) whose class attention makes the maps; overrides --attention_map_layers. "
        "Default from scratch: 0 (the most class-specific block, measured); with --init_from: the last layers.",
    )
    model.add_argument("--diversity_loss_coefficient", type=float, default=0.0, help="Public code's option: 0.1.")
    model.add_argument(
        "--background_threshold",
        type=float,
        default=-1.0,
        help="Background score threshold for datasets with a background class (default: 0.2 there, else none).",
    )
    model.add_argument("--image_mean", type=float, nargs="+")
    data_note = "split evaluated once after training (skipped when absent)"
    model.add_argument("--test_split", default="test", help=f"Held-out {data_note}.")
    model.add_argument("--image_std", type=float, nargs="+")

    train = parser.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw")
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--weight_decay", type=float, default=0.05)
    train.add_argument("--num_train_epochs", type=int, default=20)
    train.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--lr_scheduler_type", default="cosine")
    train.add_argument("--warmup_ratio", type=float, default=0.05)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: accelerate's setting.")
    train.add_argument("--flip_prob", type=float, default=0.5)
    train.add_argument("--crop_scale_min", type=float, default=0.6, help="Random resized crop: min area fraction.")
    train.add_argument("--seed", type=int, default=42)

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default="outputs/pretrain")
    out.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write into a non-empty --output_dir that another run (or something else) wrote.",
    )
    out.add_argument("--checkpointing_steps", help="An integer (every N steps) or 'epoch'.")
    out.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in output_dir/checkpoints.")
    out.add_argument("--eval_every_epochs", type=int, default=1)
    out.add_argument("--num_visualizations", type=int, default=4)
    out.add_argument("--with_tracking", action="store_true")
    out.add_argument("--report_to", default="tensorboard", help="tensorboard, trackio, wandb, all, ...")
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id")
    out.add_argument("--hub_token")
    parser.add_argument(
        "--recipe", help="A recipe name in recipes/ (voc, coco, dfc2020, endotect, ade20k) or a JSON path."
    )
    apply_recipe(parser, argv)
    args = parser.parse_args(argv)
    if args.voc_root and args.dataset_name:
        parser.error("Give either --voc_root or --dataset_name, not both.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    return args


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


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


def load_pretrained(load, path: str, flag: str):
    """`load(path)`, with a message that says so when `path` is neither a local folder nor loadable from the Hub
    (instead of the Hub client's "Repo id must be in the form ..." for a mistyped local path)."""
    try:
        return load(path)
    except (OSError, ValueError) as error:
        if os.path.exists(path):
            raise
        raise FileNotFoundError(
            f"{flag} {path!r}: no such local folder, and it could not be loaded as a Hub repo ({error})."
        ) from error


# Command-line options passed to ClsMaskConfig under the same name (the architecture ones only from scratch).
CONFIG_FROM_ARGS = (
    "num_register_tokens", "token_mask_rate", "use_head_gates", "l0_penalty", "diversity_loss_coefficient",
    "classifier_type", "weight_init", "class_token_isolation", "patch_dropout", "class_token_layers",
    "gate_log_alpha_init",
)  # fmt: skip
ARCHITECTURE_FROM_ARGS = (
    "patch_embedding_type", "conv_stem_depth", "image_size", "patch_size", "num_channels", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "intermediate_size",
)  # fmt: skip


def build_model(args, class_names: list[str], background_label_id: int | None):
    id2label = dict(enumerate(class_names))
    background = args.background_threshold
    if background is not None and background < 0:
        # 0.2 was chosen on the validation splits of both generators (0.1-0.4 swept), never on a test split.
        background = 0.2 if background_label_id is not None else None
    fields = {name: getattr(args, name) for name in CONFIG_FROM_ARGS}
    fields.update(
        attention_map_layers=args.attention_map_layers or args.class_token_layers or args.num_hidden_layers,
        # From scratch, block 0's maps are the class-specific ones (measured); pretrained ViTs keep the last blocks.
        attention_map_layer_ids=args.attention_map_layer_ids
        or (None if args.init_from or args.attention_map_layers or args.class_token_layers else [0]),
        background_threshold=background,
        background_label_id=background_label_id or 0,
    )
    if args.init_from:
        return load_pretrained(
            lambda path: ClsMaskForMultiLabelClassification.from_vit_pretrained(
                path, id2label=id2label, image_size=args.image_size, **fields
            ),
            args.init_from,
            "--init_from",
        )
    architecture = {name: getattr(args, name) for name in ARCHITECTURE_FROM_ARGS}
    config = ClsMaskConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()}, **architecture, **fields)
    return ClsMaskForMultiLabelClassification(config)


def to_display_image(pixels: torch.Tensor, mean, std):
    """Undo normalisation for a (C, H, W) tensor; first three bands (or band 0) as an RGB picture."""
    from PIL import Image

    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    array = (pixels.float().cpu() * std + mean).clamp(0, 1)
    array = array[:3] if array.shape[0] >= 3 else array[:1].expand(3, -1, -1)
    return Image.fromarray((array.permute(1, 2, 0).numpy() * 255).astype("uint8"))


@torch.no_grad()
def evaluate(model, dataloader, accelerator, config, class_names, processor, num_visualizations=0):
    """Classification metrics and, where masks exist, pseudo-mask mIoU (image labels and predictions)."""
    model.eval()
    num_labels = len(class_names)
    background = config.background_threshold
    foreground = [i for i in range(num_labels) if background is None or i != config.background_label_id]
    gathered = {"probs": [], "labels": [], "conf_gt": [], "conf_pred": [], "conf_base": [], "assign": []}
    panels = []
    for batch in tqdm(dataloader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        outputs = model(batch["pixel_values"], output_class_maps="mask" in batch)
        probs = outputs.logits.float().sigmoid()
        items = {"probs": probs, "labels": batch["labels"]}
        if "mask" in batch:
            masks = batch["mask"]
            size = tuple(masks.shape[-2:])
            bg = config.background_label_id
            from_labels = masks_from_class_maps(
                outputs.class_maps, probs, batch["labels"].bool(), size, background, bg
            )
            predicted = probs >= config.class_threshold
            from_predictions = masks_from_class_maps(outputs.class_maps, probs, predicted, size, background, bg)
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
    metrics = classification_metrics(probs, labels, foreground, config.class_threshold)
    metrics["num_images"] = int(probs.shape[0])
    if gathered["conf_gt"]:
        for name, key in (("pseudo_mask", "conf_gt"), ("prediction_mask", "conf_pred"), ("baseline", "conf_base")):
            result = iou_from_confusion(torch.cat(gathered[key]).sum(0))
            metrics[f"{name}_mean_iou"] = result["mean_iou"]
            metrics[f"{name}_per_class_iou"] = dict(zip(class_names, result["per_class_iou"]))
        metrics.update(class_assignment_summary(torch.cat(gathered["assign"])))
    return metrics, panels


RUN_MARKER = "clsmask_run.json"
# Arguments that do not define a run: a run stays "this run" when they change between launches.
RUN_NEUTRAL_ARGS = {
    "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_token", "with_tracking",
    "report_to", "num_train_epochs", "max_train_steps", "checkpointing_steps", "eval_every_epochs",
    "num_visualizations", "output_dir",
}  # fmt: skip


def _run_arguments(args) -> dict:
    """The run's arguments as JSON values, without secrets (the marker stays on disk and may be shared)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "hub_token"}, default=str))


def read_run_marker(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_run_marker(output_dir: str, marker: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, RUN_MARKER + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(marker, handle, indent=2)
    os.replace(tmp, os.path.join(output_dir, RUN_MARKER))


def claim_output_dir(args, accelerator, script: str) -> dict:
    """Make sure `args.output_dir` is this run's before anything is written there; returns the run's marker.

    A non-empty folder is refused unless its marker (`clsmask_run.json`, the arguments of the run that wrote it)
    names the same script and run-defining arguments, or `--overwrite_output_dir` is given. The marker also records
    this run's checkpoints (so `--resume_from_checkpoint latest` never picks up another run's) and whether it
    finished. Returns the marker with `finished_before` True when a finished run is resumed unchanged.
    """
    marker = read_run_marker(args.output_dir)
    arguments = _run_arguments(args)
    defining = {k: v for k, v in arguments.items() if k not in RUN_NEUTRAL_ARGS}
    same_run = (
        marker is not None
        and marker.get("script") == script
        and {k: v for k, v in marker.get("args", {}).items() if k not in RUN_NEUTRAL_ARGS} == defining
    )
    occupied = os.path.isdir(args.output_dir) and any(
        entry.name not in (RUN_MARKER, RUN_MARKER + ".tmp") for entry in os.scandir(args.output_dir)
    )
    if occupied and not same_run and not getattr(args, "overwrite_output_dir", False):
        reason = "files of another run" if marker else f"files that no {script} run wrote (no {RUN_MARKER})"
        raise FileExistsError(
            f"--output_dir {args.output_dir!r} is not empty: it holds {reason}. Choose another folder, or pass "
            "--overwrite_output_dir to write over it."
        )
    resuming = bool(args.resume_from_checkpoint) and same_run
    if resuming and marker.get("finished"):
        unchanged = {k: v for k, v in marker["args"].items() if k != "resume_from_checkpoint"} == {
            k: v for k, v in arguments.items() if k != "resume_from_checkpoint"
        }
        if unchanged:
            return {**marker, "finished_before": True}
    if not resuming:
        marker = {"script": script, "args": arguments, "checkpoints": [], "finished": False}
    marker = {**marker, "args": arguments, "finished": False}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_run_marker(args.output_dir, marker)
    accelerator.wait_for_everyone()
    return marker


def finished_run_results(output_dir: str) -> dict:
    """What a finished run saved (its eval_results.json); said, not recomputed."""
    path = os.path.join(output_dir, "eval_results.json")
    print(f"This run already finished in {output_dir}; nothing to resume (its results are in {path}).")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def mark_run_finished(output_dir: str) -> None:
    marker = read_run_marker(output_dir)
    if marker is not None:
        write_run_marker(output_dir, {**marker, "finished": True})


def save_checkpoint(accelerator, folder: str, output_dir: str | None = None) -> None:
    """save_state into a temporary folder, then rename: an interruption never leaves a half-written checkpoint.
    With `output_dir`, the checkpoint is recorded in the run's marker (what `latest` resumes from)."""
    tmp = folder + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        marker = read_run_marker(output_dir) if output_dir else None
        if marker is not None:
            relative = os.path.relpath(folder, output_dir)
            checkpoints = [c for c in marker.get("checkpoints", []) if c != relative] + [relative]
            write_run_marker(output_dir, {**marker, "checkpoints": checkpoints})
    accelerator.wait_for_everyone()


def find_checkpoint(resume_from_checkpoint: str, root: str, output_dir: str) -> str:
    """The folder to resume from: the given path, or with 'latest' the newest checkpoint under `root` that this run
    recorded in its marker (never another run's, whatever its step number)."""
    if resume_from_checkpoint != "latest":
        if not os.path.isdir(resume_from_checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a folder.")
        return resume_from_checkpoint
    marker = read_run_marker(output_dir) or {}
    recorded = [
        os.path.join(output_dir, c)
        for c in marker.get("checkpoints", [])
        if os.path.normpath(os.path.dirname(os.path.join(output_dir, c))) == os.path.normpath(root)
    ]
    recorded = [c for c in recorded if os.path.isdir(c)]
    if not recorded:
        raise FileNotFoundError(
            f"--resume_from_checkpoint latest: this run recorded no checkpoint in {root} ({RUN_MARKER}); give a "
            "checkpoint folder explicitly."
        )
    return recorded[-1]


def make_accelerator(args) -> Accelerator:
    """The Accelerator both scripts use: seedable sampler (per-epoch order from the seed), tracking, precision."""
    kwargs = {"gradient_accumulation_steps": args.gradient_accumulation_steps}
    if args.with_tracking:
        kwargs.update(log_with=args.report_to, project_dir=args.output_dir)
    if args.mixed_precision:
        kwargs["mixed_precision"] = args.mixed_precision
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), **kwargs)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return accelerator


def make_schedule(args, optimizer, train_loader, accelerator) -> tuple[int, int, int, object]:
    """(steps per epoch, max steps, epochs, lr scheduler) from --max_train_steps or --num_train_epochs."""
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=int(args.warmup_ratio * max_steps) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    return steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch), scheduler


def resume(accelerator, path: str, steps_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int, int]:
    """Load a step_N / epoch_N checkpoint; returns (completed steps, epoch to start, batches to skip in it)."""
    accelerator.print(f"Resumed from checkpoint: {path}")
    accelerator.load_state(path)
    kind, number = os.path.basename(os.path.normpath(path)).split("_")
    completed = (int(number) + 1) * steps_per_epoch if kind == "epoch" else int(number)
    resume_step = (completed % steps_per_epoch) * gradient_accumulation_steps
    return completed, completed // steps_per_epoch, resume_step


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    marker = claim_output_dir(args, accelerator, "run_pretrain")
    if marker.get("finished_before"):
        return finished_run_results(args.output_dir)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    with accelerator.main_process_first():
        spec = load_data(args)
    # Every split used, checked now: a bad validation or test split must not cost a training epoch.
    used = [args.train_split, args.validation_split]
    if args.test_split in spec.dataset and args.test_split not in used:
        used.append(args.test_split)
    validate_splits(spec, used)
    model = build_model(args, spec.class_names, spec.background_label_id)
    config = model.config
    processor_kwargs = {}
    if args.image_mean:
        processor_kwargs["image_mean"] = args.image_mean
    if args.image_std:
        processor_kwargs["image_std"] = args.image_std
    processor = ClsMaskImageProcessor.from_model_config(config, **processor_kwargs)
    encoder = ExampleEncoder(
        spec, config.num_channels, config.image_grid_size, processor.image_mean, processor.image_std
    )
    train_data = spec.dataset[args.train_split]
    eval_data = spec.dataset[args.validation_split]
    if args.max_train_samples:
        train_data = train_data.select(range(min(args.max_train_samples, len(train_data))))
    if args.max_eval_samples:
        eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
    # The loader's own generator keeps iterator creation from drawing on the global RNG, which augmentation and
    # token masking use: so a resumed run (RNG restored by load_state) replays the same random numbers.
    train_loader = DataLoader(
        train_data.with_transform(encoder),
        shuffle=True,
        collate_fn=collate,
        batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loader = DataLoader(
        eval_data.with_transform(encoder), collate_fn=collate, batch_size=args.per_device_eval_batch_size
    )

    no_decay = ("bias", "layernorm", "norm", "class_tokens", "position_embeddings", "register_tokens", "log_alpha")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(groups, lr=args.learning_rate)

    steps_per_epoch, args.max_train_steps, args.num_train_epochs, scheduler = make_schedule(
        args, optimizer, train_loader, accelerator
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)

    if args.with_tracking:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("clsmask_pretrain", tracked)

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running stage-1 training *****")
    logger.info(f"  Data = {spec.source}: {len(train_data)} train / {len(eval_data)} eval, classes {spec.class_names}")
    if spec.skipped:
        logger.info(f"  Skipped undecodable images: {spec.skipped}")
    logger.info(f"  Epochs = {args.num_train_epochs}, total batch = {total_batch}, steps = {args.max_train_steps}")

    completed_steps, starting_epoch, resume_step = 0, 0, 0
    if args.resume_from_checkpoint:
        path = find_checkpoint(
            args.resume_from_checkpoint, os.path.join(args.output_dir, "checkpoints"), args.output_dir
        )
        completed_steps, starting_epoch, resume_step = resume(
            accelerator, path, steps_per_epoch, args.gradient_accumulation_steps
        )

    unwrapped = accelerator.unwrap_model(model)
    progress = tqdm(
        range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process
    )
    metrics: dict = {}
    panels = []
    crop = (args.crop_scale_min, 1.0)
    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        train_loader.set_epoch(epoch)
        loader = train_loader
        if epoch == starting_epoch and resume_step:
            loader = accelerator.skip_first_batches(train_loader, resume_step)
        running, count = 0.0, 0
        for batch in loader:
            with accelerator.accumulate(model):
                pixels, _ = augment_batch(batch["pixel_values"], None, args.flip_prob, crop)
                outputs = model(pixels, labels=batch["labels"])
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += outputs.loss.detach().float().item()
            count += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            postfix = {"loss": f"{running / count:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
            gates = unwrapped.clsmask.gate_values()
            if gates is not None:
                postfix["gates_open"] = f"{(gates > 0).float().mean().item():.2f}"
            progress.set_postfix(postfix)
            if args.with_tracking:
                accelerator.log(
                    {"train_loss": running / count, "lr": scheduler.get_last_lr()[0]}, step=completed_steps
                )
            if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    os.path.join(args.output_dir, "checkpoints", f"step_{completed_steps}"),
                    args.output_dir,
                )
            if completed_steps >= args.max_train_steps:
                break
        last_epoch = completed_steps >= args.max_train_steps or epoch == args.num_train_epochs - 1
        if (epoch + 1) % args.eval_every_epochs == 0 or last_epoch:
            metrics, panels = evaluate(
                model,
                eval_loader,
                accelerator,
                unwrapped.config,
                spec.class_names,
                processor,
                args.num_visualizations if last_epoch else 0,
            )
            metrics.update(epoch=epoch, step=completed_steps, train_loss=running / max(count, 1))
            gates = unwrapped.clsmask.gate_values()
            if gates is not None:
                metrics["open_gate_fraction"] = float((gates > 0).float().mean())
            summary = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
            logger.info(f"epoch {epoch}: {summary}")
            if args.with_tracking:
                accelerator.log(
                    {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=completed_steps
                )
        if checkpointing_steps == "epoch":
            folder = os.path.join(args.output_dir, "checkpoints", f"epoch_{epoch}")
            save_checkpoint(accelerator, folder, args.output_dir)
        if completed_steps >= args.max_train_steps:
            break

    if args.test_split in spec.dataset and args.test_split != args.validation_split:
        test_loader = accelerator.prepare(
            DataLoader(
                spec.dataset[args.test_split].with_transform(encoder),
                collate_fn=collate,
                batch_size=args.per_device_eval_batch_size,
            )
        )
        test_metrics, _ = evaluate(model, test_loader, accelerator, unwrapped.config, spec.class_names, processor)
        metrics.update({f"test_{k}": v for k, v in test_metrics.items()})
        logger.info(f"test: { {k: round(v, 4) for k, v in test_metrics.items() if isinstance(v, float)} }")
    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        unwrapped.save_pretrained(args.output_dir, save_function=accelerator.save)
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        write_dataset_card(os.path.join(args.output_dir, "training_data.json"), spec)
        if panels:
            stack_rows(panels).save(os.path.join(args.output_dir, "validation_panels.png"))
        write_model_card(args.output_dir, unwrapped.config, metrics, spec, vars(args), stage="pretrain")
        if "pseudo_mask_mean_iou" in metrics:
            for prefix, split in (("", args.validation_split), ("test_", args.test_split)):
                if f"{prefix}pseudo_mask_mean_iou" not in metrics:
                    continue
                print(
                    f"[{split}] pseudo-mask mIoU (image labels): {metrics[prefix + 'pseudo_mask_mean_iou']:.4f} | "
                    f"from predictions: {metrics[prefix + 'prediction_mask_mean_iou']:.4f} | "
                    f"baseline (every pixel = first image label): {metrics[prefix + 'baseline_mean_iou']:.4f} | "
                    f"mAP: {metrics[prefix + 'mAP']:.4f} | "
                    f"class assignment: {metrics[prefix + 'class_assignment_accuracy']:.4f} "
                    f"(chance {metrics[prefix + 'class_assignment_chance']:.4f}, "
                    f"margin {metrics[prefix + 'class_assignment_margin']:+.4f})"
                )
        else:
            print(f"mAP: {metrics.get('mAP', float('nan')):.4f}  F1: {metrics.get('f1_micro', float('nan')):.4f}")
        mark_run_finished(args.output_dir)
        if args.push_to_hub:
            push_folder(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.wait_for_everyone()
    return metrics


def push_folder(folder: str, repo_id: str, token: str | None = None, commit_message: str = "Upload clsmask model"):
    """Create the Hub repo (if needed) and upload the final folder, without the training checkpoints."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    return api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        commit_message=commit_message,
        ignore_patterns=["checkpoints/*", "checkpoints_*/*", "*.tmp", "runs/*", "clsmask_pretrain/*", RUN_MARKER],
    )


if __name__ == "__main__":
    main()
