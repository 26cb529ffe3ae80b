"""
LLaVA-1.5 from scratch (Liu et al., "Improved Baselines with Visual Instruction Tuning"), the model that
STLLaVA-Med §2 trains: a CLIP vision tower, a projector and a LLaMA/Mistral decoder, in one file.

- vision_tower: CLIP ViT (ViT-L/14-336 in LLaVA-1.5). Patch conv without bias + class token + learned
  positions -> pre-layernorm -> pre-norm blocks with a quick_gelu MLP. LLaVA takes the hidden state of
  the second-to-last block (`feature_layer=-2`) and drops the class token: 576 patch features.
- projector: `mlp2x_gelu` (Linear -> GELU -> Linear, LLaVA-1.5 and LLaVA-Med v1.5), `linear`, or
  `cluster`, SQ-LLaVA's prototype extractor that STLLaVA-Med's released weights use.
- language_model: LLaMA / Mistral: RMSNorm, rotary positions, grouped-query attention via
  scaled_dot_product_attention, SwiGLU MLP; untied or tied output head.
- the splice: `input_ids` hold `image_seq_length` copies of `image_token_id` per image; those rows of
  the input embeddings are overwritten, in order, by the projected image features (one masked assignment).
- generate: batched, left-padded prompts, a small KV cache, greedy or temperature/top-k/top-p sampling.

Reading and writing checkpoints (llava-hf and original LLaVA layouts) lives in checkpoint.py; this
file imports nothing else from the project, so it can be copied alone.
References: LLaVA `llava/model/llava_arch.py` (encode_images, the splice) and
`llava/model/multimodal_encoder/clip_encoder.py` (feature_select); transformers `modeling_clip.py`,
`modeling_llama.py`, `modeling_llava.py`; SQ-LLaVA / STLLaVA-Med
`llava/model/multimodal_projector/cluster.py` (heliossun/STLLaVA-Med); gpt-fast `generate.py` (sampling).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Configs: one dataclass per tower, plus named sizes (gpt-fast's `transformer_configs` idea)


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2  # LLaVA-1.5 `mm_vision_select_layer`: the penultimate block's output


@dataclass
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = None  # derived: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "llama"  # or "mistral": same architecture here (sliding window not implemented)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # "mlp2x_gelu" | "linear" | "cluster"
    image_token_id: int = 32000
    image_seq_length: int = None  # derived: (image_size // patch_size) ** 2 patch tokens (CLS dropped)
    cluster_centers: int = 256  # SQ-LLaVA: Clustering(mm_hidden, hidden, 256 centres, 2 iterations)
    cluster_iters: int = 2

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        # the cluster projector refines every patch token in place, so the count does not change
        n_patches = (self.vision.image_size // self.vision.patch_size) ** 2
        self.image_seq_length = self.image_seq_length or n_patches


CONFIGS = {
    # the CPU-sized model of the synthetic default; data.py sets vocab_size, image_token_id from its tokenizer
    "tiny": LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4,
                            image_size=48, patch_size=12),
        text=TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=1024),
        image_token_id=3),
    "llava-1.5-7b": LlavaConfig(),
    "llava-1.5-13b": LlavaConfig(text=TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40,
                                                 num_heads=40, num_kv_heads=40)),
    "llava-med-v1.5-mistral-7b": LlavaConfig(text=TextConfig(intermediate_size=14336, num_kv_heads=8,
                                                             rope_theta=1e6, max_position_embeddings=32768,
                                                             model_type="mistral")),
}

# -----------------------------------------------------------------------------
# CLIP vision tower (names follow transformers' CLIPVisionTransformer so checkpoints map one-to-one)


class CLIPAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):  # (B, T, C), no mask: every patch sees every patch
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as OpenAI's CLIP was trained


class CLIPBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixel_values):  # (N, 3, H, W)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (N, P, C)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPBlock(cfg) for _ in range(cfg.num_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: CLIP's spelling
        self.encoder = CLIPEncoder(cfg)
        # unused by LLaVA (it reads an inner layer) but kept so checkpoints round-trip unchanged
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):
        """(N, 3, H, W) -> (N, P, C): hidden state of `feature_layer`, class token dropped."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # this is hidden_states[0] in transformers
        layer = self.cfg.feature_layer
        n_run = self.cfg.num_layers + 1 + layer if layer < 0 else layer
        for block in self.encoder.layers[:n_run]:  # blocks after the feature layer are never needed
            x = block(x)
        return x[:, 1:]  # LLaVA's select_feature="patch": drop CLS

# -----------------------------------------------------------------------------
# Projectors


class MLPProjector(nn.Module):
    """`mlp2x_gelu` (Linear -> GELU -> Linear) or, with depth 1, `linear`
    (LLaVA `multimodal_projector/builder.py`)."""

    def __init__(self, vision_dim, text_dim, depth=2):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim) if depth == 2 else None

    def forward(self, x):
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))


