#!/usr/bin/env python3
"""Training references from PyTorch for tests/train_*.rs (grows with the training issue).

- cross-entropy with label smoothing (torch.nn.CrossEntropyLoss(label_smoothing=0.1)) on random
  logits: tests/fixtures/train/ce_{logits,labels,loss,grad}.npy (labels stored as float32);
- parameter gradients of the tiny timm models of tests/fixtures/timm/ (per-block and shared
  relative-position BEiT, ViT) under that loss on their bundled input, labels [1, 4, 7, 2]:
  tests/fixtures/train/<name>_grads.safetensors (timm's parameter names) and <name>_loss.npy;
- 4 AdamW fine-tuning steps of the tiny BEiT as MOOD fine-tunes it (param groups without weight
  decay for 1-D / bias / token tensors, the relative-position tables decayed, layer-wise lr decay 0.75, BEiT's cosine_scheduler with
  2 warmup steps, clip_grad_norm_ 0.5, label smoothing 0.1, weight decay 0.05, base lr 2e-3):
  tiny_beit_adamw_params.safetensors and tiny_beit_adamw_lrs.npy; the same steps in float64
  (stored as float32): tiny_beit_adamw_params_f64.safetensors, the reference the test uses, since
  AdamW's m/sqrt(v) magnifies f32 summation-order noise in tiny gradients to ~1e-4 (printed);
- masked image modelling on the tiny BEiT: masked patches replaced by a mask token, final `norm`,
  a linear `mim_head` on the masked tokens, MSE against per-patch normalised pixels (unbiased var,
  eps 1e-6): tiny_beit_mim_{mask,loss}.npy, tiny_beit_mim_init.safetensors (mask token, norm, head)
  and tiny_beit_mim_grads.safetensors;
- MOS's group-softmax loss on random logits: mos_{logits,labels,loss,grad}.npy;
- ODIN (T = 1000, eps = 0.0014; LSO's sign rule, zero gradient -> +1) through the tiny BEiT on its
  bundled input: tiny_beit_odin.npy.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from timm.models.beit import Beit  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TIMM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "timm")
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, num_classes=10)
MODELS = {
    "tiny_beit": lambda: Beit(**TINY, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1),
    "tiny_beit_shared_relpos": lambda: Beit(**TINY, use_abs_pos_emb=False, use_rel_pos_bias=False,
                                            use_shared_rel_pos_bias=True, init_values=0.1),
    "tiny_vit": lambda: VisionTransformer(**TINY),
}

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "train")


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(6, 10, generator=g)).requires_grad_(True)
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    loss.backward()
    np.save(os.path.join(OUT, "ce_logits.npy"), logits.detach().numpy().astype(np.float32))
    np.save(os.path.join(OUT, "ce_labels.npy"), labels.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "ce_loss.npy"), np.array([loss.item()], dtype=np.float32))
    np.save(os.path.join(OUT, "ce_grad.npy"), logits.grad.numpy().astype(np.float32))
    print(f"cross-entropy (label smoothing 0.1): {loss.item():.6f}")

    for name, make in MODELS.items():
        model = make().eval()  # eval: no dropout / drop-path, the same forward as inference
        model.load_state_dict(load_file(os.path.join(TIMM, f"{name}.safetensors")), strict=False)
        x = torch.from_numpy(np.load(os.path.join(TIMM, f"{name}_input.npy")))
        loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(model(x), torch.tensor([1, 4, 7, 2]))
        loss.backward()
        grads = {k: p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None}
        save_file(grads, os.path.join(OUT, f"{name}_grads.safetensors"))
        np.save(os.path.join(OUT, f"{name}_loss.npy"), np.array([loss.item()], dtype=np.float32))
        print(f"{name}: loss {loss.item():.6f}, {len(grads)} parameter gradients")
    adamw_f64()
    mim_grads()
    group_softmax()
    odin()


def layer_id(name, depth):
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return depth + 1
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def adamw_steps(dtype=torch.float32, suffix=""):
    depth, steps, base, final, warmup = 2, 4, 2e-3, 1e-5, 2
    model = MODELS["tiny_beit"]().eval()
    model.load_state_dict(load_file(os.path.join(TIMM, "tiny_beit.safetensors")), strict=False)
    model = model.to(dtype)
    groups = []
    for name, p in model.named_parameters():
        # MOOD's optim_factory: the 2-D relative-position tables are decayed
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        scale = 0.75 ** (depth + 1 - layer_id(name, depth))
        groups.append({"params": [p], "weight_decay": 0.0 if no_decay else 0.05, "lr_scale": scale})
    opt = torch.optim.AdamW(groups, lr=base, betas=(0.9, 0.999), eps=1e-8)
    warm = np.linspace(0, base, warmup)
    iters = np.arange(steps - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    lrs = np.concatenate((warm, cos))
    x = torch.from_numpy(np.load(os.path.join(TIMM, "tiny_beit_input.npy"))).to(dtype)
    y = torch.tensor([1, 4, 7, 2])
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lrs[step] * g["lr_scale"]
        opt.zero_grad()
        loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        print(f"adamw {dtype} step {step}: lr {lrs[step]:.3e}, loss {loss.item():.6f}")
    params = {k: p.detach().float().contiguous() for k, p in model.named_parameters()}
    save_file(params, os.path.join(OUT, f"tiny_beit_adamw_params{suffix}.safetensors"))
    np.save(os.path.join(OUT, "tiny_beit_adamw_lrs.npy"), lrs.astype(np.float32))
    return params


def adamw_f64():
    f32 = adamw_steps()
    f64 = adamw_steps(torch.float64, "_f64")
    worst = max(((f32[k] - f64[k]).abs() / f64[k].abs().clamp(min=1e-2)).max().item() for k in f64)
    print(f"AdamW steps: torch float32 vs float64, worst relative weight error {worst:.2e}")


def mim_grads():
    g = torch.Generator().manual_seed(11)
    model = MODELS["tiny_beit"]().eval()
    model.load_state_dict(load_file(os.path.join(TIMM, "tiny_beit.safetensors")), strict=False)
    d, p, gsz = 48, 8, 16
    extra = {
        "mask_token": torch.nn.Parameter(0.5 * torch.randn(d, generator=g)),
        "norm.weight": torch.nn.Parameter(1 + 0.2 * torch.randn(d, generator=g)),
        "norm.bias": torch.nn.Parameter(0.1 * torch.randn(d, generator=g)),
        "mim_head.weight": torch.nn.Parameter(0.15 * torch.randn(3 * p * p, d, generator=g)),
        "mim_head.bias": torch.nn.Parameter(0.1 * torch.randn(3 * p * p, generator=g)),
    }
    x = torch.from_numpy(np.load(os.path.join(TIMM, "tiny_beit_input.npy")))
    b = x.shape[0]
    mask = torch.zeros(b, gsz, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(gsz, generator=g)[:6]] = True
    t = model.patch_embed(x)  # [B, G, D]
    w = mask.unsqueeze(-1).float()
    t = t * (1 - w) + extra["mask_token"] * w
    t = torch.cat((model.cls_token.expand(b, -1, -1), t), dim=1)
    for blk in model.blocks:
        t = blk(t, shared_rel_pos_bias=None)
    t = torch.nn.functional.layer_norm(t, (d,), extra["norm.weight"], extra["norm.bias"], eps=1e-6)
    pred = torch.nn.functional.linear(t[:, 1:][mask], extra["mim_head.weight"], extra["mim_head.bias"])
    # targets: patches in im2col order (c, i, j), normalised per patch
    tgt = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, gh, gw, p, p]
    tgt = tgt.permute(0, 2, 3, 1, 4, 5).reshape(b, gsz, 3 * p * p)[mask]
    mean, var = tgt.mean(-1, keepdim=True), tgt.var(-1, keepdim=True)
    tgt = (tgt - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - tgt) ** 2).mean()
    loss.backward()
    grads = {k: p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None}
    grads.update({k: v.grad.contiguous() for k, v in extra.items()})
    save_file(grads, os.path.join(OUT, "tiny_beit_mim_grads.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in extra.items()}, os.path.join(OUT, "tiny_beit_mim_init.safetensors"))
    np.save(os.path.join(OUT, "tiny_beit_mim_mask.npy"), mask.reshape(-1).numpy().astype(np.float32))
    np.save(os.path.join(OUT, "tiny_beit_mim_loss.npy"), np.array([loss.item()], dtype=np.float32))
    print(f"mim: loss {loss.item():.6f}, {int(mask.sum())} masked patches")


def group_softmax():
    """MOS: groups [3, 1, 4] (+1 'others' slot each), loss = sum over groups of batch-mean CE."""
    g = torch.Generator().manual_seed(13)
    sizes = [3, 1, 4]
    logits = torch.randn(5, sum(s + 1 for s in sizes), generator=g, requires_grad=True)
    labels = torch.tensor([[2, 0, 0], [0, 1, 0], [0, 0, 4], [0, 0, 1], [3, 0, 0]])
    loss, start = 0.0, 0
    for k, s in enumerate(sizes):
        loss = loss + torch.nn.functional.cross_entropy(logits[:, start:start + s + 1], labels[:, k])
        start += s + 1
    loss.backward()
    np.save(os.path.join(OUT, "mos_logits.npy"), logits.detach().numpy())
    np.save(os.path.join(OUT, "mos_labels.npy"), labels.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "mos_loss.npy"), np.array([loss.item()], dtype=np.float32))
    np.save(os.path.join(OUT, "mos_grad.npy"), logits.grad.numpy())
    print(f"mos group softmax: loss {loss.item():.6f}")


def odin():
    model = MODELS["tiny_beit"]().eval()
    model.load_state_dict(load_file(os.path.join(TIMM, "tiny_beit.safetensors")), strict=False)
    x = torch.from_numpy(np.load(os.path.join(TIMM, "tiny_beit_input.npy"))).requires_grad_(True)
    t, eps = 1000.0, 0.0014
    z = model(x)
    loss = torch.nn.functional.cross_entropy(z / t, z.argmax(1))
    loss.backward()
    sign = torch.where(x.grad >= 0, 1.0, -1.0)
    with torch.no_grad():
        s = torch.softmax(model(x - eps * sign) / t, 1).max(1).values
    np.save(os.path.join(OUT, "tiny_beit_odin.npy"), s.numpy().astype(np.float32))
    print("odin:", s.numpy())


if __name__ == "__main__":
    if sys.argv[1:] == ["--adamw-only"]:
        adamw_f64()
    else:
        main()
