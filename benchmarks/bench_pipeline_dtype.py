"""The image-segmentation pipeline loaded in fp32 and with `dtype=torch.bfloat16` (the transformers way).

ViT-B/16 at 448 x 448, C = 20 classes (random weights with a few confident classes, saved as a checkpoint folder and
loaded with `trust_remote_code=True`), one 448 x 448 photo per call, CPU. Each variant runs in a fresh process (peak
extra memory of the first call, then the median of `--repeats` calls); their label maps are compared pixel by pixel.

    python benchmarks/bench_pipeline_dtype.py [--threads 2] [--repeats 3]

Target: the bf16 pipeline >= 2.5x the fp32 one, masks agreeing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _measure import child_measure, measure_in_subprocess, vit_b_config  # noqa: E402


SIZE, NUM_CLASSES = 448, 20  # defaults
VARIANTS = ("fp32", "bf16")


def save_checkpoint(folder: str, size: int) -> None:
    import torch

    from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor

    torch.manual_seed(0)
    config = vit_b_config(size, NUM_CLASSES, attention_map_layers=12, weight_init="normal")
    model = ClsMaskForSemanticSegmentation(config).eval()
    with torch.no_grad():  # a few confident classes, like a trained model
        model.classifier.bias.copy_(torch.linspace(-3, 3, NUM_CLASSES))
    model.save_pretrained(folder)
    ClsMaskImageProcessor.from_model_config(config).save_pretrained(folder)


def child(variant: str, folder: str, threads: int, repeats: int, size: int) -> None:
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    kwargs = {"dtype": torch.bfloat16} if variant == "bf16" else {}
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True, **kwargs)
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    result = {}

    def run(_):
        result["segments"] = segmenter(image)

    child_measure(None, run, repeats)
    labels = np.full((size, size), -1, dtype=np.int16)
    for segment in result["segments"]:
        labels[np.asarray(segment["mask"]) > 0] = int(segment["label"].split("_")[1])
    np.save(os.path.join(folder, f"{variant}.npy"), labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per variant (after the measured first).")
    parser.add_argument("--size", type=int, default=SIZE, help="Model input and photo side.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.threads, args.repeats, args.size)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, args.size)
        common = ["--folder", folder, "--threads", str(args.threads), "--repeats", str(args.repeats)]
        common += ["--size", str(args.size)]
        results = {variant: measure_in_subprocess(__file__, variant, common) for variant in VARIANTS}
        labels = {variant: np.load(os.path.join(folder, f"{variant}.npy")) for variant in VARIANTS}
    print(f"pipeline, ViT-B/16, {args.size}x{args.size} photo, C={NUM_CLASSES}, CPU threads={args.threads}")
    print(f"{'variant':<10}{'peak extra MiB':>16}{'median s':>10}")
    for variant, r in results.items():
        print(f"{variant:<10}{r['peak_mib']:>16.0f}{r['median_s']:>10.3f}")
    agree = float((labels["fp32"] == labels["bf16"]).mean())
    ratio = results["fp32"]["median_s"] / results["bf16"]["median_s"]
    print(f"speed ratio (fp32 / bf16): {ratio:.2f}x  (target >= 2.5x); label agreement {100 * agree:.2f} %")


if __name__ == "__main__":
    main()
