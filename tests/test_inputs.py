"""The user's own digits: MNIST's digits drawn as a person would (enlarged, dark on light,
off-centre on a page) must come back as MNIST has them; arrays are checked and scaled."""

import numpy as np
import pytest
from PIL import Image

from mnist_jax import inputs
from mnist_jax.data import load_mnist
from mnist_jax.errors import ConfigError

# Test digits of several shapes: 7, 2, 1, 0, 4, 1 (thin), 4, 9.
DIGITS = (0, 1, 2, 3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def digits():
    """(8, 28, 28) uint8 MNIST test digits, white on black."""
    return load_mnist().test_images[list(DIGITS)]


def aligned_corr(a, b):
    """Correlation of two (28, 28) images at the best whole-pixel shift of at most one pixel:
    centring rounds the centre of mass to a pixel, so a centre of mass a hair either side of a
    half pixel moves the whole digit by one, as it moved MNIST's own digits."""
    return max(np.corrcoef(np.roll(a, (dy, dx), (0, 1)).ravel(), b.ravel())[0, 1]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def centre_of_mass(image):
    ys, xs = np.indices(image.shape)
    return (ys * image).sum() / image.sum(), (xs * image).sum() / image.sum()


def ink_box(image):
    """(top, bottom, left, right) of the nonzero pixels, inclusive."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    return rows[0], rows[-1], cols[0], cols[-1]


def on_paper(digit_u8, scale, resample=Image.Resampling.NEAREST, size=(300, 180), at=(23, 11)):
    """An MNIST digit drawn as a person would: enlarged `scale` times, dark on white, pasted at
    `at` (x, y) on a white page of `size` (width, height). Returns an 'L' image."""
    big = Image.fromarray(255 - digit_u8).resize((28 * scale, 28 * scale), resample)
    page = Image.new("L", size, 255)
    page.paste(big, at)
    return page


def as_mnist(digit_u8):
    return digit_u8.astype(np.float32) / 255


def save_png(gray, path):
    """A float (H, W) image in [0, 1] saved as an 8-bit PNG; returns `path`."""
    Image.fromarray((np.asarray(gray) * 255).round().astype(np.uint8)).save(path)
    return path


def loaded(path, invert="auto"):
    (item,) = inputs.load_inputs([path], invert=invert)
    return item


# --- images: MNIST's convention -----------------------------------------------------------------

def test_mnist_digits_are_already_in_the_convention(digits):
    """MNIST's own digits pass through (nearly) unchanged: same box, centre of mass, polarity."""
    for d in load_mnist().test_images[:200]:
        out = inputs.to_mnist(d)
        assert out.dtype == np.float32 and out.shape == (28, 28)
        assert aligned_corr(out, as_mnist(d)) > 0.98
        cy, cx = centre_of_mass(out)
        assert 13.5 - 1e-4 <= cy < 14.5 + 1e-4 and 13.5 - 1e-4 <= cx < 14.5 + 1e-4


@pytest.mark.parametrize("scale,resample,page,suffix,bound", [
    # Measured on these digits: at least 0.997 (0.992 over 300 others); JPEG changes little.
    (4, Image.Resampling.NEAREST, (300, 180), ".png", 0.99),
    (9, Image.Resampling.NEAREST, (300, 420), ".jpg", 0.99),
    # A bilinear enlargement blurs the stroke (wider, softer edges) before we see it: at least
    # 0.915 on these digits (0.88 over 300 others).
    (6, Image.Resampling.BILINEAR, (300, 180), ".png", 0.9),
])
def test_drawn_digits_come_back(tmp_path, digits, scale, resample, page, suffix, bound):
    paths = []
    for i, d in enumerate(digits):
        paths.append(tmp_path / f"digit{i}{suffix}")
        on_paper(d, scale, resample, page).save(paths[-1], quality=90)
    got = inputs.load_inputs(paths)
    assert [g.name for g in got] == [str(p) for p in paths]
    for g, d in zip(got, digits, strict=True):
        assert g.inverted is True  # dark on light was detected
        assert g.image.shape == (784,) and g.image.dtype == np.float32
        assert g.image.min() == 0.0 and g.image.max() == 1.0
        image = g.image.reshape(28, 28)
        assert aligned_corr(image, as_mnist(d)) > bound, g.name
        cy, cx = centre_of_mass(image)
        assert abs(cy - 14) <= 0.5 + 1e-4 and abs(cx - 14) <= 0.5 + 1e-4


def test_white_on_black_is_kept_and_matches(tmp_path, digits):
    d = digits[0]
    dark = tmp_path / "dark.png"
    light = tmp_path / "light.png"
    on_paper(d, 5).save(dark)
    Image.fromarray(255 - np.asarray(on_paper(d, 5))).save(light)
    a, b = loaded(dark), loaded(light)
    assert (a.inverted, b.inverted) == (True, False)
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)


def test_forced_polarity_is_obeyed(tmp_path, digits):
    d = digits[1]
    dark_on_light = tmp_path / "paper.png"
    on_paper(d, 5).save(dark_on_light)
    light_on_dark = tmp_path / "screen.png"
    Image.fromarray(255 - np.asarray(on_paper(d, 5))).save(light_on_dark)
    right = loaded(dark_on_light).image.reshape(28, 28)
    np.testing.assert_allclose(loaded(dark_on_light, "yes").image.reshape(28, 28), right,
                               atol=1e-6)
    np.testing.assert_allclose(loaded(light_on_dark, "no").image.reshape(28, 28), right,
                               atol=1e-6)
    for wrong in (loaded(dark_on_light, "no"), loaded(light_on_dark, "yes")):
        assert wrong.inverted is (wrong.name.endswith("screen.png"))
        # The page itself is taken for the digit: its 300 x 180 box becomes a white 20 x 12
        # block, in which the stroke is a dark hole.
        top, bottom, left, right_ = ink_box(wrong.image.reshape(28, 28))
        assert (bottom - top + 1, right_ - left + 1) == (12, 20)
        assert aligned_corr(wrong.image.reshape(28, 28), right) < 0.3


def test_auto_polarity_judges_the_paper_by_the_border(tmp_path):
    """Against the image's mid-range, not 0.5: grey paper in dim light (0.45) under pencil
    (0.1) is light paper, a grey board (0.3) under chalk (0.8) is dark. By the border, not the
    whole image: a bold 1 cut tight is two thirds ink, but its border is mostly paper."""
    stroke = np.zeros((120, 90), bool)
    stroke[20:100, 40:52] = True
    stroke[20:32, 28:52] = True
    pencil = np.where(stroke, 0.1, 0.45).astype(np.float32)
    chalk = np.where(stroke, 0.8, 0.3).astype(np.float32)
    expected = inputs.to_mnist(np.where(stroke, 1.0, 0.0))
    for name, image, inverted in (("pencil", pencil, True), ("chalk", chalk, False)):
        got = loaded(save_png(image, tmp_path / f"{name}.png"))
        assert got.inverted is inverted
        np.testing.assert_allclose(got.image.reshape(28, 28), expected, atol=1e-5)
    bold_one = np.ones((60, 24), np.float32)
    bold_one[:, 4:20] = 0.0  # touches the top and bottom rows
    got = loaded(save_png(bold_one, tmp_path / "one.png"))
    assert got.inverted is True
    assert ink_box(got.image.reshape(28, 28))[:2] == (4, 23)


def test_noisy_grey_photo_comes_back(tmp_path, digits):
    """Pencil (0.15) on grey paper (0.85) with pixel noise of sd 0.05, saved as JPEG at
    quality 75: the noise about the paper's level is no ink, and no speck widens the box."""
    rng = np.random.default_rng(0)
    for i, d in enumerate(digits):
        page = np.asarray(on_paper(d, 5), np.float64) / 255
        photo = np.clip(0.15 + 0.7 * page + 0.05 * rng.standard_normal(page.shape), 0, 1)
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray((photo * 255).round().astype(np.uint8)).save(path, quality=75)
        got = loaded(path)
        assert got.inverted is True
        assert aligned_corr(got.image.reshape(28, 28), as_mnist(d)) > 0.98, i  # 0.994 at least


def test_transparent_background_is_paper(tmp_path, digits):
    """A black stroke whose alpha is the ink on a transparent background (what a drawing app
    exports) is a dark digit on white paper."""
    d = digits[2]
    big = np.asarray(Image.fromarray(d).resize((140, 140), Image.Resampling.BILINEAR))
    alpha = np.zeros((160, 240), np.uint8)
    alpha[10:150, 90:230] = big
    rgba = np.zeros((160, 240, 4), np.uint8)
    rgba[..., 3] = alpha  # RGB is black everywhere, also where fully transparent
    path = tmp_path / "drawn.png"
    Image.fromarray(rgba).save(path)
    got = loaded(path)
    assert got.inverted is True
    assert aligned_corr(got.image.reshape(28, 28), as_mnist(d)) > 0.95


def test_colour_16_bit_and_rotated_photos(tmp_path, digits):
    d = digits[3]
    page = on_paper(d, 5)
    reference = inputs.to_mnist(np.asarray(page))
    # Blue ink on cream paper.
    ink = np.asarray(page, np.float64)[..., None] / 255
    rgb = ink * np.array([255, 250, 235]) + (1 - ink) * np.array([20, 30, 160])
    Image.fromarray(rgb.round().astype(np.uint8)).save(tmp_path / "blue.png")
    assert aligned_corr(loaded(tmp_path / "blue.png").image.reshape(28, 28), reference) > 0.99
    # A 16-bit grayscale PNG: 0..65535, not 0..255.
    Image.fromarray(np.asarray(page).astype(np.uint16) * 257).save(tmp_path / "deep.png")
    np.testing.assert_allclose(loaded(tmp_path / "deep.png").image.reshape(28, 28), reference,
                               atol=1e-5)
    # A phone's JPEG: pixels stored turned a quarter left, EXIF orientation 6 (turn right).
    exif = Image.Exif()
    exif[0x0112] = 6
    page.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif,
                                                   quality=95)
    assert aligned_corr(loaded(tmp_path / "phone.jpg").image.reshape(28, 28), reference) > 0.97


