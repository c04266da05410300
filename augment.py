"""Training augmentation for paper-mode images: a random resized crop decoded at the smallest
JPEG scale that serves it, and the authors' full training transform written out op by op.

The authors build their transform with timm 0.4.12 (requirements.txt of Qinying-Liu/TagAlign):
datasets/builder.py:155-164 calls `create_transform(224, is_training=True, color_jitter=0.4,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1,
interpolation='bilinear')` (values from configs/default.yml:24-33). What timm 0.4.12 builds from
that (timm/data/transforms_factory.py:44-127), in order:

  1. RandomResizedCropAndInterpolation (transforms.py:58-145): area fraction U(0.08, 1), aspect
     log-uniform in (3/4, 4/3), 10 tries, then the centre crop; PIL bilinear.
  2. RandomHorizontalFlip, p 0.5.
  3. RandAugment (auto_augment.py:620-682): 2 ops drawn uniformly with replacement from the 15
     "increasing" ops, each applied with p 0.5 at a magnitude gauss(9, 0.5) clipped to [0, 10];
     fill (124, 116, 104) = round(255 x the normalisation mean), bilinear resampling.
     Colour jitter is NOT applied: transforms_factory.py:79 `if auto_augment:` ... :98
     `elif color_jitter is not None:` skips it whenever a policy is given.
  4. ToTensor, Normalize(mean, std).
  5. RandomErasing (random_erasing.py:25-97) on the normalised tensor: p 0.25, one box,
     filled with N(0, 1) per pixel and channel.

`Augment(kind="official")` is that pipeline; `Augment(kind="light")` is crop, flip and
normalise only. Both draw every random number from one numpy Generator that the caller owns, so
a worker's stream is reproducible and resumes exactly from `rng.bit_generator.state`. timm
draws from Python's `random`, numpy's and torch's global generators instead: the distributions
here are timm's, the individual draws are not.

Two deliberate differences from timm. The crop is resampled with PIL's `resize(box=)`, as the
stream did before this module (and a draft box is fractional): its filter may read the pixels
just outside the box where torchvision's crop-then-resize repeats the edge pixel, so only the
outermost output rows and columns differ. And with decode="draft" a JPEG is decoded at 1/2, 1/4
or 1/8 scale when the crop still spans the output size at that scale (`crop_resize`), for speed.
"""
import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

BILINEAR = Image.Resampling.BILINEAR


# ---------------------------------------------------------------- the crop and the decode

