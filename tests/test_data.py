"""The data layer: typed arguments, the 'auto'/'none'/number convention, and mask layouts users have."""

import argparse
import os

import datasets
import numpy as np
import pytest
from PIL import Image
from test_run_pretrain import TINY, make_disk_dataset, rgb

import run_pretrain
import run_segmentation
from modeling_clsmask import ClsMaskImageProcessor
from modeling_clsmask.pseudo_masks import AUTO, resolve_threshold
from modeling_clsmask.training.arguments import DataArguments, add_data_arguments, optional_fraction
from modeling_clsmask.training.data import ExampleEncoder, load_data, sample_training_rows, subsample_rows


def test_optional_values_have_one_spelling():
    assert optional_fraction("auto") == AUTO and optional_fraction("none") is None and optional_fraction("0.3") == 0.3
    for bad in ("-1", "1.5", "nan", "maybe"):
        with pytest.raises(argparse.ArgumentTypeError):
            optional_fraction(bad)
    assert resolve_threshold(AUTO, 0.2) == 0.2 and resolve_threshold(None, 0.2) is None
    assert resolve_threshold(0.4, 0.2) == 0.4
    with pytest.raises(ValueError, match="`background_threshold`"):
        resolve_threshold(-1.0, 0.2)
    # The same words on both command lines.
    assert run_pretrain.parse_args(["--background_threshold", "none"]).background_threshold is None
    assert run_pretrain.parse_args([]).background_threshold == AUTO
    seg = run_segmentation.parse_args(["--model_name_or_path", "x", "--background_threshold", "0.5"])
    assert seg.background_threshold == 0.5
    # Stage 2 accepts stage 1's names for the same map fields.
    alias = run_segmentation.parse_args(["--model_name_or_path", "x", "--attention_map_scales", "1", "2",
                                         "--no-attention_map_flip", "--attention_map_refinement_iterations", "0"])
    assert (alias.scales, alias.flip, alias.refinement_iterations) == ([1.0, 2.0], False, 0)
    with pytest.raises(SystemExit):
        run_segmentation.parse_args(["--model_name_or_path", "x", "--background_threshold", "-2"])


def test_every_flag_has_help():
    for module in (run_pretrain, run_segmentation):
        actions = module.build_parser()._actions
        missing = [a.option_strings[0] for a in actions if a.option_strings and not a.help]
        assert not missing, f"{module.__name__}: flags without help: {missing}"


def test_data_arguments_from_command_line_and_in_python():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = DataArguments.from_namespace(parser.parse_args(["--train_size", "8", "--mask_label_offset", "1"]))
    assert args.train_size == 8 and args.mask_label_offset == 1 and args.synthetic_generator == "shapes-random-colour"
    spec = load_data(DataArguments(train_size=4, validation_size=2, synthetic_image_size=32))
    assert {name: len(split) for name, split in spec.dataset.items()} == {"train": 4, "validation": 2, "test": 2}
    with pytest.raises(ValueError, match="not both"):
        load_data(DataArguments(dataset_name="a", voc_root="b"))


def voc_layout_dataset(tmp_path):
    """Foreground ClassLabel ids in `labels`, masks with 0 = background, class k as k + 1 and 255 = void."""
    names = datasets.ClassLabel(names=["cat", "dog"])
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.List(names), "mask": datasets.Image()})
    examples = []
    for i in range(4):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:20, 4:20] = 1 + i % 2  # the image's class, stored as id + 1
        mask[0, :] = 255
        examples.append({"image": rgb(i), "labels": [i % 2], "mask": Image.fromarray(mask)})
    return make_disk_dataset(tmp_path / "voc_layout", examples, features)


