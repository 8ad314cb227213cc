"""The class-token ViT: shapes, token masking, head gates, class attention, interpolation, ViT parity, I/O."""

import math

import pytest
import torch
from conftest import tiny_config
from transformers import ViTConfig, ViTModel

from modeling_clsmask import (
    ClsMaskForMultiLabelClassification,
    ClsMaskForSemanticSegmentation,
    ClsMaskImageProcessor,
    ClsMaskModel,
)
from modeling_clsmask.modeling_clsmask import ClsMaskMapRefinement, scaled_size


def test_shapes_sequence_order(config):
    model = ClsMaskModel(config).eval()
    out = model(torch.randn(2, 3, 32, 32), output_class_attentions=True)
    # 3 class tokens + 16 patches + 1 register token.
    assert out.last_hidden_state.shape == (2, 3 + 16 + 1, 32)
    assert len(out.class_attentions) == config.attention_map_layers == 1
    assert out.class_attentions[0].shape == (2, 4, 3, 20)
    torch.testing.assert_close(out.class_attentions[0].sum(-1), torch.ones(2, 4, 3))

    clf = ClsMaskForMultiLabelClassification(tiny_config(num_register_tokens=0, attention_map_layers=2)).eval()
    out = clf(torch.randn(2, 3, 32, 48), output_class_maps=True)
    assert out.logits.shape == (2, 3)
    assert out.class_maps.shape == (2, 3, 4, 6)
    assert len(out.class_attentions) == 2


def test_token_mask_semantics(config):
    model = ClsMaskForMultiLabelClassification(tiny_config(token_mask_rate=0.5))
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]]).repeat(2000, 1)
    mask = model.token_mask(labels)
    assert not mask[labels == 1].any(), "present classes must never be masked"
    rate = mask[labels == 0].float().mean().item()
    assert abs(rate - 0.5) < 0.03
    # Per sample and class independently: the two absent slots of row 0 are not always masked together.
    together = (mask[::2, 1] == mask[::2, 2]).float().mean().item()
    assert 0.4 < together < 0.6


@pytest.mark.parametrize("classifier_type", ["shared", "flatten"])
def test_masking_changes_training_outputs_only_for_absent_classes(classifier_type):
    # Patchify stem: the conv stem's batch norm differs between train and eval by design.
    config = tiny_config(token_mask_rate=1.0, patch_embedding_type="patchify", classifier_type=classifier_type)
    model = ClsMaskForMultiLabelClassification(config)
    pixels = torch.randn(1, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0]])
    states = model.clsmask(pixels).last_hidden_state[:, :3]
    model.train()
    seen = {}
    model.classifier.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    model(pixels, labels=labels)
    flat = seen["x"].view(1, 3, -1)
    torch.testing.assert_close(flat[:, 0], states[:, 0])
    assert flat[:, 1:].abs().sum() == 0
    # Eval never masks.
    model.eval()
    seen.clear()
    model(pixels, labels=labels)
    torch.testing.assert_close(seen["x"].view(1, 3, -1), states)


def test_gates_eval_deterministic_and_penalty_falls():
    model = ClsMaskForMultiLabelClassification(tiny_config(use_head_gates=True)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(pixels).logits, model(pixels).logits)
    base = model.clsmask
    before = base.l0_norm().item()
    assert before == pytest.approx(8, abs=0.5)  # 2 layers x 4 heads, all open at init
    gate = base.layers[0].attention.head_gate
    with torch.no_grad():
        gate.log_alpha[:2] = -10.0
    assert base.l0_norm().item() < before - 1.9
    values = base.gate_values()
    assert values.shape == (2, 4)
    assert (values[0, :2] == 0).all() and (values[0, 2:] == 1).all()
    # A closed head is excluded from the class maps.
    weights = base.layers[0].attention.head_weights()
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    # Training draws stochastic hard gates in {0, 1} with gradient reaching log_alpha.
    gate.train()
    draws = torch.stack([gate() for _ in range(50)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    model.train()
    loss = model(pixels, labels=torch.tensor([[1, 0, 0], [0, 1, 0]])).loss
    loss.backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def test_l0_penalty_in_loss():
    model = ClsMaskForMultiLabelClassification(tiny_config(use_head_gates=True, l0_penalty=0.5)).eval()
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([[1, 0, 0], [0, 1, 0]]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    torch.testing.assert_close(out.loss, bce + 0.5 * out.l0_loss)


@pytest.mark.parametrize("gates", [False, True])
def test_sdpa_and_eager_agree(gates):
    sdpa = ClsMaskForMultiLabelClassification(tiny_config(use_head_gates=gates))
    if gates:
        with torch.no_grad():
            sdpa.clsmask.layers[1].attention.head_gate.log_alpha[1] = -10.0
    eager = ClsMaskForMultiLabelClassification(tiny_config(use_head_gates=gates))
    eager.load_state_dict(sdpa.state_dict())
    sdpa.set_attn_implementation("sdpa")
    eager.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 32, 32)
    a = sdpa.eval()(pixels, output_class_maps=True)
    b = eager.eval()(pixels, output_class_maps=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.class_maps, b.class_maps, atol=1e-5, rtol=1e-5)


def test_class_attention_rows_equal_eager_slice():
    config = tiny_config(attention_map_layers=2)
    model = ClsMaskModel(config).eval()
    model.set_attn_implementation("eager")
    out = model(torch.randn(2, 3, 32, 40), output_class_attentions=True, output_attentions=True)
    assert len(out.attentions) == 2
    for full, rows in zip(out.attentions, out.class_attentions):
        assert full.shape[-1] == full.shape[-2] == 3 + 20 + 1
        torch.testing.assert_close(rows, full[:, :, :3], atol=1e-6, rtol=1e-5)


def test_non_square_interpolation(config):
    model = ClsMaskModel(config).eval()
    embeddings = model.embeddings
    same = embeddings.interpolate_pos_encoding(4, 4)
    assert same is embeddings.position_embeddings
    wide = embeddings.interpolate_pos_encoding(3, 7)
    assert wide.shape == (1, 21, 32)
    # Bicubic interpolation of a constant grid is that constant.
    with torch.no_grad():
        embeddings.position_embeddings.fill_(0.25)
    torch.testing.assert_close(embeddings.interpolate_pos_encoding(3, 7), torch.full((1, 21, 32), 0.25))
    out = model(torch.randn(1, 3, 24, 56))
    assert out.last_hidden_state.shape == (1, 3 + 21 + 1, 32)


def test_vit_parity(tmp_path):
    vit_config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    vit = ViTModel(vit_config, add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "vit")
    model = ClsMaskForMultiLabelClassification.from_vit_pretrained(
        str(tmp_path / "vit"), id2label={0: "only"}, num_register_tokens=0, token_mask_rate=0.0
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = vit(pixels).last_hidden_state
    got = model.clsmask(pixels).last_hidden_state
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :1], expected[:, :1], atol=1e-5, rtol=1e-5)


def test_vit_init_with_more_tokens_and_new_grid(tmp_path):
    vit = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    )
    vit.save_pretrained(tmp_path / "vit")
    model = ClsMaskForMultiLabelClassification.from_vit_pretrained(
        str(tmp_path / "vit"), id2label={0: "a", 1: "b"}, image_size=48, use_head_gates=True
    )  # ViT has no extra tokens: the one [REG] token starts as [CLS]
    emb = model.clsmask.embeddings
    assert emb.position_embeddings.shape == (1, 36, 32)
    cls_pos = vit.embeddings.position_embeddings[:, :1]
    torch.testing.assert_close(emb.class_position_embeddings, cls_pos.expand(1, 2, 32))
    torch.testing.assert_close(emb.register_position_embeddings, cls_pos)
    torch.testing.assert_close(model.clsmask.layers[0].attention.q_proj.weight, vit.layers[0].attention.q_proj.weight)
    assert model.config.use_head_gates and model.config.num_labels == 2


