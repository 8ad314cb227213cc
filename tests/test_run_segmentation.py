"""run_segmentation.py on tiny data: pseudo-masks, saved dataset schema, TTA override, segmentation, baseline."""

import json

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from test_run_pretrain import BUILTIN, TINY

import run_pretrain
import run_segmentation
from modeling_clsmask import ClsMaskForMultiLabelClassification
from modeling_clsmask.training import loop


SEG = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--num_visualizations", "2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    run_pretrain.main(
        [*TINY, *BUILTIN, "--max_train_steps", "2", "--output_dir", str(out), "--num_visualizations", "0"]
    )
    return str(out)


def test_end_to_end_with_tta_and_baseline(stage1, tmp_path):
    out = tmp_path / "seg"
    results = run_segmentation.main(
        [
            "--model_name_or_path",
            stage1,
            *BUILTIN,
            *SEG,
            "--max_train_steps",
            "2",
            "--scales",
            "1.0",
            "0.75",
            "1.25",
            "--flip",
            "--refinement_iterations",
            "3",
            "--fully_supervised_baseline",
            "--max_train_samples",
            "40",
            "--output_dir",
            str(out),
        ]  # fmt: skip
    )
    # The baseline trains on the same 40 images as the weak model, so their ratio compares like with like.
    assert results["weak_train_images"] == results["full_train_images"] == 40
    for key in ("pseudo_mask_mean_iou", "segmentation_mean_iou", "fully_supervised_mean_iou"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["weak_to_full_ratio"] == pytest.approx(
        results["segmentation_mean_iou"] / results["fully_supervised_mean_iou"]
    )
    assert results["pseudo_label_source"] == "labels"
    # --scales / --flip / --refinement_iterations override the checkpoint's processing of the maps for this run.
    assert results["scales"] == [1.0, 0.75, 1.25] and results["flip"] is True and results["refinement_iterations"] == 3
    with pytest.raises(SystemExit):
        run_segmentation.parse_args(["--model_name_or_path", stage1, "--refinement_iterations", "-1"])
    saved = datasets.load_from_disk(str(out / "pseudo_masks"))
    assert list(saved) == ["train", "validation"] and len(saved["train"]) == 40 and len(saved["validation"]) == 16
    assert 0.0 <= results["validation_pseudo_mask_mean_iou"] <= 1.0
    assert {"image", "pseudo_mask", "mask", "labels"} <= set(saved["train"].column_names)
    assert isinstance(saved["train"].features["pseudo_mask"], datasets.Image)
    example = saved["train"][0]
    assert example["pseudo_mask"].size == example["image"].size
    # The reported pseudo-mask mIoU is that of the saved masks against the real ones (recomputed here).
    from modeling_clsmask.training.metrics import confusion_matrices, iou_from_confusion

    pseudo = torch.tensor(np.stack([np.asarray(m) for m in saved["train"]["pseudo_mask"]])).long()
    real = torch.tensor(np.stack([np.asarray(m) for m in saved["train"]["mask"]])).long()
    num_classes = len(results["segmentation_per_class_iou"])
    recomputed = iou_from_confusion(confusion_matrices(pseudo, real, num_classes).sum(0))
    assert recomputed["mean_iou"] == pytest.approx(results["pseudo_mask_mean_iou"])
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json",
                 "validation_panels.png", "pseudo_mask_results.json"):  # fmt: skip
        assert (out / name).exists(), name
    card = ModelCard.load(out / "README.md")
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["Segmentation mIoU"] == round(results["segmentation_mean_iou"], 4)
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert type(model).__name__ == "UperNetForSemanticSegmentation"  # the default stage-2 model


