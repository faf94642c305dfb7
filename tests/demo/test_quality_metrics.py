"""The image-quality metrics of ``viditq_demo.quality`` against known answers."""

import math

import numpy as np
import pytest
import torch

from viditq_demo.quality import classifier_accuracy, frechet_distance, grid_png, psnr, ssim


def _images(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 16, 16, generator=g) * 2 - 1


def test_psnr_matches_its_definition():
    ref = _images()
    noisy = ref + 0.01 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    mse = (ref.double() - noisy.double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(ref, noisy), 10 * torch.log10(4.0 / mse))
    assert torch.isinf(psnr(ref, ref)).all()


def test_ssim_is_one_for_equal_images_and_drops_with_noise_and_structure():
    ref = _images()
    torch.testing.assert_close(ssim(ref, ref), torch.ones(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    slight = ssim(ref, ref + 0.02 * torch.randn(ref.shape, generator=g)).mean()
    heavy = ssim(ref, ref + 0.5 * torch.randn(ref.shape, generator=g)).mean()
    assert 1 > slight > 0.95 > heavy
    # a constant image keeps the mean of a structured one and none of its structure
    assert ssim(ref, torch.full_like(ref, float(ref.mean()))).mean() < 0.1


def test_ssim_of_a_brightness_shift_is_the_luminance_term():
    ref = torch.zeros(1, 1, 16, 16)
    shifted = ref + 0.2
    c1 = (0.01 * 2) ** 2
    want = (2 * 0 * 0.2 + c1) / (0 + 0.2 ** 2 + c1)  # contrast/structure terms are 1 for flat images
    torch.testing.assert_close(ssim(ref, shifted), torch.tensor([want], dtype=torch.float64))


def test_frechet_distance_of_gaussians_has_its_closed_form():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2 * 2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_classifier_accuracy():
    logits = torch.eye(10)[[0, 1, 2, 3]]
    assert classifier_accuracy(lambda x: logits, torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 9])) == 0.75


def test_grid_png_layout():
    rows = [_images(5, s) for s in range(3)]
    data = grid_png(rows, ["fp", "w8a8", "w4a4-mp"], scale=2, gap=1, title="t")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = np.frombuffer(data[16:24], ">u4")
    assert width > 5 * 32 and height > 3 * 32
    assert data == grid_png(rows, ["fp", "w8a8", "w4a4-mp"], scale=2, gap=1, title="t")


def test_grid_error_panel_is_white_where_a_row_equals_the_reference_and_red_where_it_differs():
    from tests.report.test_heatmap import decode_png

    ref = torch.zeros(2, 1, 4, 4)
    off = ref.clone()
    off[0, 0, 1, 2] = 0.04  # an error of 0.04 * gain 10 = 0.4 of the red scale
    off[1, 0, 3, 3] = 1.0  # saturates
    plain = decode_png(grid_png([ref, off], ["fp", "q"], scale=1, gap=0))
    img = decode_png(grid_png([ref, off], ["fp", "q"], scale=1, gap=0, error_gain=10))
    assert img.shape[1] > plain.shape[1] + 2 * 4  # a second panel of two 4-pixel tiles
    # find the error panel: the reference row's tiles are 0 (grey 128 in the samples, white in errors)
    red = (img[..., 0] == 255) & (img[..., 1] < 255)
    ys, xs = np.nonzero(red)
    assert len(ys) == 2, "exactly the two differing pixels are tinted"
    values = sorted(int(img[y, x, 1]) for y, x in zip(ys, xs))
    assert values == [0, 153]  # 255 - round(255 * min(1, |e| * gain))
    assert (xs > plain.shape[1] - 6).all(), "the tint is in the panel right of the samples"
    with pytest.raises(ValueError, match="error_gain"):
        grid_png([ref, off], ["fp", "q"], error_gain=0)


@pytest.mark.parametrize("call,match", [
    (lambda: psnr(_images(), _images(3)), "differ in shape"),
    (lambda: psnr(torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)), r"\[B, C, H, W\]"),
    (lambda: psnr(_images(), _images(), data_range=0), "data_range"),
    (lambda: ssim(_images(), _images(), window=4), "window must be odd"),
    (lambda: ssim(_images(), _images(), window=17), "window must be odd"),
    (lambda: frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3)), "N >= 2"),
    (lambda: frechet_distance(torch.zeros(4, 3), torch.zeros(5, 2)), "feature sizes differ"),
    (lambda: grid_png([_images()], []), "one label per row"),
    (lambda: grid_png([_images(), _images(3)], ["a", "b"]), "row 1"),
    (lambda: classifier_accuracy(lambda x: x, _images(), torch.zeros(3, dtype=torch.long)), "labels"),
])
def test_bad_inputs_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_psnr_is_finite_for_different_images():
    assert math.isfinite(float(psnr(_images(seed=0), _images(seed=1)).mean()))