class ClusterProjector(nn.Module):
    """SQ-LLaVA's prototype extractor (STLLaVA-Med `multimodal_projector/cluster.py`, `Clustering`).

    1. centre proposals: adaptive average pooling of the L patch tokens down to N centres;
    2. `iters` refinements: centres <- softmax over centres of cos(c(centres), v(x)) @ f(x);
    3. each token is hard-assigned to its most similar centre (sigmoid(beta + alpha * cos));
    4. each centre aggregates its tokens' f-features (weighted by similarity, plus its pooled feature)
       and this update is added back to every token of the cluster (residual, L tokens stay L);
    5. Linear -> QuickGELU -> Linear to the language model's width.
    """

    def __init__(self, vision_dim, text_dim, num_centers=256, iters=2):
        super().__init__()
        self.num_centers = num_centers
        self.iters = iters
        self.sim_alpha = nn.Parameter(torch.ones(1, 1, 1))
        self.sim_beta = nn.Parameter(torch.zeros(1, 1, 1))
        self.c, self.v, self.f = (nn.Linear(vision_dim, vision_dim) for _ in range(3))
        self.ln_1 = nn.LayerNorm(vision_dim)  # present in the checkpoints, unused by the authors' forward
        self.mlp = nn.Sequential(nn.Linear(vision_dim, text_dim), QuickGELU(), nn.Linear(text_dim, text_dim))

    def forward(self, x):  # (B, L, D)
        value = F.normalize(self.v(x), dim=1)  # the authors' quirk: normalised over tokens, not channels
        feature = self.f(x)  # (B, L, D)

        def pool(t):  # (B, L, D) -> (B, N, D)
            return F.adaptive_avg_pool1d(t.transpose(1, 2), self.num_centers).transpose(1, 2)
        centers = pool(x)
        centers_feature = pool(feature)
        for _ in range(self.iters):
            centers = self.c(centers)
            # (B, N, L), a softmax over centres
            sim = torch.softmax(F.normalize(centers, dim=-1) @ value.transpose(1, 2), dim=1)
            centers = sim @ feature  # (B, N, D)
        cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # (B, N, L)
        similarity = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
        # (B, N, L): 1 at each token's most similar centre
        assign = F.one_hot(similarity.argmax(dim=1), self.num_centers).transpose(1, 2).to(x.dtype)
        similarity = similarity * assign  # keep only each token's own centre
        update = (similarity @ feature + centers_feature) / (assign.sum(-1, keepdim=True) + 1.0)  # (B, N, D)
        x = x + similarity.transpose(1, 2) @ update  # (B, L, D): every token gets its centre's update
        return self.mlp(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)

# -----------------------------------------------------------------------------
# LLaMA / Mistral decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # computed in fp32, as LLaMA does, then cast back
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """Rotary tables for (B, T) positions -> cos, sin of shape (B, 1, T, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # LLaMA's half-split layout, not interleaved pairs
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Fixed-size key/value buffers per layer, filled left to right (gpt-fast style).

    Prompts are left-padded, so every row writes at the same slot; padding is hidden by the attention
    mask and rotary positions come from the mask (cumsum), so a row's first real token is position 0.
    """

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device):
        # a tensor per layer: inductor turned a write into a view of one (L, ...) input into
        # whole-layer copies
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.seen = 0  # slots filled by calls without input_pos

    def update(self, layer, k, v, input_pos=None):  # k, v: (B, Hkv, T_new, hd)
        """Without input_pos: write at the next free slots, return the filled prefix
        (B, Hkv, seen + T_new, hd). With input_pos, (T_new,) slots as a tensor: write there and return
        the whole buffers, so shapes never change."""
        if input_pos is not None:
            # a tensor index (index_put_), not a slice: the same graph every step
            self.k[layer][:, :, input_pos] = k
            self.v[layer][:, :, input_pos] = v
            return self.k[layer], self.v[layer]
        end = self.seen + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache overflow: {end} > {self.k[layer].shape[2]} slots")
        self.k[layer][:, :, self.seen:end] = k
        self.v[layer][:, :, self.seen:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        H, Hkv, hd, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(C, H * hd, bias=False)
        self.k_proj = nn.Linear(C, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(C, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, C, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        # x (B, T, C); mask (B, 1, T, T_keys) bool, True = attend, or None for causal
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.cfg.num_heads, -1).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.cfg.num_kv_heads, -1).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.cfg.num_kv_heads, -1).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, input_pos)
        # grouped-query attention: each key/value head serves num_heads // num_kv_heads query heads. Only when
        # needed: on CUDA enable_gqa allows flash or math only (torch docs), and flash takes no mask
        gqa = self.cfg.num_kv_heads != self.cfg.num_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute blocks in backward: less memory, ~30% more compute

    def forward(self, x, attention_mask, cache=None, input_pos=None):
        """x: input embeddings (B, T, C); attention_mask: (B, T_all) over cached + new tokens, 1 = real.

        input_pos: (T,) cache slots of the new tokens, for the static decode step (`decode_one_token`):
        attention_mask then spans the whole cache, (B, max_len), so every step has the same shapes.
        """
        B, T, _ = x.shape
        if attention_mask is None:  # no cache, every row starts at slot 0: positions 0..T-1, plain causal
            position_ids = torch.arange(T, device=x.device)[None]  # (1, T)
        else:
            T_all = attention_mask.shape[1]
            q_slot = torch.arange(T_all - T, T_all, device=x.device) if input_pos is None else input_pos
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, q_slot]  # left pad: 0-based
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        # causal mask over absolute slots, AND the key is not padding; a padded query may see itself so
        # that no row of the softmax is empty (its output is never used). Slots past the query are masked
        # by causality, so the static step may mark them 1 before they are written.
        if attention_mask is None or (cache is None and bool(attention_mask.all())):
            mask = None  # plain causal attention: lets SDPA pick its flash kernel
        else:
            q_slot = q_slot[:, None]
            k_slot = torch.arange(T_all, device=x.device)[None, :]
            mask = (k_slot <= q_slot) & (attention_mask.bool()[:, None, :] | (k_slot == q_slot))
            mask = mask[:, None]  # (B, T, T_all) -> (B, 1, T, T_all)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, input_pos)
        if cache is not None and input_pos is None:
            cache.seen += T
        return self.norm(x)

