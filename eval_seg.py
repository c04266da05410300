"""Zero-shot semantic segmentation evaluation, self-contained (no mmsegmentation).

    python eval_seg.py --ckpt out/ckpt.pt                      # the three world benchmarks
    python eval_seg.py --ckpt PATH --benchmarks all --data-root DIR
    python eval_seg.py --clip ViT-B-16.pt --dense maskclip --benchmarks voc --data-root DIR  # raw CLIP
    python eval_seg.py --preds DIR --benchmarks voc --data-root DIR   # score saved label PNGs

Writes metrics.json (per-class IoU, NaN as null) and vis/*.png pictures (input | ground truth |
prediction, each panel >= 256 px on its short side, with a title and a colour legend) into --out
(default: the checkpoint's folder), and prints one table per benchmark and the mean over
benchmarks in the paper's column order. save_curves draws a training log.jsonl as a PNG.

Model interface (duck-typed; SegmentationModel below provides it):
    model.encode_dense(images) -> (B, E, h, w)   images: float (B, 3, H, W), already normalised
                                                  with the protocol's mean/std; any h, w
    model.encode_text(texts: list[str]) -> (T, E) un-normalised text embeddings
    model.device (optional, else CPU)
    model.clip_blend (optional): True when encode_dense(images, with_clip=True) also gives raw
        CLIP's embeddings of the same tokens, blended in with weight clip_w (TagAlign's eval)
The evaluator fills the templates, averages the un-normalised text embeddings per class and
L2-normalises them; it L2-normalises the dense embeddings over E, takes the cosine to every
class, maps it to a score sigmoid(10 * cos - 2.5), upsamples the (B, C, h, w) scores bilinearly
to the crop and, for benchmarks with a background class, prepends a constant background score
(0.4): background wins where every class scores below it. The world preset scores relatively
instead: softmax over the classes at the model's learned temperature, background at 0.5 (see
PRESETS).

Protocol (TCL's, which TagAlign uses; read from the authors' configs): resize so the short side
is 448 with the long side capped at 2048 (mmcv.imrescale: s = min(2048/long, 448/short),
size int(x*s+0.5), cv2.INTER_LINEAR on the uint8 image: OpenCV's fixed-point 8-bit path,
reproduced bit for bit by resize_uint8_linear), ImageNet mean/std, sliding window 448 with
stride 224 on mmseg's grid (last window snapped to the border), per-crop scores averaged where
windows overlap, bilinear resize back to the original size, argmax. The scoring is TagAlign's
(github.com/Qinying-Liu/TagAlign, configs/eval.yml: bg_thresh 0.4, clip_w 0.3, scale 10,
bias -2.5; models/tagalign/tagalign.py generate_masks): per class sigmoid(10 cos - 2.5) of the
decoder's patch embeddings, blended 0.7 / 0.3 with the same score of the raw surgery tokens
through CLIP's frozen ln_post + proj, on the patch grid, then upsampled to the crop. (TCL's
Sim2Mask is sigmoid(w cos + b) with w, b learned; TagAlign freezes them at TCL's initial values.
Another commit of TagAlign's repo, 70914ae, uses softmax(30 cos) over the classes, stride 56 and
per-dataset thresholds; we follow the released configs, which match TCL's protocol.) The model
is used as given: put it in eval mode.
ImageNet-S is read as mmseg's ImageNetSDataset reads it (see ImageNetS: images over 1000 x 1000
pixels downsampled first, the argmax resized to the full-size label, nearest).
mIoU is mmseg's (see IoU below). Optional PAMR (Araslanov & Roth, CVPR 2020) as in TCL.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import IMAGENET_MEAN, IMAGENET_STD, NORMS, write_atomic
from model import autocast, load_clip, model_from_checkpoint, read_checkpoint, READINGS
from tokenizer import Tokenizer
from world import WORLD_BENCHMARKS, WorldBenchmark, WorldConfig

# ----------------------------------------------------------------------------- class names
# mmsegmentation's class lists (mmseg/datasets/{voc,pascal_context,coco_stuff,cityscapes,ade}.py,
# 1.x), COCO-Object as in TCL/GroupViT (background + the 80 things of COCO-Stuff). One string per
# benchmark, split once; the order is the label index order of the annotation PNGs.
VOC = ("background,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
       "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor").split(",")
CONTEXT = ("background,aeroplane,bag,bed,bedclothes,bench,bicycle,bird,boat,book,bottle,building,"
           "bus,cabinet,car,cat,ceiling,chair,cloth,computer,cow,cup,curtain,dog,door,fence,floor,"
           "flower,food,grass,ground,horse,keyboard,light,motorbike,mountain,mouse,person,plate,"
           "platform,pottedplant,road,rock,sheep,shelves,sidewalk,sign,sky,snow,sofa,table,track,"
           "train,tree,truck,tvmonitor,wall,water,window,wood").split(",")
COCO_STUFF = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,"
    "backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,"
    "baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,"
    "banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,"
    "potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,"
    "oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush,"
    "banner,blanket,branch,bridge,building-other,bush,cabinet,cage,cardboard,carpet,"
    "ceiling-other,ceiling-tile,cloth,clothes,clouds,counter,cupboard,curtain,desk-stuff,dirt,"
    "door-stuff,fence,floor-marble,floor-other,floor-stone,floor-tile,floor-wood,flower,fog,"
    "food-other,fruit,furniture-other,grass,gravel,ground-other,hill,house,leaves,light,mat,metal,"
    "mirror-stuff,moss,mountain,mud,napkin,net,paper,pavement,pillow,plant-other,plastic,platform,"
    "playingfield,railing,railroad,river,road,rock,roof,rug,salad,sand,sea,shelf,sky-other,"
    "skyscraper,snow,solid-other,stairs,stone,straw,structural-other,table,tent,textile-other,"
    "towel,tree,vegetable,wall-brick,wall-concrete,wall-other,wall-panel,wall-stone,wall-tile,"
    "wall-wood,water-other,waterdrops,window-blind,window-other,wood").split(",")
COCO_OBJECT = ["background"] + COCO_STUFF[:80]
CITYSCAPES = ("road,sidewalk,building,wall,fence,pole,traffic light,traffic sign,vegetation,"
              "terrain,sky,person,rider,car,truck,bus,train,motorcycle,bicycle").split(",")
ADE20K = (  # mmseg writes "bed " with a trailing space; CLIP's tokenizer makes it the same prompt
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,"
    "door,table,mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,"
    "field,armchair,seat,fence,desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,"
    "signboard,chest of drawers,counter,sand,sink,skyscraper,fireplace,refrigerator,grandstand,"
    "path,stairs,runway,case,pool table,pillow,screen door,stairway,river,bridge,bookcase,blind,"
    "coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,kitchen island,computer,"
    "swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,awning,"
    "streetlight,booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,"
    "escalator,ottoman,bottle,buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,"
    "plaything,swimming pool,stool,barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,"
    "food,step,tank,trade name,microwave,pot,animal,bicycle,lake,dishwasher,screen,blanket,"
    "sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,pier,crt screen,plate,monitor,"
    "bulletin board,shower,radiator,glass,clock,flag").split(",")
# ImageNet-S (mmseg/datasets/imagenets.py, 0.x: ImageNetSDataset.CLASSES50 / CLASSES300, in the
# order of the class ids, which sort the ImageNet wnids), class 0 named "background" instead of
# mmseg's "others", as in TagAlign's vendored copy (mmsegmentation_obsolete/mmseg/datasets/
# imagenets.py): TagAlign treats a dataset whose first class is "background" as one with the
# constant background score.
IMAGENET_S50 = (
    "background,goldfish,tiger shark,goldfinch,tree frog,kuvasz,red fox,siamese cat,"
    "american black bear,ladybug,sulphur butterfly,wood rabbit,hamster,wild boar,gibbon,"
    "african elephant,giant panda,airliner,ashcan,ballpoint,beach wagon,boathouse,bullet train,"
    "cellular telephone,chest,clog,container ship,digital watch,dining table,golf ball,"
    "grand piano,iron,lab coat,mixing bowl,motor scooter,padlock,park bench,purse,streetcar,"
    "table lamp,television,toilet seat,umbrella,vase,water bottle,water tower,yawl,street sign,"
    "lemon,carbonara,agaric").split(",")
IMAGENET_S300 = (
    "background,tench,goldfish,tiger shark,hammerhead,electric ray,ostrich,goldfinch,house finch,"
    "indigo bunting,kite,common newt,axolotl,tree frog,tailed frog,mud turtle,banded gecko,"
    "american chameleon,whiptail,african chameleon,komodo dragon,american alligator,triceratops,"
    "thunder snake,ringneck snake,king snake,rock python,horned viper,harvestman,scorpion,"
    "garden spider,tick,african grey,lorikeet,red-breasted merganser,wallaby,koala,jellyfish,"
    "sea anemone,conch,fiddler crab,american lobster,spiny lobster,isopod,bittern,crane,limpkin,"
    "bustard,albatross,toy terrier,afghan hound,bluetick,borzoi,irish wolfhound,whippet,"
    "ibizan hound,staffordshire bullterrier,border terrier,yorkshire terrier,lakeland terrier,"
    "giant schnauzer,standard schnauzer,scotch terrier,lhasa,english setter,clumber,"
    "english springer,welsh springer spaniel,kuvasz,kelpie,doberman,miniature pinscher,malamute,"
    "pug,leonberg,great pyrenees,samoyed,brabancon griffon,cardigan,coyote,red fox,kit fox,"
    "grey fox,persian cat,siamese cat,cougar,lynx,tiger,american black bear,sloth bear,ladybug,"
    "leaf beetle,weevil,bee,cicada,leafhopper,damselfly,ringlet,cabbage butterfly,"
    "sulphur butterfly,sea cucumber,wood rabbit,hare,hamster,wild boar,hippopotamus,bighorn,ibex,"
    "badger,three-toed sloth,orangutan,gibbon,colobus,spider monkey,squirrel monkey,"
    "madagascar cat,indian elephant,african elephant,giant panda,barracouta,eel,coho,"
    "academic gown,accordion,airliner,ambulance,analog clock,ashcan,backpack,balloon,ballpoint,"
    "barbell,barn,bassoon,bath towel,beach wagon,bicycle-built-for-two,binoculars,boathouse,"
    "bonnet,bookcase,bow,brass,breastplate,bullet train,cannon,can opener,carpenter's kit,"
    "cassette,cellular telephone,chain saw,chest,china cabinet,clog,combination lock,"
    "container ship,corkscrew,crate,crock pot,digital watch,dining table,dishwasher,doormat,"
    "dutch oven,electric fan,electric locomotive,envelope,file,folding chair,football helmet,"
    "freight car,french horn,fur coat,garbage truck,goblet,golf ball,grand piano,half track,"
    "hamper,hard disc,harmonica,harvester,hook,horizontal bar,horse cart,iron,jack-o'-lantern,"
    "lab coat,ladle,letter opener,liner,mailbox,megalith,military uniform,milk can,mixing bowl,"
    "monastery,mortar,mosquito net,motor scooter,mountain bike,mountain tent,mousetrap,necklace,"
    "nipple,ocarina,padlock,palace,parallel bars,park bench,pedestal,pencil sharpener,pickelhaube,"
    "pillow,planetarium,plastic bag,polaroid camera,pole,pot,purse,quilt,radiator,radio,"
    "radio telescope,rain barrel,reflex camera,refrigerator,rifle,rocking chair,rubber eraser,"
    "rule,running shoe,sewing machine,shield,shoji,ski,ski mask,slot,soap dispenser,soccer ball,"
    "sock,soup bowl,space heater,spider web,spindle,sports car,steel arch bridge,stethoscope,"
    "streetcar,submarine,swimming trunks,syringe,table lamp,tank,teddy,television,throne,"
    "tile roof,toilet seat,trench coat,trimaran,typewriter keyboard,umbrella,vase,volleyball,"
    "wardrobe,warplane,washer,water bottle,water tower,whiskey jug,wig,wine bottle,wok,wreck,yawl,"
    "yurt,street sign,traffic light,consomme,ice cream,bagel,cheeseburger,hotdog,mashed potato,"
    "spaghetti squash,bell pepper,cardoon,granny smith,strawberry,lemon,carbonara,burrito,cup,"
    "coral reef,yellow lady's slipper,buckeye,agaric,gyromitra,earthstar,bolete").split(",")

# ----------------------------------------------------------------------------- metric
def _numpy(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def reduce_zero(label):
    """mmseg's reduce_zero_label: 0 -> 255 (ignored), k -> k-1, 255 stays 255."""
    label = _numpy(label).astype(np.int64)
    return np.where((label == 0) | (label == 255), 255, label - 1)


