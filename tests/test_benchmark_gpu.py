"""benchmarks/gpu.py: MFU of the SFT / DPO / PPO training steps and decode against the bandwidth floor, run at the tiny
shape on the CPU (in this process, ~10 s on 2 idle cores), plus its accounting against numbers worked by hand.

The tiny shape's non-embedding parameter count N, by hand (Qwen2: hidden d = 64, 2 layers, 4 heads of 16, 2 KV heads,
so K and V are 32 wide; intermediate 256; vocab 512, tied embeddings):
    q_proj   64·64 + 64 (bias)   =  4,160
    k_proj   64·32 + 32 (bias)   =  2,080
    v_proj   64·32 + 32 (bias)   =  2,080
    o_proj   64·64 (no bias)     =  4,096
    gate, up 2 · 64·256          = 32,768
    down     256·64              = 16,384
    2 RMSNorms 2 · 64            =    128
    one layer                    = 61,696;  2 layers = 123,392;  + final norm 64  ->  N = 123,456
    embedding 512·64 = 32,768 (the LM head too: tied)  ->  156,224 parameters in all.
Qwen2-0.5B the same way (d 896, 24 layers, 14 heads of 64, 2 KV heads: K, V 128 wide; intermediate 4864):
    803,712 + 2·114,816 + 802,816 + 3·896·4864 (13,074,432) + 1,792 = 14,912,384 a layer; ·24 + 896 = 357,898,112;
    + 151,936·896 (136,134,656) = 494,032,768 (Qwen2-0.5B's published 0.49B).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N_TINY = 123_456


def _gpu():
    spec = importlib.util.spec_from_file_location("benchmark_gpu", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gpu = _gpu()


@pytest.fixture(scope="module")
def lines() -> dict[str, dict]:
    """One run of the benchmark at the tiny shape on the CPU, in this process (its imports are shared with the tests
    below): {workload: its JSON line}, each line also checked against what was printed."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returned = gpu.main(["--shape", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2",
                             "--peak-size", "1024", "--repeats", "3", "--bandwidth-mbytes", "128"])
    printed = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]
    assert printed == returned
    assert "MFU" in stderr.getvalue() and "of the floor" in stderr.getvalue()   # the readable table
    return {x["workload"]: x for x in printed}


