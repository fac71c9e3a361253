"""rlhf_reward_model.py: a Bradley-Terry reward model (step 2 of RLHF), trained, evaluated, and usable as a reward.

A language model with a one-output linear head reads (prompt, response) and returns a scalar r(x, y), taken at
the last real token of the sequence. It is trained on preference pairs (x, y_w, y_l), "y_w is better than
y_l", so that the better response scores higher (InstructGPT, Ouyang et al. 2022, section 3.5):

    loss = mean_pairs [ -log sigmoid( r(x, y_w) - r(x, y_l) - m ) ]  +  c * mean_pairs [ (r(x, y_w) + r(x, y_l))^2 ]

    symbol      meaning                                                  where it comes from
    r(x, y)     score head output at the last real token                 --model (backbone), the head is new
    y_w, y_l    chosen (preferred) and rejected response                 --dataset (chosen / rejected)
    m           optional per-pair margin (Llama 2, Touvron et al. 2023)  the `margin` field of a JSONL line
    c           centering coefficient (Eisenstein et al. 2023)           --center-coef
    B           preference pairs per optimizer step, all ranks           --batch-size
                learning rate, steps                                     --lr, --max-steps

A K-way ranking (a `responses` list, best first) counts as all C(K, 2) pairs it implies. Metric: held-out
pairwise accuracy P(r(x, y_w) > r(x, y_l)); also the mean margin r_w - r_l and the mean/std of both scores.
Shapes: B pairs, T tokens; chosen and rejected are scored in ONE forward of 2B rows.

Deliberate choices:
  - The score is read at the last position whose attention_mask is 1, found from the mask, not from
    pad_token_id as transformers' own pooling does: the toy tokenizer's pad is its EOS, so a text that
    contains EOS would be read at the wrong token, and padding may sit on either side.
  - Text is rendered as the policy sees it: the tokenizer's chat template around the prompt (generation
    prompt added), then the response (`--template plain` concatenates; any other string is a format with
    {prompt} and {completion}). No EOS is appended, matching the completions grpo.py hands to a reward.
    Over-long sequences are truncated on the left, so the response end that the head reads survives.
  - InstructGPT put all C(K, 2) pairs of a prompt in one batch element to avoid overfitting; here they are
    independent, shuffled pairs (simpler; fine for small K).
  - c = 0.01 by default: without it the toy scores spread to a std of ~8 at the same accuracy; PPO prefers
    rewards near 0. The held-out mean and std of r are also saved in the config (reward_mean, reward_std), so
    `RewardModelScorer(path, normalize=True)` returns (r - mean) / std with statistics fixed at training time.
  - The toy preferences (--dataset toy), three pairs per arithmetic problem, the chosen side always the
    correct trace <think>3*4=12,7+12=19,19-2=17</think><answer>17</answer>: "correct" (rejected: an answer
    that contradicts the reasoning before it), "format" (the same answer outside R1's template, e.g. no
    think block, unclosed or doubled tags) and "concise" (the reasoning padded with repeated steps). Held-out
    pairs come from the task's test split. Pairs whose rejected trace had a miscomputed step stayed near
    chance in the mix (0.4-0.6 after 400 steps; 0.8 only when trained alone for 800) and held the consistency
    pairs back, so they are left out: the toy reward model checks
    consistency, not arithmetic, and a consistently wrong trace fools it (reward hacking in miniature; the
    verifiable rewards of rlvr_rewards.py do not have this hole).
  - --model toy is the toy base model (rl_kernels.load_model builds it on first use); the toy pairs come from
    rlvr_rewards' arithmetic task. This file imports rl_kernels and rlvr_rewards only, never another algorithm file.

Launch:
    python rlhf_reward_model.py                                       # toy world, CPU, about 2.5 minutes
    python rlhf_reward_model.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset prefs.jsonl --lr 1e-5 --batch-size 32
    torchrun --nproc_per_node 8 rlhf_reward_model.py --model Qwen/Qwen2.5-7B-Instruct --dataset prefs.jsonl \\
        --strategy fsdp --lr 5e-6 --batch-size 64
    # as a reward: RewardModelScorer("runs/rlhf_reward_model/final") in code, or from the command line
    RLHF_REWARD_MODEL=runs/rlhf_reward_model/final python grpo.py --rewards rlhf_reward_model:reward_model \\
        --reward-weights 1

JSONL (UTF-8): one object a line, {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages,
"margin": finite float (optional)} or {"prompt": ..., "responses": [best, ..., worst]} (no margin: one number
cannot fit all its pairs); messages are {"role": str, "content": str} objects.

Result (`python rlhf_reward_model.py`, seed 0, 800 steps of 16 pairs, 2-core CPU shared with four other jobs,
1,035 s wall): held-out pairwise accuracy 0.979 on 900 pairs (correct 0.937, format 1.000, concise 1.000), mean
margin 4.78. As grpo.py's only reward it is hacked, as the consistency caveat above predicts: greedy accuracy
39.0% -> 16.0% while the reasoning share goes 26% -> 100%, e.g. "5+4+4*4" ->
<think>4*4=14,5+4=10,10+14=44</think><answer>44</answer>; as a 0.1-weight term beside the verifiable reward
(--rewards task rlhf_reward_model:reward_model --reward-weights 1 0.1) the run ends at 88.0%, against 89.5% for
the default task + format rewards.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env
import toy_world as toy


@dataclass
class RewardModelArgs:
    """The reward model's own flags: the loss, the backbone and the preference data."""
    # The loss and the update
    center_coef: float = 0.01
    """c: weight of the centering term (r_w + r_l)^2 (0.01 in Eisenstein et al. 2023)"""
    batch_size: int = 16
    """preference pairs per step, all ranks together (each pair is two sequences)"""
    lr: float = 1e-3
    """peak AdamW learning rate (about 1e-5 for a real 0.5B-7B model)"""
    warmup_steps: int = 20
    """linear warmup, then cosine decay to 10% of --lr"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0: off)"""
    max_length: int = 512
    """tokens per sequence; longer ones lose their beginning"""
    template: str = "chat"
    """'chat' (tokenizer's chat template), 'plain' (prompt + response), or a format with {prompt} and {completion}"""
    # The model and the data
    model: str = "toy"
    """backbone: a hub id, a local causal-LM or reward-model directory, or 'toy' (the toy base model)"""
    dataset: str = "toy"
    """'toy' (built-in arithmetic preferences) or a .jsonl file of prompt/chosen/rejected (or responses) lines"""
    eval_dataset: str = ""
    """held-out .jsonl; empty: the toy test split, or --eval-fraction of the dataset's lines"""
    eval_fraction: float = 0.05
    """share of a JSONL dataset's lines held out for evaluation when --eval-dataset is empty"""
    toy_train_prompts: int = 2500
    """toy dataset: arithmetic prompts for training (three pairs each: correctness, format, concision)"""
    toy_eval_prompts: int = 300
    """toy dataset: held-out prompts from the task's test split"""
    # Evaluation
    eval_every: int = 200
    """evaluate every N steps, at the start and at the end (0: only at the end)"""


