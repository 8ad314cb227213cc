"""`pip install .` (not editable): both scripts run from the installed package alone and write model cards."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_run_pretrain import BUILTIN, TINY


REPO = Path(__file__).resolve().parents[1]
SHIPPED = (
    "pyproject.toml", "README.md", "run_pretrain.py", "run_segmentation.py", "modeling_clsmask", "model_cards",
    "recipes",
)  # fmt: skip


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_non_editable_install_runs_both_scripts_and_writes_cards(tmp_path):
    source = tmp_path / "source"  # a clean copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    site = tmp_path / "site"  # pip builds the wheel and installs it (not editable) in one process
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(site)]
    run([*pip, str(source)])
    assert sorted(p.name for p in (site / "modeling_clsmask/training/model_cards").glob("*.md")) == [
        "pretrain.md",
        "segmentation.md",
    ]

    work = tmp_path / "work"  # neither the checkout nor the copy: only the installed files are importable from here
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # One interpreter for everything (each fresh one costs seconds of imports): where the package comes from; the voc
    # recipe's image size as the installed script reads it (the recipes are installed with the package: --recipe
    # works outside the checkout; `--help` alone exits before any recipe is read); `python -m run_pretrain --help`;
    # then both scripts as `python -m` runs them, stage 2 on stage 1's folder.
    short = [*BUILTIN, "--max_train_steps", "1", "--num_visualizations", "0"]
    seg = ["--model_name_or_path", "stage1", "--max_train_samples", "16", "--output_dir", "seg"]
    script = f"""
import runpy, sys, modeling_clsmask, run_pretrain
print(modeling_clsmask.__file__)
parser = run_pretrain.build_parser()
run_pretrain.apply_recipe(parser, ["--recipe", "voc"])
print(parser.get_default("image_size"))
def main(module, *argv):
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code not in (None, 0):
            raise
main("run_pretrain", "--help")
print("END OF HELP")
main("run_pretrain", *{[*TINY, *short, "--output_dir", "stage1"]!r})
main("run_segmentation", *{[*short, *seg]!r})
"""
    where, image_size, rest = run([sys.executable, "-c", script], cwd=work, env=env).split("\n", 2)
    assert where.strip().startswith(str(site)), where
    assert (site / "modeling_clsmask/training/recipes/voc.json").exists()
    assert image_size == "448", image_size
    assert "--init_from" in rest.split("END OF HELP")[0]
    for stage, folder in (("pretrain", "stage1"), ("segmentation", "seg")):
        card = (work / folder / "README.md").read_text()
        assert "clsmask" in card and "| learning_rate |" in card, (stage, card[:500])