def test_save_load_round_trip(tmp_path, config):
    model = ClsMaskForSemanticSegmentation(tiny_config(use_head_gates=True)).eval()
    model.save_pretrained(tmp_path)
    loaded = ClsMaskForSemanticSegmentation.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    a, b = model(pixels), loaded(pixels)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    assert (tmp_path / "model.safetensors").exists()


def test_segmentation_logits_and_image_labels():
    model = ClsMaskForSemanticSegmentation(tiny_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixels, image_labels=torch.tensor([[0, 1, 0], [1, 0, 1]]))
    assert out.logits.shape == (2, 3, 4, 4)
    assert out.present.tolist() == [[False, True, False], [True, False, True]]
    assert (out.logits[0, [0, 2]] == -1).all() and (out.logits[1, 1] == -1).all()
    # Each present class's map, min-max normalised: argmax of the logits is a coarse mask of the given classes.
    assert out.logits[0, 1].amin() == 0 and out.logits[0, 1].amax() == 1
    assert set(out.logits[1].argmax(0).unique().tolist()) == {0, 2}
    masks = ClsMaskImageProcessor().post_process_semantic_segmentation(out, [(32, 32)] * 2)
    assert masks[0].shape == (32, 32)
    assert set(masks[0].unique().tolist()) == {1}
    assert set(masks[1].unique().tolist()) == {0, 2}


def test_return_dict_false_gives_tuples():
    # transformers' convention through its `can_return_tuple` decorator, per call or from the config.
    pixels = torch.randn(1, 3, 32, 32)
    for cls in (ClsMaskModel, ClsMaskForMultiLabelClassification, ClsMaskForSemanticSegmentation):
        model = cls(tiny_config()).eval()
        first = model(pixels)[0] if cls is ClsMaskModel else model(pixels).logits
        as_tuple = model(pixels, return_dict=False)
        assert isinstance(as_tuple, tuple), cls
        torch.testing.assert_close(as_tuple[0], first)
        model.config.return_dict = False
        assert isinstance(model(pixels), tuple), cls
        assert not isinstance(model(pixels, return_dict=True), tuple), cls


def test_forward_and_predict_class_maps_agree_on_one_pass():
    # forward is one raw pass; predict_class_maps with no processing configured returns the same maps and classes.
    model = ClsMaskForSemanticSegmentation(tiny_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    raw, predicted = model(pixels), model.predict_class_maps(pixels)
    for name in ("class_maps", "class_probs", "present", "logits"):
        torch.testing.assert_close(getattr(predicted, name), getattr(raw, name))
    with pytest.raises(TypeError):
        model(pixels, augment_maps=False)  # no silently swallowed keyword arguments


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: torch.randn(1, 4, 32, 32), "4 channels but the model expects num_channels=3"),
        (lambda: torch.randn(1, 3, 30, 32), "not divisible by the patch size 8"),
        (lambda: torch.randn(3, 32, 32), "4-D tensor"),
    ],
)
def test_bad_pixel_values(config, make_input, message):
    model = ClsMaskForMultiLabelClassification(config)
    with pytest.raises(ValueError, match=message):
        model(make_input())


def test_bad_labels(config):
    model = ClsMaskForMultiLabelClassification(config)
    with pytest.raises(ValueError, match=r"shape \(batch, num_labels\) = \(2, 3\)"):
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="multi-hot"):
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([[2, 0, 0], [0, 1, 0]]))


def test_bad_config():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny_config(image_size=30)
    with pytest.raises(ValueError, match="attention_map_layers"):
        tiny_config(attention_map_layers=5)


def test_multiband_input():
    model = ClsMaskForMultiLabelClassification(tiny_config(num_channels=13)).eval()
    assert model(torch.randn(1, 13, 32, 32)).logits.shape == (1, 3)


def test_gradient_checkpointing(config):
    # Checkpointed blocks run their forward again in the backward pass, and the gradients are those without it.
    torch.manual_seed(0)
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1, 0, 0], [0, 1, 0]])
    plain = ClsMaskForMultiLabelClassification(config).train()
    model = ClsMaskForMultiLabelClassification(config).train()
    model.load_state_dict(plain.state_dict())
    model.activation_checkpointing_enable()
    calls = []
    model.clsmask.layers[0].mlp.fc1.register_forward_hook(lambda *_: calls.append(1))  # (recomputation stops early)
    torch.manual_seed(1)  # the same token-masking draws in both runs
    model(pixels, labels=labels).loss.backward()
    assert len(calls) == 2, "the block was not recomputed: checkpointing is off"
    torch.manual_seed(1)
    plain(pixels, labels=labels).loss.backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("gates", [False, True])
def test_class_tokens_only_last_block_matches_full(gates):
    model = ClsMaskModel(tiny_config(use_head_gates=gates, attention_map_layers=2)).eval()
    pixels = torch.randn(2, 3, 32, 40)
    full = model(pixels, output_class_attentions=True)
    short = model(pixels, output_class_attentions=True, class_tokens_only=True)
    assert short.last_hidden_state.shape == (2, 3, 32)
    torch.testing.assert_close(short.last_hidden_state, full.last_hidden_state[:, :3], atol=1e-6, rtol=1e-5)
    for a, b in zip(short.class_attentions, full.class_attentions):
        torch.testing.assert_close(a, b)


