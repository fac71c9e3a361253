"""Runs that survive every stop, and mistakes that get one sentence: the out-dir a run owns and its lock, resuming
finished or cut-off runs, exit statuses after a signal, stalls, a full disk, data and reward values checked before
they can hurt, and the ecosystem's conventions (--report-to, datasets, samples.jsonl, plain logs, a rewards CLI)."""

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from conftest import ROOT

import grpo
import ppo
import rl_kernels as K
import rl_runs as runs
import rlhf_reward_model
import rlvr_rewards as env
import sft
import toy_world as toy


def grpo_args(model_dir, out_dir, **kw):
    base = dict(model=model_dir, out_dir=str(out_dir), max_steps=2, prompts_per_step=2, num_generations=2,
                max_new_tokens=8, eval_every=0, plot=False)
    return grpo.Args(**{**base, **kw})


def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def run_script(args: list[str], timeout: float = 120, **env) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return done, time.monotonic() - start


# ---------------------------------------------------------------------------------------------- the out-dir


def test_a_used_out_dir_is_refused_unless_resume_or_overwrite(tiny_model_dir, tmp_path):
    """A new run into a directory holding another run stops before any model loads, naming --resume and
    --overwrite; --overwrite clears the old run first, so no checkpoint or metrics of it survive."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=3, save_every=3, seed=1))
    assert os.path.exists(tmp_path / "checkpoint-3")
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(K.UserError, match=r"already holds a run .*--resume .*--overwrite"):
        grpo.main(grpo_args(tiny_model_dir, tmp_path))
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    grpo.main(grpo_args(tiny_model_dir, tmp_path, overwrite=True))
    assert not os.path.exists(tmp_path / "checkpoint-3")
    assert [row["step"] for row in runs.read_metrics(str(tmp_path))] == [1, 2]
    with pytest.raises(K.UserError, match="contradict"):
        grpo.main(grpo_args(tiny_model_dir, tmp_path, overwrite=True, resume=True))


def test_a_second_process_is_refused_while_a_run_lives(tiny_model_dir, tmp_path):
    """While a run holds its out-dir's lock, another process asking for it (even with --resume) exits 2 at once
    with one sentence, instead of interleaving metrics and checkpoints."""
    with runs.Run(str(tmp_path)):
        done, seconds = run_script(["grpo.py", "--model", tiny_model_dir, "--out-dir", str(tmp_path), "--resume"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"error: {tmp_path} is in use by a live run (pid {os.getpid()})" in done.stderr
    assert seconds < 30


def test_resuming_a_finished_run_changes_nothing(tiny_model_dir, tmp_path, capsys):
    """--resume on a run whose final/ holds the last step says it is finished and rewrites nothing; a larger
    --max-steps continues from final/ instead."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "args.json")}
    mtime = os.path.getmtime(tmp_path / "final" / "model.safetensors")
    result = grpo.main(grpo_args(tiny_model_dir, tmp_path, resume=True))
    assert "holds a finished run" in capsys.readouterr().out
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert os.path.getmtime(tmp_path / "final" / "model.safetensors") == mtime and result.final_dir.endswith("final")
    grpo.main(grpo_args(tiny_model_dir, tmp_path, resume=True, max_steps=3))
    assert [row["step"] for row in runs.read_metrics(str(tmp_path))] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["cut", "missing"])
def test_a_cut_off_or_missing_metrics_file_does_not_block_resume(damage, tiny_model_dir, tmp_path):
    """A last metrics line cut off mid-write (a kill, a full disk), or no metrics.jsonl at all, still resumes."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=2, save_every=1))
    path = tmp_path / "metrics.jsonl"
    if damage == "cut":
        path.write_bytes(path.read_bytes()[:-25])
    else:
        path.unlink()
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=3, resume=True))
    steps = [row["step"] for row in runs.read_metrics(str(tmp_path))]
    assert steps == ([1, 3] if damage == "cut" else [3])


def test_a_resume_is_the_same_run_or_refused_and_args_json_keeps_the_original(tiny_model_dir, tmp_path):
    """--resume with a setting that defines the run (preset, group size, data, seed, learning rate) stops in one
    sentence naming it and what args.json recorded, before anything is written; a setting a resume may change
    (max_steps, eval and save cadence) is taken, recorded in resumes.jsonl, and args.json keeps the original."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=2, save_every=1))
    before = {name: (tmp_path / name).read_bytes() for name in ("args.json", "metrics.jsonl")}
    assert json.loads(before["args.json"])["script"] == "grpo.py"
    for change, named in [({"preset": "dapo"}, "--preset dapo (recorded: grpo)"),
                          ({"num_generations": 4}, "--num-generations 4 (recorded: 2)"),
                          ({"dataset": "countdown"}, "--dataset countdown (recorded: arithmetic)"),
                          ({"seed": 123}, "--seed 123 (recorded: 0)"),
                          ({"lr": 1e-3}, "--lr 0.001 (recorded: ")]:
        with pytest.raises(K.UserError, match="--resume would change the run in") as error:
            grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=3, resume=True, **change))
        assert named in str(error.value), str(error.value)
        assert {name: (tmp_path / name).read_bytes() for name in before} == before
        assert not (tmp_path / "checkpoint-3").exists() and not (tmp_path / "resumes.jsonl").exists()
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=3, save_every=3, resume=True))
    assert (tmp_path / "args.json").read_bytes() == before["args.json"]
    record = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["changed"]) for r in record] == [(2, {"max_steps": [2, 3], "save_every": [1, 3]})]
    assert [row["step"] for row in runs.read_metrics(str(tmp_path))] == [1, 2, 3]


