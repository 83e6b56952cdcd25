"""Is a frozen 4-bit (NF4) base faster or slower than fp32 on this CPU, and how much smaller? (QLoRA §3)

A stack trains on a frozen base, so every step runs the base forward and backward to its inputs, never
to its weights. In NF4 (ministacks.lm.quant) each of the seven projections of a layer rebuilds its fp32
weight from the 4-bit codes twice a step, once in the forward and once in the backward (the weight is
never stored between the two: that is the memory saving), so a step pays

    2 dequantizations (a table lookup and a multiply per weight)  +  the same 2 matmuls as fp32

per projection. `bench_nf4` times `repeats` interleaved rounds of (see bench/timing.py; no warm-up round:
the median of 5 leaves out the first, slow one):
  proj_fp32 / proj_nf4     the seven projections of every layer alone, backward to their inputs: where the
                           4-bit cost shows, since nothing else dilutes it
  model_fp32 / model_nf4   the whole decoder, loss backward to the embeddings' output (where adapters in
                           layer 0 need their gradient): what a stack-training step pays
  dequant                  dequantizing every projection once
and counts the bytes of the projections and of the whole model, fp32 against NF4 (embeddings, norms and
the LM head stay fp32, as in QLoRA). Ratios are nf4 / fp32.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..lm.model import ModelConfig, Transformer
from ..lm.quant import DEFAULT_BLOCKSIZE, TARGET_MODULES, model_nbytes, quantize_model
from .timing import time_interleaved


def bench_nf4(cfg: ModelConfig | None = None, batch_size: int = 16, seq_len: int = 256, repeats: int = 5,
              blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False, seed: int = 0) -> dict:
    """Forward + backward of a frozen base, fp32 vs NF4, in one process, on the model of `cfg` (default:
    the quick preset's shapes, d=256, d_ff=704, 4 layers, vocabulary 4096) at batch x seq tokens.

    Two timings, because they answer different questions:
      - `proj`: the seven projections of every layer alone, backward to their inputs: where the 4-bit
        cost shows (two dequantizations per layer per step, against two matmuls);
      - `model`: the whole decoder, loss backward to the embeddings' output (as adapters in layer 0
        need it), base frozen: what a stack-training step pays.
    And memory: the seven projections and the whole model, fp32 vs NF4. Ratios are nf4 / fp32."""
    cfg = cfg or ModelConfig()  # the quick preset's model (presets.QUICK.model)
    torch.manual_seed(seed)
    base = Transformer(cfg).eval().requires_grad_(False)
    nf4 = quantize_model(copy.deepcopy(base), blocksize=blocksize, double_quant=double_quant)
    projections = {name: [m for n, m in model.named_modules() if n.endswith(TARGET_MODULES)]
                   for name, model in (("fp32", base), ("nf4", nf4))}  # q, k, v, o, gate, up, down per layer

    g = torch.Generator().manual_seed(seed)
    tokens = batch_size * seq_len
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
    x_d, x_o = torch.randn(2, tokens, cfg.d_model, generator=g)  # inputs of q/k/v/gate/up, of o_proj
    x_ff = torch.randn(tokens, cfg.ff_dim, generator=g)  # input of down_proj

    def proj_step(layers):
        xd, xo, xff = (t.clone().requires_grad_(True) for t in (x_d, x_o, x_ff))
        total = 0.0
        for i in range(0, len(layers), 7):
            q, k, v, o, gate, up, down = layers[i:i + 7]
            total = total + sum(m(xd).sum() for m in (q, k, v, gate, up)) + o(xo).sum() + down(xff).sum()
        total.backward()

    def model_step(model):
        # the embeddings' output becomes a leaf that wants a gradient, as an adapter's input would
        hook = model.embed_tokens.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
        try:
            model(ids, labels=ids).loss.backward()
        finally:
            hook.remove()

    timed = time_interleaved({"proj_fp32": lambda: proj_step(projections["fp32"]),
                              "proj_nf4": lambda: proj_step(projections["nf4"]),
                              "model_fp32": lambda: model_step(base), "model_nf4": lambda: model_step(nf4),
                              "dequant": lambda: [m.dequantize_weight() for m in projections["nf4"]]}, repeats)
    ms = {k: 1e3 * t for k, t in timed.median.items()}  # milliseconds
    proj_bytes = {"fp32": sum(m.weight.numel() * 4 for m in projections["fp32"]),
                  "nf4": sum(m.nf4_weight().nbytes() for m in projections["nf4"])}
    model_bytes = {"fp32": model_nbytes(base), "nf4": model_nbytes(nf4)}
    return {
        "config": dataclasses.asdict(cfg), "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
        "threads": torch.get_num_threads(), "double_quant": double_quant,
        "ms": {k: v for k, v in ms.items() if k != "dequant"},  # medians of forward + backward
        "dequant_ms": ms["dequant"],  # dequantizing every projection once (a step does it twice)
        "proj_ratio": ms["proj_nf4"] / ms["proj_fp32"], "model_ratio": ms["model_nf4"] / ms["model_fp32"],
        "bits_per_weight": projections["nf4"][0].nf4_weight().bits_per_weight(),
        "proj_bytes": proj_bytes, "model_bytes": model_bytes,
        "proj_bytes_ratio": proj_bytes["nf4"] / proj_bytes["fp32"],
        "model_bytes_ratio": model_bytes["nf4"] / model_bytes["fp32"],
    }


def format_bench_nf4(d: dict) -> str:
    c, ms, mib = d["config"], d["ms"], 2**20
    tok = d["batch_size"] * d["seq_len"]
    return "\n".join([
        "NF4 vs fp32 frozen base: forward + backward to the inputs (no weight gradients)",
        f"  model     {c['n_layer']} layers, d_model {c['d_model']}, vocab {c['vocab_size']}; "
        f"7 projections a layer in NF4{' + double quant' if d['double_quant'] else ''}",
        f"  batch     {d['batch_size']} x {d['seq_len']} tokens, {d['repeats']} interleaved rounds, "
        f"{d['threads']} threads, medians",
        f"  projections only   fp32 {ms['proj_fp32']:6.0f} ms   nf4 {ms['proj_nf4']:6.0f} ms   "
        f"nf4/fp32 {d['proj_ratio']:.2f}   ({tok / ms['proj_nf4'] * 1e3:,.0f} tok/s nf4)",
        f"  whole model        fp32 {ms['model_fp32']:6.0f} ms   nf4 {ms['model_nf4']:6.0f} ms   "
        f"nf4/fp32 {d['model_ratio']:.2f}",
        f"  dequantizing all projections once: {d['dequant_ms']:.1f} ms (twice per training step)",
        f"  memory    projections {d['proj_bytes']['fp32'] / mib:.1f} -> "
        f"{d['proj_bytes']['nf4'] / mib:.2f} MiB "
        f"({d['bits_per_weight']:.3f} bits/weight, x{d['proj_bytes_ratio']:.3f}); whole model "
        f"{d['model_bytes']['fp32'] / mib:.1f} -> {d['model_bytes']['nf4'] / mib:.1f} MiB "
        f"(x{d['model_bytes_ratio']:.2f}: embeddings and norms stay fp32)",
    ])


if __name__ == "__main__":
    print(format_bench_nf4(bench_nf4()))