def test_diversity_loss():
    from modeling_clsmask.modeling_clsmask import diversity_loss

    orthogonal = torch.zeros(1, 2, 2, 2)
    orthogonal[0, 0, 0, 0] = 1
    orthogonal[0, 1, 1, 1] = 1
    assert diversity_loss(orthogonal).item() == pytest.approx(0.0)
    same = torch.ones(1, 2, 2, 2)
    assert diversity_loss(same).item() == pytest.approx(2**0.5)
    # Only pairs of classes present in the image count: with one present class there is nothing to push apart.
    assert diversity_loss(same, torch.tensor([[1, 0]])).item() == pytest.approx(0.0)
    assert diversity_loss(same, torch.tensor([[1, 1]])).item() == pytest.approx(2**0.5)
    three = torch.ones(1, 3, 2, 2)
    assert diversity_loss(three, torch.tensor([[1, 0, 1]])).item() == pytest.approx(2**0.5)
    model = ClsMaskForMultiLabelClassification(tiny_config(diversity_loss_coefficient=0.1)).train()
    labels = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.manual_seed(1)
    with_div = model(torch.ones(2, 3, 32, 32), labels=labels).loss
    model.config.diversity_loss_coefficient = 0.0
    torch.manual_seed(1)
    without = model(torch.ones(2, 3, 32, 32), labels=labels).loss
    assert with_div > without


def test_config_output_attentions_gives_full_last_layer():
    model = ClsMaskForMultiLabelClassification(tiny_config(output_attentions=True)).eval()
    out = model(torch.randn(1, 3, 32, 32))
    assert [a.shape[-2] for a in out.attentions] == [20, 20]  # full T x T rows in every layer, last one included


def test_conv_stem_shapes_and_vit_loading_keeps_patchify(tmp_path):
    from modeling_clsmask.modeling_clsmask import conv_stem_strides

    assert conv_stem_strides(8) == [2, 2, 2]
    assert conv_stem_strides(16) == [2, 2, 2, 2]
    assert conv_stem_strides(14) == [2, 7]
    assert conv_stem_strides(1) == [1]
    for patch_size, depth in ((8, 1), (8, 2), (4, 2), (14, 1)):
        config = tiny_config(patch_size=patch_size, image_size=56 if patch_size == 14 else 32, conv_stem_depth=depth)
        model = ClsMaskModel(config).eval()
        size = config.image_size
        out = model(torch.randn(2, 3, size, size + patch_size))
        grid = (size // patch_size) * (size // patch_size + 1)
        assert out.last_hidden_state.shape == (2, 3 + grid + 1, 32)
        convs = [m for m in model.embeddings.patch_embeddings.stem if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == len(conv_stem_strides(patch_size)) * depth
    # ViT weights need the patchify projection: from_vit_pretrained uses it whatever the config default is.
    vit = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32),
        add_pooling_layer=False,
    )
    vit.save_pretrained(tmp_path / "vit")
    model = ClsMaskForMultiLabelClassification.from_vit_pretrained(str(tmp_path / "vit"), id2label={0: "a"})
    assert model.config.patch_embedding_type == "patchify" and model.clsmask.embeddings.patch_embeddings.stem is None
    with pytest.raises(ValueError, match="patchify"):
        ClsMaskForMultiLabelClassification.from_vit_pretrained(str(tmp_path / "vit"), patch_embedding_type="conv")


def test_fan_in_init_versus_normal():
    fan_in = ClsMaskModel(tiny_config(weight_init="fan_in"))
    normal = ClsMaskModel(tiny_config(weight_init="normal"))
    bound = 1 / 32**0.5  # q_proj: fan_in 32
    weight = fan_in.layers[0].attention.q_proj.weight
    assert weight.abs().max() <= bound + 1e-6 and float(weight.std()) == pytest.approx(bound / 3**0.5, rel=0.1)
    assert fan_in.layers[0].attention.q_proj.bias.abs().sum() > 0
    assert float(normal.layers[0].attention.q_proj.weight.std()) == pytest.approx(0.02, rel=0.2)
    assert normal.layers[0].attention.q_proj.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="weight_init"):
        tiny_config(weight_init="xavier")


