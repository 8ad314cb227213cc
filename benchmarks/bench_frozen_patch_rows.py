"""One training step of the `pretrained` preset's model three ways, on this CPU: the patch rows of its frozen
class-token block recorded for autograd (the joint block), run without autograd (what the model does when they are
not cached), and read from the feature cache (`frozen_patch_states`, what training from cached features does).

The class tokens are hidden from the patches and the blocks are frozen, so the patch and [REG] rows of the last
block depend on nothing that learns (`ClsMaskModel.patch_rows_are_frozen`): they can run under `no_grad`, or once
per image, with only the class rows (queries over every token) and the image branch left to each step. Same shape as
`bench_training_attention.py` (ViT-S/14, 11 classes, batch 32, cached block inputs, the image branch's 2 blocks
fine-tuned), sdpa. The variants are timed in alternation (`--repeats` rounds, each a warm-up and a timed step of
every variant), so a drift of the machine's speed reaches all; prints each one's median and the ratios to the joint
block. bf16 is skipped where the CPU emulates it (training then runs fp32). The loss and gradients are the same
(tests/test_modeling.py).

    python benchmarks/bench_frozen_patch_rows.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from unittest import mock


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from bench_training_attention import (  # noqa: E402
    BATCH,
    BF16_SKIPPED,
    NUM_CLASSES,
    bf16_cases,
    preset_batch,
    preset_shaped_model,
    step_time,
)

from modeling_clsmask import ClsMaskModel  # noqa: E402
from modeling_clsmask.training.loop import cpu_bf16_is_native  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    parser.add_argument("--repeats", type=int, default=5, help="Rounds of timed steps (each after a warm-up).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"One training step from cached block inputs, batch {BATCH}, {NUM_CLASSES} classes, threads {args.threads}")
    print(f"{'input':<8}{'tokens':>7}{'precision':>11}{'joint s':>9}{'no graph s':>12}{'cached s':>10}"
          f"{'no graph / joint':>18}{'cached / joint':>16}")  # fmt: skip
    joint = mock.patch.object(ClsMaskModel, "patch_rows_need_no_graph", lambda self, output_attentions: False)
    for size in (112, 224):
        model = preset_shaped_model(size)
        assert model.clsmask.patch_rows_are_frozen(), "the preset's shape no longer has frozen patch rows"
        tokens, cached = preset_batch(model, size)
        batch = {key: value for key, value in cached.items() if key != "frozen_patch_states"}
        for bf16 in bf16_cases():
            seconds = {"joint": [], "no graph": [], "cached": []}
            for _ in range(args.repeats):  # one timed step (after a warm-up) of each, in turn
                with joint:
                    seconds["joint"].append(step_time(model, batch, "sdpa", bf16, 1))
                seconds["no graph"].append(step_time(model, batch, "sdpa", bf16, 1))
                seconds["cached"].append(step_time(model, cached, "sdpa", bf16, 1))
            whole, split, read = (statistics.median(values) for values in seconds.values())
            precision = "bf16" if bf16 else "fp32"
            print(f"{size:<8}{tokens:>7}{precision:>11}{whole:>9.3f}{split:>12.3f}{read:>10.3f}"
                  f"{split / whole:>17.2f}x{read / whole:>15.2f}x")  # fmt: skip
    if not cpu_bf16_is_native():
        print(BF16_SKIPPED)


if __name__ == "__main__":
    main()
