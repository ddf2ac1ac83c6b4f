"""Plain-torch OpenAI CLIP for the tests: run OpenAI-layout weights without tipr's code.

``to_openai`` writes a Hugging Face ``CLIPModel`` in OpenAI's layout (by hand, the inverse of
``tipr.convert``); ``openai_tokens`` / ``openai_forward`` run such weights, and ``openai_block``,
``_ln``, ``_linear``, ``_attention`` and ``_layers`` are the pieces reference forwards (IRRA's,
SEN's) are built from. ``irra_head_shapes`` / ``random_irra_heads`` / ``reference_state_dict``
write an IRRA ``best.pth``'s state dict (the CLIP under ``base_model.``, IRRA's heads beside it).
"""

import math

import torch
import torch.nn.functional as F


def to_openai(clip) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPModel`` in OpenAI's layout, written out by hand (the inverse of the conversion)."""
    hf = {key: value.detach().clone() for key, value in clip.state_dict().items()}
    openai = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t().contiguous(),  # used as x @ proj
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": hf["logit_scale"],
    }
    towers = (
        ("visual.transformer", "vision_model.encoder", clip.config.vision_config.num_hidden_layers),
        ("transformer", "text_model.encoder", clip.config.text_config.num_hidden_layers),
    )
    for ours, theirs, layers in towers:
        for i in range(layers):
            a, b = f"{ours}.resblocks.{i}.", f"{theirs}.layers.{i}."
            for kind in ("weight", "bias"):
                openai[f"{a}attn.in_proj_{kind}"] = torch.cat([hf[f"{b}self_attn.{x}_proj.{kind}"] for x in "qkv"])
                for old, new in (
                    ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2"),
                ):
                    openai[f"{a}{old}.{kind}"] = hf[f"{b}{new}.{kind}"]
    return openai


def _ln(w, x, name):
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)


def _linear(w, x, name):
    return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]


def _attention(q, k, v, heads):
    """Scaled dot-product attention of (B, Nq, W) queries over (B, Nk, W) keys/values, ``heads`` heads."""
    b, nq, width = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores, v, (b, nq, width)


def openai_block(w, x, name, causal=False):
    """An OpenAI CLIP ResidualAttentionBlock: width // 64 heads, QuickGELU, LayerNorm eps 1e-5."""
    n = x.shape[1]
    qkv = _ln(w, x, f"{name}.ln_1") @ w[f"{name}.attn.in_proj_weight"].t() + w[f"{name}.attn.in_proj_bias"]
    scores, v, shape = _attention(*qkv.chunk(3, dim=-1), heads=x.shape[-1] // 64)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(shape)
    x = x + _linear(w, attended, f"{name}.attn.out_proj")
    hidden = _linear(w, _ln(w, x, f"{name}.ln_2"), f"{name}.mlp.c_fc")
    return x + _linear(w, hidden * torch.sigmoid(1.702 * hidden), f"{name}.mlp.c_proj")  # QuickGELU


def _layers(w, prefix):
    return sum(key.startswith(prefix) and key.endswith(".attn.in_proj_weight") for key in w)


def openai_tokens(weights, images, token_ids, ids_keep=None):
    """OpenAI CLIP (IRRA's ``base_model``) on its own tensors: image tokens (B, 1 + K, E) after
    ``ln_post`` and ``proj`` (only the patches ``ids_keep``, CLS always, when given) and text tokens
    (B, L, E) after ``ln_final`` and ``text_projection``."""
    w = {key: value.float() for key, value in weights.items()}
    patch = w["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, w["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)  # (B, N, W)
    x = torch.cat([w["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + w["visual.positional_embedding"]
    if ids_keep is not None:
        kept = torch.gather(x[:, 1:], 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], kept], dim=1)
    x = _ln(w, x, "visual.ln_pre")
    for i in range(_layers(w, "visual.transformer.resblocks.")):
        x = openai_block(w, x, f"visual.transformer.resblocks.{i}")
    image = _ln(w, x, "visual.ln_post") @ w["visual.proj"]

    t = w["token_embedding.weight"][token_ids] + w["positional_embedding"][: token_ids.shape[1]]
    for i in range(_layers(w, "transformer.resblocks.")):
        t = openai_block(w, t, f"transformer.resblocks.{i}", causal=True)
    text = _ln(w, t, "ln_final") @ w["text_projection"]
    return image, text


def openai_forward(weights: dict[str, torch.Tensor], images: torch.Tensor, token_ids: torch.Tensor):
    """OpenAI CLIP's forward on its own tensors: image features (B, E) and text features (B, E)."""
    image, text = openai_tokens(weights, images, token_ids)
    return image[:, 0], text[torch.arange(text.shape[0]), token_ids.argmax(dim=-1)]  # argmax: end-of-text


def irra_head_shapes(width: int, vocab: int, num_classes: int, depth: int) -> dict[str, tuple[int, ...]]:
    """IRRA's own modules beside ``base_model``, under the authors' names, with their shapes:
    ``width`` the CLIP projection width, ``vocab`` the text vocabulary, ``depth`` the cmt_depth."""
    shapes = {
        "classifier.weight": (num_classes, width), "classifier.bias": (num_classes,),
        "cross_attn.in_proj_weight": (3 * width, width), "cross_attn.in_proj_bias": (3 * width,),
        "cross_attn.out_proj.weight": (width, width), "cross_attn.out_proj.bias": (width,),
        "mlm_head.dense.weight": (width, width), "mlm_head.dense.bias": (width,),
        "mlm_head.ln.weight": (width,), "mlm_head.ln.bias": (width,),
        "mlm_head.fc.weight": (vocab, width), "mlm_head.fc.bias": (vocab,),
    }
    for name in ("ln_pre_t", "ln_pre_i", "ln_post"):
        shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})
    for i in range(depth):
        a = f"cross_modal_transformer.resblocks.{i}."
        shapes.update({
            a + "attn.in_proj_weight": (3 * width, width), a + "attn.in_proj_bias": (3 * width,),
            a + "attn.out_proj.weight": (width, width), a + "attn.out_proj.bias": (width,),
            a + "ln_1.weight": (width,), a + "ln_1.bias": (width,),
            a + "mlp.c_fc.weight": (4 * width, width), a + "mlp.c_fc.bias": (4 * width,),
            a + "mlp.c_proj.weight": (width, 4 * width), a + "mlp.c_proj.bias": (width,),
            a + "ln_2.weight": (width,), a + "ln_2.bias": (width,),
        })
    return shapes


