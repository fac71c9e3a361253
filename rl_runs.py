"""rl_runs.py: the run, i.e. what touches files, processes and the clock, so that each algorithm file holds only its
algorithm. It knows nothing of models beyond saving and loading them; the engine (rl_kernels) knows nothing of runs.
Imports rl_kernels, never the other way.

What is in this file, top to bottom:
  1. the process group:  init_distributed (torchrun: gloo on CPU, nccl on GPU), close_distributed.
  2. seeds and schedules: seed_everything, the data order (epoch_order, stream_indices: a function of the seed and
                          the position alone, so a resume needs only the position; next_rows), warmup_schedule.
  3. checkpoints:         save_checkpoint / load_checkpoint / latest_checkpoint: a transformers directory plus the
                          trainer state, written to a temporary name and renamed when complete (with LoRA: the
                          adapter in adapter/, and in final/ the merged model too).
  4. metrics:             write_text (whole or not at all), MetricsLogger (metrics.jsonl, samples.jsonl, wandb,
                          TensorBoard),
                          read_metrics, plot_metrics (curves.png), Timer (perf/ seconds per phase).
  5. the out-dir:         check_settings (the shared flags' values), StopSignal, Run (one run per out-dir, its lock,
                          --resume / --overwrite, SIGTERM/SIGINT), RunResult (what every main returns).
  6. the run skeleton:    RunArgs (the flags every script shares, worded once); Session: what grpo.py, ppo.py, sft.py
                          and rlhf_reward_model.py would otherwise each write (the out-dir, resuming, args.json, the
                          logger, the step-0 evaluation, the progress bar, the end-of-step bookkeeping, stopping with a
                          checkpoint, finishing); presets on the command line (apply_preset, preset_cli).
  7. the command line:    progress (tqdm on a terminal, a plain line every 30 s elsewhere), run_cli (a user's mistake
                          prints one sentence and exits 2; a signal exits 128 + the signal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.distributed as dist

import rl_kernels as K

UserError = K.UserError  # a user's mistake: one sentence, exit status 2 (run_cli)


# ----------------------------------------------------------------------------------------------------------
# 1. The process group (torchrun)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; a single process otherwise. timeout_s: how long
    a collective waits for a stalled rank before it raises (the run then exits non-zero; its last checkpoint
    stays, and --resume continues from it). torch's default is 30 minutes (10 under NCCL)."""
    dev = K.resolve_device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        import datetime

        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def close_distributed():
    """End of a torchrun program: wait for every rank, then destroy the process group while Python is still
    alive. Left to interpreter exit, gloo's worker threads can outlive it and abort the process (SIGABRT,
    "terminate called without an active exception") after a run that succeeded. A no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # FSDP2's pending collectives hold tensors: release them first
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# 2. Seeds, the data order, schedules
# ----------------------------------------------------------------------------------------------------------


def seed_everything(seed: int):
    """Seed Python's, torch's (every device's) and numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation of range(n) that is a function of (seed, epoch) alone, so any
    position of the endless stream epoch 0, epoch 1, ... can be found again after a resume without replaying it."""
    key = (n, seed, epoch)
    if _EPOCH_CACHE.get("key") != key:  # a step's rows almost always come from one epoch: keep the last one
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _EPOCH_CACHE.update(key=key, order=torch.randperm(n, generator=generator).tolist())
    return _EPOCH_CACHE["order"]


_EPOCH_CACHE: dict = {}


def stream_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Rows start, start + 1, ..., start + count - 1 of the endless shuffled stream over n rows (epoch_order)."""
    return [epoch_order(n, seed, position // n)[position % n] for position in range(start, start + count)]


def next_rows(rows: list, state: dict, count: int, seed: int) -> tuple[list, list[int]]:
    """This rank's share of the next `count` rows (all ranks together) of the endless shuffled stream over rows, and
    their stream positions; state["cursor"] (the stream position, saved in checkpoints) moves past all `count`."""
    per_rank = count // K.get_world_size()
    first = state["cursor"] + K.get_rank() * per_rank
    state["cursor"] += count
    return [rows[i] for i in stream_indices(first, per_rank, len(rows), seed)], list(range(first, first + per_rank))


def warmup_schedule(warmup_steps: int, total_steps: int = 0, min_ratio: float = 1.0):
    """The learning-rate multiplier at an optimizer step: linear warmup over warmup_steps, then cosine from 1 down
    to min_ratio at total_steps (min_ratio = 1: constant after the warmup). For torch's LambdaLR."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if min_ratio == 1.0:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------------------------------------
# 3. Checkpoints: a transformers directory + trainer state, written atomically
# ----------------------------------------------------------------------------------------------------------


CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter inside a checkpoint, as peft saves one


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_state(model, optimizer) -> dict:
    if K._is_fsdp(K.unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(K.unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def save_checkpoint(out_dir: str, step: int, model, tokenizer=None, optimizer=None, scheduler=None,
                    extra: dict | None = None, name: str | None = None,
                    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write DIR/checkpoint-STEP/ (or DIR/name/): model in safetensors (transformers layout), tokenizer, and
    trainer_state.pt (step, optimizer, scheduler, extra) plus rng_rankR.pt per rank (python/torch/cuda RNGs),
    and tensor_files ({"reference.safetensors": full state dict, ...}; a
    tied weight is stored once). Written to a temporary name and renamed when complete, so a crash
    mid-save never leaves a checkpoint that looks whole. Collective: every rank must call it.
    A LoRA model (rl_kernels.add_lora) saves its adapter in DIR/NAME/adapter/ as peft does (PeftModel.from_pretrained
    loads it; its optimizer state is the adapter's only), and only final/ (a name ending in "final": ppo.py's critic
    too) also holds the merged model, W + (alpha / r) B A, as an ordinary transformers checkpoint: a checkpoint to
    resume from needs the adapter alone, the base being --model.
    """
    name = name or f"{CHECKPOINT_PREFIX}{step}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".tmp-{name}")
    try:
        return _save_checkpoint(step, model, tokenizer, optimizer, scheduler, extra, tensor_files, final, tmp)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written one; the previous checkpoints are untouched
        previous = latest_checkpoint(out_dir)
        raise K.UserError(f"The disk is full: writing the checkpoint {final} failed ({error.strerror}); "
                        + (f"{previous} is intact, so free some space and rerun with --resume."
                           if previous else "free some space and rerun.")) from error


def _save_checkpoint(step, model, tokenizer, optimizer, scheduler, extra, tensor_files, final, tmp) -> str:
    rank = K.get_rank()
    lora = K.has_lora(model)
    adapter = K.adapter_state_dict(model) if lora else None  # collective under FSDP (the adapter's tensors only)
    merged = not lora or final.endswith("final")             # LoRA: the whole model in final/ only
    state_dict = K.full_state_dict(model) if merged else None  # collective under FSDP
    optim_state = _optimizer_state(model, optimizer) if optimizer is not None else None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if lora:
            K.save_adapter(model, adapter, os.path.join(tmp, ADAPTER_DIR))
        if state_dict is not None:
            K.unwrap(model).save_pretrained(tmp, state_dict=K.merged_state_dict(model, state_dict) if lora
                                            else state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optim_state,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "extra": extra or {}}, os.path.join(tmp, "trainer_state.pt"))
        from safetensors.torch import save_file

        for file_name, tensors in (tensor_files or {}).items():
            stored, unique = set(), {}
            for k, v in tensors.items():  # safetensors refuses tensors that share memory (tied embeddings)
                if v.data_ptr() not in stored:
                    stored.add(v.data_ptr())
                    unique[k] = v.contiguous()
            save_file(unique, os.path.join(tmp, file_name))
    K.barrier()
    torch.save({"rng": rng_state()}, os.path.join(tmp, f"rng_rank{rank}.pt"))
    K.barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    K.barrier()
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints (temporary ones never match), oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, f"{CHECKPOINT_PREFIX}*"))
             if p.rsplit("-", 1)[-1].isdigit() and os.path.exists(os.path.join(p, "trainer_state.pt"))]
    return sorted(paths, key=lambda p: int(p.rsplit("-", 1)[-1]))