class IoU:
    """mIoU exactly as mmseg computes it (mmseg.core.evaluation.metrics, intersect_and_union).

    Per image, over pixels whose label is not ignore_index: count the intersection, predicted
    and labelled pixels per class (values outside [0, C) fall in no bin, so an out-of-range
    prediction is a miss with no false positive); sum the counts over the dataset. IoU = inter /
    union, NaN where the union is 0 (left out of the mean); a class predicted but absent from the
    labels scores 0 and counts. Acc = inter / labelled (NaN where none). All in percent.
    """

    def __init__(self, num_classes, ignore_index=255, reduce_zero_label=False):
        self.C, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.inter, self.pred, self.label = (np.zeros(num_classes, np.int64) for _ in range(3))

    def update(self, pred, label):
        """pred, label: integer arrays or tensors of one image, same shape."""
        pred, label = _numpy(pred).astype(np.int64), _numpy(label).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"IoU.update: prediction {pred.shape} and label {label.shape} differ")
        if self.reduce_zero_label:
            label = reduce_zero(label)
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        p_in, l_in = (pred >= 0) & (pred < self.C), (label >= 0) & (label < self.C)
        hit = p_in & (pred == label)
        self.inter += np.bincount(pred[hit], minlength=self.C)
        self.pred += np.bincount(pred[p_in], minlength=self.C)
        self.label += np.bincount(label[l_in], minlength=self.C)

    def compute(self):
        inter, pred, label = self.inter.astype(float), self.pred.astype(float), self.label.astype(float)
        union = pred + label - inter
        iou = np.divide(inter, union, out=np.full(self.C, np.nan), where=union > 0) * 100
        acc = np.divide(inter, label, out=np.full(self.C, np.nan), where=label > 0) * 100

        def nanmean(v):
            return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan

        aacc = 100 * inter.sum() / label.sum() if label.sum() > 0 else math.nan
        return {"mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": float(aacc),
                "IoU": iou.tolist(), "Acc": acc.tolist()}

# ----------------------------------------------------------------------------- protocol
TEMPLATES = {
    "simple": ("a photo of a {}.",),
    # TCL's "custom" set (datasets/templates.py): 7 ImageNet templates + 2.
    "tcl": ("itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
            "a photo of many {}.", "a photo of {}s."),
}


@dataclass(frozen=True)
class Protocol:
    short_side: int | None = 448  # resize so the short side is this; None: keep the image size
    long_cap: int = 2048  # ... unless the long side would pass this (mmseg img_scale (2048, 448))
    window: int | None = 448  # sliding-window crop; None: one window = the whole image
    stride: int = 224  # window stride (mmseg slide mode)
    mean: tuple = IMAGENET_MEAN  # normalisation, in [0, 1] pixel units
    std: tuple = IMAGENET_STD
    templates: tuple = TEMPLATES["simple"]  # prompts; embeddings averaged un-normalised per class
    score: str = "sigmoid"  # "sigmoid": sigmoid(score_scale * cos + score_bias) per class (TagAlign's
    #   config); "softmax": softmax over the classes of score_scale * cos (TagAlign commit 70914ae)
    score_scale: float | None = 10.0  # None (softmax only): the model's own logit_scale, else 30
    score_bias: float = -2.5
    bg_thresh: float = 0.4  # constant background score, for benchmarks with a background class
    clip_w: float = 0.3  # TagAlign's blend: score = (1 - w) decoder's + w raw CLIP's of the same
    #   tokens (configs/eval.yml clip_w 0.3); only models with a frozen CLIP have the raw path
    pamr: bool = False  # PAMR refinement of each crop's scores (TCL's optional post-processing)
    pamr_iters: int = 10
    pamr_dilations: tuple = (1, 2, 4, 8, 12, 24)


# "world": the synthetic images are small and fixed-size; mean/std/templates come from world.py.
# A model trained from scratch has no calibrated absolute cosine: every patch shares a component
# with every prompt (softmax losses are blind to it), so on the ground all shape prompts score
# alike and high. The world therefore scores relatively: softmax over the classes at the model's
# own learned temperature, and the background wins unless one class holds the majority (0.5).
PRESETS = {"tcl": Protocol(),
           "world": Protocol(short_side=None, window=None, score="softmax", score_scale=None, bg_thresh=0.5)}
# TagAlign's scoring, for the world benchmarks too (`--scoring tagalign`): the world's geometry
# and normalisation, the published per-class score and constant background.
TAGALIGN_SCORING = {k: getattr(PRESETS["tcl"], k) for k in ("score", "score_scale", "score_bias", "bg_thresh")}

# ----------------------------------------------------------------------------- resizing
def resize_bilinear(x, size):
    """(B, C, H, W) -> (B, C, *size), float bilinear with half-pixel centres and no antialiasing:
    mmseg's resize(align_corners=False), used on score maps. (uint8 images: resize_uint8_linear.)"""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# OpenCV's INTER_LINEAR on 8-bit images (opencv/opencv modules/imgproc/src/resize.cpp:
# resize / hal::resize, HResizeLinear, VResizeLinear<uchar, int, short, ...>) is fixed point:
# 11-bit weights (INTER_RESIZE_COEF_BITS), a horizontal pass into int32, then a vertical pass that
# drops 4 bits of each row before weighting, floors each product's top 16 bits and rounds the
# sum to 8 bits: ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2. Its SIMD version
# (VResizeLinearVec_32s8u: v_shr<4>, v_mul_hi, v_rshr_pack_u<2>) and the scalar tail compute
# exactly this, with no overflow or saturation for 8-bit input. An exact 2x downscale is sent to
# INTER_AREA's fast path, whose (a + b + c + d + 2) >> 2 is what these formulas give for weights
# 1024 / 1024; an exact 2x upscale (OpenCV 5) runs the same generic code. Float bilinear followed
# by rounding misses by one grey level on some pixels.
RESIZE_COEF_BITS = 11