def test_pipeline_processor_and_stage2_pseudo_masks_are_equal(stage1, tmp_path):
    """One path from pixels to masks: on one checkpoint, the pipeline's masks, the processor's and stage 2's saved
    pseudo-masks are the same, pixel for pixel (the image labels given, as stage 2 uses them)."""
    from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor, ClsMaskSegmentationPipeline

    out = tmp_path / "seg"
    run_segmentation.main(["--model_name_or_path", stage1, *BUILTIN, *SEG, "--max_train_steps", "1",
                           "--max_train_samples", "12", "--pseudo_batch_size", "5", "--num_visualizations", "0",
                           "--output_dir", str(out)])  # fmt: skip
    saved = datasets.load_from_disk(str(out / "pseudo_masks"))["train"]
    model = ClsMaskForSemanticSegmentation.from_pretrained(stage1).eval()
    processor = ClsMaskImageProcessor.from_pretrained(stage1)
    assert processor.background_threshold is not None  # the built-in data has background: it is part of the check
    pipe = ClsMaskSegmentationPipeline(model=model, image_processor=processor)
    names = model.config.id2label
    for example in saved:
        image, labels = example["image"], example["labels"]  # class ids, as stage 2 read them
        stage2 = np.asarray(example["pseudo_mask"])
        present = torch.zeros(1, model.config.num_labels, dtype=torch.long)
        present[0, labels] = 1
        outputs = model.predict_class_maps(**processor(image, return_tensors="pt"), image_labels=present)
        direct = processor.post_process_semantic_segmentation(outputs, [(image.height, image.width)])[0].numpy()
        from_pipeline = np.full(stage2.shape, -1)
        for result in pipe(image, labels=[names[i] for i in labels]):
            from_pipeline[np.asarray(result["mask"]) > 0] = model.config.label2id[result["label"]]
        np.testing.assert_array_equal(direct, stage2)
        np.testing.assert_array_equal(from_pipeline, stage2)
    assert len({tuple(np.unique(np.asarray(m))) for m in saved["pseudo_mask"]}) > 1  # not one constant answer


def test_ignore_margin_unlabels_only_close_calls_of_the_training_masks(stage1, tmp_path):
    from modeling_clsmask import ClsMaskForSemanticSegmentation, ClsMaskImageProcessor

    out = tmp_path / "seg"
    run_segmentation.main(["--model_name_or_path", stage1, *BUILTIN, *SEG, "--max_train_steps", "1",
                           "--max_train_samples", "8", "--num_visualizations", "0", "--ignore_margin", "0.3",
                           "--output_dir", str(out)])  # fmt: skip
    saved = datasets.load_from_disk(str(out / "pseudo_masks"))
    model = ClsMaskForSemanticSegmentation.from_pretrained(stage1).eval()
    processor = ClsMaskImageProcessor.from_pretrained(stage1)
    unlabelled = 0
    for example in saved["train"]:
        image, stage2 = example["image"], np.asarray(example["pseudo_mask"])
        present = torch.zeros(1, model.config.num_labels, dtype=torch.long)
        present[0, example["labels"]] = 1
        outputs = model.predict_class_maps(**processor(image, return_tensors="pt"), image_labels=present)
        complete = processor.post_process_semantic_segmentation(outputs, [(image.height, image.width)])[0].numpy()
        kept = stage2 != 255
        np.testing.assert_array_equal(stage2[kept], complete[kept])
        unlabelled += int((~kept).sum())
    assert unlabelled > 0
    assert all(255 not in np.unique(np.asarray(m)) for m in saved["validation"]["pseudo_mask"])
    report = json.loads((out / "pseudo_mask_results.json").read_text())
    assert report["ignore_margin"] == 0.3 and 0 < report["labelled_fraction"] < 1


