"""
LLaVA checkpoints on disk: config.json + safetensors, in the llava-hf layout (transformers'
LlavaForConditionalGeneration) and the original LLaVA layout (LlavaLlamaForCausalLM, the only one that holds
SQ-LLaVA's `cluster` projector), read into and written from model.py's `Llava`.

- from_pretrained: either layout, single-file or sharded safetensors, with the CLIP tower inside the
  checkpoint or beside it (`vision_path`); built on the meta device so the weights exist once. Nothing is
  downloaded.
- save_pretrained: either layout, sharded above 5 GiB with an index; the llava-hf one loads in transformers,
  with the processor's files (`AutoProcessor.from_pretrained`, once the tokenizer is copied beside them).
- The conversation template travels with the model: config.json's "conv_template" (ours; LLaVA passes
  `--conv-mode` by hand instead, `llava/eval/model_vqa.py`), read back by `template_of`.

References: transformers `modeling_llava.py` (key names, `_checkpoint_conversion_mapping`),
LLaVA `llava/model/builder.py` and `llava/model/llava_arch.py` (the original layout),
heliossun/STLLaVA-Med `llava/model/multimodal_projector/builder.py` (the cluster projector's config keys).
"""
import json
import os
from dataclasses import asdict

import torch

from data import CLIP_MEAN, CLIP_STD, IMAGE_TAG
from model import Llava, LlavaConfig, TextConfig, VisionConfig

# CLIP towers that LLaVA checkpoints name by hub id; only the config, nothing is downloaded
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(),
    "openai/clip-vit-large-patch14": VisionConfig(image_size=224),
}
LLAMA_DEFAULTS = TextConfig()  # transformers' LlamaConfig defaults; old llava-hf configs rely on them
MISTRAL_DEFAULTS = TextConfig(intermediate_size=14336, num_kv_heads=8, max_position_embeddings=32768,
                              model_type="mistral")