def random_irra_heads(
    generator: torch.Generator, width: int, vocab: int, num_classes: int, depth: int
) -> dict[str, torch.Tensor]:
    """IRRA's heads (:func:`irra_head_shapes`) with seeded values far from any default init:
    layer-norm weights around 1 (not all 1), biases nonzero, matrices N(0, 1 / fan_in), so a
    swapped, transposed or mis-split tensor changes the losses."""
    heads = {}
    for key, shape in irra_head_shapes(width, vocab, num_classes, depth).items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 2:
            heads[key] = noise / shape[1] ** 0.5
        elif key.endswith(".weight"):  # a layer norm's gain
            heads[key] = 1 + 0.2 * noise
        else:
            heads[key] = 0.1 * noise
    return heads


def reference_state_dict(clip, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of an authors' (IRRA/SEN) ``best.pth``: ``clip`` (a Hugging Face
    ``CLIPModel``) in OpenAI's layout under ``base_model.`` (no logit_scale, as IRRA saves it),
    ``heads`` beside it."""
    model = {"base_model." + key: value for key, value in to_openai(clip).items() if key != "logit_scale"}
    model.update(heads)
    return model


def reference_sdm_and_id(w, i_feats, t_feats, pids, temperature):
    """IRRA's ``compute_sdm`` (logit scale 1 / temperature, eps 1e-8 in the target's log) and
    ``compute_id`` (one classifier for both modalities, the mean of the two CEs), in plain torch.

    Returns ``(sdm, id, t2i, labels)``: the cosine matrix (texts x images) and same-identity mask for
    losses built on them (SEN's triplet).
    """
    labels = (pids[:, None] == pids[None, :]).float()
    image_norm = i_feats / i_feats.norm(dim=1, keepdim=True)
    text_norm = t_feats / t_feats.norm(dim=1, keepdim=True)
    t2i = text_norm @ image_norm.t()
    target = labels / labels.sum(dim=1)
    sdm = 0.0
    for logits in (t2i.t() / temperature, t2i / temperature):
        kl = F.softmax(logits, dim=1) * (F.log_softmax(logits, dim=1) - torch.log(target + 1e-8))
        sdm = sdm + kl.sum(dim=1).mean()
    id_loss = (F.cross_entropy(_linear(w, i_feats, "classifier"), pids)
               + F.cross_entropy(_linear(w, t_feats, "classifier"), pids)) / 2
    return sdm, id_loss, t2i, labels
