"""The paper's central ablation on the built-in dataset: token masking vs none vs masking + head gates.

Same data, seed and number of steps for each variant; metrics are measured on the built-in *test* split (never used
to choose any setting):

    python benchmarks/bench_token_masking.py [--epochs 12] [--output_dir outputs/bench_token_masking]

Prints one table: pseudo-mask mIoU (image labels), classification mAP, class-assignment accuracy (over images with
at least two classes: the share of present classes whose own attention map overlaps their true region more than the
other present classes' maps do; 0.5 is chance for two-object images), and the open-gate fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import run_pretrain  # noqa: E402


VARIANTS = {
    "token masking r=0.5": ["--token_mask_rate", "0.5"],
    "no masking r=0": ["--token_mask_rate", "0.0"],
    "masking r=0.5 + head gates": ["--token_mask_rate", "0.5", "--use_head_gates"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="outputs/bench_token_masking")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More run_pretrain.py arguments.")
    args = parser.parse_args()
    rows = {}
    for name, flags in VARIANTS.items():
        folder = os.path.join(args.output_dir, name.split()[0] + ("_gates" if "gates" in name else "") + flags[1])
        metrics = run_pretrain.main(
            [
                "--num_train_epochs",
                str(args.epochs),
                "--seed",
                str(args.seed),
                "--output_dir",
                folder,
                "--num_visualizations",
                "4",
                *flags,
                *args.extra,
            ]  # fmt: skip
        )
        rows[name] = metrics
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    print(f"\nbuilt-in shapes, test split, {args.epochs} epochs, seed {args.seed}")
    header = f"{'variant':<30}{'pseudo-mask mIoU':>18}{'mAP':>8}{'class assignment':>18}{'open gates':>12}"
    print(header)
    print("-" * len(header))
    for name, m in rows.items():
        gates = m.get("open_gate_fraction")
        print(
            f"{name:<30}{m['test_pseudo_mask_mean_iou']:>18.4f}{m['test_mAP']:>8.4f}"
            f"{m['test_class_assignment_accuracy']:>18.4f}{'' if gates is None else f'{gates:.2f}':>12}"
        )


if __name__ == "__main__":
    main()
