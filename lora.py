"""LoRA as STLLaVA-Med trains it, with adapter files that PEFT reads and writes.

- `LoRALinear`: frozen nn.Linear + trainable low-rank update, y = x W^T + b + (alpha/r) dropout(x) A^T B^T,
  A (r, in) Kaiming-uniform, B (out, r) zeros, so training starts at the base model (torchtune
  modules/peft/lora.py; PEFT tuners/lora/layer.py `reset_lora_parameters`, `Linear.forward`).
- `add_lora(model, targets)` swaps the nn.Linears whose names match; it works on any nn.Module by name.
  The paper's targets (heliossun/STLLaVA-Med @ 9113c41): `sqllava_med.sh` L2, L28-30 (LLM r128/a256,
  ViT r32/a64); `train.py` L170-182 `find_all_linear_names` (every LLM Linear but mm_projector,
  vision_tower, lm_head; every ViT Linear), L1087-1103 (LLM dropout 0.05), L1165-1171 (ViT dropout
  0.2); `train_dpo.py` L1194 (ViT dropout 0.1 in DPO).
- `mark_trainable`, `param_report`: LoRA and the projector train, everything else is frozen.
- `disable_lora(model)`: the DPO reference model without a second copy of the weights.
- `save_adapter`/`load_adapter`: PEFT's files for transformers' LlavaForConditionalGeneration, with the
  fully trained projector in the same file as PEFT `modules_to_save`. `merge_lora`: back to plain Linears.
"""
import contextlib
import json
import math
import os
import re
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class LoRASpec(NamedTuple):
    r: int
    alpha: float
    dropout: float = 0.0


# Patterns are matched as PEFT matches `rank_pattern` keys: against a dotted suffix of the module name.
LLM_LAYERS = r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
VIT_LAYERS = r"vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"


def lora_targets(r=128, alpha=256, dropout=0.05, vit_r=32, vit_alpha=64, vit_dropout=0.2) -> dict:
    """The paper's LoRA targets, {pattern: LoRASpec}: every Linear of the decoder blocks (r, alpha,
    dropout) and of the ViT blocks (vit_*). The defaults are stage 1's (sqllava_med.sh, train.py); sft.py
    and dpo.py pass their configs' values, so a flag changes a rank without a second copy of the patterns."""
    return {LLM_LAYERS: LoRASpec(r, alpha, dropout), VIT_LAYERS: LoRASpec(vit_r, vit_alpha, vit_dropout)}


PAPER_TARGETS = lora_targets()  # stage 1
PAPER_TARGETS_DPO = lora_targets(vit_dropout=0.1)  # stage 2 (train_dpo.py)


