"""The GPU paths: CUDA-graph decode, bf16 fused log-probs, compiled loss. Skipped without a CUDA device."""

import pytest
import torch
from conftest import left_padded_batch, tiny_causal_lm

import kernels as K

pytestmark = pytest.mark.cuda


def test_cuda_graph_greedy_generate_equals_transformers():
    """The compiled (reduce-overhead, CUDA graphs) decode gives transformers' greedy tokens in fp32, and a second
    call with the same shapes reuses the graph (no recompilation)."""
    model = tiny_causal_lm().cuda()
    ids, mask = (t.cuda() for t in left_padded_batch([7, 3, 11, 5]))
    ours = K.generate(model, ids, mask, max_new_tokens=24, temperature=0, eos_token_id=-1, pad_token_id=0,
                      compile=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours.tokens, ref)
    import torch._dynamo.utils as dynamo_utils

    before = dynamo_utils.counters["stats"]["unique_graphs"]
    again = K.generate(model, ids, mask, max_new_tokens=24, temperature=0, eos_token_id=-1, pad_token_id=0,
                       compile=True)
    assert torch.equal(again.tokens, ours.tokens)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before


def test_cuda_sampling_logprobs_match_token_logprobs():
    """Sampled log-probs from the CUDA-graph decode equal token_logprobs of the sequences (fp32)."""
    model = tiny_causal_lm().cuda()
    ids, mask = (t.cuda() for t in left_padded_batch([5, 8]))
    gen = K.generate(model, ids, mask, max_new_tokens=16, num_samples=4, eos_token_id=7, pad_token_id=0,
                     noise_keys=torch.arange(8, device="cuda"), compile=True)
    full = torch.cat([ids.repeat_interleave(4, 0), gen.tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(4, 0), gen.mask], 1)
    lp = K.token_logprobs(model, full, full_mask, last_n=gen.tokens.shape[1])
    assert torch.allclose(lp * gen.mask, gen.logprobs, atol=1e-4)


def test_bf16_fused_logprobs_match_naive():
    """In bf16 the chunked path matches log_softmax(logits.float()).gather to bf16 rounding, values and grads."""
    model = tiny_causal_lm(vocab_size=4099).cuda().to(torch.bfloat16).train()
    ids, mask = (t.cuda() for t in left_padded_batch([40, 17, 33], vocab_size=4099))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        lp = K.token_logprobs(model, ids, mask, fused=fused, chunk_size=16)
        (lp * mask[:, 1:]).sum().backward()
        grads.append((lp.detach(), [p.grad.float().clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=2e-2)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=5e-2, rtol=5e-2)


def test_compiled_loss_on_cuda_equals_eager():
    """The torch.compile'd policy loss on CUDA equals the eager one."""
    torch.manual_seed(0)
    lp = (torch.randn(8, 33, device="cuda") * 0.2 - 1).requires_grad_(True)
    old = lp.detach() + 0.1 * torch.randn_like(lp)
    mask = (torch.rand(8, 33, device="cuda") > 0.2).long()
    adv = torch.randn(8, device="cuda")
    out = []
    for compile in (False, True):
        lp.grad = None
        loss, _ = K.policy_loss(lp, old, adv, mask, clip_high=0.28, loss_agg="token-mean", compile=compile)
        loss.backward()
        out.append((loss.detach(), lp.grad.clone()))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-6) and torch.allclose(out[0][1], out[1][1], atol=1e-6)
