"""How close alignloop's training steps and rollout come to the machine's limits: model FLOP utilisation (MFU) of the
SFT, DPO and PPO training steps, and the rollout's decode speed against the memory-bandwidth floor.

    python benchmarks/gpu.py                                    # 0.5b shape, bf16, on the GPU when there is one
    python benchmarks/gpu.py --shape tiny --device cpu          # the CPU test's size (tests/test_benchmark_gpu.py)
    python benchmarks/gpu.py --workloads sft,dpo,ppo,decode --batch 8 --seq-len 512 --peak-tflops 989

One JSON line per workload on stdout; a readable table on stderr.

The model: transformers' Qwen2ForCausalLM from a Qwen2Config with random weights (nothing is downloaded).
`--shape 0.5b` is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936,
tied embeddings: 494,032,768 parameters); `--shape tiny` (hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate
256, vocab 512, tied) is for CPU tests. Precision (`--precision`): bf16 = weights (and AdamW state) in bfloat16, the
default on a GPU; fp32, the default on a CPU; autocast = float32 weights under bf16 autocast (the trainers'
`mixed_precision="bf16"`).

## Training steps: MFU

Each workload runs through the trainers' own code, on synthetic data of fixed shape:
- sft: `alignloop.trainers.sft.token_nll` (the SFT loss: -log p of each target token) -> masked sum / targets ->
  `accelerator.backward` -> `alignloop.training.optimizer_step` (clip, AdamW, schedule), the model prepared by
  `setup_optimization` exactly as `SFTTrainer.train()` does; `--batch` rows of `--seq-len` tokens, no padding.
- dpo: `DPOTrainer.pair_terms` (policy forward over chosen and rejected together, the reference's forward on the fly
  with `precompute_ref_logps=False`, `alignloop.losses.dpo_loss`) -> backward -> `optimizer_step`, the body of
  `DPOTrainer.train()`'s loop (one process: its gradient all-reduce is a no-op and is left out). `--batch` pairs,
  each a prompt of `--prompt-len` tokens and two completions that end `--seq-len` tokens long; the trainer's
  default layout (packing and a shared prompt on wide models, `packing="auto"`).
- ppo: `PPOTrainer.train()` with a `Sampler` that hands back the same synthetic rollout every update (`--batch`
  responses of `--seq-len - --prompt-len` tokens after `--prompt-len`-token prompts, no padding) and a function
  reward; the time is the trainer's own `time/train` of each update: old log-probs and values, the reference
  forward, rewards and GAE, `--ppo-epochs` epochs of one minibatch.
`--warmup` steps (updates) are run first and not timed (kernel creation, allocator); then `--steps` are timed.

MFU = model FLOPs per second / the device's peak. Model FLOPs are counted the standard way (Kaplan et al. 2020;
PaLM's MFU): 2·N FLOPs per token for a forward and 6·N for a forward and backward, where N is the **non-embedding
parameter count** (every parameter but the token embedding; the value head, d+1 parameters, is left out). N is
the parameter count that scales the work of every token; the embedding lookup costs no FLOPs. Qwen2's LM head is the
(tied) embedding matrix, so its matmul (2·V·d per position where logits are computed) is *not* in N:
`mfu` is the conservative figure the issue asks for (6·N·tokens), and `mfu_with_lm_head` adds the LM head's FLOPs
at exactly the positions where the trainer applies it (SFT and PPO: every position; DPO: completion tokens only).
Attention's own score/value products (4·layers·d·context per token) are in neither figure (a few percent at these
lengths). Per workload and step, with T the step's tokens (`tokens`):
- sft: one forward+backward of T = batch·seq_len tokens: 6·N·T.
- dpo: T = the tokens that go through the model (chosen + rejected, a shared prompt counted once), policy
  forward+backward 6·N·T plus the reference forward 2·N·T: 8·N·T.
- ppo: T = batch·(prompt + response) tokens per update: 6·N·T per PPO epoch (policy + value head, one forward),
  the reference forward 2·N·T, and the old log-probs' forward 2·N·T unless the trainer reuses the first training
  forward for them (it does with one minibatch and no accumulation, the default here): (6·epochs + 2)·N·T.
`fed_tokens` counts what the model body actually received (a forward hook): padding and packing filler included, so
`fed_tokens` ≥ the accounted tokens of all passes, equal when there is no padding (sft, ppo, and dpo when every
sequence has the same length, a multiple of 8, and no packing).

The peak: `--peak-tflops` ("given"); on CUDA a table of dense peaks by device name ("table": H100 SXM and H200 989
TFLOP/s bf16, 67 fp32; H100 PCIe 756 / 51; A100 312 / 19.5); on a CPU (or an unknown GPU) it is **measured**: the
best of several timed square matmuls of `--peak-size` in the step's compute dtype, with the threads the steps use.
On a CPU the MFU is thus against what this machine can actually do, and can come out slightly above 1 when the
timed matmul ran at a noisy moment (another process on the same cores) and a step did not.

## Rollout: decode against the bandwidth floor

`alignloop.rollout.HFSampler.generate` (the rollout every RL trainer samples with) on `--decode-batch` prompts of
`--decode-prompt-len` tokens, `--new-tokens` new tokens each (an EOS id the model cannot emit, so every row decodes
them all). Each decode step is timed through the sampler's `on_step` hook, so the prefill is left out: the
n - 1 forwards after the first token. A decode step must at least read every weight once (non-embedding parameters
+ the LM head, V·d; the embedding lookup reads `batch` rows only, left out) and the KV cache at its current length:
    KV bytes = 2 (K and V) · layers · kv_heads · head_dim · seq_len · batch · dtype bytes
(step k, k = 1 .. n-1, attends over seq_len = prompt + k positions). The floor time is the sum over the steps of
bytes / bandwidth; `decode_efficiency` = floor time / actual time (= achieved tokens/s ÷ the floor's tokens/s).
Bandwidth: `--bandwidth-gbs` ("given"); on CUDA a table by device name ("table": H200 4800 GB/s, H100 SXM 3350,
H100 PCIe 2000, A100 80GB 2039 (PCIe 1935), A100 40GB 1555); on a CPU (or an unknown GPU) **measured**: the best
of several timed copies (bytes read + written) and sums (bytes read) of a tensor larger than the caches.

Goals (issue 18; for a GPU): MFU ≥ 45% of the training steps, decode ≥ 70% of the bandwidth floor. They are
printed beside the figures; a CPU run shows the same figures against the CPU's measured limits.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

GOAL_MFU, GOAL_DECODE = 0.45, 0.70

SHAPES = {
    # Qwen2-0.5B (config.json of Qwen/Qwen2-0.5B): 494,032,768 parameters, 357,898,112 without the embedding
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6),
    # N = 123,456 (the hand count is in tests/test_benchmark_gpu.py); + 32,768 embedding = 156,224
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-6),
}

# sizes when not given: (batch, seq_len, prompt_len, decode_batch, decode_prompt_len, new_tokens)
DEFAULT_SIZES = {"0.5b": (8, 512, 128, 16, 128, 128), "tiny": (4, 64, 16, 4, 16, 16)}

# Dense (no sparsity) peaks in TFLOP/s by compute dtype, and memory bandwidth in GB/s, by device name: the first
# entry whose every word is in the name wins (more specific entries first). Vendor data sheets.
GPU_PEAK_TFLOPS = [
    (("H200",), {"bf16": 989.0, "fp32": 67.0}),
    (("H100", "PCIE"), {"bf16": 756.0, "fp32": 51.0}),
    (("H100",), {"bf16": 989.0, "fp32": 67.0}),      # SXM
    (("A100",), {"bf16": 312.0, "fp32": 19.5}),
]
GPU_BANDWIDTH_GBS = [
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),                              # SXM
    (("A100", "80GB", "PCIE"), 1935.0),
    (("A100", "80GB"), 2039.0),
    (("A100",), 1555.0),                              # 40GB
]

WORKLOADS = ("sft", "dpo", "ppo", "decode")
TRAIN_WORKLOADS = ("sft", "dpo", "ppo")
FLOPS_PER_PARAM = {"train": 6, "forward": 2}


# ------------------------------------------------------------------------------------------------ accounting

def shape_config(shape: str):
    """The Qwen2Config of a named shape."""
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape])


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def non_embedding_params(cfg) -> int:
    """N of a Qwen2 config, counted from its shape: per layer q/k/v projections (with biases), o projection (no
    bias), the gated MLP (gate, up, down; no biases), two RMSNorms; then the final norm. The token embedding (the LM
    head too, when tied) is not counted."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, head_dim(cfg)
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn = (d * q + q) + 2 * (d * kv + kv) + q * d
    per_layer = attn + 3 * d * f + 2 * d
    return cfg.num_hidden_layers * per_layer + d


