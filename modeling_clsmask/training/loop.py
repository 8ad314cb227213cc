"""The Accelerate plumbing both scripts share: the accelerator, the schedule, resume points and the epoch loop.

The loop is the `*_no_trainer.py` one: `accelerator.accumulate`, one optimizer step per `gradient_accumulation_steps`
batches, checkpoints every N steps or every epoch, and on resume the checkpoint's epoch re-entered with the batches it
had already seen skipped, so a resumed run replays the same batches and random numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_scheduler

from .outputs import find_checkpoint, save_checkpoint


logger = logging.getLogger(__name__)


# bf16 autocast is kept on a CPU only where it is at most this many times slower than fp32 (where the CPU has native
# bf16 instructions it is faster; where oneDNN emulates them it is several times slower).
SLOW_BF16_RATIO = 1.5


@functools.cache
def cpu_bf16_slowdown() -> float:
    """How many times longer a ViT-S-sized linear layer takes under bf16 autocast than in fp32 on this CPU (best of
    five runs each). Measured, not read off CPU flags: what matters is what oneDNN does with them."""
    layer, inputs = torch.nn.Linear(384, 1536), torch.randn(1024, 384)

    def best(bf16: bool) -> float:
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(6):
                start = time.perf_counter()
                layer(inputs)
                times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(True) / best(False)


def cpu_bf16_is_native() -> bool:
    """Whether bf16 autocast on this CPU is no more than `SLOW_BF16_RATIO` times slower than fp32 (measured once)."""
    return cpu_bf16_slowdown() <= SLOW_BF16_RATIO


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@contextlib.contextmanager
def attention_implementation(config, name: str | None):
    """Run the block with `config._attn_implementation` set to `name` ('sdpa' or 'eager'; None: as it is), then
    restore it. The attention modules read it at every call, so the switch costs nothing."""
    own = config._attn_implementation
    if name is not None:
        config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = own


def time_training_step(
    model, config, loss_fn: Callable, batch: dict, name: str, repeats: int = 2, summary: Callable = min
) -> float:
    """Seconds of a forward-and-backward pass of `loss_fn(model, batch)` with attention `name` (set on `config`, the
    unwrapped model's), in training mode: `summary` (the best by default) of `repeats` passes after one untimed pass.
    The model leaves as it came: mode restored, gradients cleared, buffers (batch-norm statistics) restored, the
    global RNG untouched."""
    times, buffers = [], {key: value.clone() for key, value in model.named_buffers()}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):
        for step in range(repeats + 1):
            start = time.perf_counter()
            with attention_implementation(config, name):
                loss = loss_fn(model, batch)
            loss.backward()
            if step:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for key, value in model.named_buffers():
            value.copy_(buffers[key])
    return summary(times)


TRAINING_ATTENTION_FILE = "training_attention.json"  # in every checkpoint folder: the kernel its run trained with


def checkpointed_training_attention(folder: str | None) -> str | None:
    """The training attention a checkpoint's run used (None: no checkpoint, or one saved before it was recorded)."""
    path = os.path.join(folder, TRAINING_ATTENTION_FILE) if folder else None
    if path is None or not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)["training_attention"]


def record_training_attention(accelerator: Accelerator, name: str) -> None:
    """Write `name` into every checkpoint `accelerator.save_state` makes from now on, so that a resumed run keeps the
    kernel, and with it the exact numbers, of the run it continues."""

    def hook(models, weights, folder: str) -> None:
        if accelerator.is_main_process:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, TRAINING_ATTENTION_FILE), "w") as handle:
                json.dump({"training_attention": name}, handle)

    accelerator.register_save_state_pre_hook(hook)


def choose_training_attention(
    accelerator: Accelerator, model, config, loss_fn: Callable, batch: dict
) -> tuple[str, dict[str, float]]:
    """The attention implementation training runs with, and the step times it was chosen by: on a CPU the faster of
    `ATTENTION_IMPLEMENTATIONS` for one training step on `batch` (the main process's choice, so every process runs
    the same), elsewhere sdpa (not timed).

    Why time it: torch's fused CPU attention has a backward several times slower than plain matmuls for short
    sequences (the pretrained preset's 65 tokens in bf16) and is faster for long ones or in fp32; where the line
    falls depends on the CPU."""
    if accelerator.device.type != "cpu":
        return "sdpa", {}
    times = {name: time_training_step(model, config, loss_fn, batch, name) for name in ATTENTION_IMPLEMENTATIONS}
    choice = [min(times, key=times.get)]
    broadcast_object_list(choice)
    return choice[0], times


