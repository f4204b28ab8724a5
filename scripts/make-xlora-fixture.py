#!/usr/bin/env python3
"""Builds the X-LoRA fixtures in tests/fixtures/xlora/ (read by tests/xlora.rs).

Each case is an X-LoRA checkpoint made by PEFT (`peft.tuners.xlora`) on the
shared tiny llama model, mixing its two `lora_mix` adapters (`code`, `chat`)
with a classifier of random weights (scaled up so that the scalings differ
from token to token and layer to layer), saved as PEFT saves it
(`adapter_config.json` with peft_type XLORA, `adapter_model.safetensors`
with the classifier), with the two adapters copied into sub-folders named
by the config's `adapters` keys ("0" is `code`, "1" is `chat`). `expected.json` holds what PEFT computes:

    input_ids   the base fixture's prompt (24 tokens)
    logits      every position's logits, one forward without a KV cache
    scalings    get_latest_scalings() of that forward: per token, per
                adapted module (in PEFT's module order), per adapter
    greedy      `prompt` (the first 12 ids) and 8 greedy tokens, each chosen
                by a full forward over everything before it (X-LoRA runs
                without a KV cache), with the top-2 margin of each choice

The cases:

    layerwise   classifier of depth 2 (hidden 32, dropout 0.2: eval mode),
                per-layer scalings, softmax at temperature 0.7, scaling
                pass value 0.5 (adapters active during the scaling pass)
    topk        classifier of depth 1, one scaling for every layer, no
                softmax, top_k_lora 1 with enable_softmax_topk, scaling
                pass value 0, global_scaling_weight 0.8
    phi3        the shared tiny phi3 model (fused qkv_proj and gate_up_proj,
                o_proj built before qkv_proj) with two experts made here
                (random A and B, init_lora_weights=False): "0" on qkv_proj
                and down_proj only, "1" on all four modules, so the
                classifier's modules are the union of the experts'; depth
                1, per-layer scalings, softmax

CI never runs this script; it only reads the committed files. To rebuild
them (CPU or GPU, seconds), where torch, transformers and peft are
installed:

    python3 scripts/make-xlora-fixture.py --shared ../shared/fixtures \
        --out tests/fixtures/xlora
"""

import argparse
import json
import os
import shutil

import torch
from peft import LoraConfig, XLoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

# name: (base folder under the shared fixtures, experts, options)
CASES = {
    "layerwise": ("llama", None, dict(
        xlora_depth=2,
        xlora_size=32,
        xlora_dropout_p=0.2,
        layerwise_scalings=True,
        enable_softmax=True,
        softmax_temperature=0.7,
        scaling_pass_value=0.5,
        global_scaling_weight=1.0,
    )),
    "topk": ("llama", None, dict(
        xlora_depth=1,
        layerwise_scalings=False,
        enable_softmax=False,
        top_k_lora=1,
        enable_softmax_topk=True,
        scaling_pass_value=0.0,
        global_scaling_weight=0.8,
    )),
    "phi3": ("phi3", {"0": ["qkv_proj", "down_proj"], "1": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]},
             dict(xlora_depth=1, layerwise_scalings=True, enable_softmax=True)),
}
# PEFT names the adapters it loads "0", "1", ... and activates them by the
# keys of `adapters`: any other keys leave them inactive (peft 0.21), so
# the keys are the indices, and the checkpoint's sub-folders carry them.
ADAPTERS = {"0": "code", "1": "chat"}
CLASSIFIER_GAIN = 6.0
PROMPT = 12
NEW_TOKENS = 8


def rounded(t, digits=6):
    return [round(float(v), digits) for v in t.reshape(-1)]


def make_experts(base, out, targets):
    """Random PEFT LoRA adapters on `base`, one per entry of `targets`."""
    for k, modules in targets.items():
        torch.manual_seed(77 + int(k))
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)
        pm = get_peft_model(m, cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.2)
        pm.save_pretrained(os.path.join(out, k))
        os.remove(os.path.join(out, k, "README.md"))


