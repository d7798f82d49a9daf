"""A deterministic synthetic dataset of shapes in the COCO and ADE20K layouts.

Each image has a textured background and a few shapes (circle, square,
triangle, star) of varied size and colour, each class with its own family of
surface textures, that may occlude each other; the annotations describe the
visible parts only. A shape never hides more than half of an earlier one, so
that every annotated instance still shows what it is. The same images are
written in the two layouts the real datasets use:

- ``coco/{train,val}/*.jpg`` and ``coco/annotations/instances_{train,val}.json``
  (instance masks as compressed RLE, boxes in xywh);
- ``ade/images/{training,validation}/*.jpg`` and
  ``ade/annotations/{training,validation}/*.png`` (ADE convention: 0 is
  "unlabelled", class i is stored as i + 1, read with reduce_zero_label).

Every image is drawn from its own seed derived from (seed, split, index), so
the output depends only on the arguments, and train and val never share one.
"""
import json
import math
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'star')
SEG_CLASSES = ('background', ) + SHAPES
SPLITS = {'train': 'training', 'val': 'validation'}
MIN_VISIBLE_PIXELS = 30
MAX_OCCLUDED_FRACTION = 0.5
PLACEMENT_TRIES = 20


def _polygon(kind: str, cx: float, cy: float, radius: float,
             angle: float) -> List[Tuple[float, float]]:
    if kind == 'circle':
        count, radii = 48, [radius]
    elif kind == 'square':
        count, radii = 4, [radius]
    elif kind == 'triangle':
        count, radii = 3, [radius]
    else:  # five-pointed star
        count, radii = 10, [radius, radius * 0.45]
    return [(cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / count),
             cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / count))
            for i in range(count)]


def _background(rng: np.random.Generator, height: int,
                width: int) -> np.ndarray:
    """Gradient + stripes + noise, in muted colours."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 170, size=3)
    direction = rng.uniform(0, 2 * math.pi)
    gradient = (xs * math.cos(direction) + ys * math.sin(direction)) / max(
        height, width)
    freq = rng.uniform(0.1, 0.5)
    stripes = np.sin(freq * (xs * math.sin(direction) - ys * math.cos(direction)))
    image = (base[None, None] + 40 * gradient[..., None] +
             rng.uniform(5, 20) * stripes[..., None] +
             rng.normal(0, 8, size=(height, width, 3)))
    return np.clip(image, 0, 255)


def _shape_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour: shapes stand out from the muted background by
    colour as well as by outline."""
    hue = rng.uniform(0, 6)
    channels = np.clip(np.abs((hue - np.array([3.0, 1.0, 5.0])) % 6 - 3) - 1,
                       0, 1)
    return 40 + 215 * channels * rng.uniform(0.7, 1.0)


