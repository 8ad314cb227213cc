"""CamVid-objects: a VOC-like set of real photos (objects on a background) made from the CamVid tiles.

    python benchmarks/make_camvid_objects.py ../shared/data/camvid-tiles OUT_DIR
    python run_pretrain.py --dataset_name OUT_DIR --mask_label_offset 1 --init_from DINOV2_DIR ...

The second real-photo dataset the `pretrained` preset is checked on, beside CamVid tiles (which have no background):
the stuff classes (sky, building, road, pavement, tree) become background and the object classes (pole, sign, fence,
car, pedestrian, bicyclist) are stored VOC-style as k + 1 with 0 = background and 255 = void. A tile's labels are the
objects with at least `--min_pixels` pixels; smaller ones become void, and tiles without an object are dropped (every
VOC image holds one). Writes OUT_DIR/{train,validation,test}.parquet.
"""

from __future__ import annotations

import argparse
import os

import datasets
import numpy as np
from PIL import Image


STUFF = ("sky", "building", "road", "pavement", "tree")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="The camvid-tiles folder ({train,validation,test}.parquet).")
    parser.add_argument("output_dir", help="Where the three parquet files go.")
    parser.add_argument("--min_pixels", type=int, default=30, help="Pixels an object needs to count as a label.")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    for split in ("train", "validation", "test"):
        source = datasets.load_dataset("parquet", data_files=os.path.join(args.source, f"{split}.parquet"))["train"]
        names = source.features["labels"].feature.names
        objects = [name for name in names if name not in STUFF]
        lookup = np.full(256, 255, np.uint8)  # source id -> VOC-style id (void stays 255)
        for index, name in enumerate(names):
            lookup[index] = objects.index(name) + 1 if name in objects else 0
        rows = {"image": [], "labels": [], "mask": []}
        for row in source:
            mask = lookup[np.asarray(row["mask"])]
            pixels = np.bincount(mask.ravel(), minlength=256)[1 : len(objects) + 1]
            labels = np.flatnonzero(pixels >= args.min_pixels)
            if not len(labels):
                continue
            small = np.flatnonzero((pixels > 0) & (pixels < args.min_pixels)) + 1
            mask[np.isin(mask, small)] = 255
            rows["image"].append(row["image"])
            rows["labels"].append(labels.tolist())
            rows["mask"].append(Image.fromarray(mask))
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "labels": datasets.Sequence(datasets.ClassLabel(names=objects)),
                "mask": datasets.Image(),
            }
        )
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            os.path.join(args.output_dir, f"{split}.parquet")
        )
        print(f"{split}: {len(rows['image'])} of {len(source)} tiles hold an object")


if __name__ == "__main__":
    main()
