"""Class attention maps: explicit class-token rows (this package) vs recording full eager attention (original code).

ViT-B/16 at 448 x 448, C=20 class tokens + 1 [REG], one image, CPU, inference. Both variants use the same random
weights and produce the same maps (checked). The reference runs the eager attention and keeps every layer's full
(heads x T x T) attention, as the public implementation does, then slices the class rows; this package runs the
default attention (sdpa) and computes softmax rows only for the C class-token queries in the layers it needs; the
bf16 variant runs the same under `torch.autocast("cpu", dtype=torch.bfloat16)` (softmax rows in fp32).

    python benchmarks/bench_attention_maps.py [--layers 1] [--threads 2]

Targets: >= 5x less peak memory and >= 1.5x faster than the reference; prints the share of this machine's measured
matmul rate (same run) that each forward reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _measure import (  # noqa: E402
    child_measure,
    matmul_rates,
    measure_in_subprocess,
    rate_share,
    vit_b_config,
    vit_forward_gflop,
)

from modeling_clsmask import ClsMaskForMultiLabelClassification  # noqa: E402


NUM_CLASSES = 20
SIZE = 448


def build(layers: int, implementation: str):
    torch.manual_seed(0)
    config = vit_b_config(SIZE, NUM_CLASSES, attention_map_layers=layers)
    model = ClsMaskForMultiLabelClassification(config).eval()
    model.set_attn_implementation(implementation)
    return model, torch.randn(1, 3, SIZE, SIZE)


def ours(layers, dtype=None):
    def setup():
        return build(layers, "sdpa")

    def run(state):
        model, pixels = state
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(pixels, output_class_maps=True).class_maps.float()

    return setup, run


def reference(layers):
    def setup():
        return build(layers, "eager")

    def run(state):
        model, pixels = state
        with torch.inference_mode():
            out = model.clsmask(pixels, output_attentions=True)
            grid = SIZE // 16
            patches = slice(NUM_CLASSES, NUM_CLASSES + grid * grid)
            maps = sum(att[:, :, :NUM_CLASSES, patches].mean(1) for att in out.attentions[-layers:])
            return maps.reshape(1, NUM_CLASSES, grid, grid)

    return setup, run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="last layers aggregated (the reference records all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "ours_bf16", "reference", "check"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "ours": ours(args.layers),
        "ours_bf16": ours(args.layers, torch.bfloat16),
        "reference": reference(args.layers),
    }
    if args.child == "check":
        # Same maps from both fp32 paths; the bf16 maps' agreement with them is reported (normalised maps).
        (a_setup, a_run), (b_setup, b_run) = variants["ours"], variants["reference"]
        state = a_setup()
        fp32 = a_run(state)
        torch.testing.assert_close(fp32, b_run(b_setup()), atol=1e-5, rtol=1e-4)
        bf16 = variants["ours_bf16"][1](state)
        flat32, flat16 = fp32.flatten(2), bf16.flatten(2)
        above32 = flat32 >= flat32.mean(-1, keepdim=True)
        above16 = flat16 >= flat16.mean(-1, keepdim=True)
        print("RESULT " + json.dumps({"bf16_above_mean_agreement": float((above32 == above16).float().mean())}))
        return
    if args.child:
        setup, run = variants[args.child]
        child_measure(setup(), run, args.repeats)
        return

    forwarded = ["--layers", str(args.layers), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    check = measure_in_subprocess(__file__, "check", forwarded)
    ref = measure_in_subprocess(__file__, "reference", forwarded)
    new = measure_in_subprocess(__file__, "ours", forwarded)
    half = measure_in_subprocess(__file__, "ours_bf16", forwarded)
    gflop = vit_forward_gflop(NUM_CLASSES + 1 + (SIZE // 16) ** 2)
    print(f"ViT-B/16, {SIZE}x{SIZE}, C={NUM_CLASSES}, 1 image, CPU threads={args.threads}, layers={args.layers}; "
          f"forward {gflop:.0f} GFLOP")  # fmt: skip
    rates = matmul_rates()
    print(f"{'variant':<42}{'peak extra MiB':>16}{'median s':>12}{'% of matmul rate':>18}")
    rows = (
        ("reference (eager, all attentions kept)", ref, "fp32"),
        ("clsmask (sdpa + class-token rows)", new, "fp32"),
        ("clsmask, bf16 autocast", half, "bf16"),
    )
    for name, result, dtype in rows:
        share = rate_share(gflop, result["median_s"], rates[dtype])
        print(f"{name:<42}{result['peak_mib']:>16.1f}{result['median_s']:>12.3f}{share:>17.0f}%")
    memory_ratio = ref["peak_mib"] / max(new["peak_mib"], 1e-3)
    print(f"memory ratio (reference / clsmask fp32): {memory_ratio:.1f}x  (target >= 5x)")
    print(f"speed ratio  (reference / clsmask fp32): {ref['median_s'] / new['median_s']:.2f}x  (target >= 1.5x)")
    print(f"speed ratio  (reference / clsmask bf16): {ref['median_s'] / half['median_s']:.2f}x  (target >= 1.5x)")
    print(f"bf16 maps: above-mean pixels agree with fp32 on {100 * check['bf16_above_mean_agreement']:.2f} %")


if __name__ == "__main__":
    main()
