"""The built-in default dataset: procedurally generated, seeded, multi-label shape images with masks.

Classes are defined by shape only (disk, square, triangle, cross, ring): every object and the background get random
colours and noise textures, the background is cluttered with thin random strokes, an image holds 1 to 3 objects that
may occlude one another, so that a model must find the shape to name the class. Each image comes with its
image-level labels and a pixel mask (0 = background, k = label k, the object drawn last wins where objects overlap).

Generation is vectorised per image with NumPy (no per-pixel loops) and deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np


CLASS_NAMES = ["background", "disk", "square", "triangle", "cross", "ring"]
DEFAULT_SPLITS = {"train": 6000, "validation": 300, "test": 300}
DEFAULT_IMAGE_SIZE = 64
# Rotation range per shape (radians): small, so that each class keeps a local signature a patch can see
# (axis-aligned edges for square and cross, slanted edges for the triangle, curved edges for disk and ring).
MAX_ROTATION = {"disk": 0.0, "square": 0.2, "triangle": 0.2, "cross": 0.2, "ring": 0.0}


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of one shape of radius ~r centred at (cy, cx), rotated by `angle` (radians)."""
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == "disk":
        return u**2 + v**2 <= r**2
    if kind == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "cross":
        w = r * 0.33
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if kind == "triangle":
        # Equilateral triangle with circumradius r: inside the three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = angle + 2 * np.pi * k / 3 + np.pi / 2
            nx, ny = np.cos(theta), np.sin(theta)
            inside &= (dx * nx + dy * ny) <= r * 0.5
        return inside
    raise ValueError(f"unknown shape {kind!r}")