def random_resized_crop(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(x, y, w, h) of torchvision's RandomResizedCrop: up to 10 tries at an area fraction in
    `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop clamped to `ratio`.
    The same draws in the same order as data.py's stream made before this module (timm draws
    y before x)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def draft_scale(w, h, size):
    """The largest JPEG reduction s in (1, 2, 4, 8) at which a w x h crop still spans at least
    `size` pixels each way: w / s >= size and h / s >= size."""
    s = 8
    while s > 1 and min(w, h) < s * size:
        s //= 2
    return s


def decode_crop(src, size, rng, scale=(0.08, 1.0), decode="draft"):
    """Encoded image bytes, a path or an opened (not yet loaded) PIL image -> (the image decoded
    as RGB, the random resized crop's box in its pixels): the decoding half of `crop_resize`.

    The box is drawn on the header's size, before any pixel is decoded. With decode="draft" a
    JPEG is then decoded at scale 1/s (libjpeg scales in the DCT domain, PIL's `draft`): pixel
    edge x of the full image is edge x / s of the reduced one, whose size is ceil(W / s), so the
    box maps to (x / s, y / s, (x + w) / s, (y + h) / s), fractional, which `resize(box=)`
    takes as it is. libjpeg's scaled IDCT is a low-pass filter of its own, so a reduced crop
    differs from the full decode's by a fraction of a level on average, more at sharp edges.
    Without a reduction (s = 1, a PNG, a small crop) the output is the full decode's, bit for bit."""
    if decode not in ("draft", "full"):
        raise ValueError(f"decode={decode!r}: expected 'draft' or 'full'")
    image = src if isinstance(src, Image.Image) else \
        Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    W, H = image.size  # the header's
    x, y, w, h = random_resized_crop(W, H, rng, scale)
    s = draft_scale(w, h, size) if decode == "draft" else 1
    if s > 1:
        # draft picks the largest reduction <= min(W // (W // s), H // (H // s)), which is s; it
        # returns (mode, (0, 0, W / s', H / s')) for the s' it set, None for a non-JPEG or a
        # loaded image (no reduction).
        got = image.draft("RGB", (W // s, H // s))
        s = round(W / got[1][2]) if got else 1
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, CMYK, palette, alpha: as data.py's stream always has
    image.load()  # the decode itself (an RGB image is not copied: convert would copy it)
    return image, (x / s, y / s, (x + w) / s, (y + h) / s)


def crop_resize(src, size, rng, scale=(0.08, 1.0), decode="draft"):
    """src (as `decode_crop` takes it) -> its random resized crop, a size x size RGB PIL image,
    resampled bilinearly from the (possibly reduced) decode."""
    image, box = decode_crop(src, size, rng, scale, decode)
    return image.resize((size, size), BILINEAR, box=box)


# ---------------------------------------------------------------- RandAugment ops
# timm's ops (auto_augment.py:58-172) with PIL, one per timm name. Geometric ops fill what enters
# from outside the image with `fill` and resample bilinearly. The enhance ops blend with a
# degenerate image: out = clip(deg + f * (img - deg)), so f = 1 is the identity.

def auto_contrast(img):
    """AutoContrast: each channel mapped linearly so its min -> 0 and its max -> 255
    (out = int((x - lo) * 255 / (hi - lo))); a flat channel is left as it is."""
    return ImageOps.autocontrast(img)


def equalize(img):
    """Equalize: each channel's histogram equalised (ImageOps.equalize)."""
    return ImageOps.equalize(img)


def invert(img):
    """Invert: out = 255 - x."""
    return ImageOps.invert(img)


def rotate(img, degrees, fill):
    """Rotate: by `degrees` counter-clockwise about the centre, same size."""
    return img.rotate(degrees, resample=BILINEAR, fillcolor=fill)


def posterize(img, bits):
    """PosterizeIncreasing: keep the top `bits` bits, out = x & ~(2^(8 - bits) - 1).
    At bits = 0 the mask is 0: black. timm 0.4.12 called ImageOps.posterize, which in Pillow
    up to 12.x computed this same table for any bits (Pillow 9.0 ImageOps.py:547-551), so 0 bits
    gave black; Pillow 13 refuses 0 bits, hence the table here."""
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def solarize(img, threshold):
    """SolarizeIncreasing: out = x if x < threshold else 255 - x (threshold 256: identity)."""
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add, threshold=128):
    """SolarizeAdd: out = min(255, x + add) if x < threshold else x."""
    return img.point([min(255, i + add) if i < threshold else i for i in range(256)] * len(img.getbands()))


def color(img, factor):
    """ColorIncreasing: blend with the image's greyscale (L = 0.299 R + 0.587 G + 0.114 B)."""
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img, factor):
    """ContrastIncreasing: blend with a flat image at the rounded mean of the greyscale."""
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img, factor):
    """BrightnessIncreasing: blend with black, out = clip(f * x)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img, factor):
    """SharpnessIncreasing: blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13."""
    return ImageEnhance.Sharpness(img).enhance(factor)


def shear_x(img, factor, fill):
    """ShearX: out(x, y) = img(x + factor * y, y), about the top-left corner."""
    return img.transform(img.size, Image.Transform.AFFINE, (1, factor, 0, 0, 1, 0), BILINEAR, fillcolor=fill)


def shear_y(img, factor, fill):
    """ShearY: out(x, y) = img(x, y + factor * x)."""
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, factor, 1, 0), BILINEAR, fillcolor=fill)


def translate_x(img, frac, fill):
    """TranslateXRel: out(x, y) = img(x + frac * width, y): content moves left for frac > 0."""
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, frac * img.width, 0, 1, 0), BILINEAR,
                         fillcolor=fill)


def translate_y(img, frac, fill):
    """TranslateYRel: out(x, y) = img(x, y + frac * height)."""
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, frac * img.height), BILINEAR,
                         fillcolor=fill)


# ---------------------------------------------------------------- RandAugment policy
# 'rand-m9-mstd0.5-inc1': _RAND_INCREASING_TRANSFORMS (auto_augment.py:562-579) with their
# LEVEL_TO_ARG (:180-257). Each entry applies its op at magnitude m in [0, 10] with sign s = +-1;
# at m = 9: rotate 27 deg, enhance 1 +- 0.81, shear 0.27, translate 0.405 of the side, posterize
# to 1 bit, solarize above 26, solarize-add 99.
RAND_OPS = {
    "AutoContrast": lambda img, m, s, fill: auto_contrast(img),
    "Equalize": lambda img, m, s, fill: equalize(img),
    "Invert": lambda img, m, s, fill: invert(img),
    "Rotate": lambda img, m, s, fill: rotate(img, s * m / 10 * 30, fill),
    "PosterizeIncreasing": lambda img, m, s, fill: posterize(img, 4 - int(m / 10 * 4)),
    "SolarizeIncreasing": lambda img, m, s, fill: solarize(img, 256 - int(m / 10 * 256)),
    "SolarizeAdd": lambda img, m, s, fill: solarize_add(img, int(m / 10 * 110)),
    "ColorIncreasing": lambda img, m, s, fill: color(img, 1 + s * m / 10 * 0.9),
    "ContrastIncreasing": lambda img, m, s, fill: contrast(img, 1 + s * m / 10 * 0.9),
    "BrightnessIncreasing": lambda img, m, s, fill: brightness(img, 1 + s * m / 10 * 0.9),
    "SharpnessIncreasing": lambda img, m, s, fill: sharpness(img, 1 + s * m / 10 * 0.9),
    "ShearX": lambda img, m, s, fill: shear_x(img, s * m / 10 * 0.3, fill),
    "ShearY": lambda img, m, s, fill: shear_y(img, s * m / 10 * 0.3, fill),
    "TranslateXRel": lambda img, m, s, fill: translate_x(img, s * m / 10 * 0.45, fill),
    "TranslateYRel": lambda img, m, s, fill: translate_y(img, s * m / 10 * 0.45, fill),
}
# The ops whose level function calls _randomly_negate; the others never draw a sign.
SIGNED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
          "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def rand_augment(img, rng, fill, n=2, m=9.0, m_std=0.5, p=0.5):
    """timm's RandAugment: n ops drawn uniformly with replacement; each, in turn, is applied with
    probability p at magnitude clip(N(m, m_std), 0, 10) and, for a SIGNED op, a fair random sign.
    Returns the image and the names of the ops applied."""
    names, applied = list(RAND_OPS), []
    for i in rng.integers(0, len(names), n):
        if rng.uniform() >= p:  # timm skips when random() > p: the same event up to a null set
            continue
        mag = min(10.0, max(0.0, rng.normal(m, m_std)))
        sign = -1 if names[i] in SIGNED and rng.uniform() < 0.5 else 1
        img = RAND_OPS[names[i]](img, mag, sign, fill)
        applied.append(names[i])
    return img, applied


# ---------------------------------------------------------------- random erasing

def random_erase(x, rng, p=0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), tries=10):
    """timm's RandomErasing(mode='pixel', max_count=1) in place on a normalised (C, H, W) float32
    array: with probability p, up to `tries` boxes of area U(area) x H x W and log-uniform aspect
    ar = h / w are drawn, h = round(sqrt(A ar)), w = round(sqrt(A / ar)); the first with h < H and
    w < W is filled with N(0, 1) per pixel and channel. Returns the box (top, left, h, w) or None."""
    if rng.uniform() >= p:
        return None
    C, H, W = x.shape
    for _ in range(tries):
        target = rng.uniform(*area) * H * W
        ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if w < W and h < H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            x[:, top:top + h, left:left + w] = rng.standard_normal((C, h, w), dtype=np.float32)
            return top, left, h, w
    return None


# ---------------------------------------------------------------- the two pipelines

class Augment:
    """aug(src, rng) -> (3, size, size) float32 tensor, one training image.

    kind "light": random resized crop, horizontal flip, normalise (the stream's transform before
    this module, bit for bit with decode="full"). kind "official": the same crop and flip, then
    RandAugment rand-m9-mstd0.5-inc1, normalise, random erasing p 0.25 (timm 0.4.12, module
    docstring). decode "draft" decodes a JPEG at the smallest scale its crop allows, "full" at
    full size. `src`: encoded bytes, a path or an opened PIL image not yet loaded. `rng`: the
    numpy Generator every draw comes from, in this order: crop, flip, ops, erasing. The
    augmentation holds no state of its own: a stream that saves `rng.bit_generator.state`
    resumes exactly. `out`: a slot to write the image into (see `pixels`); the call is
    `decode_crop` then `pixels`, which bench.py times apart.
    """

    def __init__(self, *, kind, size, crop_scale, mean, std, decode):
        if kind not in ("official", "light"):
            raise ValueError(f"--augment {kind}: expected official or light")
        if decode not in ("draft", "full"):
            raise ValueError(f"--decode {decode}: expected draft or full")
        self.kind, self.size, self.crop_scale, self.decode = kind, size, tuple(crop_scale), decode
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        # (3, 256) table of (v / 255 - mean) / std in float32: the same operations ToTensor and
        # Normalize apply to each value, so looking them up gives the same bits, faster.
        self.table = (np.arange(256, dtype=np.float32)[None, :] / 255 - mean[:, None]) / std[:, None]
        self.fill = tuple(min(255, round(255 * float(v))) for v in mean)  # timm's img_mean

    def __call__(self, src, rng, out=None):
        image, box = decode_crop(src, self.size, rng, self.crop_scale, self.decode)
        return self.pixels(image, box, rng, out)

    def pixels(self, image, box, rng, out=None):
        """The stages after the decode: a decoded RGB image and its crop box (`decode_crop`) ->
        the (3, size, size) float32 tensor, written into `out` (a contiguous float32 tensor of
        that shape, e.g. a slot of a batch) when given, so that no per-image tensor is made."""
        img = image.resize((self.size, self.size), BILINEAR, box=box)
        if rng.uniform() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.kind == "official":
            img, _ = rand_augment(img, rng, self.fill)
        a = np.asarray(img)  # (S, S, 3) uint8
        if out is None:
            out = torch.empty((3, self.size, self.size), dtype=torch.float32)
        elif out.shape != (3, self.size, self.size) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous float32 (3, {self.size}, {self.size}) tensor, "
                             f"got {out.dtype} {tuple(out.shape)}")
        x = out.numpy()  # (3, S, S), the same memory
        for c in range(3):
            np.take(self.table[c], a[..., c], out=x[c])
        if self.kind == "official":
            random_erase(x, rng)
        return out


# ---------------------------------------------------------------- CC12M-like JPEGs
# For the tests and `bench.py loader`: decode cost follows pixel count and entropy, so these match
# CC12M's typical sides (500-1024 px) and file size (~110 KB at quality 90) with smooth colour
# fields, hard-edged shapes and sensor-like noise.

def cc12m_like_jpeg(rng, sides=(500, 1024), quality=90, noise=5.0):
    """A random JPEG's bytes: sides uniform in `sides`, ~110 KB at the defaults."""
    W, H = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
    x, y = np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32)[:, None]
    a = np.empty((H, W, 3), np.float32)
    for c in range(3):  # a tilted plane plus a slow wave per channel
        fx, fy = rng.uniform(0.002, 0.03, 2)
        a[..., c] = (rng.uniform(40, 215) + rng.uniform(-0.2, 0.2) * (x - W / 2) + rng.uniform(-0.2, 0.2) * (y - H / 2)
                     + 30 * np.sin(fx * x + rng.uniform(0, 6)) * np.cos(fy * y))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(20, 250)
        box = (cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r)
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=tuple(rng.integers(0, 256, 3).tolist()))
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    a += noise * rng.standard_normal(a.shape, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