def test_box_is_20_and_centred_by_hand():
    """A 60 x 30 bar (rows x columns) anywhere on a page: 20 x 10 after scaling by 1/3. Its
    centre of mass (9.5, 4.5) in its box goes to [13.5, 14.5): box rows 4..23, columns 9..18."""
    page = np.full((180, 300), 255, np.uint8)
    page[100:160, 17:47] = 0
    out = inputs.to_mnist(page)
    assert ink_box(out) == (4, 23, 9, 18)
    np.testing.assert_allclose(out[4:24, 9:19], 1.0, atol=1e-6)
    assert out.sum() == pytest.approx(200, abs=1e-3)


def test_centred_by_mass_not_by_box():
    """A T: a bar 60 wide and 15 tall over a stem 15 wide and 45 tall, 60 x 60 in all, is
    scaled to 20 x 20: bar 5 rows of 20 (mass 100), stem 15 rows of 5 (mass 75). Its centre
    of mass in its box is row (100 * 2 + 75 * 12) / 175 = 6.29, so the box starts at row
    ceil(13.5 - 6.29) = 8 (centre of mass 14.29), not at row 4, where centring the box puts
    it (centre of mass 10.29)."""
    page = np.full((200, 150), 255, np.uint8)
    page[30:45, 40:100] = 0
    page[45:90, 62:77] = 0
    out = inputs.to_mnist(page)
    top, bottom, left, right = ink_box(out)
    assert (top, bottom - top + 1, right - left + 1) == (8, 20, 20)
    cy, cx = centre_of_mass(out)
    assert 13.5 <= cy < 14.5 and 13.5 <= cx < 14.5
    assert cy == pytest.approx(14.29, abs=0.1)