def test_a_script_refuses_an_out_dir_another_script_wrote(tiny_model_dir, tmp_path):
    """sft.py --resume (or ppo.py --resume) on a GRPO run stops in one sentence before any model loads, and GRPO's
    final/, args.json and metrics stay as they were (sft.py used to train from GRPO's final/ and replace them)."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=1))
    kept = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path.name != ".lock"}
    attempts = [lambda: sft.main(sft.Args(preset="toy_base", out_dir=str(tmp_path), resume=True, max_steps=2)),
                lambda: ppo.main(ppo.Args(model=tiny_model_dir, out_dir=str(tmp_path), resume=True, max_steps=2))]
    for script, attempt in zip(("sft.py", "ppo.py"), attempts):
        with pytest.raises(K.UserError, match=f"holds a run of grpo.py, not of {script}"):
            attempt()
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path.name != ".lock"} == kept


def test_a_deleted_args_json_lifts_no_check_and_a_path_spelled_otherwise_is_the_same(tiny_model_dir, tmp_path):
    """Every checkpoint keeps the run's settings, so with args.json deleted a resume that changes the seed or the
    learning rate, or comes from another script, is still refused, and args.json comes back as the original; the
    same model directory written with a trailing slash is the same setting."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=2, save_every=1))
    original = json.loads((tmp_path / "args.json").read_text())
    (tmp_path / "args.json").unlink()
    for change in ({"seed": 7}, {"lr": 0.5}):
        with pytest.raises(K.UserError, match="--resume would change the run"):
            grpo.main(grpo_args(tiny_model_dir, tmp_path, max_steps=3, resume=True, **change))
    with pytest.raises(K.UserError, match="holds a run of grpo.py, not of ppo.py"):
        ppo.main(ppo.Args(model=tiny_model_dir, out_dir=str(tmp_path), resume=True, max_steps=3))
    grpo.main(grpo_args(tiny_model_dir.rstrip("/") + "/", tmp_path, max_steps=3, resume=True))
    assert json.loads((tmp_path / "args.json").read_text()) == original
    assert [row["step"] for row in runs.read_metrics(str(tmp_path))] == [1, 2, 3]


def test_overwrite_deletes_a_runs_files_only(tiny_model_dir, tmp_path):
    """--overwrite (or --resume) on a directory holding files that are not a run's (a home, a project folder) stops
    in one sentence naming them and leaves the directory exactly as it was (--overwrite deleted everything there)."""
    (tmp_path / "precious.txt").write_text("years of work")
    (tmp_path / "notes").mkdir()
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(K.UserError, match=r"holds files that are not a run's \(notes, precious.txt\)"):
            grpo.main(grpo_args(tiny_model_dir, tmp_path, **flags))
        assert sorted(os.listdir(tmp_path)) == ["notes", "precious.txt"]


def _damage(checkpoint, how: str):
    from safetensors.torch import load_file, save_file

    weights, state = checkpoint / "model.safetensors", checkpoint / "trainer_state.pt"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "wrong-shape weights":
        tensors = load_file(str(weights))
        name = next(k for k, v in tensors.items() if v.dim() == 2)
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif how == "missing weights":
        weights.unlink()
    elif how == "truncated trainer state":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif how == "empty trainer state":
        state.write_bytes(b"")
    elif how == "truncated rng state":
        rng = checkpoint / "rng_rank0.pt"
        rng.write_bytes(rng.read_bytes()[:200])
    elif how == "a weight missing":
        tensors = load_file(str(weights))
        del tensors[sorted(tensors)[-1]]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif how in ("wrong-shape optimizer state", "no optimizer state"):
        saved = torch.load(state, weights_only=True)
        if how == "no optimizer state":
            del saved["optimizer"]
        else:
            moments = next(v for v in saved["optimizer"]["state"].values() if v["exp_avg"].dim() == 2)
            moments["exp_avg"] = moments["exp_avg"][:, :-1].clone()  # loaded silently, a segfault at the step
        torch.save(saved, state)


