"""The baselines every real-data result is printed beside, for a dataset and a pretrained backbone.

Label-only (every pixel = the image's first label), CAM of a linear head on the frozen backbone's mean-pooled patch
tokens, and the fully supervised linear probe on its patch tokens (a ceiling that uses pixel labels): same backbone,
same data, same metric as `run_pretrain.py --init_from`, which prints them too. Optionally a trained clsmask
checkpoint's pseudo-mask mIoU (from its eval_results.json) beside them.

    python benchmarks/bench_real_baselines.py --dataset_name ../shared/data/camvid-tiles --init_from DINOV2_DIR \
        --image_size 112 --splits validation test [--checkpoint outputs/pretrain]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from modeling_clsmask import ClsMaskImageProcessor  # noqa: E402
from modeling_clsmask.backbones import normalisation  # noqa: E402
from modeling_clsmask.training.arguments import DataArguments, add_data_arguments  # noqa: E402
from modeling_clsmask.training.baselines import frozen_baselines  # noqa: E402
from modeling_clsmask.training.data import ExampleEncoder, eval_dataloader, load_data, sample_training_rows  # noqa: E402
from modeling_clsmask.training.loop import cpu_bf16_is_native  # noqa: E402
from modeling_clsmask.training.presets import PRESETS  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--init_from", required=True, help="The pretrained backbone (folder or Hub id).")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument(
        "--train_samples", type=int, default=2000, help="Training images for the heads, drawn as run_pretrain.py does."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the draw (run_pretrain.py's --seed).")
    parser.add_argument("--splits", nargs="+", default=["validation"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--checkpoint", help="A trained clsmask folder whose eval_results.json to print beside.")
    parser.add_argument(
        "--background_threshold",
        type=float,
        default=PRESETS["pretrained"]["auto_background_threshold"],
        help="Where the masks hold background: CAM paints it under this normalised score (the preset's 'auto').",
    )
    args = parser.parse_args(argv)
    spec = load_data(DataArguments.from_namespace(args))
    mean, std = normalisation(args.init_from)
    encoder = ExampleEncoder(
        spec,
        ClsMaskImageProcessor(
            size={"height": args.image_size, "width": args.image_size},
            image_mean=mean or [0.485, 0.456, 0.406],
            image_std=std or [0.229, 0.224, 0.225],
        ),
    )
    background = spec.background_label_id if spec.background_in_masks else None
    foreground = [i for i in range(len(spec.class_names)) if i != background]
    painted = None if background is None else (background, args.background_threshold)
    rows = sample_training_rows(spec.dataset[args.train_split], args.max_train_samples, args.train_samples, args.seed)
    train = eval_dataloader(rows, encoder, args.batch_size)
    trained = {}
    if args.checkpoint:
        with open(os.path.join(args.checkpoint, "eval_results.json")) as handle:
            trained = json.load(handle)
    start = time.perf_counter()
    loaders = {split: eval_dataloader(spec.dataset[split], encoder, args.batch_size) for split in args.splits}
    bf16 = cpu_bf16_is_native()  # bf16 features only where this CPU runs bf16 natively
    results = frozen_baselines(
        args.init_from, args.image_size, train, loaders, len(spec.class_names), foreground, painted, bf16
    )
    seconds = time.perf_counter() - start
    for split, figures in results.items():
        prefix = "test_" if split == "test" else ""
        ours = trained.get(f"{prefix}pseudo_mask_mean_iou")
        print(
            f"[{split}, {args.image_size} px, {len(rows)} training images, {seconds:.0f} s for all splits]"
            f" label-only {figures['label_only_mean_iou']:.4f} | frozen CAM {figures['frozen_cam_mean_iou']:.4f} "
            f"(mAP {figures['frozen_cam_mAP']:.4f}) | fully supervised linear probe "
            f"{figures.get('linear_probe_mean_iou', float('nan')):.4f}"
            + (
                f" | CAM at its best background threshold {figures['frozen_cam_tuned_mean_iou']:.4f} "
                f"({figures['frozen_cam_tuned_threshold']})"
                if "frozen_cam_tuned_mean_iou" in figures
                else ""
            )
            + (f" | clsmask checkpoint {ours:.4f}" if ours is not None else "")
        )
    return results


if __name__ == "__main__":
    main()