def test_a_box_that_would_leave_the_field_is_kept_inside():
    """An upside-down T, 80 x 75: a stem 5 wide over a foot 20 tall. Its centre of mass, row
    (400 * 39.5 + 1400 * 69.5) / 1800 = 62.8 of 80, is row 15.3 of its 20-row box: putting it
    at row 14 would start the box at row -1. The box stays in the field, rows 0..19."""
    page = np.full((100, 100), 255, np.uint8)
    page[10:90, 45:50] = 0
    page[70:90, 10:85] = 0
    out = inputs.to_mnist(page)
    assert ink_box(out)[:2] == (0, 19)
    assert centre_of_mass(out)[0] > 14.5


def test_blank_and_unreadable_images_are_refused(tmp_path):
    Image.new("L", (50, 40), 255).save(tmp_path / "blank.png")
    with pytest.raises(ConfigError, match=r"blank\.png: the image is blank") as e:
        inputs.load_inputs([tmp_path / "blank.png"])
    assert "\n" not in str(e.value)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(ConfigError, match=r"broken\.jpg: not a readable PNG or JPEG"):
        inputs.load_inputs([tmp_path / "broken.jpg"])
    Image.new("L", (50, 40), 255).save(tmp_path / "digit.gif")
    with pytest.raises(ConfigError, match=r"digit\.gif: cannot read \.gif; give PNG or JPEG"):
        inputs.load_inputs([tmp_path / "digit.gif"])
    with pytest.raises(ConfigError, match=r"missing\.png: no such file"):
        inputs.load_inputs([tmp_path / "missing.png"])
    with pytest.raises(ConfigError, match="is a directory"):
        inputs.load_inputs([tmp_path])


