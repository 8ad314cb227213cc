"""Pseudo-mask maths on hand-made maps with known answers."""

import pytest
import torch

from modeling_clsmask import masks_from_class_maps, nearest_fill


def brute_force_fill(labels, assigned):
    out = labels.clone()
    for b in range(labels.shape[0]):
        points = assigned[b].nonzero()
        if len(points) == 0:
            continue
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                d = ((points - torch.tensor([i, j])) ** 2).sum(1)
                nearest = points[d == d.min()]
                out[b, i, j] = labels[b, nearest[0, 0], nearest[0, 1]]
    return out


def test_nearest_fill_exact_euclidean_against_brute_force():
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        height, width = torch.randint(3, 12, (2,), generator=generator).tolist()
        assigned = torch.rand(2, height, width, generator=generator) < 0.15
        assigned[1] = False
        labels = torch.randint(0, 4, (2, height, width), generator=generator)
        got = nearest_fill(labels, assigned)
        want = brute_force_fill(labels, assigned)
        # Equidistant pixels may legitimately take either label: compare distances, not labels, there.
        for b in range(2):
            points = assigned[b].nonzero()
            for i in range(height):
                for j in range(width):
                    if not len(points):
                        assert got[b, i, j] == labels[b, i, j]
                        continue
                    d = ((points - torch.tensor([i, j])) ** 2).sum(1)
                    allowed = {labels[b, p[0], p[1]].item() for p in points[d == d.min()]}
                    assert got[b, i, j].item() in allowed
                    assert want[b, i, j].item() in allowed


def test_nearest_fill_is_euclidean_not_manhattan():
    # Pixel (0, 0): label 1 at (2, 2) is Euclidean distance^2 8 (Manhattan 4); label 2 at (0, 3) is 9 (Manhattan 3).
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    assigned = torch.zeros(1, 4, 4, dtype=torch.bool)
    labels[0, 2, 2], assigned[0, 2, 2] = 1, True
    labels[0, 0, 3], assigned[0, 0, 3] = 2, True
    assert nearest_fill(labels, assigned)[0, 0, 0].item() == 1


def test_known_answer_two_classes_and_fill():
    # Class 0 high on column 0, class 1 on column 3; columns 1 and 2 are below both means, and take the class of
    # the nearer claimed column.
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :, 0] = 1.0
    maps[0, 1, :, 3] = 1.0
    scores = torch.tensor([[0.9, 0.8]])
    masks = masks_from_class_maps(maps, scores, torch.tensor([[True, True]]), (4, 4))
    expected = torch.tensor([[0, 0, 1, 1]] * 4)
    assert torch.equal(masks[0], expected)


def test_most_confident_class_wins_overlap():
    maps = torch.ones(1, 3, 2, 2)
    maps[0, :, 0, 0] = 5.0  # every class claims pixel (0, 0) only
    masks = masks_from_class_maps(maps, torch.tensor([[0.6, 0.95, 0.7]]), torch.ones(1, 3, dtype=torch.bool), (2, 2))
    assert masks[0, 0, 0].item() == 1
    # Absent classes are never painted even with the highest score.
    masks = masks_from_class_maps(maps, torch.tensor([[0.6, 0.95, 0.7]]), torch.tensor([[True, False, True]]), (2, 2))
    assert set(masks.unique().tolist()) == {2}


def test_no_present_class_takes_most_probable_or_background():
    maps = torch.rand(2, 3, 4, 4)
    scores = torch.tensor([[0.1, 0.4, 0.2], [0.3, 0.1, 0.2]])
    present = torch.zeros(2, 3, dtype=torch.bool)
    masks = masks_from_class_maps(maps, scores, present, (8, 8))
    assert (masks[0] == 1).all() and (masks[1] == 0).all()
    masks = masks_from_class_maps(maps, scores, present, (8, 8), background_threshold=0.5, background_label_id=0)
    assert (masks == 0).all()


def test_background_threshold():
    maps = torch.zeros(1, 3, 1, 4)
    maps[0, 1] = torch.tensor([0.0, 0.2, 0.6, 1.0])  # normalised: 0, .2, .6, 1
    maps[0, 0] = 10.0  # background token's own map must be ignored
    masks = masks_from_class_maps(
        maps,
        torch.tensor([[0.99, 0.9, 0.1]]),
        torch.tensor([[True, True, False]]),
        (1, 4),
        background_threshold=0.5,
        background_label_id=0,
    )
    assert masks[0, 0].tolist() == [0, 0, 1, 1]


