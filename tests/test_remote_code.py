"""Saved folders load through the Auto classes where this package is not importable (remote code, offline)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from conftest import tiny_config
from PIL import Image

from modeling_clsmask import ClsMaskForMultiLabelClassification, ClsMaskImageProcessor


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_isolated(code: str, cwd) -> str:
    """Run code in a fresh interpreter whose sys.path excludes the repository, offline."""
    prelude = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ('', {str(os.getcwd())!r}, {REPO!r})]
        sys.modules['modeling_clsmask'] = None  # as if the package were not installed (it may be, editable)
        try:
            import modeling_clsmask
            raise SystemExit('modeling_clsmask must not be importable here')
        except ImportError:
            pass
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def saved_checkpoint(path, **overrides):
    config = tiny_config(use_head_gates=True, **overrides)
    model = ClsMaskForMultiLabelClassification(config).eval()
    model.save_pretrained(path)
    ClsMaskImageProcessor.from_model_config(config).save_pretrained(path)
    return model


def test_saved_folder_files_and_auto_map(tmp_path):
    saved_checkpoint(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_clsmask.py",
        "configuration_clsmask.py",
        "pseudo_masks.py",
        "image_processing_clsmask.py",
    } <= files
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_clsmask.ClsMaskModel"
    assert auto_map["AutoModelForSemanticSegmentation"] == "modeling_clsmask.ClsMaskForSemanticSegmentation"
    processor = json.loads((tmp_path / "ckpt" / "preprocessor_config.json").read_text())
    assert processor["auto_map"]["AutoImageProcessor"] == "image_processing_clsmask.ClsMaskImageProcessor"


def test_model_folder_holds_every_file_its_code_imports(tmp_path):
    # The model alone (no processor saved): the pipeline named in custom_pipelines and every relative import of every
    # copied file are in the folder.
    import re

    ClsMaskForMultiLabelClassification(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    named = {entry["impl"].split(".")[0] for entry in config["custom_pipelines"].values()}
    named |= {target.split(".")[0] for target in config["auto_map"].values()}
    files = {name[:-3] for name in os.listdir(tmp_path) if name.endswith(".py")}
    assert named <= files, named - files
    for name in files:
        imported = set(re.findall(r"^from \.(\w+) import", (tmp_path / f"{name}.py").read_text(), re.M))
        assert imported <= files, (name, imported - files)


def test_remote_code_loading_in_fresh_process(tmp_path):
    model = saved_checkpoint(tmp_path / "ckpt")
    pixels = torch.randn(1, 3, 32, 32)
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    with torch.no_grad():
        expected = model(pixels).logits.numpy()
    np.save(tmp_path / "expected.npy", expected)
    Image.fromarray(np.random.randint(0, 255, (45, 61, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = run_isolated(
        """
        import numpy as np, torch
        from transformers import AutoModel, AutoModelForSemanticSegmentation, AutoImageProcessor
        from transformers import AutoModelForImageClassification
        from PIL import Image
        base = AutoModel.from_pretrained("ckpt", trust_remote_code=True)
        assert type(base).__name__ == "ClsMaskModel", type(base)
        clf = AutoModelForImageClassification.from_pretrained("ckpt", trust_remote_code=True).eval()
        pixels = torch.from_numpy(np.load("pixels.npy"))
        np.testing.assert_allclose(clf(pixels).logits.detach().numpy(), np.load("expected.npy"), atol=1e-6)
        seg = AutoModelForSemanticSegmentation.from_pretrained("ckpt", trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained("ckpt", trust_remote_code=True)
        inputs = processor(Image.open("img.png"), return_tensors="pt")
        outputs = seg(**inputs)
        mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[(45, 61)])[0]
        assert tuple(mask.shape) == (45, 61), mask.shape
        print("OK", type(seg).__name__)
        """,
        tmp_path,
    )
    assert "OK ClsMaskForSemanticSegmentation" in out
