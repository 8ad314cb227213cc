import math

import pytest
import torch

from modeling_clsmask.training.metrics import (
    average_precision,
    class_assignment_counts,
    class_assignment_summary,
    classification_metrics,
    confusion_matrices,
    iou_from_confusion,
)


def test_confusion_and_iou_known_answer():
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 2]]])
    conf = confusion_matrices(pred, target, 3)[0]
    assert conf.tolist() == [[3, 1, 0], [1, 2, 0], [0, 0, 0]]
    result = iou_from_confusion(conf)
    assert result["per_class_iou"][0] == pytest.approx(3 / 5)
    assert result["per_class_iou"][1] == pytest.approx(2 / 4)
    assert result["per_class_iou"][2] is None  # neither in ground truth nor predicted (255 ignored)
    assert result["mean_iou"] == pytest.approx((0.6 + 0.5) / 2)


def test_per_sample_confusions_sum_to_batch_confusion():
    target = torch.randint(0, 4, (5, 9, 7))
    pred = torch.randint(0, 4, (5, 9, 7))
    per_sample = confusion_matrices(pred, target, 4)
    assert per_sample.shape == (5, 4, 4)
    total = torch.bincount((target * 4 + pred).flatten(), minlength=16).view(4, 4)
    assert torch.equal(per_sample.sum(0), total)


def test_target_out_of_range():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrices(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]), 3)


def test_average_precision_known_answer():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    targets = torch.tensor([[1], [0], [1], [0]])
    # Positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2.
    assert average_precision(scores, targets)[0].item() == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(average_precision(scores, torch.zeros_like(targets))[0].item())
    metrics = classification_metrics(torch.tensor([[0.9, 0.2], [0.1, 0.8]]), torch.tensor([[1, 0], [0, 1]]), [0, 1])
    assert metrics["mAP"] == 1.0 and metrics["f1_micro"] == 1.0
    # Per class, keyed by name, over the classes asked for (class 1 is background here and left out); a class
    # without positives is None, not a NaN that json would write as an invalid token.
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.7], [0.5, 0.3, 0.1]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    metrics = classification_metrics(scores, targets, [0, 2], class_names=["cat", "background", "dog"])
    assert metrics["per_class_AP"] == {"cat": 1.0, "dog": pytest.approx((1 / 1 + 1 / 3 * 2) / 2)}
    assert metrics["mAP"] == pytest.approx((1.0 + (1 + 2 / 3) / 2) / 2)
    assert classification_metrics(scores, targets * 0 + torch.tensor([1, 0, 0]), [0, 2], class_names=["a", "b", "c"])[
        "per_class_AP"
    ]["c"] is None


def test_class_assignment():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :, :4] = 1
    masks[0, :, 4:] = 2
    maps = torch.zeros(1, 3, 8, 8)
    maps[0, 1, :, :4] = 1  # class 1's map on class 1's region: right
    maps[0, 2, :, :4] = 1  # class 2's map also on class 1's region: wrong for class 2
    counts = class_assignment_counts(maps, masks, torch.tensor([[0, 1, 1]]), foreground=[1, 2])
    assert counts.tolist() == [[1, 2, 1.0]]  # two regions, each right by chance with probability 1/2
    # Absent classes' maps do not compete; a single present class does not count (trivially right).
    maps[0, 2] = 0
    maps[0, 2, :, 4:] = 1
    assert class_assignment_counts(maps, masks, torch.tensor([[0, 1, 1]]), foreground=[1, 2]).tolist() == [[2, 2, 1]]
    assert class_assignment_counts(maps, masks, torch.tensor([[0, 1, 0]]), foreground=[1, 2]).tolist() == [[0, 0, 0]]


def test_class_assignment_chance_level():
    """Chance is 1/n per region of an n-class image: images of two and three classes give (2/2 + 3/3) / 5."""
    masks = torch.zeros(2, 6, 6, dtype=torch.long)
    masks[0, :, :3], masks[0, :, 3:] = 1, 2
    masks[1, :2], masks[1, 2:4], masks[1, 4:] = 1, 2, 3
    labels = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    maps = torch.stack([(masks == k).float() for k in range(4)], dim=1)  # perfect maps
    counts = class_assignment_counts(maps, masks, labels, foreground=[1, 2, 3])
    summary = class_assignment_summary(counts)
    assert summary["class_assignment_accuracy"] == 1.0
    assert summary["class_assignment_chance"] == pytest.approx(2 / 5)
    assert summary["class_assignment_margin"] == pytest.approx(3 / 5)
    assert summary["class_assignment_regions"] == 5
