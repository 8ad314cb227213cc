"""run_pretrain.py end to end on tiny data: outputs, resume equality, data formats, bad inputs, Hub push."""

import argparse
import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from test_remote_code import run_isolated

import run_pretrain
from modeling_clsmask.training.presets import PRESETS


TINY = [
    "--image_size", "32", "--patch_size", "8", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--intermediate_size", "64", "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "16", "--num_visualizations", "2",
]  # fmt: skip
BUILTIN = ["--train_size", "48", "--validation_size", "16", "--synthetic_image_size", "32"]


def test_builtin_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = run_pretrain.main([*TINY, *BUILTIN, "--num_train_epochs", "2", "--output_dir", str(out),
                                 "--use_head_gates", "--with_tracking"])  # fmt: skip
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json",
                 "validation_panels.png", "training_data.json", "modeling_clsmask.py"):  # fmt: skip
        assert (out / name).exists(), name
    saved = json.loads((out / "eval_results.json").read_text())
    for key in ("mAP", "f1_micro", "pseudo_mask_mean_iou", "prediction_mask_mean_iou", "baseline_mean_iou",
                "class_assignment_accuracy", "class_assignment_chance", "class_assignment_margin",
                "open_gate_fraction"):  # fmt: skip
        assert key in saved, key
    assert saved["num_images"] == 16
    assert 0.0 <= saved["pseudo_mask_mean_iou"] <= 1.0
    assert set(saved["pseudo_mask_per_class_iou"]) == {"background", "disk", "square", "triangle", "cross", "ring"}
    assert set(saved["per_class_AP"]) == {"disk", "square", "triangle", "cross", "ring"}  # background: no image label
    assert metrics["pseudo_mask_mean_iou"] == saved["pseudo_mask_mean_iou"]
    assert saved["class_assignment_margin"] == pytest.approx(
        saved["class_assignment_accuracy"] - saved["class_assignment_chance"]
    )
    config = json.loads((out / "config.json").read_text())
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["background_threshold"] == run_pretrain.REFINED_BACKGROUND and config["use_head_gates"]
    assert "background_threshold" not in config  # stored once, in the processor
    # From scratch: conv stem, fan-in init, shared readout, maps from block 0, no token masking.
    assert config["patch_embedding_type"] == "conv" and config["conv_stem_depth"] == 2
    assert config["classifier_type"] == "shared" and config["weight_init"] == "fan_in"
    assert config["attention_map_layer_ids"] == [0] and config["token_mask_rate"] == 0.0
    assert config["attention_map_scales"] == [0.75, 1.0, 1.5, 2.0] and config["attention_map_flip"]
    refinement = PRESETS["scratch"]["attention_map_refinement_iterations"]
    assert config["attention_map_refinement_iterations"] == refinement > 0
    assert saved["test_num_images"] == 16 and "test_pseudo_mask_mean_iou" in saved
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    # The card states what the run did: this run used no token masking, from scratch.
    assert "without token masking" in card.text and "Trained from scratch" in card.text
    assert card.data.pipeline_tag == "image-segmentation"
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["Pseudo-mask mIoU (image labels)"] == round(saved["pseudo_mask_mean_iou"], 4)
    assert any(f.startswith("events") for _, _, files in os.walk(out) for f in files), "tensorboard events"
    panel = Image.open(out / "validation_panels.png")
    assert panel.width > panel.height
    assert "chance" in capsys.readouterr().out  # the printed summary puts chance beside class assignment

    # The diagnosis of the same checkpoint: one row per block and head, attention shares that add up to one.
    sys.path.insert(0, os.path.join(os.path.dirname(run_pretrain.__file__), "benchmarks"))
    import diagnose_maps

    report = diagnose_maps.main([str(out), "--synthetic_image_size", "32", "--output_dir", str(tmp_path / "diag")])
    assert report["num_images"] == 16 and report["source"] == "clsmask/synthetic-shapes-random-colour"
    assert set(report["maps"]) == {f"{layer}/{head}" for layer in range(2) for head in ("mean", 0, 1)} | {"sum/mean"}
    for layer in ("0", "1"):
        assert sum(report["attention_mass"][layer].values()) == pytest.approx(1.0, abs=1e-4)
    first = report["maps"]["0/mean"]
    assert first["class_assignment_chance"] == saved["class_assignment_chance"]  # same split, same chance
    assert (tmp_path / "diag" / "diagnosis.json").exists() and (tmp_path / "diag" / "diagnosis_maps.png").exists()

    # Re-scoring at the checkpoint's own settings gives the run's figure; other settings give others.
    import rescore_maps

    config = json.loads((out / "config.json").read_text())
    flip, rounds = config["attention_map_flip"], config["attention_map_refinement_iterations"]
    scales = tuple(config["attention_map_scales"])
    rescored = rescore_maps.main([str(out), *BUILTIN, "--background_thresholds", "auto", "none",
                                  "--refinement_iterations", str(rounds), "0",
                                  "--scales", ",".join(map(str, scales)), "1",
                                  "--logits_over_scales", "off", "on", "--per_class_ap"])  # fmt: skip
    over = config["image_logits_over_scales"]
    own = rescored[("attention", False, 0.0, scales, over, flip, rounds, "auto")]
    assert own["mean_iou"] == pytest.approx(saved["pseudo_mask_mean_iou"], abs=1e-6)
    assert own["mAP"] == pytest.approx(saved["mAP"], abs=1e-6)
    assert own["per_class_AP"] == pytest.approx(saved["per_class_AP"], abs=1e-6)
    assert "    AP: disk " in capsys.readouterr().out
    assert rescored[("attention", False, 0.0, scales, over, flip, rounds, None)]["mean_iou"] != own["mean_iou"]
    refined = rescored[("attention", False, 0.0, scales, over, flip, 0, "auto")]
    assert rounds > 0 and refined["mean_iou"] != own["mean_iou"]  # the refinement acts
    single = rescored[("attention", False, 0.0, (1.0,), over, flip, rounds, "auto")]  # the test-time scales act
    assert scales != (1.0,) and single["mean_iou"] != own["mean_iou"]
    swapped = rescored[("attention", False, 0.0, scales, not over, flip, rounds, "auto")]  # logits over the scales
    assert swapped["mean_iou"] == own["mean_iou"] and swapped["mAP"] != own["mAP"]


