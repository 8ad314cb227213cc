"""Configuration of the class-token ViT of "Know Your Attention Maps" (Hanna & Borth, ICCV 2025)."""

from __future__ import annotations

from dataclasses import field

from transformers import PreTrainedConfig


# What class maps can be made of (`ClsMaskConfig.class_map_source`).
CLASS_MAP_SOURCES = ("attention", "cam", "attention_cam", "attention_cam_mean")


def check_attention_map_scales(scales) -> list[float]:
    """`scales` as floats, or a ValueError naming the field: a non-empty list of input scales in (0, 8]."""
    scales = [float(scale) for scale in scales]
    if not scales or not all(0 < scale <= 8 for scale in scales):
        raise ValueError(f"attention_map_scales must be a non-empty list of scales in (0, 8], got {scales}.")
    return scales


def check_refinement_iterations(iterations) -> None:
    """A ValueError naming the field unless `iterations` is an integer >= 0 (0 = no refinement)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"attention_map_refinement_iterations must be an integer >= 0, got {iterations!r}.")


def check_refinement(iterations, dilations, sigma) -> None:
    """A ValueError naming the field when the map refinement's settings cannot work."""
    check_refinement_iterations(iterations)
    if not dilations or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations):
        raise ValueError(
            f"attention_map_refinement_dilations must be a non-empty list of integers >= 1, got {dilations!r}."
        )
    if not sigma > 0:
        raise ValueError(f"attention_map_refinement_sigma must be > 0, got {sigma!r}.")


