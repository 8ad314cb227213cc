"""Datasets for training and evaluation: the built-in shapes, anything `load_dataset` reads, and VOC-style trees.

Every source is normalised to a `datasets.DatasetDict` whose examples give an image (PIL image or array with any band
count), image-level labels (list of ids) and, where available, a mask (class index per pixel, 255 = ignore). This
module uses `datasets`; it is not part of the remote-code files copied into checkpoints.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..image_processing_clsmask import channels_first
from .arguments import DataArguments
from .metrics import IGNORE_INDEX


logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values", "bands")
LABEL_COLUMNS = ("labels", "label", "multi_label", "classes")
MASK_COLUMNS = ("mask", "annotation", "segmentation", "semantic_mask", "label_mask")
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


@dataclass
class DataSpec:
    """What the training scripts need to know about a loaded dataset."""

    dataset: object  # datasets.DatasetDict
    class_names: list[str]
    image_column: str
    labels_column: str | None
    mask_column: str | None
    labels_format: str  # "ids", "multihot", "single" or "mask"
    background_label_id: int | None
    source: str
    skipped: dict[str, int] = field(default_factory=dict)
    # 1 when a "background" class was put first for masks that store class k as k + 1 (labels column ids are shifted).
    label_offset: int = 0
    # Class ids found in at least one mask (filled when the masks are checked; None when not known).
    mask_classes: set[int] | None = None
    # {split: rows before the draw} for the splits cut by `subsample_splits` (--max_train_samples, --max_eval_samples).
    drawn_from: dict[str, int] = field(default_factory=dict)

    @property
    def background_in_masks(self) -> bool:
        """False when there is a background class but no mask holds a background pixel (e.g. VOC-layout masks of
        a dataset without background): painting background would then only make errors."""
        if self.background_label_id is None:
            return False
        return self.mask_classes is None or self.background_label_id in self.mask_classes

    @property
    def has_masks(self) -> bool:
        return self.mask_column is not None


def load_voc(voc_root: str, splits: tuple[str, ...] = ("train", "val")):
    """A PASCAL VOC style tree (JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation/{split}.txt)."""
    import datasets

    mask_dir = next(
        (
            os.path.join(voc_root, d)
            for d in ("SegmentationClassAug", "SegmentationClass")
            if os.path.isdir(os.path.join(voc_root, d))
        ),
        None,
    )
    if mask_dir is None or not os.path.isdir(os.path.join(voc_root, "JPEGImages")):
        raise FileNotFoundError(
            f"{voc_root} is not a VOC-style tree: expected JPEGImages/ and SegmentationClass/ "
            "(or SegmentationClassAug/)."
        )
    result = {}
    for split in splits:
        list_file = os.path.join(voc_root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.exists(list_file):
            raise FileNotFoundError(f"Missing split list {list_file}.")
        with open(list_file) as handle:
            names = [line.split()[0] for line in handle if line.strip()]
        images = [os.path.join(voc_root, "JPEGImages", f"{name}.jpg") for name in names]
        masks = [os.path.join(mask_dir, f"{name}.png") for name in names]
        missing = [path for path in images + masks if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files listed in {list_file} are missing, e.g. {missing[0]}.")
        features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
        result["validation" if split == "val" else split] = datasets.Dataset.from_dict(
            {"image": images, "mask": masks}, features=features
        )
    return datasets.DatasetDict(result)


def load_any(dataset_name: str, dataset_config_name: str | None = None, cache_dir: str | None = None):
    """A Hub id, a folder written by `save_to_disk`, or any folder/file `load_dataset` understands."""
    import datasets

    if os.path.isdir(dataset_name) and (
        os.path.exists(os.path.join(dataset_name, "dataset_dict.json"))
        or os.path.exists(os.path.join(dataset_name, "state.json"))
    ):
        loaded = datasets.load_from_disk(dataset_name)
    else:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _pick(columns: list[str], requested: str | None, candidates: tuple[str, ...], what: str, required: bool):
    if requested:
        if requested not in columns:
            raise ValueError(f"{what}_column {requested!r} is not a column of the dataset; it has {columns}.")
        return requested
    found = next((name for name in candidates if name in columns), None)
    if found is None and required:
        raise ValueError(
            f"No usable {what} column: the dataset has columns {columns}. Set {what}_column (--{what}_column) to "
            "one of them."
        )
    return found


def _class_names_from_features(feature) -> list[str] | None:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return None


def _is_names(sample_values: list) -> bool:
    """Labels given as class-name strings (one per example, or lists of them)."""
    for value in sample_values:
        items = value if isinstance(value, (list, tuple)) else [value]
        if items:
            return isinstance(items[0], str)
    return False


def _labels_format(feature, sample_values: list, num_labels: int | None) -> str:
    import datasets

    if _is_names(sample_values):
        return "names"
    if isinstance(feature, (datasets.ClassLabel, datasets.Value)) and not isinstance(sample_values[0], (list, tuple)):
        return "single"
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return "ids"
    if isinstance(inner, datasets.Value) and inner.dtype in ("bool", "float32", "float64", "float16"):
        return "multihot"
    lengths = {len(v) for v in sample_values}
    binary = all(set(np.unique(np.asarray(v))) <= {0, 1} for v in sample_values)
    if num_labels is not None and lengths == {num_labels} and binary:
        return "multihot"
    return "ids"


def resolve_dataset(
    dataset,
    source: str,
    image_column: str | None = None,
    labels_column: str | None = None,
    mask_column: str | None = None,
    label_names: list[str] | None = None,
    background_label_id: int | None = None,
    mask_label_offset: int = 0,
) -> DataSpec:
    """Find the image / labels / mask columns and the class names, with errors that list what the data has.

    `mask_label_offset=1`: the masks store class k as k + 1 with 0 = background (VOC layout) while the labels column
    and the class names cover the foreground only; a "background" class is put first (label id 0) and the labels
    column's ids are read shifted by one, so labels and masks number classes alike.
    """
    if mask_label_offset not in (0, 1):
        raise ValueError(f"mask_label_offset must be 0 or 1, got {mask_label_offset!r}.")
    if mask_label_offset and background_label_id not in (None, 0):
        raise ValueError(
            f"mask_label_offset 1 makes background label 0; background_label_id {background_label_id} contradicts it."
        )
    split = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    columns = list(split.column_names)
    image_column = _pick(columns, image_column, IMAGE_COLUMNS, "image", required=True)
    mask_column = _pick(columns, mask_column, MASK_COLUMNS, "mask", required=False)
    dataset = encoded_files_as_images(dataset, [c for c in (image_column, mask_column) if c])
    split = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    labels_column = _pick(columns, labels_column, LABEL_COLUMNS, "labels", required=mask_column is None)
    class_names = label_names
    if labels_column is not None:
        class_names = class_names or _class_names_from_features(split.features[labels_column])
        sample = split.select(range(min(len(split), 64)))[labels_column]
        if class_names is None and sample and _is_names(sample):
            # Class names written out in the labels column: the sorted names over every split become the classes.
            names = set()
            for part in dataset.values():
                for value in part[labels_column]:
                    names.update(value if isinstance(value, (list, tuple)) else [value])
            class_names = sorted(str(n) for n in names)
            logger.warning("Class names taken from the labels column: %s.", class_names)
        if class_names is None:
            if not sample:
                raise ValueError("The dataset is empty.")
            fmt = _labels_format(split.features[labels_column], sample, None)
            if fmt == "multihot":
                num = len(sample[0])
            else:
                num = (
                    int(
                        max(
                            max(v) if isinstance(v, (list, tuple)) and v else (v if isinstance(v, int) else 0)
                            for v in sample
                        )
                    )
                    + 1
                )
            class_names = [f"class_{i}" for i in range(num)]
            logger.warning("No class names in the dataset; using %s. Set label_names (--label_names).", class_names)
        labels_format = _labels_format(split.features[labels_column], sample, len(class_names))
    else:
        labels_format = "mask"
        if class_names is None:
            raise ValueError(
                f"No labels column among {columns}: image labels will be derived from the {mask_column!r} column, "
                "but class names are needed. Set label_names (--label_names; background first if the masks have one)."
            )
    class_names = list(class_names)
    if mask_label_offset:
        if "background" in class_names:
            raise ValueError(
                f"mask_label_offset 1 adds a 'background' class, but the class names already have one: {class_names}."
            )
        class_names, background_label_id = ["background", *class_names], 0
    return DataSpec(
        dataset=dataset,
        class_names=class_names,
        image_column=image_column,
        labels_column=labels_column,
        mask_column=mask_column,
        labels_format=labels_format,
        background_label_id=background_label_id,
        source=source,
        label_offset=mask_label_offset,
    )


def encoded_files_as_images(dataset, columns: list[str]):
    """`dataset` with each of `columns` that holds encoded image files as a struct of `bytes` and `path` (how a
    `datasets` image column is stored) read as an `Image` column. Parquet written from such a column by pandas or
    pyarrow keeps the struct but loses the feature, and the struct would otherwise reach the model as a dict."""
    import datasets

    for column in columns:
        feature = next(iter(dataset.values())).features[column]
        if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
            logger.info("Column %r holds encoded image files (bytes and path): read as images.", column)
            dataset = datasets.DatasetDict(
                {name: split.cast_column(column, datasets.Image()) for name, split in dataset.items()}
            )
    return dataset


def drop_undecodable(spec: DataSpec) -> DataSpec:
    """Remove examples whose image (or mask) is missing or cannot be decoded; counts per split go to `spec.skipped`.

    The same pass checks every mask's values against the classes (the mask must be decoded anyway), so that a bad
    mask in any split stops the run at start-up, naming the split, the row and the values, not after an epoch.
    """
    import datasets

    columns = [c for c in (spec.image_column, spec.mask_column) if c]
    image_columns = [c for c in columns if isinstance(next(iter(spec.dataset.values())).features[c], datasets.Image)]
    if not image_columns:
        return spec
    num_labels = len(spec.class_names)
    check_mask = spec.mask_column in image_columns
    result = {}
    for name, split in spec.dataset.items():
        if len(split) == 0:  # nothing to check; validate_splits names the empty split if it is used
            result[name] = split
            continue
        raw = split.cast_column(image_columns[0], datasets.Image(decode=False))
        for column in image_columns[1:]:
            raw = raw.cast_column(column, datasets.Image(decode=False))

        def decodable(example) -> dict:
            bad_values: list[int] = []
            found: list[int] = []
            for column in image_columns:
                value = example[column]
                if value is None or (value.get("bytes") is None and not value.get("path")):
                    return {"_ok": False, "_bad_mask": bad_values, "_classes": found}
                source = value["path"] if value.get("bytes") is None else io.BytesIO(value["bytes"])
                try:
                    with Image.open(source) as img:
                        img.load()
                        if check_mask and column == spec.mask_column:
                            found = np.unique(mask_to_array(img))
                            found = found[found != IGNORE_INDEX].tolist()
                            bad_values = out_of_range(found, num_labels)
                except Exception:  # noqa: BLE001 - any decoding failure means "skip this example"
                    return {"_ok": False, "_bad_mask": [], "_classes": []}
            return {"_ok": True, "_bad_mask": bad_values, "_classes": found}

        checked = raw.map(decodable, remove_columns=raw.column_names, desc=f"checking images ({name})")
        flags, bad_masks = checked["_ok"], checked["_bad_mask"]
        if check_mask:
            spec.mask_classes = (spec.mask_classes or set()).union(*map(set, checked["_classes"]))
        for row, bad in enumerate(bad_masks):
            if bad:
                message = mask_range_message(bad, spec.class_names)
                raise ValueError(f"Split {name!r}, row {row}: {message[0].lower()}{message[1:]}")
        keep = [i for i, ok in enumerate(flags) if ok]
        skipped = len(split) - len(keep)
        if skipped:
            logger.warning(
                "Skipping %d of %d examples of split %r whose images are missing or cannot be decoded.",
                skipped,
                len(split),
                name,
            )
            spec.skipped[name] = skipped
            split = split.select(keep)
        result[name] = split
    spec.dataset = datasets.DatasetDict(result)
    return spec


MASK_LAYOUT_HINT = (
    "Check that the masks number classes as the labels do. If the masks store class k as k + 1 with 0 = background "
    "and 255 = void (the VOC layout) while the labels column holds foreground ids, pass --mask_label_offset 1."
)


def validate_splits(spec: DataSpec, splits: list[str]) -> None:
    """Check, before any training step, that each split exists, is not empty, and that its image labels are in range
    (ids, names or multi-hot length), reading the labels column only (no image decoding). Errors name the split, the
    row and the value."""
    num_labels = len(spec.class_names)
    for name in splits:
        if name not in spec.dataset:
            raise ValueError(f"Split {name!r} not found; the dataset has {list(spec.dataset)}.")
        split = spec.dataset[name]
        if len(split) == 0:
            raise ValueError(f"Split {name!r} is empty (after skipping undecodable images: {spec.skipped}).")
        if spec.labels_column is None:
            continue
        for row, value in enumerate(split[spec.labels_column]):
            try:
                labels_to_multihot(value, spec.labels_format, num_labels, spec.class_names, spec.label_offset)
            except (ValueError, TypeError) as error:
                raise ValueError(f"Split {name!r}, row {row}, labels {value!r}: {error}") from None


def load_data(args: DataArguments) -> DataSpec:
    """The dataset `args` names (built-in shapes when none is given), checked image by image (`drop_undecodable`)."""
    if args.source_conflict():
        raise ValueError(args.source_conflict())
    if args.voc_root:
        spec = resolve_dataset(
            load_voc(args.voc_root), f"voc:{args.voc_root}", label_names=VOC_CLASSES, background_label_id=0
        )
    elif args.dataset_name:
        spec = resolve_dataset(
            load_any(args.dataset_name, args.dataset_config_name, args.cache_dir),
            args.dataset_name,
            image_column=args.image_column,
            labels_column=args.labels_column,
            mask_column=args.mask_column,
            label_names=args.label_names,
            background_label_id=args.background_label_id,
            mask_label_offset=args.mask_label_offset,
        )
    else:
        from .synthetic_shapes import build_synthetic_dataset

        splits = {"train": args.train_size, "validation": args.validation_size, "test": args.validation_size}
        spec = resolve_dataset(
            build_synthetic_dataset(
                splits, image_size=args.synthetic_image_size, seed=args.data_seed, generator=args.synthetic_generator
            ),
            f"clsmask/synthetic-{args.synthetic_generator}",
            background_label_id=0,
        )
    return drop_undecodable(spec)


def mask_to_array(mask) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., 0]
    return array.astype(np.int64)


def labels_to_multihot(
    value, fmt: str, num_labels: int, class_names: list[str] | None = None, offset: int = 0
) -> np.ndarray:
    """One example's labels as a (num_labels,) multi-hot vector, with range checks. With `offset`, the labels number
    the classes after the first `offset` ones (a background class put first, see `resolve_dataset`)."""
    if offset:
        target = np.zeros(num_labels, dtype=np.float32)
        target[offset:] = labels_to_multihot(value, fmt, num_labels - offset, (class_names or [])[offset:])
        return target
    target = np.zeros(num_labels, dtype=np.float32)
    if fmt == "names":
        index = {name: i for i, name in enumerate(class_names or [])}
        for name in value if isinstance(value, (list, tuple)) else [value]:
            if name not in index:
                raise ValueError(f"Label {name!r} is not a class name; the classes are {class_names}.")
            target[index[name]] = 1.0
        return target
    if fmt == "multihot":
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
        if vector.shape[0] != num_labels:
            raise ValueError(f"A multi-hot label vector has length {vector.shape[0]}, expected {num_labels}.")
        return (vector > 0.5).astype(np.float32)
    ids = [value] if fmt == "single" else list(value)
    for label in ids:
        if not 0 <= int(label) < num_labels:
            raise ValueError(
                f"Label id {int(label)} is out of range: the model has {num_labels} labels (0..{num_labels - 1})."
            )
        target[int(label)] = 1.0
    return target


def out_of_range(values: list[int], num_labels: int) -> list[int]:
    """Mask values that are neither a class id (0..num_labels - 1) nor `IGNORE_INDEX`."""
    return [int(v) for v in values if v != IGNORE_INDEX and not 0 <= v < num_labels]


def mask_range_message(bad: list[int], classes: list[str] | int) -> str:
    """The one message for mask values out of range; `classes` are the class names or their count."""
    names = f" {classes}" if isinstance(classes, list) else ""
    count = len(classes) if isinstance(classes, list) else classes
    return (
        f"Mask value(s) {bad} out of range for {count} classes{names} ({IGNORE_INDEX} = ignore). " + MASK_LAYOUT_HINT
    )


def labels_from_mask(mask: np.ndarray, num_labels: int, background_label_id: int | None) -> np.ndarray:
    """Image-level labels from a mask: the classes present, without background and ignore pixels."""
    values = np.unique(mask)
    values = values[values != IGNORE_INDEX]
    bad = out_of_range(values.tolist(), num_labels)
    if bad:
        raise ValueError(mask_range_message(bad, num_labels))
    target = np.zeros(num_labels, dtype=np.float32)
    target[values] = 1.0
    if background_label_id is not None:
        target[background_label_id] = 0.0
    return target


class ExampleEncoder:
    """Turns raw examples into tensors: the image through `processor` (the same preprocessing as inference),
    multi-hot labels, the mask resized to the processor's size (nearest). `keep_sizes` adds each image's own
    (H, W) as `original_size`."""

    def __init__(self, spec: DataSpec, processor, keep_sizes: bool = False):
        self.spec = spec
        self.processor = processor
        self.num_channels = len(processor.image_mean)
        self.size = (processor.size.height, processor.size.width)
        self.num_labels = len(spec.class_names)
        self.keep_sizes = keep_sizes

    def pixel_values(self, images: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(B, C, H, W) model inputs and each image's own (H, W)."""
        images = [image if isinstance(image, Image.Image) else np.asarray(image) for image in images]  # list columns
        try:
            sizes = [
                (image.height, image.width)
                if isinstance(image, Image.Image)
                else tuple(channels_first(np.asarray(image), self.num_channels).shape[1:])
                for image in images
            ]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        except ValueError as error:
            raise ValueError(f"{error} Check the image column or set --num_channels.") from None
        return pixels, [(int(h), int(w)) for h, w in sizes]

    def __call__(self, batch: dict) -> dict:
        spec = self.spec
        labels, masks = [], []
        pixels, sizes = self.pixel_values(list(batch[spec.image_column]))
        for i, original in enumerate(sizes):
            mask = mask_to_array(batch[spec.mask_column][i]) if spec.mask_column else None
            if mask is not None and mask.shape != original:
                raise ValueError(
                    f"A mask has size {mask.shape[1]}x{mask.shape[0]} but its image is "
                    f"{original[1]}x{original[0]}"
                    " (width x height); masks must match their images pixel for pixel."
                )
            if spec.labels_format == "mask":
                target = labels_from_mask(mask, self.num_labels, spec.background_label_id)
            else:
                target = labels_to_multihot(
                    batch[spec.labels_column][i],
                    spec.labels_format,
                    self.num_labels,
                    spec.class_names,
                    spec.label_offset,
                )
                bad = out_of_range(np.unique(mask).tolist(), self.num_labels) if mask is not None else []
                if bad:
                    raise ValueError(mask_range_message(bad, spec.class_names))
            labels.append(torch.from_numpy(target))
            if mask is not None:
                mask_tensor = torch.from_numpy(mask)[None, None].float()
                if tuple(mask.shape) != self.size:
                    mask_tensor = F.interpolate(mask_tensor, size=self.size, mode="nearest")
                masks.append(mask_tensor[0, 0].long())
        out = {"pixel_values": list(pixels.unbind(0)), "labels": labels}
        if masks:
            out["mask"] = masks
        if self.keep_sizes:
            out["original_size"] = [torch.tensor(size) for size in sizes]
        return out