def make_accelerator(
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    log_with: str | None = None,
    project_dir: str | None = None,
    allow_slow_bf16: bool = False,
) -> Accelerator:
    """The Accelerator both scripts use: seedable sampler (per-epoch order from the seed), tracking, precision
    (`None`: Accelerate's own setting, e.g. from `accelerate config`).

    bf16 on a CPU that only emulates it (`cpu_bf16_slowdown` above `SLOW_BF16_RATIO`) falls back to fp32 with a
    warning, unless `allow_slow_bf16`: users ask for bf16 to run faster, and there it would run several times slower.
    """
    kwargs = {"gradient_accumulation_steps": gradient_accumulation_steps}
    if log_with:
        kwargs.update(log_with=log_with, project_dir=project_dir)
    if mixed_precision:
        kwargs["mixed_precision"] = mixed_precision
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = new_accelerator(kwargs)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not allow_slow_bf16:
        if not cpu_bf16_is_native():
            logger.warning(
                f"bf16 autocast runs {cpu_bf16_slowdown():.1f}x slower than fp32 on this CPU (emulated: no native "
                "bf16 instructions), so this run uses fp32 instead of --mixed_precision bf16; --allow_slow_bf16 keeps "
                "bf16."
            )
            accelerator = new_accelerator({**kwargs, "mixed_precision": "no"})
    return accelerator