RUN_FILES = ("args.json", "resumes.jsonl", "metrics.jsonl", "samples.jsonl", "summary.json", "curves.png", "final",
             "tensorboard", "wandb")
"""What a run writes in its out-dir, besides checkpoint-STEP/, .tmp-NAME/ (a save in progress), ppo.py's
.critic-NAME/ and .lock: what --overwrite may delete."""


def is_run_file(name: str) -> bool:
    """Whether an out-dir entry is one a run writes (RUN_FILES): --overwrite deletes those and nothing else."""
    return (name in RUN_FILES or name == ".lock" or name.startswith((".tmp-", ".critic-"))
            or (name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()))


class CheckpointError(K.UserError):
    """A checkpoint on disk that cannot be restored: a file truncated, emptied or missing, or weights whose names or
    shapes are not the model's. Raised before anything is loaded from it, so an older checkpoint can be tried."""


def _trainer_state(path: str, mmap: bool = True) -> dict:
    """checkpoint/trainer_state.pt, or a CheckpointError naming what is wrong with it. mmap: the optimizer state's
    tensors are mapped, not read, so checking a 7B model's checkpoint costs no memory."""
    file = os.path.join(path, "trainer_state.pt")
    try:
        state = torch.load(file, weights_only=True, map_location="cpu", mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no trainer_state.pt") from None
    except Exception as error:  # truncated, empty, not a torch file: torch says which in many ways
        raise CheckpointError(f"{file} is unreadable ({str(error).splitlines()[0][:120] or type(error).__name__})"
                              ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file} holds no step")
    missing = [key for key in ("optimizer", "scheduler", "extra") if key not in state]
    if missing or not isinstance(state["extra"], dict):
        raise CheckpointError(f"{file} holds no {(missing or ['extra'])[0]}")
    return state


def _weight_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "model.safetensors"))
                  or glob.glob(os.path.join(path, "model-*-of-*.safetensors")))


def _adapter_file(path: str) -> str:
    return os.path.join(path, ADAPTER_DIR, "adapter_model.safetensors")


def _safetensors_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors file's header, or a CheckpointError: the library checks that the header
    parses and that its tensors cover the file exactly, so a truncated file fails here without reading any data."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as error:
        raise CheckpointError(f"{file} is unreadable ({str(error).splitlines()[0][:120] or type(error).__name__})"
                              ) from None


def check_checkpoint(path: str) -> int:
    """The step of a checkpoint whose files are whole, or a CheckpointError saying what is not: trainer_state.pt
    readable and holding a step, the model's weights present, and every safetensors file in it (the weights, a
    reference's, ppo.py's critic/) with a readable header that covers the file. Reads headers only."""
    step = _trainer_state(path)["step"]
    if not _weight_files(path) and not os.path.exists(_adapter_file(path)):
        raise CheckpointError(f"{path} has no model weights (model.safetensors, or a LoRA run's "
                              f"{ADAPTER_DIR}/adapter_model.safetensors)")
    for file in sorted(glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True)):
        _safetensors_shapes(file)
    for file in sorted(glob.glob(os.path.join(path, "**", "rng_rank*.pt"), recursive=True)):
        try:
            torch.load(file, weights_only=True, map_location="cpu")["rng"]
        except Exception as error:
            raise CheckpointError(f"{file} is unreadable ({str(error).splitlines()[0][:120] or type(error).__name__})"
                                  ) from None
    return step


def checkpoint_step(path: str) -> int:
    """The step a complete checkpoint was saved at (final/ included); a CheckpointError when it cannot be read."""
    return _trainer_state(path)["step"]


