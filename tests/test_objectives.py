"""The objective family of rl_kernels.policy_loss (loss_type) against an independent implementation: verl's
functions of the same name, compiled at test time from the fetched snapshot's source (skipped when there is none:
`fetch github:volcengine/verl`, or VERL_SNAPSHOT=path to a verl checkout or bare repository), and by hand where
only TRL has the variant (CISPO clipped above only)."""

import ast
import functools
import math
import os
import subprocess

import pytest
import torch

import grpo
import rl_kernels as K

VERL = os.environ.get("VERL_SNAPSHOT", "/work/.mirror/volcengine+verl/repo")
VERL_LOSSES = {"cispo": "compute_policy_loss_cispo", "sapo": "compute_policy_loss_sapo",
               "gmpo": "compute_policy_loss_geo_mean", "gpg": "compute_policy_loss_gpg",
               "clip_cov": "compute_policy_loss_clip_cov", "kl_cov": "compute_policy_loss_kl_cov"}
VERL_ADVANTAGES = {"opo": "compute_opo_outcome_advantage", "remax": "compute_remax_outcome_advantage",
                   "passk": "compute_grpo_passk_outcome_advantage", "gpg": "compute_gpg_outcome_advantage",
                   "rf_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage"}
COV = (0.2, 0.1, 5.0, 0.5)  # share of tokens, Clip-Cov's bounds, KL-Cov's coefficient: wide, so many tokens count