def model_param_counts(model) -> tuple[int, int]:
    """(non-embedding, total) parameters of a built model, each tensor once (tied weights counted once)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - emb.numel(), total


@dataclass(frozen=True)
class Pass:
    """One pass of a training step over `tokens` tokens: "train" (forward + backward: 6 FLOPs per parameter per
    token) or "forward" (2); the LM head applied at `head_tokens` positions."""
    kind: str
    tokens: int
    head_tokens: int


def model_flops(passes: Sequence[Pass], n_params: int) -> int:
    """Σ 6·N·tokens (train) + 2·N·tokens (forward): the MFU numerator's FLOPs."""
    return sum(FLOPS_PER_PARAM[p.kind] * n_params * p.tokens for p in passes)


def lm_head_flops(passes: Sequence[Pass], vocab: int, hidden: int) -> int:
    """The LM head's matmul where it is applied: Σ 6 (or 2)·V·d·head_tokens."""
    return sum(FLOPS_PER_PARAM[p.kind] * vocab * hidden * p.head_tokens for p in passes)


def sft_passes(batch: int, seq_len: int) -> list[Pass]:
    t = batch * seq_len
    return [Pass("train", t, t)]


def dpo_passes(tokens: int, completion_tokens: int) -> list[Pass]:
    """Policy forward+backward and the reference forward over the same tokens; the LM head at completion tokens."""
    return [Pass("train", tokens, completion_tokens), Pass("forward", tokens, completion_tokens)]