def _text_config(c):
    d = MISTRAL_DEFAULTS if "mistral" in c.get("model_type", "") else LLAMA_DEFAULTS
    if c.get("rope_scaling") or (c.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {c.get('rope_scaling') or c.get('rope_parameters')} is not supported")
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", d.rope_theta))
    heads = c.get("num_attention_heads", d.num_heads)
    return TextConfig(
        vocab_size=c.get("vocab_size", d.vocab_size), hidden_size=c.get("hidden_size", d.hidden_size),
        intermediate_size=c.get("intermediate_size", d.intermediate_size),
        num_layers=c.get("num_hidden_layers", d.num_layers), num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim"), rope_theta=theta,
        rms_norm_eps=c.get("rms_norm_eps", d.rms_norm_eps),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        max_position_embeddings=c.get("max_position_embeddings", d.max_position_embeddings),
        bos_token_id=c.get("bos_token_id", 1), eos_token_id=c.get("eos_token_id", 2),
        model_type="mistral" if "mistral" in c.get("model_type", "") else "llama")


def _vision_config(c, feature_layer):
    d = VisionConfig(768, 3072, 12, 12, 224, 32)  # transformers' CLIPVisionConfig defaults
    c = c.get("vision_config", c)  # a CLIPModel config nests the tower's
    return VisionConfig(c.get("hidden_size", d.hidden_size), c.get("intermediate_size", d.intermediate_size),
                        c.get("num_hidden_layers", d.num_layers), c.get("num_attention_heads", d.num_heads),
                        c.get("image_size", d.image_size), c.get("patch_size", d.patch_size),
                        c.get("layer_norm_eps", d.layer_norm_eps), feature_layer)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _load_safetensors(path):
    """All tensors of a checkpoint directory: one model.safetensors, or shards listed in the index."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} "
                                "(only safetensors checkpoints are read; convert .bin files first)")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state


def _rename(key, projector_type):
    """A checkpoint key in any supported layout -> our module name, or None for tensors we ignore."""
    if key.endswith(("position_ids", "rotary_emb.inv_freq")):
        return None  # buffers some exporters save; recomputed here
    rules = [  # (prefix in the checkpoint, our prefix); first match wins
        ("model.language_model.", "language_model."), ("model.multi_modal_projector.", "projector."),
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # original layout, tower inside
        ("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
        # llava-hf as transformers < 4.52 saved it
        ("language_model.model.", "language_model."), ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "vision_tower."), ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "projector."),
        ("model.mm_projector.", "projector."), ("model.", "language_model."), ("lm_head.", "lm_head."),
        ("vision_model.", "vision_tower."),  # a CLIP checkpoint given as vision_path
    ]
    for old, new in rules:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    else:
        return key  # unknown: reported as unexpected by from_pretrained
    if key.startswith("projector.") and projector_type != "cluster":  # original: Sequential indices 0, 2
        key = (key.replace("projector.0.", "projector.linear_1.")
               .replace("projector.2.", "projector.linear_2."))
        if projector_type == "linear" and key in ("projector.weight", "projector.bias"):
            key = key.replace("projector.", "projector.linear_1.")
    return key


def config_from_json(c, vision_path=None):
    """LlavaConfig from a llava-hf or original-LLaVA config.json dict."""
    if "text_config" in c:  # llava-hf
        layer = c.get("vision_feature_layer", -2)
        if not isinstance(layer, int) or c.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("only a single vision_feature_layer with select strategy 'default' is supported")
        proj = "mlp2x_gelu" if c.get("projector_hidden_act", "gelu") == "gelu" else None
        if proj is None or not c.get("multimodal_projector_bias", True):
            raise ValueError(f"unsupported llava-hf projector: act={c.get('projector_hidden_act')!r}")
        return LlavaConfig(_vision_config(c["vision_config"], layer), _text_config(c["text_config"]), proj,
                           c.get("image_token_id", c.get("image_token_index", 32000)),
                           c.get("image_seq_length"))
    layer = c.get("mm_vision_select_layer", -2)
    if c.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError("only mm_vision_select_feature='patch' (CLS dropped) is supported")
    if vision_path is not None:
        vision = _vision_config(_read_json(os.path.join(vision_path, "config.json")), layer)
    elif "vision_config" in c:  # written by our save_pretrained(layout="llava")
        vision = _vision_config(c["vision_config"], layer)
    elif c.get("mm_vision_tower") in KNOWN_VISION_TOWERS:
        vision = VisionConfig(**{**asdict(KNOWN_VISION_TOWERS[c["mm_vision_tower"]]), "feature_layer": layer})
    else:
        raise ValueError(f"config names vision tower {c.get('mm_vision_tower')!r}, which is unknown here: "
                         "pass vision_path=<a local CLIPVisionModel or CLIPModel directory>")
    # LLaVA's IMAGE_TOKEN_INDEX (llava/constants.py): a placeholder outside the vocabulary
    # the authors hard-code Clustering(..., 256, 2) (builder.py); the two keys are ours, for smaller models
    return LlavaConfig(vision, _text_config(c), c.get("mm_projector_type", "linear"),
                       c.get("image_token_index", -200), cluster_centers=c.get("mm_cluster_centers", 256),
                       cluster_iters=c.get("mm_cluster_iters", 2))


def default_template(model_type):
    """The answering template of a decoder family: LLaVA-Med v1.5 (Mistral) prompts with
    conv_mistral_instruct, LLaVA-1.5 / Vicuna with conv_vicuna_v1 (LLaVA `llava/conversation.py`)."""
    return "mistral_instruct" if "mistral" in model_type else "vicuna_v1"


def template_of(path):
    """The conversation template a model directory was saved with (config.json "conv_template"), else the
    default of its decoder family (a checkpoint written elsewhere)."""
    c = _read_json(os.path.join(path, "config.json"))
    if c.get("conv_template"):
        return c["conv_template"]
    return default_template(c.get("text_config", c).get("model_type", ""))


def from_pretrained(path, vision_path=None, dtype=torch.bfloat16, device=None):
    """Load a LLaVA checkpoint directory (llava-hf or original LLaVA layout) into `Llava`.

    The original layout keeps the CLIP tower outside the checkpoint unless it was saved in it;
    `vision_path` is then a local directory with a CLIPVisionModel or CLIPModel safetensors checkpoint.
    The model is built on the meta device and the tensors are assigned, so weights exist once.
    Nothing is downloaded.
    """
    c = _read_json(os.path.join(path, "config.json"))
    config = config_from_json(c, vision_path)
    state = {}
    for k, v in _load_safetensors(path).items():
        name = _rename(k, config.projector_type)
        if name is not None:
            state[name] = v
    if not any(k.startswith("vision_tower.") for k in state):
        if vision_path is None:
            raise ValueError(f"{path} holds no vision tower weights and the config names "
                             f"{c.get('mm_vision_tower')!r}; nothing is downloaded: "
                             "pass vision_path=<local directory of that CLIP checkpoint>")
        for k, v in _load_safetensors(vision_path).items():  # CLIPModel ("vision_model.*", "text_model.*")
            if k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")):
                continue  # or CLIPVisionModel as transformers >= 5 saves it (no prefix)
            name = _rename(k if k.startswith("vision_model.") else "vision_model." + k, config.projector_type)
            if name is not None:
                state[name] = v
    with torch.device("meta"):
        model = Llava(config)
    expected = model.state_dict()
    if config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"shape mismatch in {path}: " + "; ".join(bad[:10]))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=False, assign=True)
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.template = template_of(path)  # a plain attribute: save_pretrained writes it back
    model.name_or_path = os.path.abspath(path)  # as transformers' name_or_path: save_adapter names its base
    return model.eval()


def write_processor_config(cfg, path):
    """The files `transformers.AutoProcessor` reads for a llava-hf checkpoint: preprocessor_config.json (the
    image processor: data.preprocess_image's steps, LLaVA's pad to square included, `do_pad` in transformers'
    LlavaImageProcessor) and processor_config.json (how many "<image>" tokens one image expands to: (size /
    patch)² + CLS, less the CLS that the "default" strategy drops). The tokenizer comes from the same
    directory (data.copy_tokenizer)."""
    v = cfg.vision
    image = dict(image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor", do_pad=True,
                 do_convert_rgb=True, do_resize=True, size={"shortest_edge": v.image_size},
                 resample=3,  # PIL's bicubic
                 do_center_crop=True, crop_size={"height": v.image_size, "width": v.image_size},
                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                 image_std=list(CLIP_STD))
    processor = dict(processor_class="LlavaProcessor", image_token=IMAGE_TAG, patch_size=v.patch_size,
                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    for name, content in (("preprocessor_config.json", image), ("processor_config.json", processor)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2)


def save_pretrained(model, path, layout="llava-hf", max_shard_bytes=5 * 1024**3, template=None):
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`).

    template: the conversation template stored as "conv_template"; default the one the model was loaded
    with (`model.template`), else its decoder family's (`default_template`).

    layout="llava-hf": transformers' LlavaForConditionalGeneration layout (newest key scheme).
    layout="llava": the original LLaVA layout (the only one that holds the `cluster` projector),
    with the vision tower inside the checkpoint.
    """
    from safetensors.torch import save_file
    cfg = model.config
    v = cfg.vision
    t = cfg.text
    text_json = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                     intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                     num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                     head_dim=t.head_dim, rope_theta=t.rope_theta,
                     rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
                     max_position_embeddings=t.max_position_embeddings, bos_token_id=t.bos_token_id,
                     eos_token_id=t.eos_token_id, hidden_act="silu")
    vision_json = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                       num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                       image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                       hidden_act="quick_gelu", model_type="clip_vision_model")
    state = {k: t_.detach().contiguous() for k, t_ in model.state_dict().items()}
    if t.tie_word_embeddings:
        state.pop("lm_head.weight")
    if layout == "llava-hf":
        if cfg.projector_type != "mlp2x_gelu":
            raise ValueError("the llava-hf layout holds only the mlp2x_gelu projector, "
                             f"not {cfg.projector_type!r}: use layout='llava'")
        config = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
                      image_token_id=cfg.image_token_id, image_token_index=cfg.image_token_id,
                      image_seq_length=cfg.image_seq_length, vision_feature_layer=v.feature_layer,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      multimodal_projector_bias=True, tie_word_embeddings=t.tie_word_embeddings,
                      text_config=dict(text_json, model_type=t.model_type), vision_config=vision_json)
        prefixes = [("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                    ("projector.", "model.multi_modal_projector."), ("lm_head.", "lm_head.")]
    elif layout == "llava":
        config = dict(text_json, model_type=f"llava_{t.model_type}", architectures=["LlavaLlamaForCausalLM"],
                      mm_projector_type=cfg.projector_type, mm_hidden_size=v.hidden_size,
                      mm_vision_select_layer=v.feature_layer, mm_vision_select_feature="patch",
                      mm_use_im_start_end=False, image_aspect_ratio="pad",
                      image_token_index=cfg.image_token_id, mm_cluster_centers=cfg.cluster_centers,
                      mm_cluster_iters=cfg.cluster_iters, vision_config=vision_json)
        prefixes = [("language_model.", "model."),
                    ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                    ("projector.", "model.mm_projector."), ("lm_head.", "lm_head.")]
        if cfg.projector_type != "cluster":  # nn.Sequential indices 0 and 2, or one bare Linear
            linear_1 = "projector.0." if cfg.projector_type == "mlp2x_gelu" else "projector."
            state = {k.replace("projector.linear_1.", linear_1)
                      .replace("projector.linear_2.", "projector.2."): x for k, x in state.items()}
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'llava-hf' or 'llava'")
    out = {}
    for k, x in state.items():
        new = next(p_new + k[len(p_old):] for p_old, p_new in prefixes if k.startswith(p_old))
        out[new] = x
    config["conv_template"] = template or getattr(model, "template", None) or default_template(t.model_type)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if layout == "llava-hf":
        write_processor_config(cfg, path)
    shards = [{}]  # greedy split in key order
    size = 0
    for k, x in out.items():
        nbytes = x.numel() * x.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = x
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(x.numel() * x.element_size() for x in out.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

