#!/usr/bin/env python3
"""Builds the RoPE-scaling fixtures in tests/fixtures/rope/ (read by tests/rope.rs).

Each fixture is a tiny random-weight model of a supported family whose
config uses one of the RoPE scalings real checkpoints use, saved as a
Hugging Face folder (config.json, model.safetensors, tokenizer files) and as
a GGUF file (model.gguf) with llama.cpp's names, layouts and metadata keys,
plus expected.json: what transformers computes for it (float32, eager
attention, one thread) at sequences longer than the original context.

    llama3          Llama 3.1/3.2 "llama3" scaling (GGUF: rope_freqs.weight)
    qwen2-yarn      Qwen2.5 long-context YaRN (GGUF: rope.scaling.type yarn)
    phi3-longrope   Phi-3/3.5 LongRoPE, long and short factor sets
                    (GGUF: rope_factors_long/short.weight, rope.scaling.attn_factor)
    gemma3-linear   Gemma 3 4B+ layout: linear factor 8 on the global layers,
                    sliding layers on base 10000 without scaling

CI never runs this script; it only reads the committed files. To rebuild them
(CPU only, about a minute):

    python3 -m venv /tmp/rope-venv
    /tmp/rope-venv/bin/pip install torch transformers safetensors gguf numpy
    /tmp/rope-venv/bin/python scripts/make-rope-fixtures.py \
        --shared ../shared/fixtures --out tests/fixtures/rope

The GGUF files were checked once against llama.cpp's own
convert_hf_to_gguf.py (vendored in the llama-cpp-python 0.3.36 sdist, with
the GPT-2 vocabulary patches the shared fixtures describe) run on the same
folders with --outtype bf16: same tensors, bit for bit, and the same metadata
but for general.name/size_label/type/quantization_version and the extra
gemma3.attention.sliding_window_pattern written here (llama.cpp otherwise
assumes a period of 6).

`--shared` is the reference fixture folder: its tokenizer/ is copied into
every model folder and its llama GGUF gives the tokenizer metadata.
The versions used are recorded in each expected.json.

Weights: transformers' own init (normal, std 0.2), then norm weights drawn
from U(0.5, 1.5) (Gemma: stored w from U(0, 1), sandwich post-norms from
U(0.5, 2.5)) and biases from N(0, 0.1^2), as the shared fixtures do; every
value is rounded to bfloat16 and saved as bfloat16, so the float32 reference
runs on exactly the stored numbers. Seeds are tried from `seed` in steps of
1000 until the greedy continuation has no special token, at least 4
distinct ids and a top-1/top-2 margin of at least 0.02 at every step.

expected.json holds one entry per run: `input_ids` (random ids after BOS),
`context` (the context a runtime must be loaded with: LongRoPE picks its
factor set by it), `rows` (positions whose logits are recorded), `logits`
[rows][vocab], `greedy` (8 ids from generate() with the KV cache, checked
against full recomputation), `greedy_min_margin`, and `control`: the largest
logit change at `rows` when the scaling is replaced by the mistake it guards
against (plain RoPE; for LongRoPE the other factor set; for Gemma 3 the
global scaling also on the sliding layers), showing the test can fail.
Numbers are rounded to 6 significant digits.
"""

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 512
GREEDY = 8

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=3,
    tie_word_embeddings=True,
)

# Phi-3-style factor sets for 16 frequencies: short ones near 1, long ones
# growing towards the low frequencies (as in the published checkpoints).
SHORT = [round(1.0 + 0.02 * i, 4) for i in range(16)]
LONG = [round(1.0 + 5.0 * (i / 15) ** 2, 4) for i in range(16)]

CASES = [
    dict(
        name="llama3",
        model_type="llama",
        seed=3101,
        theta=10000.0,
        scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        # As Llama 3.1/3.2 checkpoints ship: transformers 4.x keys.
        layout="legacy",
        runs=[dict(n=160, context=256)],
    ),
    dict(
        name="qwen2-yarn",
        model_type="qwen2",
        seed=3102,
        theta=10000.0,
        scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        # transformers 5 `rope_parameters`.
        layout="v5",
        runs=[dict(n=200, context=256)],
    ),
    dict(
        name="phi3-longrope",
        model_type="phi3",
        seed=3103,
        theta=10000.0,
        scaling=dict(type="longrope", short_factor=SHORT, long_factor=LONG),
        extra=dict(original_max_position_embeddings=64, tie_word_embeddings=False),
        layout="legacy",
        # Past the original context (long factors) and within it (short).
        runs=[dict(n=160, context=256), dict(n=48, context=64)],
    ),
    dict(
        name="gemma3-linear",
        model_type="gemma3_text",
        seed=3104,
        theta=1_000_000.0,
        local_theta=10000.0,
        scaling=dict(rope_type="linear", factor=8.0),
        extra=dict(
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            query_pre_attn_scalar=32,
            hidden_activation="gelu_pytorch_tanh",
        ),
        layout="legacy",
        runs=[dict(n=160, context=256)],
    ),
]


