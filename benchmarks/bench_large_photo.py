"""A large photo through the image-segmentation pipeline: masks made at full size versus at a bounded working size.

    python benchmarks/bench_large_photo.py outputs/pretrain [--size 4000]

(The checkpoint must have been saved by this version, whose copied pipeline has `max_working_size`.)

The checkpoint sees the photo at its own input size (64 x 64 for the built-in one); the cost of a large photo is the
mask work at the photo's size: bilinear maps, thresholds, painting and the nearest fill (rows x width^2). With
`max_working_size` (512, the default) that work happens at 512 px on the longer side and each class's uint8 mask is
enlarged to the photo (nearest); `None` makes the masks at full size, as earlier versions did. Each variant runs in a
fresh process (peak extra resident memory over the call, then median time of `--repeats` calls); the two label maps
are compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _measure import child_measure, measure_in_subprocess  # noqa: E402


VARIANTS = ("full-size masks", "bounded working size")


def photo(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 64 + 1, size // 64 + 1, 1), dtype=np.uint8))[:size, :size]


def child(variant: str, checkpoint: str, size: int, repeats: int, save: str) -> None:
    import torch
    from transformers import pipeline

    torch.set_num_threads(2)
    segmenter = pipeline("image-segmentation", model=checkpoint, trust_remote_code=True)
    if not hasattr(segmenter, "max_working_size"):
        raise SystemExit(f"{checkpoint} was saved by an older version: its pipeline has no max_working_size.")
    segmenter.max_working_size = None if variant == VARIANTS[0] else 512
    image = photo(size)
    result = {}

    def run(_):
        result["segments"] = segmenter(image)

    child_measure(None, run, repeats)
    labels = np.zeros((size, size), dtype=np.int16)
    for index, segment in enumerate(result["segments"]):
        labels[np.asarray(segment["mask"]) > 0] = index + 1
    names = [segment["label"] for segment in result["segments"]]
    np.savez_compressed(save, labels=labels, names=np.array(names))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="outputs/bench_large_photo", help="Folder for the two label maps.")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.checkpoint, args.size, args.repeats, os.path.join(args.save, args.child + ".npz"))
        return
    os.makedirs(args.save, exist_ok=True)
    common = [args.checkpoint, "--size", str(args.size), "--repeats", str(args.repeats), "--save", args.save]
    results = {variant: measure_in_subprocess(__file__, variant, common) for variant in VARIANTS}
    maps = [np.load(os.path.join(args.save, variant + ".npz")) for variant in VARIANTS]
    names = [list(m["names"]) for m in maps]
    agree = float("nan")
    if names[0] and sorted(names[0]) == sorted(names[1]):
        remap = {index + 1: names[1].index(name) + 1 for index, name in enumerate(names[0])}
        first = np.vectorize(lambda v: remap.get(int(v), 0))(maps[0]["labels"][::8, ::8])
        agree = float((first == maps[1]["labels"][::8, ::8]).mean())
    print(f"\n{args.size} x {args.size} photo, checkpoint {args.checkpoint}, 2 threads")
    print(f"{'variant':<24}{'peak extra memory':>20}{'median time':>14}")
    for variant, r in results.items():
        print(f"{variant:<24}{r['peak_mib']:>16.0f} MiB{r['median_s']:>12.2f} s")
    full, bounded = results[VARIANTS[0]], results[VARIANTS[1]]
    print(
        f"ratio: {full['median_s'] / bounded['median_s']:.1f}x faster, "
        f"{full['peak_mib'] / max(bounded['peak_mib'], 1):.1f}x less memory; "
        f"label agreement (every 8th pixel): {agree:.4f}"
    )


if __name__ == "__main__":
    main()