def test_shared_readout_is_shared_and_masked_token_gives_bias():
    model = ClsMaskForMultiLabelClassification(
        tiny_config(classifier_type="shared", token_mask_rate=1.0, patch_embedding_type="patchify")
    )
    assert model.classifier.dense.weight.shape == (1, 32) and model.classifier.bias.shape == (3,)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    states = torch.randn(2, 3, 32)
    logits, _, _ = model.eval().classify(states, None)
    # The same readout vector for every class: swapping two class tokens swaps their logits (less their biases).
    swapped, _, _ = model.classify(states[:, [1, 0, 2]], None)
    torch.testing.assert_close(swapped[:, 0] - 0.5, logits[:, 1] + 1.0)
    # In training, an absent class's token is zeroed (rate 1.0): its logit is exactly its bias.
    model.train()
    labels = torch.tensor([[1, 0, 0], [0, 0, 1]])
    masked, _, _ = model.classify(states, labels)
    torch.testing.assert_close(masked[0, 1:], torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(masked[1, :2], torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(masked[0, 0], logits[0, 0])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_class_token_isolation_against_explicit_attention(implementation):
    """Class-token queries see only patches and themselves; the masked rows match an explicit softmax."""
    config = tiny_config(class_token_isolation=True, attention_map_layers=2, patch_embedding_type="patchify")
    model = ClsMaskModel(config).eval()
    model.set_attn_implementation(implementation)
    pixels = torch.randn(2, 3, 32, 32)
    captured = {}
    layer = model.layers[1]
    layer.layernorm_before.register_forward_hook(lambda mod, args, out: captured.update(x=out))
    out = model(pixels, output_class_attentions=True)
    attention = layer.attention
    x = captured["x"]
    shape = (2, -1, 4, 8)
    q = attention.q_proj(x).view(shape).transpose(1, 2)
    k = attention.k_proj(x).view(shape).transpose(1, 2)
    v = attention.v_proj(x).view(shape).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / 8**0.5
    num_classes, num_patches = 3, 16
    allowed = torch.ones(20, 20, dtype=torch.bool)
    for c in range(num_classes):
        allowed[c] = False
        allowed[c, num_classes : num_classes + num_patches] = True
        allowed[c, c] = True
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    rows = out.class_attentions[1]
    torch.testing.assert_close(rows, probs[:, :, :num_classes], atol=1e-5, rtol=1e-5)
    assert rows[..., num_classes + num_patches :].max() == 0  # nothing on [REG]
    for c in range(num_classes):
        others = [o for o in range(num_classes) if o != c]
        assert rows[:, :, c, others].max() == 0
    # The block output uses the same masked attention (patch and [REG] rows unmasked).
    context = (probs @ v).transpose(1, 2).reshape(2, 20, 32)
    expected = attention.o_proj(context)
    got, _, _ = attention(x, attention_mask=model_mask(config))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def model_mask(config):
    from modeling_clsmask.modeling_clsmask import class_token_isolation_mask

    return class_token_isolation_mask(config.num_labels, 16, config.num_register_tokens, torch.device("cpu"))


def test_class_tokens_join_late():
    config = tiny_config(class_token_layers=1, attention_map_layers=1, num_hidden_layers=3)
    model = ClsMaskModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixels, output_hidden_states=True, output_class_attentions=True)
    # Blocks before the last run without the class tokens: they leave them as embedded and patches do not see them.
    torch.testing.assert_close(out.hidden_states[2][:, :3], out.hidden_states[0][:, :3])
    with torch.no_grad():
        model.embeddings.class_tokens.add_(1.0)
    changed = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(changed.hidden_states[2][:, 3:], out.hidden_states[2][:, 3:])
    assert not torch.allclose(changed.last_hidden_state[:, :3], out.last_hidden_state[:, :3])
    assert len(out.class_attentions) == 1
    with pytest.raises(ValueError, match="attention_map_layers"):
        model(pixels, output_class_attentions=True, attention_map_layers=2)
    with pytest.raises(ValueError, match="attention_map_layers"):
        tiny_config(class_token_layers=1, attention_map_layers=2)


def test_forward_from_cached_block_inputs_equals_the_full_pass():
    # The states at the first block with class tokens are a function of the image alone, so a pass that starts there
    # (what training from cached features does) gives the full pass's outputs and loss.
    config = tiny_config(class_token_layers=1, attention_map_layers=1, num_hidden_layers=3, use_patch_classifier=True)
    model = ClsMaskForMultiLabelClassification(config).eval()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1, 0, 0], [0, 1, 1]])
    inputs = model.clsmask.class_block_inputs(pixels)
    assert inputs.shape == (2, 16 + 1, 32)  # patches and the register, no class tokens
    full, cached = model(pixels, labels=labels), model(block_inputs=inputs, labels=labels)
    torch.testing.assert_close(cached.logits, full.logits)
    torch.testing.assert_close(cached.loss, full.loss)
    torch.testing.assert_close(model.clsmask.class_block_register_states(pixels), inputs[:, -1:])
    with pytest.raises(ValueError, match="exactly one"):
        model.clsmask(pixels, block_inputs=inputs)
    with pytest.raises(ValueError, match="Class maps"):
        model(block_inputs=inputs, output_class_maps=True)


def frozen_preset_model(**overrides):
    """The pretrained preset's shape: class tokens in the last block, hidden from the patches, frozen blocks."""
    fields = dict(
        class_token_layers=1, attention_map_layers=1, num_hidden_layers=3, use_patch_classifier=True,
        hide_class_tokens=True, image_branch_layers=1, image_branch_logit_weight=0.5,
        patch_classifier_top_fraction=0.25,
    )  # fmt: skip
    model = ClsMaskForMultiLabelClassification(tiny_config(**{**fields, **overrides})).train()
    model.clsmask.layers.requires_grad_(False)
    return model


@pytest.mark.parametrize("gates", [False, True])
def test_frozen_patch_rows_run_without_graph_and_train_as_the_joint_block(monkeypatch, gates):
    # Hidden class tokens cannot reach the patch rows and the blocks do not learn, so the patch rows are recorded for
    # nothing: the split pass must give the joint block's loss and every gradient, and be taken only when it may.
    # Head gates (learning, stochastic at log_alpha 0) act on the class rows only, so they do not change that.
    torch.manual_seed(0)
    model = frozen_preset_model(use_head_gates=gates, gate_log_alpha_init=0.0)
    for gate in model.clsmask.head_gates():
        gate.requires_grad_(True)
    inputs, labels = model.clsmask.class_block_inputs(torch.randn(4, 3, 32, 32)), torch.tensor([[1, 0, 1]] * 4)

    def loss_and_grads(**extra):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same token-masking draws
        loss = model(block_inputs=inputs, labels=labels, **extra).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert model.clsmask.patch_rows_need_no_graph(False)
    split_loss, split_grads = loss_and_grads()
    # The patch rows computed once (what the feature cache holds): only the class rows and the branch run.
    states = model.clsmask.frozen_patch_states(inputs)
    assert states.shape == (4, 2, 16 + 1, 32)  # entering the last block and leaving it
    cached_loss, cached_grads = loss_and_grads(frozen_patch_states=states)
    monkeypatch.setattr(ClsMaskModel, "patch_rows_need_no_graph", lambda self, output_attentions: False)
    joint_loss, joint_grads = loss_and_grads()
    for loss, grads in ((split_loss, split_grads), (cached_loss, cached_grads)):
        torch.testing.assert_close(loss, joint_loss)
        assert grads.keys() == joint_grads.keys()
        assert any("class_tokens" in name for name in grads)
        assert any("patch_classifier" in name for name in grads)
        assert any("image_branch" in name for name in grads)
        assert any("head_gate" in name for name in grads) == gates
        for name in joint_grads:
            torch.testing.assert_close(grads[name], joint_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="frozen_patch_states of shape"):
        model(block_inputs=inputs, frozen_patch_states=states[:, :1])
    with pytest.raises(ValueError, match="block_inputs they were computed from"):
        model.clsmask(torch.randn(4, 3, 32, 32), frozen_patch_states=states)
    with torch.no_grad():
        assert not model.clsmask.patch_rows_need_no_graph(False)  # inference: nothing to save
    assert not model.clsmask.patch_rows_need_no_graph(True)  # whole attention rows asked for
    model.clsmask.layers[-1].requires_grad_(True)
    assert not model.clsmask.patch_rows_need_no_graph(False)  # a learning block: its patch rows carry gradients
    with pytest.raises(ValueError, match="a block with class tokens learns"):
        model(block_inputs=inputs, frozen_patch_states=states)
    with pytest.raises(ValueError, match="nothing learning reaches"):
        model.clsmask.frozen_patch_states(inputs)
    assert not frozen_preset_model(hide_class_tokens=False).clsmask.patch_rows_need_no_graph(False)