def test_stage2_keeps_stage1_normalisation(stage1, tmp_path):
    # Stage 2 reads the stage-1 processor (was rebuilt from the config, losing --image_mean / --image_std).
    import json
    import shutil

    folder = tmp_path / "stage1"
    shutil.copytree(stage1, folder)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    saved.update(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    (folder / "preprocessor_config.json").write_text(json.dumps(saved))
    config = ClsMaskForMultiLabelClassification.from_pretrained(folder).config
    args = run_segmentation.parse_args(["--model_name_or_path", str(folder)])
    processor = run_segmentation.stage1_processor(args, config)
    assert (list(processor.image_mean), list(processor.image_std)) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert processor.background_threshold == saved["background_threshold"] is not None
    args = run_segmentation.parse_args(["--model_name_or_path", str(folder), "--background_threshold", "none"])
    assert run_segmentation.stage1_processor(args, config).background_threshold is None


def test_segmentation_architectures():
    # Both from-scratch choices take the data's band count and classes, and ignore 255 in their loss.
    classes = ["background", "a", "b"]
    for architecture, name in (("upernet", "UperNetForSemanticSegmentation"),
                               ("segformer", "SegformerForSemanticSegmentation")):  # fmt: skip
        args = run_segmentation.parse_args(["--model_name_or_path", "x", "--seg_architecture", architecture])
        model = run_segmentation.build_segmenter(args, classes, 32, 4)
        assert type(model).__name__ == name
        pixels, masks = torch.randn(2, 4, 32, 32), torch.full((2, 32, 32), 255)
        masks[:, :4] = 1
        out = model(pixel_values=pixels, labels=masks)
        assert out.logits.shape[:2] == (2, 3) and torch.isfinite(out.loss)
    with pytest.raises(SystemExit):
        run_segmentation.parse_args(["--model_name_or_path", "x", "--seg_architecture", "nope"])


def test_class_mismatch_is_reported(stage1, tmp_path):
    model = ClsMaskForMultiLabelClassification.from_pretrained(stage1)
    names = {i: f"x{i}" for i in range(model.config.num_labels)}
    model.config.id2label, model.config.label2id = names, {v: k for k, v in names.items()}
    model.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="differ from the stage-1 model"):
        run_segmentation.main(["--model_name_or_path", str(tmp_path / "other"), *BUILTIN, *SEG,
                               "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")])  # fmt: skip


def test_missing_model_path_is_named(tmp_path):
    missing = str(tmp_path / "no" / "such" / "stage1")
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*no such local folder"):
        run_segmentation.main(["--model_name_or_path", missing, *BUILTIN, "--output_dir", str(tmp_path / "o")])


def test_resume_both_models_gives_identical_results(stage1, tmp_path, capsys):
    """Interrupted while the weak model or while the baseline trained, `--resume_from_checkpoint latest` ends where
    the uninterrupted run did: same weights, same metrics, bit for bit."""
    import json
    import shutil

    from safetensors.torch import load_file

    args = ["--model_name_or_path", stage1, *BUILTIN, *SEG, "--max_train_samples", "40", "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--fully_supervised_baseline", "--num_visualizations", "0"]  # fmt: skip
    full = run_segmentation.main([*args, "--output_dir", str(tmp_path / "full")])
    weights = load_file(tmp_path / "full" / "model.safetensors")
    marker = json.loads((tmp_path / "full" / "clsmask_run.json").read_text())
    assert marker["checkpoints"] == [f"checkpoints_{m}/step_{s}" for m in ("weak", "full") for s in (2, 4)]

    weak_done = ["checkpoints_weak/step_2", "checkpoints_weak/step_4"]
    for interrupted, kept in (("full", [*weak_done, "checkpoints_full/step_2"]), ("weak", weak_done[:1])):
        run = tmp_path / f"interrupted_in_{interrupted}"
        shutil.copytree(tmp_path / "full", run)
        for name in ("model.safetensors", "eval_results.json"):
            (run / name).unlink()
        for checkpoint in set(marker["checkpoints"]) - set(kept):
            shutil.rmtree(run / checkpoint)
        (run / "clsmask_run.json").write_text(json.dumps({**marker, "checkpoints": kept, "finished": False}))
        capsys.readouterr()
        resumed = run_segmentation.main([*args, "--output_dir", str(run), "--resume_from_checkpoint", "latest"])
        # Each model came back from its own newest checkpoint (the weak one from step 4 = its end, when it had one).
        lines = capsys.readouterr().out.splitlines()
        said = [line.split(str(run) + "/")[-1] for line in lines if "Resumed from" in line]
        assert said == ([kept[1], kept[2]] if interrupted == "full" else kept), said
        for key in ("segmentation_mean_iou", "fully_supervised_mean_iou", "segmentation_per_class_iou"):
            assert resumed[key] == full[key], (interrupted, key)
        again = load_file(run / "model.safetensors")
        for key in weights:
            torch.testing.assert_close(again[key], weights[key], rtol=0, atol=0, msg=f"{interrupted}: {key}")


