import os
import sys

import pytest
import torch
import toy_world as toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two CPU cores on CI: keep torch from oversubscribing them when pytest and torchrun children share the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_causal_lm(arch: str = "qwen2", vocab_size: int = 97, seed: int = 0, tie: bool = False, **overrides):
    """A random-initialised tiny Qwen2 or Llama built from a config (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def left_padded_batch(lengths, vocab_size: int = 97, pad_id: int = 0, seed: int = 0, low: int = 3):
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(low, vocab_size, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised model with the toy tokenizer (tiny, so every run here takes seconds)."""
    import transformers

    path = str(tmp_path_factory.mktemp("tiny_toy"))
    tokenizer = toy.build_toy_tokenizer()
    config = transformers.Qwen2Config(**{**toy.toy_model_config(tokenizer).to_dict(), "hidden_size": 32,
                                         "intermediate_size": 64, "num_hidden_layers": 1, "layer_types": None,
                                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