def test_resume_gives_identical_weights(tmp_path, caplog):
    args = [*TINY, *BUILTIN, "--max_train_steps", "6", "--checkpointing_steps", "2", "--num_visualizations", "0",
            "--checkpoints_total_limit", "2"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        run_pretrain.main([*args, "--output_dir", str(tmp_path / "full")])
    full = load_file(tmp_path / "full" / "model.safetensors")
    # 'auto' timed both attention kernels once and every checkpoint records the one chosen.
    timed = re.findall(r"Training attention 'auto': [^\n]*", caplog.text)
    assert len(timed) == 1 and "sdpa" in timed[0] and "eager" in timed[0] and " s, " in timed[0], timed
    chosen = json.loads((tmp_path / "full" / "checkpoints" / "step_4" / "training_attention.json").read_text())
    assert timed[0].startswith(f"Training attention 'auto': {chosen['training_attention']} (")
    caplog.clear()
    # Retention: the newest two of steps 2, 4, 6 are kept (6 is what 'latest' names).
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["step_4", "step_6"]
    # Interrupted after step 4: the folder as the run left it (checkpoint recorded, no final model, not finished).
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "model.safetensors").unlink()
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_6")
    marker_path = tmp_path / "resumed" / "clsmask_run.json"
    marker = json.loads(marker_path.read_text())
    assert marker["checkpoints"] == ["checkpoints/step_4", "checkpoints/step_6"] and marker["finished"]
    marker_path.write_text(json.dumps({**marker, "checkpoints": ["checkpoints/step_4"], "finished": False}))
    # An older run's higher-numbered checkpoint in the same folder is not "latest" for this run.
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", tmp_path / "resumed" / "checkpoints" / "step_999")
    # The resumed run keeps the checkpoint's kernel rather than timing again (which could pick the other one and then
    # differ from the uninterrupted run in the last bits) and records it in its own checkpoints.
    with caplog.at_level(logging.INFO):
        run_pretrain.main([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    kept = re.findall(r"Training attention 'auto': [^\n]*", caplog.text)
    assert kept == [f"Training attention 'auto': {chosen['training_attention']}, as in the checkpoint resumed from."]
    recorded = tmp_path / "resumed" / "checkpoints" / "step_6" / "training_attention.json"
    assert json.loads(recorded.read_text()) == chosen
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)


def test_output_dir_guard_and_finished_resume_is_a_no_op(tmp_path, capsys):
    import hashlib

    def checksums(folder):
        return {
            str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }

    args = [*TINY, *BUILTIN, "--max_train_steps", "2", "--num_visualizations", "0"]
    # A folder holding someone else's files is refused, untouched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "model.safetensors").write_bytes(b"precious")
    before = checksums(foreign)
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run_pretrain.main([*args, "--output_dir", str(foreign)])
    assert checksums(foreign) == before
    # Another run's folder (other arguments) is refused too.
    run = tmp_path / "run"
    run_pretrain.main([*args, "--output_dir", str(run)])
    finished = checksums(run)
    with pytest.raises(FileExistsError, match="another run"):
        run_pretrain.main([*args, "--seed", "7", "--output_dir", str(run)])
    assert checksums(run) == finished
    # Resuming a finished run changes nothing and says so.
    capsys.readouterr()
    again = run_pretrain.main([*args, "--output_dir", str(run), "--resume_from_checkpoint", "latest"])
    assert "already finished" in capsys.readouterr().out
    assert checksums(run) == finished
    assert again == json.loads((run / "eval_results.json").read_text())
    # --overwrite_output_dir writes over the foreign folder.
    run_pretrain.main([*args, "--output_dir", str(foreign), "--overwrite_output_dir"])
    assert (foreign / "model.safetensors").read_bytes() != b"precious"


def make_disk_dataset(path, examples: list[dict], features: datasets.Features):
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(examples, features=features),
            "validation": datasets.Dataset.from_list(examples, features=features),
        }  # fmt: skip
    ).save_to_disk(str(path))
    return str(path)


