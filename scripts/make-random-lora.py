#!/usr/bin/env python3
"""Writes a random PEFT LoRA adapter for a GGUF or Hugging Face base, for
benchmarks (the cost of adapters at real shapes, not their quality).

Usage: make-random-lora.py OUT_DIR --hidden H --ffn F --layers L --heads NH
       --kv-heads NKV [--head-dim D] [--rank 16] [--alpha 32] [--seed 0]

Targets all seven projections of a Llama-style layer. Needs numpy only.
"""
import argparse, json, os, struct
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--hidden", type=int, required=True)
p.add_argument("--ffn", type=int, required=True)
p.add_argument("--layers", type=int, required=True)
p.add_argument("--heads", type=int, required=True)
p.add_argument("--kv-heads", type=int, required=True)
p.add_argument("--head-dim", type=int)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--alpha", type=float, default=32)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
hd = a.head_dim or a.hidden // a.heads
q, kv = a.heads * hd, a.kv_heads * hd
shapes = {  # module: (in, out)
    "self_attn.q_proj": (a.hidden, q), "self_attn.k_proj": (a.hidden, kv),
    "self_attn.v_proj": (a.hidden, kv), "self_attn.o_proj": (q, a.hidden),
    "mlp.gate_proj": (a.hidden, a.ffn), "mlp.up_proj": (a.hidden, a.ffn),
    "mlp.down_proj": (a.ffn, a.hidden),
}
rng = np.random.default_rng(a.seed)
tensors = {}
for i in range(a.layers):
    for m, (n_in, n_out) in shapes.items():
        base = f"base_model.model.model.layers.{i}.{m}"
        tensors[f"{base}.lora_A.weight"] = (rng.standard_normal((a.rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        tensors[f"{base}.lora_B.weight"] = (rng.standard_normal((n_out, a.rank)) * 0.01).astype(np.float32)
header, off, blobs = {}, 0, []
for name in sorted(tensors):
    t = tensors[name]
    b = t.tobytes()
    header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
    off += len(b)
    blobs.append(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
os.makedirs(a.out, exist_ok=True)
with open(os.path.join(a.out, "adapter_model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in blobs:
        f.write(b)
with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": a.rank, "lora_alpha": a.alpha, "bias": "none",
               "target_modules": [m.split(".")[1] for m in shapes]}, f, indent=1)
print(f"{a.out}: rank {a.rank}, {len(tensors)} tensors, {off / 2**20:.1f} MiB")
