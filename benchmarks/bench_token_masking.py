"""The design ablation on both generators, several seeds: token masking, head gates, and the paper's configuration.

    python benchmarks/bench_token_masking.py                      # 2 generators x 3 seeds, about 50 minutes (2 cores)
    python benchmarks/bench_token_masking.py --seeds 0 --generators glyphs --variants shipped masking

Each run trains `run_pretrain.py` from scratch on 3000 generated training images (64 px) for `--epochs` epochs with
the shipped defaults plus the variant's flags, and is scored on that generator's *test* split (no setting was chosen
on it). Variants:
- `shipped`: the defaults (conv stem, fan-in init, shared readout, maps from block 0 averaged over test-time scales
  and flips, no token masking);
- `masking`: the same with class-specific token masking r = 0.5 (the paper's rate);
- `gates`: the same with Hard Concrete head gates started at log_alpha 0 (the public code's start), L0 0.01;
- `paper`: the paper's configuration (`--recipe paper`: patchify stem, ViT init, flattened readout, masking 0.5,
  maps summed over all blocks, one pass).

Prints, per generator and variant, mean and spread (min-max) over seeds of pseudo-mask mIoU, class assignment with
that split's chance level, mAP and the share of closed heads; every run's metrics go to `results.json`, which is
updated after each run (re-running skips the runs already there).

`--rescore` trains nothing: it re-scores the runs saved in `--output_dir` with the map settings this code gives each
variant (test-time scales and flips, refinement, background threshold). Those settings act only at inference and
training is deterministic, so the figures are those a re-run would print (mAP is unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import run_pretrain  # noqa: E402


VARIANTS = {
    "shipped": [],
    "masking": ["--token_mask_rate", "0.5"],
    "gates": ["--use_head_gates", "--gate_log_alpha_init", "0"],
    "paper": ["--recipe", "paper"],
}
GENERATORS = ("shapes-random-colour", "glyphs")
METRICS = (
    ("pseudo-mask mIoU", "test_pseudo_mask_mean_iou"),
    ("class assignment", "test_class_assignment_accuracy"),
    ("chance", "test_class_assignment_chance"),
    ("mAP", "test_mAP"),
    ("heads closed", "closed_gate_fraction"),
)


# Config fields that act only at inference: what `--rescore` takes from the current defaults.
MAP_FIELDS = (
    "attention_map_scales", "attention_map_flip", "attention_map_refinement_iterations",
    "attention_map_refinement_dilations", "attention_map_refinement_sigma",
)  # fmt: skip


def rescore(folder: str, variant: str) -> dict:
    """Test-split metrics of a saved run with the map settings the current code gives its variant."""
    import torch
    from accelerate import Accelerator

    from modeling_clsmask import ClsMaskForMultiLabelClassification, ClsMaskImageProcessor
    from modeling_clsmask.training.arguments import DataArguments
    from modeling_clsmask.training.data import ExampleEncoder, eval_dataloader, load_data

    with open(os.path.join(folder, "clsmask_run.json")) as handle:
        saved = json.load(handle)["args"]
    args = run_pretrain.parse_args(VARIANTS[variant])
    # The run's own arguments, except the inference-only ones (their command-line names are the config's).
    for name, value in saved.items():
        if name not in MAP_FIELDS and hasattr(args, name):
            setattr(args, name, value)
    spec = load_data(DataArguments.from_namespace(args))
    current = run_pretrain.build_model(args, spec.class_names, spec.background_label_id).config
    model = ClsMaskForMultiLabelClassification.from_pretrained(
        folder, **{name: getattr(current, name) for name in MAP_FIELDS}
    ).eval()
    processor = ClsMaskImageProcessor.from_pretrained(folder)
    for name, value in run_pretrain.mask_settings(args, spec.background_label_id, spec.background_in_masks).items():
        setattr(processor, name, value)  # the mask settings the current code gives the variant
    encoder = ExampleEncoder(spec, processor)
    loader = eval_dataloader(spec.dataset[args.test_split], encoder, args.per_device_eval_batch_size)
    with torch.no_grad():
        metrics, _ = run_pretrain.evaluate(model, loader, Accelerator(), spec.class_names, processor)
    return {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--single_seed_variants",
        nargs="*",
        default=["gates", "paper"],
        help="Variants run with the first seed only (to fit the time budget).",
    )
    parser.add_argument("--output_dir", default="outputs/bench_token_masking")
    parser.add_argument(
        "--rescore", action="store_true", help="Re-score the saved runs with the current map settings; no training."
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More run_pretrain.py arguments.")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for generator in args.generators:
        for variant in args.variants:
            seeds = args.seeds[:1] if variant in args.single_seed_variants else args.seeds
            for seed in seeds:
                key = f"{generator}/{variant}/{seed}"
                folder = os.path.join(args.output_dir, generator, variant, f"seed{seed}")
                if args.rescore:
                    if key in results:
                        results[key].update(rescore(folder, variant), rescored=True)
                        with open(results_path, "w") as handle:
                            json.dump(results, handle, indent=2)
                    continue
                if key in results:
                    continue
                metrics = run_pretrain.main(
                    [
                        "--synthetic_generator", generator,
                        "--train_size", str(args.train_size),
                        "--num_train_epochs", str(args.epochs),
                        "--eval_every_epochs", str(args.epochs),
                        "--seed", str(seed),
                        "--output_dir", folder,
                        *VARIANTS[variant],
                        *args.extra,
                    ]  # fmt: skip
                )
                if "open_gate_fraction" in metrics:
                    metrics["closed_gate_fraction"] = 1.0 - metrics["open_gate_fraction"]
                results[key] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                with open(results_path, "w") as handle:
                    json.dump(results, handle, indent=2)

    print(f"\n{args.train_size} training images, {args.epochs} epochs, test split; mean (min-max) over seeds")
    header = f"{'generator':<22}{'variant':<10}{'seeds':>6}" + "".join(f"{name:>26}" for name, _ in METRICS)
    print(header)
    print("-" * len(header))
    for generator in args.generators:
        for variant in args.variants:
            runs = [m for k, m in results.items() if k.startswith(f"{generator}/{variant}/")]
            if not runs:
                continue
            cells = [spread([m[key] for m in runs if key in m]) for _, key in METRICS]
            print(f"{generator:<22}{variant:<10}{len(runs):>6}" + "".join(f"{c:>26}" for c in cells))
    return results


if __name__ == "__main__":
    main()
