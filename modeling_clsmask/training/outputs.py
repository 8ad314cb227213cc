"""Output folders, checkpoints and pushes: what keeps a run's files its own and its work resumable.

- the run marker (`clsmask_run.json`): a folder is written only by the run whose arguments it records (or with
  `--overwrite_output_dir`); it lists the run's checkpoints, so `latest` is this run's latest;
- checkpoints are `save_state` folders written under a temporary name and renamed, so an interruption never leaves a
  half-written one;
- pushes upload the final folder without checkpoints or the marker.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time


def load_pretrained(load, path: str, flag: str):
    """`load(path)`, with a message that says so when `path` is neither a local folder nor loadable from the Hub
    (instead of the Hub client's "Repo id must be in the form ..." for a mistyped local path)."""
    try:
        return load(path)
    except (OSError, ValueError) as error:
        if os.path.exists(path):
            raise
        raise FileNotFoundError(
            f"{flag} {path!r}: no such local folder, and it could not be loaded as a Hub repo ({error})."
        ) from error


RUN_MARKER = "clsmask_run.json"
# Arguments that do not define a run: a run stays "this run" when they change between launches.
RUN_NEUTRAL_ARGS = {
    "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_token", "with_tracking",
    "report_to", "num_train_epochs", "max_train_steps", "checkpointing_steps", "eval_every_epochs",
    "num_visualizations", "output_dir", "checkpoints_total_limit",
}  # fmt: skip


def _run_arguments(args) -> dict:
    """The run's arguments as JSON values, without secrets (the marker stays on disk and may be shared)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "hub_token"}, default=str))


def read_run_marker(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_run_marker(output_dir: str, marker: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, RUN_MARKER + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(marker, handle, indent=2)
    os.replace(tmp, os.path.join(output_dir, RUN_MARKER))


RUN_LOCK = "clsmask_run.lock"
_held_locks: dict[str, object] = {}  # output folder -> open lock file of this process


def lock_output_dir(output_dir: str, script: str) -> bool:
    """Hold an exclusive lock on `output_dir` for this process's lifetime, or refuse naming the run that holds it.

    An OS file lock (`flock`) on `clsmask_run.lock`: the kernel drops it when the process ends in any way (also
    killed), so a lock file left by a dead run is simply taken over; the file records who holds it, for the message.
    A second claim from the same process (a resumed `main()` in a notebook) keeps the lock it holds. Returns whether
    this call took the lock (False: this process held it already).
    """
    import fcntl

    folder = os.path.abspath(output_dir)
    if folder in _held_locks:
        return False
    os.makedirs(folder, exist_ok=True)
    created = not os.path.exists(os.path.join(folder, RUN_LOCK))
    handle = open(os.path.join(folder, RUN_LOCK), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(20):  # the holder writes its details right after taking the lock
            handle.seek(0)
            holder = handle.read().strip()
            if holder:
                break
            time.sleep(0.1)
        handle.close()
        holder = holder or "a run that has not written its details yet"
        raise RuntimeError(
            f"--output_dir {output_dir!r} is in use by another run: {holder}. Wait for it to end, or give this run "
            "another --output_dir."
        ) from None
    handle.seek(0)
    previous = handle.read()
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(f"{script} pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
    handle.flush()
    _held_locks[folder] = (handle, previous, created)
    return True


def release_output_dir(output_dir: str, undo: bool = False) -> None:
    """Release this process's lock on `output_dir` (also done by the OS when the process ends). `undo`: leave the
    lock file as it was before this process took it (a refused run must not change another run's folder)."""
    held = _held_locks.pop(os.path.abspath(output_dir), None)
    if held is None:
        return
    handle, previous, created = held
    if undo and created:
        os.remove(handle.name)
    elif undo:
        handle.seek(0)
        handle.truncate()
        handle.write(previous)
    handle.close()


def claim_output_dir(args, accelerator, script: str) -> dict:
    """Make sure `args.output_dir` is this run's before anything is written there; returns the run's marker.

    A non-empty folder is refused unless its marker (`clsmask_run.json`, the arguments of the run that wrote it)
    names the same script and run-defining arguments, or `--overwrite_output_dir` is given. The marker also records
    this run's checkpoints (so `--resume_from_checkpoint latest` never picks up another run's) and whether it
    finished. Returns the marker with `finished_before` True when a finished run is resumed unchanged.
    """
    taken = accelerator.is_local_main_process and lock_output_dir(args.output_dir, script)
    try:
        marker = _claim_locked_output_dir(args, accelerator, script)
    except FileExistsError:
        if taken:
            release_output_dir(args.output_dir, undo=True)  # refused: the folder stays exactly as it was
        raise
    if marker.get("finished_before") and taken:
        release_output_dir(args.output_dir, undo=True)  # nothing to do: the folder stays exactly as it was
    return marker


def _claim_locked_output_dir(args, accelerator, script: str) -> dict:
    marker = read_run_marker(args.output_dir)
    arguments = _run_arguments(args)
    defining = {k: v for k, v in arguments.items() if k not in RUN_NEUTRAL_ARGS}
    same_run = (
        marker is not None
        and marker.get("script") == script
        and {k: v for k, v in marker.get("args", {}).items() if k not in RUN_NEUTRAL_ARGS} == defining
    )
    occupied = os.path.isdir(args.output_dir) and any(
        entry.name not in (RUN_MARKER, RUN_MARKER + ".tmp", RUN_LOCK) for entry in os.scandir(args.output_dir)
    )
    if occupied and not same_run and not getattr(args, "overwrite_output_dir", False):
        reason = "files of another run" if marker else f"files that no {script} run wrote (no {RUN_MARKER})"
        raise FileExistsError(
            f"--output_dir {args.output_dir!r} is not empty: it holds {reason}. Choose another folder, or pass "
            "--overwrite_output_dir to write over it."
        )
    resuming = bool(args.resume_from_checkpoint) and same_run
    if resuming and marker.get("finished"):
        unchanged = {k: v for k, v in marker["args"].items() if k != "resume_from_checkpoint"} == {
            k: v for k, v in arguments.items() if k != "resume_from_checkpoint"
        }
        if unchanged:
            return {**marker, "finished_before": True}
    if not resuming:
        marker = {"script": script, "args": arguments, "checkpoints": [], "finished": False}
    marker = {**marker, "args": arguments, "finished": False}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_run_marker(args.output_dir, marker)
    accelerator.wait_for_everyone()
    return marker


def finished_run_results(output_dir: str) -> dict:
    """What a finished run saved (its eval_results.json); said, not recomputed."""
    path = os.path.join(output_dir, "eval_results.json")
    print(f"This run already finished in {output_dir}; nothing to resume (its results are in {path}).")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def mark_run_finished(output_dir: str) -> None:
    marker = read_run_marker(output_dir)
    if marker is not None:
        write_run_marker(output_dir, {**marker, "finished": True})


def save_checkpoint(accelerator, folder: str, output_dir: str | None = None, total_limit: int | None = None) -> None:
    """save_state into a temporary folder, then rename: an interruption never leaves a half-written checkpoint.
    With `output_dir`, the checkpoint is recorded in the run's marker (what `latest` resumes from); with
    `total_limit`, this run's oldest recorded checkpoints in the same folder beyond the newest `total_limit` are
    deleted afterwards (the newest, which `latest` names, never is; other runs' folders are never touched)."""
    tmp = folder + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        marker = read_run_marker(output_dir) if output_dir else None
        if marker is not None:
            relative = os.path.relpath(folder, output_dir)
            checkpoints = [c for c in marker.get("checkpoints", []) if c != relative] + [relative]
            # Per checkpoint folder (stage 2 has one per model): the newest `total_limit` of this run's stay.
            siblings = [c for c in checkpoints if os.path.dirname(c) == os.path.dirname(relative)]
            pruned = siblings[:-total_limit] if total_limit else []
            kept = [c for c in checkpoints if c not in pruned]
            write_run_marker(output_dir, {**marker, "checkpoints": kept})  # recorded first: resume never sees a gap
            for old in pruned:
                shutil.rmtree(os.path.join(output_dir, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(resume_from_checkpoint: str, root: str, output_dir: str, required: bool = True) -> str | None:
    """The folder to resume from: the given path, or with 'latest' the newest checkpoint under `root` that this run
    recorded in its marker (never another run's, whatever its step number). With `required=False`, `None` when this
    run recorded none there."""
    if resume_from_checkpoint != "latest":
        if not os.path.isdir(resume_from_checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a folder.")
        return resume_from_checkpoint
    marker = read_run_marker(output_dir) or {}
    recorded = [
        os.path.join(output_dir, c)
        for c in marker.get("checkpoints", [])
        if os.path.normpath(os.path.dirname(os.path.join(output_dir, c))) == os.path.normpath(root)
    ]
    recorded = [c for c in recorded if os.path.isdir(c)]
    if not recorded and not required:
        return None
    if not recorded:
        raise FileNotFoundError(
            f"--resume_from_checkpoint latest: this run recorded no checkpoint in {root} ({RUN_MARKER}); give a "
            "checkpoint folder explicitly."
        )
    return recorded[-1]


# What a push leaves out: anything in a subfolder (checkpoints, stage 2's pseudo-masks, tracker logs), the run's
# marker and lock, temporary files. The model is the folder's top-level files (weights, config, code, card, panels).
PUSH_IGNORE = ["*/*", RUN_MARKER, RUN_LOCK, "*.tmp"]


def push_folder(folder: str, repo_id: str, token: str | None = None, commit_message: str = "Upload clsmask model"):
    """Create the Hub repo (if needed) and upload the model: the final folder's top-level files (`PUSH_IGNORE`)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    return api.upload_folder(
        folder_path=folder, repo_id=repo_id, commit_message=commit_message, ignore_patterns=PUSH_IGNORE
    )
