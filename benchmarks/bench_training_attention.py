"""One training step of the `pretrained` preset's model with sdpa and with eager attention, on this CPU.

What `run_pretrain.py --training_attention auto` decides at start-up, measured over the cases that decide it: the
preset's ViT-S/14 shape (random weights, no download) with 11 classes, the backbone frozen, class tokens in the last
block, the image branch's 2 blocks fine-tuned, trained from cached block inputs and frozen patch rows (as the preset
trains), batch 32, at 112 px (65 tokens) and 224 px (257 tokens), fp32 and bf16 autocast (skipped where the CPU
emulates bf16: training then runs fp32). Prints each step's median time, the ratio and which kernel `auto` would
pick.

    python benchmarks/bench_training_attention.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from modeling_clsmask import ClsMaskConfig, ClsMaskForMultiLabelClassification  # noqa: E402
from modeling_clsmask.training.loop import (  # noqa: E402
    ATTENTION_IMPLEMENTATIONS,
    cpu_bf16_is_native,
    time_training_step,
)


NUM_CLASSES = 11
BATCH = 32


def preset_shaped_model(image_size: int) -> ClsMaskForMultiLabelClassification:
    """ViT-S/14 with the preset's trainable parts: class tokens, readout, patch classifier and the image branch."""
    torch.manual_seed(0)
    config = ClsMaskConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=image_size,
        patch_size=14, num_register_tokens=1, class_token_layers=1, hide_class_tokens=True, use_patch_classifier=True,
        image_branch_layers=2, image_branch_logit_weight=0.5, patch_classifier_top_fraction=0.25,
        id2label={i: f"class_{i}" for i in range(NUM_CLASSES)}, label2id={f"class_{i}": i for i in range(NUM_CLASSES)},
    )  # fmt: skip
    model = ClsMaskForMultiLabelClassification(config).train()
    model.clsmask.requires_grad_(False)
    model.clsmask.embeddings.class_tokens.requires_grad_(True)
    model.clsmask.embeddings.class_position_embeddings.requires_grad_(True)
    return model


def preset_batch(model: ClsMaskForMultiLabelClassification, image_size: int) -> tuple[int, dict]:
    """Tokens an image gives and a training batch as the preset trains: random block inputs, their frozen patch
    rows (`frozen_patch_states`) and labels."""
    tokens = (image_size // 14) ** 2 + 1
    inputs = torch.randn(BATCH, tokens, 384)
    labels = (torch.rand(BATCH, NUM_CLASSES) < 0.35).float()
    states = model.clsmask.frozen_patch_states(inputs)
    return tokens, {"block_inputs": inputs, "frozen_patch_states": states, "labels": labels}


BF16_SKIPPED = "bf16 skipped: this CPU has no native bf16 (training falls back to fp32 here)"


def bf16_cases() -> tuple[bool, ...]:
    """Whether each case runs under bf16 autocast: fp32, and bf16 where the CPU has it natively."""
    return (False, True) if cpu_bf16_is_native() else (False,)


def step_time(model, batch: dict, name: str, bf16: bool, repeats: int) -> float:
    """The median of `repeats` training steps of `model(**batch)` with attention `name`, timed by the function
    `--training_attention auto` decides with."""

    def loss_fn(model, batch):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(**batch).loss

    return time_training_step(model, model.config, loss_fn, batch, name, repeats, summary=statistics.median)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per case (after one warm-up).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"One training step from cached block inputs, batch {BATCH}, {NUM_CLASSES} classes, threads {args.threads}")
    print(f"{'input':<8}{'tokens':>7}{'precision':>11}{'sdpa s':>9}{'eager s':>9}{'sdpa / eager':>14}  auto picks")
    for size in (112, 224):
        model = preset_shaped_model(size)
        tokens, batch = preset_batch(model, size)
        for bf16 in bf16_cases():
            seconds = {name: step_time(model, batch, name, bf16, args.repeats) for name in ATTENTION_IMPLEMENTATIONS}
            ratio = seconds["sdpa"] / seconds["eager"]
            print(
                f"{size:<8}{tokens:>7}{'bf16' if bf16 else 'fp32':>11}{seconds['sdpa']:>9.3f}{seconds['eager']:>9.3f}"
                f"{ratio:>13.2f}x  {min(seconds, key=seconds.get)}"
            )
    if not cpu_bf16_is_native():
        print(BF16_SKIPPED)


if __name__ == "__main__":
    main()
