"""Pictures people look at: pseudo-mask overlays and panels of per-class attention maps, as PIL images / PNG files.

Only NumPy and Pillow (and torch tensors as input), so scripts and users can call it anywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .metrics import IGNORE_INDEX


def to_display_image(pixels: torch.Tensor, mean, std) -> Image.Image:
    """Undo normalisation for a (C, H, W) tensor; first three bands (or band 0) as an RGB picture."""
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    array = (pixels.float().cpu() * std + mean).clamp(0, 1)
    array = array[:3] if array.shape[0] >= 3 else array[:1].expand(3, -1, -1)
    return Image.fromarray((array.permute(1, 2, 0).numpy() * 255).astype("uint8"))


def palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours: the PASCAL VOC bit-shuffle palette (class 0 black); last row for ignore."""
    colours = np.zeros((max(num_classes, 1) + 1, 3), dtype=np.uint8)
    for label in range(num_classes):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[label] = (r, g, b)
    colours[-1] = (255, 255, 255)
    return colours


def colourise(mask: np.ndarray, num_classes: int) -> Image.Image:
    """An (H, W) label map as an RGB image; 255 (ignore) is white."""
    colours = palette(num_classes)
    index = np.where(mask == IGNORE_INDEX, len(colours) - 1, np.clip(mask, 0, num_classes - 1))
    return Image.fromarray(colours[index])


def heatmap(values: np.ndarray) -> Image.Image:
    """A 2-D map normalised to [0, 1] as a blue-to-yellow RGB image."""
    v = values.astype(np.float32)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    rgb = np.stack([v, v**0.5 * 0.9, 1 - v], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def overlay(image: Image.Image, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """The label map blended over the image (background 0 left unpainted when `num_classes` includes it)."""
    image = image.convert("RGB")
    colour = colourise(mask, num_classes).resize(image.size, Image.NEAREST)
    blended = Image.blend(image, colour, alpha)
    keep = Image.fromarray(((mask == 0) * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    return Image.composite(image, blended, keep)


def draw_segments(image: Image.Image, segments: list[dict], alpha: float = 0.5) -> Image.Image:
    """Overlay an image-segmentation pipeline result (`[{"label", "score", "mask"}]`) on its image, with a legend."""
    image = image.convert("RGB")
    colours = palette(len(segments) + 1)[1:]
    canvas = image.copy()
    for segment, colour in zip(segments, colours):
        solid = Image.new("RGB", image.size, tuple(int(c) for c in colour))
        blended = Image.blend(image, solid, alpha)
        canvas.paste(blended, (0, 0), segment["mask"].convert("L"))
    legend_height = 14 * len(segments)
    out = Image.new("RGB", (image.width, image.height + legend_height), "white")
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (segment, colour) in enumerate(zip(segments, colours)):
        y = image.height + 14 * i
        draw.rectangle([2, y + 2, 12, y + 12], fill=tuple(int(c) for c in colour))
        score = "" if segment.get("score") is None else f" {segment['score']:.2f}"
        draw.text((16, y + 1), f"{segment['label']}{score}", fill="black")
    return out


def _tile(image: Image.Image, title: str, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size + 14), "white")
    tile.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (0, 14))
    ImageDraw.Draw(tile).text((2, 1), title[:24], fill="black")
    return tile


def attention_panel(
    image: Image.Image,
    class_maps: torch.Tensor | np.ndarray,
    class_names: list[str],
    classes: list[int],
    pseudo_mask: np.ndarray | None = None,
    ground_truth: np.ndarray | None = None,
    tile_size: int = 128,
) -> Image.Image:
    """One row: image, the attention map of each class in `classes`, pseudo-mask, ground truth (if given)."""
    maps = class_maps.detach().float().cpu().numpy() if isinstance(class_maps, torch.Tensor) else class_maps
    tiles = [("image", image)] + [(class_names[c], heatmap(maps[c])) for c in classes]
    if pseudo_mask is not None:
        tiles.append(("pseudo-mask", colourise(pseudo_mask, len(class_names))))
    if ground_truth is not None:
        tiles.append(("ground truth", colourise(ground_truth, len(class_names))))
    return titled_row(tiles, tile_size)


def titled_row(tiles: list[tuple[str, Image.Image]], tile_size: int = 128) -> Image.Image:
    """Pictures side by side, each resized to `tile_size` with its title above."""
    rendered = [_tile(image, title, tile_size) for title, image in tiles]
    panel = Image.new("RGB", (sum(t.width for t in rendered), rendered[0].height), "white")
    for i, tile in enumerate(rendered):
        panel.paste(tile, (i * tile.width, 0))
    return panel


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height
    return out


__all__ = [
    "attention_panel",
    "colourise",
    "draw_segments",
    "heatmap",
    "overlay",
    "palette",
    "stack_rows",
    "titled_row",
]
