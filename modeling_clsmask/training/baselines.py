"""What a frozen pretrained backbone gives without the method: the figures every real-data result is printed beside.

- label-only: every pixel takes the image's first label (no localisation at all);
- CAM: a multi-label logistic head on the mean of the frozen patch tokens, applied to every patch token; per image
  the CAMs of its labels are min-max normalised, upsampled (bilinear) and the argmax is taken (Zhou et al., 2016);
  where the masks hold background, pixels whose best score is under the model's background threshold are background
  (the usual CAM protocol), so CAM is held to the same rule as the model;
- linear probe: a per-patch linear classifier trained on the training masks (majority label per patch), a ceiling
  for frozen features that uses pixel labels, argmax over all classes.

The frozen features are read through `ClsMaskModel.from_pretrained_backbone` with one class token and the source's
own extra tokens, which reproduces the source's final normalised patch tokens exactly (tests/test_backbones.py),
so every supported family works the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import read_backbone
from ..modeling_clsmask import ClsMaskModel
from ..pseudo_masks import normalize_maps
from .data import IGNORE_INDEX
from .metrics import average_precision, confusion_matrices, iou_from_confusion


# Background thresholds tried for CAM's best-threshold figure (where the masks hold background).
CAM_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def frozen_backbone(path: str, image_size) -> ClsMaskModel:
    """The backbone at `image_size`, as the source computes it (one class token, the source's extra tokens)."""
    extra = read_backbone(path).extra_tokens
    registers = 0 if extra is None else extra.shape[1]
    return ClsMaskModel.from_pretrained_backbone(
        path, id2label={0: "cls"}, image_size=image_size, num_register_tokens=registers
    ).eval()


@torch.no_grad()
def patch_features(backbone: ClsMaskModel, loader, mixed_precision: bool = True, desc: str = "features"):
    """(N, h, w, D) frozen patch tokens, (N, C) labels and (N, H, W) masks (or None) of every batch of `loader`."""
    features, labels, masks = [], [], []
    patch = backbone.config.patch_size
    for batch in tqdm(loader, desc=desc, leave=False):
        pixels = batch["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision):
            states = backbone(pixels).last_hidden_state
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        tokens = states[:, 1 : 1 + grid[0] * grid[1]].float()
        features.append(tokens.reshape(-1, *grid, tokens.shape[-1]))
        labels.append(batch["labels"].float())
        if "mask" in batch:
            masks.append(batch["mask"])
    return torch.cat(features), torch.cat(labels), (torch.cat(masks) if masks else None)


def fit_linear(inputs: torch.Tensor, targets: torch.Tensor, loss: str, steps: int = 300, lr: float = 0.05):
    """A linear layer fitted full-batch with Adam (weight decay 1e-4): `bce` for multi-hot targets, `ce` for ids
    (IGNORE_INDEX ignored). Inputs are standardised; the returned layer takes raw inputs."""
    mean, std = inputs.mean(0), inputs.std(0).clamp_min(1e-6)
    x = (inputs - mean) / std
    num_out = targets.shape[1] if loss == "bce" else int(targets[targets != IGNORE_INDEX].max()) + 1
    layer = torch.nn.Linear(x.shape[1], num_out)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        logits = layer(x)
        if loss == "bce":
            value = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            value = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():  # fold the standardisation into the layer
        weight = layer.weight / std
        bias = layer.bias - (weight * mean).sum(1)
        folded = torch.nn.Linear(x.shape[1], num_out)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


def patch_majority_labels(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(N, h, w) majority label of the pixels under each patch (IGNORE_INDEX where all are void)."""
    valid = masks != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, masks, 0), num_classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * valid[:, None]
    counts = F.adaptive_avg_pool2d(one_hot, grid)
    labels = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, labels, torch.full_like(labels, IGNORE_INDEX))


@torch.no_grad()
def score(
    maps: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    allowed: torch.Tensor | None,
    background: tuple[int, float] | None = None,
) -> float:
    """mIoU of the argmax of (N, C, h, w) maps upsampled to the masks, over `allowed` (N, C) classes if given;
    `background` (id, threshold): pixels whose best score is under the threshold take the background id."""
    confusion = 0
    for start in range(0, maps.shape[0], 64):
        chunk = F.interpolate(maps[start : start + 64], size=masks.shape[-2:], mode="bilinear", align_corners=False)
        if allowed is not None:
            chunk = torch.where(allowed[start : start + 64, :, None, None].bool(), chunk, torch.full_like(chunk, -1e9))
        best, predicted = chunk.max(1)
        if background is not None:
            predicted = torch.where(best < background[1], torch.full_like(predicted, background[0]), predicted)
        confusion = confusion + confusion_matrices(predicted, masks[start : start + 64], num_classes).sum(0)
    return iou_from_confusion(confusion)["mean_iou"]


def frozen_baselines(
    path: str,
    image_size,
    train_loader,
    eval_loaders: dict,
    num_classes: int,
    foreground: list[int] | None = None,
    background: tuple[int, float] | None = None,
    bf16: bool = True,
) -> dict[str, dict]:
    """Label-only, frozen-backbone CAM and fully supervised linear-probe figures for each of `eval_loaders`
    ({name: loader}; see module doc), with one backbone and one pair of heads fitted on `train_loader`.

    `foreground`: the class ids CAM and label-only may paint (all classes when None); `background` (id, threshold):
    CAM paints that id where its best normalised score is under the threshold (None: never), and is also scored at
    the best of `CAM_THRESHOLDS` on each split (`frozen_cam_tuned_*`). `bf16`: features under bf16 autocast."""
    backbone = frozen_backbone(path, image_size)
    train_x, train_y, train_m = patch_features(backbone, train_loader, bf16, "baseline features (train)")
    foreground = list(range(num_classes)) if foreground is None else foreground
    keep = torch.zeros(num_classes, dtype=torch.bool)
    keep[foreground] = True
    head = fit_linear(train_x.mean((1, 2)), train_y, "bce")
    probe = None
    if train_m is not None:
        targets = patch_majority_labels(train_m, tuple(train_x.shape[1:3]), num_classes).flatten()
        probe = fit_linear(train_x.flatten(0, 2), targets, "ce")
    results = {}
    for name, loader in eval_loaders.items():
        eval_x, eval_y, eval_m = patch_features(backbone, loader, bf16, f"baseline features ({name})")
        with torch.no_grad():
            image_probs = head(eval_x.mean((1, 2))).sigmoid()
            cams = head(eval_x).permute(0, 3, 1, 2)
        figures = {"frozen_cam_mAP": average_precision(image_probs[:, keep], eval_y[:, keep]).nanmean().item()}
        results[name] = figures
        if eval_m is None:
            continue
        allowed = eval_y.bool() & keep
        cams = normalize_maps(cams)
        figures["frozen_cam_mean_iou"] = score(cams, eval_m, num_classes, allowed, background)
        if background is not None:
            # CAM at its own best threshold on this split: optimistic for CAM, so a win over it is not a threshold's.
            tuned = {t: score(cams, eval_m, num_classes, allowed, (background[0], t)) for t in CAM_THRESHOLDS}
            best = max(tuned, key=tuned.get)
            figures.update(frozen_cam_tuned_mean_iou=tuned[best], frozen_cam_tuned_threshold=best)
        first = allowed.float().argmax(1)
        label_only = F.one_hot(first, num_classes).float()[:, :, None, None].expand(-1, -1, *eval_m.shape[-2:])
        figures["label_only_mean_iou"] = score(label_only, eval_m, num_classes, None)
        if probe is not None:
            with torch.no_grad():
                logits = probe(eval_x).permute(0, 3, 1, 2)
            if logits.shape[1] < num_classes:
                logits = F.pad(logits, (0, 0, 0, 0, 0, num_classes - logits.shape[1]), value=-1e9)
            figures["linear_probe_mean_iou"] = score(logits, eval_m, num_classes, None)
    return results


__all__ = ["frozen_baselines", "patch_features", "frozen_backbone", "fit_linear"]