def checkpoints_newest_first(out_dir: str) -> list[tuple[str, int | str]]:
    """Every complete checkpoint in out_dir, newest first (final/ before checkpoint-N when its step is as large),
    each with its step or, for a damaged one, the reason (check_checkpoint)."""
    found = []
    for path in [*list_checkpoints(out_dir), os.path.join(out_dir, "final")]:
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            try:
                found.append((path, check_checkpoint(path)))
            except CheckpointError as error:
                found.append((path, str(error)))
    order = {path: i for i, (path, _) in enumerate(found)}  # saved order: the step's tie-breaker (final/ last)

    def key(item):  # a damaged checkpoint-N sorts by its name's step; a damaged final/ after all of them
        path, step = item
        number = step if isinstance(step, int) else (
            int(path.rsplit("-", 1)[-1]) if path.rsplit("-", 1)[-1].isdigit() else math.inf)
        return number, order[path]

    return sorted(found, key=key, reverse=True)


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest intact checkpoint to resume from: the last checkpoint-STEP, or final/ when it is as new (a
    finished run asked to train further starts from its final state); a damaged one (check_checkpoint) is passed
    over."""
    return next((path for path, step in checkpoints_newest_first(out_dir) if isinstance(step, int)), None)


def load_model_weights(model: torch.nn.Module, path: str):
    """Load a transformers checkpoint directory's safetensors weights into an existing (wrapped) model: the files
    model.safetensors or model-0000i-of-0000n.safetensors name, and no other (a trainer may keep, say, its
    reference model's weights beside them). Every file's header is checked against the model's parameter names and
    shapes before anything is loaded (CheckpointError), so a wrong file changes nothing. A LoRA model loads the
    adapter/ alone (its base is --model's, loaded already)."""
    from safetensors.torch import load_file

    if K.has_lora(model):
        file = _adapter_file(path)
        if not os.path.exists(file):
            raise CheckpointError(f"{path} has no LoRA adapter ({ADAPTER_DIR}/adapter_model.safetensors): it was not "
                                  "written by a run with --lora-rank")
        expected = K.adapter_shapes(model)
        shapes = _safetensors_shapes(file)
        if shapes != expected:
            wrong = sorted(set(shapes) ^ set(expected)) or [k for k in shapes if shapes[k] != expected[k]]
            raise CheckpointError(f"{file} does not fit the model's adapter (e.g. {wrong[0]})")
        K.set_adapter_state_dict(model, load_file(file))
        return
    files = _weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has no model weights (model.safetensors)")
    plain = K.unwrap(model)
    expected = {name: tuple(value.shape) for name, value in plain.state_dict().items()}
    stored = {}
    for f in files:
        for name, shape in _safetensors_shapes(f).items():
            if name not in expected or expected[name] != shape:
                want = f"the model's {list(expected[name])}" if name in expected else "the model has no such weight"
                raise CheckpointError(f"{f} does not fit the model: {name} has shape {list(shape)}, {want}")
            stored[name] = shape
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])  # saved once, under the other name
    tie_head = getattr(getattr(plain, "config", None), "tie_word_embeddings", False)
    missing = [name for name in expected if name not in stored and name not in tied
               and not (tie_head and "lm_head" in name)]
    if missing:
        raise CheckpointError(f"{path} lacks weights of the model: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    state = {}
    for f in files:
        state.update(load_file(f))
    K.set_full_state_dict(model, state, source=path)


def _check_optimizer_state(saved: dict, model, optimizer, path: str):
    """A CheckpointError unless the saved optimizer state fits: as many parameters per group, and every per-parameter
    tensor (AdamW's exp_avg, exp_avg_sq) of its parameter's shape; torch checks the first, and a wrong shape in the
    second loads without a word and crashes the process at the first step (a segmentation fault, measured)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or "param_groups" not in saved:
        raise CheckpointError(f"{path}/trainer_state.pt holds no optimizer state")
    groups = [group["params"] for group in optimizer.param_groups]
    saved_ids = [list(group.get("params", [])) for group in saved["param_groups"]]
    if [len(g) for g in saved_ids] != [len(g) for g in groups]:
        raise CheckpointError(f"{path}/trainer_state.pt: the optimizer state is for {[len(g) for g in saved_ids]} "
                              f"parameters per group, the optimizer has {[len(g) for g in groups]}")
    named = {name: p for name, p in K.unwrap(model).named_parameters()} if model is not None else {}
    for ids, params in zip(saved_ids, groups):
        for key, param in zip(ids, params):
            param = named.get(key, param) if isinstance(key, str) else param  # FSDP2's full state: by name
            for name, value in saved["state"].get(key, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(f"{path}/trainer_state.pt: the optimizer's {name} of parameter {key} has "
                                          f"shape {list(value.shape)}, the parameter {list(param.shape)}")


def load_checkpoint(path: str, model=None, optimizer=None, scheduler=None) -> dict:
    """Restore what save_checkpoint wrote; returns {"step", "extra"}. Loads with weights_only=True."""
    if model is not None:
        load_model_weights(model, path)
    state = _trainer_state(path, mmap=False)
    if optimizer is not None and state["optimizer"] is not None:
        _check_optimizer_state(state["optimizer"], model, optimizer, path)
        if K._is_fsdp(K.unwrap(model)):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(K.unwrap(model), optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{K.get_rank()}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        set_rng_state(rng["rng"])
    return {"step": state["step"], "extra": state["extra"]}


# ----------------------------------------------------------------------------------------------------------
# 4. Metrics: args.json, metrics.jsonl and samples.jsonl, reporters, curves, timings
# ----------------------------------------------------------------------------------------------------------


def write_text(path: str, text: str) -> str:
    """Written whole or not at all (a temporary file renamed), so a stop never leaves a file a rerun cannot read."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


REPORTERS = ("none", "wandb", "tensorboard")


def _read_jsonl_lenient(path: str) -> tuple[list[dict], int]:
    """The objects of a JSONL file we wrote, and how many lines could not be read (a last line cut off by a kill or
    a full disk must not make a run unresumable)."""
    rows, bad = [], 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    rows.append(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    bad += raw.strip() != b""
    return rows, bad


class MetricsLogger:
    """DIR/metrics.jsonl (one JSON object per line, rank 0 only) and DIR/samples.jsonl (a few completions per step,
    with their prompt, rewards and advantage, so reward hacking can be read, not guessed), plus wandb and/or
    TensorBoard (report_to). On resume it keeps the lines up to the checkpoint's step, so each file reads as one
    run; a line it cannot read (cut off by a kill) is dropped with a note."""

    def __init__(self, out_dir: str, *, enabled: bool = True, resume_step: int | None = None,
                 report_to: Sequence[str] = (), config: dict | None = None):
        self.enabled = enabled and K.get_rank() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(out_dir, "samples.jsonl")
        self._wandb = self._tb = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        for path in (self.path, self.samples_path):
            if resume_step is None:
                if os.path.exists(path):
                    os.remove(path)
                continue
            rows, bad = _read_jsonl_lenient(path)
            if bad:
                print(f"{path}: dropped {bad} line(s) that could not be read (cut off when the run stopped).")
            with open(path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows if row.get("step", 0) <= resume_step)
        if "wandb" in report_to:
            import wandb  # checked by check_reporters before any model was loaded

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "rl-reasoning"), config=config,
                                     dir=out_dir, name=os.path.basename(os.path.abspath(out_dir)))
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]):
        if not self.enabled:
            return
        row = {"step": step, **{k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def log_samples(self, step: int, samples: list[dict]):
        """Append samples ({prompt, completion, rewards, ...}) of a step to samples.jsonl."""
        if not self.enabled or not samples:
            return
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"step": step, **sample}, default=str) + "\n" for sample in samples)

    def close(self):
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def check_reporters(report_to: Sequence[str]):
    """--report-to names known reporters whose packages are installed (checked before any model loads)."""
    for name in report_to:
        if name not in REPORTERS:
            raise K.UserError(f"--report-to {name!r}: use none, wandb or tensorboard (several allowed).")
        module = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise K.UserError(f"--report-to {name} needs the {module} package: pip install {module}")