def test_gates_on_hidden_class_tokens_gate_the_class_rows_only():
    # The pretrained preset's shape: the gates choose the heads the class tokens read through and whose attention
    # makes the maps; the patch rows (what the patch classifier, the affinity and the cache see) stay the backbone's.
    torch.manual_seed(0)
    gated = frozen_preset_model(use_head_gates=True).eval()
    assert [layer.attention.head_gate is not None for layer in gated.clsmask.layers] == [False, False, True]
    plain = frozen_preset_model().eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    with torch.no_grad():
        gated.clsmask.layers[-1].attention.head_gate.log_alpha[:2] = -10.0  # heads 0 and 1 closed
    pixels = torch.randn(2, 3, 32, 32)
    out, ref = (model.clsmask(pixels).last_hidden_state for model in (gated, plain))
    torch.testing.assert_close(out[:, 3:], ref[:, 3:])
    assert (out[:, :3] - ref[:, :3]).abs().max() > 1e-3
    torch.testing.assert_close(gated.clsmask.layers[-1].attention.head_weights(), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    # The paper's gates (class tokens visible to the patches) act on every row.
    paper = ClsMaskModel(tiny_config(use_head_gates=True)).eval()
    with torch.no_grad():
        reference = paper(pixels).last_hidden_state
        paper.layers[-1].attention.head_gate.log_alpha[:2] = -10.0
    assert (paper(pixels).last_hidden_state[:, 3:] - reference[:, 3:]).abs().max() > 1e-3


def test_patch_dropout_training_only():
    config = tiny_config(patch_dropout=0.5, patch_embedding_type="patchify")
    model = ClsMaskModel(config)
    pixels = torch.randn(2, 3, 32, 32)
    model.train()
    assert model(pixels).last_hidden_state.shape == (2, 3 + 8 + 1, 32)
    model.eval()
    assert model(pixels).last_hidden_state.shape == (2, 3 + 16 + 1, 32)
    clf = ClsMaskForMultiLabelClassification(config).train()
    clf(pixels, labels=torch.tensor([[1, 0, 0], [0, 1, 1]])).loss.backward()
    with pytest.raises(ValueError, match="patch_dropout"):
        tiny_config(patch_dropout=1.0)
    with pytest.raises(ValueError, match="patch_dropout and diversity_loss_coefficient"):
        tiny_config(patch_dropout=0.2, diversity_loss_coefficient=0.1)


def test_gate_log_alpha_init():
    model = ClsMaskModel(tiny_config(use_head_gates=True, gate_log_alpha_init=0.0))
    assert model.layers[0].attention.head_gate.log_alpha.abs().max() == 0
    # Stochastic at 0: training draws close some gates and open others.
    gate = model.layers[0].attention.head_gate.train()
    draws = torch.stack([gate() for _ in range(200)])
    assert 0.2 < draws.mean() < 0.8


def test_attention_map_layer_ids_pick_blocks():
    model = ClsMaskForMultiLabelClassification(tiny_config(num_hidden_layers=3, attention_map_layer_ids=[0, 2])).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixels, output_class_maps=True)
    rows = model.clsmask(pixels, output_class_attentions=True, attention_map_layers=3).class_attentions
    expected = (rows[0] + rows[2])[..., 3:19].mean(1).reshape(2, 3, 4, 4)
    torch.testing.assert_close(out.class_maps, expected, atol=1e-6, rtol=1e-5)
    # An explicit number of last layers still wins at call time.
    assert len(model(pixels, output_class_maps=True, attention_map_layers=1).class_attentions) == 1
    for bad in ([3], [], [-1]):
        with pytest.raises(ValueError, match="attention_map_layer_ids"):
            tiny_config(num_hidden_layers=3, attention_map_layer_ids=bad)
    with pytest.raises(ValueError, match="attention_map_layer_ids"):
        tiny_config(num_hidden_layers=3, class_token_layers=1, attention_map_layer_ids=[0])


def one_pass_maps(model, pixels):
    """The raw maps of `forward` (the segmentation model always returns them)."""
    if isinstance(model, ClsMaskForSemanticSegmentation):
        return model(pixels).class_maps
    return model(pixels, output_class_maps=True).class_maps


