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
    masks_from_class_maps,
)
from modeling_clsmask.pseudo_masks import AUTO, resolve_threshold
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
    ExampleEncoder,
    augment_batch,
    eval_dataloader,
    load_data,
    train_dataloader,
    validate_splits,
    write_dataset_card,
)
from modeling_clsmask.training.loop import make_accelerator, prepare_training, resume_from, train_loop
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
)
from modeling_clsmask.training.visualization import attention_panel, stack_rows, to_display_image


logger = get_logger(__name__)


# Defaults from scratch, chosen on the validation splits of both generators (README, Results).
REFINEMENT_ITERATIONS = 20
REFINED_BACKGROUND = 0.5
RAW_BACKGROUND = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--init_from", help="A transformers ViT or DeiT checkpoint to initialise from.")
    model.add_argument("--image_size", type=int, default=64, help="Input side in pixels (images are resized to it).")
    model.add_argument("--patch_size", type=int, default=8, help="Patch side; the class maps have one value a patch.")
    model.add_argument("--num_channels", type=int, default=3, help="Image bands (3 = RGB; e.g. 13 for Sentinel-2).")
    model.add_argument("--hidden_size", type=int, default=128, help="Transformer width (from scratch).")
    model.add_argument("--num_hidden_layers", type=int, default=4, help="Transformer depth (from scratch).")
    model.add_argument("--num_attention_heads", type=int, default=4, help="Heads per block (from scratch).")
    model.add_argument("--intermediate_size", type=int, default=256, help="MLP width (from scratch).")
    model.add_argument("--num_register_tokens", type=int, default=1, help="[REG] tokens (paper: 1).")
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
    model.add_argument(
        "--use_head_gates", action="store_true", help="Hard Concrete gates per head (sparse attention)."
    )
    model.add_argument("--gate_log_alpha_init", type=float, default=3.0, help="Initial gate log_alpha (3 = open).")
    model.add_argument("--l0_penalty", type=float, default=0.01, help="L0 penalty weight on the head gates.")
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
    model.add_argument(
        "--attention_map_scales",
        type=float,
        nargs="+",
        help="Input scales whose class maps are averaged for pseudo-masks (test-time augmentation). Default from "
        "scratch: 0.75 1 1.5 2 (validation pseudo-mask mIoU +0.10 / +0.02 on the two generators, measured); with "
        "--init_from: 1 (the paper).",
    )
    model.add_argument(
        "--attention_map_flip",
        action=argparse.BooleanOptionalAction,
        help="Also average the maps of flipped inputs. Default: on from scratch, off with --init_from.",
    )
    model.add_argument(
        "--attention_map_refinement_iterations",
        type=int,
        help="Iterations of the pixel-adaptive refinement of the maps with the input image (not in the paper). "
        f"Default from scratch: {REFINEMENT_ITERATIONS} (validation pseudo-mask mIoU about +0.2 on both generators, "
        "measured); with --init_from: 0 (off).",
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
    model.add_argument("--diversity_loss_coefficient", type=float, default=0.0, help="Public code's option: 0.1.")
    model.add_argument(
        "--background_threshold",
        type=optional_fraction,
        default=AUTO,
        help="Normalised class score under which a pixel is background: 'auto' (for datasets with a background "
        f"class {REFINED_BACKGROUND} with the map refinement, {RAW_BACKGROUND} without; none otherwise), 'none', or "
        "a number in [0, 1].",
    )
    model.add_argument("--image_mean", type=float, nargs="+", help="Per-band mean (default: ImageNet's for RGB).")
    model.add_argument("--image_std", type=float, nargs="+", help="Per-band std (default: ImageNet's for RGB).")
    model.add_argument(
        "--test_split", default="test", help="Held-out split evaluated once after training (skipped when absent)."
    )

    train = parser.add_argument_group("training")
    add_training_arguments(train, batch_size=32, learning_rate=1e-3, weight_decay=0.05, epochs=20)
    train.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw", help="Optimizer.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0: off).")

    add_output_arguments(parser, "outputs/pretrain")
    parser.add_argument(
        "--eval_every_epochs", type=int, default=1, help="Evaluate on the validation split every N epochs."
    )
    parser.add_argument(
        "--recipe", help="A recipe name in recipes/ (voc, coco, dfc2020, endotect, ade20k) or a JSON path."
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    apply_recipe(parser, argv)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
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


def build_model(args, class_names: list[str], background_label_id: int | None) -> ClsMaskForMultiLabelClassification:
    """A model from scratch, or around a ViT/DeiT checkpoint (`--init_from`), configured from the arguments."""
    id2label = dict(enumerate(class_names))
    # From scratch, maps refined with the image (measured on both generators' validation splits); pretrained ViTs
    # keep the paper's raw maps.
    refinement = args.attention_map_refinement_iterations
    if refinement is None:
        refinement = 0 if args.init_from else REFINEMENT_ITERATIONS
    # 'auto' where the data has a background class: chosen on the validation splits of both generators (raw maps:
    # 0.1-0.4 swept; refined maps: 0.2-0.7), never on a test split; else no background.
    default_background = REFINED_BACKGROUND if refinement else RAW_BACKGROUND
    background = resolve_threshold(
        args.background_threshold, default_background if background_label_id is not None else None
    )
    fields = {name: getattr(args, name) for name in CONFIG_FROM_ARGS}
    fields.update(
        attention_map_layers=args.attention_map_layers or args.class_token_layers or args.num_hidden_layers,
        # From scratch, block 0's maps are the class-specific ones (measured); pretrained ViTs keep the last blocks.
        attention_map_layer_ids=args.attention_map_layer_ids
        or (None if args.init_from or args.attention_map_layers or args.class_token_layers else [0]),
        background_threshold=background,
        background_label_id=background_label_id or 0,
        # From scratch, maps averaged over scales and flips (measured on both generators' validation splits);
        # pretrained ViTs keep the paper's single pass.
        attention_map_scales=args.attention_map_scales or ([1.0] if args.init_from else [0.75, 1.0, 1.5, 2.0]),
        attention_map_flip=not args.init_from if args.attention_map_flip is None else args.attention_map_flip,
        attention_map_refinement_iterations=refinement,
        attention_map_refinement_sigma=args.attention_map_refinement_sigma,
        attention_map_refinement_dilations=args.attention_map_refinement_dilations,
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


@torch.no_grad()
def evaluate(
    model, dataloader, accelerator, config, class_names, processor, num_visualizations=0, augment_maps=True
) -> tuple[dict, list]:
    """Classification metrics and, where masks exist, pseudo-mask mIoU (image labels and predictions).

    `augment_maps=False` scores the one-pass maps (no test-time scales or flips): cheaper, for monitoring."""
    model.eval()
    num_labels = len(class_names)
    background = config.background_threshold
    foreground = [i for i in range(num_labels) if background is None or i != config.background_label_id]
    gathered = {"probs": [], "labels": [], "conf_gt": [], "conf_pred": [], "conf_base": [], "assign": []}
    panels = []
    for batch in tqdm(dataloader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        outputs = model(batch["pixel_values"], output_class_maps="mask" in batch, augment_maps=augment_maps)
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


# Parameters without weight decay (matched by name): biases, norms, learned tokens and positions, gate parameters.
NO_DECAY = ("bias", "layernorm", "norm", "class_tokens", "position_embeddings", "register_tokens", "log_alpha")


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if any(key in name for key in NO_DECAY) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(groups, lr=args.learning_rate)


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
        args.gradient_accumulation_steps, args.mixed_precision, args.with_tracking and args.report_to, args.output_dir
    )
    if claim_output_dir(args, accelerator, "run_pretrain").get("finished_before"):
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
    model = build_model(args, spec.class_names, spec.background_label_id)
    norm = {k: v for k, v in (("image_mean", args.image_mean), ("image_std", args.image_std)) if v}
    processor = ClsMaskImageProcessor.from_model_config(model.config, **norm)
    encoder = ExampleEncoder(
        spec, model.config.num_channels, model.config.image_grid_size, processor.image_mean, processor.image_std
    )
    train_loader = train_dataloader(
        spec.dataset[args.train_split], encoder, args.per_device_train_batch_size, args.seed, args.max_train_samples
    )
    eval_loader = eval_dataloader(
        spec.dataset[args.validation_split], encoder, args.per_device_eval_batch_size, args.max_eval_samples
    )

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

    def loss_fn(model, batch):
        pixels, _ = augment_batch(batch["pixel_values"], None, args.flip_prob, (args.crop_scale_min, 1.0))
        return model(pixels, labels=batch["labels"]).loss

    def open_gates() -> dict:
        gates = unwrapped.clsmask.gate_values()
        return {} if gates is None else {"gates_open": f"{(gates > 0).float().mean().item():.2f}"}

    def on_epoch_end(epoch: int, steps: int, is_last: bool, train_loss: float) -> None:
        if (epoch + 1) % args.eval_every_epochs and not is_last:
            return
        shown = args.num_visualizations if is_last else 0
        # Epochs before the last score the one-pass maps (the test-time scales and flips cost ~5x the evaluation).
        metrics, panels = evaluate(
            model, eval_loader, accelerator, unwrapped.config, spec.class_names, processor, shown, augment_maps=is_last
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
        checkpointing_steps=args.checkpointing_steps, checkpoint_root=checkpoint_root, output_dir=args.output_dir,
        max_grad_norm=args.max_grad_norm, with_tracking=args.with_tracking, name="train", postfix=open_gates,
        on_epoch_end=on_epoch_end,
    )  # fmt: skip
    metrics = results["metrics"]
    if has_test:
        test_loader = accelerator.prepare(
            eval_dataloader(spec.dataset[args.test_split], encoder, args.per_device_eval_batch_size)
        )
        test_metrics, _ = evaluate(model, test_loader, accelerator, unwrapped.config, spec.class_names, processor)
        metrics.update({f"test_{k}": v for k, v in test_metrics.items()})
        logger.info(f"test: { {k: round(v, 4) for k, v in test_metrics.items() if isinstance(v, float)} }")
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
    return metrics


if __name__ == "__main__":
    main()
