"""The synthetic world: procedural scenes of coloured shapes on textured ground with captions
and exact segmentation maps, deterministic from (seed, index); its webdataset shards, its pixel
statistics, and the three world benchmarks (world-object, world-stuff, world-attr). Its training
batches are tagalign.world_batch.
"""
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from data import write_atomic, write_tar

# ---------------------------------------------------------------- the synthetic world
# A procedural world of coloured shapes on textured ground. Every sample is a
# pure function of (seed, split, index): nothing is stored, and the validation images are the
# same for every training seed. Ground truth is exact, so segmentation can be scored.
#
# The world is built to give shape, the hard part, its best chance on a CPU budget without
# changing the model (RESULTS.md has the measurements behind each choice): TagAlign's image
# embedding is the MEAN of the patch embeddings, which dilutes the few patches an object covers,
# so the shapes are few, big and distinct (a ring is hollow, a cross has arms, a triangle has
# points), each with its own surface marking; colours are well apart from each other and from
# the grounds; "binding" scenes give objects a shared colour or shape, so that colour alone
# cannot place "red circle"; and the training split comes in contrast pairs (World.sample).

SHAPES = ("circle", "triangle", "cross", "ring")  # the default world's; _shape_mask also draws square, star
COLOURS = {  # name -> RGB
    "red": (215, 35, 35), "green": (40, 190, 70), "blue": (35, 75, 225),
    "yellow": (245, 215, 30), "purple": (150, 55, 195), "black": (20, 20, 20),
    "orange": (245, 135, 20), "white": (245, 245, 245),  # not in the default world
}
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "black")  # the default world's
STUFF = ("grass", "sand", "water", "snow", "sky", "road")
SIZES = {"small": (0.12, 0.15), "big": (0.19, 0.24)}  # object radius as a fraction of the side


@dataclass
class WorldConfig:
    """The world's settings, each settable from the command line (`--set world.pairs=false`)."""
    shapes: tuple = SHAPES          # object shapes, any of circle, square, triangle, star, cross, ring
    colours: tuple = COLOUR_NAMES   # object colours, names from COLOURS
    patterns: bool = True           # shapes carry a surface marking as well as a silhouette (_pattern)
    objects: tuple = (0.3, 0.4, 0.3)  # probability of 1, 2, 3, ... objects in a scene
    rotation: float = 0.3           # objects turn by up to this many radians either way
    binding: float = 0.3            # probability of a binding scene (shared colour or shape)
    pairs: bool = True              # the training split comes in contrast pairs (World.sample)
    drop_object: float = 0.1        # probability that a caption leaves one object out
    name_ground: float = 0.7        # probability that a caption names the ground
    name_colour: float = 0.9        # probability that a caption names an object's colour
    synonyms: bool = True           # captions also say disk, donut, lawn, beach, sea, street ...

    def check(self):
        """Raise ValueError with one line naming the setting when the world cannot be made."""
        for k, names, known in (("shapes", self.shapes, tuple(_SHAPE_WORDS)),
                                ("colours", self.colours, tuple(COLOURS))):
            bad = [n for n in names if n not in known]
            if bad or not names or len(set(names)) != len(names):
                raise ValueError(f"world.{k}={','.join(names)}: expected distinct names from {','.join(known)}")
        if self.pairs and len(self.shapes) < 2:
            raise ValueError("world.pairs: contrast pairs need at least two shapes")
        if not self.objects or min(self.objects) < 0 or abs(sum(self.objects) - 1) > 1e-6:
            raise ValueError(f"world.objects={self.objects}: probabilities of 1, 2, ... objects, summing to 1")
        for k in ("binding", "drop_object", "name_ground", "name_colour"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"world.{k}={getattr(self, k)}: a probability in [0, 1]")
        return self


# Caption words. Synonyms make the tag vocabulary realistic: "disk" and "circle" become two tags
# that name the same thing, as web captions do.
_SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("circle", "circles"), ("disk", "disks")),
    "square": (("square", "squares"), ("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"),),
    "ring": (("ring", "rings"), ("ring", "rings"), ("donut", "donuts")),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}