def read_metrics(out_dir: str) -> list[dict]:
    """The rows of DIR/metrics.jsonl (lines that cannot be read are skipped)."""
    return _read_jsonl_lenient(os.path.join(out_dir, "metrics.jsonl"))[0]


def plot_metrics(out_dir: str, panels: list[tuple[str, list[tuple[str, str]], str]], title: str = "",
                 file_name: str = "curves.png") -> str | None:
    """Draw a run's curves from DIR/metrics.jsonl into DIR/file_name: one panel per (title, [(metric key, label)],
    y label), each metric against its steps (keys absent from the run are skipped). Returns the path, or None
    without matplotlib or data. Every script calls it at the end of a run, so every run leaves a picture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = os.path.join(out_dir, "metrics.jsonl")
    history = read_metrics(out_dir) if os.path.exists(path) else []
    drawn = [(name, [(k, label) for k, label in curves if any(k in h for h in history)], ylabel)
             for name, curves, ylabel in panels]
    drawn = [panel for panel in drawn if panel[1]]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(5 * len(drawn), 3.6), squeeze=False)
    for ax, (name, curves, ylabel) in zip(axes[0], drawn):
        for key, label in curves:
            points = [(h["step"], h[key]) for h in history if key in h]
            style = "o-" if len(points) <= 25 else "-"
            ax.plot([s for s, _ in points], [v for _, v in points], style, markersize=3, label=label)
        ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.set_title(name), ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = os.path.join(out_dir, file_name)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class Timer:
    """One step's clock: `with timer("generate"): ...` adds the block's wall seconds (CUDA-synchronised) to that
    phase; `with timer.peak_memory("rollout"): ...` records the block's peak GPU memory (a no-op on CPU, whose peak
    resident set cannot be reset per phase); step_metrics() gives the step's perf/ metrics."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def peak_memory(self, phase: str):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            if cuda:
                self.peaks[phase] = torch.cuda.max_memory_allocated() / 2**30

    def step_metrics(self, gen_tokens: int, device) -> dict:
        """The perf/ keys of an RL step that generated gen_tokens tokens on every rank: seconds per phase, generation
        throughput, the step's seconds and the peak memory (GiB): per phase on a GPU (perf/peak_memory_PHASE_gb) and
        perf/peak_mem_gb, on a GPU the largest phase's (without phases, the run's peak), on CPU the process's."""
        return {**{f"perf/{k}_s": v for k, v in self.totals.items()},
                **{f"perf/peak_memory_{k}_gb": v for k, v in self.peaks.items()},
                "perf/gen_tokens_per_s": gen_tokens / max(self.totals.get("generate", 1e-9), 1e-9),
                "perf/step_s": time.perf_counter() - self.t0,
                "perf/peak_mem_gb": max(self.peaks.values()) if self.peaks else K.peak_memory_gb(device)}


# ----------------------------------------------------------------------------------------------------------
# 5. The out-dir one run owns: its lock, resuming, signals, the result
# ----------------------------------------------------------------------------------------------------------


def check_settings(args):
    """The flags every script shares take sensible values (each one present in args is checked): one sentence per
    mistake, before any data or model is loaded."""
    positive = ("lr", "max_new_tokens", "batch_size", "prompts_per_step", "num_generations", "grad_accum",
                "dist_timeout_s")
    non_negative = ("max_steps", "eval_every", "save_every", "eval_size", "eval_samples", "warmup_steps", "seed",
                    "max_grad_norm", "weight_decay")
    for name in positive + non_negative:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and name in positive):
            flag = "--" + name.replace("_", "-")
            raise K.UserError(f"{flag} {value}: must be {'positive' if name in positive else 'zero or more'}.")
    seed = getattr(args, "seed", None)
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise K.UserError(f"--seed {seed}: must be a whole number from 0 to {2**32 - 1} (the data order, the "
                          "sampling noise and numpy's generator take seeds below 2**32).")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise K.UserError("--resume and --overwrite contradict each other: continue the run in --out-dir, or replace it.")
    check_reporters(getattr(args, "report_to", ()))
    check_lora(args)


def check_lora(args):
    """--lora-*: a rank of 0 (full fine-tuning) or more, alpha > 0, dropout in [0, 1), and peft installed for a rank."""
    rank = getattr(args, "lora_rank", 0)
    if not isinstance(rank, int) or rank < 0:
        raise K.UserError(f"--lora-rank {rank}: must be 0 (full fine-tuning) or a positive whole number.")
    if rank == 0:
        return
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0) or not 0 <= args.lora_dropout < 1:
        raise K.UserError(f"--lora-alpha {args.lora_alpha} must be positive and --lora-dropout {args.lora_dropout} in "
                          "[0, 1).")
    if not args.lora_targets:
        raise K.UserError("--lora-targets is empty: name the linear layers to adapt (all-linear: every one of the "
                          "attention and the MLP).")
    K.require_peft()


