"""Smoke tests of the benchmarks on a tiny random model, plus checks of what they compute.

Each benchmark's ``main`` runs in-process with tiny sizes; the checks compare against a
reference computed another way (the project's exact head ablation, torch's FLOP counter,
the un-hooked generation, run_with_cache).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _mod(name: str):
    return importlib.import_module(name)


def test_collect_matches_run_with_cache():
    r = _mod("bench_collect").main(["--model", "tiny-llama", "--n", "6", "--batch-size", "4",
                                    "--in-process", "--unsorted"])
    assert r["max_abs_diff"] <= 1e-5 and r["max_abs_diff_unsorted"] <= 1e-5
    assert r["max_abs_diff_filtered"] <= 1e-5 and r["baseline_filtered"]["shape"] == [6, 3, 64]
    assert r["baseline_filtered"]["full_cache_mb_per_batch"] < r["baseline"]["full_cache_mb_per_batch"]
    b = r["bound"]  # the FLOP floor is a floor: no variant ran faster than it
    assert 0 < b["fp32_floor_s"] <= min(r["project"]["seconds"], r["baseline"]["seconds"])
    assert b["max_possible_speedup"] >= r["speedup"]
    assert r["baseline"]["shape"] == r["project"]["shape"] == [6, 3, 64]
    assert r["speedup"] > 0 and r["memory_ratio"] > 0
    # the full cache of one batch is far bigger than the slice kept
    assert r["baseline"]["full_cache_mb_per_batch"] > 50 * r["project"]["result_mb"]


def test_closed_form_head_importance_equals_batched_ablation(tiny):
    import common as C
    from bench_heads import closed_form_head_importance

    from emocircuits.components import head_ablation_importance
    from emocircuits.emotions import EKMAN6

    prompts = C.sev_prompts(tiny, 6)
    emos = list(EKMAN6)
    dirs = torch.randn(6, tiny.cfg.n_layers, tiny.cfg.d_model)
    exact = head_ablation_importance(tiny, prompts, None, dirs, emos, batch_size=3, progress=False)
    cf = closed_form_head_importance(tiny, prompts, dirs, emos, batch_size=4)
    assert exact.mean.abs().max() > 1e-3
    torch.testing.assert_close(cf, exact.mean, atol=2e-5, rtol=1e-4)


def test_heads_benchmark_runs():
    r = _mod("bench_heads").main(["--model", "tiny-gemma", "--n", "6", "--batch-size", "6",
                                  "--top-k", "5", "--loop-layers", "1"])
    assert r["closed_form_vs_exact_max_diff"] < 1e-4
    assert r["baseline"]["forwards"] == 6 * (1 + 3 * 4)
    assert -1 <= r["agreement_attribution_vs_exact"]["spearman_all"] <= 1
    assert r["speedup_exact"] > 0 and r["speedup_attribution"] > 0


def test_agreement_detects_disagreement():
    from bench_heads import agreement

    x = torch.randn(2, 3, 4)
    same = agreement(x, 2 * x + 1, 5)
    assert same["spearman_all"] == pytest.approx(1.0) and same["top_overlap_mean"] == 1.0
    rev = agreement(x, -x, 5)
    assert rev["spearman_all"] == pytest.approx(-1.0) and rev["top_overlap_mean"] < 1.0


def test_hooks_benchmark_tokens_unchanged():
    r = _mod("bench_hooks").main(["--model", "tiny-llama", "--n", "2", "--n-gen", "2",
                                  "--max-new-tokens", "3", "--repeat", "1"])
    assert r["generation"]["tokens_identical"] is True
    assert r["generation"]["new_tokens"] == 6
    assert set(r["forward"]["overhead"]) == {"steer0", "steer_add0"}


def test_zero_add_hook_really_runs(tiny_llama):
    """The hook variant must touch every layer (else the overhead measured is nothing)."""
    from bench_hooks import steer_zero_vector

    from emocircuits.prompts import tokenize

    b = tokenize(tiny_llama, ["hello there"])
    calls = []
    orig = torch.Tensor.clone

    def counting_clone(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    with steer_zero_vector(tiny_llama), torch.no_grad():
        torch.Tensor.clone = counting_clone
        try:
            tiny_llama(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1)
        finally:
            torch.Tensor.clone = orig
    assert len(calls) >= tiny_llama.cfg.n_layers


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_forward_flops_match_torch_flop_counter(arch, tiny_llama, tiny_gemma):
    from bench_flops import forward_flops
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama if arch == "llama" else tiny_gemma
    hf = model.original_model
    toks = torch.randint(0, 1000, (3, 17))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        hf(input_ids=toks, logits_to_keep=1, use_cache=False)
    ours = forward_flops(model, 3, 17, 1)
    # gemma's sliding window is still computed as full T×T by the eager kernel
    assert ours["total"] == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_matmul_peak_positive():
    from bench_flops import matmul_peak

    r = matmul_peak(64, repeat=2)
    assert r["flops_per_s"] > 0 and r["size"] == 64


def test_flops_benchmark_runs():
    r = _mod("bench_flops").main(["--model", "tiny-llama", "--n", "2", "--repeat", "1",
                                  "--matmul-size", "64"])
    assert 0 < r["efficiency"] and r["forward"]["flops"]["linear_params"] == 3 * (
        64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 96)


def test_paper_counts_reproduce_paper_numbers():
    from bench_end_to_end import paper_counts

    # Llama-3.2-3B: 28 layers × 24 heads; the paper's head loop is N·(1 + 672) ≈ 1.9 M forwards
    pc = paper_counts(28, 24, n=2847)
    assert pc["stages"]["04_heads_paper_loop"]["forward"] == 2847 * 673
    assert 1.85e6 < pc["stages"]["04_heads_paper_loop"]["forward"] < 1.95e6
    # sublayer influence: 57 interventions × n per (emotion, α), 4 α: ≈ 650 k
    inf = paper_counts(28, 24, n=2850)["stages"]["06_sublayer_influence"]["forward"]
    assert 6.0e5 < inf < 7.0e5


def test_end_to_end_estimates_without_run():
    r = _mod("bench_end_to_end").main(["--model", "tiny-llama", "--skip-run"])
    u = r["unit_costs"]
    assert u["s_per_prompt_forward"] > 0 and u["s_per_decode_step_b16"] > 0
    full = r["estimate_full_builtin_240_scenarios"]
    assert full["plan"]["data"] == {"n_train": 160, "n_validation": 12, "n_test": 40}  # the full preset
    assert full["total_s"] > r["estimate_preset"]["total_s"] > 0


def test_peak_memory_sees_a_big_allocation():
    import common as C

    with C.PeakMemory() as pm:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    assert pm.extra_mb is not None and pm.extra_mb > 48


@pytest.mark.slow
def test_run_all_writes_json(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "run_all"), "--model", "tiny-llama", "--smoke",
                        "--only", "flops", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert "efficiency" in doc["results"]["flops"] and doc["summary"]


def test_gpu_llama3b_script_on_tiny_config():
    r = _mod("gpu_llama3b").main(["--tiny", "--device", "cpu", "--dtypes", "fp32", "--n", "4",
                                  "--batch-size", "4", "--head-prompts", "2", "--head-batch", "2",
                                  "--matmul-size", "64", "--gen-batch", "2", "--max-new-tokens", "2"])
    run = r["runs"][0]
    assert run["dtype"] == "fp32" and run["generation"]["new_tokens"] == 4
    assert run["collect"]["speedup"] > 0 and run["heads"]["speedup_closed_form"] > 0


def test_plain_hf_copy_has_the_bridge_weights(tiny_llama):
    """The peers run on a plain HF model built from the bridge's weights: same logits."""
    from bench_peers import plain_hf

    from emocircuits.prompts import tokenize

    hf = plain_hf(tiny_llama)
    assert not any("Bridge" in type(m).__name__ for m in hf.modules())
    tb = tokenize(tiny_llama, ["Hello there, my friend.", "A b"])
    with torch.no_grad():
        ref = tiny_llama(tb.tokens, attention_mask=tb.attention_mask)[:, -1]
        got = hf(tb.tokens, attention_mask=tb.attention_mask).logits[:, -1]
    assert torch.allclose(ref, got, atol=1e-5)


