"""sft.py: supervised fine-tuning on completions: RLHF step 1, the DeepSeek-R1 cold start, rejection-sampling SFT,
distillation into a small student, and (presets toy_base, toy_student) the pretraining that makes the toy models.

Next-token cross-entropy on the completion tokens only (the prompt is context, not a target). For a batch of N
(prompt x, completion y) pairs, y ending with EOS (or the chat template's end of turn):

    L(theta) = - sum_i sum_t m_{i,t} log pi_theta(y_{i,t} | x_i, y_{i,<t})  /  sum_i sum_t m_{i,t}

    symbol          meaning                                             Args field
    N               sequences per optimizer step (all ranks, all        batch_size
                    micro-batches); N / (ranks * grad_accum) per pass   grad_accum
    m_{i,t}         1 on completion tokens (EOS included), 0 on the     (from the data)
                    prompt and on padding
    eta_s           learning rate at step s: linear warmup for          lr, warmup_steps,
                    warmup_steps, then cosine down to min_lr_ratio*lr   min_lr_ratio, max_steps
    theta_0         --model, or random weights from a config            model, init_from_config

Presets (`--preset NAME` sets the fields you leave unset; any flag you pass wins):
    cold_start   (default) the DeepSeek-R1 cold start in the toy world: toy/base, which usually answers directly and
                 writes messy, two-language reasoning when it reasons, fine-tuned on correct readable R1-format traces
                 (<think>3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>, the 'arithmetic' dataset).
    toy_base     pretrain the toy base model from random weights on the toy corpus (toy_world.py) and export it to
                 toy/base if it meets toy_world.TOY_TARGETS (15-65 min on one CPU core).
    toy_student  the same corpus into the smaller student, exported to toy/student (r1_pipeline.py distils into it).

Deliberate choices:
  - Token-mean over the whole batch (every completion token weighs the same, as in HF/TRL SFT), not a mean of
    per-sequence means; with gradient accumulation and several ranks the denominator is still the whole
    batch's token count, so the update does not depend on how the batch is split.
  - Prompt and completion are tokenized separately and concatenated, so the loss mask's boundary is exact.
    Chat data render the prompt with the tokenizer's chat template and the generation prompt; the completion
    is whatever the template adds for the assistant turn (its end-of-turn token included). Only the last
    assistant turn of a `messages` row is a target.
  - Log-probs come from rl_kernels.token_logprobs (chunked, fused): the (B, T, V) logits never exist.
  - The data order is a seeded permutation per epoch and a step's samples are a function of the step, so
    --resume needs only the step to continue exactly where it stopped (bit for bit on CPU).
  - Each step's batch is sorted by length before it is split over ranks and micro-batches, so short direct
    answers are not padded to the length of reasoning traces (about a third less compute on the toy corpus);
    the loss does not change, since its denominator is the whole batch's token count.

Launch:
    python sft.py                                          # the R1 cold start on toy/base, CPU, under a minute
    OMP_NUM_THREADS=1 python sft.py --preset toy_base      # rebuild toy/base (15-65 min on one CPU core)
    python sft.py --model Qwen/Qwen2.5-0.5B --dataset data.jsonl --epochs 2 --lr 1e-5 --out-dir runs/sft
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-7B --dataset data.jsonl --strategy fsdp \\
        --batch-size 64 --grad-accum 2 --lr 1e-5 --out-dir runs/sft-7b
Data: a UTF-8 .jsonl file with one object a line, {"prompt": str | [messages], "completion": str} or
{"messages": [..., {"role": "assistant", ...}]}; an "answer" field makes eval/accuracy possible.

Result of `python sft.py` (150 steps of 32 readable traces, lr 3e-4; seeds 1, 2, 3; 41-46 s in all, one thread of
a 2-core AMD EPYC, 2026-12-06): held-out greedy accuracy 35.2 / 32.0 / 35.5% -> 96.5 / 91.8 / 93.0% (mean 93.8%),
greedy answers that reason 23-27% -> 100%, T=1 traces that are readable 46% (seed 1) -> 99.0-99.7%, traces that mix
languages 25% (seed 1) -> 0.3-0.7%. The cold start's purpose in R1: readable reasoning from the first RL step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import transformers

import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env
import toy_world as toy


@dataclass
class SFTArgs:
    """SFT's own flags: the preset, the batch and schedule, the model and the data."""
    # The preset and the batch (None: the preset's value, PRESETS; else the cold start's, PRESET_FIELDS)
    preset: Literal["cold_start", "toy_base", "toy_student"] = "cold_start"
    """named set of fields (module docstring); fields left unset take the preset's values"""
    batch_size: int = None
    """sequences per optimizer step, over all ranks and micro-batches"""
    grad_accum: int = None
    """micro-batches per optimizer step (per rank)"""
    lr: float = None
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = 0.1
    """the cosine schedule ends at lr * min_lr_ratio"""
    warmup_steps: int = None
    """linear warmup from 0 to --lr"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0: off)"""
    max_length: int = 1024
    """sequences are cut to this many tokens (the completion's end is dropped)"""
    epochs: Optional[float] = None
    """passes over the training data; when given, it sets the number of steps instead of --max-steps"""
    # The model and the data
    model: Optional[str] = None
    """hub id or local checkpoint to fine-tune ("toy": toy/base); "": random weights from --init-from-config"""
    init_from_config: str = None
    """with --model "": 'toy' (the toy Qwen2), 'toy-student' (its smaller sibling), or a config.json / checkpoint
    directory whose config is used"""
    tokenizer: Optional[str] = None
    """tokenizer for --init-from-config (default: the toy character tokenizer)"""
    dataset: str = None
    """'toy' (the toy base model's corpus), a corpus of toy_world.TOY_WORLDS ('toy-checks', the verification world,
    and its controls), 'arithmetic' (correct readable traces: a cold start), or a .jsonl"""
    eval_dataset: Optional[str] = None
    """held-out .jsonl (default: the built-in test split, or --eval-size rows held out of the training file)"""
    num_examples: int = None
    """rows of a built-in corpus (distinct training problems)"""
    export_dir: Optional[str] = None
    """also save the final model here (toy/base only if it meets toy_world.TOY_TARGETS); "": nowhere"""
    # Evaluation
    eval_every: int = None
    """evaluate every N steps, at the start and at the end (0: only at the end)"""
    eval_size: int = 256
    """held-out rows for eval/loss and eval/accuracy (and the toy world's table)"""
    max_new_tokens: int = 64
    """generation length for eval/accuracy"""