def _verl_source(path: str) -> str:
    if os.path.isdir(os.path.join(VERL, "verl")):
        with open(os.path.join(VERL, path)) as f:
            return f.read()
    return subprocess.run(["git", "--git-dir", VERL, "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


def _functions(source: str, names) -> dict:
    """The named top-level functions of a module's source, compiled on their own: decorators and annotations
    dropped (verl's registries and config classes are not imported), everything else as verl wrote it."""
    nodes = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in names]
    for node in nodes:
        node.decorator_list, node.returns = [], None
        for arg in node.args.args + node.args.kwonlyargs:
            arg.annotation = None
    return nodes


class ActorConfig:  # stands in for verl's config dataclass: the fields the losses read
    def __init__(self, clip_low: float, clip_high: float):
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = clip_low, clip_low, clip_high
        self.tau_pos, self.tau_neg = 1.0, 1.05
        self.global_batch_info = {}
        self.policy_loss = type("PolicyLossConfig", (), dict(
            clip_cov_ratio=COV[0], clip_cov_lb=COV[1], clip_cov_ub=COV[2], kl_cov_ratio=COV[0], ppo_kl_coef=COV[3]))


@functools.cache
def verl() -> dict:
    try:
        core = _verl_source("verl/trainer/ppo/core_algos.py")
        helpers = _verl_source("verl/utils/torch_functional.py")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no verl snapshot at {VERL} (fetch github:volcengine/verl, or set VERL_SNAPSHOT)")
    import collections

    import numpy

    namespace = {"torch": torch, "np": numpy, "defaultdict": collections.defaultdict, "ActorConfig": ActorConfig,
                 "AlgoConfig": type("AlgoConfig", (), {})}
    helper_ns = {"torch": torch}
    names = ("masked_sum", "masked_mean", "masked_var", "masked_whiten")
    exec(compile(ast.Module(_functions(helpers, set(names)), []), "verl_F", "exec"), helper_ns)
    namespace["verl_F"] = type("verl_F", (), {k: staticmethod(helper_ns[k]) for k in names})
    wanted = {"agg_loss", *VERL_LOSSES.values(), *VERL_ADVANTAGES.values()}
    nodes = _functions(core, wanted)
    assert {n.name for n in nodes} == wanted, f"verl renamed {wanted - {n.name for n in nodes}}"
    exec(compile(ast.Module(nodes, []), "core_algos", "exec"), namespace)
    return namespace


def _batch(seed: int, rows: int = 6, width: int = 11, drift: float = 0.3):
    """A padded batch: completions of 2..width tokens (every row has one), log-probs, pi_old off by ~drift nats
    (ratios from ~0.4 to ~2.5, so every clip bound is crossed), advantages of both signs, per sequence."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).float()
    logprobs = -torch.rand(rows, width, generator=g) * 3
    old = logprobs + drift * torch.randn(rows, width, generator=g)
    advantages = torch.randn(rows, generator=g)[:, None].expand(rows, width).contiguous()
    return logprobs, old, advantages, mask


def _ours_and_verl(loss_type: str, loss_agg: str, seed: int, clip: tuple[float, float]):
    logprobs, old, advantages, mask = _batch(seed)
    results = []
    for side in ("ours", "verl"):
        lp = logprobs.clone().requires_grad_(True)
        if side == "ours":  # Clip-Cov's random pick: our generator and verl's global RNG, seeded alike
            loss, _ = K.policy_loss(lp, old, advantages, mask, clip_low=clip[0], clip_high=clip[1],
                                    loss_agg=loss_agg, loss_type=loss_type, cov=COV, compile=False,
                                    generator=torch.Generator().manual_seed(seed))
        else:
            torch.manual_seed(seed)
            loss, _ = verl()[VERL_LOSSES[loss_type]](old, lp, advantages, mask, loss_agg_mode=loss_agg,
                                                     config=ActorConfig(*clip))
        loss.backward()
        results.append((loss.detach(), lp.grad * mask))
    return results


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss_type, loss_agg, clip", [
    ("cispo", "token-mean", (0.2, 0.28)), ("cispo", "seq-mean-token-mean", (1.0, 4.0)),  # MiniMax-M1's eps: no low
    ("sapo", "seq-mean-token-mean", (0.2, 0.2)),                 # verl's SAPO always averages per sequence
    ("gmpo", "seq-mean-token-mean", (0.4, 0.4)),                 # GMPO's clip is on log rho, (-0.4, 0.4)
    ("gmpo", "token-mean", (0.1, 0.3)),                          # asymmetric: a swapped bound shows
    ("gpg", "token-mean", (0.2, 0.2)), ("gpg", "seq-mean-token-sum", (0.2, 0.2)),
    ("clip_cov", "token-mean", (0.2, 0.28)), ("clip_cov", "seq-mean-token-mean", (0.2, 0.2)),
    ("kl_cov", "token-mean", (0.2, 0.2)), ("kl_cov", "seq-mean-token-mean", (0.2, 0.2))])
def test_each_objective_equals_verls_function(loss_type, loss_agg, clip, seed):
    """Loss and gradient (per token) of each loss_type equal verl's function of the same name on padded batches
    whose ratios cross every clip bound."""
    (loss, grad), (verl_loss, verl_grad) = _ours_and_verl(loss_type, loss_agg, seed, clip)
    assert torch.allclose(loss, verl_loss, rtol=1e-5, atol=1e-6), (loss, verl_loss)
    assert torch.allclose(grad, verl_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0


def test_cispo_upper_clips_the_weight_above_only_by_hand():
    """TRL's CISPO: l_t = -sg(min(rho, 1 + eps_high)) A log pi; a ratio far below 1 keeps its weight (verl's form
    would raise it to 1 - eps_low), one above is capped, and the gradient is the weight times A."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-0.5, -2.5, -0.5]])  # rho = e^-0.5 = 0.607, e^0.5 = 1.649, 1
    mask, adv = torch.ones(1, 3), torch.tensor([2.0])
    loss, stats = K.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_type="cispo_upper")
    weights = torch.tensor([math.exp(-0.5), 1.28, 1.0])
    assert loss.item() == pytest.approx((-weights * 2.0 * logprobs.detach()).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(logprobs.grad, -weights * 2.0 / 3, rtol=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("loss_type", [t for t in K.LOSS_TYPES if t != "clip_cov"])
def test_at_ratio_one_every_objective_has_grpos_gradient(loss_type):
    """With pi_old = pi (one update per rollout), every surrogate's gradient is A grad log pi, GRPO's (Clip-Cov
    aside: it takes its picked tokens out of the loss on-policy too). So these objectives differ only when a rollout
    feeds several optimizer steps (--num-minibatches, --num-iterations)."""
    logprobs, _, advantages, mask = _batch(3)
    grads = []
    for kind in ("clip", loss_type):
        lp = logprobs.clone().requires_grad_(True)
        loss, _ = K.policy_loss(lp, lp.detach(), advantages, mask, loss_agg="seq-mean-token-mean", loss_type=kind)
        loss.backward()
        grads.append(lp.grad * mask)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_micro_batches_of_gmpo_add_up_to_the_whole_batch():
    """GMPO's loss is a mean over sequences whatever --loss-agg: split into micro-batches with num_rows, the parts
    add up to the whole (also under token-mean, which would otherwise count tokens)."""
    logprobs, old, advantages, mask = _batch(4)
    whole, _ = K.policy_loss(logprobs, old, advantages, mask, loss_agg="token-mean", loss_type="gmpo")
    parts = sum(K.policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], loss_agg="token-mean",
                              loss_type="gmpo", num_tokens=mask.sum(), num_rows=6)[0]
                for rows in (slice(0, 2), slice(2, 6)))
    assert torch.allclose(whole, parts, atol=1e-6)


