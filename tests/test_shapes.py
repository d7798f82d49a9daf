"""The shapes generator: both layouts, valid COCO annotations, determinism."""
import filecmp
import hashlib
import itertools
import json
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mmvit3.shapes import SEG_CLASSES, SHAPES, make_shapes_dataset
from mmvit3.testing import run_tool


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    return make_shapes_dataset(
        root, num_train=6, num_val=3, image_size=(64, 80), seed=3)


def _files(folder):
    return sorted(os.listdir(folder))


def test_both_layouts_hold_the_same_images(dataset):
    coco, ade = dataset['coco'], dataset['ade']
    assert _files(osp.join(coco, 'annotations')) == [
        'instances_train.json', 'instances_val.json'
    ]
    for split, ade_split, count in (('train', 'training', 6),
                                    ('val', 'validation', 3)):
        images = _files(osp.join(coco, split))
        assert len(images) == count and all(n.endswith('.jpg') for n in images)
        assert _files(osp.join(ade, 'images', ade_split)) == images
        assert _files(osp.join(ade, 'annotations', ade_split)) == [
            n.replace('.jpg', '.png') for n in images
        ]
        for name in images:
            assert filecmp.cmp(
                osp.join(coco, split, name),
                osp.join(ade, 'images', ade_split, name),
                shallow=False)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_coco_masks_agree_with_the_semantic_maps(dataset, split):
    ade_split = {'train': 'training', 'val': 'validation'}[split]
    coco = COCO(
        osp.join(dataset['coco'], 'annotations', f'instances_{split}.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    assert coco.getAnnIds(), 'no instances at all'
    for image in coco.loadImgs(coco.getImgIds()):
        assert Image.open(osp.join(dataset['coco'], split,
                                   image['file_name'])).size == (80, 64)
        assert (image['height'], image['width']) == (64, 80)
        seg = np.asarray(
            Image.open(
                osp.join(dataset['ade'], 'annotations', ade_split,
                         image['file_name'].replace('.jpg', '.png'))))
        # ADE convention: 0 unlabelled (unused here), 1 background, 2.. shapes
        assert seg.min() >= 1 and seg.max() <= len(SEG_CLASSES)
        expected = np.ones_like(seg)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image['id'])):
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann['area'] > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann['bbox']
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(),
                                            xs.max() + 1, ys.max() + 1)
            assert not (expected[mask] > 1).any(), 'instances overlap'
            expected[mask] = ann['category_id'] + 1
        np.testing.assert_array_equal(seg, expected)


def _digest(root):
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            digest.update(name.encode())
            with open(osp.join(folder, name), 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_same_arguments_same_files_and_splits_are_disjoint(
        dataset, tmp_path):
    again = make_shapes_dataset(
        str(tmp_path / 'again'), num_train=6, num_val=3, image_size=(64, 80),
        seed=3)
    assert _digest(again['coco']) == _digest(dataset['coco'])
    assert _digest(again['ade']) == _digest(dataset['ade'])
    other = make_shapes_dataset(
        str(tmp_path / 'other'), num_train=6, num_val=3, image_size=(64, 80),
        seed=4)
    assert _digest(other['coco']) != _digest(dataset['coco'])

    def pixels(split):
        folder = osp.join(dataset['coco'], split)
        return {
            np.asarray(Image.open(osp.join(folder, n))).tobytes()
            for n in _files(folder)
        }

    assert not pixels('train') & pixels('val')


def test_images_show_several_shapes_with_occlusion(tmp_path):
    roots = make_shapes_dataset(
        str(tmp_path), num_train=40, num_val=0, image_size=(96, 96), seed=0)
    with open(osp.join(roots['coco'], 'annotations',
                       'instances_train.json')) as f:
        annotations = json.load(f)['annotations']
    per_image = np.bincount([a['image_id'] for a in annotations])[1:]
    assert per_image.min() >= 1 and per_image.max() >= 3
    assert {a['category_id'] for a in annotations} == {1, 2, 3, 4}
    areas = [a['area'] for a in annotations]
    assert max(areas) > 4 * min(areas), 'no scale variety'
    # shapes whose boxes overlap by much: one hides part of the other
    by_image = {}
    for a in annotations:
        by_image.setdefault(a['image_id'], []).append(a['bbox'])
    assert max(
        _box_overlap(a, b) for boxes in by_image.values()
        for a, b in itertools.combinations(boxes, 2)) > 0.25


def _box_overlap(a, b) -> float:
    """Intersection of two xywh boxes over the smaller one's area."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0) / min(a[2] * a[3], b[2] * b[3])


def test_cli_writes_the_dataset(tmp_path):
    result = run_tool('tools/make_shapes.py', str(tmp_path / 'data'),
                      '--num-train', '2', '--num-val', '1', '--size', '48',
                      '64', '--seed', '5')
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / 'data' / 'coco') in result.stdout
    reference = make_shapes_dataset(
        str(tmp_path / 'reference'), num_train=2, num_val=1,
        image_size=(48, 64), seed=5)
    assert _digest(str(tmp_path / 'data' / 'ade')) == _digest(reference['ade'])