def test_bf16_mixed_precision_on_cpu(stage1, tmp_path, monkeypatch, caplog):
    """`--mixed_precision bf16` runs on CPU in both scripts; pseudo-masks from bf16 maps agree with fp32 ones. On a CPU
    that only emulates bf16 (measured slower than fp32; faked here so every machine tests both paths) a run uses fp32
    and says so, unless `--allow_slow_bf16`."""
    monkeypatch.setattr(loop, "cpu_bf16_slowdown", lambda: 5.0)
    common = [*BUILTIN, *SEG, "--max_train_steps", "1", "--max_train_samples", "16", "--num_visualizations", "0"]
    bf16_args = ["--mixed_precision", "bf16", "--allow_slow_bf16"]
    stage1_bf16 = run_pretrain.main([*TINY, *common, *bf16_args, "--output_dir", str(tmp_path / "p")])
    assert stage1_bf16["train_loss"] == stage1_bf16["train_loss"]  # finite, not nan
    results = {}
    # The tiny model's maps are nearly flat, so the refinement (min-max normalised afterwards) would amplify bf16's
    # rounding; agreement is checked on the raw maps here and on a trained checkpoint in
    # benchmarks/bench_bf16_agreement.py.
    for name, precision in (("no", ["--mixed_precision", "no"]), ("bf16", bf16_args),
                            ("fallback", ["--mixed_precision", "bf16"])):  # fmt: skip
        caplog.clear()
        results[name] = run_segmentation.main(
            ["--model_name_or_path", stage1, *common, *precision, "--refinement_iterations", "0",
             "--output_dir", str(tmp_path / name)]
        )  # fmt: skip
        warned = [r.getMessage() for r in caplog.records if "--allow_slow_bf16" in r.getMessage()]
        assert bool(warned) == (name == "fallback"), (name, warned)
    assert "5.0x slower than fp32" in warned[0]
    masks = {
        name: datasets.load_from_disk(str(tmp_path / name / "pseudo_masks"))["train"]["pseudo_mask"]
        for name in results
    }
    pairs = zip(masks["no"], masks["bf16"])
    agree = float(
        torch.tensor(
            [(torch.tensor(np.asarray(a)) == torch.tensor(np.asarray(b))).float().mean() for a, b in pairs]
        ).mean()
    )
    assert agree >= 0.95, agree
    assert abs(results["bf16"]["pseudo_mask_mean_iou"] - results["no"]["pseudo_mask_mean_iou"]) <= 0.05
    assert [results[name]["mixed_precision"] for name in ("no", "bf16", "fallback")] == ["no", "bf16", "no"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(masks["no"], masks["fallback"]))
    assert results["fallback"]["segmentation_mean_iou"] == results["no"]["segmentation_mean_iou"]


