"""Where do the class tokens look? Per-layer and per-head quality of a checkpoint's class attention maps.

    python benchmarks/diagnose_maps.py outputs/pretrain                       # the data it was trained on
    python benchmarks/diagnose_maps.py CHECKPOINT --synthetic_generator glyphs --split validation
    python benchmarks/diagnose_maps.py CHECKPOINT --dataset_name user/dataset --max_samples 200

For every block the class tokens take part in, and for every head of it alone, prints the class assignment (with the
split's chance level) and the pseudo-mask mIoU of maps made from that layer or head only (image labels, the
checkpoint's background rule), then where each present class token's attention goes: its own class region, the
regions of the other present classes, background, the other class tokens, itself and the [REG] tokens (attention
falling on a patch is split over the classes in that patch by pixel share). Also writes `diagnosis.json` and, for the
first images, `diagnosis_maps.png` (one row per image, one map per layer for each image label). Under a minute for a
300-image 64 px split on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor  # noqa: E402
from modeling_clsmask.modeling_clsmask import ClsMaskSemanticSegmenterOutput  # noqa: E402
from modeling_clsmask.training.arguments import DataArguments, add_data_arguments  # noqa: E402
from modeling_clsmask.training.data import ExampleEncoder, eval_dataloader, load_data, subsample_rows  # noqa: E402
from modeling_clsmask.training.metrics import (  # noqa: E402
    class_assignment_counts,
    class_assignment_summary,
    confusion_matrices,
    iou_from_confusion,
)


MASS_KEYS = ("own region", "other present", "background", "other class tokens", "itself", "[REG]")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A folder written by run_pretrain.py (or a Hub id).")
    parser.add_argument("--split", default="validation", help="Split to diagnose (default: validation).")
    parser.add_argument("--max_samples", type=int, default=300, help="Images used at most.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass.")
    parser.add_argument("--output_dir", help="Where diagnosis.json/.png go (default: the checkpoint folder).")
    parser.add_argument("--num_visualizations", type=int, default=6, help="Images drawn in diagnosis_maps.png.")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    training_data = os.path.join(args.checkpoint, "training_data.json")
    if not (args.dataset_name or args.voc_root) and os.path.exists(training_data):
        # Default to the synthetic generator the checkpoint was trained on.
        with open(training_data) as handle:
            info = json.load(handle)
        source, splits = info.get("source", ""), info.get("splits", {})
        prefix = "clsmask/synthetic-"
        given = argv if argv is not None else sys.argv
        if source.startswith(prefix):
            # Same generator and split sizes, so the same seeds: the split the checkpoint was evaluated on.
            if "--synthetic_generator" not in given:
                args.synthetic_generator = source[len(prefix) :]
            if "--train_size" not in given and "train" in splits:
                args.train_size = splits["train"]
            if "--validation_size" not in given and "validation" in splits:
                args.validation_size = splits["validation"]
    return args


def attention_mass(attention: torch.Tensor, patch_share: torch.Tensor, labels: torch.Tensor, num_patches: int):
    """(B, C, len(MASS_KEYS)) share of each class token's (head-averaged) attention row going to each destination.

    attention: (B, C, T) rows; patch_share: (B, K, N) pixel share of each label k in each patch (K = num_labels + 1,
    the last row for background / ignored pixels); labels: (B, C) multi-hot.
    """
    batch, num_classes, _ = attention.shape
    on_patches = attention[..., num_classes : num_classes + num_patches]
    per_label = torch.einsum("bcn,bkn->bck", on_patches, patch_share)  # mass over each label's pixels
    own = per_label[..., :num_classes].diagonal(dim1=1, dim2=2)
    present = labels.bool()
    other_present = (per_label[..., :num_classes] * present.unsqueeze(1)).sum(-1) - own * present.float()
    background = per_label.sum(-1) - own - other_present
    tokens = attention[..., :num_classes]
    itself = tokens.diagonal(dim1=1, dim2=2)
    return torch.stack(
        [
            own,
            other_present,
            background,
            tokens.sum(-1) - itself,
            itself,
            attention[..., num_classes + num_patches :].sum(-1),
        ],
        dim=-1,
    )


def checkpoint_and_masked_split(args, purpose: str):
    """`args.checkpoint`'s model and image processor, the data spec, and batches of the first `args.max_samples` rows
    of `args.split`; stops, saying why (`purpose`), when the data has no masks or no such split."""
    model = ClsMaskForSemanticSegmentation.from_pretrained(args.checkpoint).eval()
    processor = ClsMaskImageProcessor.from_pretrained(args.checkpoint)
    spec = load_data(DataArguments.from_namespace(args))
    if not spec.has_masks:
        raise ValueError(f"{spec.source} has no masks: {purpose}.")
    if args.split not in spec.dataset:
        raise ValueError(f"Split {args.split!r} not found; the dataset has {list(spec.dataset)}.")
    data = subsample_rows(spec.dataset[args.split], args.max_samples, seed=0)
    return model, processor, spec, eval_dataloader(data, ExampleEncoder(spec, processor), args.batch_size)


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor, spec, loader = checkpoint_and_masked_split(
        args, "the diagnosis compares maps with ground-truth regions"
    )
    config = model.config
    data = loader.dataset

    base = model.clsmask
    layers = base.class_attention_layers(config.num_hidden_layers - base.first_class_token_layer())
    num_labels, num_heads = config.num_labels, config.num_attention_heads
    background = processor.background_threshold
    bg_id = processor.background_label_id
    foreground = [i for i in range(num_labels) if background is None or i != bg_id]
    # Variants: (layer, None) = heads averaged as the model does, one pass; (layer, h) = head h alone; ("sum", None) =
    # the checkpoint's own maps (its layers, test-time scales and flips, refinement).
    variants = [(layer, head) for layer in layers for head in (None, *range(num_heads))] + [("sum", None)]
    confusion = {v: 0 for v in variants}
    assign = {v: [] for v in variants}
    mass = {layer: [] for layer in layers}
    all_labels, pictures = [], []
    for batch in tqdm(loader, desc="diagnose"):
        pixels, labels, masks = batch["pixel_values"], batch["labels"], batch["mask"]
        out = base(pixels, output_class_attentions=True, attention_map_layers=len(layers))
        grid = (pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size)
        num_patches = grid[0] * grid[1]
        valid = (masks >= 0) & (masks < num_labels)
        one_hot = F.one_hot(torch.where(valid, masks, num_labels), num_labels + 1).permute(0, 3, 1, 2).float()
        if background is not None:  # background pixels go to the "background" row
            one_hot[:, num_labels] += one_hot[:, bg_id]
            one_hot[:, bg_id] = 0
        patch_share = F.adaptive_avg_pool2d(one_hot, grid).flatten(2)  # (B, K, N)
        configured = model.predict_class_maps(pixels)  # the checkpoint's own maps (scales, flips, refinement)
        probs = configured.class_probs
        all_labels.append(labels)
        layer_maps = {}
        for layer, attention in zip(layers, out.class_attentions):
            patch_attention = attention[..., num_labels : num_labels + num_patches]  # (B, H, C, N)
            weights = base.layers[layer].attention.head_weights().to(attention.dtype)
            averaged = torch.einsum("bhcn,h->bcn", patch_attention, weights)
            layer_maps[layer] = averaged.reshape(-1, num_labels, *grid)
            maps_by_variant = {(layer, None): layer_maps[layer]}
            for head in range(num_heads):
                maps_by_variant[(layer, head)] = patch_attention[:, head].reshape(-1, num_labels, *grid)
            mass[layer].append(
                attention_mass(torch.einsum("bhct,h->bct", attention, weights), patch_share, labels, num_patches)
            )
            for variant, maps in maps_by_variant.items():
                accumulate(variant, maps, probs, labels, masks, confusion, assign, num_labels, foreground, processor)
        maps = configured.class_maps
        accumulate(("sum", None), maps, probs, labels, masks, confusion, assign, num_labels, foreground, processor)
        if len(pictures) < args.num_visualizations:
            pictures.append((pixels, labels, masks, layer_maps))

    rows = {}
    for variant in variants:
        result = iou_from_confusion(confusion[variant].sum(0))
        summary = class_assignment_summary(torch.cat(assign[variant]))
        rows[variant] = {"mean_iou": result["mean_iou"], **summary}
    chance = rows[variants[0]]["class_assignment_chance"]
    print(
        f"\n{args.checkpoint}: {spec.source} [{args.split}], {len(data)} images, class assignment chance {chance:.3f}"
    )
    print(f"{'maps from':<26}{'class assignment':>18}{'margin':>9}{'pseudo-mask mIoU':>18}")
    for variant in variants:
        layer, head = variant
        if layer == "sum":
            name = "checkpoint's maps"
        else:
            name = f"layer {layer} " + ("heads averaged" if head is None else f"  head {head}")
        row = rows[variant]
        print(
            f"{name:<26}{row['class_assignment_accuracy']:>18.3f}{row['class_assignment_margin']:>+9.3f}"
            f"{row['mean_iou']:>18.3f}"
        )
    flips = " and flips" if config.attention_map_flip else ""
    scales = config.attention_map_scales
    rounds = config.attention_map_refinement_iterations
    refined = f", refined with the image ({rounds} rounds)" if rounds else ""
    print(f"(checkpoint's maps: blocks {base.class_attention_layers()}, input scales {scales}{flips}{refined})")
    print(f"(layer and head rows: one raw pass each, masks at the checkpoint's background threshold {background})")
    print("\nattention of each present class token (share of its row, heads averaged):")
    print(f"{'layer':<8}" + "".join(f"{key:>20}" for key in MASS_KEYS))
    present = torch.cat(all_labels).bool()
    if background is not None:
        present[:, bg_id] = False
    mass_summary = {}
    for layer in layers:
        means = torch.cat(mass[layer])[present].mean(0)  # over (image, present class) pairs
        mass_summary[layer] = dict(zip(MASS_KEYS, means.tolist()))
        print(f"{layer:<8}" + "".join(f"{value:>20.3f}" for value in means.tolist()))

    output_dir = args.output_dir or (args.checkpoint if os.path.isdir(args.checkpoint) else ".")
    os.makedirs(output_dir, exist_ok=True)
    report = {
        "source": spec.source,
        "split": args.split,
        "num_images": len(data),
        "maps": {f"{layer}/{'mean' if head is None else head}": row for (layer, head), row in rows.items()},
        "attention_mass": {str(layer): values for layer, values in mass_summary.items()},
    }
    with open(os.path.join(output_dir, "diagnosis.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    if pictures:
        draw(pictures, processor, spec.class_names, foreground, args.num_visualizations, output_dir)
    return report


def accumulate(variant, maps, probs, labels, masks, confusion, assign, num_labels, foreground, processor) -> None:
    outputs = ClsMaskSemanticSegmenterOutput(class_maps=maps, class_probs=probs, present=labels.bool())
    pseudo = torch.stack(processor.post_process_semantic_segmentation(outputs, [tuple(masks.shape[-2:])] * len(maps)))
    confusion[variant] = confusion[variant] + confusion_matrices(pseudo, masks, num_labels).sum(0, keepdim=True)
    assign[variant].append(class_assignment_counts(maps, masks, labels, foreground))


def draw(pictures, processor, class_names, foreground, count, output_dir) -> None:
    """One row per image: the image, its ground truth, then each layer's map of each image label."""
    from PIL import Image

    from modeling_clsmask.training.visualization import colourise, heatmap, stack_rows, titled_row

    mean = torch.tensor(processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(processor.image_std).view(-1, 1, 1)
    rows = []
    for pixels, labels, masks, layer_maps in pictures:
        for i in range(pixels.shape[0]):
            if len(rows) >= count:
                break
            array = (pixels[i] * std + mean).clamp(0, 1)
            array = array[:3] if array.shape[0] >= 3 else array[:1].expand(3, -1, -1)
            image = Image.fromarray((array.permute(1, 2, 0).numpy() * 255).astype("uint8"))
            tiles = [("image", image), ("ground truth", colourise(masks[i].numpy(), len(class_names)))]
            for c in (c for c in labels[i].nonzero().flatten().tolist() if c in foreground):
                tiles += [
                    (f"L{layer} {class_names[c]}", heatmap(maps[i, c].numpy())) for layer, maps in layer_maps.items()
                ]
            rows.append(titled_row(tiles, 96))
    stack_rows(rows).save(os.path.join(output_dir, "diagnosis_maps.png"))


if __name__ == "__main__":
    main()