def ppo_passes(tokens: int, epochs: int, reuse_old_forward: bool) -> list[Pass]:
    """`epochs` forward+backward passes of policy and value head, the reference forward, and the old log-probs'
    forward unless the first training forward is reused for them."""
    passes = [Pass("train", tokens, tokens)] * epochs + [Pass("forward", tokens, tokens)]
    return passes if reuse_old_forward else passes + [Pass("forward", tokens, tokens)]


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, seq_len: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of K and V in the cache at `seq_len` positions: 2 · layers · kv_heads · head_dim · seq_len · batch ·
    dtype bytes."""
    return 2 * layers * kv_heads * head_dim * seq_len * batch * dtype_bytes


def decode_floor_seconds(weight_bytes: int, cfg, prompt_len: int, steps: int, batch: int, dtype_bytes: int,
                         bandwidth_gbs: float) -> float:
    """The bandwidth floor of decode steps k = 1..steps (step k attends over prompt_len + k positions): Σ (weight
    bytes + KV bytes) / bandwidth."""
    kv = sum(kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg), prompt_len + k, batch,
                            dtype_bytes) for k in range(1, steps + 1))
    return (steps * weight_bytes + kv) / (bandwidth_gbs * 1e9)


# ------------------------------------------------------------------------------------------------ device limits

def table_lookup(name: str, table):
    up = name.upper()
    for words, value in table:
        if all(w in up for w in words):
            return value
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device, dtype, size: int, repeats: int) -> float:
    """The best of `repeats` timed size×size matmuls (after one untimed): 2·size³ FLOPs each."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e12


def measure_bandwidth_gbs(device, mbytes: int, repeats: int) -> float:
    """The best of `repeats` timed copies (read + write: 2 × bytes) and sums (read: bytes) of a float32 tensor of
    `mbytes` MiB (larger than the caches), in GB/s."""
    import torch

    n = mbytes * 2 ** 20 // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    x.sum()
    best = 0.0
    for _ in range(repeats):
        for moved, fn in ((2 * x.nbytes, lambda: y.copy_(x)), (x.nbytes, lambda: x.sum())):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best = max(best, moved / (time.perf_counter() - t) / 1e9)
    return best


