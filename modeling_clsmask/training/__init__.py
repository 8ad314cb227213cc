"""The training room: what `run_pretrain.py`, `run_segmentation.py` and the benchmarks share, never copied into a
checkpoint (it may use `datasets`, `accelerate` and `huggingface_hub`).

- `arguments`: the typed data arguments (`DataArguments`) and the command-line value conventions (`auto` / `none` /
  a number);
- `data`: datasets in the layouts users have (Hub, folders, parquet, VOC trees, the built-in generators), checked
  before training, encoded into tensors;
- `synthetic_shapes`: the built-in generators;
- `loop`: the Accelerate plumbing (accelerator, schedule, the epoch loop with accumulation and skip-on-resume);
- `outputs`: output folders (run marker), checkpoints, resume points, Hub pushes;
- `metrics`, `visualization`, `model_card`: what a run reports.

The checkpoint room is the package itself (`modeling_clsmask/*.py`), which imports only torch, transformers, numpy
and Pillow.
"""
