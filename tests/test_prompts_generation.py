from __future__ import annotations

import pytest
import torch

from emocircuits import sites
from emocircuits.generation import GenerationConfig, generate
from emocircuits.prompts import (
    PAPER_EMOTION_SYSTEM,
    PAPER_NEUTRAL_SYSTEM,
    emotion_prompts,
    encode,
    pad_ids,
    render,
    tokenize,
)


class _Rec:
    skeleton_id, theme, scenario = "x_00", "Work/Job", "I went to the office early."
    event = {"positive": "My manager approved my plan.", "neutral": "I sat at my desk.",
             "negative": "My laptop would not start."}


def test_paper_templates_exact():
    assert PAPER_EMOTION_SYSTEM.format(emotion="anger") == (
        "Always reply in anger.\nKeep the reply to at most two sentences.")
    assert PAPER_NEUTRAL_SYSTEM == "Keep the reply to at most two sentences."


def test_exactly_one_bos(tiny_llama):
    tok = tiny_llama.tokenizer
    ps = emotion_prompts(tiny_llama, [_Rec()], ["anger", "fear"])
    assert len(ps) == 6
    for p in ps:
        ids = encode(tiny_llama, p.text)
        # SmolLM2's BOS is <|im_start|>, which also opens every chat turn: one at the start,
        # never doubled (the paper's A11 double-BOS).
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids == tok(p.text, add_special_tokens=False)["input_ids"]
        assert "Always reply in" in p.text and p.text.endswith("assistant\n")
    plain = render(tiny_llama, "Sys.", "User.", chat=False, assistant_prefix="I felt")
    ids = encode(tiny_llama, plain)
    assert ids.count(tok.bos_token_id) == 1 and plain.endswith("Reply: I felt")


def test_pad_ids_left_pads_exact_ids(tiny_llama):
    ids = [[5, 6, 7], [9], [3, 4]]
    b = pad_ids(tiny_llama, ids, device="cpu")
    assert b.tokens.shape == (3, 3) and b.lengths.tolist() == [3, 1, 2]
    for i, x in enumerate(ids):
        assert b.tokens[i, -len(x):].tolist() == x
        assert b.attention_mask[i].tolist() == [0] * (3 - len(x)) + [1] * len(x)
    texts = ["Hello there.", "A much longer sentence than the first one."]
    t = tokenize(tiny_llama, texts)
    p = pad_ids(tiny_llama, [encode(tiny_llama, x) for x in texts])
    assert torch.equal(t.tokens, p.tokens) and torch.equal(t.attention_mask, p.attention_mask)
    with pytest.raises(ValueError, match="empty token sequence"):
        pad_ids(tiny_llama, [[1, 2], []])
    with pytest.raises(ValueError, match="no sequences"):
        pad_ids(tiny_llama, [])


def test_batched_last_token_equals_single(tiny):
    texts = ["Short.", "A somewhat longer prompt with more tokens in it.", "Mid length text."]
    name = sites.hook_name(tiny, "resid_post", tiny.cfg.n_layers - 1)
    b = tokenize(tiny, texts)
    with torch.no_grad():
        _, c = tiny.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=[name])
        for i, t in enumerate(texts):
            one = tokenize(tiny, [t])
            _, c1 = tiny.run_with_cache(one.tokens, names_filter=[name])
            assert (c[name][i, -1] - c1[name][0, -1]).abs().max() <= 1e-4


def _hf_greedy(model, text, cfg: GenerationConfig):
    ids = tokenize(model, [text]).tokens
    out = model.original_model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        pad_token_id=model.tokenizer.pad_token_id,
    )[0, ids.shape[1]:].tolist()
    eos = model.tokenizer.eos_token_id
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("cfg", [GenerationConfig(max_new_tokens=12, batch_size=4),
                                 GenerationConfig(max_new_tokens=12, min_new_tokens=5,
                                                  repetition_penalty=1.3,
                                                  no_repeat_ngram_size=2, batch_size=4)])
def test_generation_equals_hf(tiny, cfg):
    texts = ["Hello", "Tell me a story about a dragon and a knight.", "Why?"]
    res = generate(tiny, texts, cfg, progress=False)
    for t, got in zip(texts, res.tokens, strict=False):
        assert got == _hf_greedy(tiny, t, cfg)


def test_hook_changes_output_and_is_removed_on_error(tiny_llama):
    texts = ["Hello there", "Another prompt"]
    base = generate(tiny_llama, texts, max_new_tokens=8, progress=False).tokens
    name = sites.hook_name(tiny_llama, "resid_post", 1)

    def push(x, hook):
        return x + 5.0 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0))

    with tiny_llama.hooks(fwd_hooks=[(name, push)]):
        steered = generate(tiny_llama, texts, max_new_tokens=8, progress=False).tokens
    assert steered != base

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llama.hooks(fwd_hooks=[(name, boom)]):
            generate(tiny_llama, texts, max_new_tokens=3, progress=False)
    assert all(not hp.has_hooks() for hp in tiny_llama.hook_dict.values()) or \
        generate(tiny_llama, texts, max_new_tokens=8, progress=False).tokens == base