@dataclass
class Args(runs.RunArgs, SFTArgs):
    """sft.py's command line, in --help's order: SFT's flags (SFTArgs), then the run's (rl_runs.RunArgs); the
    fields set to None here are the preset's."""
    out_dir: str = None
    seed: int = 1
    max_steps: int = None
    save_every: int = None

    def __post_init__(self):
        runs.apply_preset(self, PRESETS, PRESET_FIELDS)


# The fields a preset sets, at the cold start's values, and what the toy presets change (the toy base's recipe: seed
# 1, 1300 steps of 128 sequences of the toy corpus from random weights).
PRESET_FIELDS = dict(model="toy", init_from_config="toy", dataset="arithmetic", num_examples=4000, batch_size=32,
                     grad_accum=1, lr=3e-4, warmup_steps=10, max_steps=150, eval_every=50, save_every=0,
                     export_dir="", out_dir="runs/sft")
_TOY = dict(model="", dataset="toy", num_examples=60000, batch_size=128, grad_accum=2, lr=3e-3, warmup_steps=50,
            max_steps=1300, eval_every=400, save_every=500)
PRESETS: dict[str, dict] = {
    "cold_start": {},
    "toy_base": {**_TOY, "export_dir": toy.TOY_BASE, "out_dir": "runs/sft-toy-base"},
    "toy_student": {**_TOY, "init_from_config": "toy-student", "export_dir": toy.TOY_STUDENT,
                    "out_dir": "runs/sft-toy-student"},
}
PANELS = [("loss", [("train/loss", "train"), ("eval/loss", "held-out")], "completion NLL per token"),
          ("held-out (greedy)", [("eval/accuracy", "accuracy"), ("eval/reasoning_share", "reasoning share")], "share")]


