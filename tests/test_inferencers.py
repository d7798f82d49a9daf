"""mmdet's and mmseg's inferencers, and tools/demo.py, on quick-start
configs and checkpoints written by tools/train.py."""
import glob
import os.path as osp
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from mmvit3.shapes import SEG_CLASSES, SHAPES
from mmvit3.testing import (QUICKSTART_DET, QUICKSTART_SEG, REPO, load_tool,
                            quickstart_det_options, quickstart_seg_options,
                            run_tool)


def _train_one_iteration(config, options, work_dir):
    result = run_tool('tools/train.py', config, '--work-dir', work_dir,
                      '--cfg-options', *options)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


@pytest.fixture(scope='module')
def det_checkpoint(shapes_data, tmp_path_factory):
    return _train_one_iteration(
        QUICKSTART_DET,
        quickstart_det_options(shapes_data['coco']) +
        ['train_cfg.max_epochs=1'], str(tmp_path_factory.mktemp('det')))


@pytest.fixture(scope='module')
def seg_checkpoint(shapes_data, tmp_path_factory):
    return _train_one_iteration(QUICKSTART_SEG,
                                quickstart_seg_options(shapes_data['ade'], 1),
                                str(tmp_path_factory.mktemp('seg')))


def _val_image(shapes_data):
    return sorted(glob.glob(osp.join(shapes_data['coco'], 'val', '*.jpg')))[0]


@pytest.mark.slow
def test_det_inferencer(shapes_data, det_checkpoint, tmp_path):
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(
        QUICKSTART_DET, det_checkpoint, device='cpu', show_progress=False)
    assert inferencer.model.dataset_meta['classes'] == SHAPES
    image = _val_image(shapes_data)
    result = inferencer(image, out_dir=str(tmp_path), pred_score_thr=0.0)
    prediction = result['predictions'][0]
    assert len(prediction['labels']) == len(prediction['bboxes']) == len(
        prediction['masks'])
    assert all(0 <= label < len(SHAPES) for label in prediction['labels'])
    painted = tmp_path / 'vis' / osp.basename(image)
    assert Image.open(painted).size == Image.open(image).size


@pytest.mark.slow
def test_seg_inferencer(shapes_data, seg_checkpoint, tmp_path):
    from mmseg.apis import MMSegInferencer
    inferencer = MMSegInferencer(QUICKSTART_SEG, seg_checkpoint, device='cpu')
    assert tuple(inferencer.model.dataset_meta['classes']) == SEG_CLASSES
    image = _val_image(shapes_data)
    result = inferencer(image, out_dir=str(tmp_path))
    labels = np.asarray(result['predictions'])
    width, height = Image.open(image).size
    assert labels.shape == (height, width)
    assert labels.min() >= 0 and labels.max() < len(SEG_CLASSES)
    painted = tmp_path / 'vis' / osp.basename(image)
    assert Image.open(painted).size == (width, height)


@pytest.mark.slow
@pytest.mark.parametrize('task', ['det', 'seg'])
def test_demo_script_writes_a_picture(shapes_data, task, tmp_path, request,
                                      monkeypatch, capsys):
    config = {'det': QUICKSTART_DET, 'seg': QUICKSTART_SEG}[task]
    checkpoint = request.getfixturevalue(f'{task}_checkpoint')
    image = _val_image(shapes_data)
    # in this process: the script's own imports would cost more than its run
    monkeypatch.setattr(sys, 'argv', [
        'demo.py', image, config, checkpoint, '--out-dir', str(tmp_path)
    ])
    runpy.run_path(osp.join(REPO, 'tools', 'demo.py'), run_name='__main__')
    painted = capsys.readouterr().out.strip().splitlines()[-1]
    assert painted == str(tmp_path / 'vis' / osp.basename(image))
    assert Image.open(painted).size == Image.open(image).size


@pytest.mark.slow
def test_demo_summary_picture(shapes_data, det_checkpoint, seg_checkpoint,
                              tmp_path, capsys):
    """make demo's closing picture: a header, then a row per val image of
    enlarged detection and segmentation panels, ground truth and
    prediction."""
    tool = load_tool('demo_summary')
    out = str(tmp_path / 'summary.png')
    data_root = osp.dirname(shapes_data['coco'])
    assert tool.main([
        '--det', QUICKSTART_DET, det_checkpoint, '--seg', QUICKSTART_SEG,
        seg_checkpoint, '--data-root', data_root, '--num-images', '2',
        '--scale', '3', '--out', out
    ]) == out
    assert capsys.readouterr().out.strip().endswith(out)
    width, height = Image.open(out).size
    image_height, image_width = np.asarray(
        Image.open(_val_image(shapes_data))).shape[:2]
    # two rows of four panels, each three times the image
    assert width == 4 * 3 * image_width
    assert height == tool.HEADER_HEIGHT + 2 * 3 * image_height
