"""augment.py: draft decoding against the full decode, every RandAugment op against a hand-computed
expectation, the policy's and random erasing's statistics, and the light pipeline against the
stream's transform before it.

Statistical checks use a fixed seed and a tolerance of 4 binomial standard deviations: a
frequency p_hat measured over N independent draws is accepted when
|p_hat - p| <= 4 sqrt(p (1 - p) / N) (a chance failure rate of about 6e-5 per check for a
correct implementation; a wrong probability of the kind a bug gives is many sigmas off)."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import bench
import data

FILL = (124, 116, 104)
MEAN, STD = data.IMAGENET_MEAN, data.IMAGENET_STD


def within(p_hat, p, N, sigmas=4):
    return abs(p_hat - p) <= sigmas * math.sqrt(p * (1 - p) / N)


def encode(a, fmt="JPEG", **kw):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def img():
    """A 32 x 24 RGB fixture: colour ramps plus noise, every channel spanning most of 0-255."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:32]
    a = np.stack([x * 7 + 10, y * 9 + 20, (x + y) * 4 + 30], -1) + rng.integers(-8, 9, (24, 32, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def arr(im):
    return np.asarray(im, np.int32)


# ---------------------------------------------------------------- the crop and the decode

def test_random_resized_crop_stays_inside_and_follows_its_ranges():
    rng = np.random.default_rng(0)
    for W, H in [(640, 480), (50, 400), (32, 32)]:
        for _ in range(200):
            x, y, w, h = augment.random_resized_crop(W, H, rng)
            assert 0 <= x and 0 <= y and x + w <= W and y + h <= H and w > 0 and h > 0
    areas = [np.prod(augment.random_resized_crop(1000, 1000, rng)[2:]) / 1e6 for _ in range(500)]
    assert 0.07 <= min(areas) and max(areas) <= 1.0 and 0.4 < np.mean(areas) < 0.65  # U(0.08, 1)


def test_draft_scale_is_the_largest_that_keeps_the_output_size():
    assert augment.draft_scale(447, 1000, 224) == 1
    assert augment.draft_scale(448, 1000, 224) == 2
    assert augment.draft_scale(1000, 895, 224) == 2
    assert augment.draft_scale(896, 900, 224) == 4
    assert augment.draft_scale(1792, 1792, 224) == 8
    assert augment.draft_scale(5000, 5000, 224) == 8  # JPEG scales no further than 1/8


def _ramp_jpeg(W, H, rng):
    """R = 255 (x + 0.5) / W, G = 255 (y + 0.5) / H, with a little noise so that averages over
    rows and columns see through the 8-bit steps."""
    a = np.empty((H, W, 3))
    a[..., 0] = (np.arange(W) + 0.5) * 255 / W
    a[..., 1] = ((np.arange(H) + 0.5) * 255 / H)[:, None]
    a[..., 2] = 128
    a += rng.normal(0, 1, a.shape)
    return encode(np.clip(np.round(a), 0, 255).astype(np.uint8), quality=95)


def _edges(out, W, H):
    """Where a ramp crop's box lies in full-image pixels, (x0, x1, y0, y1), from a straight-line
    fit of the column means of R and the row means of G over the inner columns and rows (the
    outer two read clamped pixels where the box meets the image border)."""
    S = out.shape[0]
    j = np.arange(2, S - 2) + 0.5
    bx, ax = np.polyfit(j, out[:, 2:-2, 0].mean(0), 1)
    by, ay = np.polyfit(j, out[2:-2, :, 1].mean(1), 1)
    return ax * W / 255, (ax + bx * S) * W / 255, ay * H / 255, (ay + by * S) * H / 255


def test_draft_maps_the_crop_box_to_the_same_region():
    rng = np.random.default_rng(1)
    seen = set()
    for trial in range(40):  # small outputs, so that crops of small images reduce by up to 8
        W, H = (int(v) for v in rng.integers(200, 700, 2))
        size = int(rng.choice([16, 24, 32]))
        src = _ramp_jpeg(W, H, rng)
        x, y, w, h = augment.random_resized_crop(W, H, np.random.default_rng(trial))
        s = augment.draft_scale(w, h, size)
        seen.add(s)
        full = np.asarray(augment.crop_resize(src, size, np.random.default_rng(trial), decode="full"), np.float64)
        draft = np.asarray(augment.crop_resize(src, size, np.random.default_rng(trial), decode="draft"), np.float64)
        ef, ed = _edges(full, W, H), _edges(draft, W, H)
        # The fit on the full decode finds the drawn box (1 px: JPEG and 8-bit noise)...
        assert np.allclose(ef, (x, x + w, y, y + h), atol=1.5), (trial, ef, (x, y, w, h))
        # ...and the draft decode's box is the same within one pixel of the reduced image
        # (measured: within 0.2 of one).
        assert np.allclose(ed, ef, atol=s), (trial, s, ed, ef)
    assert {2, 4, 8} <= seen


def test_draft_equals_full_when_nothing_is_reduced():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (500, 600, 3), dtype=np.uint8)
    loaded = Image.open(io.BytesIO(encode(big)))
    loaded.load()  # a loaded JPEG can no longer be drafted
    cases = [(encode(a), 224),  # every crop of 400 x 300 is < 448 px: no reduction at 224
             (encode(big, "PNG"), 32),  # not a JPEG
             (encode(a[..., 0]), 224),  # a greyscale JPEG, converted to RGB as before
             (loaded, 32)]
    for src, size in cases:
        for seed in range(8):
            r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
            full = augment.crop_resize(src, size, r1, decode="full")
            draft = augment.crop_resize(src, size, r2, decode="draft")
            assert full.mode == "RGB" and full.size == (size, size)
            assert np.array_equal(np.asarray(full), np.asarray(draft))
            assert r1.bit_generator.state == r2.bit_generator.state
    # The same for the whole official pipeline on a PNG.
    off = {d: augment.Augment(kind="official", size=32, crop_scale=(0.08, 1.0), mean=MEAN, std=STD, decode=d)
           for d in ("full", "draft")}
    png = encode(big, "PNG")
    for seed in range(8):
        assert off["full"](png, np.random.default_rng(seed)).equal(off["draft"](png, np.random.default_rng(seed)))


def test_draft_output_is_close_to_full():
    # Realistic JPEGs, smaller than CC12M's to keep the test fast; output 64 so that crops reduce.
    # Tolerance: mean |diff| 1.5 levels per crop (measured about 0.5 on 500-1024 px images at 224).
    rng = np.random.default_rng(3)
    reduced = 0
    for i in range(6):
        src = augment.cc12m_like_jpeg(rng, sides=(250, 500))
        for k in range(4):
            full = augment.crop_resize(src, 64, np.random.default_rng([i, k]), decode="full")
            draft = augment.crop_resize(src, 64, np.random.default_rng([i, k]), decode="draft")
            d = np.abs(arr(full) - arr(draft))
            reduced += d.any()
            assert d.mean() < 1.5, (i, k, d.mean())
    assert reduced > 0


# ---------------------------------------------------------------- the light pipeline

def test_light_is_the_streams_transform_bit_for_bit():
    rng = np.random.default_rng(4)
    sources = [augment.cc12m_like_jpeg(rng, sides=(120, 300)) for _ in range(4)]
    sources += [encode(rng.integers(0, 256, (90, 150, 4), dtype=np.uint8), "PNG"),  # RGBA
                encode(rng.integers(0, 256, (200, 120), dtype=np.uint8))]  # greyscale JPEG
    for scale in ((0.08, 1.0), (0.5, 1.0)):
        light = augment.Augment(kind="light", size=64, crop_scale=scale, mean=MEAN, std=STD, decode="full")
        for i, src in enumerate(sources):
            for seed in range(4):
                r1, r2 = np.random.default_rng([seed, i]), np.random.default_rng([seed, i])
                with Image.open(io.BytesIO(src)) as im:
                    want = bench.today_transform(im.convert("RGB"), 64, r1, MEAN, STD, scale)
                got = light(src, r2)
                assert got.dtype == want.dtype and got.shape == (3, 64, 64)
                assert got.equal(want)
                assert r1.bit_generator.state == r2.bit_generator.state


@pytest.mark.parametrize("kind", ["light", "official"])
def test_into_a_slot_and_in_two_stages(kind):
    """aug(src, rng, out) writes into a batch slot what aug(src, rng) returns, and decode_crop
    then pixels (the stages bench.py times) is the same call; a wrong slot is refused."""
    rng = np.random.default_rng(6)
    srcs = [augment.cc12m_like_jpeg(rng, sides=(100, 200)) for _ in range(3)]
    aug = augment.Augment(kind=kind, size=40, crop_scale=(0.08, 1.0), mean=MEAN, std=STD, decode="draft")
    batch = torch.full((3, 3, 40, 40), float("nan"))
    for k, src in enumerate(srcs):
        r1, r2, r3 = (np.random.default_rng([7, k]) for _ in range(3))
        want = aug(src, r1)
        slot = batch[k]  # a view into the batch
        assert aug(src, r2, slot) is slot and batch[k].equal(want)
        assert aug.pixels(*augment.decode_crop(src, 40, r3, (0.08, 1.0), "draft"), r3).equal(want)
        assert r1.bit_generator.state == r2.bit_generator.state == r3.bit_generator.state
    with pytest.raises(ValueError, match="out: expected a contiguous float32"):
        aug(srcs[0], rng, torch.empty(3, 40, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="out: expected"):
        aug(srcs[0], rng, batch[:, 0])  # not contiguous


def test_augment_resumes_from_the_generator_state():
    rng = np.random.default_rng(5)
    srcs = [augment.cc12m_like_jpeg(rng, sides=(100, 200)) for _ in range(6)]
    aug = augment.Augment(kind="official", size=48, crop_scale=(0.08, 1.0), mean=MEAN, std=STD, decode="draft")
    r = np.random.default_rng(0)
    first = [aug(s, r) for s in srcs[:3]]
    state = r.bit_generator.state
    rest = [aug(s, r) for s in srcs[3:]]
    r2 = np.random.default_rng()
    r2.bit_generator.state = state
    assert all(a.equal(aug(s, r2)) for a, s in zip(rest, srcs[3:]))
    assert not first[0].equal(aug(srcs[0], np.random.default_rng(1)))


def test_augment_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="--augment"):
        augment.Augment(kind="heavy", size=224, crop_scale=(0.08, 1), mean=MEAN, std=STD, decode="draft")
    with pytest.raises(ValueError, match="--decode"):
        augment.Augment(kind="light", size=224, crop_scale=(0.08, 1), mean=MEAN, std=STD, decode="gpu")


def test_fill_is_the_imagenet_mean():
    aug = augment.Augment(kind="official", size=224, crop_scale=(0.08, 1), mean=MEAN, std=STD, decode="draft")
    assert aug.fill == FILL


# ---------------------------------------------------------------- RandAugment ops

def op(name, img, m=9.0, sign=1):
    return augment.RAND_OPS[name](img, m, sign, FILL)


def test_invert(img):
    assert np.array_equal(arr(op("Invert", img)), 255 - arr(img))


def test_posterize_keeps_the_top_bits(img):
    x = arr(img)
    for m, bits in ((0, 4), (2.4, 4), (2.5, 3), (5, 2), (9, 1), (10, 0)):  # bits = 4 - int(m / 10 * 4)
        assert np.array_equal(arr(op("PosterizeIncreasing", img, m)), x & (0xFF << (8 - bits) & 0xFF)), m
    assert not arr(op("PosterizeIncreasing", img, 10)).any()  # 0 bits: black, as Pillow <= 12 gave


def test_solarize_inverts_above_the_threshold(img):
    x = arr(img)
    assert np.array_equal(arr(op("SolarizeIncreasing", img, 9)), np.where(x < 26, x, 255 - x))  # 256 - 230
    assert np.array_equal(arr(op("SolarizeIncreasing", img, 0)), x)  # threshold 256


def test_solarize_add_adds_below_128(img):
    x = arr(img)
    assert np.array_equal(arr(op("SolarizeAdd", img, 9)), np.where(x < 128, np.minimum(255, x + 99), x))


def test_auto_contrast_stretches_each_channel(img):
    x, y = arr(img), arr(op("AutoContrast", img))
    lo, hi = x.min((0, 1)), x.max((0, 1))
    assert (y.min((0, 1)) == 0).all() and (y.max((0, 1)) == 255).all()
    scale = 255.0 / (hi - lo)  # Pillow's table: int(x * scale - lo * scale)
    assert np.array_equal(y, np.trunc(x * scale + -lo * scale).astype(np.int32))
    flat = Image.new("RGB", (8, 8), (7, 200, 30))
    assert np.array_equal(arr(op("AutoContrast", flat)), arr(flat))


def test_equalize_follows_the_cumulative_histogram(img):
    x, y = arr(img), arr(op("Equalize", img))
    for c in range(3):
        h = np.bincount(x[..., c].ravel(), minlength=256)
        step = (h.sum() - h[np.nonzero(h)[0][-1]]) // 255
        lut = np.minimum(255, (step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step)
        assert np.array_equal(y[..., c], lut[x[..., c]])
    assert y.max() == 255 and y.min() == 0


@pytest.mark.parametrize("sign", (1, -1))
def test_enhance_factors_at_m9(img, sign):
    # PIL blends out = deg + f (x - deg) in float and truncates: within 1 level of the rounded
    # formula, 2 where the degenerate image is itself rounded (greyscale, smoothing).
    f = 1 + sign * 0.81
    x = arr(img).astype(np.float64)
    grey = x @ np.array([0.299, 0.587, 0.114])
    blend = lambda deg: np.clip(deg + f * (x - deg), 0, 255)  # noqa: E731
    assert np.abs(arr(op("BrightnessIncreasing", img, 9, sign)) - blend(0)).max() <= 1
    assert np.abs(arr(op("ContrastIncreasing", img, 9, sign)) - blend(np.floor(grey.mean() + 0.5))).max() <= 2
    assert np.abs(arr(op("ColorIncreasing", img, 9, sign)) - blend(grey[..., None])).max() <= 2
    k = np.ones((3, 3)) / 13
    k[1, 1] = 5 / 13
    smooth = sum(k[i, j] * x[i:i + 22, j:j + 30] for i in range(3) for j in range(3))  # SMOOTH, inner pixels
    got = arr(op("SharpnessIncreasing", img, 9, sign))[1:-1, 1:-1]
    assert np.abs(got - np.clip(smooth + f * (x[1:-1, 1:-1] - smooth), 0, 255)).max() <= 2
    for name in ("BrightnessIncreasing", "ContrastIncreasing", "ColorIncreasing", "SharpnessIncreasing"):
        assert np.array_equal(arr(op(name, img, 0)), arr(img))  # factor 1


def _uniform(size=200, colour=(10, 200, 30)):
    return Image.new("RGB", (size, size), colour)


def _fill_and_keep(out, src_of):
    """Pixels whose source point src_of(x, y) (pixel centres) lies more than 1.5 px outside the
    image must be the fill colour exactly, more than 1.5 px inside the original colour."""
    S = out.shape[0]
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    u, v = src_of(xx, yy)
    inside = np.minimum(np.minimum(u, S - u), np.minimum(v, S - v))
    assert (out[inside < -1.5] == FILL).all() and (out[inside > 1.5] == (10, 200, 30)).all()
    return (inside < -1.5).mean()


@pytest.mark.parametrize("sign", (1, -1))
def test_rotate_turns_27_degrees_with_the_fill(sign):
    out = arr(op("Rotate", _uniform(), 9, sign))
    t, c = math.radians(27 * sign), 100
    # counter-clockwise on screen (y down): output (x, y) reads the input at the point turned back
    frac = _fill_and_keep(out, lambda x, y: (c + (x - c) * math.cos(t) - (y - c) * math.sin(t),
                                             c + (x - c) * math.sin(t) + (y - c) * math.cos(t)))
    assert frac > 0.1
    a = np.zeros((200, 200, 3), np.uint8)
    a[95:105, 150:160] = 255  # a marker right of the centre moves up for a positive angle
    ys, xs = np.nonzero(arr(augment.rotate(Image.fromarray(a), 27, FILL))[..., 0] > 200)
    assert math.isclose(math.degrees(math.atan2(100 - ys.mean(), xs.mean() - 100)), 27, abs_tol=1.5)


@pytest.mark.parametrize("sign", (1, -1))
def test_shear_by_0_27_with_the_fill(sign):
    f = 0.27 * sign
    fx = _fill_and_keep(arr(op("ShearX", _uniform(), 9, sign)), lambda x, y: (x + f * y, y))
    fy = _fill_and_keep(arr(op("ShearY", _uniform(), 9, sign)), lambda x, y: (x, y + f * x))
    assert math.isclose(fx, 0.135, abs_tol=0.02) and math.isclose(fy, 0.135, abs_tol=0.02)  # triangle 0.27 / 2


@pytest.mark.parametrize("sign", (1, -1))
def test_translate_by_0_405_of_the_side(sign):
    a = np.random.default_rng(6).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    x = op("TranslateXRel", Image.fromarray(a), 9, sign)
    y = op("TranslateYRel", Image.fromarray(a), 9, sign)
    n = 81  # 0.405 x 200: a whole number of pixels, so the kept part is copied exactly
    for out, t in ((arr(x), a), (arr(y).transpose(1, 0, 2), a.transpose(1, 0, 2))):
        if sign > 0:  # content moves left (up) by n, the fill enters on the right (bottom)
            assert np.array_equal(out[:, :200 - n], t[:, n:]) and (out[:, 200 - n:] == FILL).all()
        else:
            assert np.array_equal(out[:, n:], t[:, :200 - n]) and (out[:, :n] == FILL).all()


# ---------------------------------------------------------------- RandAugment policy

def test_rand_augment_draws_ops_magnitudes_and_signs(monkeypatch):
    calls = []
    monkeypatch.setattr(augment, "RAND_OPS", {k: (lambda k: lambda img, m, s, fill: calls.append((k, m, s)) or img)(k)
                                              for k in augment.RAND_OPS})
    rng, N = np.random.default_rng(7), 6000
    counts = np.zeros(3)
    for _ in range(N):
        before = len(calls)
        augment.rand_augment(None, rng, FILL)
        counts[len(calls) - before] += 1
    # ops applied per image ~ Binomial(2, 0.5)
    for k, p in enumerate((0.25, 0.5, 0.25)):
        assert within(counts[k] / N, p, N), (k, counts)
    names = [c[0] for c in calls]
    for k in augment.RAND_OPS:  # uniform choice among 15, with replacement
        assert within(names.count(k) / len(calls), 1 / 15, len(calls)), k
    m = np.array([c[1] for c in calls])
    # clip(N(9, 0.5), 0, 10): P(m = 10) = P(z >= 2) = 0.02275; mean 9 - E[(X - 10)+] = 8.9958;
    # below 10 a normal cut at +2 sigma, std 0.5 sqrt(1 - 2 phi(2) / Phi(2) - (phi(2) / Phi(2))^2) = 0.4708
    assert m.min() >= 0 and m.max() <= 10
    assert within((m == 10).mean(), 0.02275, len(m))
    assert abs(m.mean() - 8.9958) <= 4 * 0.5 / math.sqrt(len(m))
    assert abs(m[m < 10].std() - 0.4708) <= 4 * 0.5 / math.sqrt(2 * len(m))
    signs = {k: [c[2] for c in calls if c[0] == k] for k in augment.RAND_OPS}
    for k, s in signs.items():
        if k in augment.SIGNED:
            assert within(s.count(-1) / len(s), 0.5, len(s)), k
        else:
            assert set(s) == {1}, k


def test_rand_augment_applies_real_ops(img):
    rng = np.random.default_rng(8)
    seen = set()
    for _ in range(200):
        out, applied = augment.rand_augment(img, rng, FILL)
        assert out.size == img.size and out.mode == "RGB"
        seen.update(applied)
        if not applied:
            assert out is img
    assert seen == set(augment.RAND_OPS)


# ---------------------------------------------------------------- random erasing

def test_random_erase_probability_box_and_fill():
    rng, N, S = np.random.default_rng(9), 2000, 224
    boxes, values = [], []
    for _ in range(N):
        x = np.full((3, S, S), 7.0, np.float32)
        box = augment.random_erase(x, rng)
        if box is None:
            assert (x == 7).all()
            continue
        top, left, h, w = box
        assert 0 <= top <= S - h and 0 <= left <= S - w and h < S and w < S
        inner = x[:, top:top + h, left:left + w].copy()
        x[:, top:top + h, left:left + w] = 7
        assert (x == 7).all()  # nothing outside the box changed
        boxes.append((h, w))
        values.append(inner.ravel()[:500])
    assert within(len(boxes) / N, 0.25, N)
    h, w = np.array(boxes, np.float64).T
    # area in [0.02, 1/3] of the image and h / w in [0.3, 1/0.3], up to the rounding of h and w
    area = h * w / S ** 2
    assert area.min() >= 0.02 * 0.93 and area.max() <= 1 / 3 * 1.07
    assert (h / w).min() >= 0.3 * 0.95 and (h / w).max() <= 1 / 0.3 * 1.05
    assert (h / w).min() < 0.4 and (h / w).max() > 2.5 and area.max() > 0.3  # the bounds are reached
    v = np.concatenate(values)  # N(0, 1) per pixel and channel
    assert abs(v.mean()) < 4 / math.sqrt(len(v)) and abs(v.std() - 1) < 4 * math.sqrt(0.5 / len(v))