def _texture(rng: np.random.Generator, size: int, base: np.ndarray, strength: float) -> np.ndarray:
    """A colour with smooth low-frequency noise, (size, size, 3) float in [0, 1]."""
    coarse = rng.normal(0, strength, (size // 8 + 2, size // 8 + 2, 3))
    offset = rng.integers(0, 8, 2)
    noise = np.kron(coarse, np.ones((8, 8, 1)))[offset[0] : offset[0] + size, offset[1] : offset[1] + size]
    fine = rng.normal(0, strength / 2, (size, size, 3))
    return np.clip(base[None, None, :] + noise + fine, 0, 1)


def render_example(
    seed: int,
    size: int = DEFAULT_IMAGE_SIZE,
    clutter: tuple[int, int] = (1, 4),
    radius: tuple[float, float] = (0.16, 0.28),
    max_objects: int = 3,
    noise: float = 0.04,
    bright_objects: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One (image uint8 HxWx3, mask uint8 HxW, sorted label ids) example, fully determined by `seed`.

    `clutter`: range of the number of background strokes; `radius`: object radius as a fraction of the image size.
    `bright_objects`: random hues, but objects lighter than the background and strokes (a luminance cue); without
    it, object and background colours are fully random, which a small from-scratch ViT barely learns on a CPU.
    """
    background_range, object_range = ((0.0, 0.45), (0.55, 1.0)) if bright_objects else ((0.15, 0.85), (0.0, 1.0))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _texture(rng, size, rng.uniform(*background_range, 3), noise)
    # Clutter: thin random line segments in random colours.
    for _ in range(rng.integers(*clutter) if clutter[1] > clutter[0] else clutter[0]):
        y0, x0, y1, x1 = rng.uniform(0, size, 4)
        length = max(np.hypot(y1 - y0, x1 - x0), 1e-3)
        dist = np.abs((x1 - x0) * (y0 - yy) - (x0 - xx) * (y1 - y0)) / length
        t = ((yy - y0) * (y1 - y0) + (xx - x0) * (x1 - x0)) / length**2
        stroke = (dist <= rng.uniform(0.5, 1.2)) & (t >= 0) & (t <= 1)
        image[stroke] = rng.uniform(*background_range, 3) if bright_objects else rng.uniform(0, 1, 3)
    mask = np.zeros((size, size), dtype=np.uint8)
    num_objects = int(rng.integers(1, max_objects + 1))
    kinds = rng.choice(np.arange(1, len(CLASS_NAMES)), size=num_objects, replace=True)
    for kind in kinds:
        r = rng.uniform(*radius) * size
        cy, cx = rng.uniform(r, size - r, 2)
        name = CLASS_NAMES[kind]
        shape = _shape_mask(name, yy, xx, cy, cx, r, rng.uniform(-MAX_ROTATION[name], MAX_ROTATION[name]))
        colour = rng.uniform(*object_range, 3)
        # Keep the object visible against the local background.
        while np.abs(colour - image[shape].mean(0)).sum() < 0.6:
            colour = rng.uniform(*object_range, 3)
        image[shape] = _texture(rng, size, colour, noise)[shape]
        mask[shape] = kind
    labels = sorted(int(k) for k in np.unique(mask) if k != 0)  # a fully occluded object is not a label
    return (image * 255).round().astype(np.uint8), mask, labels


GLYPH_CLASS_NAMES = ["background", "star", "crescent", "chevron", "ellipse", "frame"]


def _glyph_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of one glyph of radius ~r centred at (cy, cx), rotated by `angle` (any angle)."""
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == "star":  # five points: radius oscillates between 0.45 r and r with the polar angle
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        edge = r * (0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 2)
        return rho <= edge
    if kind == "crescent":
        return (u**2 + v**2 <= r**2) & ((u - 0.45 * r) ** 2 + v**2 > (0.8 * r) ** 2)
    if kind == "chevron":  # a thick V
        arm = np.abs(v) * 0.9 - u
        return (np.abs(arm) <= 0.28 * r) & (np.abs(v) <= r) & (u <= 0.5 * r)
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 <= 1
    if kind == "frame":  # a square outline
        s = 0.85 * r
        outer = (np.abs(u) <= s) & (np.abs(v) <= s)
        return outer & ~((np.abs(u) <= 0.55 * s) & (np.abs(v) <= 0.55 * s))
    raise ValueError(f"unknown glyph {kind!r}")


def render_glyphs_example(
    seed: int, size: int = DEFAULT_IMAGE_SIZE, max_objects: int = 4, radius: tuple[float, float] = (0.13, 0.24)
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A second generator, unlike the built-in one: other shapes (`GLYPH_CLASS_NAMES`), any rotation, smaller
    objects, 1 to 4 per image, fully random colours (no brightness cue), a two-colour gradient background with
    blotches instead of strokes. Returns (image uint8 HxWx3, mask uint8 HxW, sorted label ids)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(direction) * xx + np.sin(direction) * yy) / size + 1) / 2
    image = start + (end - start) * np.clip(ramp, 0, 1)[..., None]
    image = np.clip(image + _texture(rng, size, np.zeros(3), 0.05) - 0.0, 0, 1)
    for _ in range(rng.integers(1, 4)):  # soft blotches of random colour
        by, bx, br = *rng.uniform(0, size, 2), rng.uniform(0.1, 0.3) * size
        weight = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * br**2))[..., None] * rng.uniform(0.3, 0.8)
        image = image * (1 - weight) + rng.uniform(0, 1, 3) * weight
    mask = np.zeros((size, size), dtype=np.uint8)
    kinds = rng.choice(np.arange(1, len(GLYPH_CLASS_NAMES)), size=int(rng.integers(1, max_objects + 1)))
    for kind in kinds:
        r = rng.uniform(*radius) * size
        cy, cx = rng.uniform(r, size - r, 2)
        shape = _glyph_mask(GLYPH_CLASS_NAMES[kind], yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        if not shape.any():
            continue
        colour = rng.uniform(0, 1, 3)
        while np.abs(colour - image[shape].mean(0)).sum() < 0.6:
            colour = rng.uniform(0, 1, 3)
        image[shape] = _texture(rng, size, colour, 0.04)[shape]
        mask[shape] = kind
    labels = sorted(int(k) for k in np.unique(mask) if k != 0)
    return (image * 255).round().astype(np.uint8), mask, labels


# name -> (class names, renderer(seed, size)); "shapes" is the built-in default.
GENERATORS = {
    "shapes": (CLASS_NAMES, lambda seed, size: render_example(seed, size)),
    "shapes-random-colour": (CLASS_NAMES, lambda seed, size: render_example(seed, size, bright_objects=False)),
    "glyphs": (GLYPH_CLASS_NAMES, render_glyphs_example),
}


def build_synthetic_dataset(
    splits: dict[str, int] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    num_proc: int | None = None,
    generator: str = "shapes-random-colour",
):
    """A generated dataset as a `datasets.DatasetDict` with columns image (Image), labels (list of ClassLabel),
    mask (Image, 0 = background). Splits use disjoint seeds, so the same arguments give the same data everywhere.

    `generator`: "shapes-random-colour" (the built-in default: five shapes in fully random colours), "shapes" (the same
    shapes, lighter than their background: a brightness cue) or "glyphs" (a second generator: other shapes, sizes,
    counts and backgrounds).
    """
    import datasets

    if generator not in GENERATORS:
        raise ValueError(f"Unknown synthetic generator {generator!r}; choose from {sorted(GENERATORS)}.")
    class_names, render = GENERATORS[generator]
    splits = splits or DEFAULT_SPLITS
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "labels": datasets.List(datasets.ClassLabel(names=class_names)),
            "mask": datasets.Image(),
        }
    )

    def generate(first: int, count: int):
        from PIL import Image

        for index in range(first, first + count):
            image, mask, labels = render(seed * 10_000_019 + index, image_size)
            yield {"image": Image.fromarray(image), "labels": labels, "mask": Image.fromarray(mask, mode="L")}

    result = {}
    offset = 0
    for name, count in splits.items():
        result[name] = datasets.Dataset.from_generator(
            generate,
            gen_kwargs={"first": offset, "count": count},
            features=features,
            keep_in_memory=True,
            split=datasets.NamedSplit(name),
        )
        offset += count
    return datasets.DatasetDict(result)


__all__ = [
    "CLASS_NAMES",
    "GENERATORS",
    "GLYPH_CLASS_NAMES",
    "build_synthetic_dataset",
    "render_example",
    "render_glyphs_example",
]
