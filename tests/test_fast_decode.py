"""The fast decoder (static KV cache) gives HF's greedy tokens and the HF-runner decoder's samples;
its bf16 / int8 weight options stay close to the exact logits."""

import pytest
import torch

from gpt2tune.generate.decode import Decoder, decode, generate_ids
from gpt2tune.generate.fast import FastRunner, fast_supported, logits_drift
from gpt2tune.generate.runner import make_runner
from gpt2tune.generate.sampling import Sampling


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
    ours = generate_ids(m, PROMPT, None, s)[0]
    hf = m.generate(torch.tensor([PROMPT]), max_new_tokens=60, do_sample=False, eos_token_id=None,
                    pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == hf
    assert len(set(ours)) > 5  # a meaningful comparison, not one repeated token


@pytest.mark.parametrize("kw", [dict(top_k=20), dict(top_p=0.9, repetition_penalty=1.3), dict(temperature=0.7)])
def test_sampling_equals_reference_decoder(kw):
    m = tiny(1)
    s = Sampling(max_new_tokens=40, num_return_sequences=8, seed=3, **kw)
    assert generate_ids(m, PROMPT, 2, s) == generate_ids(m, PROMPT, 2, s, runner="hf")


def test_left_padded_prompts_and_finished_rows():
    m = tiny(2)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 3, 4]]
    for s in (Sampling(max_new_tokens=30, greedy=True, num_return_sequences=2),
              Sampling(max_new_tokens=30, num_return_sequences=3, seed=4, top_k=5)):
        ref = [(r.ids, r.finish) for r in decode(m, prompts, 2, s, runner="hf")]
        dec = Decoder(m, prompts, 2, s, runner=FastRunner(m))
        for _ in dec:
            pass
        assert [(r.ids, r.finish) for r in dec.results] == ref


def test_context_limit():
    m = tiny()
    s = Sampling(max_new_tokens=200, greedy=True)  # more than the 96-token context leaves
    out = generate_ids(m, PROMPT, None, s)[0]
    assert len(out) == 96 - len(PROMPT)
    assert out == generate_ids(m, PROMPT, None, s, runner="hf")[0]


