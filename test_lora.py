# ----------------------------------------------------------------------------- lora.py
# Oracle: PEFT's LoRA on transformers' LlavaForConditionalGeneration, with the same base weights.
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lora as L
import model as M

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IMG_ID, N_IMG_TOKENS = 119, 16


def tiny_hf_llava(text_hidden=48, seed=0):
    """Random transformers LlavaForConditionalGeneration: CLIP 3 layers (the last one unused, feature layer -2),
    Llama 2 layers with GQA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(hidden_size=text_hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=120, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG_ID, image_seq_length=N_IMG_TOKENS,
                      vision_feature_layer=-2)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1/0: make every weight non-trivial
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def batch(seed=1):
    """Two rows of [t, <image>*16, t x 5] and their images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((N_IMG_TOKENS,), IMG_ID)
    ids = torch.stack([torch.cat([torch.randint(3, 118, (1,), generator=g), img, torch.randint(3, 118, (5,), generator=g)])
                       for _ in range(2)])
    return ids, torch.randn(2, 3, 28, 28, generator=g)


def authors_targets(hf):
    """STLLaVA-Med train.py `find_all_linear_names`: last name component of every Linear, per tower."""
    def last_names(module, skip=()):
        return {n.split(".")[-1] for n, m in module.named_modules()
                if isinstance(m, nn.Linear) and not any(s in n for s in skip)}
    return sorted(last_names(hf.model.language_model) | last_names(hf.model.vision_tower))