def cli(argv: list[str] | None = None) -> Args:
    """The command line on top of Args(preset=...): --help shows the preset's values, and every flag given wins."""
    return runs.preset_cli(Args, PRESETS, "cold_start", argv)


# ----------------------------------------------------------------------------------------------------------
# Data: examples, JSONL, batches
# ----------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids: a string as it is (with the tokenizer's BOS, if it adds one), or chat messages rendered by
    the chat template with the generation prompt (rlvr_rewards.render_prompt)."""
    text = env.render_prompt(tokenizer, prompt, "plain")
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


def build_sft_example(tokenizer, prompt, completion: str) -> dict:
    """{input_ids, loss_mask}: prompt ids (mask 0) then completion ids (mask 1), the completion ending with EOS
    (plain prompts) or with what the chat template closes an assistant turn with (chat prompts). The first token
    is never a target: with an empty prompt and no BOS nothing precedes it (left-padded, it would be predicted
    from a pad position); any non-empty prompt already has mask 0 there."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = None
    if not isinstance(prompt, str):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                  tokenize=False)
        if full_text.startswith(prompt_text):  # some templates rewrite earlier turns; then fall back to EOS
            completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if completion_ids is None:
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    loss_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    loss_mask[0] = 0
    return {"input_ids": prompt_ids + completion_ids, "loss_mask": loss_mask}


def sft_row(row, where: str = "", line: int = 0) -> dict:
    """A JSONL object as {prompt, completion, answer?}; a DataError starting with `where` says what is wrong."""
    def bad(problem: str):
        raise env.DataError(f"{where}{problem}.")

    if not isinstance(row, dict):
        bad(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not env.is_messages(messages):
            bad("'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            bad("'messages' must end with an assistant message that follows at least one other message")
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            bad(f"missing field {missing[0]!r} (each line needs 'prompt' and 'completion', or 'messages')")
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) and not env.is_messages(prompt):
            bad("'prompt' must be a string or a list of {\"role\": str, \"content\": str} messages")
        if env.is_messages(completion) and len(completion) == 1 and completion[0]["role"] == "assistant":
            completion = completion[0]["content"]  # TRL's conversational prompt-completion form
        if not isinstance(completion, str):
            bad(f"'completion' must be a string, got {type(completion).__name__}")
    return {"prompt": prompt, "completion": completion, "answer": row.get("answer")}


def built_in(args: Args) -> bool:
    """--dataset names a built-in toy corpus (toy_world.toy_corpus), not a file."""
    return args.dataset in toy.TOY_WORLDS or args.dataset == "arithmetic"


def load_data(args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for --dataset / --eval-dataset."""
    if built_in(args):
        only, world = args.dataset == "arithmetic", "toy" if args.dataset == "arithmetic" else args.dataset
        return (toy.toy_corpus(args.num_examples, args.seed, "train", only, world),
                toy.toy_corpus(args.eval_size, args.seed, "test", only, world))
    rows = env.read_jsonl(args.dataset, sft_row)
    if args.eval_dataset:
        return rows, env.read_jsonl(args.eval_dataset, sft_row)
    return env.hold_out(rows, args.eval_size, args.seed)


def collate(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to the longest: input_ids, attention_mask, loss_mask, each (B, T)."""
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), T, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, T - n:] = torch.tensor(e["input_ids"])
        attention_mask[i, T - n:] = 1
        if e.get("loss_mask"):
            loss_mask[i, T - n:] = torch.tensor(e["loss_mask"])
    return input_ids, attention_mask, loss_mask


def completion_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """-sum(m * log pi) / num_tokens: the token-mean NLL over completion tokens (InstructGPT's SFT objective).
    logprobs, loss_mask: (B, T-1), aligned with the targets x_{t+1}; num_tokens defaults to loss_mask.sum()."""
    mask = loss_mask.to(logprobs.dtype)
    denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    return -(logprobs * mask).sum() / denom.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# Training glue
