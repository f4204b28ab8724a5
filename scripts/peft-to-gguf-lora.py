#!/usr/bin/env python3
"""Convert a Hugging Face PEFT LoRA adapter to a llama.cpp GGUF LoRA adapter.

Usage:
    peft-to-gguf-lora.py PEFT_DIR BASE_HF_DIR OUT.gguf

PEFT_DIR holds adapter_config.json and adapter_model.safetensors. BASE_HF_DIR
holds the base model's config.json. Only its architecture and head counts are
read, not its weights. Supported base architectures: LlamaForCausalLM (GGUF arch
"llama") and Qwen2ForCausalLM (GGUF arch "qwen2").

The output is meant to match what llama.cpp's own convert_lora_to_gguf.py writes
with its default `--outtype f32`. This script is a standalone reimplementation
that needs only the `gguf` package (llama.cpp's gguf-py) and numpy; it does not
need torch or transformers:

  * KV metadata, in this order:
      general.architecture          string   "llama" / "qwen2"
      general.type                  string   "adapter"
      adapter.type                  string   "lora"
      general.name                  string   (gguf.Metadata heuristics on PEFT_DIR,
                                              falling back to BASE_HF_DIR's name)
      adapter.lora.alpha            float32  lora_alpha from adapter_config.json
      general.quantization_version  uint32   2
    general.file_type is absent, because the LoRA converter overrides
    set_gguf_parameters.
  * One pair per adapted linear layer: "<base gguf name>.lora_a" and
    "<base gguf name>.lora_b", for example blk.0.attn_q.weight.lora_a.
    Both are F32. The numpy shapes are the PEFT shapes, A = (r, n_in) and
    B = (n_out, r), so the GGML dims are lora_a ne = [n_in, r] and
    lora_b ne = [r, n_out].
  * For "llama", the rows of attn_q/attn_k lora_b get the same HF->GGUF
    rotary permutation as the base q/k weights (n_head for q, n_kv_head for k).
    lora_a is left as it is, because permuting the rows of B*A is the same as
    permuting the rows of B. "qwen2" is not permuted.

llama.cpp uses scale = adapter_scale * alpha / rank at load time, with
rank = lora_b ne[0]. If alpha == 0 it uses scale = adapter_scale.

The outputs of this script are committed as test fixtures:
tests/fixtures/lora/llama-lora.gguf (from /work/shared/fixtures/llama/lora)
and tests/fixtures/lora/qwen2-lora.gguf (from /work/shared/fixtures/qwen2/lora).
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import gguf

# HF base architecture -> (GGUF arch name, permute q/k like convert_hf_to_gguf's LlamaModel)
ARCHES = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}

# HF projection module -> GGUF tensor kind
PROJ = {
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}

PEFT_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])\.weight$"
)

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a .safetensors file and return every tensor as a float32 array.
    The keys are sorted, in the same order as safetensors.safe_open().keys()."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    base = 8 + hlen
    out: dict[str, np.ndarray] = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        start, end = info["data_offsets"]
        buf = raw[base + start:base + end]
        dt = info["dtype"]
        if dt == "BF16":
            u16 = np.frombuffer(buf, dtype="<u2").astype(np.uint32)
            arr = (u16 << 16).view(np.float32)
        elif dt in ST_DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(ST_DTYPES[dt]).newbyteorder("<"))
        else:
            raise SystemExit(f"{name}: unsupported safetensors dtype {dt}")
        out[name] = arr.astype(np.float32).reshape(info["shape"])
    return out


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF rotary row order: (n_head, 2, hd/2, ...) -> (n_head, hd/2, 2, ...)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.split("\n\n")[1])
    peft_dir, base_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    lcfg = json.loads((peft_dir / "adapter_config.json").read_text())
    bcfg = json.loads((base_dir / "config.json").read_text())

    if lcfg.get("peft_type", "LORA") != "LORA":
        raise SystemExit(f"not a LoRA adapter: peft_type={lcfg.get('peft_type')}")
    # These cannot be expressed with one adapter.lora.alpha / (alpha / rank) scale.
    # llama.cpp's converter ignores them without a warning; here they are refused.
    for key in ("use_rslora", "use_dora"):
        if lcfg.get(key):
            raise SystemExit(f"{key}=true is not representable in GGUF LoRA")
    if lcfg.get("alpha_pattern"):
        raise SystemExit("per-module alpha_pattern is not representable in GGUF LoRA")
    if lcfg.get("fan_in_fan_out"):
        raise SystemExit("fan_in_fan_out=true adapters are not supported")
    if lcfg.get("alora_invocation_tokens") or lcfg.get("invocation_string"):
        raise SystemExit("aLoRA adapters are not supported by this script")

    hf_arch = bcfg["architectures"][0]
    if hf_arch not in ARCHES:
        raise SystemExit(f"unsupported base architecture {hf_arch!r}; known: {sorted(ARCHES)}")
    model_arch, undo_permute = ARCHES[hf_arch]
    n_head = int(bcfg["num_attention_heads"])
    n_kv_head = int(bcfg.get("num_key_value_heads") or n_head)
    alpha = float(lcfg["lora_alpha"])

    tensors = read_safetensors(peft_dir / "adapter_model.safetensors")

    # Pair A and B by base name, in the order the base names first appear.
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        m = PEFT_RE.match(name)
        if m is None:
            raise SystemExit(f"unexpected tensor in adapter: {name}")
        bid, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        gname = gguf.TENSOR_NAMES[PROJ[proj]].format(bid=bid) + ".weight"
        pairs.setdefault(gname, {})[ab] = arr

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[model_arch])  # general.architecture
    for gname, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise SystemExit(f"{gname}: missing lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise SystemExit(f"{gname}: bad shapes A{a.shape} B{b.shape}")
        if undo_permute:
            if ".attn_q." in gname:
                b = permute_rows(b, n_head)
            elif ".attn_k." in gname:
                b = permute_rows(b, n_kv_head)
        writer.add_tensor(gname + ".lora_a", np.ascontiguousarray(a, dtype=np.float32),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.add_tensor(gname + ".lora_b", np.ascontiguousarray(b, dtype=np.float32),
                          raw_dtype=gguf.GGMLQuantizationType.F32)

    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # general.name and friends: llama.cpp runs gguf.Metadata over the adapter directory
    # and falls back to the base model directory's name.
    total_params = writer.get_total_parameter_count()[0]
    meta = gguf.Metadata.load(None, peft_dir, None, total_params)
    if meta.name is None:
        meta.name = base_dir.name
    meta.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out_path}: arch={gguf.MODEL_ARCH_NAMES[model_arch]} alpha={alpha} "
          f"pairs={len(pairs)} permuted_qk={undo_permute}")


if __name__ == "__main__":
    main()