def test_to_mnist_takes_one_grayscale_image(digits):
    np.testing.assert_array_equal(inputs.to_mnist(digits[0]),
                                  inputs.to_mnist(digits[0].astype(np.float64) / 255))
    with pytest.raises(ConfigError, match=r"one grayscale image \(H, W\), not shape \(28, 28, 3\)"):
        inputs.to_mnist(np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(ConfigError, match=r"outside \[0, 1\]; scale pixels 0..255 by 1/255"):
        inputs.to_mnist(digits[0].astype(np.float32))
    with pytest.raises(ConfigError, match="invert='maybe'; choose one of auto, yes, no"):
        inputs.to_mnist(digits[0], invert="maybe")


# --- arrays -------------------------------------------------------------------------------------

def test_npy_uint8_is_scaled_by_1_over_255(tmp_path, digits):
    np.save(tmp_path / "digits.npy", digits[:3])
    got = inputs.load_inputs([tmp_path / "digits.npy"])
    assert [g.name for g in got] == [f"{tmp_path / 'digits.npy'}[{i}]" for i in range(3)]
    assert all(g.inverted is None for g in got)
    for g, d in zip(got, digits[:3], strict=True):
        # By hand: k / 255 rounded to float32, for every pixel value k.
        expected = np.array([np.float32(k) / np.float32(255) for k in d.ravel()], np.float32)
        np.testing.assert_array_equal(g.image, expected)
    assert got[0].image.max() == 1.0  # 255 -> 1 exactly


def test_npy_float_and_single_images_pass_through(tmp_path, digits):
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    np.save(tmp_path / "flat.npy", x)
    got = inputs.load_inputs([tmp_path / "flat.npy"])
    np.testing.assert_array_equal(np.stack([g.image for g in got]), x)  # no inversion, no centring
    np.save(tmp_path / "one.npy", digits[0])
    np.save(tmp_path / "row.npy", x[1].astype(np.float64))
    one, row = inputs.load_inputs([tmp_path / "one.npy", tmp_path / "row.npy"])
    assert (one.name, row.name) == (str(tmp_path / "one.npy"), str(tmp_path / "row.npy"))
    np.testing.assert_array_equal(one.image, digits[0].ravel() / np.float32(255))
    assert row.image.dtype == np.float32
    np.testing.assert_array_equal(row.image, x[1])


def test_pickled_npy_is_never_loaded(tmp_path):
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = np.zeros((28, 28)), "not an image"
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    with pytest.raises(ConfigError, match=r"objects\.npy: holds Python objects \(pickled\), "
                                          "which are never loaded"):
        inputs.load_inputs([tmp_path / "objects.npy"])


@pytest.mark.parametrize("array,message", [
    (np.full((2, 28, 28), 255.0, np.float32),
     r"values in \[255, 255\], outside \[0, 1\]; scale pixels 0..255 by 1/255"),
    (np.full((2, 784), np.nan), "NaN or infinite values"),
    (np.zeros((2, 27, 27), np.uint8),
     r"shape \(2, 27, 27\) and dtype uint8; give shape \(N, 28, 28\), \(28, 28\), \(N, 784\)"),
    (np.zeros((2, 28, 28), np.int64), r"shape \(2, 28, 28\) and dtype int64; give .* uint8"),
    (np.zeros((0, 784), np.uint8), r"shape \(0, 784\)"),
])
def test_bad_npy_is_refused_naming_the_file(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ConfigError, match=r"bad\.npy.*" + message) as e:
        inputs.load_inputs([path])
    assert "\n" not in str(e.value)


def test_npy_that_is_not_npy_is_refused(tmp_path):
    np.savez(tmp_path / "archive.npz", x=np.zeros((1, 784)))
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    with pytest.raises(ConfigError, match=r"archive\.npy: an \.npz archive"):
        inputs.load_inputs([tmp_path / "archive.npy"])
    (tmp_path / "text.npy").write_text("0 0 0\n")
    with pytest.raises(ConfigError, match=r"text\.npy: not an \.npy file; save one array"):
        inputs.load_inputs([tmp_path / "text.npy"])


# --- the Python API's checks --------------------------------------------------------------------

def test_check_images_accepts_and_scales(digits):
    flat = inputs.check_images(digits)
    assert flat.shape == (8, 784) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, digits.reshape(8, 784) / np.float32(255))
    np.testing.assert_array_equal(inputs.check_images(flat.reshape(8, 28, 28)), flat)
    np.testing.assert_array_equal(inputs.check_images(flat.astype(np.float64)), flat)