def test_augmented_maps_against_explicit_passes():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    plain = ClsMaskForMultiLabelClassification(tiny_config()).eval()
    # Nothing configured: predict_class_maps is the one pass.
    torch.testing.assert_close(plain.predict_class_maps(pixels).class_maps, one_pass_maps(plain, pixels))

    model = ClsMaskForMultiLabelClassification(tiny_config(attention_map_scales=[1.0, 2.0], attention_map_flip=True))
    model.load_state_dict(plain.state_dict())
    model.eval()
    big = torch.nn.functional.interpolate(pixels, size=(64, 64), mode="bilinear", align_corners=False)
    passes = [
        one_pass_maps(plain, pixels),
        one_pass_maps(plain, pixels.flip(-1)).flip(-1),
        4 * one_pass_maps(plain, big),  # attention per scale-1 patch: 4 fine patches per coarse one
        4 * one_pass_maps(plain, big.flip(-1)).flip(-1),
    ]
    up = [torch.nn.functional.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in passes]
    expected = sum(up) / 4
    out = model.predict_class_maps(pixels)
    assert out.class_maps.shape == (2, 3, 8, 8)  # the finest grid (scale 2)
    torch.testing.assert_close(out.class_maps, expected, atol=1e-5, rtol=1e-4)
    # Logits: the mean over the input as given and flipped (not over the rescaled passes), so flip-invariant.
    torch.testing.assert_close(out.class_logits, (plain(pixels).logits + plain(pixels.flip(-1)).logits) / 2)
    flipped = model.predict_class_maps(pixels.flip(-1))
    torch.testing.assert_close(flipped.class_logits, out.class_logits, atol=1e-5, rtol=1e-4)
    # Flip-averaged maps are flip-equivariant.
    torch.testing.assert_close(flipped.class_maps, out.class_maps.flip(-1), atol=1e-5, rtol=1e-4)
    unflipped = model.predict_class_maps(pixels, flip=False)
    torch.testing.assert_close(unflipped.class_logits, plain(pixels).logits)  # without flips: the input as given
    # image_logits_over_scales: the logits are the mean over every pass, the maps stay as they were.
    model.config.image_logits_over_scales = True
    over = model.predict_class_maps(pixels)
    every = [plain(x).logits for x in (pixels, pixels.flip(-1), big, big.flip(-1))]
    torch.testing.assert_close(over.class_logits, sum(every) / 4, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(over.class_maps, out.class_maps)
    over_unflipped = model.predict_class_maps(pixels, flip=False)
    torch.testing.assert_close(over_unflipped.class_logits, (every[0] + every[2]) / 2, atol=1e-5, rtol=1e-4)
    model.config.image_logits_over_scales = False
    # forward is one pass in either mode; arguments override the config for one call, which stays as it was.
    assert model(pixels, output_class_maps=True).class_maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(
        model.predict_class_maps(pixels, scales=[1.0], flip=False).class_maps, one_pass_maps(plain, pixels)
    )
    assert model.config.attention_map_scales == [1.0, 2.0] and model.config.attention_map_flip
    with pytest.raises(ValueError, match="attention_map_scales"):
        model.predict_class_maps(pixels, scales=[0.0])


@pytest.mark.parametrize("height, width", [(40, 56), (24, 72)])
def test_augmented_maps_odd_sizes_and_segmentation_grid(height, width):
    config = tiny_config(attention_map_scales=[1.0, 0.75, 1.25, 0.5], attention_map_flip=True)
    model = ClsMaskForSemanticSegmentation(config).eval()
    out = model.predict_class_maps(torch.randn(2, 3, height, width))
    finest = scaled_size(height, width, 1.25, 8)
    assert out.class_maps.shape == out.logits.shape == (2, 3, finest[0] // 8, finest[1] // 8)
    assert scaled_size(40, 56, 0.75, 8) == (32, 40) and scaled_size(8, 8, 0.3, 8) == (8, 8)
    for bad in ([], [0.0], [-1.0]):
        with pytest.raises(ValueError, match="attention_map_scales"):
            tiny_config(attention_map_scales=bad)


def explicit_refinement(maps, image, iterations, dilations, sigma, position_weight=0.01):
    """The refinement written pixel by pixel, for a small (C, H, W) map and (K, H, W) image."""
    channels, height, width = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets])
    nearness = torch.softmax(-((distance / distance.std() / sigma) ** 2), 0)

    def at(values, i, j):  # replicate borders
        return values[:, min(max(i, 0), height - 1), min(max(j, 0), width - 1)]

    weights = torch.zeros(height, width, len(offsets))
    for i in range(height):
        for j in range(width):
            around = torch.stack([at(image, i + dy, j + dx) for dy, dx in offsets])  # (N, K)
            spread = around.std(0) + 1e-8
            logits = -(((around - image[:, i, j]).abs() / (spread * sigma)) ** 2).mean(1)
            w = torch.softmax(logits, 0) + position_weight * nearness
            weights[i, j] = w / w.sum()
    for _ in range(iterations):
        new = torch.zeros_like(maps)
        for i in range(height):
            for j in range(width):
                around = torch.stack([at(maps, i + dy, j + dx) for dy, dx in offsets], 1)  # (C, N)
                new[:, i, j] = around @ weights[i, j]
        maps = new
    return maps


def test_map_refinement_against_explicit_computation():
    torch.manual_seed(0)
    config = tiny_config(attention_map_refinement_iterations=2, attention_map_refinement_dilations=[1, 3])
    refinement = ClsMaskMapRefinement(config)
    image = torch.randn(1, 2, 9, 7)
    maps = torch.rand(1, 3, 9, 7)
    expected = explicit_refinement(maps[0], image[0], 2, [1, 3], config.attention_map_refinement_sigma)
    torch.testing.assert_close(refinement(maps, image, 2)[0], expected, atol=1e-5, rtol=1e-4)


def test_map_refinement_keeps_mass_inside_regions():
    # Left half dark, right half bright (with texture); a map lit on one left pixel spreads over the left half and
    # hardly crosses the edge; a constant map stays constant (the weights sum to one).
    torch.manual_seed(0)
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 4.0
    image = image + 0.1 * torch.randn_like(image)
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 8, 3] = 1.0
    refinement = ClsMaskMapRefinement(tiny_config(attention_map_refinement_iterations=10))
    refined = refinement(maps, image, 10)[0, 0]
    assert refined[:, :8].sum() > 50 * refined[:, 8:].sum()
    assert (refined[:, :8] > 0).float().mean() > 0.9  # reached most of its region
    constant = torch.full((1, 2, 16, 16), 0.25)
    torch.testing.assert_close(refinement(constant, image, 10), constant)


