"""Pseudo-mask cost at real sizes: the `pretrained` preset's map processing against one raw pass.

A DINOv2 ViT-S/14-shaped clsmask model (random weights; the cost does not depend on them), 448 x 448 inputs,
21 classes, batch 4, 2 threads, bf16 autocast where this CPU runs bf16 natively (else fp32, as the scripts decide),
the preset's image branch in every pass.
Variants: one raw pass (class attention of the last block, no processing); the shipped preset (a flipped second
pass, an upscaled pair where the patch grid is coarse, feature-affinity propagation, argmax assembly); the same plus
10 rounds of the image refinement (off in the preset); all with the masks made at the input size. Prints images/s and
each variant's time over the raw pass, measured in this run.

    python benchmarks/bench_real_cost.py [--size 448] [--classes 21] [--batch 4] [--repeats 3] [--allow_slow_bf16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor  # noqa: E402
from modeling_clsmask.training.loop import cpu_bf16_is_native, cpu_bf16_slowdown  # noqa: E402
from modeling_clsmask.training.presets import PRESETS, resolve_attention_map_scales  # noqa: E402


SHIPPED = "shipped preset (flip, affinity, argmax)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--allow_slow_bf16", action="store_true", help="bf16 even where this CPU only emulates it (as the scripts)."
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    bf16 = args.allow_slow_bf16 or cpu_bf16_is_native()
    precision = "bf16 autocast" if bf16 else f"fp32 (bf16 autocast is {cpu_bf16_slowdown():.1f}x slower on this CPU)"
    preset = PRESETS["pretrained"]
    with tempfile.TemporaryDirectory() as folder:
        Dinov2Model(
            Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14)
        ).save_pretrained(folder)
        model = ClsMaskForSemanticSegmentation.from_pretrained_backbone(
            folder,
            id2label={i: f"class_{i}" for i in range(args.classes)},
            image_size=args.size,
            class_token_layers=preset["class_token_layers"],
            attention_map_layers=preset["attention_map_layers"],
            hide_class_tokens=preset["hide_class_tokens"],
            use_patch_classifier=preset["use_patch_classifier"],
            class_map_source=preset["class_map_source"],
            cam_probability=preset["cam_probability"],
            image_branch_layers=preset["image_branch_layers"],
            image_logits_over_scales=preset["image_logits_over_scales"],
        ).eval()
    config = model.config
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    labels = (torch.rand(args.batch, args.classes) < 0.15).long()
    labels[:, 0] = 1
    processor = ClsMaskImageProcessor.from_model_config(config, mask_assembly=preset["mask_assembly"])
    shipped = {
        # 'auto' as run_pretrain.py resolves it: one pass at 448 px (32 x 32 patches), an upscaled one at 112 px.
        "scales": resolve_attention_map_scales(
            argparse.Namespace(preset="pretrained", attention_map_scales=preset["attention_map_scales"]),
            args.size // config.patch_size,
        ),
        "flip": preset["attention_map_flip"],
        "affinity_power": preset["attention_map_affinity_power"],
        "refinement_iterations": preset["attention_map_refinement_iterations"],
    }
    variants = {
        "one raw pass": None,
        SHIPPED: shipped,
        "preset + 10 refinement rounds": {**shipped, "refinement_iterations": 10},
    }
    seconds = {}
    for name, variant in variants.items():
        times = []
        for _ in range(args.repeats + 1):  # the first call warms up
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if variant is None:
                    out = model(pixels, image_labels=labels)
                else:
                    out = model.predict_class_maps(pixels, image_labels=labels, **variant)
            processor.post_process_semantic_segmentation(out, [(args.size, args.size)] * args.batch)
            times.append(time.perf_counter() - start)
        seconds[name] = sorted(times[1:])[len(times[1:]) // 2]
    raw = seconds["one raw pass"]
    print(f"{args.size} px, {args.classes} classes, batch {args.batch}, {precision}, 2 threads, test-time scales "
          f"{shipped['scales']}")  # fmt: skip
    for name, value in seconds.items():
        print(f"  {name:36s} {args.batch / value:6.2f} images/s   {value / raw:5.2f}x the raw pass")
    hours = 10_000 / (args.batch / seconds[SHIPPED]) / 3600
    print(f"  10k images (VOC-size pseudo-labelling) with the shipped preset: {hours:.2f} h on this machine")
    return seconds


if __name__ == "__main__":
    main()