class LoRALinear(nn.Module):
    """Wraps `linear` (its weight and bias are reused, frozen) with a rank-`r` adapter scaled by alpha/r."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        linear.requires_grad_(False)
        # the same Parameters: no copy, and the state-dict names are unchanged
        self.weight = linear.weight
        self.bias = linear.bias
        # Adapters stay fp32 on a bf16/fp16 base (PEFT's default `autocast_adapter_dtype`): a 5e-6 step on a
        # bf16 weight of size 1e-2 is below bf16's resolution and would be lost.
        half = linear.weight.dtype in (torch.float16, torch.bfloat16)
        kw = dict(device=linear.weight.device, dtype=torch.float32 if half else linear.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(r, linear.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, r, **kw))  # B = 0: no update at first
        # PEFT's init; the same as nn.Linear's default, U(+-1/sqrt(in))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # set by disable_lora(): compute the base layer only
        self.merged = False  # B A scale is folded into weight

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:
            return out
        # Dropout only on the adapter's input, added after the base output: PEFT's order, so results match it.
        h = F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a)  # (..., r)
        delta = F.linear(h, self.lora_b) * self.scale
        return (out + delta).to(out.dtype)  # PEFT's rounding: add in fp32, then cast

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            # (out, r) @ (r, in)
            self.weight += ((self.lora_b @ self.lora_a) * self.scale).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= ((self.lora_b @ self.lora_a) * self.scale).to(self.weight.dtype)
            self.merged = False


def _matches(pattern: str, name: str) -> bool:
    # PEFT's rule for rank_pattern/alpha_pattern keys (peft utils/other.py `get_pattern_key`)
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _swap(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def lora_layers(model: nn.Module) -> dict:
    """{module name: LoRALinear} for every adapted layer of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets: dict) -> nn.Module:
    """Replace each nn.Linear whose name matches a pattern in `targets` ({pattern: LoRASpec(r, alpha,
    dropout)}) by a LoRALinear; the first matching pattern wins, as in PEFT. Every pattern must match."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for pattern, (r, alpha, dropout) in targets.items():
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r} for {pattern!r}")
        if not any(_matches(pattern, n) for n in linears):  # a typo would otherwise train nothing, silently
            raise ValueError(f"LoRA target {pattern!r} matches no nn.Linear of {type(model).__name__} "
                             f"(names look like {linears[:2]}; layers that already have LoRA don't count)")
    for name in linears:
        spec = next((s for p, s in targets.items() if _matches(p, name)), None)
        if spec is not None:
            _swap(model, name, LoRALinear(model.get_submodule(name), *spec))
    return model


def mark_trainable(model: nn.Module, lora: bool = True, full: tuple = ("projector",)) -> nn.Module:
    """Freeze everything except the LoRA matrices (if `lora`) and every parameter of the modules named
    in `full`, which train in full (STLLaVA-Med: the projector; add "vision_tower" or "language_model",
    "lm_head" for full fine-tuning of a tower)."""
    for name, p in model.named_parameters():
        is_lora = name.endswith((".lora_a", ".lora_b"))
        p.requires_grad_((lora and is_lora) or any(name.startswith(f + ".") for f in full))
    return model


def param_report(model: nn.Module) -> str:
    """One line: trainable / total parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)"


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside the block every LoRALinear computes its base layer only, so the model is exactly the base
    model: the DPO reference with no second copy of the weights (torchtune `disable_adapter`). Modules
    trained in full (the projector) are not reverted: they keep their current weights."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise RuntimeError("disable_lora needs unmerged adapters; call unmerge() first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put back plain nn.Linears (the base's state-dict names)."""
    for name, m in lora_layers(model).items():
        m.merge()
        linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None, device="meta")
        linear.weight = m.weight
        linear.bias = m.bias
        _swap(model, name, linear)
    return model


# ---- PEFT adapter files for transformers' LlavaForConditionalGeneration ----
# model.py drops transformers' leading "model." and calls multi_modal_projector "projector".
_RENAMES = [("vision_tower", "model.vision_tower"), ("projector", "model.multi_modal_projector"),
            ("language_model", "model.language_model"), ("lm_head", "lm_head")]
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)
HF_CLASS = "LlavaForConditionalGeneration"


def to_hf_name(name: str) -> str:
    """Our module/parameter name -> transformers' LlavaForConditionalGeneration name."""
    for ours, hf in _RENAMES:
        if name == ours or name.startswith(ours + "."):
            return hf + name[len(ours):]
    raise ValueError(f"{name!r} is not in the LLaVA tree (vision_tower, projector, language_model, lm_head)")


def from_hf_name(name: str) -> str:
    """transformers' LlavaForConditionalGeneration name -> ours."""
    for ours, hf in _RENAMES:
        if name == hf or name.startswith(hf + "."):
            return ours + name[len(hf):]
    raise ValueError(f"{name!r} is not a {HF_CLASS} name (model.vision_tower, model.multi_modal_projector, "
                     f"model.language_model, lm_head): an adapter for another architecture?")