def lora_of(args, heads: Sequence[str] = ()) -> K.LoRA | None:
    """The adapter the --lora-* flags ask for (None: --lora-rank 0, full fine-tuning); heads: modules trained whole
    beside it (a new `score` head). A's initialisation is seeded by --seed."""
    if not getattr(args, "lora_rank", 0):
        return None
    return K.LoRA(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets), tuple(heads),
                  args.seed)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the training loop checks at a step boundary (to save, then exit);
    a second signal exits at once."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\nReceived signal {signum}: saving a checkpoint at the end of this step, then stopping "
              "(a second signal stops at once).", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled."""
        flag = torch.tensor(float(self.requested))
        return bool(K.all_reduce_sum(flag).item() > 0) if K.is_distributed() else self.requested


class Run:
    """A training run's hold on its out-dir, from the check before any model loads to its last save.

      - An out-dir belongs to one run: a new run refuses a directory that holds another run's files unless
        resume (continue it) or overwrite (clear it first).
      - A lock (DIR/.lock, flock) is held while the run lives, so a second process refuses at once instead of
        interleaving its metrics and checkpoints with ours. The kernel drops it if the process dies.
      - resume: `checkpoint` is the newest intact checkpoint (None: start from scratch); a damaged newer one (a file
        truncated, emptied or missing: check_checkpoint) is passed over with a warning naming both, and when every
        checkpoint is damaged the run stops in one sentence. `finished` when final/ already holds the last step, in
        which case the script says so and changes nothing.
      - An out-dir written by another script (args.json's "script") is refused, resume or not.
      - SIGTERM/SIGINT become a flag the loop checks at step boundaries (should_stop), caught until the final save
        is on disk; the stop's exit status is 128 + the signal (130 for SIGINT, 143 for SIGTERM).
    Rank 0 decides and the other ranks follow its decision. Use as a context manager around the whole run."""

    def __init__(self, out_dir: str, *, resume: bool = False, overwrite: bool = False, max_steps: int = 0,
                 script: str | None = None):
        self.out_dir, self.resume, self.overwrite, self.max_steps = out_dir, resume, overwrite, max_steps
        self.script = script  # the file of the script that runs, e.g. "grpo.py"
        self.checkpoint: str | None = None
        self.fallbacks: list[str] = []  # older intact checkpoints, newest first: where a failed restore goes next
        self.start_step = 0
        self.finished = False
        self.signals = StopSignal()
        self._lock = None

    def __enter__(self) -> "Run":
        decision = self._claim() if K.get_rank() == 0 else None
        if K.is_distributed():
            box = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        if isinstance(decision, str):  # rank 0's reason to refuse: every rank stops with it
            self._release()
            raise K.UserError(decision)
        self.checkpoint, self.start_step, self.finished, self.fallbacks, damaged = decision
        for path, reason in damaged:
            K.print0(f"warning: --resume passes over the damaged checkpoint {path} ({reason}); resuming from "
                     f"{self.checkpoint}.")
        if self.finished:
            K.print0(f"{self.out_dir} holds a finished run (final/ at step {self.start_step}); nothing to do. Pass a "
                   "larger --max-steps to train further, or --overwrite to start again.")
        elif self.resume and self.checkpoint is None:
            K.print0(f"--resume: no complete checkpoint in {self.out_dir}; starting from scratch.")
        self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        self.signals.__exit__(*exc)
        self._release()
        return False

    def _claim(self):
        """Rank 0: lock the out-dir and decide (checkpoint, step, finished), or return the reason to refuse."""
        import fcntl

        lock_path = os.path.join(self.out_dir, ".lock")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            had_lock = os.path.exists(lock_path)
            self._lock = open(lock_path, "a+")
        except OSError as error:  # a file's path, /proc, /sys, a read-only or full disk, no permission
            return (f"--out-dir {self.out_dir}: cannot write a run there ({error.strerror or error}); choose a "
                    "directory this user can create and write.")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "another process"
            return f"{self.out_dir} is in use by a live run (pid {owner}); wait for it to end or choose another --out-dir."
        self._lock.seek(0), self._lock.truncate(), self._lock.write(str(os.getpid())), self._lock.flush()
        held = sorted(name for name in os.listdir(self.out_dir) if name != ".lock")
        foreign = [name for name in held if not is_run_file(name)]
        if foreign:  # --overwrite would delete them, --resume would mix a run into them
            if not had_lock:  # leave the directory as it was
                os.remove(lock_path)
            harm = "--overwrite would delete them" if self.overwrite else "a run does not belong among them"
            return (f"{self.out_dir} holds files that are not a run's ({', '.join(foreign[:4])}"
                    f"{', ...' if len(foreign) > 4 else ''}): {harm}; choose another --out-dir.")
        if held and not self.resume and not self.overwrite:
            return (f"{self.out_dir} already holds a run ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
                    "pass --resume to continue it, or --overwrite to replace it.")
        if held and not self.overwrite and (refusal := self._other_script(_recorded_script(self.out_dir))):
            return refusal
        if held and self.overwrite:
            for name in held:
                path = os.path.join(self.out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        found = checkpoints_newest_first(self.out_dir) if self.resume else []
        intact = [path for path, step in found if isinstance(step, int)]
        if found and not intact:
            return (f"--resume: no checkpoint in {self.out_dir} is intact ("
                    + "; ".join(f"{os.path.basename(path)}: {reason}" for path, reason in found[:3])
                    + "); --overwrite starts the run again.")
        checkpoint = intact[0] if intact else None
        if checkpoint and (refusal := self._other_script((_checkpoint_record(checkpoint) or {}).get("script"))):
            return refusal  # args.json gone: the checkpoint's record says whose run it is
        damaged = found[:[path for path, _ in found].index(checkpoint)] if checkpoint else []
        step = dict(found)[checkpoint] if checkpoint else 0
        finished = checkpoint is not None and os.path.basename(checkpoint) == "final" and step >= self.max_steps
        return checkpoint, step, finished, intact[1:], damaged

    def _other_script(self, recorded: str | None) -> str | None:
        """The sentence refusing an out-dir whose run another script wrote (None: ours, or no record)."""
        if recorded and self.script and recorded != self.script:
            return (f"{self.out_dir} holds a run of {recorded}, not of {self.script}; choose another --out-dir "
                    f"(or --overwrite to replace that run).")
        return None

    def _release(self):
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def should_stop(self) -> bool:
        """True on every rank once any rank was signalled (a collective under torchrun)."""
        return self.signals.should_stop()

    @property
    def signal(self) -> int | None:
        return self.signals.signum


@dataclass
class RunResult:
    """What every script's main(args) returns, so that a pipeline can chain them: where the run wrote, its final
    checkpoint (None if it stopped early), the held-out metrics before and after training (named as in
    metrics.jsonl), and the step a signal stopped it at (None if it finished)."""
    out_dir: str
    final_dir: str | None = None
    before: dict = dataclasses.field(default_factory=dict)
    after: dict = dataclasses.field(default_factory=dict)
    stopped_at: int | None = None
    wall_s: float = 0.0
    signal: int | None = None  # the signal that stopped the run (its exit status is 128 + signal)


# ----------------------------------------------------------------------------------------------------------
# 6. The run skeleton every training script shares
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunArgs:
    """The flags every training script shares, worded once. A script's Args inherits them last, so they come last in
    --help, after the algorithm's; a script changes a default by declaring the field again (grpo.py: out_dir)."""
    out_dir: str = "runs/run"
    """where args.json, metrics.jsonl, samples.jsonl, checkpoint-STEP/ and final/ go (one run per directory)"""
    overwrite: bool = False
    """replace the run already in --out-dir (without it, a used --out-dir is refused unless --resume)"""
    resume: bool = False
    """continue from the newest complete checkpoint in --out-dir (a finished run: nothing to do)"""
    seed: int = 0
    """seeds the data order, sampling noise and initialisation"""
    max_steps: int = 80
    """training steps (in the RL scripts, one rollout and its update each)"""
    save_every: int = 0
    """save a checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT)"""
    nan_patience: int = 3
    """stop, with a checkpoint, after this many non-finite updates in a row"""
    plot: bool = True
    """draw the run's curves into out_dir/curves.png at the end"""
    report_to: tuple[Literal["none", "wandb", "tensorboard"], ...] = ("none",)
    """where metrics go besides metrics.jsonl (several allowed)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: this rank's GPU if there is one, else the CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute dtype (the forward's matmuls); auto: bf16 on a GPU that supports it, else fp32; float16 (fp32 master
    weights only) scales the loss dynamically (train/loss_scale; an overflow skips the step and halves the scale)"""
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the weights (what checkpoints hold), gradients and AdamW state; --dtype bfloat16 --master-dtype
    bfloat16 is pure bf16: half the memory, but updates below bf16's resolution (lr 1e-6) round away"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """torchrun data parallelism: DDP (a full copy per rank, small models) or FSDP2 (sharded, large ones)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward instead of keeping them (~1/3 more compute,
    activations of one layer instead of all: docs/memory.md)"""
    threads: int = 0
    """CPU threads for torch (0: 1 for models under 50M parameters, which lose more to thread sync than they gain)"""
    lora_rank: int = 0
    """LoRA rank r (0: full fine-tuning); > 0 trains a peft adapter of rank r, the base frozen (docs/lora.md)"""
    lora_alpha: float = 32.0
    """LoRA's alpha: the adapter's output is scaled by alpha / r"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input"""
    lora_targets: tuple[str, ...] = ("all-linear",)
    """layers that get an adapter (peft's target_modules): all-linear is every attention and MLP linear, not the head"""
    dist_timeout_s: float = 600.0
    """under torchrun: seconds a collective waits for a stalled rank before the run stops with an error"""