def test_refined_maps_in_the_model():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    plain = ClsMaskForMultiLabelClassification(tiny_config()).eval()
    model = ClsMaskForSemanticSegmentation(
        tiny_config(attention_map_refinement_iterations=3, attention_map_scales=[1.0, 2.0])
    )
    model.load_state_dict(plain.state_dict())
    model.eval()
    out = model.predict_class_maps(pixels)
    # Averaged over the scales first, then refined at the input's resolution; logits on the same grid.
    augmented, _ = model.augmented_class_maps(pixels, one_pass_maps(model, pixels), [1.0, 2.0], False, 0.0)
    torch.testing.assert_close(out.class_maps, model.map_refinement(augmented, pixels, 3))
    assert out.class_maps.shape == out.logits.shape[:1] + (3, 32, 32)
    assert model(pixels).class_maps.shape == (2, 3, 4, 4)  # forward: the raw maps
    assert model.predict_class_maps(pixels, refinement_iterations=0).class_maps.shape == (2, 3, 8, 8)
    bf16 = model.to(torch.bfloat16).predict_class_maps(pixels.to(torch.bfloat16)).class_maps  # refined in float32
    assert bf16.shape == (2, 3, 32, 32) and bool(bf16.isfinite().all())


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention_map_refinement_iterations", -1),
        ("attention_map_refinement_iterations", 1.5),
        ("attention_map_refinement_dilations", []),
        ("attention_map_refinement_dilations", [0, 2]),
        ("attention_map_refinement_sigma", 0.0),
    ],
)
def test_refinement_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_affinity_propagation_spreads_within_like_patches():
    from modeling_clsmask.modeling_clsmask import propagate_by_affinity

    # Patches 0-1 share one feature direction, patches 2-3 another: mass on patch 0 spreads to patch 1 only.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])[None]
    maps = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    spread = propagate_by_affinity(maps, features, power=8.0)
    torch.testing.assert_close(spread.flatten(), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(spread.sum(), maps.sum())


def test_affinity_maps_in_the_model_only_at_inference():
    model = ClsMaskForMultiLabelClassification(tiny_config(attention_map_affinity_power=4.0)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    raw = model(pixels, output_class_maps=True)
    spread = model.predict_class_maps(pixels)
    from modeling_clsmask.modeling_clsmask import propagate_by_affinity

    full = model.clsmask(pixels).last_hidden_state[:, 3 : 3 + 16]
    torch.testing.assert_close(spread.class_maps, propagate_by_affinity(raw.class_maps, full, 4.0))
    assert not torch.allclose(spread.class_maps, raw.class_maps)
    torch.testing.assert_close(spread.class_logits, raw.logits)
    torch.testing.assert_close(model.predict_class_maps(pixels, affinity_power=0).class_maps, raw.class_maps)


def test_patch_classifier_loss_and_maps_against_explicit_computation():
    # The patch classifier reads every final patch token: its image logits are the mean of the patch logits (top
    # fraction 1, the default), its BCE joins the loss with its weight, and the map sources are the attention, the
    # CAM, or their geometric mean or mean.
    from modeling_clsmask.pseudo_masks import normalize_maps

    torch.manual_seed(0)
    config = tiny_config(use_patch_classifier=True, patch_classifier_loss_weight=0.5, class_map_source="cam")
    model = ClsMaskForMultiLabelClassification(config).eval()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = model(pixels, labels=labels, output_class_maps=True)
    patches = model.clsmask(pixels).last_hidden_state[:, 3 : 3 + 16]
    patch_logits = model.patch_classifier.dense(patches)
    torch.testing.assert_close(out.patch_logits, patch_logits.mean(1))
    # The reported logits average the two heads; the loss is each head's own BCE.
    torch.testing.assert_close(out.logits, (out.class_token_logits + patch_logits.mean(1)) / 2)
    assert not torch.allclose(out.logits, out.class_token_logits)
    torch.testing.assert_close(model.predict_class_maps(pixels).class_logits, out.logits)
    class_loss = torch.nn.functional.binary_cross_entropy_with_logits(out.class_token_logits, labels)
    patch_loss = torch.nn.functional.binary_cross_entropy_with_logits(patch_logits.mean(1), labels)
    torch.testing.assert_close(out.loss, class_loss + 0.5 * patch_loss)
    cams = patch_logits.transpose(1, 2).reshape(2, 3, 4, 4)
    torch.testing.assert_close(out.class_maps, cams)
    model.config.class_map_source = "attention"
    attention = model(pixels, output_class_maps=True).class_maps
    assert not torch.allclose(attention, cams)
    model.config.class_map_source = "attention_cam"
    fused = model(pixels, output_class_maps=True).class_maps
    torch.testing.assert_close(fused, (normalize_maps(attention) * normalize_maps(cams)).sqrt())
    model.config.class_map_source = "attention_cam_mean"
    mean = model(pixels, output_class_maps=True).class_maps
    torch.testing.assert_close(mean, (normalize_maps(attention) + normalize_maps(cams)) / 2)
    model.config.class_map_source = "attention_cam"
    # The masks' maps go the same way (one pass, affinity off): the pipeline sees the fused maps.
    torch.testing.assert_close(model.predict_class_maps(pixels).class_maps, fused)
    # The patch classifier learns: its weights get gradients from the loss.
    model.train()
    model(pixels, labels=labels).loss.backward()
    assert model.patch_classifier.dense.weight.grad.abs().sum() > 0


def test_patch_classifier_top_fraction_pools_the_highest_patch_logits():
    # 16 patches, fraction 0.3: each class's image logit is the mean of its ceil(4.8) = 5 highest patch logits, and
    # the loss and the reported logits use that pooling.
    torch.manual_seed(0)
    config = tiny_config(use_patch_classifier=True, patch_classifier_top_fraction=0.3)
    model = ClsMaskForMultiLabelClassification(config).eval()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = model(pixels, labels=labels)
    patch_logits = model.patch_classifier.dense(model.clsmask(pixels).last_hidden_state[:, 3 : 3 + 16])
    top = patch_logits.sort(dim=1, descending=True).values[:, :5].mean(1)
    torch.testing.assert_close(out.patch_logits, top)
    class_loss = torch.nn.functional.binary_cross_entropy_with_logits(out.class_token_logits, labels)
    patch_loss = torch.nn.functional.binary_cross_entropy_with_logits(top, labels)
    torch.testing.assert_close(out.loss, class_loss + patch_loss)
    assert not torch.allclose(top, patch_logits.mean(1))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="patch_classifier_top_fraction"):
            tiny_config(use_patch_classifier=True, patch_classifier_top_fraction=bad)


def test_cam_probability_puts_the_patch_classifier_probability_in_the_maps():
    # With cam_probability the CAM is the sigmoid of the patch logits, alone and in the fused sources; the image
    # logits and the loss do not change (it acts on the maps only).
    from modeling_clsmask.pseudo_masks import normalize_maps

    torch.manual_seed(0)
    config = tiny_config(use_patch_classifier=True, class_map_source="cam")
    model = ClsMaskForMultiLabelClassification(config).eval()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits_out = model(pixels, labels=labels, output_class_maps=True)
    model.config.cam_probability = True
    prob_out = model(pixels, labels=labels, output_class_maps=True)
    torch.testing.assert_close(prob_out.class_maps, logits_out.class_maps.sigmoid())
    torch.testing.assert_close(prob_out.logits, logits_out.logits)
    torch.testing.assert_close(prob_out.loss, logits_out.loss)
    model.config.class_map_source = "attention"
    attention = model(pixels, output_class_maps=True).class_maps
    model.config.class_map_source = "attention_cam_mean"
    fused = model(pixels, output_class_maps=True).class_maps
    expected = (normalize_maps(attention) + normalize_maps(logits_out.class_maps.sigmoid())) / 2
    torch.testing.assert_close(fused, expected)
    assert not torch.allclose(fused, (normalize_maps(attention) + normalize_maps(logits_out.class_maps)) / 2)


def test_patch_classifier_config_checks_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="use_patch_classifier=True"):
        tiny_config(class_map_source="attention_cam")
    with pytest.raises(ValueError, match="class_map_source must be one of"):
        tiny_config(use_patch_classifier=True, class_map_source="both")
    config = tiny_config(use_patch_classifier=True, class_map_source="attention_cam")
    model = ClsMaskForMultiLabelClassification(config)
    model.save_pretrained(tmp_path)
    loaded = ClsMaskForMultiLabelClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.patch_classifier.dense.weight, model.patch_classifier.dense.weight)
    assert ClsMaskForMultiLabelClassification(tiny_config()).patch_classifier is None


