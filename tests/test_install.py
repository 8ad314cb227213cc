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
    wheels = tmp_path / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ]
    )
    site = tmp_path / "site"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            *map(str, wheels.glob("*.whl")),
        ]
    )
    assert sorted(p.name for p in (site / "modeling_clsmask/training/model_cards").glob("*.md")) == [
        "pretrain.md",
        "segmentation.md",
    ]

    work = tmp_path / "work"  # neither the checkout nor the copy: only the installed files are importable from here
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # One interpreter (each costs seconds of imports): where the package comes from; the voc recipe's image size as
    # the installed script reads it (the recipes are installed with the package: --recipe works outside the checkout;
    # `--help` alone exits before any recipe is read); then `python -m run_pretrain --help`.
    where_recipe_help = (
        "import runpy, sys, modeling_clsmask, run_pretrain; print(modeling_clsmask.__file__); "
        "parser = run_pretrain.build_parser(); run_pretrain.apply_recipe(parser, ['--recipe', 'voc']); "
        "print(parser.get_default('image_size')); "
        "sys.argv = ['run_pretrain', '--help']; runpy.run_module('run_pretrain', run_name='__main__')"
    )
    where, image_size, help_text = run([sys.executable, "-c", where_recipe_help], cwd=work, env=env).split("\n", 2)
    assert where.strip().startswith(str(site)), where
    assert (site / "modeling_clsmask/training/recipes/voc.json").exists()
    assert image_size == "448", image_size
    assert "--init_from" in help_text
    short = [*BUILTIN, "--max_train_steps", "1", "--num_visualizations", "0"]
    run([sys.executable, "-m", "run_pretrain", *TINY, *short, "--output_dir", "stage1"], cwd=work, env=env)
    seg = ["--model_name_or_path", "stage1", "--max_train_samples", "16", "--output_dir", "seg"]
    run([sys.executable, "-m", "run_segmentation", *short, *seg], cwd=work, env=env)
    for stage, folder in (("pretrain", "stage1"), ("segmentation", "seg")):
        card = (work / folder / "README.md").read_text()
        assert "clsmask" in card and "| learning_rate |" in card, (stage, card[:500])