def subsample_rows(data, count: int | None, seed: int):
    """At most `count` rows drawn at random (seeded), kept in their stored order; all rows when `count` is None, 0 or
    not smaller than the split. Drawn rather than the first (transformers' examples shuffle before `select` too),
    since a dataset stored by sequence or class (CamVid tiles by sequence, an imagefolder by class folder) would give
    its first rows' narrow slice. The draw depends only on the split's length, `count` and `seed`, so every caller
    with those gets the same rows (the model's training rows, the baselines' rows, stage 2's full-label rows)."""
    if not count or count >= len(data):
        return data
    drawn = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    return data.select(drawn.sort().values.tolist())


def subsample_splits(spec: DataSpec, counts: dict[str, int | None], seed: int) -> DataSpec:
    """`spec` with each split named in `counts` cut to `subsample_rows` of it, once after loading (as transformers'
    examples cut `dataset["train"]`), so that the loaders, the baselines, stage 2's full-label baseline and the cards
    all see the rows actually used. `drawn_from` records the sizes before the cut."""
    import datasets

    dataset, drawn_from = dict(spec.dataset), dict(spec.drawn_from)
    for split, count in counts.items():
        if split in dataset and count and count < len(dataset[split]):
            drawn_from[split] = len(dataset[split])
            dataset[split] = subsample_rows(dataset[split], count, seed)
    return replace(spec, dataset=datasets.DatasetDict(dataset), drawn_from=drawn_from)


