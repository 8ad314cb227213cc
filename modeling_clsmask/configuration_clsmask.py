"""Configuration of the class-token ViT of "Know Your Attention Maps" (Hanna & Borth, ICCV 2025)."""

from __future__ import annotations

from transformers import PreTrainedConfig


class ClsMaskConfig(PreTrainedConfig):
    r"""
    Configuration of [`ClsMaskModel`]: a ViT whose sequence is `C` class tokens (one per label), the patch tokens
    and `num_register_tokens` [REG] tokens.

    The ViT fields keep the names of `ViTConfig` so that ViT/DeiT checkpoints map onto this model one to one.

    Args:
        num_channels (`int`): input bands; any count works (e.g. 13 for Sentinel-2).
        num_register_tokens (`int`): number of [REG] tokens appended after the patches (paper: 1).
        token_mask_rate (`float`): probability of zeroing, during training, the output of the class token of a
            class that is absent from the image (per sample and class). 0 disables class-specific token masking.
        use_head_gates (`bool`): add one Hard Concrete gate per attention head and an L0 penalty to the loss.
        gate_temperature, gate_limit_low, gate_limit_high: Hard Concrete temperature and stretch interval.
        l0_penalty (`float`): weight of the expected number of open gates in the loss.
        attention_map_layers (`int`): how many of the last layers' class-to-patch attention are summed into the
            class maps used for pseudo-masks.
        class_threshold (`float`): probability at which a class counts as predicted.
        background_threshold (`float`, *optional*): `None` means every pixel gets a foreground class (as in
            DFC2020). A float makes pixels whose best normalised class score is below it background.
        background_label_id (`int`): label id used for background when `background_threshold` is set. Its class
            token is never used to paint pixels.
        diversity_loss_coefficient (`float`): weight of the public code's optional diversity loss (not in the
            paper): `||G - I||_F` of the Gram matrix of the L2-normalised class maps, pushing class maps apart.
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
    class_threshold: float = 0.5
    background_threshold: float | None = None
    background_label_id: int = 0
    diversity_loss_coefficient: float = 0.0

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
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {self.num_channels}.")
        if not 0.0 <= self.token_mask_rate <= 1.0:
            raise ValueError(f"token_mask_rate must lie in [0, 1], got {self.token_mask_rate}.")
        if not 1 <= self.attention_map_layers <= self.num_hidden_layers:
            raise ValueError(
                f"attention_map_layers must lie in [1, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.attention_map_layers}."
            )
        if not self.gate_limit_low < 0.0 < 1.0 < self.gate_limit_high:
            raise ValueError("Hard Concrete stretch limits must satisfy gate_limit_low < 0 < 1 < gate_limit_high.")
        if self.background_threshold is not None and not 0 <= self.background_label_id < self.num_labels:
            raise ValueError(
                f"background_label_id {self.background_label_id} is not a label id (num_labels={self.num_labels})."
            )

    @property
    def image_grid_size(self) -> tuple[int, int]:
        """(height, width) of the pre-training resolution."""
        if isinstance(self.image_size, (list, tuple)):
            return int(self.image_size[0]), int(self.image_size[1])
        return int(self.image_size), int(self.image_size)


__all__ = ["ClsMaskConfig"]

ClsMaskConfig.register_for_auto_class()