def small_trained_like(seed=0):
    """A tiny GPT-2 with GPT-2-like weight scales (0.02), where quantisation error is realistic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=96, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("weights,max_mean", [("bf16", 0.001), ("int8", 0.005)])
def test_reduced_precision_weights_stay_close(weights, max_mean):
    """On GPT-2-scale weights (measured: bf16 5e-4, int8 3e-3 mean logit drift), and greedy text
    from the larger-weight model keeps its first tokens."""
    ids = torch.tensor([PROMPT + list(range(20, 60))])
    d = logits_drift(small_trained_like(), weights, ids)
    assert 0 < d["mean_abs_logit_diff"] < max_mean and d["top1_agreement"] == 1.0, d
    m = tiny()
    # the same runner: logits of prefill and of each step follow the reduced-precision forward
    ref = logits_drift(m, "model", ids)
    assert ref["max_abs_logit_diff"] < 1e-4 and ref["top1_agreement"] == 1.0
    s = Sampling(max_new_tokens=30, greedy=True, weights=weights)
    out = generate_ids(m, PROMPT, None, s)[0]
    exact = generate_ids(m, PROMPT, None, Sampling(max_new_tokens=30, greedy=True))[0]
    assert len(out) == 30 and out[:5] == exact[:5]


def test_bf16_weights_give_the_same_logits_read_either_way_for_several_rows(monkeypatch):
    """Where bf16 is native, several-row bf16 products read the weight as the left operand
    (W @ x.T, faster on AMX); elsewhere x @ W.T. Both give the same logits."""
    import gpt2tune.generate.fast as fast
    import gpt2tune.model.cpu as device

    m = small_trained_like()
    ids = torch.tensor([PROMPT + list(range(20, 30))] * 3)
    out = {}
    for native in (False, True):
        monkeypatch.setattr(device, "cpu_has_bf16", lambda native=native: native)
        fast._CACHE.clear()
        r = FastRunner(m, "bf16")
        first = r.prefill(ids)
        out[native] = torch.stack([first, r.step(first.argmax(-1))])
        assert r.w.head.w_left is native and r.w.blocks[0][4].w_left is native
    fast._CACHE.clear()
    assert out[True].shape == (2, 3, m.config.vocab_size)
    torch.testing.assert_close(out[True], out[False], atol=2e-2, rtol=0)


def test_int8_weights_are_per_channel_int8():
    from gpt2tune.generate.fast import quantize_rows, weights_for

    w = torch.randn(6, 32) * torch.tensor([0.01, 0.1, 1, 10, 100, 0.0])[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.is_contiguous() and q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs().amax(1)
    assert torch.all(err <= scale * 0.5 + 1e-6)  # at most half a step in every row
    m = tiny()
    a, b = weights_for(m, "int8"), weights_for(m, "int8")
    assert a is b  # cached while the weights stay the same
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight.mul_(2)
    assert weights_for(m, "int8") is not a  # an in-place edit invalidates the copy


def test_unsupported_models_fall_back():
    peft = pytest.importorskip("peft")
    m = tiny()
    pm = peft.get_peft_model(m, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"],
                                                fan_in_fan_out=True))
    torch.manual_seed(5)
    with torch.no_grad():  # a LoRA that changes the output (a fresh one is the identity)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.eval()  # get_peft_model leaves the wrapper in training mode (dropout)
    assert fast_supported(pm)
    assert type(make_runner(pm, 50)).__name__ == "HFRunner"
    assert type(make_runner(tiny(), 50)).__name__ == "FastRunner"
    with pytest.warns(UserWarning, match="own weights"):
        assert type(make_runner(pm, 50, weights="int8")).__name__ == "HFRunner"
    s = Sampling(max_new_tokens=10, greedy=True)
    ours = generate_ids(pm, PROMPT, None, s)[0]
    ref = pm.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == ref  # the fallback decodes the adapted model, as transformers' generate does
    assert ours != generate_ids(tiny(), PROMPT, None, s)[0]  # and the adapter really changes the text


def test_weight_only_int8_paths_agree(monkeypatch):
    """The non-x86 int8 path (weight-only, bf16 activations) and its no-kernel fallback give the
    same logits, close to fp32."""
    import gpt2tune.generate.fast as fast

    m = tiny()
    ids = torch.tensor([PROMPT + list(range(20, 40))])
    monkeypatch.setattr(fast, "fbgemm_int8", lambda device: False)
    fast._CACHE.clear()
    r = FastRunner(m, "int8", max_len=40)
    assert r.w.blocks[0][1].kind == "int8"
    a = r.prefill(ids)
    monkeypatch.setattr(fast, "int8pack_ok", lambda device: False)
    fast._CACHE.clear()
    r2 = FastRunner(m, "int8", max_len=40)
    assert r2.w.blocks[0][1].kind == "int8-dequant"
    b = r2.prefill(ids)
    exact = FastRunner(m, "model", max_len=40).prefill(ids)
    assert torch.allclose(a, b, atol=0.1) and (a - exact).abs().max() < 1.0
    assert a.argmax(-1).tolist() == exact.argmax(-1).tolist()
    fast._CACHE.clear()


def test_bottleneck_adapters_decode_on_the_fast_runner():
    from gpt2tune.method.adapter import add_adapters
    from gpt2tune.method.config import AdapterMethod

    m = add_adapters(tiny(), AdapterMethod(bottleneck=8, placement=["attention", "mlp"]))
    torch.manual_seed(3)
    with torch.no_grad():  # adapters that change the output (a fresh one is the identity)
        for mod in m.modules():
            if type(mod).__name__ == "Bottleneck":
                mod.up.weight.normal_(0, 0.5)
    assert fast_supported(m) is None and type(make_runner(m, 50)).__name__ == "FastRunner"
    s = Sampling(max_new_tokens=40, greedy=True)
    fast = generate_ids(m, PROMPT, None, s)
    assert fast == generate_ids(m, PROMPT, None, s, runner="hf")
    plain = generate_ids(tiny(), PROMPT, None, s)
    assert fast != plain  # the adapters are really applied
    m.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *a: None)
    assert "forward hooks on transformer.h.0.mlp.c_fc" in fast_supported(m)


def test_one_row_kernels_follow_hf_logits_and_weight_edits(monkeypatch, one_row_path):
    """One-row steps run every block in one call of the compiled kernel (weights read in place),
    or else split each product over blocks of its input rows (the head through a [d, vocab] copy,
    Conv1D weights in place); several rows read the head through oneDNN: every path stays within
    fp32 rounding of HF's logits, and nothing goes stale when the weights change in place."""
    import gpt2tune.generate.fast as fast
    from gpt2tune.generate.runner import HFRunner

    m = tiny(3)
    ids = torch.tensor([PROMPT, [1, 9, 8, 7, 6]])

    def run(batch):
        a, b = HFRunner(m), FastRunner(m, max_len=20)
        mask = torch.ones_like(ids[:batch])
        with torch.inference_mode():
            la, lb = a.prefill(ids[:batch], mask), b.prefill(ids[:batch], mask)
            for _ in range(6):
                assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5), (la - lb).abs().max()
                nxt = la.argmax(-1)
                la, lb = a.step(nxt), b.step(nxt)
        return b

    r = run(1)
    head, mproj = r.w.head, r.w.blocks[0][5]
    if one_row_path == "native":
        assert r.w.native_blocks is not None and head.parts is None  # the head read in place: no copy
        assert head.native.w.data_ptr() == m.lm_head.weight.data_ptr()
    else:
        assert r.w.native_blocks is None
        assert head.parts.shape == (2, 32, 300) and mproj.parts.shape == (2, 128, 64)
        assert mproj.parts.data_ptr() == m.transformer.h[0].mlp.c_proj.weight.data_ptr()  # a view, no copy
    run(2)
    with torch.no_grad():  # an in-place edit: the cached copies must not go stale
        m.lm_head.weight.mul_(1.5)
        m.transformer.h[1].mlp.c_proj.weight.mul_(-1)
    assert run(1).w.head is not head
    for split in (True, False):  # several rows split like one (CPUs other than Intel's) or through addmm
        monkeypatch.setattr(fast, "split_several_rows", lambda: split)
        fast._CACHE.clear()
        assert run(2).w.blocks[0][1].split_rows is split
    monkeypatch.setattr(fast, "onednn_linear_ok", lambda w: False)  # CPUs without oneDNN: MKL for every batch
    fast._CACHE.clear()
    run(2)
    fast._CACHE.clear()