class ClsMaskConfig(PreTrainedConfig):
    r"""
    Configuration of [`ClsMaskModel`]: a ViT whose sequence is `C` class tokens (one per label), the patch tokens
    and `num_register_tokens` [REG] tokens.

    The ViT fields keep the names of `ViTConfig` so that ViT/DeiT checkpoints map onto this model one to one. The
    `attention_map_*` fields are the defaults of `predict_class_maps`, which makes the maps; how maps become masks
    (background, assembly) is the image processor's part (`ClsMaskImageProcessor`).

    Args:
        num_channels (`int`): input bands; any count works (e.g. 13 for Sentinel-2).
        num_register_tokens (`int`): number of [REG] tokens appended after the patches (paper: 1).
        token_mask_rate (`float`): probability of zeroing, during training, the output of the class token of a
            class that is absent from the image (per sample and class). 0 disables class-specific token masking.
        use_head_gates (`bool`): add one Hard Concrete gate per attention head and an L0 penalty to the loss. With
            `hide_class_tokens` only the blocks with class tokens get gates, and they gate the class tokens' rows
            only (which heads the class tokens read through and average into the maps); the patch rows stay the
            backbone's.
        gate_temperature, gate_limit_low, gate_limit_high: Hard Concrete temperature and stretch interval.
        l0_penalty (`float`): weight of the expected number of open gates in the loss.
        attention_map_layers (`int`): how many of the last layers' class-to-patch attention are summed into the
            class maps used for pseudo-masks.
        attention_map_layer_ids (`list[int]`, *optional*): explicit block indices (0 = first) whose class attention
            is summed instead of the last `attention_map_layers`. In a from-scratch model the first block's class
            queries are fixed templates matched against the stem's local features, and its maps are the most
            class-specific (measured, see README); later blocks' class attention reads already-mixed patches.
        attention_map_scales (`list[float]`): input scales whose class maps are averaged at inference (test-time
            augmentation of the maps, as WSSS methods do for their CAMs). `[1.0]`: one pass (the paper). Each
            scale's maps count as attention per scale-1 patch and are averaged on the finest grid; an upscaled
            input gives a finer patch grid, which is where the gain comes from (measured, see README). Training
            uses the input as given.
        attention_map_flip (`bool`): also average the maps (and the image logits) of the horizontally flipped inputs.
        image_logits_over_scales (`bool`): also average the image logits over the rescaled passes of
            `attention_map_scales` (and their flips); `False`: the input as given and its flip only.
        attention_map_refinement_iterations (`int`): iterations of the pixel-adaptive refinement of the maps with
            the input image at inference (`ClsMaskMapRefinement`, after the test-time scales and flips); the maps
            then come at the input's resolution. 0 (default): the maps as they are (the paper, which uses no CRF or
            refinement).
        attention_map_refinement_dilations (`list[int]`): dilations, in input pixels, of the refinement's
            neighbourhood (8 neighbours each).
        attention_map_refinement_sigma (`float`): colour tolerance of the refinement, in units of the local spread
            of the input bands: larger lets map mass cross weaker edges.
        class_threshold (`float`): probability at which a class counts as predicted.
        diversity_loss_coefficient (`float`): weight of the public code's optional diversity loss (not in the
            paper): `||G - I||_F` of the Gram matrix of the L2-normalised maps of the classes present in the image,
            pushing the maps of co-occurring classes apart.
        patch_embedding_type (`str`): `"conv"`: a small convolutional stem (3x3 stride-2 convolutions with batch
            norm and ReLU down to the patch grid, then a 1x1 projection), which lets a ViT trained from scratch on a
            few thousand images learn shape rather than colour; `"patchify"`: the single patch convolution of ViT,
            needed to load ViT/DeiT weights.
        conv_stem_depth (`int`): 3x3 convolutions per resolution of the convolutional stem (the first strided).
        classifier_type (`str`): `"shared"`: `logit_c = w . t_c + b_c`, one readout vector shared by every class
            token (t_c after the final layer norm), so each token must hold the evidence of its own class;
            `"flatten"`: the paper's Linear over all C class-token outputs flattened.
        weight_init (`str`): `"fan_in"`: PyTorch's default fan-in uniform init for Linear and Conv layers, which
            trains from scratch; `"normal"`: transformers' ViT init (normal with std `initializer_range`, zero bias),
            which matters only where pretrained weights do not overwrite it.
        class_token_isolation (`bool`): class-token queries attend only to the patch tokens and to themselves, not
            to other class tokens or [REG] tokens.
        hide_class_tokens (`bool`): patch and [REG] queries do not attend to the class tokens, which only read
            (CaiT's class attention). With a frozen backbone and class tokens in the last block, the final patch
            tokens (what the patch classifier and the feature affinity read) are then the source's own.
        patch_dropout (`float`): share of patch tokens dropped at random per image in training (hide-and-seek: class
            tokens must attend to every patch of their class, not only the most telling one).
        class_token_layers (`int`, *optional*): the class tokens join only the last `class_token_layers` blocks
            (as in CaiT's class attention): the blocks before run on patch and register tokens alone, so the class
            tokens read patches that already know their object. `None`: every block (the paper).
        backbone_family (`str`, *optional*): the pretrained family the weights came from (`vit`, `deit`, `dinov2`,
            `dinov2_with_registers`, `clip`); a record, the computation is set by the fields below.
        pre_layernorm (`bool`): a layer norm on the token sequence before the first block (CLIP's vision tower).
        attention_map_affinity_power (`float`): at inference, propagate each class map over patches of like
            features, `m_i <- sum_j A_ij m_j` with `A_ij` proportional to `max(cos(p_i, p_j), 0) ** power` of the final
            patch tokens (the patch affinity MCTformer and ToCo use to complete class-token maps). A pretrained
            backbone's patch features group objects, so a class-token map that found part of an object spreads to
            the rest of it. 0 (default): off.
        use_patch_classifier (`bool`): add a linear classifier on every final patch token, trained on the image
            labels through the pooled patch logits (the PatchCAM of MCTformer-V2, Xu et al., 2023). Its
            per-patch scores are a CAM learnt beside the class tokens; `class_map_source` says whether maps use it.
        patch_classifier_loss_weight (`float`): weight of the patch classifier's BCE in the loss.
        patch_classifier_top_fraction (`float`): the patch classifier's image logit per class is the mean of its
            highest `ceil(fraction * patches)` patch logits; 1 (default): the mean of all (MCTformer-V2). Below 1, a
            class that covers part of the image is not pushed to show on the patches of other classes.
        class_map_source (`str`): what the class maps are made of. `"attention"`: the class tokens' attention over
            the patches (the paper); `"cam"`: the patch classifier's scores; `"attention_cam"`: per class, the
            geometric mean of both, each min-max normalised, so a patch scores high only when its class token
            attends to it *and* the patch classifier sees the class there (MCTformer-V2 multiplies the two the same
            way); `"attention_cam_mean"`: their mean, so a class token whose attention missed its object (as happens
            with few training images) cannot veto the CAM there. The last three need `use_patch_classifier`.
        cam_probability (`bool`): the CAM enters the class maps as the patch classifier's probability per patch (the
            sigmoid of its logit) rather than the logit. Min-max normalising a logit map stretches a class's faint
            evidence as far as its strong evidence; the sigmoid keeps patches the classifier calls absent near zero
            and those it is sure of near one, so present classes compete on evidence. False (default): the logit.
        gate_log_alpha_init (`float`): initial Hard Concrete `log_alpha`: 3 starts every gate open and nearly
            deterministic, 0 (the public code) starts them stochastic so pruning shows in short runs.
        image_branch_layers (`int`): a second copy of the last `image_branch_layers` blocks and the final norm (with
            a pretrained backbone, started from the same weights) that forks off before them, learns for the image
            labels alone and gives the image logits: a linear head on its last [REG] token (the source's [CLS]) and
            its mean patch token, as DINOv2's linear evaluation reads them. The class tokens, the patch classifier and
            the maps keep the unchanged blocks: fine-tuned blocks classify better and localise worse. 0 (default):
            no branch, the image logits are the class tokens' (and patch classifier's) readout.
        image_branch_logit_weight (`float`): with an image branch, the image logits are this weight times the
            branch's plus the rest times the patch classifier's image logits: two heads that err differently, one on
            fine-tuned blocks, one on the unchanged ones (needs `use_patch_classifier` below 1). 1 (default): the
            branch's alone.
    """

    model_type = "clsmask"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_register_tokens: int = 1
    token_mask_rate: float = 0.5
    use_head_gates: bool = False
    gate_temperature: float = 0.33
    gate_limit_low: float = -0.1
    gate_limit_high: float = 1.1
    l0_penalty: float = 0.01
    attention_map_layers: int = 1
    attention_map_layer_ids: list[int] | None = None
    attention_map_scales: list[float] = field(default_factory=lambda: [1.0])
    attention_map_flip: bool = False
    image_logits_over_scales: bool = False
    attention_map_refinement_iterations: int = 0
    attention_map_refinement_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    attention_map_refinement_sigma: float = 0.5
    class_threshold: float = 0.5
    diversity_loss_coefficient: float = 0.0
    patch_embedding_type: str = "conv"
    conv_stem_depth: int = 1
    classifier_type: str = "shared"
    weight_init: str = "fan_in"
    class_token_isolation: bool = False
    hide_class_tokens: bool = False
    patch_dropout: float = 0.0
    class_token_layers: int | None = None
    gate_log_alpha_init: float = 3.0
    backbone_family: str | None = None
    pre_layernorm: bool = False
    attention_map_affinity_power: float = 0.0
    use_patch_classifier: bool = False
    patch_classifier_loss_weight: float = 1.0
    patch_classifier_top_fraction: float = 1.0
    class_map_source: str = "attention"
    cam_probability: bool = False
    image_branch_layers: int = 0
    image_branch_logit_weight: float = 1.0

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = [int(s) for s in self.image_size]
        # Multi-label: the stock image-classification pipeline then applies a sigmoid per class.
        if self.problem_type is None:
            self.problem_type = "multi_label_classification"
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """Reject settings that would otherwise fail deep inside a forward pass."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        height, width = self.image_grid_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}.")
        for name, allowed in (
            ("patch_embedding_type", ("conv", "patchify")),
            ("classifier_type", ("shared", "flatten")),
            ("weight_init", ("fan_in", "normal")),
            ("class_map_source", CLASS_MAP_SOURCES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.class_map_source != "attention" and not self.use_patch_classifier:
            raise ValueError(
                f"class_map_source {self.class_map_source!r} reads the patch classifier, which is off: set "
                "use_patch_classifier=True (and train it), or class_map_source='attention'."
            )
        if not self.patch_classifier_loss_weight >= 0:
            raise ValueError(f"patch_classifier_loss_weight must be >= 0, got {self.patch_classifier_loss_weight}.")
        if not 0.0 < self.patch_classifier_top_fraction <= 1.0:
            raise ValueError(
                f"patch_classifier_top_fraction must lie in (0, 1], got {self.patch_classifier_top_fraction}."
            )
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {self.num_channels}.")
        if not self.attention_map_affinity_power >= 0:
            raise ValueError(f"attention_map_affinity_power must be >= 0, got {self.attention_map_affinity_power}.")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must lie in [0, 1), got {self.patch_dropout}.")
        if self.patch_dropout > 0 and self.diversity_loss_coefficient > 0:
            raise ValueError(
                "patch_dropout and diversity_loss_coefficient cannot both be on: the diversity loss needs the maps of "
                "every patch, which patch dropout removes. Set one of them to 0."
            )
        if not 0.0 <= self.token_mask_rate <= 1.0:
            raise ValueError(f"token_mask_rate must lie in [0, 1], got {self.token_mask_rate}.")
        if self.class_token_layers is not None and not 1 <= self.class_token_layers <= self.num_hidden_layers:
            raise ValueError(
                f"class_token_layers must lie in [1, num_hidden_layers={self.num_hidden_layers}] or be None, "
                f"got {self.class_token_layers}."
            )
        joined = self.class_token_layers or self.num_hidden_layers
        if not 1 <= self.attention_map_layers <= joined:
            raise ValueError(
                f"attention_map_layers must lie in [1, {joined}] (the blocks the class tokens take part in), "
                f"got {self.attention_map_layers}."
            )
        if self.attention_map_layer_ids is not None:
            self.attention_map_layer_ids = [int(i) for i in self.attention_map_layer_ids]
            first = self.num_hidden_layers - joined
            bad = [i for i in self.attention_map_layer_ids if not first <= i < self.num_hidden_layers]
            if bad or not self.attention_map_layer_ids:
                raise ValueError(
                    f"attention_map_layer_ids must be a non-empty list of block indices in [{first}, "
                    f"{self.num_hidden_layers - 1}] (blocks with class tokens), got {self.attention_map_layer_ids}."
                )
        self.attention_map_scales = check_attention_map_scales(self.attention_map_scales)
        check_refinement(
            self.attention_map_refinement_iterations,
            self.attention_map_refinement_dilations,
            self.attention_map_refinement_sigma,
        )
        self.attention_map_refinement_dilations = [int(d) for d in self.attention_map_refinement_dilations]
        if not 0 <= self.image_branch_layers <= self.num_hidden_layers:
            raise ValueError(
                f"image_branch_layers must lie in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.image_branch_layers}."
            )
        if not 0.0 <= self.image_branch_logit_weight <= 1.0:
            raise ValueError(f"image_branch_logit_weight must lie in [0, 1], got {self.image_branch_logit_weight}.")
        if self.image_branch_layers and self.image_branch_logit_weight < 1.0 and not self.use_patch_classifier:
            raise ValueError(
                "image_branch_logit_weight below 1 blends the image branch with the patch classifier, which is off: "
                "set use_patch_classifier=True, or image_branch_logit_weight=1."
            )
        if self.image_branch_layers and self.num_register_tokens < 1:
            raise ValueError(
                "image_branch_layers reads the last [REG] token (a pretrained backbone's [CLS]): set "
                "num_register_tokens >= 1, or image_branch_layers=0."
            )
        if not self.gate_limit_low < 0.0 < 1.0 < self.gate_limit_high:
            raise ValueError("Hard Concrete stretch limits must satisfy gate_limit_low < 0 < 1 < gate_limit_high.")

    @property
    def image_grid_size(self) -> tuple[int, int]:
        """(height, width) of the pre-training resolution."""
        if isinstance(self.image_size, (list, tuple)):
            return int(self.image_size[0]), int(self.image_size[1])
        return int(self.image_size), int(self.image_size)


__all__ = ["ClsMaskConfig"]

ClsMaskConfig.register_for_auto_class()
