"""H-ViT3 in other OpenMMLab models: each extra config, and shipped mmdet /
mmseg configs with only the backbone swapped, builds, loads an ImageNet file
in the published layout, and takes one training step on generated data
through its own train pipeline (scales shrunk to fit a CPU)."""
import copy
import importlib
import os.path as osp
import warnings

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.hub import get_config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import mmvit3  # noqa: F401  (registers HViT3)
from mmvit3.shapes import SHAPES, make_shapes_dataset
from mmvit3.testing import REPO, write_published_checkpoint

SMALL_SCALE = (96, 64)
SMALL_CROP = (64, 64)

# config -> overrides that shrink what the scales alone do not
EXTRA_CONFIGS = {
    'retinanet/retinanet_hvit3-t_fpn_1x_coco.py': {},
    # 3 x 512 sampled RoIs through 4-conv box heads would dominate a CPU step
    'cascade_rcnn/cascade-mask-rcnn_hvit3-t_fpn_4conv1fc-giou_amp-ms-crop-'
    '3x_coco.py': {
        'model.train_cfg.rpn_proposal.max_per_img': 100,
        **{f'model.train_cfg.rcnn.{i}.sampler.num': 32
           for i in range(3)},
    },
    # two-stage DINO picks its queries among the encoder's ~130 tokens here
    'dino/dino-4scale_hvit3-t_8xb2-12e_coco.py': {
        'model.num_queries': 50,
        'model.dn_cfg.group_cfg.num_dn_queries': 10,
    },
    'sem_fpn/fpn_hvit3-t_8xb4-40k_ade20k-512x512.py': {
        'model.data_preprocessor.size': SMALL_CROP,
    },
    'segformer/segformer_hvit3-t_8xb2-160k_ade20k-512x512.py': {
        'model.data_preprocessor.size': SMALL_CROP,
    },
}


@pytest.fixture(scope='module')
def data_roots(tmp_path_factory):
    return make_shapes_dataset(
        str(tmp_path_factory.mktemp('shapes')),
        num_train=2,
        num_val=1,
        image_size=SMALL_SCALE[::-1],
        seed=3)


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('pretrained') / 'hvit3_tiny.pth')
    return path, write_published_checkpoint(path, 'tiny', with_ema=False)


def shrink(transform):
    """The same pipeline with every resize and crop made small."""
    if isinstance(transform, list):
        return [shrink(t) for t in transform]
    if not isinstance(transform, dict):
        return transform
    small = {key: shrink(value) for key, value in transform.items()}
    if 'scale' in small:
        small['scale'] = SMALL_SCALE
    if 'scales' in small:
        small['scales'] = [SMALL_SCALE]
    if 'crop_size' in small:
        small['crop_size'] = SMALL_CROP
    return small


def train_dataset_cfg(cfg: Config, roots: dict) -> dict:
    dataset = cfg.train_dataloader.dataset
    while 'dataset' in dataset:  # RepeatDataset and other wrappers
        dataset = dataset.dataset
    dataset = copy.deepcopy(dataset)
    dataset.pipeline = shrink(dataset.pipeline)
    if cfg.default_scope == 'mmdet':
        dataset.update(
            data_root=roots['coco'],
            ann_file='annotations/instances_train.json',
            data_prefix=dict(img='train/'),
            metainfo=dict(classes=SHAPES))
    else:
        dataset.data_root = roots['ade']
    return dataset


def train_one_step(cfg: Config, roots: dict, states: dict):
    """Build ``cfg.model``, initialise it (the ImageNet file must reach the
    backbone), and take one training step on two generated images."""
    scope = cfg.default_scope
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry')

    model = registry.MODELS.build(cfg.model)
    model.init_weights()
    model = revert_sync_batchnorm(model)  # one CPU process, no SyncBN
    key = 'layers.2.blocks.1.attn.qkv.weight'
    assert torch.equal(model.backbone.state_dict()[key], states['model'][key])

    dataset = registry.DATASETS.build(train_dataset_cfg(cfg, roots))
    batch = pseudo_collate([dataset[0], dataset[1]])
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    optim_cfg.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU
    optim_wrapper = build_optim_wrapper(model, optim_cfg)

    inner_weight = model.backbone.layers[0].blocks[0].attn.w1
    before = inner_weight.detach().clone()
    model.train()
    losses = model.train_step(batch, optim_wrapper)
    assert losses and all(torch.isfinite(v).all() for v in losses.values())
    assert losses['loss'] > 0
    # the step reached the first stage's TTT inner weights
    assert not torch.equal(inner_weight.detach(), before)


@pytest.mark.slow
@pytest.mark.parametrize('config', sorted(EXTRA_CONFIGS))
def test_config_builds_loads_and_trains_one_step(config, data_roots,
                                                 published):
    checkpoint, states = published
    cfg = Config.fromfile(osp.join(REPO, 'configs', config))
    assert cfg.custom_imports == dict(
        imports=['mmvit3'], allow_failed_imports=False)
    assert cfg.model.backbone.type == 'HViT3'
    cfg.model.backbone.init_cfg.checkpoint = checkpoint
    cfg.merge_from_dict(EXTRA_CONFIGS[config])
    train_one_step(cfg, data_roots, states)


def hvit3_backbone(**kwargs) -> dict:
    return dict(type='HViT3', arch='tiny', out_indices=(0, 1, 2, 3),
                **kwargs)


@pytest.mark.slow
def test_shipped_mmseg_resnet_config_with_the_backbone_swapped(
        data_roots, published):
    """DeepLabV3+ as mmseg ships it, whose model-level ``pretrained`` mmseg
    hands to the backbone (the deprecated convention mmseg's own backbones
    accept): only the backbone and the heads' channels changed."""
    checkpoint, states = published
    cfg = get_config(
        'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-80k_ade20k-512x512.py')
    cfg.model.backbone = hvit3_backbone()
    cfg.model.pretrained = checkpoint
    cfg.model.decode_head.update(in_channels=512, c1_in_channels=64)
    cfg.model.auxiliary_head.in_channels = 320
    cfg.model.data_preprocessor.size = SMALL_CROP
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train_one_step(cfg, data_roots, states)
    assert any('pretrained is deprecated' in str(w.message) for w in caught)


@pytest.mark.slow
def test_shipped_mmdet_resnet_config_with_the_backbone_swapped(
        data_roots, published):
    """Faster R-CNN as mmdet ships it: only the backbone and the neck's
    channels changed."""
    checkpoint, states = published
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone = hvit3_backbone(
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    cfg.model.neck.in_channels = [64, 128, 320, 512]
    train_one_step(cfg, data_roots, states)