# -----------------------------------------------------------------------------
# LLaVA: vision tower -> projector -> splice into the token embeddings -> decoder


class Llava(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        v = config.vision
        t = config.text
        self.vision_tower = CLIPVisionTower(v)
        if config.projector_type == "mlp2x_gelu":
            self.projector = MLPProjector(v.hidden_size, t.hidden_size, depth=2)
        elif config.projector_type == "linear":
            self.projector = MLPProjector(v.hidden_size, t.hidden_size, depth=1)
        elif config.projector_type == "cluster":
            self.projector = ClusterProjector(v.hidden_size, t.hidden_size, config.cluster_centers,
                                              config.cluster_iters)
        else:
            raise ValueError(f"unknown projector_type {config.projector_type!r}: "
                             "expected mlp2x_gelu, linear or cluster")
        self.language_model = Llama(t)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def embed_images(self, pixel_values):
        """(N, 3, H, W) -> (N, image_seq_length, text hidden): the tokens that stand in for each image."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        return self.projector(self.vision_tower(pixel_values.to(dtype)))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with each image's placeholder run replaced by its features (nanoVLM-style)."""
        is_image = input_ids == self.config.image_token_id
        # placeholders may lie outside the vocabulary (original LLaVA: -200), so never look them up
        x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_placeholders = int(is_image.sum())
        if pixel_values is None:
            if n_placeholders:
                raise ValueError(f"input_ids hold {n_placeholders} image tokens "
                                 f"(id {self.config.image_token_id}) but no pixel_values were given")
            return x
        n_images = pixel_values.shape[0]
        L = self.config.image_seq_length
        if n_placeholders != n_images * L:
            raise ValueError(f"image token count mismatch: input_ids hold {n_placeholders} image tokens "
                             f"(id {self.config.image_token_id}) but {n_images} image(s) x {L} tokens = "
                             f"{n_images * L} are needed")
        feats = self.embed_images(pixel_values)  # (N, L, C)
        x = x.clone()  # leave the embedding output intact for autograd
        x[is_image] = feats.reshape(-1, feats.shape[-1]).to(x.dtype)  # row-major: image order = reading order
        return x

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, cache=None):
        """Final-norm hidden states (B, T, C)."""
        if attention_mask is None and cache is not None:  # without a cache None means plain causal attention
            attention_mask = torch.ones(input_ids.shape[0], cache.seen + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        return self.language_model(self.embed(input_ids, pixel_values), attention_mask, cache)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, cache=None):
        """input_ids (B, T), pixel_values (N, 3, H, W) or None, attention_mask (B, T) -> logits (B, T, V).

        With a cache, attention_mask covers the cached tokens too: (B, cache.seen + T).
        """
        return self.lm_head(self.hidden_states(input_ids, pixel_values, attention_mask, cache))

    def new_cache(self, batch, max_len):
        t = self.config.text
        p = self.lm_head.weight
        return KVCache(t.num_layers, batch, t.num_kv_heads, max_len, t.head_dim, p.dtype, p.device)

