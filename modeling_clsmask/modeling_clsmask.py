"""PyTorch class-token ViT of "Know Your Attention Maps: Class-specific Token Masking for WSSS" (ICCV 2025).

The sequence is C class tokens (one per label), the patch tokens and R [REG] tokens. Each class token is read by the
multi-label classifier; during training the output of the token of an absent class is zeroed at random, so that
each token carries its own class and its attention over the patches localises it. Optional Hard Concrete gates
prune attention heads.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple, logging

from .backbones import BackboneWeights, adapt_input_channels, read_backbone, resize_positions
from .configuration_clsmask import ClsMaskConfig, check_attention_map_scales, check_refinement_iterations
from .pseudo_masks import normalize_maps, working_size


logger = logging.get_logger(__name__)

# Written into every saved config: a stage-1 checkpoint loads as a base model, classifier or segmenter.
AUTO_MAP = {
    "AutoConfig": "configuration_clsmask.ClsMaskConfig",
    "AutoModel": "modeling_clsmask.ClsMaskModel",
    "AutoModelForImageClassification": "modeling_clsmask.ClsMaskForMultiLabelClassification",
    "AutoModelForSemanticSegmentation": "modeling_clsmask.ClsMaskForSemanticSegmentation",
}
# `pipeline("image-segmentation", model=<folder>, trust_remote_code=True)` picks this pipeline class.
CUSTOM_PIPELINES = {
    "image-segmentation": {
        "impl": "pipeline_clsmask.ClsMaskSegmentationPipeline",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "image",
    }
}


@dataclass
class ClsMaskModelOutput(ModelOutput):
    """
    last_hidden_state: (B, C + N + R, D) after the final layer norm; class tokens first, registers last.
    class_attentions: per layer that was asked for, (B, heads, C, C + N + R): the attention rows of the class tokens.
    hidden_states / attentions: as in transformers (attentions are full (B, heads, T, T) rows, computed explicitly).
    image_branch_inputs: (B, N + R, D) the patch and register states where the image branch forks off (with
        `config.image_branch_layers`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    class_attentions: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_branch_inputs: torch.FloatTensor | None = None


@dataclass
class ClsMaskClassifierOutput(ModelOutput):
    """
    loss: BCE (+ L0 gate penalty, + the patch classifier's weighted BCE, + the image branch's BCE) when `labels` is
        given.
    logits: (B, C) image class logits (sigmoid for probabilities): the class tokens' readout, averaged with the
        patch classifier's image logits when it is on (two heads on one backbone; the average ranks classes better
        than either alone); with an image branch (`config.image_branch_layers`), the branch's, blended with the
        patch classifier's by `config.image_branch_logit_weight`.
    class_maps: (B, C, h, w) one pass's class maps (`config.class_map_source`; by default the class-to-patch
        attention aggregated over heads and the chosen layers), when asked for.
    class_attentions: the attention rows of the class tokens, per layer asked for.
    l0_loss: the gate penalty before weighting (expected number of open gates), when gates are used.
    patch_logits: (B, C) the patch classifier's image logits (pooled from its patch logits), when it is on.
    class_token_logits: (B, C) the class tokens' readout alone (equal to `logits` without the patch classifier).
    image_branch_logits: (B, C) the image branch's logits, when there is one.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    patch_logits: torch.FloatTensor | None = None
    class_token_logits: torch.FloatTensor | None = None
    image_branch_logits: torch.FloatTensor | None = None
    class_maps: torch.FloatTensor | None = None
    class_attentions: tuple[torch.FloatTensor, ...] | None = None
    l0_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ClsMaskSemanticSegmenterOutput(ModelOutput):
    """
    logits: (B, num_labels, h, w) scores on the maps' grid: the normalised class map for classes taken as present
        (the most probable one when none is), -1 elsewhere. Their argmax is a coarse mask without background;
        `ClsMaskImageProcessor.post_process_semantic_segmentation` builds the pseudo-mask from `class_maps`,
        `class_probs` and `present` instead.
    class_maps: (B, C, h, w): from `forward`, one pass's class maps on the patch grid (`config.class_map_source`); from
        `predict_class_maps`, after the configured map processing.
    class_logits / class_probs: (B, C) image-level outputs. present: (B, C) bool, classes used for the masks.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    class_logits: torch.FloatTensor | None = None
    class_probs: torch.FloatTensor | None = None
    class_maps: torch.FloatTensor | None = None
    present: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def conv_stem_strides(patch_size: int) -> list[int]:
    """Strides of the convolutional stem: 2 while the patch size allows, then the remaining factor (if any)."""
    strides, rest = [], patch_size
    while rest % 2 == 0 and rest > 1:
        strides.append(2)
        rest //= 2
    if rest > 1:
        strides.append(rest)
    return strides or [1]


class ClsMaskPatchEmbeddings(nn.Module):
    """Patch grid of token vectors from an image; checks the input so errors name the problem.

    `patch_embedding_type="patchify"` is ViT's single patch convolution (`projection`), which ViT/DeiT weights fill.
    `"conv"` is an early convolutional stem (Xiao et al., 2021, "Early convolutions help transformers see better"):
    3x3 convolutions with batch norm and ReLU, stride 2 each, down to the patch grid, then a 1x1 `projection`. A ViT
    trained from scratch on a few thousand images learns colour-independent shape with it and barely at all
    without it.
    """

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        hidden = config.hidden_size
        if config.patch_embedding_type == "patchify":
            self.stem = None
            self.projection = nn.Conv2d(config.num_channels, hidden, config.patch_size, config.patch_size)
            return
        strides = conv_stem_strides(config.patch_size)
        layers, channels = [], config.num_channels
        for index, stride in enumerate(strides):
            width = max(16, hidden // 2 ** (len(strides) - 1 - index))
            kernel = 3 if stride <= 2 else stride
            padding = 1 if stride <= 2 else 0
            for repeat in range(config.conv_stem_depth):
                layers += [
                    nn.Conv2d(channels, width, kernel, stride, padding, bias=False)
                    if repeat == 0
                    else nn.Conv2d(width, width, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.stem = nn.Sequential(*layers)
        self.projection = nn.Conv2d(channels, hidden, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be a 4-D tensor (batch, channels, height, width); "
                f"got shape {tuple(pixel_values.shape)}."
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects num_channels={self.num_channels}. "
                "Convert the images (e.g. to RGB) or build the model with a matching `num_channels`."
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the patch size {self.patch_size}; resize or pad "
                "the images to a multiple of it."
            )
        if self.stem is not None:
            pixel_values = self.stem(pixel_values)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ClsMaskEmbeddings(nn.Module):
    """[C class tokens][patch tokens][R register tokens], each with a learnable position embedding.

    Patch position embeddings are interpolated bicubically to other grids (non-square included), so the model
    runs at any size divisible by the patch size.
    """

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        num_classes = config.num_labels
        self.patch_embeddings = ClsMaskPatchEmbeddings(config)
        self.grid_size = (
            config.image_grid_size[0] // config.patch_size,
            config.image_grid_size[1] // config.patch_size,
        )
        self.class_tokens = nn.Parameter(torch.zeros(1, num_classes, hidden))
        self.class_position_embeddings = nn.Parameter(torch.zeros(1, num_classes, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden))
        if config.num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden))
            self.register_position_embeddings = nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden))
        else:
            self.register_tokens = None
            self.register_position_embeddings = None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Patch position embeddings for a (grid_height, grid_width) patch grid."""
        return resize_positions(self.position_embeddings, self.grid_size, (grid_height, grid_width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch = pixel_values.shape[0]
        patches = self.patch_embeddings(pixel_values)
        grid = patch_grid(pixel_values, self.config.patch_size)
        parts = [
            (self.class_tokens + self.class_position_embeddings).expand(batch, -1, -1),
            patches + self.interpolate_pos_encoding(*grid),
        ]
        if self.register_tokens is not None:
            parts.append((self.register_tokens + self.register_position_embeddings).expand(batch, -1, -1))
        return self.dropout(torch.cat(parts, dim=1))


class ClsMaskHeadGate(nn.Module):
    """Hard Concrete gates (Louizos et al., 2018), one per attention head, with an L0 penalty.

    Training: stochastic stretched-and-clipped sample, made hard at 0.5 with a straight-through gradient.
    Eval: deterministic `clip(sigmoid(log_alpha) * (high - low) + low, 0, 1)`, so a closed head is exactly 0.
    """

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.temperature = config.gate_temperature
        self.low = config.gate_limit_low
        self.high = config.gate_limit_high
        self.log_alpha = nn.Parameter(torch.zeros(config.num_attention_heads))

    def forward(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
            soft = (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)
            hard = (soft > 0.5).to(soft.dtype)
            return hard + (soft - soft.detach())  # exactly 0 or 1 in value, gradient of soft
        return self.deterministic()

    def deterministic(self) -> torch.Tensor:
        """Eval-mode gate values, whatever mode the module is in."""
        return (torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def l0_norm(self) -> torch.Tensor:
        """Expected number of open gates, sum_h P(gate_h != 0)."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.low / self.high)).sum()


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ClsMaskSelfAttention(nn.Module):
    """Multi-head self-attention with optional per-head gates on the head outputs.

    Gating the head output equals gating its attention map (the value product is linear), and keeps fused kernels
    (sdpa, flash) usable in training. The class tokens' attention rows are computed explicitly only when asked
    for, as C x T instead of T x T. `gated_rows` limits the gates to the first query rows: with hidden class tokens
    they gate the class tokens' rows only, so the patch rows stay the backbone's.
    """

    def __init__(self, config: ClsMaskConfig, gated: bool = True):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        inner = config.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size)
        self.head_gate = ClsMaskHeadGate(config) if gated and config.use_head_gates else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_class_attentions: bool = False,
        output_attentions: bool = False,
        num_queries: int | None = None,
        attention_mask: torch.Tensor | None = None,
        gated_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`num_queries`: attend from the first `num_queries` tokens only (keys and values stay all tokens).
        `attention_mask`: additive (1, 1, T, T) mask (0 or a large negative), sliced to the queries used.
        `gated_rows`: the gates act on the first `gated_rows` query rows only (None: on all)."""
        batch, length, _ = hidden_states.shape
        num_queries = num_queries or length
        shape = (batch, -1, self.num_attention_heads, self.head_dim)
        query = self.q_proj(hidden_states[:, :num_queries]).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)

        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :num_queries].to(query.dtype)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        if self.head_gate is not None and gated_rows != 0:
            gate = self.head_gate().to(attn_output.dtype)[None, None, :, None]
            if gated_rows is None or gated_rows >= num_queries:
                attn_output = attn_output * gate
            else:
                attn_output = torch.cat([attn_output[:, :gated_rows] * gate, attn_output[:, gated_rows:]], dim=1)
        attn_output = self.o_proj(attn_output.reshape(batch, num_queries, -1))

        class_attentions = None
        if output_class_attentions:
            num_classes = self.config.num_labels
            scores = torch.matmul(query[:, :, :num_classes], key.transpose(2, 3)) * self.scaling
            if attention_mask is not None:
                scores = scores + attention_mask[:, :, :num_classes]
            class_attentions = scores.softmax(dim=-1, dtype=torch.float32)
        if output_attentions and attn_weights is None:
            scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
            if attention_mask is not None:
                scores = scores + attention_mask
            attn_weights = scores.softmax(-1, dtype=torch.float32)
        return attn_output, class_attentions, attn_weights if output_attentions else None

    def head_weights(self) -> torch.Tensor:
        """Weights for averaging heads into class maps: uniform over open heads (closed gates excluded)."""
        if self.head_gate is None:
            return torch.full(
                (self.num_attention_heads,), 1.0 / self.num_attention_heads, device=self.q_proj.weight.device
            )
        open_heads = (self.head_gate.deterministic().detach() > 0).float()
        if open_heads.sum() == 0:
            return torch.zeros_like(open_heads)
        return open_heads / open_heads.sum()


class ClsMaskMLP(nn.Module):
    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ClsMaskLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block, with the module names of transformers' `ViTLayer`. `gated`: its heads get Hard
    Concrete gates when `config.use_head_gates` (the image branch's blocks have none)."""

    def __init__(self, config: ClsMaskConfig, gated: bool = True):
        super().__init__()
        self.attention = ClsMaskSelfAttention(config, gated)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClsMaskMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_class_attentions: bool = False,
        output_attentions: bool = False,
        num_queries: int | None = None,
        attention_mask: torch.Tensor | None = None,
        gated_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """With `num_queries`, only the first `num_queries` tokens are updated and returned; `gated_rows`: as in
        `ClsMaskSelfAttention`."""
        attn_output, class_attentions, attentions = self.attention(
            self.layernorm_before(hidden_states),
            output_class_attentions,
            output_attentions,
            num_queries,
            attention_mask,
            gated_rows,
        )
        hidden_states = hidden_states[:, : attn_output.shape[1]] + self.dropout(attn_output)
        hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states, class_attentions, attentions