def r6(x):
    return float(f"{float(x):.6g}")


def rope_parameters(case, scaling, local_scaling=None):
    """transformers 5 `rope_parameters` for a case with `scaling` on the global layers."""
    glob = dict(scaling, rope_theta=case["theta"])
    if "type" in glob:
        glob["rope_type"] = glob.pop("type")
    if case["model_type"] != "gemma3_text":
        return glob
    local = dict(local_scaling or {"rope_type": "default"}, rope_theta=case["local_theta"])
    return {"full_attention": glob, "sliding_attention": local}


def make_config(case, scaling, local_scaling=None):
    kw = dict(COMMON, **case.get("extra", {}))
    kw["rope_parameters"] = rope_parameters(case, scaling, local_scaling)
    return AutoConfig.for_model(case["model_type"], **kw)


def build(case, seed):
    cfg = make_config(case, case["scaling"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gemma = case["model_type"].startswith("gemma")
    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                if gemma and ("post_attention_layernorm" in name or "post_feedforward_layernorm" in name):
                    lo, hi = 0.5, 2.5
                elif gemma:
                    lo, hi = 0.0, 1.0
                else:
                    lo, hi = 0.5, 1.5
                p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def logits_of(model, ids):
    with torch.no_grad():
        x = torch.tensor([ids])
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]


def greedy_of(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=GREEDY,
            min_new_tokens=GREEDY,
            use_cache=True,
            pad_token_id=3,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids):].tolist()
    margins = []
    for step in out.logits:
        top = torch.topk(step[0], 2).values
        margins.append(float(top[0] - top[1]))
    # The cache must not change the result: recompute every step in full.
    seq = list(ids)
    for t in tokens:
        assert int(torch.argmax(logits_of(model, seq)[-1])) == t, "cached greedy differs"
        seq.append(t)
    return tokens, min(margins)


def controls(case, model):
    """Models with the same weights and the scaling replaced by a mistake."""
    out = {}
    sd = model.state_dict()

    def variant(scaling, local_scaling=None):
        m = AutoModelForCausalLM.from_config(
            make_config(case, scaling, local_scaling), attn_implementation="eager", dtype=torch.float32
        )
        m.load_state_dict(sd)
        return m.eval()

    out["plain RoPE"] = variant({"rope_type": "default"})
    sc = case["scaling"]
    if sc.get("type") == "longrope":
        out["short factors throughout"] = variant(dict(sc, long_factor=sc["short_factor"]))
        out["long factors throughout"] = variant(dict(sc, short_factor=sc["long_factor"]))
    if case["model_type"] == "gemma3_text":
        out["global scaling on sliding layers"] = variant(sc, local_scaling=sc)
    return out


