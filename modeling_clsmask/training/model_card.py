"""Model cards for trained checkpoints, filled from the templates in `model_cards/` with huggingface_hub.

The templates live at the top of the repository (`model_cards/`) and are installed with the package as
`modeling_clsmask.training.model_cards` (see `pyproject.toml`), so a non-editable install writes cards too.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


def template_path(stage: str) -> str:
    """The card template of `stage`: installed with the package, or in the checkout this package is imported from."""
    try:
        return str(files(f"{__package__}.model_cards").joinpath(f"{stage}.md"))
    except ModuleNotFoundError:  # a checkout on sys.path without an install
        return str(Path(__file__).resolve().parents[2] / "model_cards" / f"{stage}.md")


PAPER = "arXiv:2507.06848"
PAPER_URL = "https://arxiv.org/abs/2507.06848"
CARD_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_train_steps", "optimizer", "weight_decay", "lr_scheduler_type", "warmup_ratio", "seed", "init_from",
    "model_name_or_path", "scales", "flip", "refinement_iterations", "pseudo_label_source", "preset",
    "freeze_layers", "new_parameter_lr_multiplier", "patch_classifier_lr_multiplier", "class_token_init",
)  # fmt: skip
CONFIG_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "patch_embedding_type", "conv_stem_depth", "classifier_type", "weight_init", "num_register_tokens",
    "token_mask_rate", "use_head_gates", "l0_penalty", "attention_map_layers", "attention_map_layer_ids",
    "attention_map_scales", "attention_map_flip", "image_logits_over_scales", "attention_map_refinement_iterations",
    "attention_map_refinement_sigma", "class_token_layers", "class_token_isolation", "backbone_family",
    "attention_map_affinity_power", "hide_class_tokens", "use_patch_classifier", "class_map_source",
    "patch_classifier_top_fraction",
)  # fmt: skip
# Mask settings live in the saved image processor (preprocessor_config.json).
PROCESSOR_FIELDS = ("background_threshold", "mask_assembly")


def eval_results(metrics: dict, dataset_name: str, dataset_type: str) -> list[EvalResult]:
    """model-index entries for the measured numbers (only those present in `metrics`)."""
    wanted = {
        "pseudo_mask_mean_iou": ("image-segmentation", "mean_iou", "Pseudo-mask mIoU (image labels)"),
        "prediction_mask_mean_iou": ("image-segmentation", "mean_iou", "Pseudo-mask mIoU (predicted classes)"),
        "mean_iou": ("image-segmentation", "mean_iou", "Segmentation mIoU"),
        "mAP": ("image-classification", "mAP", "Multi-label mAP"),
    }
    results = []
    for key, (task, metric, name) in wanted.items():
        value = metrics.get(key)
        if isinstance(value, float) and value == value:
            results.append(
                EvalResult(
                    task_type=task,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split="validation",
                    metric_type=metric,
                    metric_name=name,
                    metric_value=round(value, 4),
                )
            )
    return results


def masking_sentence(config) -> str:
    """What the run did about token masking, from its config (a card states what the run did)."""
    rate = getattr(config, "token_mask_rate", 0.0) or 0.0
    if rate > 0:
        return f"with class-specific token masking (absent classes' tokens zeroed with probability {rate})"
    return "without token masking (`token_mask_rate` 0; the paper uses 0.5)"


def maps_sentence(config) -> str:
    """Where the run's pseudo-masks come from (`class_map_source`)."""
    source = getattr(config, "class_map_source", "attention")
    if source in ("attention_cam", "attention_cam_mean"):
        how = "geometric mean" if source == "attention_cam" else "mean"
        return (
            "Its pseudo-masks come from the per-class [CLS] tokens' attention over the patches, combined "
            f"({how}) with the CAM of a patch classifier trained beside them; no CRF."
        )
    if source == "cam":
        return "Its pseudo-masks come from the CAM of a patch classifier trained beside the class tokens; no CRF."
    return "Its per-class [CLS] tokens' attention over the patches gives pseudo-masks, without a CAM module or CRF."


def backbone_sentence(config, args: dict) -> str:
    family = getattr(config, "backbone_family", None)
    if not family:
        return "Trained from scratch."
    sentence = f"Initialised from the pretrained {family} backbone `{args.get('init_from')}`."
    branch = getattr(config, "image_branch_layers", 0)
    if branch:
        weight = getattr(config, "image_branch_logit_weight", 1.0)
        blend = f" (weight {weight:g}, the rest a linear classifier's on the unchanged blocks)" if weight < 1 else ""
        sentence += (
            f" Its image class probabilities come from a fine-tuned copy of the backbone's last {branch} blocks"
            f"{blend}; the maps from the blocks as they were."
        )
    return sentence


def write_model_card(output_dir: str, config, metrics: dict, spec, args: dict, stage: str = "pretrain") -> ModelCard:
    """Render `model_cards/{stage}.md` into `output_dir/README.md` and return the card."""
    model_name = args.get("hub_model_id") or os.path.basename(os.path.normpath(output_dir))
    dataset_type = spec.source.replace("voc:", "") if not os.path.exists(spec.source) else "local"
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="apache-2.0",
        tags=["clsmask", "weakly-supervised-semantic-segmentation", stage]
        + (["vision-transformer", "custom_code"] if stage == "pretrain" else []),
        datasets=[dataset_type] if "/" in dataset_type else None,
        base_model=args.get("init_from") if args.get("init_from") and not os.path.exists(args["init_from"]) else None,
        metrics=["mean_iou", "mAP"],
        eval_results=eval_results(metrics, spec.source, dataset_type) or None,
    )
    rows = [(k, args.get(k)) for k in CARD_HYPERPARAMETERS if args.get(k) is not None]
    rows += [(k, getattr(config, k)) for k in CONFIG_FIELDS if hasattr(config, k)]
    processor_file = os.path.join(output_dir, "preprocessor_config.json")
    if os.path.exists(processor_file):
        with open(processor_file) as handle:
            saved = json.load(handle)
        rows += [(k, saved[k]) for k in PROCESSOR_FIELDS if k in saved]
    if stage != "pretrain":
        rows.append(("architecture", type(config).__name__.replace("Config", "")))
    results = [(k, f"{v:.4f}") for k, v in metrics.items() if isinstance(v, float) and "per_class" not in k]
    drawn = spec.drawn_from
    splits = ", ".join(
        f"{name}: {len(split)}" + (f" drawn at random from {drawn[name]}" if name in drawn else "")
        for name, split in spec.dataset.items()
    )
    card = ModelCard.from_template(
        card_data,
        template_path=template_path(stage),
        model_name=model_name,
        model_id=args.get("hub_model_id") or output_dir,
        paper=PAPER,
        paper_url=PAPER_URL,
        masking_sentence=masking_sentence(config),
        maps_sentence=maps_sentence(config),
        backbone_sentence=backbone_sentence(config, args),
        data_description=f"`{spec.source}` ({splits}).",
        num_labels=len(spec.class_names),
        class_names=", ".join(spec.class_names),
        hyperparameter_rows="\n".join(f"| {k} | {v} |" for k, v in rows),
        result_rows="\n".join(f"| {k} | {v} |" for k, v in results) or "| (no evaluation) | |",
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card