@pytest.mark.parametrize("weights", ["model", "model-native", "bf16", "int8"])
def test_one_row_products_get_the_threads_and_the_same_numbers_on_any_count(monkeypatch, weights):
    """One-row steps run on one thread but may lend every thread to their big products (fp32, bf16
    and int8 alike; the compiled kernel takes the thread count instead); each kernel splits its
    work in a fixed way, so the logits are bitwise the same on one thread and on two, lent or not."""
    import gpt2tune.generate.fast as fast
    from gpt2tune.generate import gemv

    monkeypatch.setattr(fast, "LEND_MIN", 0)  # the tiny model's products count as big
    seen = []
    if weights == "model-native":
        if gemv.kernel() is None:
            pytest.skip("the compiled decoding kernel is not built here")
        for cls in (gemv.Blocks, gemv.Gemv):
            call = cls.__call__
            monkeypatch.setattr(cls, "__call__", lambda self, *a, c=call: (seen.append(a[-1]), c(self, *a))[1])
        weights = "model"
    else:
        monkeypatch.setitem(gemv._state, "lib", None)
        product = fast._Linear._product
        monkeypatch.setattr(fast._Linear, "_product",
                            lambda *a: (seen.append(torch.get_num_threads()), product(*a))[1])
    m = tiny(3)
    before = torch.get_num_threads()
    fast._CACHE.clear()

    def steps(n):
        torch.set_num_threads(2)  # the prefill's GEMMs round by their thread count: the same one for both
        r = FastRunner(m, weights, max_len=20)
        out = [r.prefill(torch.tensor([PROMPT]))]
        torch.set_num_threads(n)
        seen.clear()
        for _ in range(5):
            out.append(r.step(out[-1].argmax(-1)))
        assert torch.get_num_threads() == n
        return torch.cat(out)

    try:
        one = steps(1)
        assert seen and set(seen) == {1}
        two = steps(2)
        assert set(seen) == {1, 2}  # lent threads (the first steps) and kept to one (a timed probe)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_lending_takes_the_faster_way_and_probes_the_other():
    from gpt2tune.generate.fast import Lending

    lending = Lending(probe=4, keep=0.5)

    def run(cost, n):
        picks = []
        for _ in range(n):
            lend = lending.choose()
            picks.append(lend)
            lending.record(lend, cost[lend])
        return picks

    picks = run({True: 1.0, False: 2.0}, 10)  # idle: lending is faster
    assert picks[:2] == [True, False]  # each way once
    assert picks[2:] == [(i + 1) % 4 != 0 for i in range(2, 10)]  # then lend, but every 4th step the other
    picks = run({True: 5.0, False: 2.0}, 12)  # load arrives: lending turns slow
    assert picks[-8:] == [(i + 1) % 4 == 0 for i in range(14, 22)]  # kept to one thread, probing lending


