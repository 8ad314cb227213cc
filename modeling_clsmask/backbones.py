"""Pretrained ViT families read into the layout of `ClsMaskModel`.

Every family is a pre-norm ViT under other names; what differs is where the [CLS] token and the position embeddings
live, whether extra tokens exist (DeiT's distillation token, DINOv2's registers), a per-block LayerScale (DINOv2) and
a norm before the blocks (CLIP). Each reader turns a loaded transformers model into one `BackboneWeights`, which
`ClsMaskPreTrainedModel.from_pretrained_backbone` copies. LayerScale is folded into the output projections
(`o_proj`, `fc2`), so the block computation stays the plain ViT one and a saved model needs no LayerScale code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging


# model_type of the checkpoint -> family name recorded in `ClsMaskConfig.backbone_family`.
SUPPORTED_FAMILIES = {
    "vit": "vit",
    "deit": "deit",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
    "clip": "clip",
    "clip_vision_model": "clip",
}
# Hub examples, for messages and the README.
FAMILY_EXAMPLES = {
    "vit": "google/vit-base-patch16-224",
    "deit": "facebook/deit-small-distilled-patch16-224",
    "dinov2": "facebook/dinov2-small",
    "dinov2_with_registers": "facebook/dinov2-with-registers-small",
    "clip": "openai/clip-vit-base-patch16",
}


@dataclass
class BackboneWeights:
    """One pretrained ViT in this package's terms. Tensors are (1, n, D) for tokens and positions."""

    family: str
    config: dict
    patch_projection: dict
    cls_token: torch.Tensor
    cls_position: torch.Tensor
    patch_positions: torch.Tensor
    grid: tuple[int, int]
    layers: list[dict]
    final_norm: dict
    extra_tokens: torch.Tensor | None = None
    extra_positions: torch.Tensor | None = None
    pre_layernorm: dict | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    notes: list[str] = field(default_factory=list)


def _grid(image_size, patch_size: int) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)):
        return int(image_size[0]) // patch_size, int(image_size[1]) // patch_size
    return int(image_size) // patch_size, int(image_size) // patch_size


def _vit_config(source_config, intermediate_size: int) -> dict:
    return {
        "hidden_size": source_config.hidden_size,
        "num_hidden_layers": source_config.num_hidden_layers,
        "num_attention_heads": source_config.num_attention_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": source_config.hidden_act,
        "layer_norm_eps": source_config.layer_norm_eps,
        "image_size": source_config.image_size,
        "patch_size": source_config.patch_size,
        "num_channels": source_config.num_channels,
        "qkv_bias": getattr(source_config, "qkv_bias", True),
        "initializer_range": source_config.initializer_range,
    }


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _linear(module: nn.Linear, scale: torch.Tensor | None = None) -> dict:
    """A Linear's weights, with a LayerScale vector folded in: `scale * (W x + b) = (scale W) x + scale b`."""
    weight = module.weight.detach().clone()
    bias = module.bias.detach().clone() if module.bias is not None else torch.zeros(weight.shape[0])
    if scale is not None:
        weight = weight * scale[:, None]
        bias = bias * scale
    return {"weight": weight, "bias": bias}


def _block(q, k, v, o, norm_before, norm_after, fc1, fc2, scale1=None, scale2=None) -> dict:
    """A block's parameters under `ClsMaskLayer`'s names."""
    parts = {
        "attention.q_proj": _state(q),
        "attention.k_proj": _state(k),
        "attention.v_proj": _state(v),
        "attention.o_proj": _linear(o, scale1),
        "layernorm_before": _state(norm_before),
        "layernorm_after": _state(norm_after),
        "mlp.fc1": _state(fc1),
        "mlp.fc2": _linear(fc2, scale2),
    }
    return {f"{module}.{name}": value for module, params in parts.items() for name, value in params.items()}


def _attention_mlp_block(layer, norm_before, norm_after, scale1=None, scale2=None) -> dict:
    """`_block` of a layer with `attention.{q,k,v,o}_proj` and `mlp.fc1/fc2` (ViT, DeiT, DINOv2 in transformers 5)."""
    attention, mlp = layer.attention, layer.mlp
    scales = [None if scale is None else scale.detach() for scale in (scale1, scale2)]
    return _block(
        attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, norm_before, norm_after,
        mlp.fc1, mlp.fc2, *scales,
    )  # fmt: skip


def read_vit(source) -> BackboneWeights:
    """ViT and DeiT (`ViTModel`, `DeiTModel`): [CLS] (+ DeiT's distillation token, carried as a [REG] token)."""
    config = source.config
    embeddings = source.embeddings
    grid = _grid(config.image_size, config.patch_size)
    positions = embeddings.position_embeddings.detach()
    num_prefix = positions.shape[1] - grid[0] * grid[1]
    extra_tokens = extra_positions = None
    distillation = getattr(embeddings, "distillation_token", None)
    if distillation is not None:
        extra_tokens, extra_positions = distillation.detach(), positions[:, 1:2]
    layers = [_attention_mlp_block(layer, layer.layernorm_before, layer.layernorm_after) for layer in source.layers]
    return BackboneWeights(
        family=config.model_type,
        config=_vit_config(config, config.intermediate_size),
        patch_projection=_state(embeddings.patch_embeddings.projection),
        cls_token=embeddings.cls_token.detach(),
        cls_position=positions[:, :1],
        patch_positions=positions[:, num_prefix:],
        grid=grid,
        layers=layers,
        final_norm=_state(source.layernorm),
        extra_tokens=extra_tokens,
        extra_positions=extra_positions,
    )