# -----------------------------------------------------------------------------
# Sampling and generation (gpt-fast `generate.py` shape: pure filters, then a prefill + decode loop)


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Temperature, then top-k, then top-p (nucleus), as transformers' logits warpers apply them.

    Removed tokens get -inf. Ties at the k-th value are kept; top-p keeps the smallest set of most
    likely tokens whose probability reaches top_p, and always at least one token.
    """
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p  # the low tail whose mass fits within 1 - top_p
        drop[..., -1] = False  # keep the most likely token no matter what
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) next tokens. temperature 0 is greedy (what VQA evaluation uses)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
    if isinstance(generator, (list, tuple)):  # one per row: a row's draws do not depend on its batch
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def mask_image_token(logits, image_token_id):
    """The image placeholder is never a valid output (llava-hf keeps it inside the vocabulary)."""
    if 0 <= image_token_id < logits.shape[-1]:
        logits[:, image_token_id] = float("-inf")
    return logits


def decode_one_token(model, token, input_pos, attention_mask, cache):
    """(B,) tokens written at cache slot input_pos (1,) -> (B, V) logits of the next ones.

    Static shapes (gpt-fast `decode_one_token`): attention_mask (B, max_len) spans the whole cache, the new
    key/value go in at a tensor index, and positions come from the mask, so torch.compile captures one graph
    (one CUDA graph with mode="reduce-overhead") and replays it at every step.
    """
    x = model.language_model.embed_tokens(token[:, None])  # (B, 1, C); never the image id (mask_image_token)
    h = model.language_model(x, attention_mask, cache, input_pos)
    return mask_image_token(model.lm_head(h[:, -1]), model.config.image_token_id)


# (backend, device type) -> compiled decode_one_token; dynamo keeps one graph per model and shape
_compiled = {}


def compiled_decode(backend, device):
    """decode_one_token under torch.compile, built once; on CUDA with inductor, as CUDA graphs
    ("reduce-overhead"): a decode step is hundreds of small kernels, and replaying them as one graph
    removes the launch overhead."""
    if (backend, device.type) not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        _compiled[backend, device.type] = torch.compile(decode_one_token, backend=backend, mode=mode,
                                                        fullgraph=True, dynamic=False)
    return _compiled[backend, device.type]


def static_cache(model, batch, max_len):
    """The cache compiled decoding reuses, kept on the model: CUDA graphs replay fixed addresses, so a
    new cache per call would be recorded again. Grows when a call needs more slots;
    `del model.decode_cache` frees it."""
    c = getattr(model, "decode_cache", None)
    w = model.lm_head.weight
    k = None if c is None else c.k[0]
    if k is None or k.shape[0] != batch or k.shape[2] < max_len or (k.dtype, k.device) != (w.dtype, w.device):
        c = model.decode_cache = model.new_cache(batch, max_len)
        # CUDA graphs refuse to mutate an input in place unless its address is marked static
        for t in c.k + c.v:
            torch._dynamo.mark_static_address(t)
    # an earlier call's values sit in masked slots; a zero weight times inf would still be NaN
    for t in c.k + c.v:
        t.zero_()
    c.seen = 0
    return c


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, temperature=0.0,
             top_k=None, top_p=None, eos_token_id=None, pad_token_id=0, generator=None, compile=False):
    """Batched decoding of left-padded prompts with a KV cache.

    Returns only the new tokens, (B, n <= max_new_tokens); a row that produced EOS keeps it and is
    filled with `pad_token_id` afterwards; decoding stops when every row is done.
    compile=True runs each decode step through torch.compile (inductor; CUDA graphs on a GPU), or pass
    a backend name ("aot_eager"); the first call per model, batch and length compiles (seconds to minutes).
    """
    B, T = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate expects left-padded prompts: the last column of attention_mask must be 1")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)
    cache = static_cache(model, B, T + max_new_tokens) if compile else model.new_cache(B, T + max_new_tokens)
    backend = "inductor" if compile is True else compile
    step = compiled_decode(backend, input_ids.device) if compile else decode_one_token
    h = model.hidden_states(input_ids, pixel_values, attention_mask, cache)  # prefill: (B, T, C)
    logits = mask_image_token(model.lm_head(h[:, -1]), model.config.image_token_id)  # (B, V)
    # from here the mask spans every cache slot: 1 for the tokens to come, hidden by causality until written
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, cache.k[0].shape[2] - T)], dim=1)
    input_pos = torch.tensor([T], device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(done, pad_token_id)
        out.append(token)
        done |= torch.isin(token, eos)
        if done.all() or i == max_new_tokens - 1:
            break
        if compile:  # the last step's logits are no longer read, so its CUDA graph output may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(model, token, input_pos, attention_mask, cache)  # decode one token
        input_pos += 1
    return torch.stack(out, dim=1)
