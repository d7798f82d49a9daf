"""The authors' trained Mask R-CNN and UperNet checkpoints evaluate in the
matching mmvit3 configs as released.

Their files are mmengine checkpoints written by their mmdet 3.3 / mmseg
1.2.2 setup: ``meta``, ``state_dict`` (``backbone.*`` with the fixed-size
RoPE tables ``layers.i.blocks.j.attn.rope.rotations`` of their backbone),
``message_hub`` and ``optimizer``. Here such a file is written from a model
built with an mmvit3 config, with the tables added, and loaded back through
``init_detector`` / ``init_model``, the inferencers and ``tools/test.py``:
no key report, the same predictions.
"""
import copy
import glob
import os.path as osp
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from mmdet.apis import DetInferencer, inference_detector, init_detector
from mmengine.logging import MessageHub
from mmengine.runner import load_checkpoint
from mmseg.apis import MMSegInferencer, inference_model, init_model

from mmvit3 import cli
from mmvit3.shapes import SEG_CLASSES, SHAPES
from mmvit3.testing import det_options, run_tool, seg_options

DET_CONFIG = 'configs/mask_rcnn/mask-rcnn_hvit3-t_fpn_1x_coco.py'
SEG_CONFIG = 'configs/upernet/hvit3-t_upernet_8xb2-160k_ade20k-512x512.py'
KEY_REPORT = re.compile(r'missing keys in source state_dict|'
                        r'unexpected key in source state_dict')


def load_config(config: str, options: list):
    """The config as tools/test.py builds it from ``--cfg-options``."""
    return cli.load_config(
        cli.parse_test_args([config, 'unused.pth', '--cfg-options', *options]))


