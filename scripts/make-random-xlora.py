#!/usr/bin/env python3
"""Writes a random X-LoRA checkpoint (PEFT's layout) for a Llama-style
base, for benchmarks (the cost of learned mixing at real shapes, not its
quality): N random rank-R experts on all seven projections (made by
make-random-lora.py, in sub-folders "0", "1", ...) and a random classifier.

Usage: make-random-xlora.py OUT_DIR --hidden H --ffn F --layers L --heads NH
       --kv-heads NKV [--experts 2] [--rank 16] [--depth 1] [--size 64]
       [--layerwise]

Needs numpy only.
"""
import argparse, json, os, struct, subprocess, sys
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("out")
for k in ["hidden", "ffn", "layers", "heads", "kv-heads"]:
    p.add_argument(f"--{k}", type=int, required=True)
p.add_argument("--experts", type=int, default=2)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--depth", type=int, default=1)
p.add_argument("--size", type=int, default=64)
p.add_argument("--layerwise", action="store_true")
a = p.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
for e in range(a.experts):
    subprocess.run([sys.executable, os.path.join(here, "make-random-lora.py"), os.path.join(a.out, str(e)),
                    "--hidden", str(a.hidden), "--ffn", str(a.ffn), "--layers", str(a.layers),
                    "--heads", str(a.heads), "--kv-heads", str(a.kv_heads), "--rank", str(a.rank),
                    "--seed", str(100 + e)], check=True)
modules = 7 * a.layers
outputs = a.experts * (modules if a.layerwise else 1)
widths = [a.hidden] + [a.size] * (a.depth - 1) + [outputs]
rng = np.random.default_rng(7)
tensors, index = {}, 0
for i in range(a.depth):
    n_in, n_out = widths[i], widths[i + 1]
    pre = f"base_model.internal_xlora_classifier.layers.{index}"
    tensors[f"{pre}.weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    tensors[f"{pre}.bias"] = np.zeros(n_out, np.float32)
    index += 2  # a ReLU follows each hidden layer, as in PEFT's Sequential
header, off, blobs = {}, 0, []
for name in sorted(tensors):
    b = tensors[name].tobytes()
    header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(b)]}
    off += len(b)
    blobs.append(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(a.out, "adapter_model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in blobs:
        f.write(b)
with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "XLORA", "hidden_size": a.hidden,
               "adapters": {str(e): str(e) for e in range(a.experts)},
               "xlora_depth": a.depth, "xlora_size": a.size, "layerwise_scalings": a.layerwise,
               "enable_softmax": True, "softmax_temperature": 1.0, "scaling_pass_value": 0.0,
               "global_scaling_weight": 1.0, "xlora_dropout_p": 0.0}, f, indent=1)
print(f"{a.out}: {a.experts} experts of rank {a.rank}, classifier {widths}")