def test_image_branch_gives_the_logits_and_leaves_the_maps_to_the_blocks_as_they_are():
    # A copy of the last blocks forks off before them and reads [REG] and the mean patch: its logits are the image
    # logits and its BCE joins the loss; the class tokens, patch classifier and maps stay on the unchanged blocks.
    fields = dict(class_token_layers=1, num_hidden_layers=3, use_patch_classifier=True, hide_class_tokens=True,
                  class_map_source="attention_cam_mean", attention_map_flip=True, token_mask_rate=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = ClsMaskForMultiLabelClassification(tiny_config(image_branch_layers=2, **fields)).eval()
    plain = ClsMaskForMultiLabelClassification(tiny_config(**fields)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(key.startswith("image_branch.") for key in unexpected)
    assert model.clsmask.image_branch_layer() == 1 and model.clsmask.block_inputs_layer() == 1
    assert not any(layer.attention.head_gate for layer in model.image_branch.layers)
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1, 0, 0], [0, 1, 1]])
    out, reference = model(pixels, labels=labels, output_class_maps=True), plain(pixels, labels=labels)
    # The branch by hand: blocks 1-2 of its own from the states entering block 1, its norm, [REG] + mean patch.
    states = model.clsmask.states_before(pixels, 1)
    for layer in model.image_branch.layers:
        states = layer(states)[0]
    states = model.image_branch.layernorm(states)
    expected = model.image_branch.classifier(torch.cat([states[:, -1], states[:, :-1].mean(1)], -1))
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.image_branch_logits, out.logits)
    torch.testing.assert_close(out.class_token_logits, reference.class_token_logits)
    torch.testing.assert_close(out.class_maps, plain(pixels, output_class_maps=True).class_maps)
    branch_loss = torch.nn.functional.binary_cross_entropy_with_logits(expected, labels.float())
    torch.testing.assert_close(out.loss, reference.loss + branch_loss)
    # Inference: the maps are those of the model without the branch, the image logits the branch's (flip-averaged).
    maps, reference_maps = model.predict_class_maps(pixels), plain.predict_class_maps(pixels)
    torch.testing.assert_close(maps.class_maps, reference_maps.class_maps)
    flipped = model(pixels.flip(-1)).logits
    torch.testing.assert_close(maps.class_logits, (out.logits + flipped) / 2)
    # Training from cached states: they start at the fork (before the class tokens' block) and give the same loss.
    inputs = model.clsmask.class_block_inputs(pixels)
    torch.testing.assert_close(inputs, model.clsmask.states_before(pixels, 1))
    torch.testing.assert_close(model(block_inputs=inputs, labels=labels).loss, out.loss)
    # The class-mean start still reads [REG] where the class tokens join (block 2), not at the fork.
    register = model.clsmask.class_block_register_states(pixels)
    torch.testing.assert_close(register, model.clsmask.states_before(pixels, 2)[:, -1:])


def test_image_branch_starts_as_the_backbones_last_blocks_and_round_trips(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=28,
                             patch_size=14)).save_pretrained(tmp_path / "dino")  # fmt: skip
    model = ClsMaskForMultiLabelClassification.from_pretrained_backbone(
        str(tmp_path / "dino"), id2label={0: "a", 1: "b"}, class_token_layers=1, image_branch_layers=2,
        use_head_gates=True,
    ).eval()  # fmt: skip
    base = model.clsmask
    for branch_layer, layer in zip(model.image_branch.layers, base.layers[1:]):
        for key, value in branch_layer.state_dict().items():
            torch.testing.assert_close(value, layer.state_dict()[key])
    torch.testing.assert_close(model.image_branch.layernorm.weight, base.layernorm.weight)
    model.save_pretrained(tmp_path / "saved")
    loaded = ClsMaskForMultiLabelClassification.from_pretrained(tmp_path / "saved").eval()
    pixels = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)
    # Switching the branch on leaves every other part's random start as it was (A/B comparisons stay paired).
    torch.manual_seed(0)
    with_branch = ClsMaskForMultiLabelClassification(tiny_config(image_branch_layers=1, use_patch_classifier=True))
    torch.manual_seed(0)
    without = ClsMaskForMultiLabelClassification(tiny_config(use_patch_classifier=True))
    for key, value in without.state_dict().items():
        assert torch.equal(with_branch.state_dict()[key], value), key
    with pytest.raises(ValueError, match="image_branch_layers must lie in"):
        tiny_config(image_branch_layers=3)
    with pytest.raises(ValueError, match="num_register_tokens"):
        tiny_config(image_branch_layers=1, num_register_tokens=0)


def test_image_branch_logit_weight_blends_the_branch_with_the_patch_classifier():
    # The image logits: weight x the branch's + the rest x the patch classifier's (on the unchanged blocks), in
    # forward and in the flip-averaged inference logits alike.
    fields = dict(class_token_layers=1, use_patch_classifier=True, attention_map_flip=True, token_mask_rate=0.0)
    torch.manual_seed(0)
    model = ClsMaskForMultiLabelClassification(tiny_config(image_branch_layers=1, **fields)).eval()
    plain = ClsMaskForMultiLabelClassification(tiny_config(**fields)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1, 0, 0], [0, 1, 1]])
    alone = model(pixels, labels=labels)
    model.config.image_branch_logit_weight = 0.25
    out, reference = model(pixels, labels=labels), plain(pixels)
    torch.testing.assert_close(out.image_branch_logits, alone.logits)
    torch.testing.assert_close(out.logits, 0.25 * alone.logits + 0.75 * reference.patch_logits)
    torch.testing.assert_close(out.loss, alone.loss)  # each head keeps its own BCE
    flipped = model(pixels.flip(-1)).logits
    torch.testing.assert_close(model.predict_class_maps(pixels).class_logits, (out.logits + flipped) / 2)
    with pytest.raises(ValueError, match="image_branch_logit_weight must lie in"):
        tiny_config(image_branch_logit_weight=1.5)
    with pytest.raises(ValueError, match="set use_patch_classifier=True, or image_branch_logit_weight=1"):
        tiny_config(image_branch_layers=1, image_branch_logit_weight=0.5)
