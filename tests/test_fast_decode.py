"""The fast decoder (static KV cache) gives HF's greedy tokens and the reference decoder's samples."""

import pytest
import torch

from gpt2tune.generate.decode import Decoder, decode
from gpt2tune.generate.fast import FastRunner, fast_supported, generate_ids_fast, make_fast_runner
from gpt2tune.generate.sampling import Sampling, generate_ids


def tiny(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=96, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0, initializer_range=0.3)  # large weights: varied, non-looping text
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()


PROMPT = [1, 17, 42, 99, 7]


def test_greedy_equals_hf_generate_token_for_token():
    m = tiny()
    s = Sampling(max_new_tokens=60, greedy=True)
    ours = generate_ids_fast(m, PROMPT, None, s)[0]
    hf = m.generate(torch.tensor([PROMPT]), max_new_tokens=60, do_sample=False, eos_token_id=None,
                    pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == hf
    assert len(set(ours)) > 5  # a meaningful comparison, not one repeated token


@pytest.mark.parametrize("kw", [dict(top_k=20), dict(top_p=0.9, repetition_penalty=1.3), dict(temperature=0.7)])
def test_sampling_equals_reference_decoder(kw):
    m = tiny(1)
    s = Sampling(max_new_tokens=40, num_return_sequences=8, seed=3, **kw)
    assert generate_ids_fast(m, PROMPT, 2, s) == generate_ids(m, PROMPT, 2, s)


def test_left_padded_prompts_and_finished_rows():
    m = tiny(2)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 3, 4]]
    for s in (Sampling(max_new_tokens=30, greedy=True, num_return_sequences=2),
              Sampling(max_new_tokens=30, num_return_sequences=3, seed=4, top_k=5)):
        ref = [(r.ids, r.finish) for r in decode(m, prompts, 2, s)]
        dec = Decoder(m, prompts, 2, s, runner=FastRunner(m))
        for _ in dec:
            pass
        assert [(r.ids, r.finish) for r in dec.results] == ref


def test_context_limit_and_bf16_option():
    m = tiny()
    s = Sampling(max_new_tokens=200, greedy=True)  # more than the 96-token context leaves
    out = generate_ids_fast(m, PROMPT, None, s)[0]
    assert len(out) == 96 - len(PROMPT)
    assert out == generate_ids(m, PROMPT, None, s)[0]
    b = generate_ids_fast(m, PROMPT, None, Sampling(max_new_tokens=20, greedy=True), dtype=torch.bfloat16)[0]
    assert len(b) == 20 and all(0 <= t < 300 for t in b)


def test_unsupported_models_fall_back():
    peft = pytest.importorskip("peft")
    m = tiny()
    pm = peft.get_peft_model(m, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"],
                                                fan_in_fan_out=True))
    assert fast_supported(pm)
    assert type(make_fast_runner(pm)).__name__ == "HFRunner"
    s = Sampling(max_new_tokens=10, greedy=True)
    assert generate_ids_fast(pm, PROMPT, None, s) == generate_ids(pm, PROMPT, None, s)
