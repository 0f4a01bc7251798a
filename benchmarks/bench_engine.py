"""Engine throughput against transformers' `generate` on the same checkpoint, in one run.

  .venv/bin/python benchmarks/bench_engine.py [--preset small] [--prompt-len 64] [--new-tokens 32]

Makes the preset model (FP8, seed 0) if needed; transformers gets the dequantized float32 copy (its FP8 path
needs a GPU, and its CPU dequantization gets partial blocks wrong), so both compute the same numbers in fp32.
Prefill tokens/s = B * prompt_len / t(generate 1 token); decode tokens/s = B * (N - 1) / (t(N) - t(1)), the
same method for both, each time the best of `--repeats` runs with the two engines interleaved. Also measures
this machine's float32 matmul throughput and the fraction of it that the engine's decode reaches (FLOPs per
token counted from the config: the active parameters plus attention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.format.config import ModelConfig  # noqa: E402
from services.format.convert import dequantize_checkpoint  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402


def matmul_gflops(n: int = 1024, reps: int = 20, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """2 x active weights touched per token, plus absorbed attention over `context` cached tokens."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    q = (cfg.q_lora_rank * h + nh * cfg.qk_head_dim * cfg.q_lora_rank) if cfg.q_lora_rank else nh * cfg.qk_head_dim * h
    attn = q + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * h + nh * cfg.v_head_dim * h
    absorb = nh * cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # W_UK into q, W_UV after
    scores = nh * context * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # q.k over latent+rope, p.v over latent
    dense = 3 * h * cfg.intermediate_size
    moe = (
        3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts) + cfg.n_routed_experts * h
    )
    per_layer = [attn + absorb + scores + (moe if cfg.is_moe_layer(i) else dense) for i in range(cfg.num_hidden_layers)]
    return 2.0 * (sum(per_layer) + cfg.vocab_size * h)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def engine_runner(engine: Engine, batch: int, prompt_len: int):
    ids = prompts(batch, prompt_len, engine.cfg.vocab_size).tolist()
    return lambda n: engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True))


def hf_runner(model, batch: int, prompt_len: int, vocab: int):
    ids = prompts(batch, prompt_len, vocab).to(model.device)

    def run(n):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def measure(runners: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Best of `repeats` for each runner, the runners interleaved within each repeat so that both see the same
    machine (this shared 2-core VM drifts by +-15% over minutes). -> {name: (prefill tok/s, decode tok/s)}."""
    for run in runners.values():
        run(2)  # warm-up
    t1 = {name: float("inf") for name in runners}
    tn = dict(t1)
    for _ in range(repeats):
        for name, run in runners.items():
            t1[name] = min(t1[name], timed(lambda run=run: run(1)))
            tn[name] = min(tn[name], timed(lambda run=run: run(new_tokens)))
    return {name: (batch * prompt_len / t1[name], batch * (new_tokens - 1) / (tn[name] - t1[name])) for name in runners}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--cache-dir", default=".cache/bench")
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="compute dtypes to run, both engines alike (float32: the parity dtype; bfloat16: the checkpoint's)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per figure")
    ap.add_argument("--json", dest="json_out", help="also write the figures to this file")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="both engines on this device (cuda: the engine's experts stay FP8 in bfloat16; float32 "
        "dequantizes them per call)",
    )
    args = ap.parse_args()
    from services.math.device import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    threads = torch.get_num_threads()

    cache = Path(args.cache_dir)
    src, dense = cache / f"{args.preset}-fp8", cache / f"{args.preset}-f32"
    if not (src / "config.json").exists():
        write_random_model(src, preset_config(args.preset), seed=0)
    if not (dense / "config.json").exists():
        dequantize_checkpoint(src, dense, torch.float32)
    cfg = ModelConfig.from_file(src)

    from transformers import DeepseekV3ForCausalLM

    peak = matmul_gflops(device=device)
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        engine = Engine.from_dir(
            src,
            dtype=dtype,
            device=device,
            cache_tokens=max(8192, 40 * (args.prompt_len + args.new_tokens)),
            prefix_caching=False,  # every repeat computes its prompts, as transformers does
        )
        hf = DeepseekV3ForCausalLM.from_pretrained(dense, dtype=dtype).to(device).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        rows = []
        for b in (int(x) for x in args.batches.split(",")):
            got = measure(
                {
                    "engine": engine_runner(engine, b, args.prompt_len),
                    "transformers": hf_runner(hf, b, args.prompt_len, cfg.vocab_size),
                },
                b,
                args.prompt_len,
                args.new_tokens,
                args.repeats,
            )
            (e_pre, e_dec), (h_pre, h_dec) = got["engine"], got["transformers"]
            context = args.prompt_len + args.new_tokens // 2
            frac = e_dec * decode_flops_per_token(cfg, context) / 1e9 / peak
            rows.append(
                dict(
                    batch=b,
                    engine_prefill_tok_s=e_pre,
                    hf_prefill_tok_s=h_pre,
                    engine_decode_tok_s=e_dec,
                    hf_decode_tok_s=h_dec,
                    decode_speedup=e_dec / h_dec,
                    prefill_speedup=e_pre / h_pre,
                    engine_decode_fraction_of_matmul_peak=frac,
                )
            )
        del engine, hf
        results.append({"dtype": dtype_name, "rows": rows})
        print(
            f"\npreset {args.preset}, {dtype_name} on {device}: {n_params / 1e6:.1f}M parameters, "
            f"prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, {threads} threads; float32 matmul peak {peak:.1f} GFLOP/s (1024^3)"
        )
        print(
            "| batch | prefill tok/s engine | transformers | ratio | decode tok/s engine | transformers | ratio "
            "| engine decode, % of fp32 matmul peak |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['batch']} | {r['engine_prefill_tok_s']:.0f} | {r['hf_prefill_tok_s']:.0f} | "
                f"{r['prefill_speedup']:.2f}x | {r['engine_decode_tok_s']:.1f} | {r['hf_decode_tok_s']:.1f} | "
                f"{r['decode_speedup']:.2f}x | {100 * r['engine_decode_fraction_of_matmul_peak']:.1f}% |"
            )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"matmul_gflops": peak, "threads": threads, "device": str(device), "results": results}, indent=2)
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