def peak_tflops(ns, device, compute: str) -> tuple[float, str]:
    import torch

    if ns.peak_tflops:
        return ns.peak_tflops, "given"
    if device.type == "cuda":
        known = table_lookup(torch.cuda.get_device_name(device), GPU_PEAK_TFLOPS)
        if known is not None:
            return known[compute], "table"
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    size = ns.peak_size if device.type == "cpu" else max(ns.peak_size, 8192)   # a GPU needs a big one to fill up
    return measure_matmul_tflops(device, dtype, size, ns.repeats), "measured"


def bandwidth(ns, device) -> tuple[float, str]:
    import torch

    if ns.bandwidth_gbs:
        return ns.bandwidth_gbs, "given"
    if device.type == "cuda":
        known = table_lookup(torch.cuda.get_device_name(device), GPU_BANDWIDTH_GBS)
        if known is not None:
            return known, "table"
    mbytes = ns.bandwidth_mbytes if device.type == "cpu" else max(ns.bandwidth_mbytes, 1024)
    return measure_bandwidth_gbs(device, mbytes, ns.repeats), "measured"


# ------------------------------------------------------------------------------------------------ set-up

def build_model(cfg, device, dtype, seed: int = 0):
    """Qwen2ForCausalLM with random weights, on `device` in `dtype`."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def word_tokenizer(n_words: int):
    """A word-level tokenizer: "w0".."w{n-1}" are one token each (so text of k words is k tokens), EOS, pad, unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>")


class TokenCounter:
    """Counts the tokens the model body receives (a forward pre-hook on the backbone). The hook is a plain function
    (deepcopy keeps functions as they are), so copies of the model made afterwards, e.g. a trainer's frozen
    reference, share it and count too."""

    def __init__(self, model):
        self.tokens = 0

        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None:
                ids = args[0] if args else kwargs["inputs_embeds"][..., 0]
            self.tokens += ids.numel()

        model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def words(rng, n: int, n_words: int) -> str:
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))


@dataclass
class Setting:
    """What every workload needs: the shape, device, precision, sizes."""
    cfg: object
    device: object
    dtype: object           # the weights' dtype
    mixed_precision: str    # the trainers' autocast: "no" or "bf16"
    batch: int
    seq_len: int
    prompt_len: int
    warmup: int
    steps: int
    ppo_epochs: int
    out: str                # a scratch folder

    @property
    def n_words(self) -> int:
        return min(self.cfg.vocab_size - 3, 1000)