def test_bench_peers_smoke():
    pytest.importorskip("nnsight")
    pytest.importorskip("steering_vectors")
    r = _mod("bench_peers").main(["--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--n-patch", "2",
                                  "--n-gen", "2", "--max-new-tokens", "3", "--repeat", "1", "--profile"])
    assert r["collect"]["max_abs_diff_nnsight"] < 1e-5
    # counted for each path (on a 3-token tiny run the bypass's one-off plan outweighs what it saves;
    # on SmolLM2 it halves the calls, docs/scaling.md)
    assert set(r["steering"]["python_calls"]) == {"project", "project_bridge_path", "steering_vectors"}
    assert r["patching"]["max_abs_diff_effect"] < 1e-5
    assert r["steering"]["tokens_identical"] is True


def test_bench_reuse_smoke():
    r = _mod("bench_reuse").main(["--model", "tiny-llama", "--n", "4", "--steps", "2", "--batch-size", "2",
                                  "--n-patch", "2", "--decode-batches", "1,2", "--decode-tokens", "2",
                                  "--copies-scenarios", "1"])
    assert r["sweep"]["max_abs_diff"] < 1e-4
    assert r["influence"]["max_abs_diff"] < 1e-3 * max(1.0, r["influence"]["influence_scale"])
    assert r["influence_copies"]["max_abs_diff"] < 1e-4 * max(1.0, r["influence_copies"]["influence_scale"])
    assert r["patch_layers"]["max_abs_diff"] < 1e-5
    assert r["sweep"]["forwards_equivalent"]["fast"] < r["sweep"]["forwards_equivalent"]["straightforward"]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma"])