def test_one_row_steps_run_on_one_thread_and_restore_the_count(monkeypatch):
    m = tiny()
    r = FastRunner(m, max_len=20)
    seen = []
    inner = r._hidden
    monkeypatch.setattr(r, "_hidden", lambda *a: (seen.append(torch.get_num_threads()), inner(*a))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r.prefill(torch.tensor([PROMPT]))
        r.step(torch.tensor([3]))
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(IndexError):
            r.step(torch.tensor([10_000]))  # an error inside the step still restores the count
        assert torch.get_num_threads() == 2
        r.prefill(torch.tensor([PROMPT, PROMPT]))
        r.step(torch.tensor([3, 4]))  # a few rows: one thread where the compiled kernel does their products
        assert seen[-1] == (1 if r.w.native_rows else 2)
        r.prefill(torch.tensor([PROMPT] * 9))
        r.step(torch.tensor([3] * 9))  # batches beyond its rows keep every thread for their GEMMs
        assert seen[-1] == 2
    finally:
        torch.set_num_threads(before)


def test_the_decoder_picks_a_few_rows_tokens_on_one_thread(monkeypatch):
    """Processing logits and picking the next token of a few rows is small work: one thread (a second
    one only waits at barriers, for a descheduled partner on a loaded machine); many rows keep every
    thread. The count is restored either way."""
    from gpt2tune.generate import decode as dec
    from gpt2tune.generate import threads
    from gpt2tune.generate.sampling import Sampling

    m = tiny()
    seen = []
    inner = dec.pick
    monkeypatch.setattr(dec, "pick", lambda *a: (seen.append(torch.get_num_threads()), inner(*a))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = Sampling(max_new_tokens=3, top_k=5, seed=1, num_return_sequences=2)
        dec.decode(m, [PROMPT], None, s)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "SMALL", 1)  # every batch counts as big
        dec.decode(m, [PROMPT], None, s)
        assert seen[3:] == [2, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_plain_greedy_steps_ask_only_for_the_argmax(monkeypatch, one_row_path):
    """Greedy decoding asks the runner for each row's argmax only (`top1_only`: the compiled kernel
    then reads the head's int8 copy and recomputes only the rows that can win) when the processors
    at most ban tokens (suppressed ids, the end marker before `min_new_tokens`: passed on as
    `banned`); a repetition penalty, a constraint or sampling get every logit. Either way the tokens
    are HF's."""
    m = tiny(4)
    asked = []
    real = FastRunner.step

    def spy(self, tokens, top1_only=False, banned=None):
        asked.append((top1_only, None if banned is None else banned.nonzero().flatten().tolist()))
        out = real(self, tokens, top1_only, banned)
        if top1_only and one_row_path == "native":
            assert int(torch.isfinite(out).sum()) < out.size(-1) // 4  # most of the head was skipped
        return out

    def hf(n, **kw):
        return m.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          **kw)[0, len(PROMPT):].tolist()

    monkeypatch.setattr(FastRunner, "step", spy)
    plain = hf(40, eos_token_id=None)
    assert generate_ids(m, PROMPT, None, Sampling(max_new_tokens=40, greedy=True))[0] == plain
    assert asked and all(a == (True, None) for a in asked)
    # ban the tokens greedy picks most: the argmax must come from the others, as HF's suppression gives
    banned = [t for t, _ in __import__("collections").Counter(plain).most_common(3)]
    asked.clear()
    ours = generate_ids(m, PROMPT, 2, Sampling(max_new_tokens=30, greedy=True, min_new_tokens=10), suppress_ids=banned)[0]
    want = hf(30, eos_token_id=2, suppress_tokens=banned, min_new_tokens=10)
    assert ours == [t for t in want if t != 2][:len(ours)] and len(ours) > 5
    assert all(a[0] for a in asked)
    assert asked[0][1] == sorted(banned + [2]) and asked[-1][1] == sorted(banned)  # the end marker from step 10
    for s in (Sampling(max_new_tokens=5, greedy=True, repetition_penalty=1.2),
              Sampling(max_new_tokens=5, top_k=5, seed=0)):
        asked.clear()
        generate_ids(m, PROMPT, None, s)
        assert asked and not any(a[0] for a in asked)