def rewrite_config(case, folder):
    """The config.json layout real checkpoints of this family ship with."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if case["layout"] == "legacy":
        params = cfg.pop("rope_parameters")
        glob = params["full_attention"] if "full_attention" in params else params
        scaling = {k: v for k, v in glob.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if "type" in case["scaling"]:
            scaling["type"] = scaling.pop("rope_type")
        if "original_max_position_embeddings" in cfg:
            # Phi-3 keeps it at the top level only.
            scaling.pop("original_max_position_embeddings", None)
        cfg["rope_theta"] = glob["rope_theta"]
        cfg["rope_scaling"] = scaling
        if "full_attention" in params:
            cfg["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def permute(w, n_head):
    """llama.cpp's q/k row order for interleaved-pair RoPE (convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(sc, theta, dim):
    """convert_hf_to_gguf LlamaModel.generate_extra_tensors."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi, old = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"], sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(case, model, path, tokenizer_gguf):
    cfg = model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3", "gemma3_text": "gemma3"}[case["model_type"]]
    w = gguf.GGUFWriter(str(path), arch)
    n_head, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sc = case["scaling"]
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(case["theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "phi3":
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(hd)
    if arch == "qwen2":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(sc["factor"])
        w.add_rope_scaling_orig_ctx_len(sc["original_max_position_embeddings"])
    if arch == "phi3":
        # Phi3MiniModel writes no scaling type: the factor tensors say it.
        orig = cfg.rope_parameters["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_dimension_count(hd)
        w.add_sliding_window(0)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
    if arch == "gemma3":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(sc["factor"])
        w.add_rope_freq_base_swa(case["local_theta"])
        w.add_sliding_window(cfg.sliding_window)
        # Not written upstream (llama.cpp assumes a period of 6): the layout.
        w.add_array("gemma3.attention.sliding_window_pattern", [t == "sliding_attention" for t in cfg.layer_types])

    for field in tokenizer_gguf.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)

    gemma = arch == "gemma3"
    norm_shift = 1.0 if gemma else 0.0

    def put(name, t):
        a = t.detach().to(torch.float32).numpy()
        if a.ndim == 1:
            w.add_tensor(name, (a + norm_shift if name.endswith("norm.weight") else a).astype(np.float32))
        else:
            w.add_tensor(name, gguf.quantize(a, gguf.GGMLQuantizationType.BF16), raw_dtype=gguf.GGMLQuantizationType.BF16)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if arch == "llama":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(sc, case["theta"], hd))
    if arch == "phi3":
        w.add_tensor("rope_factors_long.weight", np.array(sc["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(sc["short_factor"], dtype=np.float32))
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "post_attention_layernorm": "post_attention_norm" if gemma else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for key in sorted(k for k in sd if k.startswith(prefix)):
            part, suffix = key[len(prefix):].rsplit(".", 1)
            t = sd[key]
            if arch == "llama" and part == "self_attn.q_proj":
                t = permute(t, n_head)
            if arch == "llama" and part == "self_attn.k_proj":
                t = permute(t, n_kv)
            put(f"blk.{i}.{names[part]}.{suffix}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make(case, shared, out_root):
    out = out_root / case["name"]
    tok_gguf = gguf.GGUFReader(str(shared / "llama" / "model-f32.gguf"))
    for attempt in range(50):
        seed = case["seed"] + 1000 * attempt
        model = build(case, seed)
        runs, ok = [], True
        for run in case["runs"]:
            g = torch.Generator().manual_seed(seed + run["n"])
            ids = [0] + torch.randint(4, VOCAB, (run["n"] - 1,), generator=g).tolist()
            tokens, margin = greedy_of(model, ids)
            if margin < 0.02 or any(t < 4 for t in tokens) or len(set(tokens)) < 4:
                ok = False
                break
            runs.append(dict(run, ids=ids, greedy=tokens, margin=margin))
        if ok:
            break
    else:
        raise SystemExit(f"{case['name']}: no acceptable seed")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # A copy: casting the model itself would round its RoPE buffers too.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    rewrite_config(case, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shared / "tokenizer" / f, out / f)
    write_gguf(case, model, out / "model.gguf", tok_gguf)

    # The committed folder, reloaded, is the reference of record; it must
    # agree bit for bit with the model it was saved from.
    ref = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    ctrl = controls(case, ref)
    expected = dict(
        name=case["name"],
        seed=seed,
        scaling=case["scaling"],
        versions=dict(
            torch=torch.__version__,
            transformers=transformers.__version__,
            safetensors=safetensors.__version__,
            tokenizers=tokenizers.__version__,
            gguf=getattr(gguf, "__version__", "0.19.0"),
        ),
        runs=[],
    )
    for run in runs:
        ids, n = run["ids"], run["n"]
        full = logits_of(ref, ids)
        if not torch.equal(full, logits_of(model, ids)):
            raise SystemExit("reloaded folder differs")
        orig = case["scaling"].get("original_max_position_embeddings", 64)
        rows = sorted({0, min(orig, n) - 1, min(orig, n - 1), n // 2, n - 2, n - 1})
        control = {
            what: r6((logits_of(m, ids)[rows] - full[rows]).abs().max())
            for what, m in ctrl.items()
        }
        expected["runs"].append(
            dict(
                context=run["context"],
                input_ids=ids,
                rows=rows,
                logits=[[r6(v) for v in full[r].tolist()] for r in rows],
                greedy=run["greedy"],
                greedy_min_margin=r6(run["margin"]),
                control=control,
            )
        )
        print(f"{case['name']}: n={n} context={run['context']} seed={seed} "
              f"|logit|max={float(full[rows].abs().max()):.2f} margin={run['margin']:.3f} control={control}")
    (out / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/fixtures"))
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/rope"))
    ap.add_argument("--only", help="build just this fixture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for case in CASES:
        if args.only in (None, case["name"]):
            make(case, args.shared, args.out)


if __name__ == "__main__":
    main()