RESUMABLE = ("max_steps", "epochs", "save_every", "eval_every", "log_samples", "nan_patience", "plot", "report_to",
             "export_dir", "device", "threads", "dist_timeout_s", "strategy", "compile", "micro_batch_tokens",
             "decode_memory", "offload_optimizer", "gradient_checkpointing")
"""The settings a --resume may change: how long the run goes on, when it evaluates, saves and reports, and how it
uses the machine (device, threads, parallelism, compilation, micro-batches, memory savers: the same run up to
floating-point rounding). Every other setting (the script, model, data, seed, algorithm and its constants, sizes,
learning rate) defines the run and must equal what args.json recorded; out_dir, resume and overwrite say where
and how to start, not what runs. A longer --max-steps also stretches a schedule that decays over max_steps."""


def _checkpoint_record(path: str) -> dict | None:
    """The run's settings as a checkpoint keeps them (Session.state["run"]; None in one saved before they were)."""
    record = _trainer_state(path)["extra"].get("run")
    return record if isinstance(record, dict) else None


def _recorded_script(out_dir: str) -> str | None:
    """The script args.json says wrote out_dir (None: no args.json, or one from before it said)."""
    try:
        with open(os.path.join(out_dir, "args.json"), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return recorded.get("script") if isinstance(recorded, dict) else None


def args_record(args, script: str | None) -> dict:
    """What args.json holds: the script's file name and its resolved settings, as JSON reads them back."""
    return json.loads(json.dumps({"script": script, **dataclasses.asdict(args)}, default=str))


def _same_setting(was, now) -> bool:
    """Equal as JSON text (so NaN equals NaN), or two spellings of one existing path (models/x/ and ./models/x)."""
    if json.dumps(was) == json.dumps(now):
        return True
    try:
        return isinstance(was, str) and isinstance(now, str) and os.path.samefile(was, now)
    except OSError:
        return False


def setting_changes(recorded: dict, now: dict) -> tuple[dict, dict]:
    """The settings that differ between args.json (recorded) and this run (now, args_record): ({name: (was, now)}
    that would change the run, {name: (was, now)} that a resume may change: RESUMABLE)."""
    missing = "(not set)"
    names = sorted((set(recorded) | set(now)) - {"script", "out_dir", "resume", "overwrite"})  # script: Run
    changed = {name: (recorded.get(name, missing), now.get(name, missing)) for name in names
               if not _same_setting(recorded.get(name, missing), now.get(name, missing))}
    allowed = {name: change for name, change in changed.items() if name in RESUMABLE}
    return {name: change for name, change in changed.items() if name not in allowed}, allowed


class Stopped(Exception):
    """Raised by Session.end_step / drop_step after the checkpoint of a stopped run is saved; `with session:` swallows
    it, so main goes on to `return session.result()`."""


class Session(Run):
    """The life of one training run (a Run: its out-dir, lock and signals), written once for every script; the
    script keeps its loop and its phases.

        session = rl_runs.Session(args, check=check_args, desc="grpo", panels=PANELS)  # torchrun, checks, seeds
        ... the data and rewards: a user's mistake stops here, before any model loads ...
        with session:                                      # the out-dir: its lock, --resume / --overwrite, signals
            if session.finished:                           # --resume on a finished run: nothing to do
                return session.result()
            ... models, optimizer ...
            for step in session.start(args, model=..., tokenizer=..., optimizer=..., scheduler=..., evaluate=...):
                ... rollout, advantages, update ...
                session.end_step(step + 1, metrics)        # evaluate when due, log, NaN patience, signals, save
        return session.result()                            # summary.json, curves.png, the before/after table

    start() restores the newest checkpoint (--resume), writes args.json, opens the logger, evaluates at step 0 and
    returns the steps left under a progress bar; when they are done it saves final/. A signal makes end_step save a
    checkpoint and leave the `with` block (Stopped). session.state is the run's small state (the data position,
    skipped updates, non-finite updates in a row), saved in every checkpoint and restored with it."""

    def __init__(self, args, *, check: Callable, desc: str, panels=(), title: str = ""):
        self.t_start = time.time()
        import transformers  # no bars of its own inside ours; no load report for heads we expect to be new

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.info = init_distributed(args.device, args.dist_timeout_s)
        check(args, self.info)                       # one sentence per impossible setting, before anything loads
        seed_everything(args.seed)
        # max_steps: a script may change it before `with` (sft.py's --epochs)
        super().__init__(args.out_dir, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps,
                         script=os.path.basename(inspect.getfile(type(args))))
        self.args, self.desc, self.panels, self.title = args, desc, list(panels), title
        self.state: dict[str, Any] = {"skipped": 0, "nan_streak": 0}
        self.stopped_at = self.logger = self.bar = self.final_dir = self.evaluate = self._snapshot = None

    def __exit__(self, exc_type, *exc):
        super().__exit__(exc_type, *exc)
        return exc_type is Stopped  # a stop saved its checkpoint: main returns session.result()

    def start(self, args, *, model=None, tokenizer=None, optimizer=None, scheduler=None, evaluate=None,
              save: Callable | None = None, restore: Callable | None = None, tensor_files: Callable | None = None,
              on_restore: Callable | None = None):
        """Resume, write args.json (args: the resolved Args), open the logger, evaluate at step 0 (evaluate() -> the
        eval/ metrics; None: no evaluation); returns the progress bar over the steps left. The checkpoint holds
        model, tokenizer, optimizer, scheduler and session.state, plus tensor_files() (a dict of {file name: full
        state dict}, e.g. grpo.py's reset reference; every rank calls it, a collective under FSDP); on_restore
        (checkpoint) loads what else a script keeps there. A script with other parts (ppo.py's critic) passes its
        own save(step, name) -> path and restore(checkpoint) -> step."""
        self.args, self.evaluate = args, evaluate
        self._save = save or (lambda step, name=None: save_checkpoint(
            args.out_dir, step, model, tokenizer, optimizer, scheduler, extra=self.state, name=name,
            tensor_files=tensor_files() if tensor_files else None))
        record, changes = self._check_resume(args)  # record: the run's original settings
        checkpoint = self.checkpoint
        for i, checkpoint in enumerate([self.checkpoint, *self.fallbacks] if checkpoint is not None else []):
            try:
                if restore is None:
                    loaded = load_checkpoint(checkpoint, model, optimizer, scheduler)
                    self.state.update(loaded["extra"])
                    self.start_step = loaded["step"]
                    if on_restore is not None:
                        on_restore(checkpoint)
                else:
                    self.start_step = restore(checkpoint)
                break
            except CheckpointError as error:  # found before anything of it was loaded; an older one reloads it all
                if i == len(self.fallbacks):
                    raise CheckpointError(f"--resume: no checkpoint in {self.out_dir} can be restored (the oldest: "
                                          f"{error}); --overwrite starts the run again.") from None
                K.print0(f"warning: --resume passes over the damaged checkpoint {checkpoint} ({error}); trying "
                         f"{self.fallbacks[i]}.")
        if checkpoint is not None:
            self.checkpoint = checkpoint
            K.print0(f"Resumed from {checkpoint} at step {self.start_step}.")
        self.state["run"] = record  # every checkpoint keeps the record too: a deleted args.json lifts no check
        if K.get_rank() == 0:
            if changes is None or not os.path.exists(os.path.join(args.out_dir, "args.json")):
                write_text(os.path.join(args.out_dir, "args.json"), json.dumps(record, indent=2))
            if changes is not None:  # a resume: args.json keeps the original; each resume appends what it changed
                with open(os.path.join(args.out_dir, "resumes.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": self.start_step, "checkpoint": checkpoint, "time": time.strftime(
                        "%Y-%m-%dT%H:%M:%S"), "changed": {k: list(v) for k, v in changes.items()}}) + "\n")
        self.logger = MetricsLogger(args.out_dir, resume_step=self.start_step if checkpoint else None,
                                    report_to=args.report_to, config=dataclasses.asdict(args))
        if self.start_step == 0 and evaluate is not None and args.eval_every:
            first = evaluate()
            self.logger.log(0, first)
            K.print0(f"step 0 eval: {json.dumps({k: round(v, 3) for k, v in first.items()})}")
        self.bar = progress(range(self.start_step, self.max_steps), desc=self.desc, total=self.max_steps,
                            initial=self.start_step)
        return self._steps()

    def _check_resume(self, args) -> tuple[dict, dict | None]:
        """(the run's record: this run's settings, or under --resume the recorded ones; under --resume of a recorded
        run the RESUMABLE settings it changes, else None); a UserError naming the differences when a resume would
        change what defines the run. The record is args.json, or where it is gone the copy every checkpoint keeps
        (a deleted args.json does not lift the check). Rank 0 decides; every rank follows (a collective)."""
        record, decision = args_record(args, self.script), None
        if K.get_rank() == 0 and self.resume:
            decision = self._compare_with_record(record)
        if K.is_distributed():
            box = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        if isinstance(decision, str):
            raise K.UserError(decision)
        return decision if decision is not None else (record, None)

    def _compare_with_record(self, record: dict):
        """Rank 0 under --resume: (the recorded settings, the allowed changes), the sentence that refuses, or None
        when nothing records the run's settings."""
        path = os.path.join(self.out_dir, "args.json")
        try:
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    recorded = json.load(f)
                if not isinstance(recorded, dict):
                    raise ValueError("not an object")
            else:
                recorded = _checkpoint_record(self.checkpoint) if self.checkpoint else None
        except (OSError, ValueError) as error:
            return f"--resume: {path} is unreadable ({error}); --overwrite starts the run again."
        if recorded is None:
            if self.checkpoint is not None:
                K.print0(f"warning: {self.out_dir} keeps no record of its settings (no args.json, a checkpoint from "
                         "before they were kept): --resume cannot check that they are the run's.")
            return None
        refused, allowed = setting_changes(recorded, record)
        if not refused:
            return recorded, allowed
        first = sorted(refused, key=lambda name: name not in ("preset", "model", "dataset"))  # a preset explains
        listed = ", ".join(f"--{name.replace('_', '-')} {refused[name][1]} (recorded: {refused[name][0]})"  # the rest
                           for name in first[:5])
        return (f"--resume would change the run in {self.out_dir}: {listed}{' and more' if len(refused) > 5 else ''}; "
                "resume with the settings args.json records, or start a new run in another --out-dir.")

    def _steps(self):
        for step in self.bar:
            self._snapshot = dict(self.state)  # what drop_step restores
            yield step
        self.final_dir = self.save(max(self.max_steps, self.start_step), name="final")  # inside the run: a signal
        # now waits for the save

    def drop_step(self, step: int):
        """A signal came while the step ran (a slow reward raises rlvr_rewards.Interrupted): forget the step, restore
        the state it began with, save the steps done and stop (Stopped)."""
        self.state.clear()
        self.state.update(self._snapshot)
        self.stop(step)

    def end_step(self, step: int, metrics: dict, *, samples: Sequence[dict] = (),
                 postfix: dict[str, str] | None = None):
        """After step `step` (1-based: the steps done): evaluate when due (every --eval-every steps and at the last),
        log the metrics (train/skipped_updates added), show postfix {label: metric key} on the bar, write the samples;
        after --nan-patience non-finite updates in a row save and raise an error; on a signal save and stop (Stopped);
        save every --save-every steps."""
        args = self.args
        metrics["train/skipped_updates"] = self.state["skipped"]
        if self.evaluate is not None and ((args.eval_every and step % args.eval_every == 0) or step == self.max_steps):
            metrics.update(self.evaluate())
        self.logger.log(step, metrics)
        self.bar.set_postfix(**{label: f"{metrics[key]:.3g}" for label, key in (postfix or {}).items()
                                if key in metrics})
        self.logger.log_samples(step, list(samples))
        if self.state["nan_streak"] >= args.nan_patience:
            path = self.save(step)
            raise RuntimeError(f"{self.state['nan_streak']} updates in a row had a non-finite loss or gradient; "
                               f"stopped (last good weights saved to {path}). Lower the learning rate, or check the "
                               "rewards and the data.")
        if self.should_stop():
            self.stop(step)
        if args.save_every and step % args.save_every == 0:
            self.save(step)

    def stop_requested(self) -> bool:
        """Whether this process was signalled (local, no collective): what a slow reward checks to give up early."""
        return self.signals.requested

    def save(self, step: int, name: str | None = None) -> str:
        """A checkpoint (checkpoint-STEP/, or name/): collective, every rank calls it."""
        return self._save(step, name=name)

    def stop(self, step: int):
        """Stop at `step`: save a checkpoint that --resume continues from, and leave the `with session:` block."""
        path = self.save(step)
        K.print0(f"Stopped at step {step}; continue with --resume (checkpoint {path}).")
        self.stopped_at = step
        raise Stopped(step)

    def result(self) -> RunResult:
        """What main returns: the held-out metrics of the run's first and last evaluation (the eval/* keys of
        metrics.jsonl); on rank 0, for a run that finished, summary.json, curves.png and the before/after table."""
        if self.logger is not None:
            self.logger.close()
        final_dir = self.checkpoint if self.finished else self.final_dir
        out_dir = self.args.out_dir
        evals = [e for e in ({k: v for k, v in row.items() if k.startswith("eval/")} for row in read_metrics(out_dir))
                 if e]
        result = RunResult(out_dir, final_dir, evals[0] if evals else {}, evals[-1] if evals else {}, self.stopped_at,
                           time.time() - self.t_start, self.signal)
        if K.get_rank() != 0 or final_dir is None:
            return result
        write_text(os.path.join(out_dir, "summary.json"),
                   json.dumps({"before": result.before, "after": result.after, "wall_s": result.wall_s}, indent=2))
        curves = plot_metrics(out_dir, self.panels, self.title) if getattr(self.args, "plot", True) else None
        if len(evals) > 1:
            print("\n| held-out | before | after |\n|---|---|---|")
            for k, v in result.after.items():
                print(f"| {k} | {result.before.get(k, float('nan')):.3f} | {v:.3f} |")
        print(f"\nOutputs in {out_dir}: metrics.jsonl, summary.json, {os.path.basename(final_dir)}/"
              + (", curves.png" if curves else ""), flush=True)
        return result


