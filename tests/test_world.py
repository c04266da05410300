"""The synthetic world: determinism, consistent ground truth, truthful captions, benchmarks."""
import re

import numpy as np
import pytest

from tags import parse_caption
from world import _pattern, _SHAPE_WORDS, COLOUR_NAMES, COLOURS, SHAPES, STUFF, World, WorldBenchmark, WorldConfig


N = 150  # scenes checked per property: a few hundred milliseconds


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def scenes(world):
    return [world.sample(i) for i in range(N)]


def same_scene(a, b):
    return (a.caption == b.caption and np.array_equal(a.image, b.image)
            and np.array_equal(a.objects, b.objects) and np.array_equal(a.stuff, b.stuff)
            and np.array_equal(a.attr, b.attr))


def test_deterministic_from_seed_split_and_index(world):
    fresh = World(seed=0)
    for i in (0, 7, 123456):
        assert same_scene(world.sample(i), fresh.sample(i))
        assert world.caption(i) == world.sample(i).caption  # the caption-only path agrees
    assert not same_scene(world.sample(1), world.sample(2))
    assert not same_scene(world.sample(1), World(seed=1).sample(1))
    assert not same_scene(world.sample(1), World(seed=0, split="val").sample(1))


_SHAPE_FORMS = re.compile(r"\b(" + "|".join(w for forms in _SHAPE_WORDS.values() for f in forms for w in f) + r")\b")


def _shapes_blanked(caption):
    return _SHAPE_FORMS.sub("SHAPE", caption)


def _objects_by_colour(s):
    """colour index -> sorted shape indices of that colour's objects in scene s."""
    fg = s.attr > 0
    colour, shape = (s.attr[fg] - 1) // len(SHAPES), s.objects[fg] - 1
    return {int(c): sorted(set(shape[colour == c].tolist())) for c in np.unique(colour)}


def test_contrast_pairs_differ_in_shape_alone(world):
    """Training scenes 2k and 2k + 1: the same ground, colours, places and caption but for the
    shape words, and the shapes changed. Validation scenes are not paired."""
    for k in range(40):
        a, b = world.sample(2 * k), world.sample(2 * k + 1)
        assert _shapes_blanked(a.caption) == _shapes_blanked(b.caption) and a.caption != b.caption
        off = (a.objects == 0) & (b.objects == 0)
        assert np.array_equal(a.image[off], b.image[off]) and np.array_equal(a.stuff[off], b.stuff[off])
        sa, sb = _objects_by_colour(a), _objects_by_colour(b)
        assert sa.keys() == sb.keys()
        for c in sa:  # a colour on one shape has another shape in the twin (a derangement)
            assert len(sa[c]) == len(sb[c]) and (len(sa[c]) > 1 or sa[c] != sb[c]), (a.caption, b.caption)
    val = World(seed=0, split="val")
    assert not val.pairs and _shapes_blanked(val.caption(0)) != _shapes_blanked(val.caption(1))
    assert World(seed=0, cfg=WorldConfig(pairs=False)).caption(1) != world.caption(1)


def test_images_and_maps_have_the_documented_form(scenes):
    for s in scenes:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        for m in (s.objects, s.stuff, s.attr):
            assert m.shape == (64, 64) and m.dtype == np.uint8


def test_maps_agree_with_each_other(scenes):
    for s in scenes:
        fg = s.objects > 0
        assert fg.any()  # every scene has at least one object
        assert np.array_equal(fg, s.attr > 0)
        # attr = 1 + colour * shapes + shape and objects = 1 + shape: the same shape
        assert np.array_equal((s.attr[fg] - 1) % len(SHAPES), s.objects[fg] - 1)
        # stuff: one ground class off the objects, len(STUFF) + shape on them
        ground = np.unique(s.stuff[~fg])
        assert len(ground) == 1 and ground[0] < len(STUFF)
        assert np.array_equal(s.stuff[fg], len(STUFF) - 1 + s.objects[fg])


