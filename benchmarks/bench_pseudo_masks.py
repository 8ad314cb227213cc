"""Pseudo-mask throughput: this package's batched generation vs a reference written like the original code.

ViT-B/16 at 448 x 448, C=20 classes + 1 [REG], a batch of 8 images, CPU, same random weights for both.
- reference: per image, eager attention with every layer's full attention recorded, class maps summed over all
  layers (heads averaged), per-class threshold and painting in a Python loop, and a per-pixel 4-neighbour
  breadth-first fill of unassigned pixels (as the public implementation does);
- clsmask: one batched forward (sdpa, class-token attention rows only, same layers aggregated), then
  `masks_from_class_maps` (batched threshold/painting and exact Euclidean nearest fill).

- clsmask bf16: the same under `torch.autocast("cpu", dtype=torch.bfloat16)` (maps and masks made in fp32).

    python benchmarks/bench_pseudo_masks.py [--threads 2] [--batch 8]

Target: at least 3x the reference's images per second (bf16 allowed), printed as a ratio from one run, with the share
of this machine's measured matmul rate (same run) that each reaches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _measure import matmul_rates, rate_share, vit_b_config, vit_forward_gflop  # noqa: E402

from modeling_clsmask import ClsMaskForMultiLabelClassification, masks_from_class_maps  # noqa: E402


NUM_CLASSES = 20
SIZE = 448
PATCH = 16


def build() -> ClsMaskForMultiLabelClassification:
    torch.manual_seed(0)
    config = vit_b_config(SIZE, NUM_CLASSES, attention_map_layers=12)
    model = ClsMaskForMultiLabelClassification(config).eval()
    with torch.no_grad():  # a few confident classes per image, like a trained model
        model.classifier.bias.copy_(torch.linspace(-3, 3, NUM_CLASSES))
    return model


def bfs_fill(labels: np.ndarray, assigned: np.ndarray) -> np.ndarray:
    """Multi-source 4-neighbour breadth-first fill, pixel by pixel (the original implementation's approach)."""
    height, width = labels.shape
    queue = deque(zip(*np.nonzero(assigned)))
    seen = assigned.copy()
    while queue:
        y, x = queue.popleft()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx]:
                seen[ny, nx] = True
                labels[ny, nx] = labels[y, x]
                queue.append((ny, nx))
    return labels


@torch.no_grad()
def reference(model, images: torch.Tensor) -> list[np.ndarray]:
    model.set_attn_implementation("eager")
    grid = SIZE // PATCH
    masks = []
    for image in images:
        out = model.clsmask(image[None], output_attentions=True)
        logits = model.classifier(out.last_hidden_state[:, :NUM_CLASSES].flatten(1))
        probs = logits.sigmoid()[0]
        maps = sum(a[0, :, :NUM_CLASSES, NUM_CLASSES : NUM_CLASSES + grid * grid].mean(0) for a in out.attentions)
        maps = F.interpolate(maps.reshape(1, NUM_CLASSES, grid, grid), size=(SIZE, SIZE), mode="bilinear")[0]
        present = (probs >= 0.5).nonzero().flatten().tolist() or [int(probs.argmax())]
        label = np.zeros((SIZE, SIZE), dtype=np.int64)
        assigned = np.zeros((SIZE, SIZE), dtype=bool)
        for c in sorted(present, key=lambda k: float(probs[k])):
            region = (maps[c] >= maps[c].mean()).numpy()
            label[region] = c
            assigned |= region
        masks.append(bfs_fill(label, assigned))
    return masks


@torch.no_grad()
def ours(model, images: torch.Tensor, dtype=None) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(images, output_class_maps=True)
    probs = out.logits.float().sigmoid()
    return masks_from_class_maps(out.class_maps, probs, probs >= 0.5, (SIZE, SIZE))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    images = torch.randn(args.batch, 3, SIZE, SIZE)
    ours(model, images[:1])  # warm-up every path once
    ours(model, images[:1], torch.bfloat16)
    reference(model, images[:1])

    timings, outputs = {}, {}
    for name, run in (
        ("reference", lambda: reference(model, images)),
        ("fp32", lambda: ours(model, images)),
        ("bf16", lambda: ours(model, images, torch.bfloat16)),
    ):
        start = time.perf_counter()
        outputs[name] = run()
        timings[name] = time.perf_counter() - start
    gflop = args.batch * vit_forward_gflop(NUM_CLASSES + 1 + (SIZE // PATCH) ** 2)

    # Same classes in both; pixels differ only where BFS (4-neighbour) and Euclidean nearest fill disagree.
    ref, new = outputs["reference"], outputs["fp32"]
    agree = np.mean([(new[i].numpy() == ref[i]).mean() for i in range(args.batch)])
    agree_bf16 = float((outputs["bf16"] == new).float().mean())
    print(f"ViT-B/16, {SIZE}x{SIZE}, C={NUM_CLASSES}, batch {args.batch}, CPU threads={args.threads}")
    rates = matmul_rates()
    rates["reference"] = rates["fp32"]
    print(f"{'variant':<60}{'images/s':>10}{'% of matmul rate':>18}")
    names = {
        "reference": "reference (eager, all attentions, per image, per-pixel BFS)",
        "fp32": "clsmask (batched, class-token rows, exact nearest fill)",
        "bf16": "clsmask, bf16 autocast",
    }
    for key, name in names.items():
        share = rate_share(gflop, timings[key], rates[key])
        print(f"{name:<60}{args.batch / timings[key]:>10.3f}{share:>17.0f}%")
    print(f"pixel agreement, clsmask fp32 vs reference: {agree:.3f}; clsmask bf16 vs fp32: {agree_bf16:.4f}")
    for key in ("fp32", "bf16"):
        ratio = timings["reference"] / timings[key]
        print(f"throughput ratio (clsmask {key} / reference): {ratio:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