def test_bench_decode_expanded_caches_give_the_same_tokens(model):
    # 30 new tokens: past tiny Gemma's sliding window of 8 and past the buffer's first size
    r = _mod("bench_decode").main(["--model", model, "--n", "5", "--max-new-tokens", "30",
                                   "--dtype", "float32", "--repeat", "1", "--in-process"])
    assert r["tokens_identical"] == {"expanded_buffer": True, "expanded_cat": True, "fresh_logits": True,
                                     "bridge_path": True, "repeat_kv": True}
    assert r["new_tokens"] > 5 * 10
    shares = r["time_shares_ordinary"]["shares"]
    assert 0.9 < sum(shares.values()) <= 1.0 + 1e-9 and "Linear" in shares
    assert r["profiler_check"]["loop_s"] > 0


def test_module_timer_puts_a_module_s_time_on_its_own_kind_not_its_parent_s():
    """A 20 ms sleep inside one MLP's forward is that MLP kind's time; its decoder layer's self
    time and the bridge's do not hold it; the kinds add up to the total."""
    from emocircuits.generation import GenerationConfig, generate

    bd = _mod("bench_decode")
    model = bd.C.load("tiny-llama")
    mlp = next(m for m in model.original_model.modules() if type(m).__name__.endswith("MLP"))
    orig, calls = mlp.forward, []

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.02)
        return orig(*a, **k)
    mlp.forward = slow
    try:
        with bd.module_timer(model) as sec:
            generate(model, ["Hello there", "A much longer prompt than that"],
                     GenerationConfig(max_new_tokens=4, min_new_tokens=4), progress=False)
    finally:
        del mlp.forward
    slept = 0.02 * len(calls)
    kind = type(mlp).__name__
    assert len(calls) >= 4 and sec[kind] >= slept
    layer = next(k for k in sec if k.endswith("DecoderLayer"))
    assert sec[layer] < slept and sec["bridge (its own code)"] < slept and sec["outside the model"] < slept
    assert sum(v for k, v in sec.items() if k != "total") == pytest.approx(sec["total"], rel=1e-9)
    assert not any(k.endswith("Bridge") or k == "HookPoint" for k in sec)  # the bypass still applies


def test_bench_decode_restores_attention_and_cache_class_on_error():
    from transformers.cache_utils import DynamicCache

    bd = _mod("bench_decode")
    model = bd.C.load("tiny-gemma")
    mods = bd.grouped_attention(model)
    before, init = [m.num_key_value_groups for m in mods], DynamicCache.__init__
    assert mods and all(g > 1 for g in before)
    with pytest.raises(RuntimeError, match="boom"):
        with bd.expanded_cache(model, 16):
            assert all(m.num_key_value_groups == 1 for m in mods)
            raise RuntimeError("boom")
    assert [m.num_key_value_groups for m in mods] == before
    assert DynamicCache.__init__ is init


def test_bench_decode_fresh_processes():
    r = _mod("bench_decode").main(["--model", "tiny-llama", "--n", "3", "--max-new-tokens", "4",
                                   "--dtype", "bfloat16", "--repeat", "1",
                                   "--variants", "ordinary,fresh_logits"])
    assert r["tokens_identical"] == {"fresh_logits": True}
    assert set(r["times"]) == {"ordinary", "fresh_logits"} and "fresh process" in r["timing"]