def test_objects_have_their_colour(scenes):
    """An attr-map region shows the named colour: plain shapes (circle, ring) on average; marked
    shapes (stripes, checkerboard) in their unmarked half, which is the brighter half for every
    colour but black (black is marked lighter, so its unmarked half is the darker one)."""
    checked = 0
    for s in scenes[:40]:
        for a in np.unique(s.attr[s.attr > 0]):
            colour = COLOUR_NAMES[(a - 1) // len(SHAPES)]
            pixels = s.image[s.attr == a].reshape(-1, 3).astype(float)
            if _pattern(SHAPES[(a - 1) % len(SHAPES)], np.arange(12), np.arange(12)).any():
                luma = pixels.mean(1)
                half = luma <= np.median(luma) if colour == "black" else luma >= np.median(luma)
                pixels = pixels[half]
            assert np.abs(pixels.mean(0) - np.array(COLOURS[colour])).max() < 45, (colour, pixels.mean(0))
            checked += 1
    assert checked >= 40


SHAPE_WORDS = {"circle": "circle", "disk": "circle", "square": "square", "box": "square",
               "triangle": "triangle", "star": "star", "cross": "cross", "ring": "ring", "donut": "ring"}
STUFF_WORDS = {"grass": "grass", "lawn": "grass", "field": "grass", "sand": "sand", "beach": "sand",
               "desert": "sand", "water": "water", "sea": "water", "lake": "water", "snow": "snow",
               "sky": "sky", "road": "road", "street": "road", "asphalt": "road"}


def test_captions_never_mention_what_is_not_there(scenes):
    """Parsed with the tag parser, every object tag is a shape or ground that the image shows,
    and every colour tag is the colour of an object in it. (Captions may omit things.)"""
    mentioned_ground = 0
    for s in scenes:
        objects, attributes = parse_caption(s.caption)
        shapes = {SHAPES[k - 1] for k in np.unique(s.objects[s.objects > 0])}
        colours = {COLOUR_NAMES[(a - 1) // len(SHAPES)] for a in np.unique(s.attr[s.attr > 0])}
        ground = STUFF[int(s.stuff[s.objects == 0][0])] if (s.objects == 0).any() else None
        for o in objects:
            if o in SHAPE_WORDS:
                assert SHAPE_WORDS[o] in shapes, (s.caption, o, shapes)
            else:
                assert STUFF_WORDS.get(o) == ground, (s.caption, o, ground)
                mentioned_ground += 1
        for a in attributes:
            if a in COLOURS:
                assert a in colours, (s.caption, a, colours)
            else:
                assert a in ("small", "little", "tiny", "big", "large", "huge"), (s.caption, a)
    assert 0.5 * N < mentioned_ground < 0.9 * N  # the ground is named about 70% of the time


def test_spatial_relations_are_true(world):
    """'A above B' / 'A to the left of B': checked on the pixel centroids of the two objects."""
    checked = 0
    for i in range(2000):
        cap = world.caption(i)
        rel = next((r for r in (" above ", " below ", " to the left of ", " to the right of ") if r in cap), None)
        if rel is None:
            continue
        s = world.sample(i)
        first, second = cap.split(rel)
        c1 = [c for c in COLOUR_NAMES if f" {c} " in f" {first} "]
        c2 = [c for c in COLOUR_NAMES if f" {c} " in f" {second} "]
        regions = {c: s.attr[((s.attr - 1) // len(SHAPES) == COLOUR_NAMES.index(c)) & (s.attr > 0)] for c in COLOUR_NAMES}
        present = [c for c in COLOUR_NAMES if regions[c].size]
        # Only unambiguous cases: two objects, different colours, both named once.
        if len(c1) != 1 or len(c2) != 1 or c1 == c2 or len(np.unique(s.attr[s.attr > 0])) != 2 or len(present) != 2:
            continue
        ys, xs = [], []
        for c in (c1[0], c2[0]):
            yy, xx = np.nonzero(((s.attr - 1) // len(SHAPES) == COLOUR_NAMES.index(c)) & (s.attr > 0))
            ys.append(yy.mean())
            xs.append(xx.mean())
        if rel == " above ":
            assert ys[0] < ys[1], cap
        elif rel == " below ":
            assert ys[0] > ys[1], cap
        elif rel == " to the left of ":
            assert xs[0] < xs[1], cap
        else:
            assert xs[0] > xs[1], cap
        checked += 1
    assert checked >= 20


def test_binding_scenes_occur(scenes):
    """Scenes where colour alone cannot name an object: one colour on two different shapes."""
    binding = 0
    for s in scenes:
        pairs = {(int(a - 1) // len(SHAPES), int(a - 1) % len(SHAPES)) for a in np.unique(s.attr[s.attr > 0])}
        colours = [c for c, _ in pairs]
        binding += len(colours) != len(set(colours))
    assert binding >= 0.08 * N


@pytest.mark.parametrize("name,n_classes,background", [
    ("world-object", 1 + len(SHAPES), True), ("world-stuff", len(STUFF) + len(SHAPES), False),
    ("world-attr", len(COLOUR_NAMES) * len(SHAPES), False)])
def test_benchmarks(name, n_classes, background):
    bench = WorldBenchmark(name, n_images=20)
    assert len(bench) == 20 and len(bench.classes) == n_classes and bench.background == background
    assert (bench.classes[0] == "background") == background
    image, label, image_id = bench[3]
    assert image.shape == (64, 64, 3) and label.shape == (64, 64) and image_id.endswith("00003")
    valid = label[label != 255]
    assert valid.max() < n_classes
    if name == "world-attr":  # only object pixels are scored
        scene = World(seed=0, split="val").sample(3)
        assert np.array_equal(label != 255, scene.objects > 0)
        assert bench.classes[label[scene.objects > 0][0]].split()[1] == SHAPES[scene.objects[scene.objects > 0][0] - 1]
    else:
        assert (label != 255).all()
    with pytest.raises(ValueError, match="unknown world benchmark"):
        WorldBenchmark("world-nope")