def _timed(device, warmup: int, steps: int, step, counter: TokenCounter) -> tuple[float, int]:
    """Run `warmup` untimed then `steps` timed calls of `step(i)` -> (seconds, fed tokens of the timed steps)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    fed0, t = counter.tokens, time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return time.perf_counter() - t, counter.tokens - fed0


# ------------------------------------------------------------------------------------------------ workloads

def run_sft(s: Setting) -> dict:
    """SFT steps: `token_nll` -> loss -> backward -> `optimizer_step` (SFTTrainer.train()'s loop body)."""
    import torch

    from alignloop.losses import masked_sum
    from alignloop.models.fast import speed_up
    from alignloop.trainers.sft import SFTConfig, token_nll
    from alignloop.training import optimizer_step
    from alignloop.training.run import prepare_run, setup_optimization

    model = build_model(s.cfg, s.device, s.dtype)
    counter = TokenCounter(model)
    n = s.batch * (s.warmup + s.steps)
    args = SFTConfig(model="synthetic", train_file="synthetic", output_dir=os.path.join(s.out, "sft"),
                     per_device_batch_size=s.batch, max_length=s.seq_len, mixed_precision=s.mixed_precision,
                     lr_scheduler="constant", learning_rate=1e-5, tensorboard=False, progress=False)
    run = prepare_run(args, "sft")
    acc = run.accelerator
    speed_up(model)
    opt = setup_optimization(args, run, model.to(acc.device), n, "sft")
    model, optimizer, scheduler = opt.model, opt.optimizer, opt.scheduler
    model.train()
    g = torch.Generator().manual_seed(0)
    B, T, P = s.batch, s.seq_len, s.prompt_len
    ids = torch.randint(3, s.n_words + 3, (s.warmup + s.steps, B, T), generator=g).to(acc.device)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    loss_mask[:, P:] = True                               # completion-only loss: targets after the prompt
    n_targets = int(loss_mask[:, 1:].sum())
    fixed = {"attention_mask": torch.ones(B, T, dtype=torch.long), "position_ids": torch.arange(T).expand(B, T),
             "loss_mask": loss_mask}
    fixed = {k: v.to(acc.device) for k, v in fixed.items()}

    def step(i: int) -> None:
        batch = {"input_ids": ids[i], **fixed, "packed": False}
        with acc.autocast():
            nll, mask = token_nll(model, batch)
            loss = masked_sum(nll, mask) / n_targets
            acc.backward(loss)
        optimizer_step(acc, model, optimizer, scheduler, args.max_grad_norm)

    seconds, fed = _timed(s.device, s.warmup, s.steps, step, counter)
    return {"seconds": seconds, "steps": s.steps, "tokens": B * T * s.steps, "fed_tokens": fed,
            "passes": sft_passes(B, T) * s.steps, "batch": B, "seq_len": T}


def run_dpo(s: Setting) -> dict:
    """DPO steps: `DPOTrainer.pair_terms` (policy + on-the-fly reference) -> backward -> `optimizer_step`."""
    import random

    from alignloop.models.fast import CPU_SDPA, is_wide
    from alignloop.models.logps import lm_head_parts
    from alignloop.trainers.dpo import DPOConfig, DPOTrainer
    from alignloop.training import optimizer_step
    from alignloop.training.run import setup_optimization

    model = build_model(s.cfg, s.device, s.dtype)
    counter = TokenCounter(model)
    tok = word_tokenizer(s.n_words)
    rng = random.Random(0)
    n = s.batch * (s.warmup + s.steps)
    completion = s.seq_len - s.prompt_len - 1             # + EOS = seq_len tokens per sequence
    rows = [{"prompt": words(rng, s.prompt_len, s.n_words), "chosen": words(rng, completion, s.n_words),
             "rejected": words(rng, completion, s.n_words)} for _ in range(n)]
    args = DPOConfig(output_dir=os.path.join(s.out, "dpo"), beta=0.1, per_device_batch_size=s.batch,
                     max_length=s.seq_len, learning_rate=1e-6, lr_scheduler="constant", precompute_ref_logps=False,
                     ref_cache_dir="none", save_final=False, progress=False, tensorboard=False,
                     mixed_precision=s.mixed_precision)
    trainer = DPOTrainer(model=model, tokenizer=tok, args=args, train_dataset=rows)
    acc, examples = trainer.accelerator, trainer.train_examples
    opt = setup_optimization(args, trainer.run, trainer.model, n, "dpo", wrap=False)
    optimizer, scheduler = opt.optimizer, opt.scheduler
    trainer.model.train()

    # The trainer's layout (DPOTrainer's packing / share_prompt rules): is each pair's prompt run once?
    packed = (args.packing == "on" or (args.packing == "auto" and is_wide(trainer.model))) and \
        lm_head_parts(trainer.model) is not None
    impl = getattr(trainer.model.config, "_attn_implementation", None)
    shared = packed and args.share_prompt and impl in ("sdpa", "eager", CPU_SDPA)

    def pair_tokens(ex: dict) -> tuple[int, int]:
        c, r, p = ex["chosen_input_ids"], ex["rejected_input_ids"], ex["prompt_length"]
        share = shared and p >= 1 and c[:p] == r[:p] and len(c) > p and len(r) > p
        return len(c) + len(r) - (p if share else 0), (len(c) - p) + (len(r) - p)

    def step(i: int) -> None:
        mb = list(range(i * s.batch, (i + 1) * s.batch))
        terms = trainer.pair_terms(examples, mb)
        (terms[0].sum() / len(mb)).backward()
        optimizer_step(acc, trainer.model, optimizer, scheduler, args.max_grad_norm)

    seconds, fed = _timed(s.device, s.warmup, s.steps, step, counter)
    timed = range(s.warmup * s.batch, n)
    tokens = sum(pair_tokens(examples[j])[0] for j in timed)
    completion_tokens = sum(pair_tokens(examples[j])[1] for j in timed)
    return {"seconds": seconds, "steps": s.steps, "tokens": tokens, "fed_tokens": fed,
            "passes": dpo_passes(tokens, completion_tokens), "batch": s.batch, "seq_len": s.seq_len,
            "pairs_per_s": s.batch * s.steps / seconds, "packed": packed, "shared_prompt": shared}


class FixedRollout:
    """A `Sampler` that returns the same synthetic rollout each time: `batch` prompts of `prompt_len` tokens, every
    response `response_len` tokens (no padding; the last token EOS)."""

    def __init__(self, batch: int, prompt_len: int, response_len: int, n_words: int, eos_id: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.prompt_ids = torch.randint(3, n_words + 3, (batch, prompt_len), generator=g)
        self.response_ids = torch.randint(3, n_words + 3, (batch, response_len), generator=g)
        self.response_ids[:, -1] = eos_id
        self.logprobs = -torch.rand(batch, response_len, generator=g) * 5

    def generate(self, prompts_token_ids, params):
        import torch

        from alignloop.rollout import Rollout

        B = self.prompt_ids.shape[0]
        assert len(prompts_token_ids) == B, (len(prompts_token_ids), B)
        return Rollout(prompt_ids=self.prompt_ids.clone(), prompt_mask=torch.ones_like(self.prompt_ids, dtype=bool),
                       response_ids=self.response_ids.clone(),
                       response_mask=torch.ones_like(self.response_ids, dtype=bool),
                       logprobs=self.logprobs.clone(), policy_logprobs=self.logprobs.clone(),
                       stopped=torch.ones(B, dtype=torch.bool), pad_token_id=1)


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A cheap deterministic reward (the benchmark times the training step, not the scorer)."""
    return [float(len(c) % 7) - 3.0 for c in completions]


def run_ppo(s: Setting) -> dict:
    """PPO updates through `PPOTrainer.train()` on a fixed rollout; time = the updates' `time/train`."""
    import random

    from alignloop.trainers.ppo import PPOConfig, PPOTrainer

    model = build_model(s.cfg, s.device, s.dtype)
    counter = TokenCounter(model)
    tok = word_tokenizer(s.n_words)
    rng = random.Random(0)
    B, P, R = s.batch, s.prompt_len, s.seq_len - s.prompt_len
    updates = s.warmup + s.steps
    cfg = PPOConfig(output_dir=os.path.join(s.out, "ppo"), rollout_batch_size=B, total_updates=updates,
                    max_new_tokens=R, max_prompt_length=P, num_ppo_epochs=s.ppo_epochs, num_mini_batches=1,
                    learning_rate=1e-6, lr_scheduler="constant", tensorboard=False, progress=False,
                    save_final=False, sample_every=0, seed=0, mixed_precision=s.mixed_precision)
    fed_after: list[int] = []
    trainer = PPOTrainer(model=model, reward=length_reward, args=cfg, tokenizer=tok,
                         train_dataset=[words(rng, P, s.n_words) for _ in range(B)],
                         sampler=FixedRollout(B, P, R, s.n_words, tok.eos_token_id),
                         callbacks=[lambda exp: fed_after.append(counter.tokens)])
    _sync(s.device)
    history = trainer.train().history
    timed = history[s.warmup:]
    seconds = sum(m["time/train"] for m in timed)
    reuse = cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1
    tokens = B * (P + R)
    return {"seconds": seconds, "steps": s.steps, "tokens": tokens * s.steps,
            "fed_tokens": fed_after[-1] - fed_after[s.warmup - 1] if s.warmup else fed_after[-1],
            "passes": ppo_passes(tokens, s.ppo_epochs, reuse) * s.steps, "batch": B, "seq_len": P + R,
            "ppo_epochs": s.ppo_epochs, "old_logprobs_reuse_first_forward": reuse,
            "episodes_per_s": B * s.steps / seconds}


def run_decode(s: Setting, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """HFSampler decode: per-step times through `on_step`; the prefill and the first token are not timed."""
    import torch

    from alignloop.rollout import HFSampler, SamplingParams

    model = build_model(s.cfg, s.device, s.dtype)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, s.n_words + 3, (batch, prompt_len), generator=g).tolist()
    sampler = HFSampler(model)
    never = s.cfg.vocab_size            # an id the model cannot emit: every row decodes all new tokens

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, temperature=1.0, eos_token_id=never, pad_token_id=0)

    sampler.generate(prompts, params(min(new_tokens, 8)))           # warm-up: kernels, allocator
    stamps: list[float] = []

    def on_step(tokens, alive) -> None:
        _sync(s.device)
        stamps.append(time.perf_counter())

    rollout = sampler.generate(prompts, params(new_tokens), on_step=on_step)
    assert int(rollout.response_mask.sum()) == batch * new_tokens, "a row stopped early"
    steps = len(stamps) - 1
    return {"decode_seconds": stamps[-1] - stamps[0], "decode_steps": steps, "decode_tokens": batch * steps,
            "decode_batch": batch, "decode_prompt_len": prompt_len, "new_tokens": new_tokens}


# ------------------------------------------------------------------------------------------------ figures

def train_figures(r: dict, n_params: int, cfg, peak: float) -> dict:
    passes = r.pop("passes")
    flops = model_flops(passes, n_params)
    head = lm_head_flops(passes, cfg.vocab_size, cfg.hidden_size)
    accounted = sum(p.tokens for p in passes)
    return {**r, "tokens_per_s": r["tokens"] / r["seconds"], "flops_per_token": flops / r["tokens"],
            "model_flops": flops, "lm_head_flops": head, "accounted_tokens": accounted,
            "achieved_tflops": flops / r["seconds"] / 1e12, "mfu": flops / r["seconds"] / (peak * 1e12),
            "mfu_with_lm_head": (flops + head) / r["seconds"] / (peak * 1e12), "goal_mfu": GOAL_MFU}


def decode_figures(r: dict, cfg, n_params: int, dtype_bytes: int, bw: float) -> dict:
    weight_bytes = (n_params + cfg.vocab_size * cfg.hidden_size) * dtype_bytes
    floor = decode_floor_seconds(weight_bytes, cfg, r["decode_prompt_len"], r["decode_steps"], r["decode_batch"],
                                 dtype_bytes, bw)
    return {**r, "decode_tokens_per_s": r["decode_tokens"] / r["decode_seconds"],
            "floor_tokens_per_s": r["decode_tokens"] / floor, "floor_seconds": floor,
            "decode_efficiency": floor / r["decode_seconds"], "weight_bytes": weight_bytes,
            "kv_bytes_last_step": kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg),
                                                 r["decode_prompt_len"] + r["decode_steps"], r["decode_batch"],
                                                 dtype_bytes),
            "goal_decode_efficiency": GOAL_DECODE}