def save_adapter(model: nn.Module, path: str, full: tuple = ("projector",), base: str = None):
    """Write adapter_model.safetensors + adapter_config.json exactly as PEFT saves a LoRA of
    LlavaForConditionalGeneration: `base_model.model.<hf name>.lora_A.weight` / `.lora_B.weight` (PEFT
    drops the adapter name on save) and the modules in `full` as PEFT `modules_to_save`
    (`base_model.model.<hf name>.weight`), so `PeftModel.from_pretrained` restores them too.
    base_model_name_or_path is `base`, else the directory the model was loaded from
    (`checkpoint.from_pretrained` records it as `model.name_or_path`): `peft.AutoPeftModel` loads the
    adapter with its base offline, where null sent it to the hub."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora first")
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{to_hf_name(name)}.lora_A.weight"] = m.lora_a
        tensors[f"{PEFT_PREFIX}{to_hf_name(name)}.lora_B.weight"] = m.lora_b
    for f in full:
        if any(n.startswith(f + ".") for n in layers):
            raise ValueError(f"{f!r} has LoRA layers; PEFT cannot both adapt and fully train a module")
        for pname, p in model.get_submodule(f).named_parameters():
            tensors[f"{PEFT_PREFIX}{to_hf_name(f + '.' + pname)}"] = p
    # the commonest (r, alpha) is the default, the rest go in rank/alpha_pattern (in a 7B: the LLM's)
    r, alpha, dropout = Counter((m.r, m.alpha, m.dropout_p) for m in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": base or getattr(model, "name_or_path", None),
        "auto_mapping": {"base_model_class": HF_CLASS,
                         "parent_library": "transformers.models.llava.modeling_llava"},
        # PEFT has one dropout for all layers (the paper: two)
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        # Exact names (escaped for the pattern dicts): nothing to re-interpret across the two naming schemes.
        "target_modules": sorted(to_hf_name(n) for n in layers),
        "rank_pattern": {re.escape(to_hf_name(n)): m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {re.escape(to_hf_name(n)): m.alpha for n, m in layers.items() if m.alpha != alpha},
        "modules_to_save": [to_hf_name(f) for f in full] or None,
        "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
        "inference_mode": True,
    }
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT LoRA adapter of LlavaForConditionalGeneration (from PEFT or `save_adapter`): a
    LoRALinear wherever the file has lora_A/lora_B (r from the shapes, alpha as PEFT resolves it, PEFT's
    single lora_dropout everywhere) and the `modules_to_save` weights. Everything is checked before the
    model changes."""
    with open(os.path.join(path, "adapter_config.json")) as fh:
        config = json.load(fh)
    arch = (config.get("auto_mapping") or {}).get("base_model_class", HF_CLASS)
    if config.get("peft_type") != "LORA" or arch != HF_CLASS:
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter for {arch}; "
                         f"expected LORA for {HF_CLASS}")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: unsupported LoRA variant {unsupported or config['bias']}")
    lora = {}
    full = {}
    for key, t in load_file(os.path.join(path, "adapter_model.safetensors")).items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(PEFT_PREFIX))
        if m:
            lora.setdefault(m[1], {})[m[2]] = t
        else:
            full[from_hf_name(key.removeprefix(PEFT_PREFIX))] = t
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for hf_name, ab in lora.items():
        m = modules.get(from_hf_name(hf_name))
        if not isinstance(m, (nn.Linear, LoRALinear)):
            raise ValueError(f"{path}: adapter for {hf_name!r}, "
                             f"but our model has no Linear {from_hf_name(hf_name)!r}")
        r = ab["A"].shape[0]
        out_f, in_f = m.weight.shape
        if (ab["A"].shape, ab["B"].shape) != ((r, in_f), (out_f, r)) or getattr(m, "r", r) != r:
            raise ValueError(f"{path}: shape mismatch at {hf_name!r}: A {tuple(ab['A'].shape)}, "
                             f"B {tuple(ab['B'].shape)} vs a ({out_f}, {in_f}) Linear here "
                             f"(LoRA rank {getattr(m, 'r', 'any')})")
    for name, t in full.items():
        if name not in params or params[name].shape != t.shape:
            raise ValueError(f"{path}: {name!r} {tuple(t.shape)} has no parameter of that shape here")
    for hf_name, ab in lora.items():
        name = from_hf_name(hf_name)
        r = ab["A"].shape[0]
        alpha = next((v for p, v in (config.get("alpha_pattern") or {}).items() if _matches(p, hf_name)),
                     config["lora_alpha"])
        if isinstance(modules[name], nn.Linear):
            _swap(model, name, LoRALinear(modules[name], r, alpha, config.get("lora_dropout", 0.0)))
        layer = model.get_submodule(name)
        layer.lora_a.copy_(ab["A"])
        layer.lora_b.copy_(ab["B"])
        layer.alpha = alpha
        layer.scale = alpha / r
    for name, t in full.items():
        params[name].copy_(t)
    return model
