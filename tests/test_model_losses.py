"""Every SEN loss against a direct (loop-by-loop) computation on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from tipr.model.losses import (
    hardest_negative_triplet_loss,
    identity_classifier,
    identity_loss,
    itc_loss,
    masked_patch_mse,
    sdm_loss,
)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _features(seed=0, b=5, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)


def test_sdm_two_items_by_hand():
    # Orthogonal unit features, different people, tau = 1: logits = identity matrix.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = image.clone()
    loss = sdm_loss(image, text, torch.tensor([0, 1]), temperature=1.0, eps=1e-8)
    p_pos, p_neg = math.e / (math.e + 1), 1 / (math.e + 1)
    row = p_pos * (math.log(p_pos) - math.log(1 + 1e-8)) + p_neg * (math.log(p_neg) - math.log(1e-8))
    assert loss.item() == pytest.approx(2 * row, rel=1e-6)  # two directions, mean over two equal rows


def test_sdm_matches_loops_with_shared_identities():
    image, text = _features(1)
    pids = torch.tensor([3, 1, 3, 2, 1])
    tau, eps = 0.5, 1e-8
    b = len(pids)
    total = 0.0
    for direction in ("i2t", "t2i"):
        rows = []
        for i in range(b):
            logits = []
            for j in range(b):
                a, c = (image[i], text[j]) if direction == "i2t" else (text[i], image[j])
                logits.append(_cos(a, c) / tau)
            z = sum(math.exp(v) for v in logits)
            same = [float(pids[i] == pids[j]) for j in range(b)]
            kl = 0.0
            for j in range(b):
                p = math.exp(logits[j]) / z
                kl += p * (math.log(p) - math.log(same[j] / sum(same) + eps))
            rows.append(kl)
        total += sum(rows) / b
    assert sdm_loss(image, text, pids, temperature=tau, eps=eps).item() == pytest.approx(total, rel=1e-6)


def test_sdm_is_scale_invariant_and_rejects_bad_temperature():
    image, text = _features(2)
    pids = torch.tensor([0, 1, 2, 0, 1])
    assert sdm_loss(3 * image, 0.5 * text, pids).item() == pytest.approx(sdm_loss(image, text, pids).item())
    with pytest.raises(ValueError, match="-1"):
        sdm_loss(image, text, pids, temperature=-1)


def test_identity_loss_is_mean_of_two_cross_entropies():
    g = torch.Generator().manual_seed(3)
    image_logits, text_logits = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    pids = torch.tensor([0, 6, 2, 2])

    def ce(logits):
        return sum(-math.log(math.exp(logits[i, pids[i]]) / sum(math.exp(v) for v in logits[i])) for i in range(4)) / 4

    expected = (ce(image_logits) + ce(text_logits)) / 2
    assert identity_loss(image_logits, text_logits, pids).item() == pytest.approx(float(expected), rel=1e-5)


def test_identity_classifier_initialisation():
    torch.manual_seed(0)
    classifier = identity_classifier(512, 1000)
    assert classifier.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert torch.count_nonzero(classifier.bias) == 0
    with pytest.raises(ValueError, match="0"):
        identity_classifier(8, 0)


def test_triplet_never_uses_a_same_identity_negative():
    # Caption 0's most similar image is image 1, but it shows the same person: the
    # negative must be image 2 (the only other identity), as in the hand computation.
    image = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.3, 1.0, 0.0]], dtype=torch.float64)
    text = torch.tensor([[1.0, 0.05, 0.0], [0.2, 0.1, 1.0], [0.0, 1.0, 0.2]], dtype=torch.float64)
    pids = torch.tensor([7, 7, 4])
    m = 0.05

    def direction(anchors, candidates):
        losses = []
        for i in range(3):
            pos = 1 - _cos(anchors[i], candidates[i])
            negs = [1 - _cos(anchors[i], candidates[j]) for j in range(3) if pids[j] != pids[i]]
            losses.append(max(0.0, pos - min(negs) + m))  # hardest negative = smallest distance
        return sum(losses) / 3

    expected = direction(text, image) + direction(image, text)
    got = hardest_negative_triplet_loss(image, text, pids, margin=m).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # Picking the same-identity image 1 as caption 0's negative would give a different value.
    wrong = max(0.0, (1 - _cos(text[0], image[0])) - (1 - _cos(text[0], image[1])) + m)
    right = max(0.0, (1 - _cos(text[0], image[0])) - (1 - _cos(text[0], image[2])) + m)
    assert wrong != pytest.approx(right)


def test_triplet_random_batch_and_anchors_without_negatives():
    image, text = _features(4, b=6)
    pids = torch.tensor([0, 0, 1, 2, 2, 1])
    m = 0.3
    sim = F.normalize(text, dim=1) @ F.normalize(image, dim=1).t()
    expected = 0.0
    for s in (sim, sim.t()):
        per_row = []
        for i in range(6):
            neg = max(float(s[i, j]) for j in range(6) if pids[j] != pids[i])
            per_row.append(max(0.0, neg - float(s[i, i]) + m))
        expected += sum(per_row) / 6
    assert hardest_negative_triplet_loss(image, text, pids, m).item() == pytest.approx(expected, rel=1e-6)
    # A batch of one identity has no negatives: loss 0 (never a same-identity "negative"), still differentiable.
    image.requires_grad_(True)
    loss = hardest_negative_triplet_loss(image, text, torch.zeros(6, dtype=torch.long), margin=m)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(image.grad) == 0


def test_itc_matches_loops():
    image, text = _features(5, b=4)
    tau = 0.1
    total = 0.0
    for a, c in ((image, text), (text, image)):
        ce = 0.0
        for i in range(4):
            logits = [_cos(a[i], c[j]) / tau for j in range(4)]
            ce += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        total += ce / 4
    assert itc_loss(image, text, temperature=tau).item() == pytest.approx(total / 2, rel=1e-6)


def test_masked_patch_mse_counts_only_masked_patches():
    g = torch.Generator().manual_seed(6)
    prediction = torch.randn(2, 4, 3, generator=g)
    target = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    expected = 0.0
    for b, n in [(0, 0), (0, 2), (1, 3)]:
        expected += sum((prediction[b, n, k] - target[b, n, k]).item() ** 2 for k in range(3)) / 3
    expected /= 3
    assert masked_patch_mse(prediction, target, mask).item() == pytest.approx(expected, rel=1e-6)
    # Changing visible patches does not change the loss.
    changed = prediction.clone()
    changed[mask == 0] += 100.0
    assert masked_patch_mse(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"mask \(3, 2\)"):
        masked_patch_mse(prediction, target, mask[:, :3].T)
