"""Benchmark helper: measure one variant in a fresh interpreter and report its peak extra memory and time.

Peak memory on CPU is the rise of the resident-set high-water mark (VmHWM) over the resident set just before the
measured call (Linux resets the mark through /proc/self/clear_refs). A fresh process per variant keeps one variant's
freed-but-cached memory from hiding another's peak. The benchmark script re-runs itself with `--child VARIANT`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_measure(state, run, repeats: int) -> None:
    """In the child: first call measured for memory, then `repeats` timed calls; prints one JSON line."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    run(state)
    first = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - start)
    print(
        "RESULT " + json.dumps({"peak_mib": peak, "first_s": first, "median_s": statistics.median(times or [first])})
    )


def measure_in_subprocess(script: str, variant: str, extra_args: list[str]) -> dict:
    """Run `python script --child variant *extra_args` and parse its RESULT line."""
    out = subprocess.run(
        [sys.executable, script, "--child", variant, *extra_args], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{variant} failed:\n{out.stdout}\n{out.stderr}")


def vit_b_config(image_size: int, num_classes: int, **overrides):
    """A ViT-B/16 `ClsMaskConfig` built as the public code builds it (patchify stem, flattened readout), C classes."""
    from modeling_clsmask import ClsMaskConfig

    return ClsMaskConfig(
        image_size=image_size,
        patch_size=16,
        id2label={i: f"class_{i}" for i in range(num_classes)},
        patch_embedding_type="patchify",
        classifier_type="flatten",
        **overrides,
    )


def matmul_rates() -> dict[str, float]:
    """This machine's measured fp32 and bf16 matmul rates (GFLOP/s), printed as the line every benchmark shows."""
    import torch

    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"measured matmul rate: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    return rates


def rate_share(gflop: float, seconds: float, rate: float) -> float:
    """Percentage of the measured matmul `rate` that `gflop` of work done in `seconds` reaches."""
    return 100 * gflop / seconds / rate


def matmul_rate(dtype, size: int = 2048, repeats: int = 3) -> float:
    """This machine's measured matmul rate in GFLOP/s for `dtype` (a square matmul, best of `repeats`)."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def vit_forward_gflop(tokens: int, hidden: int = 768, intermediate: int = 3072, layers: int = 12) -> float:
    """Multiply-add FLOPs (x2) of a ViT encoder forward: projections, MLP and the two attention matmuls."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * tokens * tokens * hidden
    return layers * per_layer / 1e9