def test_every_workload_reports_positive_finite_figures(lines):
    assert set(lines) == {"sft", "dpo", "ppo", "decode"}
    for name, x in lines.items():
        assert x["device"] == "cpu" and x["shape"] == "tiny" and x["dtype"] == "float32", name
        numbers = {k: v for k, v in x.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in numbers.items():
            assert math.isfinite(value) and value > 0, (name, key, value)
        assert x["params"] == N_TINY and x["params_total"] == 156_224


def test_mfu_against_the_measured_peak(lines):
    # The CPU peak is measured (the best of timed matmuls); a step can beat it slightly when the matmuls ran at a
    # noisy moment (another process on the shared cores) and the step did not, hence the bound 1.5, not 1.
    for name in ("sft", "dpo", "ppo"):
        x = lines[name]
        assert x["peak_source"] == "measured"
        assert 0 < x["mfu"] < 1.5, (name, x["mfu"])
        assert x["mfu"] < x["mfu_with_lm_head"] < 1.5 * (1 + x["lm_head_flops"] / x["model_flops"])
        assert x["mfu"] == pytest.approx(x["model_flops"] / x["seconds"] / (x["peak_tflops"] * 1e12), rel=1e-9)
        assert x["achieved_tflops"] == pytest.approx(x["mfu"] * x["peak_tflops"], rel=1e-9)


def test_decode_against_the_bandwidth_floor(lines):
    x = lines["decode"]
    assert x["bandwidth_source"] == "measured"
    assert 0 < x["decode_efficiency"] < 1.5
    assert x["decode_efficiency"] == pytest.approx(x["decode_tokens_per_s"] / x["floor_tokens_per_s"], rel=1e-9)
    assert x["decode_steps"] == x["new_tokens"] - 1                    # the first token comes with the prefill
    assert x["decode_tokens"] == x["decode_batch"] * x["decode_steps"]
    assert x["weight_bytes"] == (N_TINY + 512 * 64) * 4                 # fp32: every weight read once per step
    floor = gpu.decode_floor_seconds(x["weight_bytes"], gpu.shape_config("tiny"), x["decode_prompt_len"],
                                     x["decode_steps"], x["decode_batch"], 4, x["bandwidth_gbs"])
    assert x["floor_seconds"] == pytest.approx(floor, rel=1e-12)


def test_tokens_per_second_times_seconds_is_the_tokens_processed(lines):
    for name in ("sft", "dpo", "ppo"):
        x = lines[name]
        assert x["tokens_per_s"] * x["seconds"] == pytest.approx(x["tokens"], rel=1e-9), name
    d = lines["decode"]
    assert d["decode_tokens_per_s"] * d["decode_seconds"] == pytest.approx(d["decode_tokens"], rel=1e-9)
    # what was processed: batch 4, 64 tokens a sequence, 2 timed steps
    assert lines["sft"]["tokens"] == 4 * 64 * 2
    assert lines["dpo"]["tokens"] == 4 * 2 * 64 * 2                     # pairs · (chosen + rejected) · steps
    assert lines["ppo"]["tokens"] == 4 * 64 * 2                         # rollouts · (prompt + response) · updates


def test_flops_match_the_hand_count_and_what_the_model_received(lines):
    sft, dpo, ppo = lines["sft"], lines["dpo"], lines["ppo"]
    assert sft["model_flops"] == 6 * N_TINY * 512 == 379_256_832
    assert dpo["model_flops"] == 8 * N_TINY * 1024 == 1_011_351_552      # 6N policy + 2N reference
    assert ppo["model_flops"] == (6 * 4 + 2) * N_TINY * 512 == 1_643_446_272  # 4 epochs + reference; old reused
    assert sft["lm_head_flops"] == 6 * 512 * 64 * 512                  # the LM head at every position
    assert dpo["lm_head_flops"] == 8 * 512 * 64 * (4 * 2 * 2 * (64 - 16))  # completion tokens only
    for x in (sft, dpo, ppo):
        assert x["model_flops"] == pytest.approx(x["flops_per_token"] * x["tokens"], rel=1e-12)
        # no padding at this size: the model body received exactly the tokens accounted for, pass by pass
        assert x["fed_tokens"] == x["accounted_tokens"], x["workload"]
    assert ppo["accounted_tokens"] == (4 + 1) * 512                      # 4 training forwards + the reference


def test_parameter_count_by_hand():
    from transformers import Qwen2ForCausalLM

    tiny = gpu.shape_config("tiny")
    assert gpu.non_embedding_params(tiny) == N_TINY
    assert gpu.model_param_counts(Qwen2ForCausalLM(tiny)) == (N_TINY, 156_224)
    big = gpu.shape_config("0.5b")
    assert gpu.non_embedding_params(big) == 357_898_112
    assert gpu.non_embedding_params(big) + big.vocab_size * big.hidden_size == 494_032_768


def test_flop_accounting_by_hand():
    P = gpu.Pass
    assert gpu.model_flops(gpu.sft_passes(8, 512), 100) == 6 * 100 * 4096
    assert gpu.model_flops(gpu.dpo_passes(1000, 600), 100) == 8 * 100 * 1000
    assert gpu.lm_head_flops(gpu.dpo_passes(1000, 600), 10, 4) == 8 * 10 * 4 * 600
    assert gpu.model_flops(gpu.ppo_passes(1000, 4, reuse_old_forward=True), 100) == 26 * 100 * 1000
    assert gpu.model_flops(gpu.ppo_passes(1000, 4, reuse_old_forward=False), 100) == 28 * 100 * 1000
    assert gpu.model_flops([P("train", 10, 0), P("forward", 5, 0)], 3) == 6 * 3 * 10 + 2 * 3 * 5


def test_kv_cache_bytes_by_hand():
    # Qwen2-0.5B in bf16 at 1000 positions, batch 8: 2 (K, V) · 24 layers · 2 KV heads · 64 · 1000 · 8 · 2 bytes
    assert gpu.kv_cache_bytes(24, 2, 64, 1000, 8, 2) == 98_304_000
    cfg = gpu.shape_config("0.5b")
    assert gpu.head_dim(cfg) == 64
    # floor of 2 decode steps after a 10-token prompt (positions 11 and 12), batch 1, bf16, at 1 GB/s
    w = (357_898_112 + 151_936 * 896) * 2
    kv = 2 * 24 * 2 * 64 * (11 + 12) * 1 * 2
    assert gpu.decode_floor_seconds(w, cfg, 10, 2, 1, 2, 1.0) == pytest.approx((2 * w + kv) / 1e9, rel=1e-12)


def test_device_tables():
    peak = lambda name: (gpu.table_lookup(name, gpu.GPU_PEAK_TFLOPS) or {}).get("bf16")
    bw = lambda name: gpu.table_lookup(name, gpu.GPU_BANDWIDTH_GBS)
    assert (peak("NVIDIA H200"), bw("NVIDIA H200")) == (989.0, 4800.0)
    assert (peak("NVIDIA H100 80GB HBM3"), bw("NVIDIA H100 80GB HBM3")) == (989.0, 3350.0)
    assert (peak("NVIDIA H100 PCIe"), bw("NVIDIA H100 PCIe")) == (756.0, 2000.0)
    assert (peak("NVIDIA A100-SXM4-80GB"), bw("NVIDIA A100-SXM4-80GB")) == (312.0, 2039.0)
    assert bw("NVIDIA A100 80GB PCIe") == 1935.0 and bw("NVIDIA A100-SXM4-40GB") == 1555.0
    assert peak("Tesla T4") is None and bw("Tesla T4") is None          # unknown: measured instead