def sample_training_rows(data, max_train_samples: int | None, count: int | None, seed: int):
    """At most `count` of the rows the model trains on (`subsample_rows` of `max_train_samples`), drawn at random, for
    what is fit on a sample of them: the frozen-backbone baselines' heads (same data as the model) and the class-mean
    start of the class tokens."""
    return subsample_rows(subsample_rows(data, max_train_samples, seed), count, seed)


def train_dataloader(data, encoder: ExampleEncoder, batch_size: int, seed: int):
    """Shuffled training batches. The loader's own generator keeps iterator creation from drawing on the global RNG,
    which augmentation and token masking use: a resumed run (RNG restored by load_state) replays the same numbers."""
    return torch.utils.data.DataLoader(
        data.with_transform(encoder),
        shuffle=True,
        collate_fn=collate,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )


class CachedFeatures(torch.utils.data.Dataset):
    """Training rows as cached tensors (`run_pretrain.cache_block_inputs`): row i's features as given and flipped
    and its labels."""

    def __init__(self, features: dict[str, torch.Tensor]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features["labels"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: values[index] for key, values in self.features.items()}


def cached_features_dataloader(features: dict[str, torch.Tensor], batch_size: int, seed: int):
    """`train_dataloader`'s batches (same sampler, generator and batch size, so the same rows in the same order)
    over cached features."""
    return torch.utils.data.DataLoader(
        CachedFeatures(features), shuffle=True, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
    )


def eval_dataloader(data, encoder: ExampleEncoder, batch_size: int):
    """Evaluation batches, in order."""
    return torch.utils.data.DataLoader(data.with_transform(encoder), collate_fn=collate, batch_size=batch_size)


def collate(examples: list[dict]) -> dict:
    batch = {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]),
        "labels": torch.stack([ex["labels"] for ex in examples]),
    }
    for key in ("mask", "original_size"):
        if key in examples[0]:
            batch[key] = torch.stack([ex[key] for ex in examples])
    return batch