class ClsMaskClassTokenReadout(nn.Module):
    """`logit_c = w . t_c + b_c`: one readout vector shared by all class tokens, a bias per class.

    With the paper's flattened Linear every class token can carry the same whole-image summary and the class split
    happens in the weights; a shared readout leaves the split to the tokens, so each token (and its attention) must
    follow its own class. A masked (zeroed) token gives exactly `b_c`.
    """

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.num_labels))

    def forward(self, class_states: torch.Tensor) -> torch.Tensor:
        return self.dense(class_states).squeeze(-1) + self.bias


class ClsMaskPatchClassifier(nn.Module):
    """A linear classifier on every final patch token (PatchCAM). The class tokens pool the patches through a
    softmax, which rewards the few most telling patches; a classifier trained through the *mean* of per-patch logits
    must find its class on every patch that holds it, which is what a mask needs."""

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, patch_states: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens -> (B, N, C) patch logits."""
        return self.dense(patch_states)

    def pool(self, patch_logits: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch logits -> (B, C) image logits: per class, the mean of its highest
        `config.patch_classifier_top_fraction` of patch logits."""
        num_patches = patch_logits.shape[1]
        keep = max(1, math.ceil(self.config.patch_classifier_top_fraction * num_patches))
        if keep >= num_patches:
            return patch_logits.mean(1)
        return patch_logits.topk(keep, dim=1).values.mean(1)