def build(shared, out, name, base_name, targets, options):
    llama = os.path.join(shared, base_name)
    with open(os.path.join(llama, "expected.json")) as f:
        input_ids = json.load(f)["input_ids"]
    if targets is None:
        sources = {k: os.path.join(llama, "lora_mix", a) for k, a in ADAPTERS.items()}
    else:
        made = os.path.join(out, f".{name}-experts")
        shutil.rmtree(made, ignore_errors=True)
        make_experts(llama, made, targets)
        sources = {k: os.path.join(made, k) for k in targets}
    torch.manual_seed(1234 + len(name))
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        base_logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    # X-LoRA recomputes every position at every step: PEFT refuses a cache.
    model.config.use_cache = False
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=model.config.hidden_size,
        adapters=sources,
        **options,
    )
    xm = get_peft_model(model, config)
    xm.eval()
    classifier = xm.base_model.internal_xlora_classifier
    with torch.no_grad():
        for p in classifier.parameters():
            p.mul_(CLASSIFIER_GAIN)

    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = xm(input_ids=ids).logits[0]
        scalings = xm.base_model.get_latest_scalings()[0]
    n_tokens, n_modules, n_adapters = scalings.shape

    cur = ids[:, :PROMPT]
    tokens, margins = [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = xm(input_ids=cur).logits[0, -1]
            top = torch.topk(last, 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            cur = torch.cat([cur, top.indices[:1].view(1, 1)], dim=1)

    case = os.path.join(out, name)
    if os.path.exists(case):
        shutil.rmtree(case)
    xm.save_pretrained(case)
    # PEFT 0.21 writes each adapter again (with every adapter's tensors in
    # it) and a model card; the checkpoint carries the originals instead.
    os.remove(os.path.join(case, "README.md"))
    for k, src in sources.items():
        shutil.rmtree(os.path.join(case, k), ignore_errors=True)
        shutil.copytree(src, os.path.join(case, k))
    # Its classifier file also loses every layer whose Sequential index is
    # an adapter name ("layers.0", "layers.1"): written here in full, under
    # the keys PEFT gives the ones it keeps.
    state = {
        f"base_model.internal_xlora_classifier.{k}": v.contiguous()
        for k, v in classifier.state_dict().items()
    }
    save_file(state, os.path.join(case, "adapter_model.safetensors"), metadata={"format": "pt"})
    # The saved config names the adapters by the paths they were loaded
    # from; the checkpoint carries them in sub-folders instead, as
    # published X-LoRA checkpoints do.
    cfg_path = os.path.join(case, "adapter_config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["adapters"] = {k: k for k in sources}
    with open(cfg_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)

    # Read back: a fresh X-LoRA model of the saved config (other random
    # classifier weights) given the saved classifier file must compute the
    # same logits. (PeftModel.from_pretrained cannot be used: peft 0.21
    # looks the adapters up by their keys as hub ids.)
    torch.manual_seed(99)
    fresh = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    fresh.config.use_cache = False
    with open(os.path.join(case, "adapter_config.json")) as f:
        saved = json.load(f)
    again = get_peft_model(
        fresh,
        XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=saved["hidden_size"],
            adapters={k: os.path.join(case, k) for k in saved["adapters"]},
            **{k: saved[k] for k in options},
        ),
    )
    again.eval()
    prefix = "base_model.internal_xlora_classifier."
    loaded = load_file(os.path.join(case, "adapter_model.safetensors"))
    again.base_model.internal_xlora_classifier.load_state_dict(
        {k[len(prefix) :]: v for k, v in loaded.items()}, strict=True
    )
    with torch.no_grad():
        reread = (again(input_ids=ids).logits[0] - logits).abs().max().item()
    assert reread < 1e-5, f"{name}: the saved checkpoint computes other logits ({reread})"
    print(f"{name}: the saved checkpoint, read back, moves the logits by {reread:.2e}")

    expected = {
        "case": name,
        "options": options,
        "classifier_gain": CLASSIFIER_GAIN,
        "base": base_name,
        "adapters": ADAPTERS if targets is None else targets,
        "input_ids": input_ids,
        "vocab": logits.shape[-1],
        "logits": rounded(logits),
        "n_modules": n_modules,
        "n_adapters": n_adapters,
        "scalings": rounded(scalings),
        "greedy": {
            "prompt": input_ids[:PROMPT],
            "tokens": tokens,
            "min_top2_margin": min(margins),
        },
        "files": sorted(os.listdir(case)),
    }
    with open(os.path.join(case, "expected.json"), "w") as f:
        json.dump(expected, f)
    spread = scalings.std(dim=0).mean().item()
    moved = (logits - base_logits).abs().max().item()
    assert moved > 1e-2, f"{name}: the adapters changed no logit ({moved})"
    print(
        f"{name}: scalings {tuple(scalings.shape)} range "
        f"{scalings.min().item():.3f}..{scalings.max().item():.3f}, "
        f"per-token std {spread:.3f}; logits moved {moved:.3f} from the base; greedy {tokens}, min margin {min(margins):.4f}; "
        f"files {expected['files']}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", required=True, help="the shared fixtures folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for name, (base, targets, options) in CASES.items():
        build(args.shared, args.out, name, base, targets, options)


if __name__ == "__main__":
    main()