def augment_batch(
    pixel_values: torch.Tensor,
    masks: torch.Tensor | None,
    flip_prob: float = 0.5,
    crop_scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched horizontal flip + random resized crop (square aspect), one affine grid per sample, no Python loop.

    The mask is warped with the same grid (nearest), so it stays aligned with the image.
    """
    batch = pixel_values.shape[0]
    device = pixel_values.device
    rand = torch.rand(batch, 4, device=device)
    scale = (crop_scale[0] + (crop_scale[1] - crop_scale[0]) * rand[:, 0]).sqrt()  # side fraction
    shift_x = (1 - scale) * (2 * rand[:, 1] - 1)
    shift_y = (1 - scale) * (2 * rand[:, 2] - 1)
    flip = torch.where(rand[:, 3] < flip_prob, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = scale * flip
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = scale
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    pixel_values = F.grid_sample(
        pixel_values, grid.to(pixel_values.dtype), mode="bilinear", padding_mode="reflection", align_corners=False
    )
    if masks is not None:
        warped = F.grid_sample(
            masks[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False
        )
        masks = warped[:, 0].round().long()
    return pixel_values, masks


def write_dataset_card(path: str, spec: DataSpec) -> None:
    """A short JSON description of the data a model was trained on (kept beside the checkpoint)."""
    info = {
        "source": spec.source,
        "class_names": spec.class_names,
        "splits": {name: len(split) for name, split in spec.dataset.items()},
        "drawn_at_random_from": spec.drawn_from,
        "skipped_undecodable": spec.skipped,
        "has_masks": spec.has_masks,
    }
    with open(path, "w") as handle:
        json.dump(info, handle, indent=2)
