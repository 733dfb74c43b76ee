"""data.py: the synthetic dataset, image folders and the ADM crop, code extraction and its reader."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import CLASS_NAMES, SyntheticShapes


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_per_seed_and_index():
    a, b = SyntheticShapes(50, 32, seed=0), SyntheticShapes(50, 32, seed=0)
    later = [b[i] for i in (7, 3, 7)]  # another instance, another access order
    assert torch.equal(a[7][0], later[0][0]) and torch.equal(a[7][0], later[2][0])
    assert torch.equal(a[3][0], later[1][0]) and a[3][1] == later[1][1] == 3
    assert not torch.equal(a[7][0], SyntheticShapes(50, 32, seed=1)[7][0])
    assert not torch.equal(a[7][0], a[17][0])  # same class, another image
    # the DataLoader's worker processes draw the very same images
    loader = torch.utils.data.DataLoader(a, batch_size=10, num_workers=2)
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([a[i][0] for i in range(10)])) and y.tolist() == list(range(10))


@pytest.mark.parametrize("size", [16, 48])
def test_synthetic_shape_range_labels(size):
    ds = SyntheticShapes(30, size)
    assert len(ds) == 30 and len(CLASS_NAMES) == 10
    for i in range(30):
        x, y = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and y == i % 10
        # 8-bit images: every value is k / 127.5 - 1 for an integer k
        k = (x + 1) * 127.5
        assert torch.allclose(k, k.round(), atol=1e-4)
    with pytest.raises(IndexError):
        ds[30]


def _bright_colour_histogram(x):
    """4x4x4 RGB histogram of the pixels brighter than the darkest foreground, normalised."""
    rgb = ((x + 1) * 127.5).permute(1, 2, 0).reshape(-1, 3)
    fg = rgb[rgb.max(1).values > 120]
    bins = (fg // 64).long().clamp(max=3)
    h = torch.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).float()
    return h / h.sum().clamp(min=1)


def test_synthetic_classes_separable_by_nearest_class_mean():
    """A nearest-class-mean classifier on colour histograms of 300 images labels 200 held-out ones."""
    ds = SyntheticShapes(500, 32, seed=3)
    feats = torch.stack([_bright_colour_histogram(ds[i][0]) for i in range(500)])
    labels = torch.arange(500) % 10
    means = torch.stack([feats[:300][labels[:300] == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats[300:], means).argmin(1)
    acc = (pred == labels[300:]).float().mean().item()
    assert acc > 0.9, acc


def test_synthetic_background_darker_than_every_foreground():
    """Corner pixels (almost always background) stay below 90/255; each class's brightest pixel is
    above 190/255 in some channel: the backgrounds never look like a foreground colour."""
    ds = SyntheticShapes(100, 32)
    for i in range(100):
        x = (ds[i][0] + 1) * 127.5
        assert x.max() > 190
    corners = torch.stack([((ds[i][0] + 1) * 127.5)[:, 0, 0] for i in range(100)])
    assert corners.max() < 90


def test_save_grid(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 5), -1.0), torch.full((3, 4, 5), 1.0), torch.zeros(3, 4, 5)])
    data.save_grid(imgs, tmp_path / "g.png", nrow=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    # 2 per row, 2 rows, 2 px padding: height 2*(4+2)+2, width 2*(5+2)+2
    assert grid.shape == (14, 16, 3)
    assert (grid[2:6, 2:7] == 0).all() and (grid[2:6, 9:14] == 255).all() and (grid[8:12, 2:7] == 128).all()
    assert (grid[0:2] == 0).all() and (grid[8:12, 9:14] == 0).all()  # padding and the empty slot
