"""bf16 against fp32 on a trained checkpoint's validation split: do maps and pseudo-masks stay the same?

Three ways to run the model on the same images: fp32; fp32 weights under `torch.autocast("cpu", bfloat16)` (what
`--mixed_precision bf16` does in the scripts); and bf16 weights (what `pipeline(..., dtype=torch.bfloat16)` loads).
Pseudo-masks are made from the image labels in every case (maps, normalisation, thresholds and fill in fp32).

    python benchmarks/bench_bf16_agreement.py outputs/pretrain        # the split the checkpoint was evaluated on

Targets: maps and masks agree with fp32 on >= 99 % of pixels; pseudo-mask mIoU within 0.01.
"""

from __future__ import annotations

import copy
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diagnose_maps import parse_args  # noqa: E402

from modeling_clsmask import ClsMaskForMultiLabelClassification, ClsMaskImageProcessor  # noqa: E402
from modeling_clsmask.training.arguments import DataArguments  # noqa: E402
from modeling_clsmask.training.data import ExampleEncoder, eval_dataloader, load_data, subsample_rows  # noqa: E402
from modeling_clsmask.training.metrics import confusion_matrices, iou_from_confusion  # noqa: E402


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    model = ClsMaskForMultiLabelClassification.from_pretrained(args.checkpoint).eval()
    processor = ClsMaskImageProcessor.from_pretrained(args.checkpoint)
    config = model.config
    spec = load_data(DataArguments.from_namespace(args))
    data = subsample_rows(spec.dataset[args.split], args.max_samples, seed=0)
    encoder = ExampleEncoder(spec, processor)
    variants = {
        "fp32": (model, False),
        "bf16 autocast": (model, True),
        "bf16 weights": (copy.deepcopy(model).to(torch.bfloat16), False),
    }
    maps, masks, confusion, seconds = {}, {}, {}, {}
    for name, (net, autocast) in variants.items():
        maps[name], masks[name], confusion[name], start = [], [], 0, time.perf_counter()
        for batch in eval_dataloader(data, encoder, args.batch_size):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = net.predict_class_maps(batch["pixel_values"], image_labels=batch["labels"])
            class_maps = out.class_maps.float()
            sizes = [tuple(batch["mask"].shape[-2:])] * batch["mask"].shape[0]
            mask = torch.stack(processor.post_process_semantic_segmentation(out, sizes))
            flat = class_maps.flatten(2)
            maps[name].append(flat >= flat.mean(-1, keepdim=True))  # the per-class threshold decision, per patch
            masks[name].append(mask)
            confusion[name] = confusion[name] + confusion_matrices(mask, batch["mask"], config.num_labels).sum(0)
        seconds[name] = time.perf_counter() - start
    print(f"{args.checkpoint}: {len(data)} images of {spec.source} ({args.split})")
    print(f"{'variant':<16}{'mIoU':>8}{'map agreement':>16}{'mask agreement':>16}{'seconds':>9}")
    report = {}
    for name in variants:
        map_agree = float((torch.cat(maps[name]) == torch.cat(maps["fp32"])).float().mean())
        mask_agree = float((torch.cat(masks[name]) == torch.cat(masks["fp32"])).float().mean())
        miou = iou_from_confusion(confusion[name])["mean_iou"]
        report[name] = {"mean_iou": miou, "map_agreement": map_agree, "mask_agreement": mask_agree}
        print(f"{name:<16}{miou:>8.4f}{100 * map_agree:>15.2f}%{100 * mask_agree:>15.2f}%{seconds[name]:>9.2f}")
    return report


if __name__ == "__main__":
    main()
