import torch

from robust_pretrain.augment import AugmentConfig, random_view

IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    max_rotation_deg=0.0,
    brightness=0.0,
    contrast=0.0,
    noise_std=0.0,
)


def _images():
    return torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_identity_ranges_give_back_the_images():
    images = _images()
    views = random_view(images, torch.Generator().manual_seed(1), IDENTITY)
    assert torch.allclose(views, images, atol=1e-5)


def test_views_stay_in_range_and_are_reproducible_from_the_seed():
    images = _images()
    first = random_view(images, torch.Generator().manual_seed(3), AugmentConfig())
    again = random_view(images, torch.Generator().manual_seed(3), AugmentConfig())
    other = random_view(images, torch.Generator().manual_seed(4), AugmentConfig())
    assert first.shape == images.shape
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # each image gets its own transform: the change differs between images of one batch
    change = (first - images).flatten(1).norm(dim=1)
    assert change.std() > 0


def test_crop_zooms_in():
    """Half-width crops of an image whose central half-square is white, at uniform offsets in the image.

    Per axis, the crop [c - 1/2, c + 1/2] (normalised units) overlaps the square [-1/2, 1/2] by 1 - |c|,
    c ~ U[-1/2, 1/2], so the white fraction of a view is 0.75^2 = 0.5625 on average (0.25 unzoomed).
    """
    images = torch.zeros(256, 1, 28, 28)
    images[..., 7:21, 7:21] = 1.0
    zoom = AugmentConfig(
        crop_scale=(0.25, 0.25),
        crop_ratio=(1.0, 1.0),
        max_rotation_deg=0.0,
        brightness=0.0,
        contrast=0.0,
        noise_std=0.0,
    )
    white = random_view(images, torch.Generator().manual_seed(0), zoom).mean(dim=(1, 2, 3))
    assert 0.50 < float(white.mean()) < 0.62
    assert float(white.max()) > 0.9
