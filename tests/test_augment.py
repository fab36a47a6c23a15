import torch

from dml.data.augment import CIFAR100_MEAN, CIFAR100_STD, Normalise, augment_batch, crop_and_flip, draw_crop_and_flip


def test_crop_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx, flips = draw_crop_and_flip(6, 4, g)
    out = crop_and_flip(images, dy, dx, flips, 4)
    for b in range(6):
        padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
        padded[:, 4:36, 4:36] = images[b]
        ref = padded[:, dy[b]:dy[b] + 32, dx[b]:dx[b] + 32]
        if flips[b]:
            ref = ref.flip(-1)
        assert torch.equal(out[b], ref)


def test_offsets_uniform_over_0_to_8_and_flip_rate_one_half():
    g = torch.Generator().manual_seed(1)
    dy, dx, flips = draw_crop_and_flip(90_000, 4, g)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=9)
        assert counts.numel() == 9  # nothing outside 0..8
        expected = 90_000 / 9
        chi2 = (((counts.float() - expected) ** 2) / expected).sum().item()
        assert chi2 < 26.1  # chi-square, 8 degrees of freedom, p = 0.001
    assert abs(flips.float().mean().item() - 0.5) < 0.01


def test_crop_shows_padding_at_the_borders():
    images = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = crop_and_flip(images, torch.tensor([0]), torch.tensor([8]), torch.tensor([False]), 4)
    assert out[0, :, :4].sum() == 0  # 4 rows of top padding
    assert out[0, :, :, -4:].sum() == 0  # 4 columns of right padding
    assert out[0, :, 4:, :28].min() == 255


def test_same_seed_same_batches_other_seed_differs():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment_batch(images, torch.Generator().manual_seed(5))
    b = augment_batch(images, torch.Generator().manual_seed(5))
    c = augment_batch(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_normalise_matches_the_formula():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = Normalise(CIFAR100_MEAN, CIFAR100_STD, torch.device("cpu"))(images)
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