@pytest.mark.parametrize("how", ["truncated weights", "wrong-shape weights", "missing weights", "a weight missing",
                                 "truncated trainer state", "empty trainer state", "truncated rng state",
                                 "wrong-shape optimizer state", "no optimizer state"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one_or_stops_in_one_sentence(how, tiny_model_dir,
                                                                                          tmp_path, capsys):
    """A run cut off after checkpoint-2 whose checkpoint-2 is damaged resumes from checkpoint-1 with a warning that
    names both, and ends bit-equal to the run that was never cut off; when every checkpoint is damaged, one
    sentence naming them (no traceback, nothing written)."""
    from safetensors.torch import load_file

    straight = grpo.main(grpo_args(tiny_model_dir, tmp_path / "straight", max_steps=3))
    run = tmp_path / "run"
    grpo.main(grpo_args(tiny_model_dir, run, max_steps=3, save_every=1))
    for name in ("final", "checkpoint-3"):
        __import__("shutil").rmtree(run / name)
    _damage(run / "checkpoint-2", how)
    capsys.readouterr()
    result = grpo.main(grpo_args(tiny_model_dir, run, max_steps=3, resume=True))
    out = capsys.readouterr().out
    assert f"damaged checkpoint {run / 'checkpoint-2'}" in out and f"{run / 'checkpoint-1'}" in out, out
    assert "Resumed from" in out and out.split("Resumed from ")[1].startswith(str(run / "checkpoint-1"))
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (straight.final_dir, result.final_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("final", "checkpoint-2", "checkpoint-3"):
        __import__("shutil").rmtree(run / name, ignore_errors=True)
    _damage(run / "checkpoint-1", how)
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(K.UserError, match=r"--resume: no checkpoint in .* (is intact|can be restored)"):
        grpo.main(grpo_args(tiny_model_dir, run, max_steps=3, resume=True))
    assert (run / "metrics.jsonl").read_bytes() == metrics and not (run / "final").exists()


@pytest.mark.parametrize("where", ["/proc/rl-test-run", "/sys/rl-test-run", "a file", "under a file"])
def test_an_out_dir_that_cannot_be_written_is_one_sentence(where, tiny_model_dir, tmp_path):
    (tmp_path / "file.txt").write_text("not a directory")
    out_dir = {"a file": str(tmp_path / "file.txt"), "under a file": str(tmp_path / "file.txt" / "run")}.get(where,
                                                                                                             where)
    with pytest.raises(K.UserError, match=f"--out-dir {out_dir}: cannot write a run there"):
        grpo.main(grpo_args(tiny_model_dir, out_dir))


@pytest.mark.parametrize("script", ["sft", "grpo"])
def test_resuming_at_an_exact_epoch_boundary_trains_on(script, tiny_model_dir, tmp_path, monkeypatch):
    """A run stopped exactly where an epoch of its data ends resumes into the next epoch and ends as the run that
    never stopped (verl once exited 0 there without training on): 4 prompts, 2 per step, stopped after step 2 of 4;
    SFT, 32 rows in batches of 8 over 2 epochs, stopped after step 4 of 8."""
    from safetensors.torch import load_file

    if script == "grpo":
        data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)}
                                                      for a in range(4)])
        make = lambda out, **kw: grpo_args(tiny_model_dir, out, dataset=data, eval_dataset=data, max_steps=4, **kw)
        main, boundary, total = grpo.main, 2, 4
    else:
        rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(4)]
        data, held = (write_jsonl(tmp_path / f"{name}.jsonl", rows) for name in ("train", "eval"))
        make = lambda out, **kw: sft.Args(preset="toy_base", out_dir=str(out), export_dir="", dataset=data,
                                          eval_dataset=held, epochs=2, max_steps=0, batch_size=8, grad_accum=1,
                                          warmup_steps=1, eval_every=0, save_every=0, device="cpu", **kw)
        main, boundary, total = sft.main, 4, 8
    straight = main(make(tmp_path / "straight"))
    calls = {"n": 0}

    def stop_at_the_boundary(self):
        calls["n"] += 1
        return calls["n"] == boundary

    with monkeypatch.context() as patch:
        patch.setattr(runs.StopSignal, "should_stop", stop_at_the_boundary)
        stopped = main(make(tmp_path / "run"))
    assert stopped.stopped_at == boundary
    resumed = main(make(tmp_path / "run", resume=True))
    assert resumed.stopped_at is None and resumed.final_dir is not None
    trained = [row["step"] for row in runs.read_metrics(resumed.out_dir) if "train/loss" in row or "loss" in row]
    assert trained[-1] == total and runs.checkpoint_step(resumed.final_dir) == total
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (straight.final_dir, resumed.final_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- stops

SIGNALLING_REWARD = """
import os, signal, time
calls = [0]
def reward(completions, **columns):
    calls[0] += 1
    if calls[0] == {when}:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(60)  # a slow reward: the stop must not wait for it
    return [float(len(c) % 3) for c in completions]
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_a_slow_reward_stops_within_seconds_and_resumes_exactly(sig, code, tiny_model_dir, tmp_path):
    """A signal that arrives while a reward runs (here the reward's own third call, which then sleeps a minute)
    stops the run within seconds: the step is dropped, the steps done are saved, and the exit status is 128 + the
    signal. Resuming then ends with exactly the weights of an uninterrupted run."""
    (tmp_path / "slow_reward.py").write_text(SIGNALLING_REWARD.format(when=3, sig=sig))
    flags = ["grpo.py", "--model", tiny_model_dir, "--max-steps", "4", "--prompts-per-step", "2",
             "--num-generations", "2", "--max-new-tokens", "8", "--eval-every", "0", "--no-plot",
             "--rewards", f"{tmp_path}/slow_reward.py:reward"]
    stopped, seconds = run_script([*flags, "--out-dir", str(tmp_path / "run")], timeout=100)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert seconds < 40  # interpreter start and two steps included; the reward alone would take 60 s
    assert runs.latest_checkpoint(str(tmp_path / "run")).endswith("checkpoint-2")
    if sig == "SIGINT":
        return  # the same path: resuming is checked once
    (tmp_path / "slow_reward.py").write_text(SIGNALLING_REWARD.format(when=-1, sig=sig))
    resumed, _ = run_script([*flags, "--out-dir", str(tmp_path / "run"), "--resume"])
    straight, _ = run_script([*flags, "--out-dir", str(tmp_path / "straight")])
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr[-2000:] + straight.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sigterm_during_the_final_save_still_leaves_a_finished_run(tiny_model_dir, tmp_path):
    """SIGTERM while final/ is being written: the handler is still in place, so the save completes (no .tmp-final
    left), the process exits 143, and a --resume then says the run is finished."""
    driver = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import grpo, rl_runs as runs
        save = runs.save_checkpoint
        def save_and_signal(*args, name=None, **kwargs):
            if name == "final":
                os.kill(os.getpid(), signal.SIGTERM)
            return save(*args, name=name, **kwargs)
        runs.save_checkpoint = save_and_signal
        runs.run_cli(grpo.main, grpo.Args(model={tiny_model_dir!r}, out_dir={str(tmp_path)!r}, max_steps=2,
                  prompts_per_step=2, num_generations=2, max_new_tokens=8, eval_every=0, plot=False))
    """)
    done, _ = run_script(["-c", driver])
    assert done.returncode == 143, done.stderr[-2000:]
    assert os.path.exists(tmp_path / "final" / "trainer_state.pt") and not os.path.exists(tmp_path / ".tmp-final")
    with runs.Run(str(tmp_path), resume=True, max_steps=2) as run:
        assert run.finished


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while a checkpoint is written: one sentence naming the checkpoint and saying the disk is full; the
    half-written one is removed and the previous checkpoint still loads."""
    from conftest import tiny_causal_lm

    model = tiny_causal_lm()
    optimizer = torch.optim.AdamW(model.parameters())
    runs.save_checkpoint(str(tmp_path), 1, model, optimizer=optimizer)
    real_save = torch.save

    def full(obj, path, *a, **k):
        if "trainer_state" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(K.UserError, match=r"disk is full: writing the checkpoint .*checkpoint-2.*checkpoint-1 is intact"):
        runs.save_checkpoint(str(tmp_path), 2, model, optimizer=optimizer)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    assert runs.load_checkpoint(str(tmp_path / "checkpoint-1"), model, optimizer)["step"] == 1


@pytest.mark.slow
def test_a_stalled_rank_stops_the_others_after_the_timeout(tmp_path):
    """A rank that never reaches a collective stops the others after init_distributed's timeout (3 s here), not
    after gloo's default 30 minutes; the run exits non-zero."""
    script = tmp_path / "stall.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        import rl_kernels as K
        import rl_runs as runs
        info = runs.init_distributed("cpu", timeout_s=3)
        if info.rank == 1:
            time.sleep(40)
        K.barrier()
    """))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 35, "the waiting rank should give up after about 3 s"


# ---------------------------------------------------------------------------------------------- data


def test_every_row_is_checked_before_any_model_loads(tmp_path):
    """A row without the field a reward reads, an empty prompt, or a bad message list stops the load naming the
    file and the line (not a TypeError mid-training); a byte-order mark is accepted."""
    good = {"prompt": "1+1", "answer": "2"}
    for bad, why in [({"prompt": "2+2"}, "line 3: no 'answer', which the rewards need"),
                     ({"prompt": "  ", "answer": "1"}, "line 3: the prompt is empty"),
                     ({"prompt": [{"role": "user", "content": ""}], "answer": "1"}, "line 3: the prompt is empty")]:
        path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
        with pytest.raises(env.DataError, match=f"{path}, {why}"):
            grpo.main(grpo_args("/nonexistent/model-never-loaded", tmp_path / "out", dataset=path,
                                rewards=("accuracy",)))
        assert not (tmp_path / "out").exists()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n")
    assert env.load_prompts(str(tmp_path / "bom.jsonl"), required=["answer"]) == [good]


def test_text_the_tokenizer_cannot_represent_is_named():
    """The toy tokenizer is ASCII: a prompt with "×" or "六" is named in a warning (it maps them to <|unk|>)."""
    tokenizer = toy.build_toy_tokenizer()
    rows = [{"prompt": "2+3"}, {"prompt": "2×3"}, {"prompt": "六"}]
    with pytest.warns(RuntimeWarning, match=r"2 prompt\(s\) hold characters .* row 1: '2×3'"):
        kept = env.fit_prompts(tokenizer, rows, max_new_tokens=4, context=256, source="data.jsonl")
    assert kept == rows


def test_prompts_longer_than_the_context_are_dropped_with_a_count():
    """Prompts that leave no room for max_new_tokens are dropped with a warning naming how many; if none fits, one
    sentence says so."""
    tokenizer = toy.build_toy_tokenizer()
    rows = [{"prompt": "1+1"}, {"prompt": "9" * 100}, {"prompt": "2+2"}]
    with pytest.warns(RuntimeWarning, match=r"dropped 1 of 3 prompts"):
        kept = env.fit_prompts(tokenizer, rows, max_new_tokens=20, context=64, source="d", template="plain")
    assert kept == [rows[0], rows[2]]
    with pytest.raises(env.DataError, match="no prompt fits the model's context of 64 tokens"):
        env.fit_prompts(tokenizer, rows[1:2], max_new_tokens=20, context=64, source="d", template="plain")


@pytest.mark.parametrize("returned, why", [
    ({"a": 1.0, "b": 0.0}, "returned a dict"), ("10", "returned a str"), ([1.0], "returned 1 values for 2"),
    ([1.0, "1"], "gave completion 1 of 2 the value '1'"), ([1.0, math.nan], "gave completion 1 of 2 the value nan"),
    ([math.inf, 0.0], "gave completion 0 of 2 the value inf")])
def test_reward_values_are_checked_and_named(returned, why):
    """A dict, a string, a wrong length, a non-number, NaN or inf: a RewardError naming the reward, the sample and
    the value (today a dict's keys became rewards and one NaN skipped the batch blaming the loss)."""
    def mine(completions, **columns):
        return returned

    with pytest.raises(env.RewardError, match=f"reward 'mine' {why}"):
        env.combine_rewards([(mine, 1.0)], ["a", "b"])


def test_a_reward_that_applies_to_nothing_is_warned_about_and_a_slow_one_is_bounded():
    """All None: a warning (once) that the reward applies to none of the batch; a reward slower than
    reward_timeout_s: a RewardError naming it, raised on time."""
    def never(completions, **columns):
        return [None] * len(completions)

    def slow(completions, **columns):
        time.sleep(30)

    with pytest.warns(RuntimeWarning, match="reward 'never' returned None for all 2 completions"):
        assert env.combine_rewards([(never, 1.0)], ["a", "b"])[0] == [0.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.combine_rewards([(never, 1.0)], ["a", "b"])  # once per reward
    start = time.monotonic()
    with pytest.raises(env.RewardError, match="reward 'slow' took longer than 0.5 s"):
        env.combine_rewards([(slow, 1.0)], ["a"], reward_timeout_s=0.5)
    assert time.monotonic() - start < 5


def test_redundant_brackets_around_an_answer_are_stripped():
    """A correct 17 wrapped in 30 parentheses scores 1 at once (math-verify took seconds and timed out);
    a tuple keeps its brackets."""
    start = time.monotonic()
    assert env.accuracy_reward(["<answer>" + "(" * 30 + "17" + ")" * 30 + "</answer>"], ["17"]) == [1.0]
    assert time.monotonic() - start < 1
    assert env._unwrap("((1, 2))") == "(1, 2)" and env._unwrap("(1)+(2)") == "(1)+(2)" and env._unwrap("{[x]}") == "x"


# ---------------------------------------------------------------------------------------------- user mistakes

MISTAKES = [
    ("grpo", ["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory", {}),
    ("grpo", ["--model", "Qwen/Qwen2.5-0.5B-Instruct"], "--model Qwen/Qwen2.5-0.5B-Instruct: not in the local hub "
     "cache, and the model hub cannot be reached", {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}),
    ("grpo", ["--lr", "-1"], "--lr -1.0: must be positive", {}),
    ("grpo", ["--max-new-tokens", "0"], "--max-new-tokens 0: must be positive", {}),
    ("grpo", ["--device", "gpu"], "gpu", {}),
    ("grpo", ["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be a whole number from 0", {}),
    ("sft", ["--seed", "4294967296"], "--seed 4294967296: must be a whole number from 0", {}),
    ("sft", ["--model", "/nonexistent/model"], "no such directory", {}),
    ("sft", ["--lr", "-1"], "--lr -1.0: must be positive", {}),
    ("rlhf_reward_model", ["--model", "/nonexistent/model"], "no such directory", {}),
    ("rlhf_reward_model", ["--batch-size", "0"], "--batch-size 0: must be positive", {}),
    ("ppo", ["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory", {}),
    ("ppo", ["--critic-lr", "0"], "--critic-lr must be positive", {}),
    ("ppo", ["--preset", "rlhf", "--reward-model", "/nonexistent/rm"], "train one with `python rlhf_reward_model.py`",
     {}),
]


@pytest.mark.parametrize("script, flags, sentence, env", MISTAKES, ids=lambda v: v if isinstance(v, str) else None)
def test_a_user_mistake_gets_one_sentence_and_exit_2_fast(script, flags, sentence, env, tmp_path, capsys,
                                                          monkeypatch):
    """The command line of every training script: a bad path, an unreachable hub, a bad device or value prints
    `error: <one sentence naming the value>` and exits 2, with no traceback, within seconds and before any model
    loads (run in-process here, as `__main__` runs it)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module = {"grpo": grpo, "sft": sft, "rlhf_reward_model": rlhf_reward_model, "ppo": ppo}[script]
    argv = [*flags, "--out-dir", str(tmp_path / "out")]
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        parsed = module.cli(argv) if hasattr(module, "cli") else __import__("tyro").cli(module.Args, args=argv)
        runs.run_cli(module.main, parsed)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and sentence in err, err[-2000:]
    assert time.monotonic() - start < 15
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_sentence(capsys, tmp_path):
    """--device cuda on a machine without CUDA: one sentence, exit 2."""
    with pytest.raises(SystemExit) as stop:
        runs.run_cli(grpo.main, grpo.cli(["--device", "cuda", "--out-dir", str(tmp_path)]))
    assert stop.value.code == 2 and "--device cuda: this machine has no usable CUDA GPU" in capsys.readouterr().err


def test_a_bug_of_ours_keeps_its_traceback(monkeypatch, tmp_path):
    """Only user mistakes are turned into one sentence: an error in our own code still raises with its traceback."""
    monkeypatch.setattr(grpo, "check_args", lambda args, info: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        runs.run_cli(grpo.main, grpo.Args(out_dir=str(tmp_path)))


def test_the_whole_command_line_path_prints_no_traceback(tmp_path):
    """One real process: `python grpo.py --model /nonexistent/model` exits 2 with the sentence on stderr only."""
    done, seconds = run_script(["grpo.py", "--model", "/nonexistent/model", "--out-dir", str(tmp_path)])
    assert done.returncode == 2 and done.stderr.startswith("error: --model '/nonexistent/model'"), done.stderr
    assert "Traceback" not in done.stderr and seconds < 30


# ---------------------------------------------------------------------------------------------- defaults


def test_a_single_reward_needs_no_weights_and_the_toy_default_keeps_its_format_weight():
    """--rewards accuracy alone gets weight 1 (it used to fail on the default weights' count); the default
    rewards keep 1 and 0.1; given weights win; a count mismatch is one sentence."""
    assert grpo.reward_functions(grpo.Args(rewards=("accuracy",)))[1] == (1.0,)
    assert grpo.reward_functions(grpo.Args())[1] == (1.0, 0.1)
    assert grpo.reward_functions(grpo.Args(rewards=("task", "format"), reward_weights=(1.0, 1.0)))[1] == (1.0, 1.0)
    with pytest.raises(K.UserError, match="one weight per reward"):
        grpo.check_args(grpo.Args(rewards=("accuracy",), reward_weights=(1.0, 0.1)), runs.DistInfo())


def test_help_shows_switches_and_choices(capsys, monkeypatch):
    """--compile is a switch; --device, --dtype and --report-to show their choices, in every training script."""
    import tyro

    monkeypatch.setenv("COLUMNS", "200")
    for name, parse in (("grpo", lambda: grpo.cli(["--help"])), ("sft", lambda: sft.cli(["--help"])),
                        ("rlhf", lambda: tyro.cli(rlhf_reward_model.Args, args=["--help"])),
                        ("ppo", lambda: ppo.cli(["--help"]))):
        with pytest.raises(SystemExit):
            parse()
        out = capsys.readouterr().out
        assert "{auto,cpu,cuda}" in out and "{auto,float32,bfloat16,float16}" in out, name
        assert "--report-to" in out and "--overwrite" in out, name
        if name in ("grpo", "ppo"):
            assert "--compile, --no-compile" in out


def test_a_jsonl_without_eval_dataset_holds_out_a_slice_and_says_so(tiny_model_dir, tmp_path, capsys):
    """A .jsonl dataset and no --eval-dataset: a seeded tenth (at most --eval-size) is held out of training and
    evaluated before and after, and the run says so."""
    rows = [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a in range(5) for b in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = grpo.main(grpo_args(tiny_model_dir, tmp_path / "out", dataset=path, eval_every=2, eval_samples=0))
    assert "Held out 2 of" in capsys.readouterr().out
    assert "eval/accuracy" in result.before and "eval/accuracy" in result.after


# ---------------------------------------------------------------------------------------------- conventions


def test_samples_jsonl_shows_completions_with_their_rewards_and_advantages(tiny_model_dir, tmp_path):
    """samples.jsonl: a few completions per step with the prompt, each reward, the total and the advantage."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path, log_samples=2))
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert set(samples[0]) >= {"prompt", "completion", "rewards", "reward", "advantage", "correct"}
    assert set(samples[0]["rewards"]) == {"accuracy", "format"}


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_report_to_tensorboard_writes_event_files(tiny_model_dir, tmp_path):
    """--report-to tensorboard writes TensorBoard event files holding the run's scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grpo.main(grpo_args(tiny_model_dir, tmp_path, report_to=("tensorboard",)))
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("rollout/reward_mean")] == [1, 2]


def test_report_to_an_uninstalled_logger_is_one_sentence(monkeypatch):
    """--report-to names a package that is not installed: one sentence before any model loads."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(K.UserError, match="--report-to wandb needs the wandb package: pip install wandb"):
        runs.check_reporters(["wandb"])


def test_datasets_as_researchers_have_them(tmp_path):
    """A JSON list file, and (with `datasets`) a directory saved with save_to_disk, with --prompt-column and
    --answer-column: GSM8K's "... #### 72" answers count as 72."""
    gsm8k = [{"question": "Tom has 70 apples and gets 2 more. How many?", "answer": "70 + 2 = 72\n#### 72"}]
    (tmp_path / "d.json").write_text(json.dumps(gsm8k))
    rows = env.load_prompts(str(tmp_path / "d.json"), prompt_column="question", required=["answer"])
    assert rows[0]["prompt"].startswith("Tom") and env.accuracy_reward(["<answer>72</answer>"], [rows[0]["answer"]]) == [1.0]
    with pytest.raises(env.DataError, match="item 0: each row must be an object with a 'prompt'"):
        env.load_prompts(str(tmp_path / "d.json"))
    pytest.importorskip("datasets")
    import datasets

    datasets.Dataset.from_list(gsm8k * 3).save_to_disk(str(tmp_path / "saved"))
    rows = env.load_prompts(str(tmp_path / "saved"), prompt_column="question", answer_column="answer")
    assert len(rows) == 3 and rows[0]["prompt"] == gsm8k[0]["question"]


def test_the_rewards_command_line_scores_a_file(tmp_path):
    """`python rlvr_rewards.py FILE --rewards ...` prints each reward's mean and the rows; --help explains it."""
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"completion": "<think>3*4=12</think><answer>12</answer>", "answer": "12"},
        {"completion": "<answer>7</answer>", "answer": "12"}])
    done, _ = run_script(["rlvr_rewards.py", path, "--rewards", "accuracy", "format", "--weights", "1", "0.1"])
    assert done.returncode == 0, done.stderr
    assert "| accuracy | 1 | 0.5000 | 2 of 2 |" in done.stdout and "| format | 0.1 | 0.5000 | 2 of 2 |" in done.stdout
    assert "completion" in run_script(["rlvr_rewards.py", "--help"])[0].stdout


def test_logs_off_a_terminal_are_plain_lines(tiny_model_dir, tmp_path, capsys):
    """Off a terminal (CI, nohup, tee) progress comes as plain lines, not carriage-return bars; a reward model on a
    causal-LM backbone prints no load report about its new head."""
    grpo.main(grpo_args(tiny_model_dir, tmp_path / "g"))
    captured = capsys.readouterr()
    assert "grpo: step 2/2" in captured.out and "\r" not in captured.out + captured.err
    rlhf_reward_model.main(rlhf_reward_model.Args(model=tiny_model_dir, out_dir=str(tmp_path / "rm"), max_steps=2,
                                                  batch_size=2, toy_train_prompts=4, toy_eval_prompts=2,
                                                  eval_every=0, save_every=0))
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err and "\r" not in captured.out + captured.err


# ---------------------------------------------------------------------------------------------- ppo.py's run

def ppo_flags(model_dir, reward: str) -> list[str]:
    return ["ppo.py", "--model", model_dir, "--max-steps", "4", "--prompts-per-step", "2", "--num-generations", "2",
            "--max-new-tokens", "8", "--eval-every", "0", "--no-plot", "--rewards", reward]


@pytest.mark.slow
def test_ppo_stops_on_a_signal_during_a_slow_reward_and_resumes_exactly(tiny_model_dir, tmp_path):
    """ppo.py under the same lifecycle: SIGTERM during a reward drops the step, saves the two done (the critic
    inside the checkpoint) and exits 143; resuming ends with the policy and critic of an uninterrupted run."""
    from safetensors.torch import load_file

    (tmp_path / "slow_reward.py").write_text(SIGNALLING_REWARD.format(when=3, sig="SIGTERM"))
    flags = ppo_flags(tiny_model_dir, f"{tmp_path}/slow_reward.py:reward")
    stopped, seconds = run_script([*flags, "--out-dir", str(tmp_path / "run")], timeout=100)
    assert stopped.returncode == 143 and seconds < 40, stopped.stderr[-2000:]
    checkpoint = runs.latest_checkpoint(str(tmp_path / "run"))
    assert checkpoint.endswith("checkpoint-2") and os.path.isdir(os.path.join(checkpoint, "critic"))
    (tmp_path / "slow_reward.py").write_text(SIGNALLING_REWARD.format(when=-1, sig="SIGTERM"))
    resumed, _ = run_script([*flags, "--out-dir", str(tmp_path / "run"), "--resume"])
    straight, _ = run_script([*flags, "--out-dir", str(tmp_path / "straight")])
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr[-2000:] + straight.stderr[-2000:]
    for part in ("model.safetensors", "critic/model.safetensors"):
        a, b = (load_file(tmp_path / run / "final" / part) for run in ("run", "straight"))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_ppo_owns_its_out_dir_and_a_finished_run_changes_nothing(tiny_model_dir, tmp_path):
    """ppo.main refuses a used out-dir, says a finished run is finished on --resume (rewriting nothing), and logs
    samples.jsonl with each response's mean token advantage."""
    args = dict(model=tiny_model_dir, out_dir=str(tmp_path), max_steps=2, prompts_per_step=2, num_generations=2,
                max_new_tokens=8, eval_every=0, plot=False, log_samples=2)
    ppo.main(ppo.Args(**args))
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [s["step"] for s in samples] == [1, 1, 2, 2] and set(samples[0]["rewards"]) == {"accuracy", "format"}
    assert all(math.isfinite(s["advantage"]) for s in samples)
    with pytest.raises(K.UserError, match="already holds a run"):
        ppo.main(ppo.Args(**args))
    mtime = os.path.getmtime(tmp_path / "final" / "critic" / "model.safetensors")
    result = ppo.main(ppo.Args(**args, resume=True))
    assert result.final_dir.endswith("final") and result.stopped_at is None
    assert os.path.getmtime(tmp_path / "final" / "critic" / "model.safetensors") == mtime
