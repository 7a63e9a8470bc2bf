from __future__ import annotations

import pytest
import torch

from emocircuits import sites as S
from emocircuits.activations import Activations, collect
from emocircuits.prompts import tokenize

TEXTS = ["Short one.", "A considerably longer prompt with many more tokens in it.", "Mid size text."]
SITES = ("resid_mid", "resid_post", "z", "head_result", "mlp_post", "final_norm")


def _reference(model, text, site, layer):
    b = tokenize(model, [text])
    name = S.hook_name(model, site, None if site == "final_norm" else layer)
    with torch.no_grad():
        _, c = model.run_with_cache(b.tokens, names_filter=[name])
    x = c[name][0]
    if site == "head_result":
        x = S.head_result_from_z(model, layer, x)
    return x


@pytest.mark.parametrize("position", ["last", "all", "index"])
def test_collect_equals_run_with_cache(tiny, position):
    pos = torch.tensor([[0, -1], [2, -3], [1, -2]]) if position == "index" else position
    acts = collect(tiny, TEXTS, SITES, pos, layers=[0, 2], batch_size=2, progress=False)
    for site in SITES:
        for j, layer in enumerate(acts.layers[site]):
            for i, t in enumerate(TEXTS):
                ref = _reference(tiny, t, site, layer)
                got = acts[site][i, j]
                if position == "last":
                    want = ref[-1]
                elif position == "all":
                    n = ref.shape[0]
                    assert int(acts.lengths[i]) == n
                    assert got[n:].abs().max() == 0 if got.shape[0] > n else True
                    got, want = got[:n], ref
                else:
                    want = ref[pos[i]]
                assert got.dtype == torch.float32 and got.device.type == "cpu"
                assert (got - want).abs().max() <= 1e-4, (site, layer, i)


def test_collect_deterministic_and_sharded(tiny_llama, tmp_path):
    a = collect(tiny_llama, TEXTS * 3, ("resid_post", "mlp_post"), batch_size=2, progress=False)
    b = collect(tiny_llama, TEXTS * 3, ("resid_post", "mlp_post"), batch_size=2, progress=False,
                out_dir=tmp_path / "sh", shard_size=4)
    assert len(list((tmp_path / "sh").glob("shard_*.safetensors"))) >= 2
    for s in ("resid_post", "mlp_post"):  # batches differ (sorted per shard window): rounding only
        assert torch.allclose(a[s], b[s], atol=1e-5)
    a.save(tmp_path / "a.safetensors")
    c = Activations.load(tmp_path / "a.safetensors")
    assert torch.equal(c["resid_post"], a["resid_post"]) and c.layers == a.layers