def new_accelerator(kwargs: dict) -> Accelerator:
    """An Accelerator with `kwargs`. Each run sets its own precision, also when a process runs several (tests,
    notebooks): the shared accelerator state is reset (not the distributed one, which the process keeps)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), **kwargs)


@dataclass
class Schedule:
    """How long a run trains: optimizer steps per epoch, in all, and epochs; with its learning-rate scheduler."""

    steps_per_epoch: int
    max_steps: int
    num_epochs: int
    scheduler: object


def make_schedule(
    optimizer,
    train_loader,
    accelerator: Accelerator,
    num_train_epochs: int,
    max_train_steps: int | None = None,
    lr_scheduler_type: str = "cosine",
    warmup_ratio: float = 0.0,
) -> Schedule:
    """The schedule from `max_train_steps` (when given) or `num_train_epochs`, counted in optimizer steps."""
    accumulation = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / accumulation)
    max_steps = max_train_steps or num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=int(warmup_ratio * max_steps) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    return Schedule(steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch), scheduler)


def prepare_training(accelerator: Accelerator, args, model, optimizer, train_loader, eval_loader):
    """Schedule from the training arguments (`num_train_epochs`, `max_train_steps`, `lr_scheduler_type`,
    `warmup_ratio`), then `accelerator.prepare` everything; returns the prepared objects and the schedule."""
    schedule = make_schedule(
        optimizer, train_loader, accelerator, args.num_train_epochs, args.max_train_steps, args.lr_scheduler_type,
        args.warmup_ratio,
    )  # fmt: skip
    model, optimizer, train_loader, eval_loader, schedule.scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, schedule.scheduler
    )
    return model, optimizer, train_loader, eval_loader, schedule


@dataclass
class LoopState:
    """Where training (re)starts: optimizer steps done, the epoch to enter, and batches of it already seen."""

    completed_steps: int = 0
    starting_epoch: int = 0
    resume_step: int = 0
    checkpoint: str | None = None  # the folder resumed from


def resume_from(
    accelerator: Accelerator, resume_from_checkpoint: str | None, root: str, output_dir: str, schedule: Schedule,
    required: bool = True,
) -> LoopState:  # fmt: skip
    """Load the checkpoint `resume_from_checkpoint` names (a folder, or `latest` of this run under `root`) into the
    prepared objects and return where to restart; a fresh `LoopState` when there is nothing to resume."""
    if not resume_from_checkpoint:
        return LoopState()
    path = find_checkpoint(resume_from_checkpoint, root, output_dir, required=required)
    if path is None:
        return LoopState()
    accelerator.print(f"Resumed from checkpoint: {path}")
    accelerator.load_state(path)
    kind, number = os.path.basename(os.path.normpath(path)).split("_")
    steps_per_epoch = schedule.steps_per_epoch
    completed = (int(number) + 1) * steps_per_epoch if kind == "epoch" else int(number)
    resume_step = (completed % steps_per_epoch) * accelerator.gradient_accumulation_steps
    return LoopState(completed, completed // steps_per_epoch, resume_step, path)


def clip_groups(model: torch.nn.Module, separate: tuple[str, ...]) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters in groups for gradient clipping: those of each module named in `separate` (a part
    trained for its own loss alone, such as the image branch) apart, the rest together, so that one part's large
    gradients do not shrink the others' steps."""
    groups: dict[str, list[torch.nn.Parameter]] = {"": [], **{name: [] for name in separate}}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            bare = name.removeprefix("module.")  # a model wrapped by DistributedDataParallel
            owner = next((module for module in separate if bare.startswith(module + ".")), "")
            groups[owner].append(parameter)
    return [parameters for parameters in groups.values() if parameters]


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer,
    train_loader,
    schedule: Schedule,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    *,
    state: LoopState | None = None,
    checkpointing_steps: int | str | None = None,
    checkpoints_total_limit: int | None = None,
    checkpoint_root: str,
    output_dir: str,
    max_grad_norm: float | None = None,
    clip_separately: tuple[str, ...] = (),
    with_tracking: bool = False,
    name: str = "train",
    postfix: Callable[[], dict] | None = None,
    on_epoch_end: Callable[[int, int, bool, float], None] | None = None,
) -> int:
    """Train until `schedule.max_steps` optimizer steps; returns the steps done.

    `loss_fn(model, batch)` returns the batch's loss (augmentation happens there). `on_epoch_end(epoch, steps,
    is_last, mean_loss)` runs after every epoch, before that epoch's checkpoint; `postfix()` adds to the progress bar.
    `clip_separately`: modules (by name) whose gradients are clipped to `max_grad_norm` on their own (`clip_groups`).
    """
    state = state or LoopState()
    scheduler = schedule.scheduler
    completed = state.completed_steps
    if completed >= schedule.max_steps:  # resumed from the final checkpoint: nothing left to train
        if on_epoch_end is not None:
            on_epoch_end(schedule.num_epochs - 1, completed, True, float("nan"))
        return completed
    groups = clip_groups(model, clip_separately)
    progress = tqdm(
        range(schedule.max_steps), initial=completed, desc=name, disable=not accelerator.is_local_main_process
    )
    for epoch in range(state.starting_epoch, schedule.num_epochs):
        model.train()
        train_loader.set_epoch(epoch)
        loader = train_loader
        if epoch == state.starting_epoch and state.resume_step:
            loader = accelerator.skip_first_batches(train_loader, state.resume_step)
        running, count = 0.0, 0
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    for parameters in groups:
                        accelerator.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.detach().float().item()
            count += 1
            if not accelerator.sync_gradients:
                continue
            completed += 1
            # One refresh per step: the postfix is set without a redraw, then update() draws the line once.
            progress.set_postfix(
                {"loss": f"{running / count:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}", **(postfix or dict)()},
                refresh=False,
            )
            progress.update(1)
            if with_tracking:
                accelerator.log(
                    {f"{name}_loss": running / count, f"{name}_lr": scheduler.get_last_lr()[0]}, step=completed
                )
            if isinstance(checkpointing_steps, int) and completed % checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    os.path.join(checkpoint_root, f"step_{completed}"),
                    output_dir,
                    checkpoints_total_limit,
                )
            if completed >= schedule.max_steps:
                break
        if on_epoch_end is not None:
            is_last = completed >= schedule.max_steps or epoch == schedule.num_epochs - 1
            on_epoch_end(epoch, completed, is_last, running / max(count, 1))
        if checkpointing_steps == "epoch":
            save_checkpoint(
                accelerator, os.path.join(checkpoint_root, f"epoch_{epoch}"), output_dir, checkpoints_total_limit
            )
        if completed >= schedule.max_steps:
            break
    progress.close()
    return completed
