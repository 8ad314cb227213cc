"""Re-score a checkpoint's pseudo-masks with other map settings, without training again.

    python benchmarks/rescore_maps.py RUN --dataset_name DATA --class_map_sources attention_cam attention_cam_mean \
        cam --background_thresholds 0.35 0.5 --bf16

The map source, the affinity power, test-time scales and flips, the image refinement and the background threshold
act at inference only, so a checkpoint trained with one setting gives every other setting's pseudo-masks exactly
(same weights). Prints the pseudo-mask mIoU (image labels, the WSSS protocol) and the mAP of the image logits for
every combination on one split (`--per_class_ap`: and each class's AP); choose on validation, report on test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from tqdm.auto import tqdm


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diagnose_maps import checkpoint_and_masked_split  # noqa: E402

from modeling_clsmask.configuration_clsmask import CLASS_MAP_SOURCES  # noqa: E402
from modeling_clsmask.training.arguments import add_data_arguments, optional_fraction  # noqa: E402
from modeling_clsmask.training.metrics import (  # noqa: E402
    classification_metrics,
    confusion_matrices,
    iou_from_confusion,
)
from run_pretrain import foreground_ids  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A folder written by run_pretrain.py.")
    parser.add_argument("--split", default="validation", help="Split to score (default: validation).")
    parser.add_argument("--max_samples", type=int, help="Images used at most (default: all).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass.")
    parser.add_argument(
        "--class_map_sources", nargs="+", choices=list(CLASS_MAP_SOURCES), help="Map sources (default: the config's)."
    )
    parser.add_argument(
        "--cam_probability",
        choices=["off", "on"],
        nargs="+",
        help="The CAM as the patch classifier's logit (off) or probability (on) (default: the config's).",
    )
    parser.add_argument("--affinity_powers", type=float, nargs="+", help="Affinity powers (default: the config's).")
    parser.add_argument(
        "--refinement_iterations", type=int, nargs="+", help="Image-refinement rounds (default: the config's)."
    )
    parser.add_argument(
        "--scales",
        type=scale_set,
        nargs="+",
        help="Test-time scale sets, each comma-separated, e.g. 1 1,1.25 (default: the config's attention_map_scales).",
    )
    parser.add_argument(
        "--logits_over_scales",
        choices=["off", "on"],
        nargs="+",
        help="Image logits averaged over the rescaled passes too (default: the config's image_logits_over_scales).",
    )
    parser.add_argument(
        "--flips", choices=["off", "on"], nargs="+", help="Test-time horizontal flips (default: the config's)."
    )
    parser.add_argument(
        "--background_thresholds",
        type=optional_fraction,
        nargs="+",
        help="Background thresholds, 'none' or numbers (default: the processor's).",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU (as --mixed_precision bf16).")
    parser.add_argument("--per_class_ap", action="store_true", help="Also print each setting's AP per class.")
    add_data_arguments(parser)
    return parser.parse_args(argv)


def scale_set(text: str) -> tuple[float, ...]:
    """`1,1.25` as (1.0, 1.25)."""
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of scales, e.g. 1,1.25") from None


def switches(values: list[str] | None, default: bool) -> list[bool]:
    """`off` / `on` command-line values as booleans; the config's `default` when none were given."""
    return [value == "on" for value in values] if values else [default]


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    model, processor, _, loader = checkpoint_and_masked_split(args, "pseudo-masks are scored against them")
    config = model.config
    sources = args.class_map_sources or [config.class_map_source]
    probabilities = switches(args.cam_probability, config.cam_probability)
    powers = args.affinity_powers or [config.attention_map_affinity_power]
    rounds = args.refinement_iterations or [config.attention_map_refinement_iterations]
    scales = args.scales or [tuple(config.attention_map_scales)]
    over_scales = switches(args.logits_over_scales, config.image_logits_over_scales)
    flips = switches(args.flips, config.attention_map_flip)
    thresholds = args.background_thresholds or [processor.background_threshold]
    settings = list(itertools.product(sources, probabilities, powers, scales, over_scales, flips, rounds))
    confusion = {setting + (threshold,): 0 for setting in settings for threshold in thresholds}
    logits, targets = {setting: [] for setting in settings}, []
    for batch in tqdm(loader, desc="rescore"):
        masks = batch["mask"]
        sizes = [tuple(masks.shape[-2:])] * masks.shape[0]
        targets.append(batch["labels"])
        for setting in settings:
            source, probability, power, scale, over, flip, iterations = setting
            config.class_map_source, config.cam_probability = source, probability
            config.image_logits_over_scales = over
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                outputs = model.predict_class_maps(
                    batch["pixel_values"],
                    scales=list(scale),
                    affinity_power=power,
                    flip=flip,
                    refinement_iterations=iterations,
                )
            logits[setting].append(outputs.class_logits.float())
            for threshold in thresholds:
                labels = processor.post_process_semantic_segmentation(
                    outputs, sizes, classes=batch["labels"].bool(), background_threshold=threshold
                )
                counts = confusion_matrices(torch.stack(labels), masks, config.num_labels).sum(0)
                key = setting + (threshold,)
                confusion[key] = confusion[key] + counts
    targets = torch.cat(targets)
    foreground = foreground_ids(processor, config.num_labels)
    names = [config.id2label[index] for index in range(config.num_labels)]
    results = {}
    print(f"{args.split} ({len(loader.dataset)} images): pseudo-mask mIoU from the image labels, mAP of the logits")
    for key, counts in confusion.items():
        source, probability, power, scale, over, flip, iterations, threshold = key
        score = iou_from_confusion(counts)["mean_iou"]
        ranking = classification_metrics(torch.cat(logits[key[:-1]]), targets, foreground, class_names=names)
        precision = ranking["mAP"]
        results[key] = {"mean_iou": score, "mAP": precision, "per_class_AP": ranking["per_class_AP"]}
        print(
            f"  {source:<20} CAM {'probability' if probability else 'logit':<11} affinity power {power:<4g}"
            f" scales {','.join(f'{value:g}' for value in scale):<8} (logits {'all' if over else 'scale 1'})"
            f" flip {'on' if flip else 'off':<3}"
            f" refinement {iterations:<3} background {threshold}: {score:.4f} (mAP {precision:.4f})"
        )
        if args.per_class_ap:
            shown = (f"{name} {'-' if ap is None else f'{ap:.3f}'}" for name, ap in ranking["per_class_AP"].items())
            print("    AP: " + ", ".join(shown))
    return results


if __name__ == "__main__":
    main()