@dataclass
class Args(runs.RunArgs, RewardModelArgs):
    """rlhf_reward_model.py's command line, in --help's order: the reward model's flags (RewardModelArgs), then
    the run's (rl_runs.RunArgs)."""
    out_dir: str = "runs/rlhf_reward_model"
    max_steps: int = 800
    save_every: int = 400


# ----------------------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry pairwise loss (InstructGPT eq. 1), with Llama 2's margin and a centering term. Shapes (B,)."""
    diff = chosen_rewards - rejected_rewards                                   # (B,)
    loss = -F.logsigmoid(diff - (margin if margin is not None else 0.0)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    stats = {"loss": loss.detach(), "accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach(),
             "chosen_mean": chosen_rewards.mean().detach(), "rejected_mean": rejected_rewards.mean().detach()}
    return loss, stats


def expand_rankings(prompt, responses: list, where: str = "") -> list[dict]:
    """All C(K, 2) pairs of a best-first ranking: responses[i] is chosen over responses[j] for every i < j."""
    if not isinstance(responses, list) or len(responses) < 2:
        raise env.DataError(f"{where}'responses' must be a list of at least two responses, best first.")
    return [{"prompt": prompt, "chosen": better, "rejected": worse}
            for better, worse in itertools.combinations(responses, 2)]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) position of each row's last real token, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)   # the largest position whose mask is 1


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) per row (B,), read from the score head at the last real token (found from attention_mask)."""
    head = K.unwrap(model).score
    captured = {}
    # transformers pools at "the last token that is not pad_token_id", wrong when EOS == pad appears in the text;
    # the head scores every position inside the model's forward (so DDP/FSDP hooks fire as usual), we keep ours.
    handle = head.register_forward_hook(lambda module, inputs, output: captured.update(scores=output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=K.position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        handle.remove()
    scores = captured["scores"][..., 0]                                          # (B, T)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, last_token_index(attention_mask).to(scores.device)].float()


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, kinds: list[str] | None = None) -> dict:
    """Held-out pairwise accuracy (ties count as wrong), mean margin, and the reward distribution."""
    diff, both = chosen - rejected, torch.cat([chosen, rejected])
    out = {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item(),
           "loss": -F.logsigmoid(diff).mean().item()}
    for name, values in (("chosen", chosen), ("rejected", rejected), ("reward", both)):
        out[f"{name}_mean"], out[f"{name}_std"] = values.mean().item(), values.std().item() if len(values) > 1 else 0.0
    for kind in sorted(set(kinds or [])):
        out[f"accuracy_{kind}"] = (diff[torch.tensor([k == kind for k in kinds])] > 0).float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------------------
# Data: JSONL preference pairs (validated before any model is loaded) and the toy preferences
# ----------------------------------------------------------------------------------------------------------


def _check_text(value, field: str, where: str):
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise env.DataError(f"{where}'{field}' must be a string or a non-empty list of chat messages "
                        f"({{\"role\": str, \"content\": str}}), got {repr(value)[:80]}.")
    for number, message in enumerate(value, 1):
        if not env.is_messages([message]):
            raise env.DataError(f"{where}message {number} of '{field}' must be an object with a string 'role' and a "
                            f"string 'content', got {repr(message)[:80]}.")


def pairs_from_row(row, where: str) -> list[dict]:
    """One JSONL object -> its preference pairs, or a rlvr_rewards.DataError that says what to change."""
    if not isinstance(row, dict):
        raise env.DataError(f"{where}expected a JSON object, got {type(row).__name__}.")
    if "prompt" not in row:
        raise env.DataError(f"{where}missing field 'prompt' (each line needs prompt, chosen and rejected, "
                        f"or prompt and a best-first 'responses' list).")
    _check_text(row["prompt"], "prompt", where)
    if "responses" in row:
        if "margin" in row:   # one number cannot say how far apart each of the C(K, 2) pairs is
            raise env.DataError(f"{where}'margin' applies to a chosen/rejected pair, not to a 'responses' ranking; "
                            f"drop it, or write the pairs as chosen/rejected lines, each with its own margin.")
        pairs = expand_rankings(row["prompt"], row["responses"], where)
        for number, response in enumerate(row["responses"]):
            _check_text(response, f"responses[{number}]", where)
    else:
        for field in ("chosen", "rejected"):
            if field not in row:
                raise env.DataError(f"{where}missing field '{field}' (each line needs prompt, chosen and rejected).")
        pairs = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}]
        if "margin" in row:
            margin = row["margin"]   # json reads NaN and Infinity, which would make the loss nan
            number = isinstance(margin, (int, float)) and not isinstance(margin, bool)
            if not number or not abs(margin) <= sys.float_info.max:   # false for nan, inf and a 400-digit int
                raise env.DataError(f"{where}'margin' must be a finite number, got {repr(margin)[:40]}.")
            pairs[0]["margin"] = float(margin)
    for pair in pairs:
        _check_text(pair["chosen"], "chosen", where)
        _check_text(pair["rejected"], "rejected", where)
        if pair["chosen"] == pair["rejected"]:
            raise env.DataError(f"{where}chosen and rejected are identical; a preference pair needs two different "
                            f"responses (remove the line or fix one side).")
    return pairs


def load_preference_jsonl(path: str) -> list[dict]:
    """Every pair of a JSONL file, each tagged with its line number; all lines are checked before returning."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Preference file {path!r} does not exist; pass --dataset toy or a .jsonl path.")

    return env.read_jsonl(path, lambda row, where, line: [dict(pair, line=line)
                                                                   for pair in pairs_from_row(row, where)])