@pytest.mark.integration
def test_smollm2_generation_equals_hf(smol):
    texts = [render(smol, PAPER_EMOTION_SYSTEM.format(emotion="anger"),
                    "I went to the store.\nThey were out of milk."),
             render(smol, PAPER_NEUTRAL_SYSTEM, "My bus was late.\nI missed the meeting.")]
    for cfg in (GenerationConfig(max_new_tokens=20), GenerationConfig.paper_steering()):
        cfg = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": 20})
        res = generate(smol, texts, cfg, progress=False)
        for t, got in zip(texts, res.tokens, strict=False):
            assert got == _hf_greedy(smol, t, cfg)


def test_compute_dtype_restores_parameters_bitwise_also_on_error(tiny_llama):
    from emocircuits.models import compute_dtype

    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    ids_before = {n: id(p) for n, p in tiny_llama.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with compute_dtype(tiny_llama, "bfloat16"):
            assert all(p.dtype == torch.bfloat16 for p in tiny_llama.parameters())
            raise RuntimeError("inside")
    for n, p in tiny_llama.named_parameters():
        assert p.dtype == torch.float32 and id(p) == ids_before[n]
        assert torch.equal(p, before[n]), n


def test_bf16_generation_equals_hf_generate_of_a_bf16_model(tiny):
    """GenerationConfig(dtype="bfloat16") = HF greedy generate of the same weights cast to bf16."""
    cfg = GenerationConfig(max_new_tokens=10, min_new_tokens=3, repetition_penalty=1.2,
                           no_repeat_ngram_size=2, batch_size=4, dtype="bfloat16")
    texts = ["Hello", "Tell me a story about a dragon and a knight.", "Why?"]
    res = generate(tiny, texts, cfg, progress=False)
    assert next(tiny.parameters()).dtype == torch.float32
    hf = tiny.original_model
    saved = {k: v.clone() for k, v in hf.state_dict(keep_vars=False).items()}
    bufs = {n: b.clone() for n, b in hf.named_buffers()}
    try:
        hf.to(torch.bfloat16)  # torch's own cast: the independent reference
        want = [_hf_greedy(tiny, t, cfg) for t in texts]
    finally:
        hf.to(torch.float32)
        hf.load_state_dict(saved, strict=False)
        for n, b in hf.named_buffers():
            b.copy_(bufs[n])
    assert res.tokens == want


def test_bf16_generation_with_a_steering_hook(tiny_llama):
    """An intervention built in float32 is applied in the activation dtype (no dtype error)."""
    from emocircuits.interventions import Intervention, intervene

    v = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(1))
    iv = Intervention(site="resid_post", layer=1, value=v, strength=4.0)
    texts = ["Hello there", "Another prompt"]
    base = generate(tiny_llama, texts, max_new_tokens=8, dtype="bfloat16", progress=False).tokens
    with intervene(tiny_llama, [iv]):
        steered = generate(tiny_llama, texts, max_new_tokens=8, dtype="bfloat16", progress=False).tokens
    assert steered != base


def test_generation_config_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        GenerationConfig(dtype="float7")


def test_incremental_ngram_bans_and_gathered_penalty_equal_the_from_scratch_versions():
    from emocircuits.generation import _apply_repetition_penalty, _banned_ngram_tokens, _NgramBans

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        rows = [torch.randint(0, 6, (int(k),), generator=g).tolist() for k in (1, 3, 8, 12)]
        bans = _NgramBans(rows, n)
        for _ in range(15):
            for i in range(len(rows)):
                assert bans.banned(i) == sorted(set(_banned_ngram_tokens([rows[i]], n)[0])), (n, rows[i])
                t = int(torch.randint(0, 6, (1,), generator=g))
                rows[i].append(t)
                bans.add(i, t)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 9), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen.scatter_(1, ids, True)
    sc = logits.gather(1, ids)
    got = logits.scatter(1, ids, torch.where(sc > 0, sc / 1.3, sc * 1.3))
    assert torch.equal(got, _apply_repetition_penalty(logits, seen, 1.3))


def test_step_logits_reuses_one_float32_buffer():
    from emocircuits.generation import _step_logits

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 50, generator=g).to(torch.bfloat16)
    b = torch.randn(3, 1, 50, generator=g).to(torch.bfloat16)
    x, work = _step_logits(a, None)
    assert x.dtype == torch.float32 and torch.equal(x, a[:, -1, :].float())
    y, work2 = _step_logits(b, work)
    assert work2 is work and y.data_ptr() == x.data_ptr()  # the same buffer, overwritten
    assert torch.equal(y, b[:, -1, :].float())
    f = torch.randn(3, 1, 50, generator=g)
    z, work3 = _step_logits(f, work)
    assert z.data_ptr() == f.data_ptr() and work3 is work  # float32: used as it is
    w, work4 = _step_logits(torch.randn(2, 1, 50).to(torch.bfloat16), work)
    assert work4 is not work and w.shape == (2, 50)  # another batch shape: a new buffer