def test_cpu_bf16_slowdown_is_measured_and_a_fast_cpu_keeps_bf16(monkeypatch):
    ratio = loop.cpu_bf16_slowdown()
    assert 0.01 < ratio < 100, ratio  # a measured ratio of two timings, positive and finite
    monkeypatch.setattr(loop, "cpu_bf16_slowdown", lambda: loop.SLOW_BF16_RATIO * 0.9)
    assert loop.make_accelerator(mixed_precision="bf16").mixed_precision == "bf16"
    monkeypatch.setattr(loop, "cpu_bf16_slowdown", lambda: loop.SLOW_BF16_RATIO * 1.1)
    assert loop.make_accelerator(mixed_precision="bf16").mixed_precision == "no"
    assert loop.make_accelerator(mixed_precision="bf16", allow_slow_bf16=True).mixed_precision == "bf16"


def test_segformer_reduction_ratios_keep_enough_keys():
    # SegFormer's defaults (8, 4, 2, 1) are kept for 512 px inputs; at 64 px they would leave 2 x 2 keys per stage.
    assert run_segmentation.reduction_ratios(512) == [8, 4, 2, 1]
    assert run_segmentation.reduction_ratios(64) == [2, 1, 1, 1]
    assert run_segmentation.reduction_ratios(32) == [1, 1, 1, 1]


def test_upernet_on_a_pretrained_backbone(tmp_path):
    # --seg_backbone: UperNet on four blocks of a pretrained AutoBackbone, its weights loaded; frozen on request.
    from transformers import Dinov2Config, Dinov2Model

    source = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
                                      image_size=28, patch_size=14))  # fmt: skip
    source.save_pretrained(tmp_path / "dino")
    normalisation = '{"image_mean": [0.4, 0.5, 0.6], "image_std": [1, 2, 3]}'
    (tmp_path / "dino" / "preprocessor_config.json").write_text(normalisation)
    args = run_segmentation.parse_args(["--model_name_or_path", "x", "--seg_backbone", str(tmp_path / "dino"),
                                        "--seg_freeze_backbone"])  # fmt: skip
    model = run_segmentation.build_segmenter(args, ["a", "b", "c"], 28, 3)
    assert type(model.backbone).__name__ == "Dinov2Backbone" and model.backbone.out_indices == [1, 2, 3, 4]
    torch.testing.assert_close(
        model.backbone.embeddings.patch_embeddings.projection.weight,
        source.embeddings.patch_embeddings.projection.weight,
    )
    assert not any(p.requires_grad for p in model.backbone.parameters())
    masks = torch.full((2, 28, 28), 255)
    masks[:, :7] = 2
    out = model(pixel_values=torch.randn(2, 3, 28, 28), labels=masks)
    assert out.logits.shape == (2, 3, 28, 28) and torch.isfinite(out.loss)
    processor = run_segmentation.segmentation_processor(args, 28, 3)
    assert list(processor.image_mean) == [0.4, 0.5, 0.6] and list(processor.image_std) == [1, 2, 3]  # the backbone's


def test_stage2_push_uploads_only_the_model(stage1, tmp_path, monkeypatch):
    # The stage-2 folder holds pseudo_masks/ (a copy of the training images), checkpoints and tracker logs: none of
    # them is pushed, only the model's top-level files.
    import fnmatch
    import os

    import huggingface_hub

    uploaded = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, exist_ok=False):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            for root, _, files in os.walk(folder_path):
                for name in files:
                    rel = os.path.relpath(os.path.join(root, name), folder_path)
                    if not any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns):
                        uploaded.append(rel)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "seg"
    run_segmentation.main(["--model_name_or_path", stage1, *BUILTIN, *SEG, "--max_train_steps", "2",
                           "--max_train_samples", "16", "--checkpointing_steps", "1", "--with_tracking",
                           "--push_to_hub", "--hub_model_id", "me/seg", "--output_dir", str(out)])  # fmt: skip
    assert (out / "pseudo_masks").is_dir() and any((out / "checkpoints_weak").iterdir())
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= set(uploaded)
    assert all("/" not in name for name in uploaded), uploaded
    assert "clsmask_run.json" not in uploaded and "clsmask_run.lock" not in uploaded