def rgb(seed, size=(32, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def test_multihot_labels_and_multiband_arrays(tmp_path):
    features = datasets.Features(
        {"bands": datasets.Array3D((32, 32, 13), "float32"), "targets": datasets.List(datasets.Value("float32"))}
    )
    rng = np.random.default_rng(0)
    examples = [{"bands": rng.random((32, 32, 13), dtype=np.float32), "targets": [1.0, 0.0, 1.0]} for _ in range(8)]
    path = make_disk_dataset(tmp_path / "s2", examples, features)
    metrics = run_pretrain.main([*TINY, "--dataset_name", path, "--image_column", "bands", "--labels_column",
                                 "targets", "--num_channels", "13", "--max_train_steps", "1",
                                 "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert metrics["num_images"] == 8
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_channels"] == 13


def test_labels_derived_from_masks_parquet(tmp_path):
    rows = []
    for i in range(6):
        mask = np.zeros((32, 32), np.uint8)
        mask[:16] = 1 + i % 2
        mask[0, 0] = 255
        rows.append({"image": rgb(i), "annotation": Image.fromarray(mask)})
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    os.makedirs(tmp_path / "pq")
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "pq" / "validation.parquet"))
    metrics = run_pretrain.main([*TINY, "--dataset_name", str(tmp_path / "pq"), "--label_names", "bg", "a", "b",
                                 "--background_label_id", "0", "--max_train_steps", "1",
                                 "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert "pseudo_mask_mean_iou" in metrics and metrics["num_images"] == 6


def write_voc(root, names, size=(40, 48)):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(root / sub, exist_ok=True)
    for i, name in enumerate(names):
        rgb(i, size).save(root / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros(size, np.uint8)
        mask[5:20, 5:30] = 1 + i % 20
        mask[20, :] = 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0] * 128)
        png.save(root / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def test_voc_tree(tmp_path):
    write_voc(tmp_path / "VOC", [f"2007_{i:06d}" for i in range(5)])
    metrics = run_pretrain.main([*TINY, "--voc_root", str(tmp_path / "VOC"), "--max_train_steps", "1",
                                 "--output_dir", str(tmp_path / "out")])  # fmt: skip
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"]["0"] == "background" and len(config["id2label"]) == 21
    assert "pseudo_mask_mean_iou" in metrics


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    good = [{"image": {"bytes": _png_bytes(rgb(i)), "path": None}, "labels": [0]} for i in range(4)]
    bad = [{"image": {"bytes": b"not an image", "path": None}, "labels": [1]}]
    features = datasets.Features(
        {"image": datasets.Image(), "labels": datasets.List(datasets.ClassLabel(names=["a", "b"]))}
    )
    path = make_disk_dataset(tmp_path / "d", good + bad, features)
    run_pretrain.main([*TINY, "--dataset_name", path, "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")])
    info = json.loads((tmp_path / "o" / "training_data.json").read_text())
    assert info["skipped_undecodable"] == {"train": 1, "validation": 1}
    assert info["splits"] == {"train": 4, "validation": 4}


def _png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_labels", r"No usable labels column: the dataset has columns \['image', 'caption'\]"),
        ("out_of_range", r"Label id 7 is out of range: the model has 2 labels"),
        ("mask_size", r"A mask has size 16x16 but its image is 32x32"),
        ("channels", r"The model expects 3 bands; this input has 4 \(array of shape \(32, 32, 4\)"),
        ("wrong_column", r"labels_column 'tags' is not a column of the dataset"),
    ],
)
def test_bad_inputs(tmp_path, case, message):
    names = datasets.ClassLabel(names=["a", "b"])
    if case == "no_labels":
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        examples = [{"image": rgb(0), "caption": "x"}]
    elif case in ("out_of_range", "wrong_column"):
        features = datasets.Features({"image": datasets.Image(), "labels": datasets.List(datasets.Value("int64"))})
        examples = [{"image": rgb(0), "labels": [0]}, {"image": rgb(1), "labels": [7]}]
    elif case == "mask_size":
        features = datasets.Features(
            {"image": datasets.Image(), "labels": datasets.List(names), "mask": datasets.Image()}
        )
        examples = [{"image": rgb(0), "labels": [0], "mask": Image.fromarray(np.zeros((16, 16), np.uint8))}]
    else:
        features = datasets.Features(
            {"image": datasets.Array3D((32, 32, 4), "float32"), "labels": datasets.List(names)}
        )
        examples = [{"image": np.zeros((32, 32, 4), np.float32), "labels": [0]}]
    path = make_disk_dataset(tmp_path / "d", examples, features)
    extra = ["--labels_column", "tags"] if case == "wrong_column" else []
    extra += ["--label_names", "a", "b"] if case == "out_of_range" else []
    with pytest.raises(ValueError, match=message):
        run_pretrain.main([*TINY, "--dataset_name", path, "--max_train_steps", "1",
                           "--output_dir", str(tmp_path / "o"), *extra])  # fmt: skip


def test_push_to_hub_uses_hub_client(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            # What a Hub repo would receive: every file not matched by the ignore patterns.
            uploaded = []
            for root, _, files in os.walk(folder_path):
                for name in files:
                    rel = os.path.relpath(os.path.join(root, name), folder_path)
                    if not any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns):
                        uploaded.append(rel)
                        os.makedirs(os.path.dirname(tmp_path / "hub" / rel), exist_ok=True)
                        shutil.copy(os.path.join(folder_path, rel), tmp_path / "hub" / rel)
            calls.append(("upload_folder", repo_id, sorted(uploaded), ignore_patterns))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    hub = ["--push_to_hub", "--hub_model_id", "me/clsmask-shapes", "--checkpointing_steps", "1"]
    run_pretrain.main([*TINY, *BUILTIN, "--max_train_steps", "1", "--output_dir", str(tmp_path / "o"), *hub])
    create = [c for c in calls if c[0] == "create_repo"]
    upload = [c for c in calls if c[0] == "upload_folder"]
    assert create == [("create_repo", "me/clsmask-shapes", True)]
    files = upload[0][2]
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json", "modeling_clsmask.py",
            "configuration_clsmask.py", "pseudo_masks.py", "image_processing_clsmask.py"} <= set(files)  # fmt: skip
    assert not any(f.startswith("checkpoints") for f in files)
    assert ModelCard.load(tmp_path / "hub" / "README.md").data.model_name == "me/clsmask-shapes"
    Image.fromarray(np.random.randint(0, 255, (45, 61, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = run_isolated(
        """
        from transformers import pipeline
        result = pipeline("image-segmentation", model="hub", trust_remote_code=True)("img.png")
        assert result and all(r["mask"].size == (61, 45) for r in result), result
        print("OK", sorted(r["label"] for r in result))
        """,
        tmp_path,
    )
    assert out.startswith("OK")


def test_two_processes_gloo(tmp_path):
    """`accelerate launch --cpu --num_processes 2`: metrics gathered over both processes, files from the main one."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", run_pretrain.__file__, *TINY,
           "--train_size", "40", "--validation_size", "18", "--synthetic_image_size", "32",
           "--max_train_steps", "2", "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["num_images"] == 18  # 9 per process, no duplicates from padding
    assert "pseudo-mask mIoU" in result.stdout


def test_recipes_are_valid_and_voc_recipe_runs(tmp_path):
    import glob

    for path in glob.glob(os.path.join(os.path.dirname(run_pretrain.__file__), "recipes", "*.json")):
        recipe = json.loads(open(path).read())
        assert "args" in recipe and "paper_results" in recipe
        run_pretrain.parse_args(["--recipe", path])  # every key is a known option
    args = run_pretrain.parse_args(["--recipe", "voc", "--image_size", "32"])
    assert args.token_mask_rate == 0.5 and args.use_head_gates and args.image_size == 32 and args.patch_size == 16
    write_voc(tmp_path / "VOC", [f"2008_{i:06d}" for i in range(3)], size=(32, 32))
    # The recipe's ViT-B init needs the network: tests override it (and the size) on the command line.
    voc = ["--recipe", "voc", "--voc_root", str(tmp_path / "VOC"), "--init_from", ""]
    tiny = [*TINY, "--attention_map_layers", "2", "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]
    metrics = run_pretrain.main([*voc, *tiny])
    assert "pseudo_mask_mean_iou" in metrics
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["use_head_gates"] and config["token_mask_rate"] == 0.5
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(["--recipe", "nope"])
    # The paper's configuration makes its maps in one pass.
    paper_args = run_pretrain.parse_args(["--recipe", "paper", *TINY, "--attention_map_layers", "2"])
    paper = run_pretrain.build_model(paper_args, ["a", "b"])
    assert paper.config.attention_map_scales == [1.0] and not paper.config.attention_map_flip
    assert paper.config.attention_map_refinement_iterations == 0
    # With a background class, 'auto' follows the maps: refined maps take the higher threshold.
    assert run_pretrain.mask_settings(paper_args, 0)["background_threshold"] == run_pretrain.RAW_BACKGROUND
    scratch = run_pretrain.mask_settings(run_pretrain.parse_args(TINY), 0)
    assert scratch["background_threshold"] == run_pretrain.REFINED_BACKGROUND
    assert run_pretrain.mask_settings(paper_args, None)["background_threshold"] is None


def make_splits(path, train: list[dict], validation: list[dict], features: datasets.Features):
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(train, features=features),
            "validation": datasets.Dataset.from_list(validation, features=features),
        }
    ).save_to_disk(str(path))
    return str(path)


def test_empty_or_missing_split_is_named():
    from modeling_clsmask.training.data import DataSpec, validate_splits

    features = datasets.Features({"image": datasets.Image(), "labels": datasets.List(datasets.Value("int64"))})
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"image": rgb(0), "labels": [0]}], features=features),
            "validation": datasets.Dataset.from_dict({"image": [], "labels": []}, features=features),
        }
    )
    spec = DataSpec(data, ["a", "b"], "image", "labels", None, "ids", None, "test")
    validate_splits(spec, ["train"])
    with pytest.raises(ValueError, match="Split 'validation' is empty"):
        validate_splits(spec, ["train", "validation"])
    with pytest.raises(ValueError, match=r"Split 'test' not found; the dataset has \['train', 'validation'\]"):
        validate_splits(spec, ["test"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("label", r"Split 'validation', row 1, labels \[7\]: Label id 7 is out of range"),
        ("name", r"Split 'validation', row 0, labels \['zebra'\]: Label 'zebra' is not a class name"),
        ("mask", r"Split 'validation', row 1: mask value\(s\) \[9\] out of range for 3 classes"),
    ],
)
def test_bad_validation_split_stops_before_training(tmp_path, monkeypatch, case, message):
    """A bad validation split is found at start-up, naming split, row and value, before any training step."""
    mask = Image.fromarray(np.zeros((32, 32), np.uint8))
    bad_mask = Image.fromarray(np.full((32, 32), 9, np.uint8))
    if case == "name":
        features = datasets.Features({"image": datasets.Image(), "labels": datasets.List(datasets.Value("string"))})
        train = [{"image": rgb(0), "labels": ["cat"]}, {"image": rgb(1), "labels": ["dog"]}]
        validation = [{"image": rgb(2), "labels": ["zebra"]}]
        extra = ["--label_names", "cat", "dog"]
    elif case == "mask":
        features = datasets.Features(
            {"image": datasets.Image(), "labels": datasets.List(datasets.Value("int64")), "mask": datasets.Image()}
        )
        train = [{"image": rgb(i), "labels": [1], "mask": mask} for i in range(2)]
        validation = [
            {"image": rgb(2), "labels": [1], "mask": mask},
            {"image": rgb(3), "labels": [1], "mask": bad_mask},
        ]
        extra = ["--label_names", "background", "a", "b", "--background_label_id", "0"]
    else:
        features = datasets.Features({"image": datasets.Image(), "labels": datasets.List(datasets.Value("int64"))})
        train = [{"image": rgb(i), "labels": [i % 2]} for i in range(2)]
        validation = [{"image": rgb(2), "labels": [0]}, {"image": rgb(3), "labels": [7]}]
        extra = ["--label_names", "a", "b"]
    path = make_splits(tmp_path / "d", train, validation, features)

    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran before the data was validated")

    monkeypatch.setattr(run_pretrain, "augment_batch", no_training)
    with pytest.raises(ValueError, match=message):
        run_pretrain.main([*TINY, "--dataset_name", path, "--max_train_steps", "1",
                           "--output_dir", str(tmp_path / "o"), *extra])  # fmt: skip
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_string_labels_and_missing_images(tmp_path):
    """Class names in the labels column work (with or without --label_names); None images are skipped and counted."""
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.List(datasets.Value("string"))})
    train = [{"image": rgb(i), "labels": ["dog"] if i % 2 else ["cat", "dog"]} for i in range(6)]
    train.append({"image": None, "labels": ["cat"]})
    path = make_splits(tmp_path / "d", train, train[:3], features)
    for extra in ([], ["--label_names", "cat", "dog"]):
        out = tmp_path / f"o{len(extra)}"
        run_pretrain.main([*TINY, "--dataset_name", path, "--max_train_steps", "1", "--output_dir", str(out),
                           "--num_visualizations", "0", *extra])  # fmt: skip
        info = json.loads((out / "training_data.json").read_text())
        assert info["class_names"] == ["cat", "dog"]
        assert info["skipped_undecodable"] == {"train": 1}
        assert info["splits"] == {"train": 6, "validation": 3}


def test_pretrained_preset_and_background_notice(tmp_path, capsys):
    # With --init_from the 'pretrained' preset fills what the user left out; what the user gives wins.
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=28,
                             patch_size=14)).save_pretrained(tmp_path / "dino")  # fmt: skip
    args = run_pretrain.parse_args(["--init_from", str(tmp_path / "dino"), "--image_size", "28",
                                    "--class_token_layers", "2", "--attention_map_layers", "2",
                                    "--freeze_layers", "2"])  # fmt: skip
    assert args.preset == "pretrained" and args.image_size == 28
    preset = PRESETS["pretrained"]
    assert args.attention_map_scales == preset["attention_map_scales"]
    assert args.learning_rate == preset["learning_rate"] and "image_size" not in args.preset_applied
    model = run_pretrain.build_model(args, ["background", "a"])
    config = model.config
    # Token masking 'auto': on for classes with a background class, off without one; a number wins.
    assert args.token_mask_rate == "auto" and config.token_mask_rate == 0.0
    with_background = run_pretrain.build_model(args, ["background", "a"], background_label_id=0).config
    assert with_background.token_mask_rate == preset["background_token_mask_rate"] > 0
    args.token_mask_rate = 0.25
    assert run_pretrain.build_model(args, ["background", "a"], background_label_id=0).config.token_mask_rate == 0.25
    args.token_mask_rate = "auto"
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(["--init_from", str(tmp_path / "dino"), "--token_mask_rate", "none"])
    assert config.backbone_family == "dinov2" and config.class_token_layers == 2 and config.attention_map_layers == 2
    assert config.attention_map_refinement_iterations == preset["attention_map_refinement_iterations"]
    assert config.patch_classifier_top_fraction == preset["patch_classifier_top_fraction"] < 1
    assert config.cam_probability is preset["cam_probability"] is True
    assert config.attention_map_affinity_power == preset["attention_map_affinity_power"] > 0
    # The preset's image logits blend the branch with the patch classifier; without the latter, the branch's alone.
    assert config.image_branch_logit_weight == preset["image_branch_logit_weight"] < 1
    # Test-time scales 'auto': an upscaled pass for a coarse patch grid (28 px, patch 14: 2 x 2), one pass for a fine
    # one; the image logits average every pass; scales given win.
    assert args.attention_map_scales == ["auto"] and config.attention_map_scales == [1.0, 1.5]
    assert config.image_logits_over_scales is preset["image_logits_over_scales"] is True
    fine = argparse.Namespace(**{**vars(args), "image_size": 14 * run_pretrain.COARSE_GRID})
    assert run_pretrain.build_model(fine, ["background", "a"]).config.attention_map_scales == [1.0]
    given = run_pretrain.parse_args(["--init_from", str(tmp_path / "dino"), "--attention_map_scales", "1", "2"])
    assert run_pretrain.resolve_attention_map_scales(given, 2) == [1.0, 2.0]
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(["--init_from", str(tmp_path / "dino"), "--attention_map_scales", "big"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(["--init_from", str(tmp_path / "dino"), "--attention_map_scales", "auto", "1.5"])
    assert "'auto' stands alone" in capsys.readouterr().err
    args.use_patch_classifier, args.class_map_source = False, "attention"
    assert run_pretrain.build_model(args, ["background", "a"]).config.image_branch_logit_weight == 1.0
    args.use_patch_classifier, args.class_map_source = True, preset["class_map_source"]
    settings = run_pretrain.mask_settings(args, 0)
    assert settings["background_threshold"] == preset["auto_background_threshold"] != run_pretrain.RAW_BACKGROUND
    assert settings["mask_assembly"] == preset["mask_assembly"]
    # Frozen: the patch embedding, positions and the first two blocks; the rest trains.
    assert not any(p.requires_grad for p in model.clsmask.layers[1].parameters())
    assert all(p.requires_grad for p in model.clsmask.layers[2].parameters())
    assert not model.clsmask.embeddings.position_embeddings.requires_grad
    assert model.clsmask.embeddings.class_tokens.requires_grad
    # Head gates on the hidden class tokens learn in frozen blocks (they gate the class rows only), so the patch rows
    # stay frozen and the feature cache still holds them.
    gated_args = argparse.Namespace(**{**vars(args), "use_head_gates": True, "freeze_layers": -1})
    gated = run_pretrain.build_model(gated_args, ["background", "a"]).clsmask
    assert [gate.log_alpha.requires_grad for gate in gated.head_gates()] == [True, True]
    assert not any(p.requires_grad for name, p in gated.layers.named_parameters() if "head_gate" not in name)
    assert gated.patch_rows_are_frozen()
    # New parameters learn faster than the backbone.
    optimizer = run_pretrain.build_optimizer(args, model)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    multiplier = preset["new_parameter_lr_multiplier"]
    assert rates[id(model.clsmask.embeddings.class_tokens)] == args.learning_rate * multiplier
    assert rates[id(model.clsmask.layers[3].mlp.fc1.weight)] == args.learning_rate
    # The patch classifier (a linear probe on the patch tokens) takes its own, larger factor.
    patch_multiplier = preset["patch_classifier_lr_multiplier"]
    assert patch_multiplier > multiplier
    assert rates[id(model.patch_classifier.dense.weight)] == args.learning_rate * patch_multiplier
    # A background class that no mask holds is not painted under 'auto' ...
    assert run_pretrain.mask_settings(args, 0, background_in_masks=False)["background_threshold"] is None
    # ... unless asked for.
    args.background_threshold = 0.3
    assert run_pretrain.mask_settings(args, 0, background_in_masks=False)["background_threshold"] == 0.3
    with pytest.raises(ValueError, match="blocks"):
        run_pretrain.freeze_early_layers(model, 9)


def test_cached_features_train_the_weights_the_full_backbone_trains(tmp_path, caplog, monkeypatch):
    # With nothing below the class tokens learning and the flip as the only augmentation, training from cached block
    # inputs replays the uncached run: the same rows in the same order, the same flip draws, the same token masking.
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=28,
                             patch_size=14)).save_pretrained(tmp_path / "dino")  # fmt: skip
    common = [*BUILTIN, "--init_from", str(tmp_path / "dino"), "--image_size", "28", "--max_train_steps", "4",
              "--per_device_train_batch_size", "8", "--baseline_train_samples", "0", "--num_visualizations", "0",
              "--mixed_precision", "no"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        run_pretrain.main([*common, "--output_dir", str(tmp_path / "cached")])
        assert "Features cached: the inputs of block 1 for 48 training images" in caplog.text
        assert "with the frozen patch rows of blocks 2-2" in caplog.text  # the class rows alone run above
        assert "Test-time scales 'auto': [1.0, 1.5] (patch grid 2 x 2;" in caplog.text
        caplog.clear()
        run_pretrain.main([*common, "--cache_features", "off", "--output_dir", str(tmp_path / "full")])
        assert "Features cached" not in caplog.text
        caplog.clear()
        # Room for the block inputs (5.7e-5 GiB) but not for the patch rows above them too: the inputs alone.
        monkeypatch.setattr(run_pretrain, "FEATURE_CACHE_MAX_GIB", 1e-4)
        run_pretrain.main([*common, "--output_dir", str(tmp_path / "inputs_only")])
        assert "Features cached: the inputs of block 1 for 48 training images as given and flipped (" in caplog.text
        assert "the frozen patch rows above, 0.0 GiB more, exceed 0.0001 GiB" in caplog.text
    full = load_file(tmp_path / "full" / "model.safetensors")
    for run in ("cached", "inputs_only"):
        cached = load_file(tmp_path / run / "model.safetensors")
        for key in full:
            torch.testing.assert_close(cached[key], full[key], atol=1e-6, rtol=1e-5, msg=f"{run}: {key}")
    names = ["background", "disk", "square", "triangle", "cross", "ring"]
    started = run_pretrain.build_model(run_pretrain.parse_args(common), names).state_dict()
    assert not torch.allclose(started["patch_classifier.dense.weight"], full["patch_classifier.dense.weight"])

    # What would change the features between steps keeps the backbone running, and the log says why.
    args = run_pretrain.parse_args([*common, "--crop_scale_min", "0.5"])
    model = run_pretrain.build_model(args, ["a", "b"])
    assert run_pretrain.feature_cache_blocker(args, model) == "random crops change the features every epoch"
    args = run_pretrain.parse_args([*common, "--freeze_layers", "1"])
    assert "learn" in run_pretrain.feature_cache_blocker(args, run_pretrain.build_model(args, ["a", "b"]))


def test_backbone_baselines_fit_on_the_models_rows_and_are_reported_beside_its_figures(tmp_path, monkeypatch, capsys):
    # With --init_from and masks the run fits the frozen-backbone heads on --baseline_train_samples rows drawn from the
    # rows the model trains on (--max_train_samples of them), and reports them for validation and test.
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28,
                             patch_size=14)).save_pretrained(tmp_path / "dino")  # fmt: skip
    draws, fits = [], []
    real_draw, real_fit = run_pretrain.sample_training_rows, run_pretrain.frozen_baselines

    def draw(data, max_train_samples, count, seed):
        draws.append((len(data), max_train_samples, count, seed))
        return real_draw(data, max_train_samples, count, seed)

    def fit(path, image_size, train, loaders, *args, **kwargs):
        fits.append((path, image_size, len(train.dataset), sorted(loaders)))
        return real_fit(path, image_size, train, loaders, *args, **kwargs)

    monkeypatch.setattr(run_pretrain, "sample_training_rows", draw)
    monkeypatch.setattr(run_pretrain, "frozen_baselines", fit)
    common = [*BUILTIN, "--init_from", str(tmp_path / "dino"), "--image_size", "28", "--max_train_steps", "1",
              "--num_visualizations", "0", "--mixed_precision", "no", "--seed", "3"]  # fmt: skip
    metrics = run_pretrain.main([*common, "--max_train_samples", "24", "--baseline_train_samples", "12",
                                 "--output_dir", str(tmp_path / "a")])  # fmt: skip
    # Both draw from the model's 24 rows (cut once after loading): the class-mean start (a background class) and the
    # baselines, which ask for 12.
    assert (24, None, 12, 3) in draws and all(rows == 24 for rows, *_ in draws)
    assert fits == [(str(tmp_path / "dino"), 28, 12, ["", "test_"])]
    for prefix in ("", "test_"):
        for key in ("frozen_cam_mean_iou", "frozen_cam_tuned_mean_iou", "label_only_mean_iou", "linear_probe_mean_iou",
                    "frozen_cam_mAP"):  # fmt: skip
            assert 0.0 <= metrics[f"{prefix}baseline_{key}"] <= 1.0, (prefix, key)
    printed = capsys.readouterr().out
    assert "this model - CAM" in printed and "[test]" in printed
    # The cards say which rows the model saw.
    with open(tmp_path / "a" / "training_data.json") as handle:
        described = json.load(handle)
    assert described["splits"]["train"] == 24 and described["drawn_at_random_from"] == {"train": 48}
    assert "train: 24 drawn at random from 48" in (tmp_path / "a" / "README.md").read_text()
    # Never more rows than the model itself trains on.
    fits.clear()
    run_pretrain.main([*common, "--max_train_samples", "8", "--baseline_train_samples", "12",
                       "--output_dir", str(tmp_path / "b")])  # fmt: skip
    assert fits[0][2] == 8
    # 0 skips them.
    fits.clear()
    metrics = run_pretrain.main([*common, "--baseline_train_samples", "0", "--output_dir", str(tmp_path / "c")])
    assert not fits and not any(key.startswith(("baseline_frozen", "test_baseline_frozen")) for key in metrics)


def test_class_mean_init_starts_each_class_at_its_images_mean_cls_state(tmp_path, caplog):
    # 'class_mean': class c enters the first block with class tokens as the mean [REG] ([CLS]) state there over the
    # training images holding c; a class no image holds gets all images' mean.
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=28,
                             patch_size=14)).save_pretrained(tmp_path / "dino")  # fmt: skip
    args = run_pretrain.parse_args(["--init_from", str(tmp_path / "dino"), "--image_size", "28"])
    model = run_pretrain.build_model(args, ["a", "b", "c"])
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 28, 28)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    loader = [{"pixel_values": pixels[:4], "labels": labels[:4]}, {"pixel_values": pixels[4:], "labels": labels[4:]}]
    run_pretrain.init_class_tokens_from_data(model, loader)
    base = model.clsmask
    first = base.first_class_token_layer()
    assert first == 2 and base.training  # the last block only; the train mode is restored
    cls_states = base.class_block_register_states(pixels)[:, -1]
    expected = torch.stack([cls_states[labels[:, 0] == 1].mean(0), cls_states[labels[:, 1] == 1].mean(0),
                            cls_states.mean(0)])  # fmt: skip
    base.eval()
    entering = base(pixels, output_hidden_states=True).hidden_states[first][:, :3]
    torch.testing.assert_close(entering, expected.expand(6, -1, -1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the classes no longer start alike

    # 'auto' (the preset): the class-mean start where the classes include a background class, else the embedding.
    assert args.class_token_init == "auto"
    assert run_pretrain.resolve_class_token_init(args, True) == "class_mean"
    assert run_pretrain.resolve_class_token_init(args, False) == "embedding"
    # A run does this and says so; CLIP's pre-encoder norm rules it out (a notice, or an error when asked for by
    # name).
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=28, patch_size=14)).save_pretrained(tmp_path / "clip")  # fmt: skip
    common = [*BUILTIN, "--image_size", "28", "--max_train_steps", "1", "--baseline_train_samples", "0",
              "--num_visualizations", "0"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        run_pretrain.main(["--init_from", str(tmp_path / "dino"), *common, "--output_dir", str(tmp_path / "a")])
        run_pretrain.main(["--init_from", str(tmp_path / "clip"), *common, "--output_dir", str(tmp_path / "b")])
    assert "Class-token start 'auto': class_mean (the classes include a background class)" in caplog.text
    assert "Class tokens start as their class's mean [REG] state at block 2 (48 training images)" in caplog.text
    assert "pre-encoder norm (CLIP) rules out" in caplog.text
    with pytest.raises(ValueError, match="--class_token_init embedding"):
        run_pretrain.main(["--init_from", str(tmp_path / "clip"), *common, "--class_token_init", "class_mean",
                           "--output_dir", str(tmp_path / "c")])  # fmt: skip


def test_ablation_benchmark_rescore_reproduces_its_runs(tmp_path):
    # --rescore rebuilds each variant's map settings from the current defaults (refined maps for `shipped`, one raw
    # pass for `paper`); on runs trained by this code it must give back the figures they printed.
    sys.path.insert(0, os.path.join(os.path.dirname(run_pretrain.__file__), "benchmarks"))
    import bench_token_masking

    common = ["--seeds", "0", "--generators", "glyphs", "--variants", "shipped", "paper", "--epochs", "1",
              "--train_size", "16", "--output_dir", str(tmp_path)]  # fmt: skip
    extra = ["--extra", *TINY, "--attention_map_layers", "2", "--validation_size", "16",
             "--synthetic_image_size", "32", "--num_visualizations", "0"]  # fmt: skip
    trained = json.loads(json.dumps(bench_token_masking.main([*common, *extra])))
    rescored = bench_token_masking.main([*common, "--rescore", *extra])
    for key in ("glyphs/shipped/0", "glyphs/paper/0"):
        assert rescored[key]["rescored"]
        for metric in ("test_pseudo_mask_mean_iou", "test_class_assignment_accuracy", "test_mAP"):
            assert rescored[key][metric] == pytest.approx(trained[key][metric], abs=1e-6), (key, metric)


def test_the_image_branch_gradients_are_clipped_apart_from_the_rest():
    # The branch learns for its own loss; clipped with the rest, its large gradients would shrink the class tokens'
    # and patch classifier's steps (the maps' heads).
    from accelerate import Accelerator
    from conftest import tiny_config

    from modeling_clsmask import ClsMaskForMultiLabelClassification
    from modeling_clsmask.training.loop import clip_groups

    model = ClsMaskForMultiLabelClassification(tiny_config(class_token_layers=1, image_branch_layers=1))
    model.clsmask.layers[0].requires_grad_(False)
    rest, branch = clip_groups(model, ("image_branch",))
    assert {id(p) for p in branch} == {id(p) for p in model.image_branch.parameters()}
    assert {id(p) for p in rest} == {
        id(p) for name, p in model.named_parameters() if p.requires_grad and not name.startswith("image_branch.")
    }
    assert len(clip_groups(model, ())) == 1
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 1e-4)
    for parameter in branch:
        parameter.grad.fill_(10.0)
    for parameters in clip_groups(model, ("image_branch",)):
        Accelerator(cpu=True).clip_grad_norm_(parameters, 1.0)
    assert all(torch.all(p.grad == 1e-4) for p in rest)  # below the norm: untouched by the branch's
    assert torch.cat([p.grad.flatten() for p in branch]).norm() == pytest.approx(1.0, rel=1e-4)


def test_timing_the_attention_kernels_leaves_the_model_as_it_came():
    # '--training_attention auto' runs training steps before training: they must not move the batch-norm statistics,
    # leave gradients behind, draw on the training's random numbers or keep the kernel switched.
    from accelerate import Accelerator
    from conftest import tiny_config

    from modeling_clsmask import ClsMaskForMultiLabelClassification
    from modeling_clsmask.training.loop import choose_training_attention

    model = ClsMaskForMultiLabelClassification(tiny_config(patch_embedding_type="conv", conv_stem_depth=2)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert any("running_mean" in name for name in before)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.eye(4, model.config.num_labels)}
    rng = torch.get_rng_state()
    choice, times = choose_training_attention(
        Accelerator(cpu=True), model, model.config, lambda m, b: m(**b).loss, batch
    )
    assert set(times) == {"sdpa", "eager"} and choice == min(times, key=times.get)
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(parameter.grad is None for parameter in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