class ClsMaskImageBranch(nn.Module):
    """The image logits from a fine-tuned copy of the last `image_branch_layers` blocks: a linear head on the last
    [REG] token (a pretrained backbone's [CLS]) and the mean patch token after its own final norm.

    Why a copy: blocks fine-tuned on image labels rank classes better than any head on the frozen ones, but their class
    attention and patch features make worse maps; the branch learns for classification alone and the maps keep the
    blocks as they were."""

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([ClsMaskLayer(config, gated=False) for _ in range(config.image_branch_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_labels)

    @torch.no_grad()
    def start_from(self, base: "ClsMaskModel") -> None:
        """Copy the base model's last blocks and final norm (a pretrained backbone's) into the branch."""
        for branch_layer, layer in zip(self.layers, base.layers[-len(self.layers) :]):
            state = {key: value for key, value in layer.state_dict().items() if "head_gate" not in key}
            branch_layer.load_state_dict(state)
        self.layernorm.load_state_dict(base.layernorm.state_dict())

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(B, N + R, D) patch and register states where the branch forks off -> (B, C) image logits."""
        for layer in self.layers:
            states = layer(states, False, False)[0]
        states = self.layernorm(states)
        patches = states[:, : states.shape[1] - self.config.num_register_tokens]
        return self.classifier(torch.cat([states[:, -1], patches.mean(1)], dim=-1))


class ClsMaskMapRefinement(nn.Module):
    """Pixel-adaptive refinement of class maps with the input image (the PAR module of Ru et al., CVPR 2022, as ToCo
    uses it on its pseudo-labels). Not in the paper, which uses the maps as they are.

    Why: class-token attention sits on the patch grid and peaks on one or two patches of its object, so thresholded
    maps are blobs at the right place that miss thin parts and spill over edges. Each iteration replaces every
    pixel's map value by a weighted mean over a sparse neighbourhood (the 8 neighbours at each of the dilations),
    weighted by how alike the input bands are (softmax over the neighbours of `-(|I_j - I_i| / (sigma * s_i))^2`,
    averaged over bands, `s_i` the bands' spread over the neighbourhood) plus a small term for nearness. The weights
    sum to one, so the maps keep their units; mass flows inside regions of like colour and hardly across edges.
    It has no parameters: it is inference-time processing, like the test-time scales.
    """

    # Weight of the nearness term against the colour term (ToCo's value).
    POSITION_WEIGHT = 0.01

    def __init__(self, config: ClsMaskConfig):
        super().__init__()
        self.config = config

    def offsets(self) -> list[tuple[int, int]]:
        """(dy, dx) of the neighbourhood: the 8 neighbours at each dilation."""
        return [
            (dy * d, dx * d)
            for d in self.config.attention_map_refinement_dilations
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if dy or dx
        ]

    @staticmethod
    def neighbours(values: torch.Tensor, offsets: list[tuple[int, int]], reach: int):
        """Yield (..., H, W) views of `values` shifted by each offset, borders replicated."""
        height, width = values.shape[-2:]
        padded = nn.functional.pad(values, (reach, reach, reach, reach), mode="replicate")
        for dy, dx in offsets:
            yield padded[..., reach + dy : reach + dy + height, reach + dx : reach + dx + width]

    def affinity(self, image: torch.Tensor, offsets: list[tuple[int, int]], reach: int) -> torch.Tensor:
        """(B, N, H, W) weights of the N neighbours of every pixel; they sum to one over N."""
        count = len(offsets)
        around = list(self.neighbours(image, offsets, reach))  # views of one padded copy
        mean = sum(around) / count
        spread = (sum((n - mean) ** 2 for n in around) / max(count - 1, 1)).sqrt()
        scale = (spread + 1e-8) * self.config.attention_map_refinement_sigma
        logits = torch.stack([-(((n - image).abs() / scale) ** 2).mean(1) for n in around], dim=1)
        distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], device=image.device)
        nearness = -((distance / distance.std().clamp_min(1e-8) / self.config.attention_map_refinement_sigma) ** 2)
        weights = logits.softmax(1) + self.POSITION_WEIGHT * nearness.softmax(0).view(1, count, 1, 1)
        return weights / weights.sum(1, keepdim=True)

    @torch.no_grad()
    def forward(self, class_maps: torch.Tensor, pixel_values: torch.Tensor, iterations: int) -> torch.Tensor:
        """(B, C, h, w) maps -> (B, C, H, W) maps after `iterations` rounds, at the input's resolution (at most
        `MAX_WORKING_SIZE` on the longer side, aspect kept), in the maps' dtype."""
        size = working_size(tuple(pixel_values.shape[-2:]))
        image = pixel_values.float()
        if tuple(image.shape[-2:]) != size:
            image = nn.functional.interpolate(image, size=size, mode="area")
        maps = nn.functional.interpolate(class_maps.float(), size=size, mode="bilinear", align_corners=False)
        offsets = self.offsets()
        reach = max(self.config.attention_map_refinement_dilations)
        weights = self.affinity(image, offsets, reach)
        for _ in range(iterations):
            refined = torch.zeros_like(maps)
            for index, shifted in enumerate(self.neighbours(maps, offsets, reach)):
                refined += shifted * weights[:, index : index + 1]
            maps = refined
        return maps.to(class_maps.dtype)


class ClsMaskPreTrainedModel(PreTrainedModel):
    config: ClsMaskConfig
    config_class = ClsMaskConfig
    base_model_prefix = "clsmask"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ClsMaskEmbeddings", "ClsMaskLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus: `auto_map` for every head, and the custom image-segmentation pipeline with the files
        it imports (the image processor's), so the folder holds all the code its config names."""
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        here = os.path.dirname(os.path.abspath(__file__))
        pipeline_file = os.path.join(here, "pipeline_clsmask.py")
        if os.path.exists(pipeline_file):  # absent when this class itself came from a Hub module cache
            self.config.custom_pipelines = {
                **CUSTOM_PIPELINES,
                **(getattr(self.config, "custom_pipelines", None) or {}),
            }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.exists(pipeline_file) and kwargs.get("is_main_process", True):
            for name in ("pipeline_clsmask.py", "image_processing_clsmask.py"):
                shutil.copy(os.path.join(here, name), os.path.join(save_directory, name))
        return result

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if self.config.weight_init == "fan_in" and isinstance(module, (nn.Linear, nn.Conv2d)):
            # PyTorch's own default (uniform, bound 1/sqrt(fan_in)): with transformers' std 0.02 a small ViT
            # trained from scratch stays at the label prior; with this it learns (measured, see README).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        if isinstance(module, ClsMaskEmbeddings):
            for param in (module.class_tokens, module.class_position_embeddings, module.position_embeddings):
                init.trunc_normal_(param, mean=0.0, std=std)
            if module.register_tokens is not None:
                init.trunc_normal_(module.register_tokens, mean=0.0, std=std)
                init.trunc_normal_(module.register_position_embeddings, mean=0.0, std=std)
        elif isinstance(module, ClsMaskHeadGate):
            # 3 opens every gate fully at the start (eval value clip(1.04) = 1); 0 is the public code's start.
            init.constant_(module.log_alpha, self.config.gate_log_alpha_init)
        elif isinstance(module, ClsMaskClassTokenReadout):
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained_backbone(
        cls, pretrained_model_name_or_path: str, id2label: dict[int, str] | None = None, **overrides
    ) -> "ClsMaskPreTrainedModel":
        """Initialise from a pretrained ViT of any supported family (a folder or a Hub id): ViT, DeiT, DINOv2,
        DINOv2 with registers, CLIP (vision tower or full model). See `backbones.py`.

        Copies the patch embedding, every block, the final norm (and CLIP's pre-encoder norm); the [CLS] token and
        its position embedding initialise every class token; the source's extra tokens (DeiT's distillation token,
        DINOv2's registers) and one more started as [CLS] are the [REG] tokens (unless `num_register_tokens` is
        given: the source's extra tokens first, the rest as [CLS]). `overrides` set other config fields:
        `image_size` (positions interpolated), `num_channels` (new bands from the RGB filters),
        `num_hidden_layers` (the first N blocks), `num_register_tokens`, gates, maps; fields that would need
        weights the source does not have (`hidden_size`, `patch_size`, ...) are refused with a message.
        """
        weights = read_backbone(pretrained_model_name_or_path)
        fields = dict(weights.config)
        fixed = ("hidden_size", "num_attention_heads", "intermediate_size", "patch_size", "hidden_act", "qkv_bias")
        for name in fixed:
            if name in overrides and overrides[name] is not None and overrides[name] != fields[name]:
                raise ValueError(
                    f"{name}={overrides[name]!r} cannot be used with the pretrained {weights.family} backbone "
                    f"{pretrained_model_name_or_path}, whose {name} is {fields[name]!r}: drop the option or train "
                    "from scratch."
                )
        depth = overrides.get("num_hidden_layers")
        if depth is not None and not 1 <= depth <= fields["num_hidden_layers"]:
            raise ValueError(
                f"num_hidden_layers={depth}: the backbone has {fields['num_hidden_layers']} blocks; a clsmask model "
                f"initialised from it can keep its first 1..{fields['num_hidden_layers']} blocks."
            )
        if overrides.get("patch_embedding_type", "patchify") != "patchify":
            raise ValueError(
                "A pretrained backbone fills ViT's patch projection: patch_embedding_type must be 'patchify'."
            )
        if id2label is not None:
            fields["id2label"] = {int(k): v for k, v in id2label.items()}
            fields["label2id"] = {v: int(k) for k, v in id2label.items()}
        # The source's extra tokens and one [REG] started as [CLS]: where the class tokens join late, that [REG]
        # carries the source's [CLS] through the blocks before them (without it DINOv2-S patch features degrade:
        # frozen CAM 0.15 against 0.20 on CamVid tiles; docs/results.md).
        extra = 0 if weights.extra_tokens is None else weights.extra_tokens.shape[1]
        fields["num_register_tokens"] = extra + 1
        fields.update(
            patch_embedding_type="patchify",
            backbone_family=weights.family,
            pre_layernorm=weights.pre_layernorm is not None,
            weight_init="normal",
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        model = cls(ClsMaskConfig(**fields))
        model.load_backbone_weights(weights)
        model.backbone_normalisation = (weights.image_mean, weights.image_std)
        return model

    @classmethod
    def from_vit_pretrained(
        cls, pretrained_model_name_or_path: str, id2label: dict[int, str] | None = None, **overrides
    ) -> "ClsMaskPreTrainedModel":
        """`from_pretrained_backbone` for ViT and DeiT checkpoints only (the entry point before other families)."""
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(pretrained_model_name_or_path).model_type
        if model_type not in ("vit", "deit"):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {model_type!r} checkpoint; from_vit_pretrained expects a ViT "
                "or DeiT checkpoint (from_pretrained_backbone takes DINOv2 and CLIP too)."
            )
        return cls.from_pretrained_backbone(pretrained_model_name_or_path, id2label=id2label, **overrides)

    @torch.no_grad()
    def load_backbone_weights(self, weights: BackboneWeights) -> None:
        """Copy a `BackboneWeights` (see `backbones.py`) into this model."""
        base = self.base_model
        embeddings = base.embeddings
        projection = dict(weights.patch_projection)
        projection["weight"] = adapt_input_channels(projection["weight"], self.config.num_channels)
        embeddings.patch_embeddings.projection.load_state_dict(projection)
        embeddings.position_embeddings.copy_(
            resize_positions(weights.patch_positions, weights.grid, embeddings.grid_size)
        )
        embeddings.class_position_embeddings.copy_(
            weights.cls_position.expand_as(embeddings.class_position_embeddings)
        )
        embeddings.class_tokens.copy_(weights.cls_token.expand_as(embeddings.class_tokens))
        if embeddings.register_tokens is not None:
            count = embeddings.register_tokens.shape[1]
            tokens = weights.cls_token.expand(1, count, -1).clone()
            positions = weights.cls_position.expand(1, count, -1).clone()
            if weights.extra_tokens is not None:
                carried = min(count, weights.extra_tokens.shape[1])
                tokens[:, :carried] = weights.extra_tokens[:, :carried]
                positions[:, :carried] = weights.extra_positions[:, :carried]
            embeddings.register_tokens.copy_(tokens)
            embeddings.register_position_embeddings.copy_(positions)
        for layer, state in zip(base.layers, weights.layers):
            missing, unexpected = layer.load_state_dict(state, strict=False)
            missing = [key for key in missing if "head_gate" not in key]
            if missing or unexpected:
                raise ValueError(
                    f"Backbone blocks do not match this model: missing {missing}, unexpected {unexpected}."
                )
        if weights.pre_layernorm is not None:
            base.pre_layernorm.load_state_dict(weights.pre_layernorm)
        base.layernorm.load_state_dict(weights.final_norm)
        if getattr(self, "image_branch", None) is not None:
            self.image_branch.start_from(base)
        readout = getattr(self, "classifier", None)
        if isinstance(readout, ClsMaskClassTokenReadout):
            # Every class token starts as the same [CLS]; a zero readout first learns what separates present from
            # absent tokens and only then moves the tokens, instead of pushing them along a random direction (the
            # maps of a random start varied by 0.1 mIoU between seeds; docs/results.md).
            readout.dense.weight.zero_()

    def class_maps_from_attentions(
        self, class_attentions: tuple[torch.Tensor, ...], grid: tuple[int, int], layers: list[int]
    ) -> torch.Tensor:
        """Class-to-patch attention, heads averaged (closed gates excluded) and layers summed: (B, C, h, w)."""
        base = self.base_model
        num_classes = self.config.num_labels
        num_patches = grid[0] * grid[1]
        maps = 0
        for attention, index in zip(class_attentions, layers):
            weights = base.layers[index].attention.head_weights().to(attention.dtype)
            patch_attention = attention[..., num_classes : num_classes + num_patches]
            maps = maps + torch.einsum("bhcn,h->bcn", patch_attention, weights)
        return maps.reshape(-1, num_classes, *grid)


def propagate_by_affinity(class_maps: torch.Tensor, patch_states: torch.Tensor, power: float) -> torch.Tensor:
    """(B, C, h, w) maps spread over patches of like features: `m_i <- sum_j A_ij m_j`, with the rows of `A`
    proportional to `max(cos(p_i, p_j), 0) ** power` of the (B, h*w, D) patch tokens. Total map mass is kept."""
    batch, classes, height, width = class_maps.shape
    features = nn.functional.normalize(patch_states.float(), dim=-1)
    affinity = (features @ features.transpose(1, 2)).clamp_min(0) ** power
    affinity = affinity / affinity.sum(-1, keepdim=True).clamp_min(1e-12)
    maps = class_maps.float().flatten(2) @ affinity.transpose(1, 2)
    return maps.view(batch, classes, height, width).to(class_maps.dtype)


def diversity_loss(class_maps: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of ||G - I||_F, G the Gram matrix of the L2-normalised flattened class maps (C x C).

    With `present` (B, C), only pairs of classes present in the image count: pushing apart the maps of classes that
    are not in the image (as the public code does) spends the loss on maps nobody uses.
    """
    flat = nn.functional.normalize(class_maps.flatten(2).float(), dim=-1)
    gram = flat @ flat.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    difference = gram - eye
    if present is not None:
        present = present.bool().float()
        difference = difference * (present.unsqueeze(2) * present.unsqueeze(1))
    return difference.flatten(1).norm(dim=1).mean()


def class_token_isolation_mask(
    num_classes: int,
    num_patches: int,
    num_registers: int,
    device: torch.device,
    isolate: bool = True,
    hide: bool = False,
) -> torch.Tensor:
    """Additive (1, 1, T, T) mask, 0 or the float32 minimum. `isolate`: class-token queries see the patches and
    themselves only. `hide`: patch and [REG] queries do not see the class tokens. Order: class tokens, patches,
    registers.
    """
    length = num_classes + num_patches + num_registers
    rows = torch.arange(length, device=device).view(-1, 1)
    cols = torch.arange(length, device=device).view(1, -1)
    is_patch = (cols >= num_classes) & (cols < num_classes + num_patches)
    blocked = (rows < num_classes) & ~is_patch & (rows != cols) & isolate
    blocked = blocked | ((rows >= num_classes) & (cols < num_classes) & hide)
    mask = torch.zeros(length, length, device=device)
    return mask.masked_fill(blocked, torch.finfo(torch.float32).min)[None, None]


def patch_grid(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(rows, columns) of patches of a (B, C, H, W) input."""
    return pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size


def scaled_size(height: int, width: int, scale: float, patch_size: int) -> tuple[int, int]:
    """(H, W) times `scale`, rounded to the nearest multiple of the patch size (at least one patch)."""
    return (
        max(patch_size, round(height * scale / patch_size) * patch_size),
        max(patch_size, round(width * scale / patch_size) * patch_size),
    )


class ClsMaskModel(ClsMaskPreTrainedModel):
    """The bare class-token ViT: embeddings, blocks and a final layer norm."""

    def __init__(self, config: ClsMaskConfig):
        super().__init__(config)
        self.embeddings = ClsMaskEmbeddings(config)
        # CLIP's vision tower normalises the token sequence before the first block.
        self.pre_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else None
        )
        # With hidden class tokens the gates act on the class tokens' rows only (`class_rows_gated`): blocks without
        # class tokens get none, and the patch rows stay the backbone's.
        first = self.first_class_token_layer()
        self.layers = nn.ModuleList(
            [
                ClsMaskLayer(config, gated=not config.hide_class_tokens or index >= first)
                for index in range(config.num_hidden_layers)
            ]
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def first_class_token_layer(self) -> int:
        """Index of the first block the class tokens take part in (0 unless `class_token_layers` is set)."""
        joined = self.config.class_token_layers or self.config.num_hidden_layers
        return self.config.num_hidden_layers - joined

    def class_token_attention_mask(self, num_patches: int, device: torch.device) -> torch.Tensor | None:
        """The additive mask that `class_token_isolation` and `hide_class_tokens` ask for (None where neither does)."""
        if not (self.config.class_token_isolation or self.config.hide_class_tokens):
            return None
        return class_token_isolation_mask(
            self.config.num_labels,
            num_patches,
            self.config.num_register_tokens,
            device,
            isolate=self.config.class_token_isolation,
            hide=self.config.hide_class_tokens,
        )

    def class_rows_gated(self) -> int | None:
        """`gated_rows` of a block call that includes the class tokens: with hidden class tokens, the class rows (the
        gates then choose the heads the class tokens read through and whose attention makes the maps, and leave the
        patch rows, which the class tokens cannot reach, to the backbone); else every row (the paper's gates)."""
        return self.config.num_labels if self.config.hide_class_tokens else None

    def image_branch_layer(self) -> int | None:
        """Index of the block the image branch forks off before (None without a branch)."""
        if not self.config.image_branch_layers:
            return None
        return self.config.num_hidden_layers - self.config.image_branch_layers

    def block_inputs_layer(self) -> int:
        """Index of the first block whose input depends on more than the image: where the class tokens join or the
        image branch forks off, whichever is earlier. `class_block_inputs` are the states entering it."""
        first = self.first_class_token_layer()
        fork = self.image_branch_layer()
        return first if fork is None else min(first, fork)

    def patch_rows_are_frozen(self) -> bool:
        """Whether the patch and [REG] rows of the blocks with class tokens depend on nothing that learns: the class
        tokens are hidden from them (`hide_class_tokens`) and no parameter of those blocks learns (the pretrained
        preset). Head gates do not count: with hidden class tokens they act on the class rows only."""
        if not self.config.hide_class_tokens:
            return False
        layers = self.layers[self.first_class_token_layer() :]
        return not any(p.requires_grad for name, p in layers.named_parameters() if "head_gate" not in name)

    def patch_rows_need_no_graph(self, output_attentions: bool) -> bool:
        """Whether the patch and [REG] rows of the blocks with class tokens run without autograd: while gradients are
        recorded and `patch_rows_are_frozen`. Recording them would only backpropagate zeros, at the cost of a block's
        backward pass."""
        return not output_attentions and torch.is_grad_enabled() and self.patch_rows_are_frozen()

    @torch.no_grad()
    def frozen_patch_states(self, block_inputs: torch.Tensor) -> torch.Tensor:
        """(B, L, N + R, D) from `class_block_inputs`: the patch and [REG] rows entering each of the L - 1 blocks with
        class tokens and leaving the last (before the final norm). Where `patch_rows_are_frozen` they are a function
        of the image, so they can be cached beside the block inputs and training runs only the class rows and the
        image branch (`forward(block_inputs=..., frozen_patch_states=...)`)."""
        if not self.patch_rows_are_frozen():
            raise ValueError(
                "frozen_patch_states need patch rows that nothing learning reaches: hide_class_tokens=True, no head "
                "gates and every block with class tokens frozen."
            )
        states, kept, first = block_inputs, [], self.first_class_token_layer()
        for index in range(self.block_inputs_layer(), len(self.layers)):
            if index >= first:
                kept.append(states)
            states = self.layers[index](states, False, False, gated_rows=0)[0]
        return torch.stack([*kept, states], dim=1)

    def forward_from_patch_states(
        self,
        block_inputs: torch.Tensor,
        patch_states: torch.Tensor,
        wanted: set[int],
        class_tokens_only: bool,
    ) -> ClsMaskModelOutput:
        """`forward` from `block_inputs` and their `frozen_patch_states`: only the class rows run, each block's as
        queries over the class rows and the patch states entering it."""
        first, num_classes = self.first_class_token_layer(), self.config.num_labels
        blocks = len(self.layers) - first
        if patch_states.shape[1] != blocks + 1 or patch_states.shape[2] != block_inputs.shape[1]:
            raise ValueError(
                f"frozen_patch_states of shape {tuple(patch_states.shape)} do not fit {blocks} blocks with class "
                f"tokens and {block_inputs.shape[1]} patch and [REG] rows: compute them with "
                "frozen_patch_states(block_inputs)."
            )
        num_patches = block_inputs.shape[1] - self.config.num_register_tokens
        attention_mask = self.class_token_attention_mask(num_patches, block_inputs.device)
        class_rows = self.class_token_embeddings(block_inputs.shape[0]).to(block_inputs.dtype)
        class_attentions = () if wanted else None
        for offset, layer in enumerate(self.layers[first:]):
            states = torch.cat([class_rows, patch_states[:, offset]], dim=1)
            class_rows, attention, _ = layer(
                states, first + offset in wanted, False, num_classes, attention_mask, gated_rows=num_classes
            )
            if first + offset in wanted:
                class_attentions += (attention,)
        hidden_states = class_rows if class_tokens_only else torch.cat([class_rows, patch_states[:, -1]], dim=1)
        fork = self.image_branch_layer()
        branch_inputs = None
        if fork is not None:
            branch_inputs = block_inputs if fork == self.block_inputs_layer() else patch_states[:, fork - first]
        return ClsMaskModelOutput(
            last_hidden_state=self.layernorm(hidden_states),
            class_attentions=class_attentions,
            image_branch_inputs=branch_inputs,
        )

    def class_rows_through(
        self,
        layer: ClsMaskLayer,
        hidden_states: torch.Tensor,
        output_class_attentions: bool,
        attention_mask: torch.Tensor,
        only_class_rows: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block as `patch_rows_need_no_graph` allows: the class rows with autograd, as queries over every token,
        the patch and [REG] rows without (hidden class tokens cannot reach them, so they are those of the joint
        block); with `only_class_rows`, only the class rows come back."""
        num_classes = self.config.num_labels
        class_rows, class_attentions, _ = layer(
            hidden_states, output_class_attentions, False, num_classes, attention_mask, gated_rows=num_classes
        )
        if only_class_rows:
            return class_rows, class_attentions
        with torch.no_grad():
            rest = layer(hidden_states[:, num_classes:], False, False, gated_rows=0)[0]
        return torch.cat([class_rows, rest], dim=1), class_attentions

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C + N + R, D) the tokens as they enter block 0: embedded, then the pre-encoder norm if there is one."""
        hidden_states = self.embeddings(pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype))
        return hidden_states if self.pre_layernorm is None else self.pre_layernorm(hidden_states)

    @torch.no_grad()
    def states_before(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        """(B, N + R, D): the patch and register states entering block `index`, at or before the class tokens'
        first block (they do not exist before it)."""
        hidden_states = self.embed(pixel_values)[:, self.config.num_labels :]
        for layer in self.layers[:index]:
            hidden_states = layer(hidden_states, False, False)[0]
        return hidden_states

    def class_block_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N + R, D): the patch and register states entering `block_inputs_layer()` (the first block the class
        tokens join, or the image branch's fork if earlier).

        Neither class tokens nor the branch take part before that block, so with the blocks below it frozen these
        states are a fixed function of the image: training can compute them once and pass them as
        `forward(block_inputs=...)`."""
        return self.states_before(pixel_values, self.block_inputs_layer())

    @torch.no_grad()
    def class_block_register_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, R, D): the register tokens' states at the input of the first block the class tokens join.

        With a pretrained backbone the last register is the source's [CLS], so this is its state where the class
        tokens start reading (what `init_class_tokens` starts them from)."""
        if self.config.num_register_tokens < 1:
            raise ValueError("The model has no register token, so there is no [CLS] state to start class tokens from.")
        return self.states_before(pixel_values, self.first_class_token_layer())[:, -self.config.num_register_tokens :]

    def class_token_embeddings(self, batch: int) -> torch.Tensor:
        """(B, C, D) the class tokens as they enter the encoder (position added; the pre-encoder norm where the
        backbone has one), for a forward from `block_inputs`."""
        embeddings = self.embeddings
        tokens = (embeddings.class_tokens + embeddings.class_position_embeddings).expand(batch, -1, -1)
        tokens = embeddings.dropout(tokens)
        return tokens if self.pre_layernorm is None else self.pre_layernorm(tokens)

    @torch.no_grad()
    def init_class_tokens(self, states: torch.Tensor) -> None:
        """Set the class tokens so that class c enters its first block as `states[c]` (C, D), position included."""
        if self.pre_layernorm is not None:
            raise ValueError(
                "The class tokens pass the pre-encoder norm (CLIP's pre_layernorm) before their first block, so no "
                "token enters it as a given state; keep the tokens' own initialisation (--class_token_init embedding)."
            )
        tokens, positions = self.embeddings.class_tokens, self.embeddings.class_position_embeddings
        if states.shape != tokens.shape[1:]:
            raise ValueError(f"states must be (num_labels, hidden_size) = {tuple(tokens.shape[1:])}.")
        tokens.copy_(states.unsqueeze(0).to(tokens) - positions)

    def class_attention_layers(self, num_layers: int | None = None) -> list[int]:
        """Indices of the blocks whose class attention makes the maps: the last `num_layers` when given, else
        `config.attention_map_layer_ids` when set, else the last `config.attention_map_layers`."""
        if num_layers is None and self.config.attention_map_layer_ids:
            return sorted(int(i) for i in self.config.attention_map_layer_ids)
        num_layers = num_layers or self.config.attention_map_layers
        total = self.config.num_hidden_layers
        available = total - self.first_class_token_layer()
        if not 1 <= num_layers <= available:
            raise ValueError(
                f"attention_map_layers must lie in [1, {available}] (blocks with class tokens), got {num_layers}."
            )
        return list(range(total - num_layers, total))

    def head_gates(self) -> list[ClsMaskHeadGate]:
        """The gates of the gated blocks, in order (every block, or with hidden class tokens those with class
        tokens)."""
        gates = [layer.attention.head_gate for layer in self.layers]
        return [gate for gate in gates if gate is not None]

    def l0_norm(self) -> torch.Tensor | None:
        """Expected number of open head gates over the gated blocks (None without gates)."""
        if not self.config.use_head_gates:
            return None
        return torch.stack([gate.l0_norm() for gate in self.head_gates()]).sum()

    def gate_values(self) -> torch.Tensor | None:
        """(gated blocks, heads) deterministic gate values; 0 means the head is pruned."""
        if not self.config.use_head_gates:
            return None
        return torch.stack([gate.deterministic().detach() for gate in self.head_gates()])

    def drop_patches(self, hidden_states: torch.Tensor, num_patches: int) -> tuple[torch.Tensor, int]:
        """Keep a random `1 - patch_dropout` share of the patch tokens of each image (training only).

        Hide-and-seek for class tokens: a class token that cannot count on its single most telling patch being there
        learns to attend to every patch of its class, which is what a pseudo-mask needs; it also makes the blocks
        cheaper. Class and register tokens are always kept.
        """
        num_classes = self.config.num_labels
        keep = max(1, round(num_patches * (1.0 - self.config.patch_dropout)))
        batch, _, dim = hidden_states.shape
        order = torch.rand(batch, num_patches, device=hidden_states.device).argsort(dim=1)[:, :keep]
        patches = hidden_states[:, num_classes : num_classes + num_patches]
        kept = patches.gather(1, (order.sort(dim=1).values).unsqueeze(-1).expand(-1, -1, dim))
        hidden_states = torch.cat(
            [hidden_states[:, :num_classes], kept, hidden_states[:, num_classes + num_patches :]], dim=1
        )
        return hidden_states, keep

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_class_attentions: bool = False,
        attention_map_layers: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        class_tokens_only: bool = False,
        block_inputs: torch.Tensor | None = None,
        frozen_patch_states: torch.Tensor | None = None,
        **kwargs,
    ) -> ClsMaskModelOutput | tuple:
        """
        pixel_values: (B, num_channels, H, W), H and W divisible by the patch size (any size: position embeddings
            are interpolated).
        output_class_attentions: return the class tokens' attention rows of the last `attention_map_layers` blocks.
        class_tokens_only: the last block updates only the class tokens and `last_hidden_state` is (B, C, D).
            Heads that read only the class tokens skip the last block's patch-token work (a 1/num_layers saving).
        block_inputs: instead of `pixel_values`, the (B, N + R, D) states of `class_block_inputs`: the pass starts
            at the first block with class tokens (the earlier blocks' hidden states and attentions do not exist).
        frozen_patch_states: with `block_inputs`, their `frozen_patch_states`: only the class rows run.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if (pixel_values is None) == (block_inputs is None):
            raise ValueError("Pass exactly one of pixel_values and block_inputs.")
        if frozen_patch_states is not None and block_inputs is None:
            raise ValueError("frozen_patch_states come with the block_inputs they were computed from.")
        start = 0
        if block_inputs is not None:
            if output_attentions or output_hidden_states:
                raise ValueError("block_inputs skip the blocks below the class tokens: no attentions or hidden states")
            start = self.block_inputs_layer()
            class_tokens = self.class_token_embeddings(block_inputs.shape[0]).to(block_inputs.dtype)
            hidden_states = torch.cat([class_tokens, block_inputs], dim=1)
            num_patches = block_inputs.shape[1] - self.config.num_register_tokens
        else:
            hidden_states = self.embed(pixel_values)
            rows, cols = patch_grid(pixel_values, self.config.patch_size)
            num_patches = rows * cols
        wanted = set(self.class_attention_layers(attention_map_layers)) if output_class_attentions else set()
        if frozen_patch_states is not None:
            if not self.patch_rows_are_frozen():
                raise ValueError("frozen_patch_states need patch_rows_are_frozen(): a block with class tokens learns.")
            return self.forward_from_patch_states(block_inputs, frozen_patch_states, wanted, class_tokens_only)
        if (
            block_inputs is None
            and self.training
            and self.config.patch_dropout > 0
            and not (output_class_attentions or output_attentions)
        ):
            # Rows asked for must cover every patch (attentions, class maps), so dropout skips those calls.
            hidden_states, num_patches = self.drop_patches(hidden_states, num_patches)

        attention_mask = self.class_token_attention_mask(num_patches, hidden_states.device)

        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        class_attentions = () if output_class_attentions else None
        last = len(self.layers) - 1
        num_classes = self.config.num_labels
        first_class_layer = self.first_class_token_layer()
        fork, branch_inputs = self.image_branch_layer(), None
        frozen_patch_rows = self.patch_rows_need_no_graph(bool(output_attentions))
        for index, layer in enumerate(self.layers):
            if index < start:
                continue  # computed before: block_inputs
            if index == fork:
                branch_inputs = hidden_states[:, num_classes:]
            if index < first_class_layer:
                # Class tokens have not joined yet: the block runs on patches and registers only.
                rest, _, layer_attentions = layer(hidden_states[:, num_classes:], False, bool(output_attentions))
                hidden_states = torch.cat([hidden_states[:, :num_classes], rest], dim=1)
                if output_attentions:
                    layer_attentions = nn.functional.pad(layer_attentions, (num_classes, 0, num_classes, 0))
                    all_attentions += (layer_attentions,)
                if output_hidden_states:
                    all_hidden += (hidden_states,)
                continue
            num_queries = num_classes if class_tokens_only and index == last else None
            if frozen_patch_rows:
                hidden_states, layer_class_attentions = self.class_rows_through(
                    layer, hidden_states, index in wanted, attention_mask, only_class_rows=num_queries is not None
                )
                layer_attentions = None
            else:
                hidden_states, layer_class_attentions, layer_attentions = layer(
                    hidden_states,
                    index in wanted,
                    bool(output_attentions),
                    num_queries,
                    attention_mask,
                    self.class_rows_gated(),
                )
            if index in wanted:
                class_attentions += (layer_class_attentions,)
            if output_attentions:
                all_attentions += (layer_attentions,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.layernorm(hidden_states)
        output = ClsMaskModelOutput(
            last_hidden_state=hidden_states,
            class_attentions=class_attentions,
            hidden_states=all_hidden,
            attentions=all_attentions,
            image_branch_inputs=branch_inputs,
        )
        return output


class ClsMaskForMultiLabelClassification(ClsMaskPreTrainedModel):
    """Multi-label classifier on the class-token outputs (shared readout, or the paper's flattened Linear); BCE;
    class-specific token masking in training."""

    def __init__(self, config: ClsMaskConfig):
        super().__init__(config)
        self.clsmask = ClsMaskModel(config)
        self.map_refinement = ClsMaskMapRefinement(config)
        self.patch_classifier = ClsMaskPatchClassifier(config) if config.use_patch_classifier else None
        if config.classifier_type == "shared":
            self.classifier = ClsMaskClassTokenReadout(config)
        else:
            self.classifier = nn.Linear(config.num_labels * config.hidden_size, config.num_labels)
        # Built last and on a forked random stream: every other part starts as it would without the branch.
        with torch.random.fork_rng(devices=[]):
            self.image_branch = ClsMaskImageBranch(config) if config.image_branch_layers else None
        self.post_init()

    def check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Validate (B, C) multi-hot labels so a wrong shape or value fails loudly, not as a silent broadcast."""
        num_classes = self.config.num_labels
        if labels.shape != (batch, num_classes):
            raise ValueError(
                f"labels must be multi-hot of shape (batch, num_labels) = ({batch}, {num_classes}); "
                f"got {tuple(labels.shape)}."
            )
        if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("labels must be multi-hot: every entry 0 or 1.")
        return labels.float()

    def token_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: class tokens to zero. Absent classes only, each with probability `token_mask_rate`."""
        draw = torch.rand(labels.shape, device=labels.device) < self.config.token_mask_rate
        return draw & (labels == 0)

    def classify(
        self, class_states: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logits from the class-token outputs; in training, absent classes' tokens are masked first."""
        batch = class_states.shape[0]
        if labels is not None:
            labels = self.check_labels(labels, batch)
        if self.training and labels is not None and self.config.token_mask_rate > 0:
            class_states = class_states * (~self.token_mask(labels)).unsqueeze(-1).to(class_states.dtype)
        if self.config.classifier_type == "shared":
            logits = self.classifier(class_states)
        else:
            logits = self.classifier(class_states.flatten(1))
        loss = l0 = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
            l0 = self.clsmask.l0_norm()
            if l0 is not None:
                loss = loss + self.config.l0_penalty * l0
        return logits, loss, l0

    @torch.no_grad()
    def predict_class_maps(
        self,
        pixel_values: torch.Tensor,
        image_labels: torch.Tensor | None = None,
        scales: list[float] | None = None,
        flip: bool | None = None,
        refinement_iterations: int | None = None,
        affinity_power: float | None = None,
        attention_map_layers: int | None = None,
    ) -> ClsMaskSemanticSegmenterOutput:
        """The maps masks are made from: one pass, then the configured map processing. Every argument left at
        `None` takes the config's `attention_map_*` field, so a call states what it overrides.

        Steps: class attention of the input as given; propagation over like patches (`affinity_power`); the average
        over input `scales` (and horizontal flips, `flip`) on the finest grid; `refinement_iterations` rounds of the
        pixel-adaptive refinement (the maps then come at the input's resolution). `forward` is the first step only.
        The classes used are `image_labels` when given (the WSSS protocol), else the predicted ones. Masks:
        `ClsMaskImageProcessor.post_process_semantic_segmentation(outputs, ...)`.
        """
        config = self.config
        scales = check_attention_map_scales(config.attention_map_scales if scales is None else scales)
        flip = config.attention_map_flip if flip is None else bool(flip)
        iterations = refinement_iterations
        if iterations is None:
            iterations = config.attention_map_refinement_iterations
        check_refinement_iterations(iterations)
        power = config.attention_map_affinity_power if affinity_power is None else float(affinity_power)
        outputs, maps = self.one_pass(pixel_values, power, attention_map_layers)
        logits = self.pass_logits(outputs)
        if list(scales) != [1.0] or flip:
            maps, more_logits = self.augmented_class_maps(
                pixel_values, maps, scales, flip, power, attention_map_layers
            )
            logits = torch.stack([logits.float(), *(extra.float() for extra in more_logits)]).mean(0)
        if iterations > 0:
            maps = self.map_refinement(maps, pixel_values, iterations)
        return segmenter_output(self, logits, maps, image_labels)

    def pass_logits(self, outputs: ClsMaskModelOutput) -> torch.Tensor:
        """(B, C) image logits of one pass: the image branch's (blended with the patch classifier's, `with_branch`),
        else the class-token readout averaged with the patch classifier's when on."""
        patch_logits = self.patch_image_logits(outputs) if self.patch_classifier is not None else None
        if self.image_branch is not None:
            return self.with_branch(self.image_branch(outputs.image_branch_inputs), patch_logits)
        logits, _, _ = self.classify(outputs.last_hidden_state[:, : self.config.num_labels], None)
        return self.image_logits(logits, patch_logits)

    def with_branch(self, branch_logits: torch.Tensor, patch_logits: torch.Tensor | None) -> torch.Tensor:
        """The image logits with a branch: `config.image_branch_logit_weight` of the branch's, the rest of the patch
        classifier's (the config refuses a weight below 1 without it)."""
        weight = self.config.image_branch_logit_weight
        if weight >= 1.0:
            return branch_logits
        return weight * branch_logits + (1.0 - weight) * patch_logits

    def augmented_class_maps(
        self,
        pixel_values: torch.Tensor,
        class_maps: torch.Tensor,
        scales: list[float],
        flip: bool,
        power: float,
        attention_map_layers: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`class_maps` (those of the input as given) averaged with the maps of the other `scales` and flips, and
        the image logits of those passes that the image logits average: the flipped input at its own size, and with
        `config.image_logits_over_scales` every rescaled pass too.

        Every pass's map is put in units of attention per scale-1 patch and enlarged (bilinear) to the finest grid
        among the passes, so an upscaled pass adds the resolution of its finer patch grid. A flip keeps what the
        classifier was trained on; a rescaled input does not, which a pretrained backbone's heads tolerate (and
        gain from upscaled) and a small ViT trained from scratch at one size need not.
        """
        height, width = pixel_values.shape[-2:]
        patch = self.config.patch_size
        base_patches = class_maps.shape[-2] * class_maps.shape[-1]
        passes, logits = [], []
        for scale in scales:
            size = scaled_size(height, width, scale, patch)
            scaled = pixel_values
            if size != (height, width):
                scaled = nn.functional.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                if size == (height, width) and not flipped:
                    passes.append(class_maps.float())
                    continue
                inputs = scaled.flip(-1) if flipped else scaled
                outputs, maps = self.one_pass(inputs, power, attention_map_layers)
                if size == (height, width) or self.config.image_logits_over_scales:
                    logits.append(self.pass_logits(outputs))
                passes.append(maps.float().flip(-1) if flipped else maps.float())
        grid = max((tuple(maps.shape[-2:]) for maps in passes), key=lambda shape: shape[0] * shape[1])
        total = 0
        for maps in passes:
            density = maps * (maps.shape[-2] * maps.shape[-1] / base_patches)
            total = total + nn.functional.interpolate(density, size=grid, mode="bilinear", align_corners=False)
        return (total / len(passes)).to(class_maps.dtype), logits

    def one_pass(
        self, pixel_values: torch.Tensor, power: float, attention_map_layers: int | None = None
    ) -> tuple[ClsMaskModelOutput, torch.Tensor]:
        """The base model's outputs for one input as given, and its (B, C, h, w) maps, propagated by patch affinity
        when `power` > 0 (the final patch tokens are computed only then)."""
        outputs = self.clsmask(
            pixel_values,
            return_dict=True,
            output_class_attentions=True,
            attention_map_layers=attention_map_layers,
            class_tokens_only=not power and self.patch_classifier is None,
        )
        maps = self.raw_class_maps(pixel_values, outputs, attention_map_layers)
        return outputs, self.affinity_maps(maps, outputs, power)

    def raw_class_maps(
        self, pixel_values: torch.Tensor, outputs: ClsMaskModelOutput, attention_map_layers: int | None = None
    ) -> torch.Tensor:
        """(B, C, h, w) class maps of one pass on its patch grid, from `config.class_map_source`."""
        grid = patch_grid(pixel_values, self.config.patch_size)
        source = self.config.class_map_source
        if source == "cam":
            return self.cam_maps(outputs, grid)
        layers = self.clsmask.class_attention_layers(attention_map_layers)
        maps = self.class_maps_from_attentions(outputs.class_attentions, grid, layers)
        if source in ("attention_cam", "attention_cam_mean"):
            attention, cams = normalize_maps(maps.float()), normalize_maps(self.cam_maps(outputs, grid).float())
            fused = (attention * cams).sqrt() if source == "attention_cam" else (attention + cams) / 2
            maps = fused.to(maps.dtype)
        return maps

    def patch_tokens(self, outputs: ClsMaskModelOutput) -> torch.Tensor:
        """(B, N, D) final patch tokens of `outputs` (class tokens first, registers last)."""
        states = outputs.last_hidden_state
        return states[:, self.config.num_labels : states.shape[1] - self.config.num_register_tokens]

    def patch_image_logits(self, outputs: ClsMaskModelOutput) -> torch.Tensor:
        """(B, C) the patch classifier's image logits, pooled from its patch logits (`pool`)."""
        return self.patch_classifier.pool(self.patch_classifier(self.patch_tokens(outputs)))

    @staticmethod
    def image_logits(class_token_logits: torch.Tensor, patch_logits: torch.Tensor | None) -> torch.Tensor:
        """The image logits the model reports: the average of its two heads when the patch classifier is on."""
        if patch_logits is None:
            return class_token_logits
        return (class_token_logits + patch_logits) / 2

    def cam_maps(self, outputs: ClsMaskModelOutput, grid: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) patch-classifier logits on the patch grid (probabilities with `config.cam_probability`)."""
        scores = self.patch_classifier(self.patch_tokens(outputs))
        if self.config.cam_probability:
            scores = scores.sigmoid()
        return scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)

    def affinity_maps(self, class_maps: torch.Tensor, outputs: ClsMaskModelOutput, power: float) -> torch.Tensor:
        """`propagate_by_affinity` with the final patch tokens of `outputs`, when `power` > 0."""
        if not power:
            return class_maps
        return propagate_by_affinity(class_maps, self.patch_tokens(outputs), power)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_class_maps: bool = False,
        attention_map_layers: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        block_inputs: torch.Tensor | None = None,
        frozen_patch_states: torch.Tensor | None = None,
    ) -> ClsMaskClassifierOutput | tuple:
        """One pass, the same in training and inference (test-time passes and refinement: `predict_class_maps`).

        labels: (B, num_labels) multi-hot image labels. They give the loss and, in training, which tokens may be
            masked.
        output_class_maps: also return the (B, C, h, w) class maps on the patch grid (and the class attention rows).
        block_inputs: instead of `pixel_values`, `clsmask.class_block_inputs(pixel_values)` computed before (a
            frozen backbone's features cached for training); no class maps then (they need the image's grid).
        frozen_patch_states: with `block_inputs`, `clsmask.frozen_patch_states(block_inputs)` computed before: only
            the class rows and the image branch run.
        """
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        diversity = self.training and labels is not None and self.config.diversity_loss_coefficient > 0
        output_class_maps = output_class_maps or diversity
        if block_inputs is not None and output_class_maps:
            raise ValueError("Class maps (output_class_maps, the diversity loss) need pixel_values, not block_inputs.")
        outputs = self.clsmask(
            pixel_values,
            block_inputs=block_inputs,
            frozen_patch_states=frozen_patch_states,
            return_dict=True,
            output_class_attentions=output_class_maps,
            attention_map_layers=attention_map_layers,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            class_tokens_only=not (output_attentions or output_hidden_states or self.patch_classifier is not None),
        )
        class_states = outputs.last_hidden_state[:, : self.config.num_labels]
        class_token_logits, loss, l0 = self.classify(class_states, labels)
        patch_logits = None
        if self.patch_classifier is not None:
            patch_logits = self.patch_image_logits(outputs)
            if labels is not None:
                patch_loss = nn.functional.binary_cross_entropy_with_logits(patch_logits.float(), labels.float())
                loss = loss + self.config.patch_classifier_loss_weight * patch_loss
        logits = self.image_logits(class_token_logits, patch_logits)
        branch_logits = None
        if self.image_branch is not None:
            branch_logits = self.image_branch(outputs.image_branch_inputs)
            logits = self.with_branch(branch_logits, patch_logits)
            if labels is not None:
                loss = loss + nn.functional.binary_cross_entropy_with_logits(branch_logits.float(), labels.float())
        class_maps = self.raw_class_maps(pixel_values, outputs, attention_map_layers) if output_class_maps else None
        if diversity:
            present = self.check_labels(labels, class_maps.shape[0])
            loss = loss + self.config.diversity_loss_coefficient * diversity_loss(class_maps, present)
        output = ClsMaskClassifierOutput(
            loss=loss,
            logits=logits,
            patch_logits=patch_logits,
            class_token_logits=class_token_logits,
            image_branch_logits=branch_logits,
            class_maps=class_maps,
            class_attentions=outputs.class_attentions,
            l0_loss=l0,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output


def segmenter_output(
    model: ClsMaskForMultiLabelClassification,
    class_logits: torch.Tensor,
    class_maps: torch.Tensor,
    image_labels: torch.Tensor | None,
    loss: torch.Tensor | None = None,
    hidden_states=None,
    attentions=None,
) -> ClsMaskSemanticSegmenterOutput:
    """The segmentation output of class logits and maps: probabilities, the classes used (`image_labels` when given,
    else those at or above `class_threshold`), and scores whose argmax is a coarse mask."""
    probs = class_logits.float().sigmoid()
    if image_labels is not None:
        present = model.check_labels(image_labels, probs.shape[0]).bool()
    else:
        present = probs >= model.config.class_threshold
    shown = present.clone()
    none = ~shown.any(dim=1)
    shown[none, probs[none].argmax(dim=1)] = True
    scores = torch.where(shown[..., None, None], normalize_maps(class_maps.float()), torch.full_like(class_maps, -1.0))
    return ClsMaskSemanticSegmenterOutput(
        loss=loss,
        logits=scores,
        class_logits=class_logits,
        class_probs=probs,
        class_maps=class_maps,
        present=present,
        hidden_states=hidden_states,
        attentions=attentions,
    )


class ClsMaskForSemanticSegmentation(ClsMaskForMultiLabelClassification):
    """Same weights as the classifier; returns class maps, class probabilities and coarse segmentation scores.

    This is what `AutoModelForSemanticSegmentation` and the image-segmentation pipeline load; the pipeline calls
    `predict_class_maps` and the image processor's `post_process_semantic_segmentation`.
    """

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        attention_map_layers: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ClsMaskSemanticSegmenterOutput | tuple:
        """One pass (see [`ClsMaskForMultiLabelClassification.forward`]); maps on the patch grid.

        labels: (B, num_labels) multi-hot image labels for the classification loss.
        image_labels: (B, num_labels) multi-hot; when given, `present` is these classes instead of the predicted
            ones (the usual WSSS protocol for pseudo-labelling a labelled training set).
        """
        outputs = super().forward(
            pixel_values,
            return_dict=True,
            labels=labels,
            output_class_maps=True,
            attention_map_layers=attention_map_layers,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        output = segmenter_output(
            self, outputs.logits, outputs.class_maps, image_labels, outputs.loss, outputs.hidden_states,
            outputs.attentions,
        )  # fmt: skip
        return output


__all__ = [
    "ClsMaskPreTrainedModel",
    "ClsMaskModel",
    "ClsMaskForMultiLabelClassification",
    "ClsMaskForSemanticSegmentation",
]

# `save_pretrained` copies this file (and its relative imports) and writes `auto_map`, for `trust_remote_code=True`.
ClsMaskModel.register_for_auto_class("AutoModel")
ClsMaskForMultiLabelClassification.register_for_auto_class("AutoModelForImageClassification")
ClsMaskForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