def test_clip_cov_and_kl_cov_act_on_the_tokens_they_pick():
    """Clip-Cov drops max(1, ratio * n) tokens from the loss (so it differs from PPO's), KL-Cov penalises as many;
    at a tiny ratio exactly one token each."""
    logprobs, old, advantages, mask = _batch(5)
    ppo, _ = K.policy_loss(logprobs, old, advantages, mask, loss_type="clip")
    for kind in ("clip_cov", "kl_cov"):
        loss, stats = K.policy_loss(logprobs, old, advantages, mask, loss_type=kind, cov=COV,
                                    generator=torch.Generator().manual_seed(0))
        assert stats["clip_frac"].item() == pytest.approx(int(COV[0] * mask.sum()) / mask.sum().item())
        _, stats = K.policy_loss(logprobs, old, advantages, mask, loss_type=kind, cov=(1e-6, 0.1, 5.0, 0.5),
                                 generator=torch.Generator().manual_seed(0))
        assert stats["clip_frac"].item() == pytest.approx(1 / mask.sum().item())
    assert not torch.allclose(loss, ppo)


def test_the_entropy_bonus_by_hand():
    """entropy_coef c: the loss is the plain loss minus c times the entropy aggregated the same way, and the
    entropy's gradient is -c per token over the token count (token-mean)."""
    logprobs, old, advantages, mask = _batch(6)
    entropy = torch.rand_like(logprobs).requires_grad_(True)
    plain, _ = K.policy_loss(logprobs, old, advantages, mask)
    loss, _ = K.policy_loss(logprobs, old, advantages, mask, entropy=entropy, entropy_coef=0.01)
    assert loss.item() == pytest.approx(plain.item() - 0.01 * ((entropy * mask).sum() / mask.sum()).item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(entropy.grad, -0.01 * mask / mask.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("estimator", sorted(VERL_ADVANTAGES))
def test_each_advantage_equals_verls_estimator(estimator, seed):
    """grpo.py's advantage estimators against verl's of the same name: 5 prompts x 4 samples of 0/1 rewards (ties,
    all-equal groups) plus a little noise on some rows, ragged responses; the outcome reward at the last token."""
    g = torch.Generator().manual_seed(seed)
    G, width = 4, 9
    rewards = (torch.rand(20, generator=g) > 0.5).float()
    rewards[::3] += 0.25 * torch.rand(7, generator=g)  # distinct values too, so the pass@k margin is not always 1
    lengths = torch.randint(1, width + 1, (20,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).float()
    token_rewards = torch.zeros(20, width).scatter_(1, (lengths - 1)[:, None], rewards[:, None])
    baseline = (torch.rand(5, generator=g) > 0.5).float().repeat_interleave(G)  # a greedy reward per prompt
    args = grpo.Args(advantage=estimator, num_generations=G)
    ours = grpo.compute_advantages(args, rewards, mask, None, baseline)
    ours = (ours if ours.dim() == 2 else ours[:, None]) * mask
    config = type("AlgoConfig", (dict,), {})(norm_adv_by_std_in_grpo=True)
    index = [i // G for i in range(20)]
    theirs, _ = verl()[VERL_ADVANTAGES[estimator]](token_level_rewards=token_rewards, response_mask=mask,
                                                   index=index, reward_baselines=baseline, config=config)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()


def test_gdpo_normalises_each_reward_in_its_group_by_hand():
    """GDPO: two rewards on a group of 4 (and a second group), z-scored per group and per reward, weighted, summed,
    then whitened over the batch; a small-scale reward keeps its share, where GRPO's sum would drown it."""
    task = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    fmt = [0.1, 0.2, 0.3, None, 0.0, 0.5, 0.5, 1.0]
    ours = grpo.gdpo_advantages({"task": task, "format": fmt}, (1.0, 0.1), 4)

    def z(values):
        v = torch.tensor([0.0 if x is None else x for x in values]).view(2, 4)
        return ((v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-6)).flatten()
    total = z(task) + 0.1 * z(fmt)
    expected = (total - total.mean()) / torch.sqrt(total.var() + 1e-8)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_the_leaderboards_curve_fit_recovers_a_known_curve():
    """bench/objectives.py fits ScaleRL's saturating curve R(C) = R_0 + (A - R_0) / (1 + (C_mid / C)^B) to a run's
    per-step accuracy: on 80 points drawn from a known curve it recovers R_0, A, C_mid and B."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import objectives

    points = [(step, objectives.saturating(step, 0.39, 0.91, 6.0, 1.5)) for step in range(1, 81)]
    r0, a, c_mid, b = objectives.fit(points)
    assert r0 == pytest.approx(0.39, abs=0.01) and a == pytest.approx(0.91, abs=0.01)
    assert c_mid == pytest.approx(6.0, rel=0.05) and b == pytest.approx(1.5, abs=0.1)