def test_collect_bad_input(tiny_llama):
    with pytest.raises(KeyError, match="unknown site"):
        collect(tiny_llama, TEXTS, "resid_middle", progress=False)
    with pytest.raises(IndexError, match="out of range"):
        collect(tiny_llama, TEXTS, "resid_post", layers=[9], progress=False)
    with pytest.raises(IndexError, match="outside its prompt"):
        collect(tiny_llama, TEXTS, "resid_post", torch.tensor([50]), progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        collect(tiny_llama, [], "resid_post", progress=False)


@pytest.mark.parametrize("position", ["last", "all", "index"])
def test_collect_length_sorting_keeps_input_order(tiny_llama, tmp_path, position):
    """Sorted batching (default), input-order batching and sharded streaming of rows whose
    lengths differ per shard agree row by row; lengths come back in input order."""
    texts = [TEXTS[i % 3] + " x" * (i % 5) for i in range(11)]
    pos = torch.tensor([0, -1]) if position == "index" else position
    kw = dict(batch_size=3, progress=False)
    a = collect(tiny_llama, texts, ("resid_post", "z"), pos, **kw)
    b = collect(tiny_llama, texts, ("resid_post", "z"), pos, sort_by_length=False, **kw)
    c = collect(tiny_llama, texts, ("resid_post", "z"), pos, out_dir=tmp_path / position, shard_size=4, **kw)
    for s in ("resid_post", "z"):
        assert a[s].shape == b[s].shape == c[s].shape
        assert torch.allclose(a[s], b[s], atol=1e-5) and torch.allclose(a[s], c[s], atol=1e-5)
    if position == "all":
        want = torch.tensor([len(tokenize(tiny_llama, [t]).tokens[0]) for t in texts])
        assert torch.equal(a.lengths, want) and torch.equal(c.lengths, want)


def test_forward_until_logits_stop_and_hook_removal(tiny_llama):
    from emocircuits.activations import forward_until

    b = tokenize(tiny_llama, TEXTS)
    with torch.no_grad():
        full = tiny_llama(b.tokens, attention_mask=b.attention_mask)[:, -1]
        got = forward_until(tiny_llama, b.tokens, b.attention_mask, None)
        assert got.shape[1] == 1 and torch.allclose(got[:, -1], full, atol=1e-5)
        seen = []
        name = S.hook_name(tiny_llama, "resid_post", 0)
        assert forward_until(tiny_llama, b.tokens, b.attention_mask, 1,
                             [(name, lambda x, hook: seen.append(1) or x)]) is None
        assert seen == [1]

        def boom(x, hook):  # noqa: ARG001
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            forward_until(tiny_llama, b.tokens, b.attention_mask, 1, [(name, boom)])
        forward_until(tiny_llama, b.tokens, b.attention_mask, 1)  # the failing hook is gone


def test_shared_activations_answer_subsets_without_forwards_and_equal_a_fresh_collect(tiny):
    from emocircuits.activations import shared_activations

    texts = ["Short.", "A somewhat longer prompt with more tokens in it.", "Mid length text.",
             "Another one, of its own length.", "x y z"]
    sites = ("resid_pre", "resid_mid", "mlp_post", "z")
    big = collect(tiny, texts, sites, "last", batch_size=2, progress=False)
    want = collect(tiny, [texts[3], texts[0]], ("mlp_post", "z"), "last", layers=[1, 2], progress=False)
    calls = []
    with shared_activations(tiny, big, texts):
        with tiny.hooks(fwd_hooks=[(S.hook_name(tiny, "resid_pre", 0), lambda x, hook: calls.append(1))]):
            got = collect(tiny, [texts[3], texts[0]], ("mlp_post", "z"), "last", layers=[1, 2], progress=False)
            assert calls == []  # answered from the shared collection
            miss = collect(tiny, ["not shared"], "resid_post", "last", progress=False)  # not covered: a forward
            assert calls and miss["resid_post"].shape[0] == 1
    assert got.layers == want.layers and got.meta["shared"]
    for s in ("mlp_post", "z"):
        assert got[s].shape == want[s].shape
        assert torch.allclose(got[s], want[s], atol=1e-5), s
    # gone after the block, also after an exception
    with pytest.raises(RuntimeError, match="inside"):
        with shared_activations(tiny, big, texts):
            raise RuntimeError("inside")
    calls.clear()
    with tiny.hooks(fwd_hooks=[(S.hook_name(tiny, "resid_pre", 0), lambda x, hook: calls.append(1))]):
        collect(tiny, [texts[0]], "z", "last", progress=False)
    assert calls


def test_shared_activations_rejects_mismatched_inputs(tiny_llama):
    from emocircuits.activations import shared_activations

    acts = collect(tiny_llama, ["a b", "c d e"], "resid_post", "last", progress=False)
    with pytest.raises(ValueError, match="2 rows"):
        with shared_activations(tiny_llama, acts, ["a b"]):
            pass
    every = collect(tiny_llama, ["a b"], "resid_post", "all", progress=False)
    with pytest.raises(ValueError, match="last-token"):
        with shared_activations(tiny_llama, every, ["a b"]):
            pass
