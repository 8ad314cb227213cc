"""One training step: this package (fp32 and bf16 autocast) against a reference written like the public code.

ViT-B/16 at 224 x 224, C = 20 class tokens + 1 [REG], batch 4, token masking r = 0.5, AdamW, CPU.
- reference: eager attention with every layer's attention recorded (`output_attentions=True`, as the public code's
  training forward does), class-specific token masking in a per-sample, per-class Python loop, fp32;
- clsmask fp32: the model's own forward (sdpa, vectorised masking, no attention kept);
- clsmask bf16: the same under `torch.autocast("cpu", dtype=torch.bfloat16)`, which is what Accelerate's
  `--mixed_precision bf16` does on CPU.

    python benchmarks/bench_train_step.py [--threads 2] [--repeats 3]

Target: >= 1.5x the reference's steps per second; also prints the share of this machine's measured matmul rate
(same run) that each step reaches (a step is about 3 forwards of work).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _measure import matmul_rates, rate_share, vit_b_config, vit_forward_gflop  # noqa: E402

from modeling_clsmask import ClsMaskForMultiLabelClassification  # noqa: E402


NUM_CLASSES = 20
SIZE = 224
BATCH = 4


def build() -> ClsMaskForMultiLabelClassification:
    torch.manual_seed(0)
    config = vit_b_config(SIZE, NUM_CLASSES, token_mask_rate=0.5, weight_init="normal")
    return ClsMaskForMultiLabelClassification(config).train()


def reference_loss(model, pixels, labels):
    model.set_attn_implementation("eager")
    out = model.clsmask(pixels, output_attentions=True)
    class_states = out.last_hidden_state[:, :NUM_CLASSES].clone()
    for sample in range(labels.shape[0]):  # the public code's per-sample, per-class masking loop
        for label in range(NUM_CLASSES):
            if labels[sample, label] == 0 and torch.rand(()) < model.config.token_mask_rate:
                class_states[sample, label] = 0
    logits = model.classifier(class_states.flatten(1))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def clsmask_loss(model, pixels, labels, dtype=None):
    model.set_attn_implementation("sdpa")
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(pixels, labels=labels).loss


def time_steps(loss_fn, repeats: int) -> float:
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(BATCH, 3, SIZE, SIZE)
    labels = (torch.rand(BATCH, NUM_CLASSES) < 0.15).float()
    times = []
    for step in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        loss = loss_fn(model, pixels, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per variant (after one warm-up).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings = {
        "reference": time_steps(reference_loss, args.repeats),
        "fp32": time_steps(clsmask_loss, args.repeats),
        "bf16": time_steps(lambda m, p, y: clsmask_loss(m, p, y, torch.bfloat16), args.repeats),
    }
    gflop = 3 * BATCH * vit_forward_gflop(NUM_CLASSES + 1 + (SIZE // 16) ** 2)
    print(f"ViT-B/16, {SIZE}x{SIZE}, C={NUM_CLASSES}, batch {BATCH}, one AdamW step, CPU threads={args.threads}")
    rates = matmul_rates()
    rates["reference"] = rates["fp32"]
    print(f"{'variant':<58}{'median s':>10}{'% of matmul rate':>18}")
    names = {
        "reference": "reference (eager, attentions kept, Python masking loop)",
        "fp32": "clsmask fp32",
        "bf16": "clsmask bf16 autocast",
    }
    for key, name in names.items():
        print(f"{name:<58}{timings[key]:>10.3f}{rate_share(gflop, timings[key], rates[key]):>17.0f}%")
    for key in ("fp32", "bf16"):
        print(f"speed ratio (reference / clsmask {key}): {timings['reference'] / timings[key]:.2f}x  (target >= 1.5x)")


if __name__ == "__main__":
    main()
