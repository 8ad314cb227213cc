"""Faults a long real run meets: two runs in one folder, inputs with the wrong bands, a background no mask holds."""

import logging
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from test_pipeline import biased_model

import run_pretrain
from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor, ClsMaskSegmentationPipeline
from modeling_clsmask.training.outputs import RUN_LOCK, lock_output_dir, release_output_dir


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The scripts' lock, loaded in a child process without importing torch (outputs.py needs the standard library only),
# so that two children start and race within a second, as a sweep script's runs do.
OUTPUTS_FILE = os.path.join(REPO, "modeling_clsmask", "training", "outputs.py")
LOAD_LOCK = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("outputs", {OUTPUTS_FILE!r})
outputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outputs)
"""


def test_two_runs_started_together_into_one_folder(tmp_path):
    # Two processes claim one empty folder at once: exactly one holds it, the other refuses naming the holder's pid.
    code = LOAD_LOCK + textwrap.dedent(
        f"""
        try:
            outputs.lock_output_dir({str(tmp_path / "out")!r}, "run_pretrain")
        except RuntimeError as error:
            print("REFUSED", error, flush=True)
        else:
            print("HELD", flush=True)
            time.sleep(120)
        """
    )
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [run.stdout.readline() for run in runs]  # the holder keeps holding until it is killed below
    finally:
        for run in runs:
            run.kill()
            run.wait()
    held = [i for i, out in enumerate(outputs) if out.startswith("HELD")]
    refused = [out for out in outputs if out.startswith("REFUSED")]
    assert len(held) == 1 and len(refused) == 1, outputs
    assert f"pid {runs[held[0]].pid}" in refused[0] and str(tmp_path / "out") in refused[0]
    # The holder was killed: its lock file stays, but the lock went with the process, so a new run takes the folder.
    assert (tmp_path / "out" / RUN_LOCK).exists()
    lock_output_dir(str(tmp_path / "out"), "run_pretrain")
    release_output_dir(str(tmp_path / "out"))


def test_run_refuses_a_folder_another_process_holds(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOAD_LOCK + textwrap.dedent(f"""
            outputs.lock_output_dir({str(tmp_path / "out")!r}, "run_pretrain")
            print("HELD", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().startswith("HELD")
        with pytest.raises(RuntimeError, match=f"in use by another run: run_pretrain pid {holder.pid}"):
            run_pretrain.main(["--train_size", "8", "--output_dir", str(tmp_path / "out")])
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "bands, array, message",
    [
        (3, np.zeros((20, 24, 13), np.uint8), "expects 3 bands; this input has 13 .*channels-last"),
        (3, np.zeros((13, 20, 24), np.uint8), "expects 3 bands; this input has 13 .*channels-first"),
        (13, np.zeros((20, 24, 3), np.uint8), "expects 13 bands; this input has 3"),
    ],
)
def test_band_count_errors_from_the_pipeline_and_the_processor(bands, array, message):
    model, processor = biased_model(num_channels=bands)
    if bands != 3:
        processor = ClsMaskImageProcessor.from_model_config(model.config)
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    with pytest.raises(ValueError, match=message):
        pipe(array)
    with pytest.raises(ValueError, match=message):
        processor(images=array, return_tensors="pt")


def test_multiband_pipeline_and_ambiguous_layout(caplog):
    model = ClsMaskForSemanticSegmentation(tiny_config(num_channels=13)).eval()
    processor = ClsMaskImageProcessor.from_model_config(model.config)
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    bands = np.random.rand(13, 20, 24).astype(np.float32)
    chw = pipe(bands)
    hwc = pipe(np.moveaxis(bands, 0, -1))
    assert all(r["mask"].size == (24, 20) for r in chw + hwc)
    assert [r["label"] for r in chw] == [r["label"] for r in hwc]
    # 3 x 20 x 3 for an RGB model: either end could be the bands; channels-last is assumed, and said.
    rgb_model, rgb_processor = biased_model()
    with caplog.at_level(logging.WARNING):
        rgb_processor(images=np.zeros((3, 20, 3), np.uint8), return_tensors="pt")
    assert "read as channels-last" in caplog.text


def test_background_that_no_mask_holds_is_not_painted(tmp_path, caplog):
    # VOC-layout masks (class k stored as k + 1) of a dataset without background pixels: --mask_label_offset 1 adds
    # a background class, which 'auto' must leave off, saying so at start-up.
    rng = np.random.default_rng(0)

    def example():
        mask = np.where(np.arange(32)[None, :] < 16, 1, 2).repeat(32, 0).astype(np.uint8)  # classes a, b only
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        return {"image": image, "labels": [0, 1], "mask": Image.fromarray(mask)}

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "labels": datasets.Sequence(datasets.ClassLabel(names=["a", "b"])),
            "mask": datasets.Image(),
        }
    )
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([example() for _ in range(8)], features=features),
            "validation": datasets.Dataset.from_list([example() for _ in range(4)], features=features),
        }
    ).save_to_disk(str(tmp_path / "data"))
    tiny = ["--image_size", "32", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
            "--intermediate_size", "64", "--max_train_steps", "1", "--num_visualizations", "0"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        metrics = run_pretrain.main(
            [
                "--dataset_name",
                str(tmp_path / "data"),
                "--mask_label_offset",
                "1",
                *tiny,
                "--output_dir",
                str(tmp_path / "out"),
            ]  # fmt: skip
        )
    assert "'background' (id 0) is in no mask" in caplog.text
    assert ClsMaskImageProcessor.from_pretrained(tmp_path / "out").background_threshold is None
    assert metrics["pseudo_mask_per_class_iou"]["background"] is None  # never painted, never in a mask