def apply_preset(args, presets: dict[str, dict], plain: dict[str, Any]):
    """Fill the switches left unset (None) with the preset's values, else the plain ones: so that from Python
    Args(preset="dapo", clip_high=0.2) is what `--preset dapo --clip-high 0.2` gives on the command line."""
    if args.preset not in presets:
        raise ValueError(f"Unknown preset {args.preset!r}; choose one of {sorted(presets)}.")
    for name, value in plain.items():
        if getattr(args, name) is None:
            setattr(args, name, presets[args.preset].get(name, value))
    # --compile: on where a CUDA GPU is used; resolved here, when Args is built, so that --help shows a bool
    if getattr(args, "compile", False) is None:
        args.compile = args.device != "cpu" and torch.cuda.is_available()


def preset_cli(args_class, presets: dict[str, dict], default: str, argv: list[str] | None = None):
    """The command line parsed on top of Args(preset=...), so --help shows the preset's values and every flag given
    wins (--preset dapo --no-dynamic-sampling turns DAPO's dynamic sampling off)."""
    import argparse

    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default, choices=sorted(presets))
    return tyro.cli(args_class, default=args_class(preset=pre.parse_known_args(argv)[0].preset), args=argv)


# ----------------------------------------------------------------------------------------------------------
# 7. Progress and the command line
# ----------------------------------------------------------------------------------------------------------