def read_dinov2(source) -> BackboneWeights:
    """DINOv2 and DINOv2 with registers: LayerScale folded, `mask_token` ignored, registers (no position) as [REG]."""
    config = source.config
    if getattr(config, "use_swiglu_ffn", False):
        raise ValueError("DINOv2 checkpoints with a SwiGLU MLP (the giant model) are not supported; use ViT-S/B/L.")
    embeddings = source.embeddings
    grid = _grid(config.image_size, config.patch_size)
    positions = embeddings.position_embeddings.detach()
    registers = getattr(embeddings, "register_tokens", None)
    extra_tokens = extra_positions = None
    if registers is not None:
        extra_tokens = registers.detach()
        extra_positions = torch.zeros_like(extra_tokens)  # DINOv2's registers are added after the positions
    layers = [
        _attention_mlp_block(layer, layer.norm1, layer.norm2, layer.layer_scale1.lambda1, layer.layer_scale2.lambda1)
        for layer in source.encoder.layer
    ]
    return BackboneWeights(
        family=SUPPORTED_FAMILIES[config.model_type],
        config=_vit_config(config, int(config.hidden_size * config.mlp_ratio)),
        patch_projection=_state(embeddings.patch_embeddings.projection),
        cls_token=embeddings.cls_token.detach(),
        cls_position=positions[:, :1],
        patch_positions=positions[:, 1:],
        grid=grid,
        layers=layers,
        final_norm=_state(source.layernorm),
        extra_tokens=extra_tokens,
        extra_positions=extra_positions,
        notes=["LayerScale folded into o_proj and fc2", "mask_token ignored"],
    )


def read_clip(source) -> BackboneWeights:
    """CLIP's vision tower: class embedding, the norm before the blocks, quick_gelu, post_layernorm as final norm."""
    config = source.config
    tower = getattr(source, "vision_model", source)  # transformers 5 flattened the tower into the model
    embeddings = tower.embeddings
    grid = _grid(config.image_size, config.patch_size)
    positions = embeddings.position_embedding.weight.detach()[None]
    conv = embeddings.patch_embedding
    projection = {"weight": conv.weight.detach().clone(), "bias": torch.zeros(conv.out_channels)}
    layers = [
        _block(
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.out_proj,
            layer.layer_norm1,
            layer.layer_norm2,
            layer.mlp.fc1,
            layer.mlp.fc2,
        )  # fmt: skip
        for layer in tower.encoder.layers
    ]
    fields = _vit_config(config, config.intermediate_size)
    fields["qkv_bias"] = True
    return BackboneWeights(
        family="clip",
        config=fields,
        patch_projection=projection,
        cls_token=embeddings.class_embedding.detach().view(1, 1, -1),
        cls_position=positions[:, :1],
        patch_positions=positions[:, 1:],
        grid=grid,
        layers=layers,
        final_norm=_state(tower.post_layernorm),
        pre_layernorm=_state(tower.pre_layrnorm),
        notes=["pre-encoder layer norm kept", "post_layernorm is the final norm"],
    )


def normalisation(path: str) -> tuple[list[float] | None, list[float] | None]:
    """`image_mean` / `image_std` of a checkpoint's `preprocessor_config.json` (folder or Hub id); None if absent."""
    try:
        if os.path.isdir(path):
            file = os.path.join(path, "preprocessor_config.json")
            file = file if os.path.exists(file) else None
        else:
            from transformers.utils import cached_file

            file = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        file = None
    if not file:
        return None, None
    with open(file) as handle:
        processor = json.load(handle)
    return processor.get("image_mean"), processor.get("image_std")


def read_backbone(pretrained_model_name_or_path: str) -> BackboneWeights:
    """Load a checkpoint of a supported family and read it; an error names the families otherwise."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        supported = ", ".join(f"{family} (e.g. {example})" for family, example in FAMILY_EXAMPLES.items())
        raise ValueError(
            f"{pretrained_model_name_or_path} is a {model_type!r} checkpoint; backbones of these families can "
            f"initialise clsmask: {supported}."
        )
    family = SUPPORTED_FAMILIES[model_type]
    # A full CLIP folder loads as its vision tower; its text weights are not needed (transformers would list them).
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        if family == "clip":
            weights = read_clip(CLIPVisionModel.from_pretrained(pretrained_model_name_or_path))
        else:
            source = AutoModel.from_pretrained(pretrained_model_name_or_path)
            weights = read_dinov2(source) if family.startswith("dinov2") else read_vit(source)
    finally:
        logging.set_verbosity(verbosity)
    weights.image_mean, weights.image_std = normalisation(pretrained_model_name_or_path)
    return weights


def backbone_depth(pretrained_model_name_or_path: str) -> int:
    """The number of blocks of a checkpoint's vision encoder, from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
    return getattr(config, "vision_config", config).num_hidden_layers


def adapt_input_channels(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Patch filters for `num_channels` bands from the source's (RGB) ones: band k takes source filter k mod 3,
    divided by how many bands share it, so an input whose bands are all equal (a grey image) gives the source's
    response to that grey image."""
    source_channels = weight.shape[1]
    if num_channels == source_channels:
        return weight
    index = torch.arange(num_channels) % source_channels
    counts = torch.bincount(index, minlength=source_channels).to(weight.dtype)
    return weight[:, index] / counts[index].view(1, -1, 1, 1)


def resize_positions(positions: torch.Tensor, source_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1, h*w, D) patch position embeddings on another grid, bicubic in float32 (as ViT and DINOv2 do)."""
    if tuple(source_grid) == tuple(grid):
        return positions
    dim = positions.shape[-1]
    image = positions.reshape(1, *source_grid, dim).permute(0, 3, 1, 2)
    image = nn.functional.interpolate(image.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return image.to(positions.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


__all__ = [
    "FAMILY_EXAMPLES", "SUPPORTED_FAMILIES", "BackboneWeights", "backbone_depth", "read_backbone", "resize_positions",
]  # fmt: skip