def print_table(lines: list[dict], head: dict, out=None) -> None:
    out = out if out is not None else sys.stderr
    print(f"\n{head['device']} ({head['device_name']}, {head['threads']} threads), shape {head['shape']}, "
          f"{head['dtype']}{' + bf16 autocast' if head['mixed_precision'] == 'bf16' else ''}; "
          f"N = {head['params']:,} non-embedding parameters ({head['params_total']:,} in all)", file=out)
    train = [x for x in lines if x["workload"] in TRAIN_WORKLOADS]
    if train:
        print(f"peak {head['peak_tflops']:.4g} TFLOP/s ({head['peak_source']})", file=out)
        print(f"{'workload':<8} {'tokens/s':>11} {'FLOPs/token':>12} {'TFLOP/s':>9} {'MFU':>7} {'+LM head':>9}"
              f"   goal (GPU)", file=out)
        for x in train:
            print(f"{x['workload']:<8} {x['tokens_per_s']:>11.1f} {x['flops_per_token'] / x['params']:>10.0f}·N "
                  f"{x['achieved_tflops']:>9.4f} {x['mfu']:>7.1%} {x['mfu_with_lm_head']:>9.1%}   "
                  f"MFU ≥ {GOAL_MFU:.0%}", file=out)
    for x in lines:
        if x["workload"] == "decode":
            print(f"bandwidth {x['bandwidth_gbs']:.4g} GB/s ({x['bandwidth_source']}); decode batch "
                  f"{x['decode_batch']}, prompt {x['decode_prompt_len']}, {x['new_tokens']} new tokens", file=out)
            print(f"{'decode':<8} {x['decode_tokens_per_s']:>11.1f} tokens/s, floor {x['floor_tokens_per_s']:.1f} "
                  f"tokens/s: {x['decode_efficiency']:.1%} of the floor   goal (GPU) ≥ {GOAL_DECODE:.0%}", file=out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: sft, dpo, ppo, decode")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["bf16", "fp32", "autocast"], default=None,
                   help="bf16 weights (default on a GPU), fp32 (default on a CPU), or fp32 weights under bf16 autocast")
    p.add_argument("--batch", type=int, help="SFT rows / DPO pairs / PPO rollouts per step")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (prompt + completion)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens of each DPO pair / PPO rollout / SFT row")
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on a GPU, 1 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on a GPU, 2 on a CPU)")
    p.add_argument("--decode-batch", type=int)
    p.add_argument("--decode-prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--peak-tflops", type=float, help="the device's peak (TFLOP/s) in the compute dtype")
    p.add_argument("--bandwidth-gbs", type=float, help="the device's memory bandwidth (GB/s)")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size when the peak is measured")
    p.add_argument("--bandwidth-mbytes", type=int, default=256, help="tensor size (MiB) when bandwidth is measured")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each peak / bandwidth measurement")
    ns = p.parse_args(argv)
    ns.workloads = [w.strip() for w in ns.workloads.split(",") if w.strip()]
    bad = [w for w in ns.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}")
    sizes = DEFAULT_SIZES[ns.shape]
    for name, default in zip(("batch", "seq_len", "prompt_len", "decode_batch", "decode_prompt_len", "new_tokens"),
                             sizes, strict=True):
        if getattr(ns, name) is None:
            setattr(ns, name, default)
    if not 1 <= ns.prompt_len <= ns.seq_len - 2:
        p.error("--prompt-len must leave at least 2 completion tokens within --seq-len")
    if (ns.steps is not None and ns.steps < 1) or (ns.warmup is not None and ns.warmup < 0):
        p.error("--steps must be at least 1 and --warmup at least 0")
    if ns.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token comes with the prefill)")
    return ns


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ns = parse_args(argv)
    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    device = torch.device("cuda" if ns.device == "cuda" or (ns.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    precision = ns.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    compute = "fp32" if precision == "fp32" else "bf16"
    warmup = ns.warmup if ns.warmup is not None else (2 if device.type == "cuda" else 1)
    steps = ns.steps if ns.steps is not None else (5 if device.type == "cuda" else 2)
    cfg = shape_config(ns.shape)
    n_params = non_embedding_params(cfg)
    total_params = n_params + cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    head = {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "threads": torch.get_num_threads(), "shape": ns.shape, "dtype": str(dtype).split(".")[-1],
            "mixed_precision": "bf16" if precision == "autocast" else "no", "compute_dtype": compute,
            "params": n_params, "params_total": total_params, "params_counted": "non-embedding"}
    train = [w for w in ns.workloads if w in TRAIN_WORKLOADS]
    if train:
        head["peak_tflops"], head["peak_source"] = peak_tflops(ns, device, compute)
    if "decode" in ns.workloads:
        head["bandwidth_gbs"], head["bandwidth_source"] = bandwidth(ns, device)

    lines = []
    with tempfile.TemporaryDirectory() as out:
        s = Setting(cfg, device, dtype, head["mixed_precision"], ns.batch, ns.seq_len, ns.prompt_len, warmup, steps,
                    ns.ppo_epochs, out)
        for w in ns.workloads:
            if w == "decode":
                r = run_decode(s, ns.decode_batch, ns.decode_prompt_len, ns.new_tokens)
                r = decode_figures(r, cfg, n_params, torch.finfo(dtype).bits // 8, head["bandwidth_gbs"])
                line = {"workload": w, **{k: v for k, v in head.items() if not k.startswith("peak")}, **r}
            else:
                r = {"sft": run_sft, "dpo": run_dpo, "ppo": run_ppo}[w](s)
                line = {"workload": w, **{k: v for k, v in head.items() if not k.startswith("bandwidth")},
                        **train_figures(r, n_params, cfg, head["peak_tflops"])}
            if device.type == "cuda":
                line["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                torch.cuda.reset_peak_memory_stats(device)
            print(json.dumps(line), flush=True)
            lines.append(line)
            gc.collect()                                  # the workload's models, optimizer state, accelerator
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(lines, head)
    return lines


if __name__ == "__main__":
    main()
