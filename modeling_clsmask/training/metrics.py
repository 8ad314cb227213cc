"""Metrics computed from tensors, offline (no `evaluate.load`): mIoU from confusion matrices, mAP, F1, and the
class-assignment accuracy of attention maps. Per-sample pieces are returned so they can be gathered across
processes with `Accelerator.gather_for_metrics` before being summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pseudo_masks import IGNORE_INDEX, normalize_maps


def confusion_matrices(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K, K) per-sample confusion matrices, rows = ground truth, columns = prediction; 255 ignored."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape.")
    batch = predictions.shape[0]
    valid = targets != IGNORE_INDEX
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if bad.any():
        raise ValueError(
            f"Target value(s) {targets[bad].unique().tolist()} outside 0..{num_classes - 1} (255 = ignore)."
        )
    sample = torch.arange(batch, device=targets.device).view(batch, *([1] * (targets.dim() - 1))).expand_as(targets)
    index = (sample * num_classes + targets.clamp(0, num_classes - 1)) * num_classes + predictions.clamp(
        0, num_classes - 1
    )
    counts = torch.bincount(index[valid], minlength=batch * num_classes * num_classes)
    return counts.view(batch, num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> dict:
    """Per-class IoU and their mean over classes that occur (in ground truth or prediction)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    return {
        "mean_iou": float(iou[valid].mean()) if valid.any() else float("nan"),
        "per_class_iou": [None if torch.isnan(v) else float(v) for v in iou],
        "pixel_accuracy": float(tp.sum() / confusion.sum().clamp_min(1)),
    }


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(C,) average precision per class (NaN for classes without positives), vectorised over classes."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).float()
    cum_hits = hits.cumsum(0)
    ranks = torch.arange(1, scores.shape[0] + 1, device=scores.device, dtype=torch.float32).unsqueeze(1)
    positives = hits.sum(0)
    ap = (cum_hits / ranks * hits).sum(0) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def classification_metrics(
    probs: torch.Tensor,
    targets: torch.Tensor,
    classes: list[int],
    threshold: float = 0.5,
    class_names: list[str] | None = None,
) -> dict:
    """mAP (macro over `classes` with positives) and micro / macro F1 at `threshold`; with `class_names` (indexed by
    class id) also `per_class_AP` ({name: AP, None without positives}), so a low mAP can be traced to its classes."""
    probs, targets = probs[:, classes].float(), targets[:, classes].float()
    ap = average_precision(probs, targets)
    per_class = {}
    if class_names is not None:
        per_class["per_class_AP"] = {
            class_names[c]: None if torch.isnan(value) else float(value) for c, value in zip(classes, ap)
        }
    predicted = (probs >= threshold).float()
    tp = (predicted * targets).sum(0)
    fp = (predicted * (1 - targets)).sum(0)
    fn = ((1 - predicted) * targets).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1)
    return {
        "mAP": float(ap[~torch.isnan(ap)].mean()) if (~torch.isnan(ap)).any() else float("nan"),
        "f1_micro": float(micro),
        "f1_macro": float(f1.mean()),
        "exact_match": float((predicted == targets).all(1).float().mean()),
        **per_class,
    }


def class_assignment_counts(
    class_maps: torch.Tensor, masks: torch.Tensor, present: torch.Tensor, foreground: list[int]
) -> torch.Tensor:
    """(B, 3) float per image: [present classes whose own map overlaps their true region most, present classes
    counted, expected correct by chance].

    For each present class k, the map of every present class c (normalised to [0, 1] at mask resolution) is averaged
    over the pixels of k's true region; k counts as correct when its own map has the highest average there. Only
    images with at least two visible present classes count (with one, the answer is trivially right). Chance is not
    0.5: a region in an image with n visible classes is right by chance with probability 1/n, so the third column
    sums 1/n over the counted regions (summed over a split and divided by the count, it is that split's chance level).
    """
    maps = F.interpolate(class_maps.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    maps = normalize_maps(maps)[:, foreground]
    regions = torch.stack([(masks == k) for k in foreground], dim=1).float()  # (B, F, H, W)
    area = regions.flatten(2).sum(-1)  # (B, F)
    inside = torch.einsum("bchw,bkhw->bck", maps, regions) / area.clamp_min(1).unsqueeze(1)  # map c over region k
    visible = present[:, foreground].bool() & (area > 0)  # (B, F)
    inside = inside.masked_fill(~visible.unsqueeze(2), -1.0)  # only present classes' maps compete
    own_best = inside.argmax(dim=1) == torch.arange(len(foreground), device=maps.device)
    num_visible = visible.sum(1, keepdim=True)
    counted = visible & (num_visible >= 2)
    chance = (counted.float() / num_visible.clamp_min(1)).sum(1)
    return torch.stack([(own_best & counted).sum(1).float(), counted.sum(1).float(), chance], dim=1)


def class_assignment_summary(counts: torch.Tensor) -> dict:
    """Accuracy, chance level and margin above chance from summed `class_assignment_counts` rows."""
    correct, counted, chance = (float(v) for v in counts.reshape(-1, 3).sum(0))
    if counted == 0:
        nan = float("nan")
        return {"class_assignment_accuracy": nan, "class_assignment_chance": nan, "class_assignment_margin": nan}
    accuracy, chance = correct / counted, chance / counted
    return {
        "class_assignment_accuracy": accuracy,
        "class_assignment_chance": chance,
        "class_assignment_margin": accuracy - chance,
        "class_assignment_regions": int(counted),
    }


__all__ = [
    "IGNORE_INDEX",
    "average_precision",
    "class_assignment_counts",
    "class_assignment_summary",
    "classification_metrics",
    "confusion_matrices",
    "iou_from_confusion",
]
