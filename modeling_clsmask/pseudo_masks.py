"""Pseudo-masks from class-token attention maps, as batched torch code.

Steps (paper, Sec. 3): upsample each class map bilinearly to the image, keep the pixels at or above that map's
mean, paint classes in ascending order of score (the most confident class wins where maps overlap), and give
every pixel no class claimed the class of the nearest claimed pixel (exact Euclidean distance). Optionally,
pixels whose best normalised class score is below `background_threshold` become background.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F


IGNORE_INDEX = 255
"""The label of pixels a loss skips (void in the datasets, uncertain in pseudo-masks with `ignore_margin`)."""

AUTO = "auto"
"""The one spelling, in Python and on every command line, of "this option's configured default" for optional
thresholds (`background_threshold`): `"auto"` takes the default, `None` (`none` on a command line) switches the
option off, a number in [0, 1] sets it."""


def resolve_threshold(value, default: float | None, name: str = "background_threshold") -> float | None:
    """`AUTO` -> `default`; `None` -> `None`; a number in [0, 1] -> that float; anything else -> a ValueError naming
    the argument (a threshold of 1.5 or nan would paint everything or nothing without a word)."""
    if isinstance(value, str) and value.lower() == AUTO:
        return default
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be {AUTO!r}, None or a number in [0, 1]; got {value!r}.")
    return float(value)


# How class maps become a label map: see `masks_from_class_maps`.
MASK_ASSEMBLIES = ("threshold", "argmax")

# Elements of the (rows, width, width) distance block computed at once by the nearest fill (about 64 MB).
_FILL_BLOCK_ELEMENTS = 1 << 24
# Longest side at which masks are thresholded, painted and filled; larger outputs are resized from it (nearest).
# The maps come from a patch grid (8 x 8 for the built-in model), so a 4000 px mask holds no more information than a
# 512 px one, while the fill's cost grows with rows x width^2.
MAX_WORKING_SIZE = 512


def working_size(output_size: tuple[int, int], max_working_size: int | None = MAX_WORKING_SIZE) -> tuple[int, int]:
    """The size masks are made at: `output_size`, or scaled down (aspect kept) so its longer side is
    `max_working_size`."""
    height, width = int(output_size[0]), int(output_size[1])
    if max_working_size is None or max(height, width) <= max_working_size:
        return height, width
    scale = max_working_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def nearest_resize(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) label maps to (..., H, W) by nearest neighbour on pixel centres, by gathering rows and columns: the
    result keeps the input's dtype and no float copy of the large map is ever made."""
    height, width = labels.shape[-2:]
    rows = ((torch.arange(size[0], device=labels.device) + 0.5) * (height / size[0])).long().clamp_max(height - 1)
    cols = ((torch.arange(size[1], device=labels.device) + 0.5) * (width / size[1])).long().clamp_max(width - 1)
    return labels.index_select(-2, rows).index_select(-1, cols)


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each (..., H, W) map to [0, 1] so maps of different classes are comparable."""
    flat = maps.flatten(-2)
    low = flat.amin(-1, keepdim=True)
    high = flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def nearest_fill(labels: torch.Tensor, assigned: torch.Tensor) -> torch.Tensor:
    """Give every unassigned pixel the label of its nearest assigned pixel (exact Euclidean distance).

    Separable exact distance transform: a column pass finds, for every pixel, the nearest assigned row in its
    column; a row pass then minimises (dj)^2 + (column distance)^2 over the row, only for rows that hold an
    unassigned pixel. Ties go to the lowest row, then the lowest column. Images without any assigned pixel are
    returned unchanged.

    Args:
        labels: (B, H, W) integer labels, meaningful where `assigned`.
        assigned: (B, H, W) bool.
    """
    if labels.shape != assigned.shape or labels.dim() != 3:
        raise ValueError(
            f"labels and assigned must both be (B, H, W); got {tuple(labels.shape)}, {tuple(assigned.shape)}."
        )
    if bool(assigned.all()):
        return labels
    batch, height, width = labels.shape
    device = labels.device
    rows = torch.arange(height, device=device).view(1, height, 1).expand(batch, height, width)
    big = height + width + 1
    # Column pass: nearest assigned row above (cummax) and below (reverse cummin).
    above = torch.where(assigned, rows, torch.full_like(rows, -big)).cummax(dim=1).values
    below = torch.where(assigned, rows, torch.full_like(rows, 2 * big)).flip(1).cummin(dim=1).values.flip(1)
    take_above = (rows - above) <= (below - rows)
    source_row = torch.where(take_above, above, below)
    column_dist = (source_row - rows).abs()
    has_source = column_dist < big
    column_dist2 = torch.where(
        has_source, column_dist.float() ** 2, torch.full_like(column_dist, 0).float() + float("inf")
    )

    out = labels.clone()
    todo = (~assigned).any(dim=2) & assigned.flatten(1).any(dim=1, keepdim=True)  # (B, H) rows to fill
    row_index = todo.flatten().nonzero().squeeze(1)
    if row_index.numel() == 0:
        return out
    flat_dist2 = column_dist2.view(batch * height, width)
    flat_source_row = source_row.view(batch * height, width)
    flat_labels = labels.view(batch, height * width)
    flat_out = out.view(batch * height, width)
    flat_assigned = assigned.view(batch * height, width)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    dj2 = (cols.view(width, 1) - cols.view(1, width)) ** 2  # (j, j')
    chunk = max(1, _FILL_BLOCK_ELEMENTS // (width * width))
    for start in range(0, row_index.numel(), chunk):
        idx = row_index[start : start + chunk]
        total = dj2.unsqueeze(0) + flat_dist2[idx].unsqueeze(1)  # (rows, j, j')
        best_col = total.argmin(dim=2)  # (rows, j)
        src_row = flat_source_row[idx].gather(1, best_col)
        image = idx // height
        filled = flat_labels[image.unsqueeze(1), src_row * width + best_col]
        flat_out[idx] = torch.where(flat_assigned[idx], flat_out[idx], filled)
    return out


def masks_from_class_maps(
    class_maps: torch.Tensor,
    class_scores: torch.Tensor,
    present: torch.Tensor,
    output_size: tuple[int, int],
    background_threshold: float | None = None,
    background_label_id: int = 0,
    max_working_size: int | None = MAX_WORKING_SIZE,
    assembly: str = "threshold",
    ignore_margin: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Turn per-class attention maps into label maps, batched.

    Args:
        class_maps: (B, C, h, w) non-negative class-to-patch attention (any scale).
        class_scores: (B, C) class probabilities; they order the painting (the most confident class wins).
        present: (B, C) bool, the classes that may appear (predicted, or the given image labels).
        output_size: (H, W) of the masks.
        background_threshold: `None`: every pixel gets a present class. A float: pixels whose best normalised
            score over the present classes is below it get `background_label_id`, whose own map is never painted.
        background_label_id: the background label when `background_threshold` is set.
        max_working_size: when the longer side of `output_size` exceeds it, the masks are made at that longer side
            (aspect kept) and resized to `output_size` with nearest neighbours (`nearest_resize`), so a large photo
            costs about what a 512 px one does. `None`: always work at `output_size`.
        assembly: `"threshold"` (the paper): each class claims the pixels at or above its map's mean, the most
            confident claimant wins, unclaimed pixels take the nearest claimed class. `"argmax"`: each pixel takes the
            present class whose normalised map is highest there (as CAMs are read); diffuse maps, whose above-mean
            halves overlap, keep more of their shape this way.
        ignore_margin: `None`: every pixel is labelled. A float: pixels where the best normalised score beats the
            second best by less than it get `ignore_index` (a segmentation loss then skips them). With background,
            the background's score is `background_threshold`; a pixel with a single candidate is always kept.
        ignore_index: the label of those pixels.

    Returns:
        (B, H, W) int64 label maps. Without background, an image with no present class takes its most probable
        class everywhere; with background, it is all background.
    """
    if class_maps.dim() != 4:
        raise ValueError(f"class_maps must be (B, C, h, w), got shape {tuple(class_maps.shape)}.")
    batch, num_classes = class_maps.shape[:2]
    if class_scores.shape != (batch, num_classes) or present.shape != (batch, num_classes):
        raise ValueError(
            f"class_scores and present must be (B, C) = {(batch, num_classes)}, got "
            f"{tuple(class_scores.shape)} and {tuple(present.shape)}."
        )
    present = present.bool().clone()
    use_background = background_threshold is not None
    if use_background:
        present[:, background_label_id] = False
    else:
        # Every pixel needs a class: an image with no present class keeps its most probable one.
        none = ~present.any(dim=1)
        if none.any():
            present[none, class_scores[none].argmax(dim=1)] = True

    output_size = (int(output_size[0]), int(output_size[1]))
    size = working_size(output_size, max_working_size)
    maps = F.interpolate(class_maps.float(), size=size, mode="bilinear", align_corners=False)
    maps = normalize_maps(maps)
    if assembly == "argmax":
        labels = torch.where(present[..., None, None], maps, torch.full_like(maps, -1.0)).argmax(dim=1)
    elif assembly == "threshold":
        above = (maps >= maps.flatten(2).mean(-1)[..., None, None]) & present[..., None, None]
        # Painting in ascending score order == every pixel takes the highest-scoring class that claims it.
        claim = torch.where(above, class_scores.float()[..., None, None], torch.full_like(maps, -float("inf")))
        labels = claim.argmax(dim=1)
        assigned = above.any(dim=1)
        labels = nearest_fill(labels, assigned)
    else:
        raise ValueError(f"assembly must be one of {MASK_ASSEMBLIES}, got {assembly!r}.")
    if use_background:
        best = torch.where(present[..., None, None], maps, torch.zeros_like(maps)).amax(dim=1)
        labels = torch.where(
            (best < background_threshold) | ~present.any(dim=1)[:, None, None],
            torch.full_like(labels, background_label_id),
            labels,
        )
    if ignore_margin is not None:
        margin = decision_margin(maps, present, background_threshold)
        labels = torch.where(margin < ignore_margin, torch.full_like(labels, ignore_index), labels)
    return labels if size == output_size else nearest_resize(labels, output_size)


def decision_margin(maps: torch.Tensor, present: torch.Tensor, background_threshold: float | None) -> torch.Tensor:
    """(B, H, W) gap between the best and the second-best candidate score per pixel: the present classes' normalised
    maps and, with a threshold, background at the threshold's score; infinite where there is one candidate."""
    scores = torch.where(present[..., None, None], maps, torch.full_like(maps, -float("inf")))
    if background_threshold is not None:
        scores = torch.cat([scores, torch.full_like(scores[:, :1], float(background_threshold))], dim=1)
    if scores.shape[1] < 2:
        return torch.full_like(scores[:, 0], float("inf"))
    top = scores.topk(2, dim=1).values
    return torch.where(top[:, 1].isinf(), torch.full_like(top[:, 0], float("inf")), top[:, 0] - top[:, 1])


__all__ = [
    "AUTO",
    "IGNORE_INDEX",
    "MASK_ASSEMBLIES",
    "decision_margin",
    "masks_from_class_maps",
    "nearest_fill",
    "nearest_resize",
    "normalize_maps",
    "resolve_threshold",
]