_STUFF_PHRASES = {
    "grass": ("on grass", "on the grass", "on a lawn", "in a field"),
    "sand": ("on sand", "on the sand", "on the beach", "in the desert"),
    "water": ("on water", "in the water", "floating on the sea", "on a lake"),
    "snow": ("in the snow", "on snow", "lying in the snow"),
    "sky": ("in the sky", "against the sky", "up in the sky"),
    "road": ("on a road", "on the road", "on the street", "on asphalt"),
}
# Without synonyms (WorldConfig.synonyms false) a stuff is named by the phrases that say its name.
_PLAIN_STUFF_PHRASES = {k: tuple(p for p in v if k in p.split()) for k, v in _STUFF_PHRASES.items()}
_PREFIXES = ("", "", "", "", "a picture of ", "an image showing ", "we can see ",
             "in this scene, ", "a photo of ", "there is ")
_LINKS = (" and ", " and ", ", ", " next to ", " beside ", " near ", " together with ")
_COUNTS = ("a", "two", "three", "four", "five", "six")


@dataclass
class Scene:
    image: np.ndarray    # (H, W, 3) uint8
    caption: str
    objects: np.ndarray  # (H, W) uint8: 0 background, 1 + shape index
    stuff: np.ndarray    # (H, W) uint8: stuff index on the ground, len(STUFF) + shape on objects
    attr: np.ndarray     # (H, W) uint8: 0 background, 1 + colour * len(shapes) + shape


def _smooth(x, passes):
    """Cheap separable box blur with wrap-around, so texture tiles tile seamlessly."""
    for _ in range(passes):
        x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0)) / 3
        x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 3
    return x


def _texture(kind, S, rng):
    """One (S, S, 3) float texture tile of a stuff class."""
    y, x = np.mgrid[0:S, 0:S] / S
    n = lambda sigma, passes=0: _smooth(rng.normal(0, sigma, (S, S)), passes)  # noqa: E731
    if kind == "grass":  # green with vertical blades: noise smeared along y
        g = n(1.0)
        for _ in range(3):
            g = (g + np.roll(g, 1, 0) + np.roll(g, 2, 0)) / 3
        base, var = np.array([70, 135, 45]), g[..., None] * np.array([18, 40, 12])
    elif kind == "sand":  # beige, fine grain and slow ripples
        r = np.sin(2 * np.pi * (3 * x + 2 * y + rng.uniform())) * 8
        base, var = np.array([205, 180, 130]), (n(10) + r)[..., None]
    elif kind == "water":  # blue with horizontal wave bands
        w = np.sin(2 * np.pi * (5 * y + 0.6 * np.sin(2 * np.pi * (2 * x + rng.uniform()))))
        base, var = np.array([45, 110, 165]), (w * 22 + n(6))[..., None] * np.array([0.5, 0.8, 1])
    elif kind == "snow":  # near white, soft blue-grey shading and speckles
        s = n(14, 3) + (rng.uniform(size=(S, S)) < 0.02) * -40
        base, var = np.array([222, 228, 238]), s[..., None]
    elif kind == "sky":  # vertical gradient with soft white clouds
        c = np.clip(n(1.0, 6) * 6, 0, None)
        base = np.array([120, 175, 235])
        var = y[..., None] * np.array([-40, -30, -15]) + c[..., None] * np.array([60, 45, 15])
    elif kind == "road":  # dark grey asphalt with gravel speckles
        base, var = np.array([88, 88, 92]), (n(12) + n(8, 1))[..., None]
    else:
        raise ValueError(f"unknown stuff kind {kind!r}")
    return np.clip(base + var, 0, 255).astype(np.float32)


def _pick(rng, seq):
    """rng.choice without its conversion to an array (slow on a short tuple)."""
    return seq[int(rng.integers(len(seq)))]