@pytest.mark.parametrize("images,message", [
    (np.zeros(784, np.uint8), r"shape \(784,\).*for one image, pass image\[None\]"),
    (np.zeros((28, 28), np.float32), r"shape \(28, 28\).*for one image, pass image\[None\]"),
    (np.zeros((3, 27, 27), np.uint8), r"shape \(3, 27, 27\): give \(N, 784\) or \(N, 28, 28\)"),
    (np.zeros((0, 784), np.uint8), r"shape \(0, 784\).*N >= 1"),
    (np.zeros((3, 784), np.int32), r"dtype int32: give uint8 0..255 or float in \[0, 1\]"),
    (np.full((3, 784), 255.0), r"outside \[0, 1\]; scale pixels 0..255 by 1/255"),
    (np.full((3, 784), -0.5), r"values in \[-0.5, -0.5\], outside \[0, 1\]"),
    (np.full((3, 784), np.inf, np.float32), "NaN or infinite"),
])
def test_check_images_refuses(images, message):
    with pytest.raises(ConfigError, match=message) as e:
        inputs.check_images(images)
    assert "\n" not in str(e.value)


def test_check_labels_accepts_classes_and_one_hot():
    classes = np.array([3, 0, 9, 9], np.uint8)
    expected = np.zeros((4, 10), np.float32)
    expected[[0, 1, 2, 3], [3, 0, 9, 9]] = 1
    for labels in (classes, classes.astype(np.int64), expected, expected.astype(np.int8),
                   expected.astype(np.float64)):
        got = inputs.check_labels(labels, 4)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("labels,message", [
    (np.array([1, 2, 3]), "3 labels for 4 images; give one label per image"),
    (np.array([1, 2, 10, 3]), r"label 10 \(labels\[2\]\) is not a class; classes are 0..9"),
    (np.array([1, -1, 2, 3]), r"label -1 \(labels\[1\]\)"),
    (np.array([1.0, 2.0, 3.0, 4.0]), r"dtype float64: give integer classes \(N,\) in 0..9"),
    (np.zeros((4, 9)), r"shape \(4, 9\)"),
    (np.eye(10)[[1, 2, 3, 4]] * [[1], [1], [2], [1]], r"labels\[2\] = \[0.0, 0.0, 0.0, 2.0"),
    (np.eye(10)[[1, 2, 3, 4]] + np.eye(10)[[0, 5, 0, 0]] * np.array([[0], [1], [0], [0]]),
     r"labels\[1\] = \[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, .* is not one-hot"),
    (np.full((4, 10), 0.1), r"labels\[0\] = .* exactly one 1 and nine 0s"),
])
def test_check_labels_refuses(labels, message):
    with pytest.raises(ConfigError, match=message):
        inputs.check_labels(labels, 4)