def test_mask_label_offset_for_voc_layout_masks(tmp_path):
    path = voc_layout_dataset(tmp_path)
    base = [*TINY, "--dataset_name", path, "--max_train_steps", "1", "--num_visualizations", "0"]
    # Without the flag: stopped at start-up, with a message that names the layout and the flag.
    with pytest.raises(ValueError, match=r"k \+ 1 with 0 = background.*--mask_label_offset 1"):
        run_pretrain.main([*base, "--output_dir", str(tmp_path / "a")])
    assert not (tmp_path / "a" / "model.safetensors").exists()
    # With it: a background class comes first and the labels column's ids are read shifted, as the masks are.
    spec = load_data(DataArguments(dataset_name=path, mask_label_offset=1))
    assert spec.class_names == ["background", "cat", "dog"] and spec.background_label_id == 0
    processor = ClsMaskImageProcessor(size={"height": 32, "width": 32})
    encoded = ExampleEncoder(spec, processor)(spec.dataset["train"][:2])
    assert encoded["labels"][0].tolist() == [0, 1, 0] and encoded["labels"][1].tolist() == [0, 0, 1]
    assert set(encoded["mask"][1].unique().tolist()) == {0, 2, 255}
    metrics = run_pretrain.main([*base, "--mask_label_offset", "1", "--output_dir", str(tmp_path / "b")])
    assert metrics["num_images"] == 4 and 0 <= metrics["pseudo_mask_mean_iou"] <= 1
    # Stage 2 reads the same layout with the same flag.
    results = run_segmentation.main(
        ["--model_name_or_path", str(tmp_path / "b"), "--dataset_name", path, "--mask_label_offset", "1",
         "--max_train_steps", "1", "--num_visualizations", "0", "--output_dir", str(tmp_path / "seg")]
    )  # fmt: skip
    assert set(results["segmentation_per_class_iou"]) == {"background", "cat", "dog"}


def test_parquet_written_by_pandas_reads_its_image_structs_as_images(tmp_path):
    # pandas (or pyarrow) writing a `datasets` image column keeps {"bytes", "path"} structs but drops the Image
    # feature; they are read as images again instead of reaching the processor as dicts ("got shape ()").
    import io

    import pandas as pd

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = []
    for i in range(4):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:20, 4:20] = i % 2
        rows.append({"image": png(rgb(i)), "labels": [i % 2], "mask": png(Image.fromarray(mask))})
    os.makedirs(tmp_path / "pq")
    for split in ("train", "validation"):
        pd.DataFrame(rows).to_parquet(tmp_path / "pq" / f"{split}.parquet")
    spec = load_data(DataArguments(dataset_name=str(tmp_path / "pq"), label_names=["a", "b"]))
    for column in ("image", "mask"):
        assert isinstance(spec.dataset["validation"].features[column], datasets.Image), column
    assert spec.dataset["train"][1]["image"].size == (32, 32)
    encoded = ExampleEncoder(spec, ClsMaskImageProcessor(size={"height": 32, "width": 32}))(spec.dataset["train"][:2])
    assert encoded["pixel_values"][1].shape == (3, 32, 32) and set(encoded["mask"][1].unique().tolist()) == {0, 1}


def test_sampled_training_rows_are_drawn_from_the_models_own_training_rows():
    data = datasets.Dataset.from_dict({"row": list(range(100))})
    # --max_train_samples draws the model's rows at random (seeded), in stored order, not the first N: a dataset
    # stored by sequence or class would give its first rows' narrow slice.
    model_rows = subsample_rows(data, 40, seed=0)["row"]
    assert len(model_rows) == 40 and model_rows == sorted(model_rows) and model_rows != list(range(40))
    assert subsample_rows(data, 40, seed=0)["row"] == model_rows != subsample_rows(data, 40, seed=1)["row"]
    assert subsample_rows(data, None, seed=0)["row"] == subsample_rows(data, 200, seed=0)["row"] == list(range(100))

    def drawn(max_train_samples, count, seed=0):
        return sample_training_rows(data, max_train_samples, count, seed)["row"]

    # At most `count`, in order, all among the model's rows, and not simply their first.
    sample = drawn(40, 10)
    assert len(sample) == 10 and sample == sorted(sample) and set(sample) <= set(model_rows)
    assert sample != model_rows[:10]
    assert drawn(40, 10) == sample and drawn(40, 10, seed=1) != sample
    assert drawn(40, 2000) == model_rows and drawn(None, None) == list(range(100))
