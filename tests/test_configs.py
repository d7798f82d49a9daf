"""The published-recipe configs load, build, and say what the spec says."""
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmvit3.models.hvit3 import RELEASES
from mmvit3.testing import REPO

CONFIGS = osp.join(REPO, 'configs')
VARIANTS = {'t': 'tiny', 's': 'small', 'b': 'base'}
DET_PARAMS_M = {'t': 48.4, 's': 74.0, 'b': 114.0}
SEG_PARAMS_M = {'t': 58.68, 's': 84.34, 'b': 125.48}  # with auxiliary head
DET_DROP_PATH = {
    '1x': {'t': 0.1, 's': 0.1, 'b': 0.1},
    'ms-crop-3x': {'t': 0.3, 's': 0.4, 'b': 0.6}
}
SEG_DROP_PATH = {'t': 0.2, 's': 0.4, 'b': 0.5}
CHANNELS = {
    'tiny': [64, 128, 320, 512],
    'small': [64, 128, 320, 512],
    'base': [96, 192, 448, 640]
}


def det_config(variant, schedule):
    return osp.join(CONFIGS, 'mask_rcnn',
                    f'mask-rcnn_hvit3-{variant}_fpn_{schedule}_coco.py')


def seg_config(variant):
    return osp.join(CONFIGS, 'upernet',
                    f'hvit3-{variant}_upernet_8xb2-160k_ade20k-512x512.py')


def build(cfg):
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


def params_m(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


def collect_types(node, found):
    if isinstance(node, dict):
        if 'type' in node:
            found.append(node)
        for value in node.values():
            collect_types(value, found)
    elif isinstance(node, (list, tuple)):
        for value in node:
            collect_types(value, found)
    return found


def check_backbone(cfg, arch, drop_path):
    backbone = cfg.model.backbone
    assert backbone.type == 'HViT3' and backbone.arch == arch
    assert backbone.drop_path_rate == drop_path
    assert backbone.out_indices == (0, 1, 2, 3)
    # the authors' release of the ImageNet file, as timm's pretrained cfg
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=RELEASES[f'hvit3_{arch}.in1k'])
    assert cfg.custom_imports.imports == ['mmvit3']


@pytest.mark.parametrize('schedule', ['1x', 'ms-crop-3x'])
@pytest.mark.parametrize('variant', ['t', 's', 'b'])
def test_mask_rcnn_config(variant, schedule):
    cfg = Config.fromfile(det_config(variant, schedule))
    arch = VARIANTS[variant]
    check_backbone(cfg, arch, DET_DROP_PATH[schedule][variant])
    assert cfg.model.neck.in_channels == CHANNELS[arch]
    optim = cfg.optim_wrapper
    assert optim.type == 'AmpOptimWrapper'
    assert optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == 2e-4
    assert optim.optimizer.weight_decay == 0.05
    # 8 GPUs x 2 images = 16, the batch auto_scale_lr refers to
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    epochs = 12 if schedule == '1x' else 36
    assert cfg.train_cfg.max_epochs == epochs
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert steps[0].milestones == ([8, 11] if epochs == 12 else [27, 33])
    # multi-scale 480-800 with the DETR-style crop branch
    (choice, ) = [
        t for t in cfg.train_dataloader.dataset.pipeline
        if t.type == 'RandomChoice'
    ]
    short_sides = [s[0] for s in choice.transforms[0][0].scales]
    assert min(short_sides) == 480 and max(short_sides) == 800
    crops = [t for t in collect_types(choice.transforms[1], [])
             if t['type'] == 'RandomCrop']
    assert crops and crops[0]['crop_size'] == (384, 600)
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    model = build(cfg)
    assert round(params_m(model), 1) == DET_PARAMS_M[variant]


@pytest.mark.parametrize('variant', ['t', 's', 'b'])
def test_upernet_config(variant):
    cfg = Config.fromfile(seg_config(variant))
    arch = VARIANTS[variant]
    check_backbone(cfg, arch, SEG_DROP_PATH[variant])
    assert cfg.model.decode_head.in_channels == CHANNELS[arch]
    assert cfg.model.auxiliary_head.in_channels == CHANNELS[arch][2]
    assert cfg.model.decode_head.num_classes == 150
    optim = cfg.optim_wrapper
    assert optim.type == 'AmpOptimWrapper'
    assert optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == 6e-5
    assert optim.optimizer.weight_decay == 0.01
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ('LinearLR', 1500,
                                                          False)
    assert (poly.type, poly.begin, poly.end) == ('PolyLR', 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.crop_size == (512, 512)
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.train_dataloader.dataset.data_root == (
        'data/ade/ADEChallengeData2016')
    model = build(cfg)
    assert round(params_m(model), 2) == SEG_PARAMS_M[variant]


def test_published_no_aux_params_of_upernet():
    model = build(Config.fromfile(seg_config('t')))
    no_aux = params_m(model) - params_m(model.auxiliary_head)
    assert round(no_aux, 1) == 57.9