def peft_paper_config(**kw):
    """The paper's two LoRAs as one PEFT config: LLM r128/a256, ViT r32/a64 via rank/alpha patterns."""
    vit = r"model\.vision_tower\..*"
    return peft.LoraConfig(r=128, lora_alpha=256, rank_pattern={vit: 32}, alpha_pattern={vit: 64}, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(hf, dir): transformers' model and its llava-hf checkpoint that our from_pretrained reads."""
    hf = tiny_hf_llava()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return hf, str(d)


def ours_from(d):
    return M.from_pretrained(d, dtype=torch.float32)


def randomize_lora(model, seed=0):
    """Non-zero B (and a perturbed projector) so that every comparison below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_layers(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
        for p in model.projector.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def peft_like_ours(hf, ours, config):
    """PEFT model on a copy of `hf`, with our A, B and projector copied into it by name."""
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    lora_params = {n: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert len(lora_params) == len(L.lora_layers(ours))
    with torch.no_grad():
        for name, m in L.lora_layers(ours).items():
            p = lora_params[L.PEFT_PREFIX + L.to_hf_name(name)]
            p.lora_A["default"].weight.copy_(m.lora_a)
            p.lora_B["default"].weight.copy_(m.lora_b)
        mts = pm.base_model.model.model.multi_modal_projector.modules_to_save["default"]
        mts.load_state_dict(ours.projector.state_dict())
    return pm.eval()


def logits(model, ids, pixels):
    with torch.no_grad():
        if isinstance(model, M.Llava):
            return model(ids, pixels)
        return model(input_ids=ids, pixel_values=pixels).logits


def test_lora_linear_matches_peft_layer():
    torch.manual_seed(0)
    base_lin = nn.Linear(64, 48)
    ours = L.LoRALinear(copy.deepcopy(base_lin), r=8, alpha=16, dropout=0.5)
    pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(base_lin)),
                             peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["0"]))
    theirs = pm.base_model.model[0]
    # init: B = 0, A ~ U(+-1/sqrt(in)) in both (kaiming_uniform, a=sqrt(5))
    bound = 64 ** -0.5
    for a, b in [(ours.lora_a, ours.lora_b), (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)]:
        assert (b == 0).all() and a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / 3 ** 0.5
    assert not ours.weight.requires_grad and ours.lora_a.requires_grad and ours.lora_b.requires_grad
    with torch.no_grad():
        ours.lora_b.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_a)
        theirs.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(3, 5, 64)
    ours.eval(), pm.eval()
    assert (ours(x) - pm(x)).abs().max() < 1e-5
    ours.train(), pm.train()  # same dropout mask from the same seed: dropout sits where PEFT puts it
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)
    y_peft = pm(x)
    assert (y_ours - y_peft).abs().max() < 1e-5 and (y_ours - ours.eval()(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rank must be positive"):
        L.LoRALinear(nn.Linear(4, 4), r=0, alpha=1)


def test_half_precision_base_keeps_fp32_adapters_as_peft_does():
    torch.manual_seed(0)
    base_lin = nn.Linear(32, 16).to(torch.bfloat16)
    ours = L.LoRALinear(copy.deepcopy(base_lin), r=4, alpha=8)
    pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(base_lin)), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    theirs = pm.base_model.model[0]
    assert ours.weight.dtype == torch.bfloat16 and ours.lora_a.dtype == theirs.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        ours.lora_b.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_a)
        theirs.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(7, 32, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, pm(x))


def test_lora_linear_merge_unmerge():
    torch.manual_seed(0)
    m = L.LoRALinear(nn.Linear(32, 16), r=4, alpha=8)
    with torch.no_grad():
        m.lora_b.normal_()
    w0, x = m.weight.clone(), torch.randn(7, 32)
    y = m(x)
    m.merge()
    assert m.merged and (m(x) - y).abs().max() < 1e-5 and (m.weight - w0).abs().max() > 1e-2
    m.merge()  # idempotent
    assert (m(x) - y).abs().max() < 1e-5
    m.unmerge()
    assert not m.merged and (m.weight - w0).abs().max() < 1e-6 and (m(x) - y).abs().max() < 1e-5


def test_paper_targets_are_the_authors_modules(base):
    hf, d = base
    ours = L.add_lora(ours_from(d), L.PAPER_TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_paper_config(target_modules=authors_targets(hf)))
    theirs = {n[len(L.PEFT_PREFIX):]: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    layers = L.lora_layers(ours)
    assert {L.to_hf_name(n) for n in layers} == set(theirs) and len(layers) == 2 * 7 + 3 * 6
    for n, m in layers.items():
        t = theirs[L.to_hf_name(n)]
        assert (m.r, m.alpha, m.scale) == (t.r["default"], t.lora_alpha["default"], t.scaling["default"])
        assert m.dropout_p == (0.2 if n.startswith("vision_tower") else 0.05)
    assert all(m.dropout_p == 0.1 for n, m in L.lora_layers(L.add_lora(ours_from(d), L.PAPER_TARGETS_DPO)).items()
               if n.startswith("vision_tower"))


def test_forward_matches_peft_on_both_towers(base):
    hf, d = base
    ours = randomize_lora(L.add_lora(ours_from(d), L.PAPER_TARGETS)).eval()
    pm = peft_like_ours(hf, ours, peft_paper_config(target_modules=authors_targets(hf),
                                                    modules_to_save=["multi_modal_projector"]))
    ids, pixels = batch()
    want, got = logits(pm, ids, pixels), logits(ours, ids, pixels)
    assert (got - want).abs().max() < 1e-5
    assert (want - logits(hf, ids, pixels)).abs().max() > 1e-3  # the adapters do change the output
    for tower in ("vision_tower", "language_model"):  # and each tower's adapters matter on their own
        with torch.no_grad():
            for n, m in L.lora_layers(ours).items():
                if n.startswith(tower):
                    m.disabled = True
        assert (logits(ours, ids, pixels) - got).abs().max() > 1e-4
        for m in L.lora_layers(ours).values():
            m.disabled = False


def test_disable_lora_is_base_and_merge_equals_unmerged(base, tmp_path):
    hf, d = base
    ids, pixels = batch()
    plain = ours_from(d)
    want_base = logits(plain, ids, pixels)
    ours = L.add_lora(ours_from(d), L.PAPER_TARGETS).eval()
    with torch.no_grad():  # B only: disable_lora turns LoRA off, not the (fully trained) projector
        for m in L.lora_layers(ours).values():
            m.lora_b.normal_(std=0.02)
    lora_out = logits(ours, ids, pixels)
    with L.disable_lora(ours):
        assert torch.equal(logits(ours, ids, pixels), want_base)
    assert torch.equal(logits(ours, ids, pixels), lora_out)  # back on after the block
    assert (lora_out - want_base).abs().max() > 1e-3
    L.merge_lora(ours)
    assert not L.lora_layers(ours) and set(ours.state_dict()) == set(plain.state_dict())
    assert all(type(m) is nn.Linear for m in ours.modules() if "Linear" in type(m).__name__)
    assert (logits(ours, ids, pixels) - lora_out).abs().max() < 1e-5
    M.save_pretrained(ours, str(tmp_path))  # merged checkpoint loads in transformers and computes the same
    hf_merged = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert (logits(hf_merged, ids, pixels) - lora_out).abs().max() < 1e-4


def test_only_lora_and_projector_get_gradients(base):
    hf, d = base
    ours = L.mark_trainable(randomize_lora(L.add_lora(ours_from(d), L.PAPER_TARGETS)).train())
    ids, pixels = batch()
    ours(ids, pixels).logsumexp(-1).mean().backward()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    expected = {n for n in dict(ours.named_parameters()) if n.endswith((".lora_a", ".lora_b")) or n.startswith("projector.")}
    assert trainable == expected and len(expected) == 2 * len(L.lora_layers(ours)) + 4
    # the last CLIP layer is past the feature layer (-2): never run, so no gradient, as in LLaVA
    assert with_grad == {n for n in expected if not n.startswith("vision_tower.encoder.layers.2.")}
    assert all(ours.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    assert L.param_report(ours).startswith(f"trainable params: {sum(ours.get_parameter(n).numel() for n in expected):,} / ")
    L.mark_trainable(ours, lora=False, full=("vision_tower",))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n in dict(ours.named_parameters()) if n.startswith("vision_tower.")}


def test_param_report_counts_like_peft(base):
    hf, d = base
    ours = L.mark_trainable(L.add_lora(ours_from(d), L.PAPER_TARGETS), full=())
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_paper_config(target_modules=authors_targets(hf)))
    trainable, total = pm.get_nb_trainable_parameters()
    assert L.param_report(ours) == f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)"


def test_adapter_saved_here_loads_in_peft(base, tmp_path):
    hf, d = base
    ours = randomize_lora(L.add_lora(ours_from(d), L.PAPER_TARGETS)).eval()
    L.save_adapter(ours, str(tmp_path / "ours"))
    # same file layout as PEFT's own save of the equivalent model
    pm = peft_like_ours(hf, ours, peft_paper_config(target_modules=authors_targets(hf),
                                                    modules_to_save=["multi_modal_projector"]))
    pm.save_pretrained(str(tmp_path / "peft"))
    mine, theirs = (load_file(str(tmp_path / s / "adapter_model.safetensors")) for s in ("ours", "peft"))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in mine
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    ids, pixels = batch()
    assert (logits(loaded, ids, pixels) - logits(ours, ids, pixels)).abs().max() < 1e-5
    # the projector comes back as a PEFT modules_to_save module (trainable there, saved again), not by accident
    assert isinstance(loaded.base_model.model.model.multi_modal_projector, peft.utils.other.ModulesToSaveWrapper)
    loaded.save_pretrained(str(tmp_path / "resaved"))
    resaved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert sorted(resaved) == sorted(mine) and all(torch.equal(mine[k], resaved[k]) for k in mine)


def test_adapter_saved_by_peft_loads_here(base, tmp_path):
    hf, d = base
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_paper_config(
        target_modules=authors_targets(hf), modules_to_save=["multi_modal_projector"], lora_dropout=0.05))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(str(tmp_path))
    ours = L.load_adapter(ours_from(d), str(tmp_path)).eval()
    layers = L.lora_layers(ours)
    assert len(layers) == 2 * 7 + 3 * 6 and layers["vision_tower.encoder.layers.0.mlp.fc1"].scale == 2.0
    assert (layers["vision_tower.encoder.layers.0.mlp.fc1"].r, layers["language_model.layers.0.mlp.up_proj"].r) == (32, 128)
    ids, pixels = batch()
    assert (logits(ours, ids, pixels) - logits(pm.eval(), ids, pixels)).abs().max() < 1e-5
    adapted = L.add_lora(ours_from(d), {p: L.LoRASpec(s.r, 1.0) for p, s in L.PAPER_TARGETS.items()})
    L.load_adapter(adapted, str(tmp_path))  # into existing LoRA layers: PEFT's alpha replaces theirs
    assert (logits(adapted.eval(), ids, pixels) - logits(ours, ids, pixels)).abs().max() < 1e-5
    L.save_adapter(ours, str(tmp_path / "again"))  # and round-trips through our writer unchanged
    again = L.load_adapter(ours_from(d), str(tmp_path / "again")).eval()
    assert torch.equal(logits(again, ids, pixels), logits(ours, ids, pixels))


def test_bad_inputs_give_clear_errors(base, tmp_path):
    hf, d = base
    ours = ours_from(d)
    typo = r"language_model\.layer\.\d+\.q_proj"  # "layer", not "layers"
    with pytest.raises(ValueError, match=re.escape(f"LoRA target {typo!r} matches no nn.Linear of Llava")):
        L.add_lora(ours, {typo: L.LoRASpec(8, 16)})
    with pytest.raises(ValueError, match="rank must be positive, got r=0"):
        L.add_lora(ours, {r"q_proj": L.LoRASpec(0, 16)})
    with pytest.raises(ValueError, match="has no LoRA layers"):
        L.save_adapter(ours, str(tmp_path / "none"))
    L.add_lora(ours, {r"q_proj": L.LoRASpec(4, 8)})
    with pytest.raises(ValueError, match="matches no nn.Linear"):  # twice: already adapted
        L.add_lora(ours, {r"q_proj": L.LoRASpec(4, 8)})
    with pytest.raises(ValueError, match="'projector' has LoRA layers"):
        L.save_adapter(L.add_lora(ours_from(d), {r"projector\.linear_1": L.LoRASpec(4, 8)}), str(tmp_path / "x"))
    # an adapter for another architecture: PEFT LoRA of a LlamaForCausalLM
    llama = transformers.LlamaForCausalLM(hf.config.text_config)
    peft.get_peft_model(llama, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="adapter for LlamaForCausalLM; expected LORA for LlavaForConditionalGeneration"):
        L.load_adapter(ours_from(d), str(tmp_path / "llama"))
    cfg_path = tmp_path / "llama" / "adapter_config.json"  # the same without the class name in its config
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_mapping"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj' is not a LlavaForConditionalGeneration name"):
        L.load_adapter(ours_from(d), str(tmp_path / "llama"))
    # a Llava adapter of another size
    other = tiny_hf_llava(text_hidden=64)
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["o_proj"])).save_pretrained(str(tmp_path / "big"))
    target = ours_from(d)
    with pytest.raises(ValueError, match=r"shape mismatch at 'model\.language_model\.layers\.0\.self_attn\.o_proj'"):
        L.load_adapter(target, str(tmp_path / "big"))
    assert not L.lora_layers(target)  # checked before anything changed
    peft.get_peft_model(tiny_hf_llava(text_hidden=64), peft.LoraConfig(  # ViT fits, projector does not
        r=4, target_modules=["fc1"], modules_to_save=["multi_modal_projector"])).save_pretrained(str(tmp_path / "proj"))
    with pytest.raises(ValueError, match=r"'projector\.linear_1\.(weight|bias)' \(64.*has no parameter of that shape"):
        L.load_adapter(target, str(tmp_path / "proj"))
    assert not L.lora_layers(target)
    with pytest.raises(RuntimeError, match="unmerge"):
        ours.language_model.layers[0].self_attn.q_proj.merge()
        with L.disable_lora(ours):
            pass
