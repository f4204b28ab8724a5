#!/usr/bin/env python3
"""Writes the reference numbers for LoRA training (tests/fixtures/train):
for each tiny fixture model, a random PEFT adapter, the cross-entropy loss
of a fixed sequence under it, the gradient of that loss with respect to
every LoRA tensor (PyTorch autograd), and the adapter after three AdamW
steps (torch.optim.AdamW).

Usage: make-train-fixtures.py FIXTURES_DIR OUT_DIR
  FIXTURES_DIR holds <arch>/{config.json,model.safetensors,expected.json}
  (the shared tiny models). Needs torch, transformers, peft and safetensors;
  run once, the output is committed (CI does not install torch).

Everything is float32, eager attention, one thread, deterministic.
"""
import json, os, sys
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

src, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "phi"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
RANK, ALPHA = 4, 8
# Loss on the tokens from this index on (HF shifts labels by one inside).
FIRST_TARGET = 8
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
STEPS = 3


def peft_key(name):
    # "…q_proj.lora_A.default.weight" is saved as "…q_proj.lora_A.weight".
    return name.replace(".default.weight", ".weight")


for i, arch in enumerate(ARCHS):
    d = os.path.join(src, arch)
    expected = json.load(open(os.path.join(d, "expected.json")))
    ids = torch.tensor([expected["input_ids"]])
    labels = ids.clone()
    labels[0, :FIRST_TARGET] = -100
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    # rsLoRA on one family, so its scale (alpha / sqrt(r)) is covered too.
    rslora = arch == "qwen3"
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, use_rslora=rslora,
                     target_modules=TARGETS.get(arch, LLAMA_TARGETS), init_lora_weights=False)
    model = get_peft_model(base, cfg)
    model.eval()  # no dropout anywhere; gradients still flow
    g = torch.Generator().manual_seed(5101 + i)
    params = sorted((n, p) for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dst = os.path.join(out, arch)
    model.save_pretrained(dst)

    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {peft_key(n): p.grad.detach().clone().contiguous() for n, p in params}
    save_file(grads, os.path.join(dst, "grads.safetensors"))

    opt = torch.optim.AdamW([p for _, p in params], **ADAMW)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        l = model(input_ids=ids, labels=labels).loss
        losses.append(l.item())
        l.backward()
        opt.step()
    with torch.no_grad():
        final = model(input_ids=ids, labels=labels).loss.item()
    save_file({peft_key(n): p.detach().clone().contiguous() for n, p in params},
              os.path.join(dst, "after_adamw.safetensors"))
    json.dump({
        "arch": arch,
        "input_ids": expected["input_ids"],
        "first_target": FIRST_TARGET,
        "loss": loss.item(),
        "lora": {"r": RANK, "lora_alpha": ALPHA, "use_rslora": rslora, "init_seed": 5101 + i,
                 "init": "A, B ~ N(0, 0.1^2) in sorted parameter-name order"},
        "adamw": {**ADAMW, "betas": list(ADAMW["betas"]), "steps": STEPS,
                  "losses": losses, "final_loss": final},
        "torch": torch.__version__,
    }, open(os.path.join(dst, "expected.json"), "w"), indent=1)
    print(arch, "loss", round(loss.item(), 5), "after AdamW", round(final, 5))