def _surface(kind: str, rng: np.random.Generator, cx: float, cy: float,
             height: int, width: int) -> np.ndarray:
    """The (H, W, 1) surface pattern of a shape, around its colour.

    Each class has its own family of patterns (period, orientation and
    contrast are random), as real categories have their own surfaces:
    circles rings, squares checks, triangles spots, stars speckle. None of
    them is the background's straight stripes.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
    v = (ys - cy) * math.cos(angle) - (xs - cx) * math.sin(angle)
    freq = 2 * math.pi / rng.uniform(4, 7)  # a period of 4 to 7 pixels
    if kind == 'circle':
        pattern = np.sin(freq * np.hypot(u, v))
    elif kind == 'square':
        pattern = np.sign(np.sin(freq * u) * np.sin(freq * v))
    elif kind == 'triangle':
        pattern = (np.cos(freq * u) * np.cos(freq * v) > 0.5) * 2.0 - 1
    else:
        pattern = rng.choice([-1.0, 1.0], size=(height, width))
    amplitude = rng.uniform(20, 40)
    return (amplitude * pattern + rng.normal(0, 6, size=(height, width)))[
        ..., None]


def render_image(seed: int, height: int, width: int,
                 max_shapes: int = 3) -> Tuple[np.ndarray, List[dict]]:
    """One image and its visible instances ``{'label', 'mask'}``."""
    rng = np.random.default_rng(seed)
    image = _background(rng, height, width)
    num_shapes = int(rng.integers(1, max_shapes + 1))
    side = min(height, width)
    instances = []
    for _ in range(num_shapes):
        label = int(rng.integers(len(SHAPES)))
        radius = rng.uniform(0.15, 0.35) * side
        # retry placements that would hide too much of an earlier shape
        for _ in range(PLACEMENT_TRIES):
            cx = rng.uniform(0.5 * radius, width - 0.5 * radius)
            cy = rng.uniform(0.5 * radius, height - 0.5 * radius)
            canvas = Image.new('L', (width, height), 0)
            ImageDraw.Draw(canvas).polygon(
                _polygon(SHAPES[label], cx, cy, radius,
                         rng.uniform(0, 2 * math.pi)),
                fill=1)
            mask = np.asarray(canvas, dtype=bool)
            if all((earlier['mask'] & ~mask).sum() >=
                   (1 - MAX_OCCLUDED_FRACTION) * earlier['area']
                   for earlier in instances):
                break
        else:
            continue
        texture = _surface(SHAPES[label], rng, cx, cy, height, width)
        image[mask] = np.clip(_shape_colour(rng) + texture[mask], 0, 255)
        for earlier in instances:  # the new shape occludes earlier ones
            earlier['mask'] &= ~mask
        instances.append({'label': label, 'mask': mask, 'area': mask.sum()})
    visible = [{'label': i['label'], 'mask': i['mask']} for i in instances
               if i['mask'].sum() >= MIN_VISIBLE_PIXELS]
    return image.astype(np.uint8), visible


def _coco_annotation(instance: dict, ann_id: int, image_id: int) -> dict:
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(instance['mask'].astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=instance['label'] + 1,
        segmentation=rle,
        area=float(mask_utils.area(rle)),
        bbox=[x, y, w, h],
        iscrowd=0)


def _semantic_map(instances: Sequence[dict], height: int,
                  width: int) -> np.ndarray:
    """ADE convention: background class 0 -> 1, shape i -> i + 2."""
    seg = np.ones((height, width), dtype=np.uint8)
    for instance in instances:
        seg[instance['mask']] = instance['label'] + 2
    return seg


def make_shapes_dataset(out_dir: str,
                        num_train: int = 200,
                        num_val: int = 50,
                        image_size: Tuple[int, int] = (128, 128),
                        seed: int = 0,
                        max_shapes: int = 3) -> Dict[str, str]:
    """Write the dataset; return the COCO and ADE roots."""
    height, width = image_size
    coco_root = osp.join(out_dir, 'coco')
    ade_root = osp.join(out_dir, 'ade')
    os.makedirs(osp.join(coco_root, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(SHAPES)]
    for split, count in (('train', num_train), ('val', num_val)):
        ade_split = SPLITS[split]
        for folder in (osp.join(coco_root, split),
                       osp.join(ade_root, 'images', ade_split),
                       osp.join(ade_root, 'annotations', ade_split)):
            os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            # a distinct stream per (seed, split, index): splits are disjoint
            image_seed = np.random.SeedSequence(
                [seed, list(SPLITS).index(split), index]).generate_state(1)[0]
            image, instances = render_image(
                int(image_seed), height, width, max_shapes)
            name = f'{split}_{index:06d}'
            Image.fromarray(image).save(
                osp.join(coco_root, split, name + '.jpg'), quality=95)
            Image.fromarray(image).save(
                osp.join(ade_root, 'images', ade_split, name + '.jpg'),
                quality=95)
            Image.fromarray(_semantic_map(instances, height, width)).save(
                osp.join(ade_root, 'annotations', ade_split, name + '.png'))
            image_id = index + 1
            images.append(
                dict(id=image_id, file_name=name + '.jpg', height=height,
                     width=width))
            for instance in instances:
                annotations.append(
                    _coco_annotation(instance, len(annotations) + 1, image_id))
        with open(osp.join(coco_root, 'annotations',
                           f'instances_{split}.json'), 'w') as f:
            json.dump(
                dict(images=images, annotations=annotations,
                     categories=categories), f)
    return {'coco': coco_root, 'ade': ade_root}