def test_upsampling_to_odd_sizes_and_batch():
    maps = torch.rand(3, 2, 5, 7)
    masks = masks_from_class_maps(maps, torch.rand(3, 2), torch.ones(3, 2, dtype=torch.bool), (37, 53))
    assert masks.shape == (3, 37, 53) and masks.dtype == torch.long


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        masks_from_class_maps(torch.rand(1, 2, 4, 4), torch.rand(1, 3), torch.ones(1, 2, dtype=torch.bool), (4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        masks_from_class_maps(torch.rand(2, 4, 4), torch.rand(1, 2), torch.ones(1, 2, dtype=torch.bool), (4, 4))


def test_large_outputs_are_made_at_a_bounded_working_size():

    from modeling_clsmask.pseudo_masks import masks_from_class_maps

    torch.manual_seed(0)
    maps = torch.rand(2, 3, 4, 4)
    scores = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.6]])
    present = torch.tensor([[1, 0, 1], [0, 1, 1]]).bool()
    # At or below the working size nothing changes.
    torch.testing.assert_close(
        masks_from_class_maps(maps, scores, present, (40, 30), 0.3, 0, max_working_size=40),
        masks_from_class_maps(maps, scores, present, (40, 30), 0.3, 0, max_working_size=None),
    )
    # Above it: the mask made at the working size (longer side 40, aspect kept), resized with nearest neighbours.
    big = masks_from_class_maps(maps, scores, present, (200, 100), 0.3, 0, max_working_size=40)
    small = masks_from_class_maps(maps, scores, present, (40, 20), 0.3, 0, max_working_size=None)
    assert big.shape == (2, 200, 100)
    rows, cols = (torch.arange(200) + 0.5) // 5, (torch.arange(100) + 0.5) // 5  # nearest on pixel centres
    expected = small[:, rows.long()][:, :, cols.long()]
    torch.testing.assert_close(big, expected)
    full = masks_from_class_maps(maps, scores, present, (200, 100), 0.3, 0, max_working_size=None)
    assert (big == full).float().mean() > 0.95  # the same masks up to the blocky edges


def test_argmax_assembly_takes_the_highest_normalised_map():
    # Both maps are above their means on the middle columns; the paper's assembly gives them to the more confident
    # class, the argmax to whichever normalised map is higher there.
    maps = torch.zeros(1, 2, 1, 4)
    maps[0, 0] = torch.tensor([1.0, 0.9, 0.7, 0.0])
    maps[0, 1] = torch.tensor([0.0, 0.6, 0.8, 1.0])
    scores, present = torch.tensor([[0.9, 0.8]]), torch.tensor([[True, True]])
    assert masks_from_class_maps(maps, scores, present, (1, 4))[0, 0].tolist() == [0, 0, 0, 1]
    argmax = masks_from_class_maps(maps, scores, present, (1, 4), assembly="argmax")
    assert argmax[0, 0].tolist() == [0, 0, 1, 1]
    # Absent classes are never painted; background where the best present map is under the threshold.
    only_one = masks_from_class_maps(maps, scores, torch.tensor([[False, True]]), (1, 4), assembly="argmax")
    assert set(only_one.unique().tolist()) == {1}
    three = torch.cat([torch.zeros(1, 1, 1, 4), maps], 1)
    masked = masks_from_class_maps(
        three, torch.tensor([[0.99, 0.9, 0.8]]), torch.ones(1, 3, dtype=torch.bool), (1, 4), 0.5, 0, assembly="argmax"
    )
    assert masked[0, 0].tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="assembly"):
        masks_from_class_maps(maps, scores, present, (1, 4), assembly="vote")


def test_ignore_margin_leaves_close_calls_unlabelled():
    maps = torch.zeros(1, 3, 1, 4)
    maps[0, 1] = torch.tensor([1.0, 0.55, 0.5, 0.0])
    maps[0, 2] = torch.tensor([0.0, 0.5, 0.55, 1.0])
    scores, present = torch.tensor([[0.9, 0.9, 0.8]]), torch.tensor([[False, True, True]])
    kept = masks_from_class_maps(maps, scores, present, (1, 4), assembly="argmax", ignore_margin=0.1)
    assert kept[0, 0].tolist() == [1, 255, 255, 2]
    complete = masks_from_class_maps(maps, scores, present, (1, 4), assembly="argmax", ignore_margin=0.0)
    assert complete[0, 0].tolist() == [1, 1, 2, 2]
    # Background competes at its threshold's score: 0.55 against 0.5 is a close call, 1.0 is not.
    with_background = masks_from_class_maps(
        maps, scores, torch.tensor([[True, True, False]]), (1, 4), 0.5, 0, assembly="argmax", ignore_margin=0.1
    )
    assert with_background[0, 0].tolist() == [1, 255, 255, 0]
    # One candidate (no background, one present class): nothing to be unsure between.
    single = masks_from_class_maps(
        maps, scores, torch.tensor([[False, True, False]]), (1, 4), assembly="argmax", ignore_margin=0.9
    )
    assert single[0, 0].tolist() == [1, 1, 1, 1]