def load_pairs(args: Args) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) for --dataset / --eval-dataset; raises rlvr_rewards.DataError before any training."""
    if args.dataset == "toy":
        return (toy.toy_preference_pairs("train", args.toy_train_prompts, args.seed),
                toy.toy_preference_pairs("test", args.toy_eval_prompts, args.seed))
    pairs = load_preference_jsonl(args.dataset)
    if args.eval_dataset:
        return pairs, load_preference_jsonl(args.eval_dataset)
    # hold out whole lines, so the pairs of one ranking never straddle the split
    lines = sorted({p["line"] for p in pairs})
    random.Random(args.seed).shuffle(lines)
    held_out = set(lines[:max(1, round(args.eval_fraction * len(lines)))])
    train = [p for p in pairs if p["line"] not in held_out]
    if not train:
        raise env.DataError(f"{args.dataset}: too few lines to hold out {args.eval_fraction:.0%} for evaluation; "
                        f"pass --eval-dataset or a smaller --eval-fraction.")
    return train, [p for p in pairs if p["line"] in held_out]


def render(tokenizer, prompt, response, template: str = "chat") -> str:
    """The text the reward model reads: the prompt as the policy saw it, then the response."""
    if isinstance(response, list):
        response = "".join(m["content"] for m in response)
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        return env.render_prompt(tokenizer, prompt, "chat") + response
    if isinstance(prompt, list):
        prompt = "\n".join(m["content"] for m in prompt)
    if template in ("chat", "plain"):
        return prompt + response
    return template.format(prompt=prompt, completion=response)


def tokenize(tokenizer, texts: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, T), padded on the tokenizer's side; no special tokens added."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, add_special_tokens=False,
                    return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ----------------------------------------------------------------------------------------------------------
# Model loading, scoring, evaluation
# ----------------------------------------------------------------------------------------------------------


def load_reward_model(name_or_path: str, *, device="auto", dtype="auto", master_dtype="float32", frozen=False,
                      shard=False, lora: K.LoRA | None = None):
    """(model, tokenizer): AutoModelForSequenceClassification with one output. From a causal-LM checkpoint the
    backbone is reused and the head starts random; from a trained reward model everything loads. dtype computes,
    master_dtype holds the weights (rl_kernels.load_model); frozen: a scorer, with bf16 matmul weights only; shard:
    FSDP2-sharded as it loads; lora: a LoRA adapter (its heads: ("score",), the new head trained whole beside it)."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = K.load_model(name_or_path, model_class=AutoModelForSequenceClassification, num_labels=1,
                                  device=device, dtype=dtype, master_dtype=master_dtype, frozen=frozen, shard=shard,
                                  lora=lora)
    if not hasattr(model, "score"):
        raise ValueError(f"{name_or_path}: expected a sequence-classification head named 'score' (Llama, Qwen, "
                         f"Mistral, Gemma, GPT-2 style); this architecture names it differently.")
    tokenizer.truncation_side = "left"   # keep the end of the response, where the score is read
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int, device) -> torch.Tensor:
    """r for each text (N,), batched, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    out = [sequence_rewards(model, *tokenize(tokenizer, texts[i:i + batch_size], max_length, device)).cpu()
           for i in range(0, len(texts), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(model, tokenizer, pairs: list[dict], args: Args, device) -> dict:
    """Held-out metrics; each rank scores an equal share (FSDP needs the same number of forwards on every rank)."""
    world, rank = K.get_world_size(), K.get_rank()
    per_rank = math.ceil(len(pairs) / world)
    shard = pairs[rank * per_rank:(rank + 1) * per_rank]
    valid = len(shard)
    shard = shard + pairs[:per_rank - valid]                     # filler rows, dropped below
    texts = [render(tokenizer, p["prompt"], p[side], args.template) for side in ("chosen", "rejected") for p in shard]
    rewards = score_texts(model, tokenizer, texts, batch_size=2 * args.batch_size, max_length=args.max_length,
                          device=device).view(2, -1)[:, :valid]   # (2, valid)
    gathered = torch.zeros(2, len(pairs))
    gathered[:, rank * per_rank:rank * per_rank + valid] = rewards
    gathered = K.all_reduce_sum(gathered.to(device)).cpu()         # every rank now holds every pair's rewards
    kinds = [p["kind"] for p in pairs] if all("kind" in p for p in pairs) else None
    return preference_metrics(gathered[0], gathered[1], kinds)


class RewardModelScorer:
    """A trained reward model as a reward function with the project's signature:

        scorer = RewardModelScorer("runs/rlhf_reward_model/final")
        scorer(completions, prompt=[...], **other_columns) -> list[float]

    `prompt` (or `prompts`) is the dataset's prompt column, aligned with completions; other columns are ignored.
    normalize=True returns (r - reward_mean) / reward_std with the held-out statistics saved at training time.
    """

    def __init__(self, path: str, *, device: str = "auto", batch_size: int = 64, normalize: bool = False,
                 template: str | None = None, max_length: int = 2048, dtype: str = "auto"):
        self.device = K.resolve_device(device)
        self.model, self.tokenizer = load_reward_model(path, device=self.device, dtype=dtype, frozen=True)
        self.model.eval().requires_grad_(False)
        self.template = template or getattr(self.model.config, "reward_template", "chat")
        self.batch_size, self.max_length = batch_size, max_length
        self.mean, self.std = 0.0, 1.0
        if normalize:
            self.mean = getattr(self.model.config, "reward_mean", None)
            self.std = getattr(self.model.config, "reward_std", None)
            if self.mean is None or self.std is None:
                raise ValueError(f"{path} has no reward_mean/reward_std in its config (it was not trained by "
                                 f"rlhf_reward_model.py); use normalize=False.")
        self.__name__ = "reward_model"   # reward-combining code logs rewards by function name

    def __call__(self, completions: list, prompts: list | None = None, prompt: list | None = None,
                 **columns) -> list[float]:
        prompts = prompt if prompt is not None else prompts
        prompts = [""] * len(completions) if prompts is None else list(prompts)
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(completions)} completions but {len(prompts)} prompts; pass one prompt each.")
        texts = [render(self.tokenizer, p, c, self.template) for p, c in zip(prompts, completions)]
        rewards = score_texts(self.model, self.tokenizer, texts, batch_size=self.batch_size,
                              max_length=self.max_length, device=self.device)
        return ((rewards - self.mean) / max(self.std, 1e-8)).tolist()


_SCORERS: dict[str, RewardModelScorer] = {}


def reward_model(completions: list, prompt: list | None = None, **columns) -> list[float]:
    """The reward model in $RLHF_REWARD_MODEL (default runs/rlhf_reward_model/final), loaded once per process, as a
    reward grpo.py can name: `python grpo.py --rewards rlhf_reward_model:reward_model --reward-weights 1`."""
    path = os.environ.get("RLHF_REWARD_MODEL", os.path.join(Args.out_dir, "final"))
    if path not in _SCORERS:
        _SCORERS[path] = RewardModelScorer(path)
    return _SCORERS[path](completions, prompt=prompt, **columns)


def helpfulness_reward(completions: list, prompt: list | None = None, answer: list | None = None,
                       **columns) -> list[float | None]:
    """DeepSeek-R1's helpfulness reward for general prompts: the reward model in $RLHF_REWARD_MODEL (normalised
    with its held-out statistics) reads only the final answer, the text after the reasoning
    (rlvr_rewards.final_text); None on rows that carry a gold answer, which rule rewards judge. So one dataset can
    mix reasoning and general prompts: `--rewards accuracy rlhf_reward_model:helpfulness_reward`."""
    path = os.environ.get("RLHF_REWARD_MODEL", os.path.join(Args.out_dir, "final"))
    key = path + "#normalized"
    if key not in _SCORERS:
        _SCORERS[key] = RewardModelScorer(path, normalize=True)
    golds = answer if answer is not None else [None] * len(completions)
    prompts = prompt if prompt is not None else [""] * len(completions)
    rows = [i for i, gold in enumerate(golds) if gold is None]
    scores = _SCORERS[key]([env.final_text(completions[i]) for i in rows],
                           prompt=[prompts[i] for i in rows]) if rows else []
    out: list[float | None] = [None] * len(completions)
    for i, score in zip(rows, scores):
        out[i] = score
    return out


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def check_args(args: Args, info: runs.DistInfo):
    """Impossible settings fail here, before any data or model is loaded."""
    runs.check_settings(args)
    if args.batch_size % info.world_size:
        raise K.UserError(f"--batch-size {args.batch_size} must be divisible by the {info.world_size} ranks.")


PANELS = [("Bradley-Terry loss", [("train/loss", "train"), ("eval/loss", "held-out")], "loss"),
          ("pairwise accuracy", [("train/accuracy", "train batch"), ("eval/accuracy", "held-out")], "P(r_w > r_l)")]


def main(args: Args) -> runs.RunResult:
    """Train the reward model; returns the out dir, final/ and the held-out pairwise metrics (eval/) of the initial
    and the final model."""
    session = runs.Session(args, check=check_args, desc="reward model", panels=PANELS,
                           title=f"rlhf_reward_model.py --model {args.model} --dataset {args.dataset}")
    device, rank, world = session.info.device, session.info.rank, session.info.world_size
    train_pairs, eval_pairs = load_pairs(args)            # a bad data file stops here, before any model loads
    K.check_model_source(args.model)
    use_margin = any("margin" in p for p in train_pairs)
    K.print0(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")

    with session:
        if session.finished:
            return session.result()
        model, tokenizer = load_reward_model(args.model, device=device, dtype=args.dtype,
                                             master_dtype=args.master_dtype, shard=args.strategy == "fsdp",
                                             lora=runs.lora_of(args, heads=("score",)))
        K.set_cpu_threads(args.threads, model)
        model.config.reward_template = args.template          # the scorer renders text the same way
        model = K.wrap_model(model, args.strategy, device, args.gradient_checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, runs.warmup_schedule(
            args.warmup_steps, args.max_steps, min_ratio=0.1))

        def run_eval() -> dict:
            metrics = evaluate(model, tokenizer, eval_pairs, args, device)
            K.unwrap(model).config.reward_mean = metrics["reward_mean"]   # saved with the model: normalize=True
            K.unwrap(model).config.reward_std = metrics["reward_std"]
            return {f"eval/{k}": v for k, v in metrics.items()}

        steps = session.start(args, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                              evaluate=run_eval)
        model.train()
        for step in steps:
            # ---- this rank's share of the global batch; chosen and rejected in one forward of 2b rows ----
            batch = [train_pairs[i] for i in runs.stream_indices(step * args.batch_size, args.batch_size,
                                                                 len(train_pairs), args.seed)][rank::world]
            texts = [render(tokenizer, p["prompt"], p[side], args.template) for side in ("chosen", "rejected")
                     for p in batch]
            input_ids, attention_mask = tokenize(tokenizer, texts, args.max_length, device)   # (2b, T)
            chosen, rejected = sequence_rewards(model, input_ids, attention_mask).chunk(2)     # (b,), (b,)
            margin = torch.tensor([p.get("margin", 0.0) for p in batch], device=device) if use_margin else None

            # ---- Bradley-Terry update ----
            loss, stats = bradley_terry_loss(chosen, rejected, margin, args.center_coef)
            K.scale_loss(model, loss, session.state).backward()  # into no gradient: guarded_step frees them
            stats, _ = K.guarded_step(model, optimizer, args.max_grad_norm, stats, state=session.state)
            scheduler.step()

            # ---- log, evaluate, save ----
            grad_norm = stats.pop("grad_norm")
            metrics = {**{f"train/{k}": v for k, v in K.all_reduce_mean(stats).items()},
                       "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                       "perf/seconds": time.time() - session.t_start}
            session.end_step(step + 1, metrics, postfix=dict(loss="train/loss", acc="train/accuracy"))
    result = session.result()
    K.print0(f"Held-out: accuracy {result.after.get('eval/accuracy', float('nan')):.3f}, margin "
             f"{result.after.get('eval/margin', float('nan')):.2f} (load the model with "
             "AutoModelForSequenceClassification.from_pretrained or RewardModelScorer)")
    return result


if __name__ == "__main__":
    runs.run_cli(main, tyro.cli(Args))