# ----------------------------------------------------------------------------------------------------------


def check_args(args: Args, info: runs.DistInfo):
    """Impossible settings fail here, before any data or model is loaded."""
    runs.check_settings(args)
    if args.batch_size % (info.world_size * args.grad_accum):
        raise K.UserError(f"--batch-size {args.batch_size} must be a multiple of ranks * --grad-accum = "
                          f"{info.world_size * args.grad_accum}.")
    if args.lora_rank and not args.model:
        raise K.UserError("--lora-rank adapts a trained model: pass --model (a model built from --init-from-config "
                          "is trained whole).")


def config_and_tokenizer(args: Args):
    """(config, tokenizer) of the model --model or --init-from-config names, without its weights."""
    if args.model:
        return env.model_config(args.model), K.load_tokenizer(K.resolve_model_path(args.model))
    from transformers import AutoConfig

    tokenizer = K.load_tokenizer(args.tokenizer) if args.tokenizer else toy.build_toy_tokenizer()
    return (toy.toy_model_config(tokenizer, args.init_from_config) if args.init_from_config in toy.TOY_SIZES
            else AutoConfig.from_pretrained(args.init_from_config)), tokenizer


def check_lengths(args: Args, eval_rows: list[dict], device: torch.device):
    """Before any weights load: --max-new-tokens plus the longest held-out prompt with an answer fits the model's
    context, and the KV caches of the evaluations (eval/accuracy; the toy world's table for the built-in data) fit
    in free memory."""
    answered = [row for row in eval_rows if row.get("answer") is not None]
    if not answered:
        return  # nothing is generated
    config, tokenizer = config_and_tokenizer(args)
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = env.check_context(tokenizer, answered, context=context, max_new_tokens=args.max_new_tokens,
                                source="the held-out set", template="plain")
    uses = {"evaluation": min(args.batch_size, -(-len(answered) // K.get_world_size()))}
    if built_in(args):  # toy_world.evaluate_toy: 256 prompts a call, 4 samples each
        uses["toy evaluation"] = min(256, args.eval_size) * 4
    env.check_kv_memory(config, uses, -(-longest // 16) * 16 + args.max_new_tokens,
                        K.resolve_precision(args.dtype, args.master_dtype, device)[0], device,
                        flags=f"--max-new-tokens {args.max_new_tokens} (or --batch-size, --eval-size)")


def load_or_init(args: Args, device: torch.device):
    """(model, tokenizer) from --model, or random weights from --init-from-config (seeded by --seed)."""
    if args.model:
        return K.load_model(args.model, dtype=args.dtype, master_dtype=args.master_dtype, device=device,
                            lora=runs.lora_of(args),
                            shard=args.strategy == "fsdp")  # FSDP2: sharded as it loads, never whole on a GPU
    from transformers import AutoModelForCausalLM

    config, tokenizer = config_and_tokenizer(args)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=K.resolve_precision(args.dtype, args.master_dtype,
                                                                               device)[1])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return K.set_precision(model.to(device), args.dtype), tokenizer


def encode(tokenizer, rows: list[dict], max_length: int, context: int) -> list[dict]:
    """build_sft_example for each row, cut to max_length tokens; what the tokenizer cannot represent, and what was
    cut, is announced."""
    examples = [build_sft_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    unknown = [i for i, e in enumerate(examples) if tokenizer.unk_token_id in e["input_ids"]]
    if unknown and tokenizer.unk_token_id is not None:
        K.print0(f"Warning: {len(unknown)} example(s) hold characters the tokenizer cannot represent "
                 f"(mapped to {tokenizer.unk_token}), e.g. row {unknown[0]}: "
                 f"{str(rows[unknown[0]]['prompt'])[:40]!r} -> {rows[unknown[0]]['completion'][:40]!r}")
    cut = sum(len(e["input_ids"]) > max_length for e in examples)
    if cut:
        K.print0(f"Cut {cut} of {len(examples)} examples to {max_length} tokens (--max-length, the model's context "
                 f"{context}): their completions lose their end.")
    return [{k: v[:max_length] for k, v in e.items()} for e in examples]


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[dict], rows: list[dict], max_new_tokens: int,
             batch_size: int) -> dict:
    """eval/loss on every held-out example; on the rows with an answer, rlvr_rewards.evaluate's greedy metrics
    (eval/accuracy, eval/response_length, eval/reasoning_share). Each rank takes every world-th example; under FSDP
    every forward is a collective, so a short share is topped up with examples that are not counted."""
    rank, world = K.get_rank(), K.get_world_size()
    device = next(K.unwrap(model).parameters()).device
    model.eval()
    share = examples[rank::world]
    share += [{"input_ids": examples[0]["input_ids"]}] * (math.ceil(len(examples) / world) - len(share))  # no loss_mask
    sums = torch.zeros(2, dtype=torch.float64)  # completion NLL, completion tokens
    for start in range(0, len(share), batch_size):
        input_ids, attention_mask, loss_mask = (t.to(device) for t in collate(share[start:start + batch_size],
                                                                              tokenizer.pad_token_id))
        logprobs = K.token_logprobs(model, input_ids, attention_mask)  # (B, T-1)
        sums += torch.tensor([-(logprobs * loss_mask[:, 1:]).sum().item(), loss_mask[:, 1:].sum().item()],
                             dtype=torch.float64)
    sums = K.all_reduce_sum(sums)
    metrics = {"eval/loss": (sums[0] / sums[1].clamp_min(1)).item()}
    answered = [r for r in rows if r.get("answer") is not None]
    if answered:  # the same list on every rank: rlvr_rewards.evaluate shards it
        metrics.update(env.evaluate(model, tokenizer, answered, max_new_tokens=max_new_tokens,
                                             template="plain", batch_size=batch_size))
    model.train()
    return metrics


def export_model(final_dir: str, export_dir: str):
    """Copy the plain transformers files of final/ (no trainer state) to export_dir, replacing it."""
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final_dir, tmp, ignore=shutil.ignore_patterns("trainer_state.pt", "rng_rank*.pt"))
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)


def main(args: Args) -> runs.RunResult:
    """Train; returns the out dir, final/ and the held-out metrics before and after (eval/, and for the built-in
    data the toy world's numbers, toy/)."""
    session = runs.Session(args, check=check_args, desc="sft", panels=PANELS,
                           title=f"sft.py --model {args.model or args.init_from_config} --dataset {args.dataset}")
    device, rank, world = session.info.device, session.info.rank, session.info.world_size
    train_rows, eval_rows = load_data(args)  # malformed data stops here, before any model is loaded
    if args.model:
        K.check_model_source(args.model)
    check_lengths(args, eval_rows, device)  # --max-new-tokens against the context and the memory, before any weights
    if args.epochs:
        session.max_steps = math.ceil(args.epochs * len(train_rows) / args.batch_size)
    micro_batch = args.batch_size // (world * args.grad_accum)

    with session:
        if session.finished:
            return session.result()
        model, tokenizer = load_or_init(args, device)
        K.set_cpu_threads(args.threads, model)
        context = getattr(model.config, "max_position_embeddings", None) or args.max_length
        train, held_out = (encode(tokenizer, rows, min(args.max_length, context), context)
                           for rows in (train_rows, eval_rows))
        model = K.wrap_model(model, args.strategy, device, args.gradient_checkpointing)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, runs.warmup_schedule(
            args.warmup_steps, session.max_steps, args.min_lr_ratio))
        K.print0(f"SFT: {len(train)} examples, {len(held_out)} held out, {session.max_steps} steps of "
                 f"{args.batch_size} on {world} x {device}; outputs in {args.out_dir}")
        steps = session.start(args, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                              evaluate=(lambda: evaluate(model, tokenizer, held_out, eval_rows, args.max_new_tokens,
                                                         args.batch_size)) if held_out else None)
        for step in steps:
            # ---- one optimizer step: this rank's share of the batch, in micro-batches ----
            tick = time.perf_counter()
            # Sorted by length, so each micro-batch pads to similar lengths (short direct answers together).
            batch = sorted((train[i] for i in runs.stream_indices(step * args.batch_size, args.batch_size,
                                                                  len(train), args.seed)),
                           key=lambda e: len(e["input_ids"]))
            mine = batch[rank::world]
            num_tokens = sum(sum(e["loss_mask"][1:]) for e in batch)  # the whole batch's target tokens
            loss_sum = torch.zeros((), device=device)
            for m in range(args.grad_accum):
                input_ids, attention_mask, loss_mask = (t.to(device) for t in collate(
                    mine[m * micro_batch:(m + 1) * micro_batch], tokenizer.pad_token_id))
                # DDP/FSDP2 sync gradients once, in the last micro-batch's backward
                with K.no_grad_sync(model, skip=m < args.grad_accum - 1):
                    logprobs = K.token_logprobs(model, input_ids, attention_mask)  # (b, T-1)
                    loss = completion_loss(logprobs, loss_mask[:, 1:], num_tokens)
                    # DDP/FSDP average gradients over ranks; the sum is what we want (fp16: loss-scaled)
                    K.scale_loss(model, loss * world, session.state).backward()
                loss_sum = loss_sum + loss.detach()
            lr = scheduler.get_last_lr()[0]
            values, _ = K.guarded_step(model, optimizer, args.max_grad_norm, {"loss": loss_sum}, state=session.state)
            scheduler.step()
            metrics = {"train/loss": K.all_reduce_mean(values["loss"]) * world, "train/lr": lr,
                       "train/grad_norm": values["grad_norm"] if args.max_grad_norm > 0 else 0.0,
                       **({"train/loss_scale": values["loss_scale"]} if "loss_scale" in values else {}),
                       "train/epoch": (step + 1) * args.batch_size / len(train),
                       "perf/tokens_per_s": sum(len(e["input_ids"]) for e in batch) / (time.perf_counter() - tick)}
            session.end_step(step + 1, metrics, postfix=dict(loss="train/loss", acc="eval/accuracy"))
        if session.info.is_main and built_in(args):
            toy_world_report(args, session.final_dir, tokenizer, device, session)
        K.barrier()
    return session.result()