def rope_tables(backbone) -> dict:
    """The RoPE buffers the authors' backbone registers: one table per block
    for a 224 x 224 input, (56 / 2^i, 56 / 2^i, dim_i / 2, 2)."""
    tables = {}
    for i, (dim, depth) in enumerate(zip(backbone.dims, backbone.depths)):
        side = 56 // 2**i
        for j in range(depth):
            tables[f'backbone.layers.{i}.blocks.{j}.attn.rope.rotations'] = (
                torch.randn(side, side, dim // 2, 2))
    return tables


def write_authors_checkpoint(model, path: str, classes: tuple) -> dict:
    """An mmengine checkpoint as the authors' mmdet / mmseg runs write it
    (the optimizer state of the first few parameters only, to keep the
    file small); returns its state dict."""
    state_dict = dict(model.state_dict(), **rope_tables(model.backbone))
    parameters = [p for p in model.parameters()][:4]
    optimizer = torch.optim.AdamW(parameters, lr=2e-4)
    for p in parameters:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p in parameters:
        p.grad = None
    hub = MessageHub(f'authors-{id(model)}')
    hub.update_scalar('train/loss', 0.5)
    hub.update_info('eta', np.float64(0.0))
    torch.save({
        'meta': {'mmengine_version': '0.10.4', 'epoch': 12, 'iter': 87960,
                 'seed': 0, 'cfg': 'model = dict(...)',
                 'dataset_meta': {'classes': classes,
                                  'palette': [(220, 20, 60)] * len(classes)}},
        'state_dict': state_dict,
        'message_hub': hub.state_dict(),
        'optimizer': optimizer.state_dict(),
        'param_schedulers': [{'last_step': 87960}],
    }, path)
    return state_dict


def assert_no_key_report(text: str):
    assert not KEY_REPORT.search(text), KEY_REPORT.search(text).group(0)


@pytest.fixture(scope='module')
def detector(shapes_data, tmp_path_factory):
    """(config, the model that wrote the checkpoint, the checkpoint, image)"""
    cfg = load_config(DET_CONFIG, det_options(shapes_data['coco'], 'unused',
                                              'test_dataloader'))
    # random heads score every box alike: keep the best five, whatever
    # their score
    cfg.model.test_cfg.rcnn.update(score_thr=0.0, max_per_img=5)
    writer = init_detector(copy.deepcopy(cfg), device='cpu')
    path = str(tmp_path_factory.mktemp('authors') / 'mask_rcnn_t_1x.pth')
    write_authors_checkpoint(writer, path, tuple(SHAPES))
    image = sorted(glob.glob(osp.join(shapes_data['coco'], 'val', '*')))[0]
    return cfg, writer, path, image


@pytest.fixture(scope='module')
def segmentor(shapes_data, tmp_path_factory):
    cfg = load_config(SEG_CONFIG, seg_options(shapes_data['ade'], 'unused',
                                              'test_dataloader'))
    # inference_model reads test_pipeline, the inferencer the test loader's
    cfg.test_pipeline = cfg.test_dataloader.dataset.pipeline
    writer = init_model(copy.deepcopy(cfg), device='cpu')
    path = str(tmp_path_factory.mktemp('authors') / 'upernet_t_160k.pth')
    write_authors_checkpoint(writer, path, tuple(SEG_CLASSES))
    image = sorted(glob.glob(osp.join(shapes_data['ade'], 'images',
                                      'validation', '*')))[0]
    return cfg, writer, path, image


def assert_same_detections(got, expected):
    got, expected = got.pred_instances, expected.pred_instances
    assert len(expected) > 0
    for key in ('bboxes', 'scores', 'labels', 'masks'):
        torch.testing.assert_close(got[key], expected[key], msg=key)


def test_detector_loads_as_released(detector, capfd):
    cfg, writer, path, image = detector
    model = init_detector(copy.deepcopy(cfg), path, device='cpu')
    assert_no_key_report(''.join(capfd.readouterr()))
    assert model.dataset_meta['classes'] == tuple(SHAPES)  # from the file
    expected = inference_detector(writer, image)
    assert_same_detections(inference_detector(model, image), expected)

    inferencer = DetInferencer(model=copy.deepcopy(cfg), weights=path,
                               device='cpu', show_progress=False)
    result = inferencer(image, return_datasamples=True)
    assert_no_key_report(''.join(capfd.readouterr()))
    assert_same_detections(result['predictions'][0], expected)


def test_other_key_differences_are_still_reported(detector, tmp_path, capfd):
    backbone = detector[1].backbone
    state_dict = dict(backbone.state_dict(),
                      **{k[len('backbone.'):]: v
                         for k, v in rope_tables(backbone).items()})
    state_dict['layers.0.blocks.0.attn.extra'] = torch.zeros(1)
    del state_dict['layers.0.blocks.0.attn.w1']
    path = str(tmp_path / 'changed.pth')
    torch.save({'state_dict': state_dict}, path)
    capfd.readouterr()
    load_checkpoint(backbone, path, map_location='cpu')
    log = ''.join(capfd.readouterr())
    assert ('unexpected key in source state_dict: '
            'layers.0.blocks.0.attn.extra\n') in log
    assert ('missing keys in source state_dict: '
            'layers.0.blocks.0.attn.w1\n') in log


def test_segmentor_loads_as_released(segmentor, capfd):
    cfg, writer, path, image = segmentor
    model = init_model(copy.deepcopy(cfg), path, device='cpu')
    assert_no_key_report(''.join(capfd.readouterr()))
    expected = inference_model(writer, image).seg_logits.data
    torch.testing.assert_close(
        inference_model(model, image).seg_logits.data, expected)

    inferencer = MMSegInferencer(model=copy.deepcopy(cfg), weights=path,
                                 device='cpu')
    result = inferencer(image, return_datasamples=True)
    assert_no_key_report(''.join(capfd.readouterr()))
    torch.testing.assert_close(result.seg_logits.data, expected)


@pytest.mark.slow
def test_tools_test_evaluates_the_released_files(detector, segmentor,
                                                 shapes_data):
    """tools/test.py CONFIG CHECKPOINT, the detector's and the segmentor's
    side by side."""
    runs = {
        'segm_mAP_copypaste': (DET_CONFIG, detector[2],
                               det_options(shapes_data['coco'], 'unused',
                                           'test_dataloader')),
        'mIoU': (SEG_CONFIG, segmentor[2],
                 seg_options(shapes_data['ade'], 'unused', 'test_dataloader')),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {
            metric: pool.submit(run_tool, 'tools/test.py', config, path,
                                '--work-dir', path + '.work_dir',
                                '--cfg-options', *options)
            for metric, (config, path, options) in runs.items()
        }
    for metric, result in results.items():
        log = result.result().stdout + result.result().stderr
        assert result.result().returncode == 0, log[-5000:]
        assert metric in log
        assert_no_key_report(log)