def _linear_taps(n_in, n_out, clamp):
    """One axis of cv2.INTER_LINEAR: (i0, i1, w0, w1), each (n_out,); output k is
    (w0 * in[i0] + w1 * in[i1]) / 2^11. OpenCV's arithmetic: scale = 1 / (n_out / n_in) in double,
    f = float32((k + 0.5) * scale - 0.5), i0 = floor(f), f -= i0 in float32, weights
    saturate_cast<short>((1 - f) * 2048) and (f * 2048), which round half to even (cvRound).
    Columns are clamped (i0 < 0 or i0 >= n_in - 1: the edge pixel, f = 0); rows are not: their
    fraction stays and the two row indices are clipped into the image instead."""
    scale = 1.0 / (n_out / n_in)
    f = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = f - i0.astype(np.float32)  # float32, as OpenCV's `fx -= sx`
    if clamp:
        outside = (i0 < 0) | (i0 >= n_in - 1)
        f[outside] = 0
        i0 = np.clip(i0, 0, n_in - 1)
    one = np.float32(1 << RESIZE_COEF_BITS)
    w0 = np.rint((np.float32(1) - f) * one).astype(np.int32)  # float32 products, ties to even
    w1 = np.rint(f * one).astype(np.int32)
    return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), w0, w1


def resize_uint8_linear(image, size):
    """uint8 (H, W) or (H, W, C) -> (*size, ...): cv2.resize(image, (w, h), interpolation=
    cv2.INTER_LINEAR) bit for bit (what mmcv.imresize 'bilinear' and mmcv.imrescale run on a
    uint8 image), in int32 numpy. The same size returns the image as it is."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"resize_uint8_linear: expected a uint8 image, got {image.dtype}")
    if tuple(image.shape[:2]) == tuple(size):
        return image
    x = image.reshape(image.shape[:2] + (-1,)).astype(np.int32)  # (H, W, C)
    y0, y1, b0, b1 = _linear_taps(x.shape[0], size[0], clamp=False)
    x0, x1, a0, a1 = _linear_taps(x.shape[1], size[1], clamp=True)
    # horizontal pass on every source row: (H, w, C), at most 255 * 2048 (19 bits)
    s = np.take(x, x0, 1) * a0[None, :, None] + np.take(x, x1, 1) * a1[None, :, None]
    s >>= 4  # the vertical pass reads each row without its 4 low bits (15 bits left)
    # vertical pass: each product fits int32 (2^11 * 2^15); t <= 1020, so the result fits uint8
    t = ((b0[:, None, None] * s[y0]) >> 16) + ((b1[:, None, None] * s[y1]) >> 16)
    return ((t + 2) >> 2).astype(np.uint8).reshape(tuple(size) + image.shape[2:])


def resize_nearest(a, size):
    """(H, W, ...) array -> (*size, ...), nearest as cv2.INTER_NEAREST (mmcv.imresize 'nearest'):
    output row i copies input row min(floor(i * H / H'), H - 1), the scale computed as OpenCV
    does (1 / (H' / H) in float64), the same for columns."""
    def index(n_in, n_out):
        return np.minimum(np.floor(np.arange(n_out) * (1 / (n_out / n_in))).astype(np.int64), n_in - 1)
    if tuple(a.shape[:2]) == tuple(size):
        return a
    return a[index(a.shape[0], size[0])[:, None], index(a.shape[1], size[1])]

# ----------------------------------------------------------------------------- readers
def read_label(path):
    """An index PNG as an (H, W) integer array: palette PNGs give their indices, not colours."""
    im = Image.open(path)
    if im.mode not in ("P", "L", "I", "I;16"):
        raise SystemExit(f"eval_seg: {path}: mode {im.mode}, expected a palette or grayscale index PNG")
    return np.array(im).astype(np.int64 if im.mode.startswith("I") else np.uint8)


def read_rgb_label(path):
    """ImageNet-S's RGB label PNG as an (H, W) int64 array, class = R + 256 G (the dataset's
    README; mmseg's LoadImageNetSAnnotations computes the same from its BGR array). Classes run
    past 255 (ImageNet-S300) and 1000 marks ignored pixels, so no uint8 here."""
    im = Image.open(path)
    if im.mode not in ("RGB", "RGBA"):
        raise SystemExit(f"eval_seg: {path}: mode {im.mode}, expected an RGB label PNG (R + 256 G)")
    rgb = np.asarray(im).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def downsample_large(image, side=1000):
    """mmseg's LoadImageNetSImageFromFile(downsample_large_image=True): an image of more than
    1000 x 1000 pixels (the area decides, not a side) is resized so that its long side is 1000, the
    short side int(1000 * short / long), by mmcv.imresize(interpolation='bilinear') on the uint8
    image as loaded, i.e. cv2.INTER_LINEAR: resize_uint8_linear. Smaller images are returned as
    they are."""
    H, W = image.shape[:2]
    if H * W <= side * side:
        return image
    size = (side, int(side * W / H)) if H > W else (int(side * H / W), side)
    return resize_uint8_linear(np.asarray(image, np.uint8), size)


def _check_pairs(pairs, img_dir, ann_dir):
    if not pairs:
        raise SystemExit(f"eval_seg: no images found in {img_dir}")
    for k, where in ((0, img_dir), (1, ann_dir)):
        missing = [p[k] for p in pairs if not p[k].is_file()]
        if missing:
            raise SystemExit(f"eval_seg: {where}: {len(missing)} of {len(pairs)} files missing "
                             f"(first: {missing[0].name})")
    return pairs


def _split_pairs(root, img, ann, split):
    """VOC-style: ids listed in a split file; root/img/<id>.jpg, root/ann/<id>.png."""
    for d in (root / img, root / ann):
        if not d.is_dir():
            raise SystemExit(f"eval_seg: missing folder {d}")
    if not (root / split).is_file():
        raise SystemExit(f"eval_seg: missing split file {root / split}")
    ids = [s.strip() for s in (root / split).read_text().splitlines() if s.strip()]
    return _check_pairs([(root / img / f"{i}.jpg", root / ann / f"{i}.png", i) for i in ids],
                        root / img, root / ann)


def _folder_pairs(img_dir, ann_dir, img_suffix, ann_suffix):
    """Folder-style: every image in img_dir (nested folders too) has ann_dir/<same path><suffix>."""
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise SystemExit(f"eval_seg: missing folder {d}")
    images = sorted(img_dir.rglob(f"*{img_suffix}"))
    n_ann = sum(1 for _ in ann_dir.rglob(f"*{ann_suffix}"))
    if n_ann != len(images):
        raise SystemExit(f"eval_seg: {ann_dir}: {n_ann} '*{ann_suffix}' files for {len(images)} "
                         f"images in {img_dir}")
    pairs = []
    for p in images:
        stem = p.name[: -len(img_suffix)]
        pairs.append((p, ann_dir / p.parent.relative_to(img_dir) / (stem + ann_suffix), stem))
    return _check_pairs(pairs, img_dir, ann_dir)


def _voc(r):
    return _split_pairs(r, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt")


def _context(r):
    return _split_pairs(r, "JPEGImages", "SegmentationClassContext",
                        "ImageSets/SegmentationContext/val.txt")


def _coco_object(r):
    return _folder_pairs(r / "images/val2017", r / "annotations/val2017", ".jpg", "_instanceTrainIds.png")


def _coco_stuff(r):
    return _folder_pairs(r / "images/val2017", r / "annotations/val2017", ".jpg", "_labelTrainIds.png")


def _cityscapes(r):  # leftImg8bit/val/<city>/X_leftImg8bit.png -> gtFine/val/<city>/X_gtFine_...
    return _folder_pairs(r / "leftImg8bit/val", r / "gtFine/val", "_leftImg8bit.png",
                         "_gtFine_labelTrainIds.png")


def _ade(r):
    return _folder_pairs(r / "images/validation", r / "annotations/validation", ".jpg", ".png")


def _imagenet_s(r):  # validation/<wnid>/X.JPEG -> validation-segmentation/<wnid>/X.png
    return _folder_pairs(r / "validation", r / "validation-segmentation", ".JPEG", ".png")


# name -> (folders tried under --data-root, reader, classes, reduce_zero_label, background,
# standard val size). Insertion order is the paper's column order: the benchmarks with a
# background class first (TagAlign's README lists VOC, Context, Object, IN, Stuff, City, ADE).
# ImageNet-S's val sizes count the images with labels (752 and 4,097, the dataset's README): its
# validation/ folders hold only those, and mmseg evaluates every image there.
BENCHMARKS = {
    "voc": (("VOCdevkit/VOC2012", "VOC2012"), _voc, VOC, False, True, 1449),
    "context": (("VOCdevkit/VOC2010", "VOC2010"), _context, CONTEXT, False, True, 5104),
    "coco-object": (("coco_stuff164k",), _coco_object, COCO_OBJECT, False, True, 5000),
    "imagenets50": (("ImageNetS50", "ImageNet-S/ImageNetS50"), _imagenet_s, IMAGENET_S50,
                    False, True, 752),
    "imagenets300": (("ImageNetS300", "ImageNet-S/ImageNetS300"), _imagenet_s, IMAGENET_S300,
                     False, True, 4097),
    "voc20": (("VOCdevkit/VOC2012", "VOC2012"), _voc, VOC[1:], True, False, 1449),
    "context59": (("VOCdevkit/VOC2010", "VOC2010"), _context, CONTEXT[1:], True, False, 5104),
    "coco-stuff": (("coco_stuff164k",), _coco_stuff, COCO_STUFF, False, False, 5000),
    "cityscapes": (("cityscapes", "Cityscapes"), _cityscapes, CITYSCAPES, False, False, 500),
    "ade20k": (("ade/ADEChallengeData2016", "ADEChallengeData2016"), _ade, ADE20K, True, False, 2000),
}


class FolderBenchmark:
    """A standard benchmark on disk; item i -> (image uint8 (H, W, 3), raw label (H, W), id)."""
    ignore_index = 255  # the label value the metric skips
    large_side = None  # ImageNet-S: images over large_side^2 pixels are downsampled, labels not

    def __init__(self, pairs, classes, reduce_zero_label, background):
        self.pairs, self.classes = pairs, list(classes)
        self.reduce_zero_label, self.background = reduce_zero_label, background

    def __len__(self):
        return len(self.pairs)

    def read_label(self, path):
        return read_label(path)

    def __getitem__(self, i):
        img_path, ann_path, image_id = self.pairs[i]
        image = np.asarray(Image.open(img_path).convert("RGB"))
        label = self.read_label(ann_path)
        if label.shape != image.shape[:2]:
            raise SystemExit(f"eval_seg: {ann_path}: label {label.shape} does not match image "
                             f"{image.shape[:2]} of {img_path}")
        return image, label, image_id


class ImageNetS(FolderBenchmark):
    """ImageNet-S as mmseg's ImageNetSDataset reads it (mmseg/datasets/imagenets.py, 0.x): RGB
    labels (class = R + 256 G, 0 = background, 1000 ignored), and an image of more than
    1000 x 1000 pixels downsampled to 1000 on its long side (LoadImageNetSImageFromFile) while its
    label keeps the full size. mmseg then predicts at the downsampled size (its ori_shape) and
    ImageNetSDataset.pre_eval resizes the argmax to the label's size, nearest; evaluate() does
    the same for every benchmark whose label is larger than its image."""
    ignore_index = 1000
    large_side = 1000

    def read_label(self, path):
        return read_rgb_label(path)

    def __getitem__(self, i):
        image, label, image_id = super().__getitem__(i)
        return downsample_large(image, self.large_side), label, image_id


def load_benchmark(name, data_root=None, n_images=None, world_cfg=None):
    """A world benchmark (world.py), or a standard one read from its layout under data_root."""
    if name in WORLD_BENCHMARKS:
        return WorldBenchmark(name, **({} if n_images is None else {"n_images": n_images}),
                              **({} if world_cfg is None else {"cfg": world_cfg}))
    if data_root is None:
        raise SystemExit(f"eval_seg: benchmark {name} needs --data-root")
    folders, reader, classes, rzl, bg, n_val = BENCHMARKS[name]
    root = next((Path(data_root) / f for f in folders if (Path(data_root) / f).is_dir()), None)
    if root is None:
        raise SystemExit(f"eval_seg: {name}: no folder {' or '.join(folders)} under {data_root}")
    kind = ImageNetS if name.startswith("imagenets") else FolderBenchmark
    bench = kind(reader(root), classes, rzl, bg)
    if len(bench) != n_val:
        print(f"note: {name} has {len(bench)} images under {root} (the standard val split has {n_val})")
    return bench

# ----------------------------------------------------------------------------- models: what the evaluator reads
class SegmentationModel:
    """What eval_seg.py reads: dense embeddings (B, E, h, w) and text embeddings (T, E).

    head "decoder": TagAlign's trained head (the patch embeddings whose mean the losses train);
    "clip": CLIP's own frozen ln_post + proj on the same tokens (raw CLIP, the zero-shot baseline).
    reading: how the ViT's patch tokens are read (model.READINGS; default: the model's own).
    norm: the (mean, std) the model expects, if not the protocol's; world_cfg: the WorldConfig it
    was trained on (the world benchmarks are made with it).
    A frozen-CLIP model with the decoder head also gives CLIP's scores of the same tokens
    (`with_clip`), which TagAlign's evaluation blends in (eval_seg's clip_w).
    """

    def __init__(self, model, tokenizer, device="cpu", reading=None, head="decoder", norm=None, world_cfg=None):
        if reading is not None and reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, not {reading!r}")
        if head not in ("decoder", "clip"):
            raise ValueError(f"head must be 'decoder' or 'clip', not {head!r}")
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, torch.device(device)
        self.reading, self.head = reading or model.cfg.dense, head
        self.norm, self.world_cfg = norm, world_cfg
        self.config = dataclasses.asdict(model.cfg)
        self.clip_blend = model.frozen_clip and head == "decoder"
        scale = model.clip.logit_scale if head == "clip" else model.itc_logit_scale
        self.logit_scale = scale.exp().clamp(max=100).item()  # the ITC temperature

    @torch.no_grad()
    def encode_dense(self, images, with_clip=False):
        """(B, 3, H, W) -> (B, E, h, w); with_clip: also raw CLIP's (B, E, h, w) of the same tokens."""
        x = self.model.features(images.to(self.device), self.reading)
        head = self.model.clip_head if self.head == "clip" else self.model.head
        dense = head(x).permute(0, 3, 1, 2)
        if not with_clip:
            return dense
        if not self.clip_blend:
            raise ValueError("with_clip: only a frozen-CLIP model read through its decoder has a raw CLIP path")
        return dense, self.model.clip_head(x).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode_text(self, texts):  # list of T strings -> (T, E)
        tokens = self.tokenizer(texts, self.model.cfg.context_length).to(self.device)
        return self.model.encode_text(tokens)



def load_model(path, device="cpu", reading=None, clip=None):
    """A trained checkpoint as the evaluator's SegmentationModel."""
    ckpt = read_checkpoint(path)
    if ckpt["args"]["command"] == "pretrain":
        raise SystemExit(f"error: {path} is a pretrain checkpoint: evaluate the CLIP file that run wrote, "
                         f"--clip {os.path.join(os.path.dirname(path), 'clip.pt')}")
    return SegmentationModel(model_from_checkpoint(ckpt, path, clip), Tokenizer.from_checkpoint(ckpt["tokenizer"]),
                             device, reading,
                             norm=NORMS[ckpt["args"]["norm"]] if ckpt.get("clip") else None,  # trained with it
                             world_cfg=WorldConfig(**ckpt["world"]) if ckpt.get("world") else None)


def load_raw_clip(path, device="cpu", reading=None, norm="imagenet"):
    """An OpenAI CLIP file as raw CLIP: its own ln_post + proj on the `reading` of its patch
    tokens, images normalised with NORMS[norm] (the zero-shot baseline)."""
    return SegmentationModel(load_clip(path), Tokenizer.from_clip(), device, reading, head="clip",
                             norm=NORMS[norm])


# ----------------------------------------------------------------------------- geometry
def resized_shape(h, w, short=448, cap=2048):
    """mmcv.imrescale's size: scale s = min(cap/long, short/short side), int(x*s + 0.5)."""
    s = min(cap / max(h, w), short / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def window_grid(H, W, window, stride):
    """mmseg's slide grid as (y1, y2, x1, x2) boxes: ceil((H - window) / stride) + 1 rows, the
    last window snapped to the border; a side shorter than the window gets one window of its own
    size, so all crops of an image have the same shape (min(window, H), min(window, W))."""
    if window is None:
        return [(0, H, 0, W)]
    ny = max(H - window + stride - 1, 0) // stride + 1
    nx = max(W - window + stride - 1, 0) // stride + 1
    boxes = []
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * stride + window, H), min(ix * stride + window, W)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def slide_inference(x, crop_scores, C, window, stride, batch_size=16):
    """x (B, 3, H, W) -> (B, C, H, W): crop_scores maps crops (n, 3, h, w) to scores
    (n, C, h, w); crops of all B images go through it batch_size at a time; overlapping windows
    are averaged."""
    B, _, H, W = x.shape
    boxes = window_grid(H, W, window, stride)
    if len(boxes) == 1:  # one window covers the image (the world preset): nothing to stitch
        return torch.cat([crop_scores(x[i:i + batch_size]) for i in range(0, B, batch_size)])
    out, count = x.new_zeros(B, C, H, W), x.new_zeros(1, 1, H, W)
    jobs = [(b, box) for b in range(B) for box in boxes]
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        scores = crop_scores(torch.stack([x[b, :, y1:y2, x1:x2] for b, (y1, y2, x1, x2) in chunk]))
        for (b, (y1, y2, x1, x2)), s in zip(chunk, scores):
            out[b, :, y1:y2, x1:x2] += s
    for y1, y2, x1, x2 in boxes:
        count[..., y1:y2, x1:x2] += 1
    return out / count

# ----------------------------------------------------------------------------- PAMR
def _shifts(t, dilations):
    """The 8 neighbours of every pixel in a 3x3 window per dilation, edges replicated:
    yields (B, K, H, W) views, 8 * len(dilations) of them."""
    H, W = t.shape[-2:]
    for d in dilations:
        p = F.pad(t, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    yield p[..., d + dy:d + dy + H, d + dx:d + dx + W]


def pamr(image, mask, iters=10, dilations=(1, 2, 4, 8, 12, 24)):
    """Pixel-adaptive mask refinement (Araslanov & Roth, "Single-stage semantic segmentation
    from image labels", CVPR 2020, section 3.3), written from the paper's description.

    image (B, 3, H, W), mask (B, C, H, W) -> refined (B, C, H, W). Affinity of pixel i to each
    neighbour j in dilated 3x3 neighbourhoods: k_ij = -|x_i - x_j| / sigma_i with sigma_i the
    local standard deviation of the image over i's neighbours (per channel), averaged over
    channels, softmax over the neighbours; the mask is then averaged with these weights
    `iters` times (a convex combination each time, so constant masks stay constant)."""
    nb = torch.stack(list(_shifts(image, dilations)), 2)  # (B, 3, N, H, W)
    sigma = nb.std(dim=2, keepdim=True)
    aff = (-(nb - image.unsqueeze(2)).abs() / (sigma + 1e-8)).mean(1).softmax(1)  # (B, N, H, W)
    for _ in range(iters):  # accumulate neighbour by neighbour: no (B, C, N, H, W) tensor
        acc = torch.zeros_like(mask)
        for j, m in enumerate(_shifts(mask, dilations)):
            acc.addcmul_(m, aff[:, j:j + 1])
        mask = acc
    return mask

# ----------------------------------------------------------------------------- model side
def prompts(names, templates):
    """A class's prompts: each template filled with each of its names (a name, or a list of
    synonyms), in the order text_embeddings embeds them."""
    return [t.format(s) for s in ([names] if isinstance(names, str) else names) for t in templates]


def text_embeddings(model, names, templates, chunk=256):
    """(C, E) L2-normalised class embeddings: each template filled with each name, embeddings
    averaged un-normalised over the templates, then normalised (TCL/TagAlign). A name may be a
    list of synonyms ("grass", "lawn"): its prompts are all of theirs, averaged the same way."""
    groups = [[n] if isinstance(n, str) else list(n) for n in names]
    texts = [p for g in groups for p in prompts(g, templates)]
    emb = torch.cat([model.encode_text(texts[i:i + chunk]).float() for i in range(0, len(texts), chunk)])
    per_class = emb.split([len(g) * len(templates) for g in groups])  # (synonyms x templates, E) each
    return F.normalize(torch.stack([e.mean(0) for e in per_class]), dim=-1)


def precision(device):
    """How the evaluator runs the model (model.autocast): bf16 on CUDA, fp32 on CPU. Scores are
    computed in fp32 either way."""
    return "bf16" if device.type == "cuda" else "fp32"


def effective_clip_w(model, protocol):
    """The blend weight that applies: the protocol's for a model with a raw CLIP path, else 0."""
    return protocol.clip_w if getattr(model, "clip_blend", False) else 0.0


def crop_scorer(model, text, protocol, background):
    """crops (n, 3, h, w) -> scores (n, C, h, w), the background channel first when present."""
    softmax_scale = protocol.score_scale or float(getattr(model, "logit_scale", 30.0))
    clip_w = effective_clip_w(model, protocol)

    def class_scores(f):  # (n, E, h', w') -> (n, C, h', w')
        f = F.normalize(f.float(), dim=1)
        if f.dim() != 4 or f.shape[1] != text.shape[1]:
            raise ValueError(f"encode_dense gave {tuple(f.shape)}; expected (n, {text.shape[1]}, h, w)")
        cos = torch.einsum("nehw,ce->nchw", f, text)
        if protocol.score == "softmax":  # relative scores: the background wins where no class is sure
            return torch.softmax(softmax_scale * cos, dim=1)
        return torch.sigmoid(protocol.score_scale * cos + protocol.score_bias)

    def scores(crops):
        with autocast(crops.device, precision(crops.device)):
            return _scores(crops)

    def _scores(crops):
        if clip_w:  # TagAlign's generate_masks: blend on the patch grid, then upsample
            f, f_clip = model.encode_dense(crops, with_clip=True)
            s = (1 - clip_w) * class_scores(f) + clip_w * class_scores(f_clip)
        else:
            s = class_scores(model.encode_dense(crops))
        s = resize_bilinear(s, crops.shape[-2:])  # (n, C, h, w)
        if protocol.pamr:  # TCL refines each crop's class scores before adding the background
            s = pamr(crops, s, protocol.pamr_iters, protocol.pamr_dilations)
        if background:
            s = torch.cat([torch.full_like(s[:, :1], protocol.bg_thresh), s], 1)
        return s
    return scores


def input_size(H, W, protocol):
    """(H', W'): the size the protocol resizes an H x W image to before the windows."""
    return resized_shape(H, W, protocol.short_side, protocol.long_cap) if protocol.short_side else (H, W)


def preprocess(image, protocol, device):
    """uint8 (H, W, 3) -> normalised float (1, 3, H', W') after the protocol's resize."""
    image = np.asarray(image, np.uint8)
    if protocol.short_side:  # mmcv.imrescale: cv2.resize(INTER_LINEAR) on the uint8 image
        image = resize_uint8_linear(image, input_size(*image.shape[:2], protocol))
    x = torch.from_numpy(np.array(image, np.uint8))  # a copy: arrays from PIL are read-only
    x = x.to(device).permute(2, 0, 1)[None].float()  # (1, 3, H', W') in 0..255
    mean = torch.tensor(protocol.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(protocol.std, device=device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


@torch.no_grad()
def predict(model, items, text, protocol, background, batch_size=16):
    """The one path from pixels to labels, shared by evaluate and segment.py: items yields
    (uint8 image (H, W, 3), key); yields (key, scores (C', H, W), labels (H, W)) in the same
    order. text: (C, E) class embeddings (text_embeddings); C' = C, plus the constant background
    channel first when `background`. Each image: preprocess, slide_inference over crop_scorer,
    scores bilinear back to the image's size (mmseg's ori_shape), argmax (int64 numpy; scores on
    the model's device). Consecutive images of one resized shape share forward passes, up to
    batch_size windows and ~200 MB of scores."""
    device = torch.device(getattr(model, "device", "cpu"))
    C = len(text) + bool(background)
    scores = crop_scorer(model, text, protocol, background)
    group = []  # (image, key, x) of one resized shape

    def flush():
        x = torch.cat([g[2] for g in group])
        out = slide_inference(x, scores, C, protocol.window, protocol.stride, batch_size)
        done = [(key, image.shape[:2]) for image, key, _ in group]
        group.clear()
        for (key, size), s in zip(done, out):
            s = resize_bilinear(s[None], size)[0]
            yield key, s, s.argmax(0).cpu().numpy()

    for image, key in items:
        image = np.asarray(image)
        x = preprocess(image, protocol, device)
        per_image = len(window_grid(*x.shape[-2:], protocol.window, protocol.stride))
        cap = max(1, min(batch_size // per_image, int(5e7 // (C * x.shape[-2] * x.shape[-1]))))
        if group and (group[0][2].shape != x.shape or len(group) >= cap):
            yield from flush()
        group.append((image, key, x))
    if group:
        yield from flush()

# ----------------------------------------------------------------------------- pictures
# Class k's colour: a hand-picked list of 20 distinct colours first (Sasha Trubetskoy's "20 simple
# distinct colours", white and black left out, light grey last), then, one at a time, the colour of
# an RGB grid farthest in CIELAB from every colour taken so far (Glasbey et al. 2007, "Colour
# displays for categorical images"), mid-lightness only. The background class of VOC-style
# benchmarks is dark grey, ignore (255) black with grey hatching; the greedy step keeps clear of
# these and of the white page.
DISTINCT = ("e6194b 3cb44b ffe119 4363d8 f58231 911eb4 42d4f4 f032e6 bfef45 fabed4 469990 dcbeff "
            "9a6324 fffac8 800000 aaffc3 808000 ffd8b1 000075 a9a9a9").split()
BACKGROUND_RGB, IGNORE_RGB, HATCH_RGB = (72, 72, 72), (0, 0, 0), (110, 110, 110)


def _lab(rgb):
    """(..., 3) sRGB in 0..255 -> CIELAB (D65), where distances roughly follow perception."""
    c = np.asarray(rgb, float) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)  # sRGB -> linear
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    f = np.cbrt(xyz / [0.9505, 1.0, 1.089])  # the standard's linear toe near black left out
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _class_colours(n=256):
    """(n, 3) int64: the hand-picked colours, then the greedy farthest-point ones."""
    rows = [[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in DISTINCT]
    grid = np.stack(np.meshgrid(*[np.linspace(0, 255, 12).round()] * 3, indexing="ij"), -1).reshape(-1, 3)
    lab = _lab(grid)
    keep = (lab[:, 0] > 30) & (lab[:, 0] < 92)  # neither near-black (ignore) nor near-white (page)
    grid, lab = grid[keep], lab[keep]
    d = np.full(len(grid), np.inf)  # squared distance from each grid colour to the nearest taken
    for c in rows + [BACKGROUND_RGB, IGNORE_RGB, HATCH_RGB, (255, 255, 255)]:
        d = np.minimum(d, ((lab - _lab(c)) ** 2).sum(1))
    while len(rows) < n:
        rows.append(grid[d.argmax()].tolist())
        d = np.minimum(d, ((lab - _lab(rows[-1])) ** 2).sum(1))
    return np.array(rows, np.int64)


CLASS_COLOURS = _class_colours()


def palette(background):
    """(256, 3) uint8: row k is class k's colour (class 0 dark grey when `background`), row 255
    the ignore colour."""
    rows = np.concatenate([[BACKGROUND_RGB], CLASS_COLOURS]) if background else CLASS_COLOURS
    p = rows[:256].astype(np.uint8)
    p[255] = IGNORE_RGB
    return p


def _font(size):
    """Pillow's built-in font at `size` px (Pillow >= 10.1 with FreeType), else its small bitmap."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _label_panel(label, size, colours):
    """(h, w, 3) uint8: a label map in flat colours, resized to size = (w, h) by nearest
    neighbour; ignored pixels hatched with diagonal lines 8 px apart."""
    k = np.asarray(label).astype(np.int64) % 256  # -1 (no prediction) wraps to 255
    a = np.array(Image.fromarray(colours[k]).resize(size, Image.NEAREST))
    ignore = np.array(Image.fromarray((k == 255).astype(np.uint8)).resize(size, Image.NEAREST), bool)
    y, x = np.indices(ignore.shape)
    a[ignore & ((x + y) % 8 < 2)] = HATCH_RGB
    return a


def panel_size(H, W):
    """(w, h) of each panel for an H x W image: small images (the world's 64 px) upscaled by a
    whole factor to >= 256 px on the short side, so pixels stay square blocks; large ones
    (VOC's 500 x 375) shrunk, never enlarged, to a short side of 256 or a width of 512,
    whichever is larger, so three panels stay near 1536 px wide."""
    s = math.ceil(256 / min(H, W)) if min(H, W) < 256 else min(1.0, max(256 / min(H, W), 512 / W))
    return round(W * s), round(H * s)


def draw_panels(path, title, panels, legend, colours):
    """Write equal-sized panels [(heading, (h, w, 3) uint8)] side by side under a title line,
    and below them a legend [(class index, text)] of swatches in `colours` (palette(); 255:
    hatched ignore), flowing left to right and wrapping. Returns (legend, boxes):
    [(class index, text, swatch box)] as drawn, and the panels' boxes; a box is
    (x0, y0, x1, y1) in pixels, x1 and y1 excluded."""
    (h, w), font = panels[0][1].shape[:2], _font(14)
    M, lh = 10, font.getbbox("Ag")[3] + 8  # margin and gap; text line height
    W = len(panels) * (w + M) + M
    spots, x, y = [], M, M + 2 * lh + h + M  # legend entries flow left to right, then wrap
    for k, name in legend:
        dx = lh + round(font.getlength(name)) + 2 * M
        if x + dx > W - M and x > M:
            x, y = M, y + lh
        spots.append((x, y))
        x += dx
    canvas = Image.new("RGB", (W, y + lh + M), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((M, M), title, "black", font)
    boxes = [(M + i * (w + M), M + 2 * lh, M + i * (w + M) + w, M + 2 * lh + h) for i in range(len(panels))]
    for box, (head, panel) in zip(boxes, panels):
        draw.text((box[0], M + lh), head, "black", font)
        canvas.paste(Image.fromarray(panel), box[:2])
    s = lh - 6  # swatch side
    for (k, name), (x, y) in zip(legend, spots):
        canvas.paste(Image.fromarray(_label_panel([[k]], (s, s), colours)), (x, y))
        draw.rectangle((x - 1, y - 1, x + s, y + s), outline=(90, 90, 90))  # pale swatches on white
        draw.text((x + s + 6, y), name, "black", font)
    canvas.save(path, format="PNG")
    return [(k, name, (x, y, x + s, y + s)) for (k, name), (x, y) in zip(legend, spots)], boxes


def save_overlay(path, image, label, pred, classes, background=False, title=""):
    """Write input | ground truth | prediction with a title line (plus the image's own mIoU and
    pixel accuracy) above and a legend of every class in the label or the prediction below.
    label, pred: (H, W) class indices into `classes` (after reduce_zero_label), 255 = ignore.

    The label panels are flat colours, not a blend over the photo: the swatches then match the
    pixels exactly, and the world's images are coloured shapes that a blend would mix with the
    class colours. The input panel beside them gives the context.
    Returns draw_panels's (legend, panels)."""
    label, pred = np.asarray(label).astype(np.int64), np.asarray(pred).astype(np.int64)
    (w, h), colours = panel_size(*label.shape), palette(background)
    legend = [(k, classes[k] if k < len(classes) else "ignore" if k == 255 else f"class {k}")
              for k in np.union1d(label % 256, pred % 256).tolist()]
    score = IoU(len(classes))
    score.update(pred, label)
    r = score.compute()
    resample = Image.NEAREST if w >= label.shape[1] else Image.BILINEAR
    panels = [("input", np.array(Image.fromarray(image).resize((w, h), resample))),
              ("ground truth", _label_panel(label, (w, h), colours)),
              ("prediction", _label_panel(pred, (w, h), colours))]
    return draw_panels(path, f"{title}    image mIoU {r['mIoU']:.1f}, pixel acc {r['aAcc']:.1f}",
                       panels, legend, colours)


def _save_vis(vis_dir, name, image_id, image, label, pred, bench):
    """One overlay for image_id, its label reduced as the metric reduces it and its ignored
    pixels (ImageNet-S: 1000) as 255; returns save_overlay's (legend, panels). (ImageNet-S300
    overlays draw its class 255 as ignore, and classes above 255 in recycled colours.)"""
    label = reduce_zero(label) if getattr(bench, "reduce_zero_label", False) else np.asarray(label)
    label = np.where(label == getattr(bench, "ignore_index", 255), 255, label)
    image = resize_nearest(np.asarray(image), np.shape(label))  # ImageNet-S: shown at the label's size
    title = str(image_id) if str(image_id).startswith(name) else f"{name} {image_id}"
    stem = str(image_id).replace("/", "_")
    path = Path(vis_dir) / f"{stem if stem.startswith(name) else f'{name}_{stem}'}.png"
    return save_overlay(path, image, label, pred, bench.classes, bench.background, title)


def _vis_indices(n, n_vis):
    return set(np.linspace(0, n - 1, n_vis).round().astype(int).tolist()) if n and n_vis else set()


def _metric(bench):
    return IoU(len(bench.classes), getattr(bench, "ignore_index", 255),
               getattr(bench, "reduce_zero_label", False))

# ----------------------------------------------------------------------------- training curves
def _ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) spanning [lo, hi]."""
    raw = (hi - lo) / n if hi > lo else abs(hi) / n or 1.0
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    return [k * step for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def _plot(draw, box, xt, series, font):
    """Axes in box = (x0, y0, x1, y1) with x ticks xt and y ticks fitted to the series, one line
    per series [(name, xs, ys, colour)], and a legend in the top right corner when there are
    several."""
    x0, y0, x1, y1 = box
    values = [v for _, _, ys, _ in series for v in ys]
    lo, hi = min(min(values), 0), max(values)  # from 0: losses and rates are compared with it
    yt = _ticks(lo, hi + (hi - lo) / 20 if hi > lo else lo + 1)  # headroom: no line on the frame
    X = lambda v: x0 + (v - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)  # noqa: E731
    Y = lambda v: y1 - (v - yt[0]) / (yt[-1] - yt[0]) * (y1 - y0)  # noqa: E731
    for v in yt:
        draw.line((x0, Y(v), x1, Y(v)), (225, 225, 225))
        draw.text((x0 - 6, Y(v)), f"{v:.3g}", "black", font, anchor="rm")
    for v in xt:
        draw.line((X(v), y1, X(v), y1 + 4), "black")
        draw.text((X(v), y1 + 6), f"{v:g}", "black", font, anchor="ma")
    draw.rectangle(box, outline="black")
    for i, (name, xs, ys, colour) in enumerate(series):
        points = [(X(a), Y(b)) for a, b in zip(xs, ys)]
        width = 4 if i == 0 and len(series) > 1 else 2  # total stays visible under ITC = total
        points = points * 2 if len(points) == 1 else points  # one point: a dot
        draw.line(points, colour, width, joint="curve")
        if len(series) > 1:
            ly = y0 + 14 + 20 * i
            draw.line((x1 - 110, ly, x1 - 84, ly), colour, width + 1)
            draw.text((x1 - 76, ly), name, "black", font, anchor="lm")


def save_curves(log_path, png_path):
    """Draw a training log (tagalign.py's log.jsonl: one JSON object a line with step, loss, itc,
    tag, lr, ...) as a 900 x 600 PNG: total, ITC and tag loss against the step, and below it the
    learning rate on the same step axis. Missing keys and non-finite values are skipped; the tag
    loss is left out (and the title says so) when it was never logged or is 0 throughout, as in
    the ITC-only baseline. Returns png_path. A log with no rows (a run of --steps 0) draws
    nothing: it prints why and returns None, so a caller at the end of training goes on. A line
    that is not a JSON object with a "step" raises ValueError naming the file and line."""
    rows = []
    with open(log_path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{log_path} line {i}: expected a JSON object with a 'step'")
            rows.append(row)
    if not rows:
        print(f"save_curves: {log_path} has no rows; no curves drawn")
        return None

    def curve(name, key, colour):  # (name, steps, values, colour) where key holds a finite number
        xy = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return name, [x for x, _ in xy], [y for _, y in xy], colour

    losses = [curve("total", "loss", (30, 30, 30)), curve("ITC", "itc", (67, 99, 216)),
              curve("tag", "tag", (245, 130, 49))]
    losses = [c for c in losses if c[1] and (c[0] != "tag" or any(c[2]))]
    lr = [c for c in [curve("lr", "lr", (60, 150, 75))] if c[1]]
    steps = [r["step"] for r in rows]
    xt = _ticks(min(steps), max(steps)) if max(steps) > min(steps) else [steps[0], steps[0] + 1]
    canvas = Image.new("RGB", (900, 600), "white")
    draw, font = ImageDraw.Draw(canvas), _font(13)
    no_tag = "" if any(c[0] == "tag" for c in losses) else " (no tag loss)"
    draw.text((80, 12), f"{log_path}: {len(rows)} rows, steps {min(steps)} to {max(steps)}{no_tag}",
              "black", _font(15))
    for box, series, name in (((80, 60, 880, 390), losses, "loss"),
                              ((80, 440, 880, 550), lr, "learning rate")):
        draw.text((box[0], box[1] - 4), name, "black", font, anchor="lb")
        if series:
            _plot(draw, box, xt, series, font)
    draw.text((480, 592), "step", "black", font, anchor="md")
    canvas.save(png_path)
    return png_path

# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, bench, protocol, name="", batch_size=16, n_vis=0, vis_dir=None, limit=None):
    """Segment every image of bench with model; returns IoU.compute() plus counts and speed."""
    device = torch.device(getattr(model, "device", "cpu"))
    if any(m > 1 for m in protocol.mean):
        raise ValueError(f"{name}: protocol mean {protocol.mean} must be in [0, 1] pixel units")
    classes, bg = list(bench.classes), bool(bench.background)
    text = text_embeddings(model, classes[1:] if bg else classes, protocol.templates).to(device)
    metric = _metric(bench)
    n = len(bench) if limit is None else min(limit, len(bench))
    vis = _vis_indices(n, n_vis)
    n_crops, t0 = 0, time.time()

    def items():  # (image, what the metric needs of it)
        for i in range(n):
            image, label, image_id = bench[i]
            label = np.asarray(label)
            if label.shape != image.shape[:2] and not getattr(bench, "large_side", None):
                raise ValueError(f"{name} image {image_id}: label {label.shape} vs image {image.shape}")
            yield image, (i, image, label, image_id)

    if vis:
        Path(vis_dir).mkdir(parents=True, exist_ok=True)
    with tqdm(total=n, desc=name, unit="img", leave=False) as bar:
        for (i, image, label, image_id), _, pred in predict(model, items(), text, protocol, bg, batch_size):
            # The argmax at the image's size, nearest to the label's: a no-op except for
            # ImageNet-S's downsampled images (its pre_eval).
            pred = resize_nearest(pred, label.shape)
            metric.update(pred, label)
            if i in vis:
                _save_vis(vis_dir, name, image_id, image, label, pred, bench)
            H, W = input_size(*image.shape[:2], protocol)
            n_crops += len(window_grid(H, W, protocol.window, protocol.stride))
            bar.update(1)
            bar.set_postfix(crops_s=f"{n_crops / (time.time() - t0):.1f}", refresh=False)
    seconds = time.time() - t0
    return {**metric.compute(), "images": n, "crops": n_crops, "seconds": seconds}


def prompt_cosines(model, bench, protocol, batch_size=16, limit=None):
    """Why a class wins or loses, before any scoring: over the patches whose centre pixel is
    labelled c, the mean cosine of the dense embedding to c's prompt embedding, and the mean
    margin over the best other class's (negative: another prompt is closer on average).
    For world benchmarks, whose images are one crop at the model's size (each image is encoded
    whole); ignore-labelled patches and, on world-object, the background class are left out.
    Returns {class: {"cos", "margin", "patches"}}."""
    device = torch.device(getattr(model, "device", "cpu"))
    names = bench.classes[1:] if bench.background else bench.classes
    text = text_embeddings(model, names, protocol.templates).to(device)
    C = len(names)
    total = torch.zeros(C, 3, dtype=torch.float64)  # sum cos, sum margin, patches
    n = len(bench) if limit is None else min(limit, len(bench))
    for start in range(0, n, batch_size):
        items = [bench[i] for i in range(start, min(start + batch_size, n))]
        x = torch.cat([preprocess(image, protocol, device) for image, _, _ in items])
        with autocast(device, precision(device)):
            f = model.encode_dense(x)
        cos = torch.einsum("nehw,ce->nhwc", F.normalize(f.float(), dim=1), text).cpu()
        h, w = cos.shape[1:3]
        H, W = x.shape[-2:]
        rows, cols = (torch.arange(h) * H // h + H // (2 * h)), (torch.arange(w) * W // w + W // (2 * w))
        label = torch.from_numpy(np.stack([np.asarray(lab) for _, lab, _ in items]).astype(np.int64))
        label = label[:, rows][:, :, cols] - (1 if bench.background else 0)  # (n, h, w) into names
        keep = (label >= 0) & (label < C)
        cos, label = cos[keep], label[keep]  # (P, C), (P,)
        own = cos.gather(1, label[:, None])[:, 0]
        other = cos.scatter(1, label[:, None], -math.inf).amax(1)
        total.index_add_(0, label, torch.stack([own, own - other, torch.ones_like(own)], 1).double())
    return {c: {"cos": (t[0] / t[2]).item() if t[2] else None,
                "margin": (t[1] / t[2]).item() if t[2] else None, "patches": int(t[2])}
            for c, t in zip(names, total)}


def print_cosines(name, cosines):
    print(f"\n{name}: prompt cosine on each class's patches, and its margin over the best other class")
    for c, v in cosines.items():
        print(f"  {c:<24}" + ("      -" if v["cos"] is None else f"{v['cos']:7.3f}{v['margin']:+8.3f}")
              + f"{v['patches']:8d} patches")


def evaluate_preds(bench, preds_dir, name="", n_vis=0, vis_dir=None, limit=None):
    """Score saved predictions: preds_dir/<image id>.png per image at the label's size, class
    index in the benchmark's 0-based order after reduce_zero_label, a value outside the classes
    (255 where there are fewer) = no prediction; ImageNet-S300 needs 16-bit PNGs."""
    n = len(bench) if limit is None else min(limit, len(bench))
    # Check every file first (ids without decoding images where the reader knows them).
    ids = [q[2] for q in bench.pairs[:n]] if hasattr(bench, "pairs") else [bench[i][2] for i in range(n)]
    paths = [Path(preds_dir) / f"{image_id}.png" for image_id in ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"eval_seg: --preds {preds_dir}: {len(missing)} of {n} prediction files "
                         f"missing for {name} (first: {missing[0].name})")
    metric = _metric(bench)
    vis = _vis_indices(n, n_vis)
    if vis:
        Path(vis_dir).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(tqdm(paths, desc=name, leave=False)):
        image, label, image_id = bench[i]
        pred = read_label(p)
        if pred.shape != np.asarray(label).shape:
            raise SystemExit(f"eval_seg: {p}: prediction {pred.shape} does not match the label "
                             f"{np.asarray(label).shape}")
        metric.update(pred, label)
        if i in vis:
            _save_vis(vis_dir, name, image_id, image, label, pred, bench)
    return {**metric.compute(), "images": n}

# ----------------------------------------------------------------------------- output
def _fmt(v):
    return "    nan" if v is None or not math.isfinite(v) else f"{v:7.2f}"


def print_class_table(name, classes, r):
    print(f"\n{name}: per-class IoU / Acc (%), {r['images']} images")
    for c, iou, acc in zip(classes, r["IoU"], r["Acc"]):
        print(f"  {c:<24}{_fmt(iou)}{_fmt(acc)}")
    print(f"  {'mIoU / mAcc / aAcc':<24}{_fmt(r['mIoU'])}{_fmt(r['mAcc'])}{_fmt(r['aAcc'])}")


def print_summary(results):
    names = list(results)
    mean = float(np.mean([results[k]["mIoU"] for k in names]))
    print("\nmIoU   " + " ".join(f"{k:>12}" for k in names) + f" {'mean':>12}")
    print("       " + " ".join(f"{_fmt(results[k]['mIoU']):>12}" for k in names) + f" {_fmt(mean):>12}")
    return mean


def _clean(x):
    """JSON-safe copy: NaN -> null, dataclasses/tuples/paths to plain types."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _clean(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def write_json(path, obj):
    """obj as JSON (through _clean), written atomically."""
    with write_atomic(path) as tmp:
        Path(tmp).write_text(json.dumps(_clean(obj), indent=1, allow_nan=False))

# ----------------------------------------------------------------------------- entry points
def protocol_for(name, bench, overrides=None, norm=None):
    """The preset for a benchmark (world: mean/std/templates from world.py), the model's own
    normalisation if it has one (norm: (mean, std) it was trained with), then overrides."""
    if name in WORLD_BENCHMARKS:
        p = dataclasses.replace(PRESETS["world"], mean=tuple(bench.mean), std=tuple(bench.std),
                                templates=tuple(bench.templates))
    else:
        p = PRESETS["tcl"]
    if norm is not None:
        p = dataclasses.replace(p, mean=tuple(norm[0]), std=tuple(norm[1]))
    return dataclasses.replace(p, **(overrides or {}))


def model_protocol(model, name, bench, overrides=None):
    """protocol_for with the model's own normalisation (model.norm), and the raw-CLIP blend only
    where the model has a raw CLIP path (effective_clip_w): the protocol a model is scored by."""
    p = protocol_for(name, bench, overrides, getattr(model, "norm", None))
    return dataclasses.replace(p, clip_w=effective_clip_w(model, p))


def run_benchmarks(model, names=WORLD_BENCHMARKS, data_root=None, out_dir="out", n_vis=4, batch_size=16,
                   extra=None, overrides=None, n_images=None, limit=None, preds_dir=None, world_cfg=None,
                   cosines=False):
    """Evaluate `model` (or saved predictions in preds_dir when model is None) on `names`,
    print the tables, write out_dir/metrics.json and out_dir/vis/*.png; returns the metrics:
    {name: {"mIoU", "mAcc", "aAcc", "IoU": {class: value}, ...}, "mean": {"mIoU": ..}, **extra}.
    overrides: Protocol fields to change (e.g. {"bg_thresh": 0.5, "pamr": True});
    n_images: world benchmark size (world.py's default when None); limit: first N images only;
    world_cfg: the WorldConfig of the world benchmarks (the default world when None);
    cosines: also measure prompt_cosines (world benchmarks) into metrics[name]["cosines"]."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    benches = {k: load_benchmark(k, data_root, n_images, world_cfg) for k in names}  # fail early on bad paths
    results, metrics = {}, {}
    for k, bench in benches.items():
        if preds_dir is None:
            protocol = model_protocol(model, k, bench, overrides)
            r = evaluate(model, bench, protocol, k, batch_size, n_vis, out_dir / "vis", limit)
            r["protocol"] = protocol
            r["speed"] = {"images_per_s": r["images"] / r["seconds"],
                          "crops_per_s": r["crops"] / r["seconds"]}
        else:
            r = evaluate_preds(bench, preds_dir, k, n_vis, out_dir / "vis", limit)
        print_class_table(k, bench.classes, r)
        if cosines:
            r["cosines"] = prompt_cosines(model, bench, protocol, batch_size, limit)
            print_cosines(k, r["cosines"])
        results[k] = r
        metrics[k] = {**r, "IoU": dict(zip(bench.classes, r["IoU"])),
                      "Acc": dict(zip(bench.classes, r["Acc"]))}
    metrics["mean"] = {"mIoU": print_summary(results), "benchmarks": list(results)}
    metrics.update(extra or {})
    write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir / 'metrics.json'}" + (f" and {out_dir / 'vis'}/" if n_vis else ""))
    return metrics


def parse_names(text):
    if text is None:
        return list(WORLD_BENCHMARKS)
    names = []
    for k in text.lower().replace("_", "-").split(","):
        k = k.strip()
        if k == "all":
            names += [b for b in BENCHMARKS if b not in names]
        elif k in BENCHMARKS or k in WORLD_BENCHMARKS:
            names += [k] if k not in names else []
        elif k:
            raise SystemExit(f"eval_seg: unknown benchmark '{k}' (choose from all, "
                             f"{', '.join(list(BENCHMARKS) + list(WORLD_BENCHMARKS))})")
    order = list(BENCHMARKS) + list(WORLD_BENCHMARKS)  # the paper's column order
    return sorted(names, key=order.index)


def main(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot segmentation evaluation "
                                "(TCL/TagAlign protocol, mmseg mIoU).")
    p.add_argument("--ckpt", help="checkpoint written by tagalign.py")
    p.add_argument("--clip", help="an OpenAI CLIP file (ViT-B-16.pt or a state dict): alone, score raw "
                   "CLIP (its ln_post + proj on the --dense reading); with --ckpt, the CLIP that a "
                   "paper-mode checkpoint was trained on (default: the path it recorded)")
    p.add_argument("--preds", help="folder of saved predictions <image id>.png (class index after "
                   "reduce_zero_label, a value past the last class = none; 16-bit PNGs for "
                   "imagenets300) to score instead of a model")
    p.add_argument("--benchmarks", help="comma-separated names or 'all' (the ten of the paper); "
                   "default: world-object,world-stuff,world-attr")
    p.add_argument("--data-root", help="folder holding the standard datasets in their mmseg layouts")
    p.add_argument("--out", help="folder for metrics.json and vis/ "
                   "(default: the checkpoint's folder, or out/)")
    p.add_argument("--scoring", choices=("preset", "tagalign"), default="preset",
                   help="preset: each benchmark's (world: softmax at the model's temperature, background "
                   "0.5); tagalign: sigmoid(10 cos - 2.5), background 0.4 everywhere")
    p.add_argument("--bg-thresh", type=float, help="constant background score (default 0.4; world: 0.5)")
    p.add_argument("--score", choices=("sigmoid", "softmax"),
                   help="class scores: sigmoid(10 cos - 2.5) (default) or softmax over classes (world)")
    p.add_argument("--score-scale", type=float, help="cosine multiplier of the score (default 10; "
                   "world: the model's learned logit scale)")
    p.add_argument("--clip-w", type=float, help="weight of raw CLIP's scores blended into a paper-mode "
                   "model's (default 0.3, TagAlign's; 0 = the decoder alone)")
    p.add_argument("--templates", choices=sorted(TEMPLATES), help="prompt set (default: simple)")
    p.add_argument("--pamr", action="store_true", help="refine crop scores with PAMR (10 iterations)")
    p.add_argument("--cosines", action="store_true", help="world benchmarks: also report each class's "
                   "mean prompt cosine on its patches and the margin over the best other class")
    p.add_argument("--n-vis", type=int, default=4, help="overlay images saved per benchmark")
    p.add_argument("--batch-size", type=int, default=16, help="crops per forward pass")
    p.add_argument("--limit", type=int, help="evaluate only the first N images of each benchmark")
    p.add_argument("--world-images", type=int, help="images per world benchmark (default: world.py's)")
    p.add_argument("--dense", choices=READINGS, help="how patch tokens are read out of the ViT: plain (its "
                   "outputs), maskclip (last block: each patch attends to itself) or surgery (CLIP "
                   "Surgery); default: the model's own (world: plain; paper mode: surgery)")
    p.add_argument("--norm", choices=("imagenet", "clip"), default="imagenet",
                   help="with --clip alone: the image normalisation raw CLIP gets (TCL's protocol: imagenet; "
                   "a checkpoint brings its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the model (default: cuda if available)")
    args = p.parse_args(argv)
    if (args.preds is None) == (args.ckpt is None and args.clip is None):
        raise SystemExit("eval_seg: give a model (--ckpt PATH and/or --clip PATH) or --preds DIR, not both")
    if args.batch_size < 1 or args.n_vis < 0 or (args.limit is not None and args.limit < 1):
        raise SystemExit("eval_seg: --batch-size and --limit must be >= 1, --n-vis >= 0")
    if args.clip_w is not None and not 0 <= args.clip_w <= 1:
        raise SystemExit("eval_seg: --clip-w must lie in [0, 1]")
    names = parse_names(args.benchmarks)
    if args.cosines and (args.preds is not None or any(k not in WORLD_BENCHMARKS for k in names)):
        raise SystemExit("eval_seg: --cosines needs a model and world benchmarks only")
    overrides = dict(TAGALIGN_SCORING) if args.scoring == "tagalign" else {}
    overrides |= {k: v for k, v in (("bg_thresh", args.bg_thresh), ("pamr", args.pamr or None),
                                   ("score", args.score), ("score_scale", args.score_scale),
                                   ("clip_w", args.clip_w),
                                   ("templates", TEMPLATES.get(args.templates))) if v is not None}
    model, extra = None, {"args": vars(args)}
    if args.ckpt is not None:
        if not Path(args.ckpt).is_file():
            raise SystemExit(f"eval_seg: --ckpt {args.ckpt}: no such file")
        model = load_model(args.ckpt, device=args.device, reading=args.dense, clip=args.clip)
    elif args.clip is not None:
        model = load_raw_clip(args.clip, args.device, args.dense, args.norm)
    elif not Path(args.preds).is_dir():
        raise SystemExit(f"eval_seg: --preds {args.preds}: no such folder")
    if model is not None:
        extra["config"] = model.config
        extra["world"] = getattr(model, "world_cfg", None)
    out = args.out or (str(Path(args.ckpt).parent) if args.ckpt else "out")
    return run_benchmarks(model, names, args.data_root, out, args.n_vis, args.batch_size, extra,
                          overrides, args.world_images, args.limit, args.preds, getattr(model, "world_cfg", None),
                          args.cosines)


if __name__ == "__main__":
    main()