def toy_world_report(args: Args, final_dir: str, tokenizer, device, session: runs.Session):
    """The toy world's numbers for a model trained on the built-in data (toy/ metrics and final/toy_stats.json),
    beside the starting model's (its toy_stats.json, when it has one), and the export to --export-dir: to toy/base
    only when the model meets toy_world.TOY_TARGETS."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).to(device)
    stats = toy.evaluate_toy(plain, tokenizer, n=args.eval_size, seed=args.seed, max_new_tokens=args.max_new_tokens)
    session.logger.log(max(session.max_steps, session.start_step), {f"toy/{k}": v for k, v in stats.items()})
    runs.write_text(os.path.join(final_dir, "toy_stats.json"), json.dumps(
        {**stats, "train_wall_s": round(time.time() - session.t_start), "torch": torch.__version__,
         "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
         "args": dataclasses.asdict(args)}, indent=2))
    start = os.path.join(K.resolve_model_path(args.model), "toy_stats.json") if args.model else ""
    before = json.load(open(start)) if os.path.exists(start) else {}
    same_problems = (before.get("n_problems"), before.get("args", {}).get("seed")) == (args.eval_size, args.seed)
    toy.print_table(stats, before=before if same_problems else None)  # the starting model's, on the same problems
    export_dir = args.export_dir
    missed = toy.toy_targets_missed(stats)
    if export_dir and os.path.abspath(export_dir) == os.path.abspath(toy.TOY_BASE) and missed:
        print(f"Not exported to {toy.TOY_BASE}: it misses the toy targets ({'; '.join(missed)}). "
              "Pass another --export-dir to write it elsewhere.")
        return
    if export_dir:
        export_model(final_dir, export_dir)
        print(f"Exported the final model to {export_dir}")


if __name__ == "__main__":
    runs.run_cli(main, cli())