def _pattern(shape, x, y):
    """Where a shape's surface marking is, at (x, y) pixels from its centre in its own frame."""
    if shape == "triangle":  # horizontal stripes, 3 px dark in every 6
        return (y % 6) < 3
    if shape == "cross":  # a checkerboard of 4 px cells
        return ((x // 4) + (y // 4)) % 2 == 0
    return np.zeros(np.shape(x), bool)  # circle and ring: plain


def _shape_mask(shape, u, v):
    """Inside test in the object's own frame: u right, v up, radius 1."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # equilateral, apex up
        return (v >= -0.55) & (v <= 1.0 - math.sqrt(3) * np.abs(u))
    if shape == "star":  # five points: the radius swings between 0.42 and 1 with the angle
        rho, phi = np.sqrt(u * u + v * v), np.arctan2(u, v)
        return rho <= 0.42 + 0.58 * np.abs(np.cos(2.5 * phi)) ** 3
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    raise ValueError(f"unknown shape {shape!r}")


class World:
    """Coloured shapes on textured ground, with captions and exact segmentation maps.

    >>> w = World(seed=0)
    >>> s = w.sample(3)           # deterministic: the same scene every time
    >>> s.image.shape, s.caption  # doctest: +SKIP
    ((64, 64, 3), 'a big red circle and a blue star on the beach')
    """

    def __init__(self, seed=0, image_size=64, split="train", cfg=None):
        self.seed, self.S, self.split = seed, image_size, split
        self.cfg = c = (cfg or WorldConfig()).check()
        self.shapes, self.colours = tuple(c.shapes), tuple(c.colours)
        # Contrast pairs (the training split only): indices 2k and 2k + 1 show the same scene,
        # the odd one with every object's shape swapped for another (see sample).
        self.pairs = c.pairs and split == "train"
        self.object_cdf = np.cumsum(c.objects)[:-1]
        # Textures are the world's physics: fixed, whatever the training seed.
        trng = np.random.default_rng(1234)
        self.textures = [np.stack([_texture(k, image_size, trng) for _ in range(8)]) for k in STUFF]
        # Sensor noise is cropped from a fixed bank: drawing 3 S^2 normals per image is slow.
        self.noise = trng.normal(0, 4, (2 * image_size, 2 * image_size, 3)).astype(np.float32)
        self.yy, self.xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
        self._split_id = {"train": 0, "val": 1}[split]

    def caption(self, index):
        """The caption of sample `index` alone, without rendering (for building vocabularies)."""
        return self.sample(index, caption_only=True)

    def sample(self, index, caption_only=False):
        """Scene `index`. Layout, caption and pixels draw from three streams of one seed, so
        that a contrast pair's two scenes differ in their shapes alone: the same ground,
        colours, sizes, places and turns, the same caption but for the shape words, the same
        noise. A batch that holds both (the training batches do: they are even-sized runs of
        consecutive indices) cannot be matched to its captions without telling shapes apart;
        without pairs, colour, ground and count already identify a caption in a batch of 64,
        and neither loss needs shape (README, results)."""
        S = self.S
        key = index // 2 if self.pairs else index
        layout, words, rng = (np.random.default_rng(s) for s in
                                 np.random.SeedSequence([self.seed, self._split_id, key]).spawn(3))
        # Layout first, then the caption, then the pixels: a caption costs no rendering.
        stuff = int(layout.integers(len(STUFF)))
        placed = self._place(layout)
        if self.pairs:
            swap = layout.permutation(len(self.shapes))  # drawn by both scenes of a pair, used by the odd
            while np.any(swap == np.arange(len(self.shapes))):  # a derangement: every shape changes
                swap = layout.permutation(len(self.shapes))
            if index % 2:
                placed = [(int(swap[o[0]]), *o[1:]) for o in placed]
        caption = self._caption(words, placed, stuff)
        if caption_only:
            return caption
        # Ground: a random tile of the stuff's texture, shifted and flipped, brightness jittered.
        tile = self.textures[stuff][rng.integers(8)]
        oy, ox = rng.integers(S, size=2)
        if STUFF[stuff] == "sky":
            oy = 0  # the sky's gradient is not periodic in y
        tile = np.roll(tile, (int(oy), int(ox)), (0, 1))
        img = tile[:, ::-1] if rng.uniform() < 0.5 else tile
        img = img * np.float32(rng.uniform(0.9, 1.1))
        objects = np.zeros((S, S), np.uint8)
        attr = np.zeros((S, S), np.uint8)
        yy, xx = self.yy, self.xx
        for shape, colour, size, cy, cx, r in placed:
            # Only the bounding box is evaluated; the object frame is rotated a little.
            y0, y1, x0, x1 = (max(int(cy - r) - 1, 0), min(int(cy + r) + 2, S),
                              max(int(cx - r) - 1, 0), min(int(cx + r) + 2, S))
            th = rng.uniform(-self.cfg.rotation, self.cfg.rotation)
            dy, dx = (cy - yy[y0:y1, x0:x1]) / r, (xx[y0:y1, x0:x1] - cx) / r
            u, v = dx * math.cos(th) - dy * math.sin(th), dx * math.sin(th) + dy * math.cos(th)
            m = _shape_mask(self.shapes[shape], u, v)
            rgb = np.array(COLOURS[self.colours[colour]], np.float32) + rng.normal(0, 10, 3)
            shade = 1 + 0.08 * v[..., None]  # light from above: a hint of 3-D
            face = rgb * shade
            if self.cfg.patterns:  # each shape's surface marking, in the object's frame (turns with it)
                mark = _pattern(self.shapes[shape], u * r, v * r)[..., None]
                dark = rgb.mean() < 80  # a black object is marked lighter, the others darker
                face = np.where(mark, face + 90 if dark else face * 0.55, face)
            patch = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = np.where(m[..., None], face, patch)
            objects[y0:y1, x0:x1][m] = 1 + shape
            attr[y0:y1, x0:x1][m] = 1 + colour * len(self.shapes) + shape
        ny, nx = rng.integers(S, size=2)
        img = img + self.noise[ny:ny + S, nx:nx + S]  # sensor noise
        image = np.clip(img, 0, 255).astype(np.uint8)
        stuff_map = np.where(objects > 0, len(STUFF) - 1 + objects, stuff).astype(np.uint8)
        return Scene(image, caption, objects, stuff_map, attr)

    def _place(self, rng):
        """1-3 non-overlapping objects: (shape, colour, size, cy, cx, radius in px)."""
        S, n = self.S, 1 + int(np.searchsorted(self.object_cdf, rng.uniform()))
        shapes = rng.integers(len(self.shapes), size=n)
        colours = rng.integers(len(self.colours), size=n)
        if n >= 2 and rng.uniform() < self.cfg.binding:
            # Binding scene: the second object shares the first one's colour with another shape,
            # the third (if any) its shape with another colour.
            shapes[1] = (shapes[0] + rng.integers(1, len(self.shapes))) % len(self.shapes)
            colours[1] = colours[0]
            if n == 3:
                shapes[2] = shapes[0]
                colours[2] = (colours[0] + rng.integers(1, len(self.colours))) % len(self.colours)
        placed = []
        for shape, colour in zip(shapes, colours):
            size = int(rng.integers(2))
            r = rng.uniform(*SIZES[("small", "big")[size]]) * S
            for _ in range(20):  # rejection sampling; an object that does not fit is left out
                cy, cx = rng.uniform(r, S - r, 2)
                if all((cy - p[3]) ** 2 + (cx - p[4]) ** 2 > (r + p[5] + 2) ** 2 for p in placed):
                    placed.append((int(shape), int(colour), size, cy, cx, r))
                    break
        return placed

    def _caption(self, rng, placed, stuff):
        """A caption from a varied grammar; the only supervision the model gets."""
        objs = list(placed)
        if len(objs) >= 2 and rng.uniform() < self.cfg.drop_object:  # sometimes an object goes unmentioned
            objs.pop(int(rng.integers(len(objs))))
        rng.shuffle(objs)
        # Identical shape and colour are counted ("two red circles").
        groups = {}
        for o in objs:
            groups.setdefault((o[0], o[1]), []).append(o)
        phrases = []
        for (shape, colour), members in groups.items():
            words = [_COUNTS[len(members) - 1]]
            sizes = {m[2] for m in members}
            if len(sizes) == 1 and rng.uniform() < 0.5:
                words.append(_pick(rng, _SIZE_WORDS[("small", "big")[sizes.pop()]]))
            if rng.uniform() < self.cfg.name_colour:
                words.append(self.colours[colour])
            forms = _SHAPE_WORDS[self.shapes[shape]]  # one draw whatever the shape: pairs stay in step
            form = forms[int(rng.uniform() * len(forms))] if self.cfg.synonyms else forms[0]
            words.append(form[len(members) > 1])
            phrases.append((" ".join(words), members))
        text = phrases[0][0]
        for i, (phrase, members) in enumerate(phrases[1:]):
            if i == 0 and len(members) == len(phrases[0][1]) == 1 and rng.uniform() < 0.3:
                # a true spatial relation between two single objects
                (o,), (first,) = members, phrases[0][1]
                dy, dx = o[3] - first[3], o[4] - first[4]  # image y grows downwards
                link = ((" above ", " below ")[int(dy > 0)] if abs(dy) > abs(dx)
                        else (" to the left of ", " to the right of ")[int(dx > 0)])
                text = phrase + link + text
            else:
                text = text + _pick(rng, _LINKS) + phrase
        if rng.uniform() < self.cfg.name_ground:
            phrases = _STUFF_PHRASES if self.cfg.synonyms else _PLAIN_STUFF_PHRASES
            text += " " + _pick(rng, phrases[STUFF[stuff]])
        prefix = _pick(rng, _PREFIXES)
        if prefix == "there is " and not text.startswith("a "):
            prefix = "there are "
        return prefix + text


def _scene_members(world, indices):
    """(KEY.png, KEY.txt) tar members of each scene, KEY its index, zero-padded."""
    from PIL import Image
    for i in indices:
        s, buf = world.sample(i), io.BytesIO()
        Image.fromarray(s.image).save(buf, format="PNG")
        yield f"{i:09d}.png", buf.getvalue()
        yield f"{i:09d}.txt", s.caption.encode()


def write_world_shards(out_dir, scenes, per_shard=1000, seed=0, image_size=64, cfg=None, start=0):
    """The world's training split as webdataset shards, as CC12M is distributed: out_dir/
    world-00000.tar ..., scene i as KEY.png (lossless) and KEY.txt, KEY = its index, zero-padded.
    Scenes start .. start + scenes - 1; contrast pairs stay together in a shard when per_shard
    is even. Returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    world, paths = World(seed, image_size, "train", cfg), []
    for first in range(start, start + scenes, per_shard):
        path = os.path.join(out_dir, f"world-{len(paths):05d}.tar")
        with write_atomic(path) as tmp:
            write_tar(tmp, _scene_members(world, range(first, min(first + per_shard, start + scenes))))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- pixel statistics and benchmarks
WORLD_MEAN = (0.48, 0.57, 0.57)  # per-channel pixel statistics of the world, measured on 10k images
WORLD_STD = (0.28, 0.22, 0.29)
WORLD_TEMPLATES = ("a {}.",)  # zero-shot prompt; world captions read "a big red circle on grass"
WORLD_BENCHMARKS = ("world-object", "world-stuff", "world-attr")  # see WorldBenchmark


def to_tensor(images, mean, std):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised with per-channel mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


class WorldBenchmark:
    """A zero-shot segmentation benchmark on the world's validation split, in the form that
    eval_seg.py reads: classes, background flag, mean/std, templates, (image, label, id) items.

    world-object: background (by score threshold) + the shapes, like VOC.
    world-stuff:  the ground textures + the shapes, every pixel labelled, like COCO-Stuff.
    world-attr:   "red circle", "blue circle", ...: every colour x shape. Only object pixels are
                  scored (the ground is 255, ignored), so it measures binding alone: a model that
                  finds the circle but calls it blue, or finds red but calls it a star, scores 0.
    """

    def __init__(self, name, n_images=500, seed=0, image_size=64, cfg=None):
        self.world = World(seed, image_size, split="val", cfg=cfg)
        shapes, colours = self.world.shapes, self.world.colours
        if name == "world-object":
            self.classes, self.background = ["background", *shapes], True
        elif name == "world-stuff":
            self.classes, self.background = [*STUFF, *shapes], False
        elif name == "world-attr":
            self.classes, self.background = [f"{c} {s}" for c in colours for s in shapes], False
        else:
            raise ValueError(f"unknown world benchmark {name!r} ({', '.join(WORLD_BENCHMARKS)})")
        self.name, self.n = name, n_images
        self.mean, self.std, self.templates = WORLD_MEAN, WORLD_STD, list(WORLD_TEMPLATES)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.world.sample(i)
        if self.name == "world-object":
            label = s.objects
        elif self.name == "world-stuff":
            label = s.stuff
        else:  # attr map 1 + colour * shapes + shape -> 0-based, the ground ignored
            label = np.where(s.attr > 0, s.attr.astype(np.int16) - 1, 255).astype(np.uint8)
        return s.image, label, f"{self.name}-{i:05d}"