class _PlainProgress:
    """tqdm's interface for logs that are not a terminal (CI, nohup, tee): a plain line every `every` seconds and at
    the end, instead of a wall of carriage returns; every=None prints nothing (ranks other than 0)."""

    def __init__(self, iterable, desc: str, total: int, initial: int, every: float | None = 30.0):
        self.iterable, self.desc, self.total, self.n, self.every = iterable, desc, total, initial, every
        self.postfix, self.t0, self.last = "", time.time(), time.time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.time()
            if self.every is not None and (now - self.last >= self.every or self.n == self.total):
                self.last = now
                print(f"{self.desc}: step {self.n}/{self.total}, {now - self.t0:.0f} s {self.postfix}".rstrip(),
                      flush=True)

    def set_postfix(self, **values):
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        pass


def progress(iterable, *, desc: str, total: int, initial: int = 0):
    """The loop's progress on rank 0: a tqdm bar on a terminal, a plain line every 30 s elsewhere (CI, nohup)."""
    import sys

    if K.get_rank() != 0:
        return _PlainProgress(iterable, desc, total, initial, every=None)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, dynamic_ncols=True)
    return _PlainProgress(iterable, desc, total, initial)


def run_cli(main, args) -> None:
    """A script's `__main__`: main(args); a user's mistake (rl_kernels.UserError) prints `error: ...` and exits 2 without a
    traceback (RL_DEBUG=1 keeps it); a run stopped by a signal exits 128 + the signal after its checkpoint."""
    import sys

    try:
        result = main(args)
    except K.UserError as error:
        if os.environ.get("RL_DEBUG", "0") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        close_distributed()
        sys.exit(2)
    close_distributed()
    if isinstance(result, RunResult) and result.signal:
        sys.exit(128 + result.signal)
