"""Shared fixtures: a tiny generated dataset in the COCO and ADE20K layouts,
an ImageNet checkpoint in the published layout, and the ``--cfg-options``
that shrink the published configs onto them."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys
from typing import List

import pytest
import torch

from mmvit3.shapes import SEG_CLASSES, SHAPES, make_shapes_dataset
from mmvit3.testing import write_published_checkpoint

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# CUDA tests are reported as skipped, not passed, where no GPU is visible.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason='needs a GPU')
DEVICES = ['cpu', pytest.param('cuda', marks=requires_cuda)]


@pytest.fixture(scope='session')
def shapes_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    return make_shapes_dataset(
        root, num_train=2, num_val=2, image_size=(96, 128), seed=1)


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('pretrained') / 'hvit3_tiny.pth')
    write_published_checkpoint(path, 'tiny')
    return path


def backbone_outputs_and_grads(model, image) -> List[torch.Tensor]:
    """A backbone's outputs, then its parameters' gradients of a fixed
    weighted sum of them."""
    model.zero_grad(set_to_none=True)
    outs = model(image)
    sum((out * torch.linspace(
        -1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
         ).sum() for out in outs).backward()
    return [o.detach() for o in outs] + [
        p.grad.clone() for p in model.parameters()
    ]


def _tuple(names) -> str:
    return '(' + ','.join(names) + ')'


def _loader_options(root: str, loaders) -> List[str]:
    """Each loader reads ``root`` in the main process (quick to start)."""
    options = []
    for loader in loaders:
        options += [
            f'{loader}.dataset.data_root={root}',
            f'{loader}.num_workers=0',
            f'{loader}.persistent_workers=False',
        ]
    return options


def det_options(coco_root: str, checkpoint: str, eval_loader: str) -> List[str]:
    """Shrink a Mask R-CNN ms-crop config onto the shapes data (CPU, fp32)."""
    classes = _tuple(SHAPES)
    evaluator = eval_loader.replace('dataloader', 'evaluator')
    small = '[(128,96)]'
    loaders = ('train_dataloader', eval_loader)
    return _loader_options(f'{coco_root}/', loaders) + [
        f'model.backbone.init_cfg.checkpoint={checkpoint}',
        'model.roi_head.bbox_head.num_classes=4',
        'model.roi_head.mask_head.num_classes=4',
        'optim_wrapper.type=OptimWrapper',
        f'train_dataloader.dataset.metainfo.classes={classes}',
        'train_dataloader.dataset.ann_file=annotations/instances_train.json',
        'train_dataloader.dataset.data_prefix.img=train/',
        'train_dataloader.batch_size=2',
        f'train_dataloader.dataset.pipeline.3.transforms.0.0.scales={small}',
        f'train_dataloader.dataset.pipeline.3.transforms.1.0.scales={small}',
        'train_dataloader.dataset.pipeline.3.transforms.1.1.crop_size=(64,64)',
        f'train_dataloader.dataset.pipeline.3.transforms.1.2.scales={small}',
        f'{eval_loader}.dataset.metainfo.classes={classes}',
        f'{eval_loader}.dataset.ann_file=annotations/instances_val.json',
        f'{eval_loader}.dataset.data_prefix.img=val/',
        f'{eval_loader}.dataset.pipeline.1.scale=(128,96)',
        f'{evaluator}.ann_file={coco_root}/annotations/instances_val.json',
        'train_cfg.max_epochs=1',
        'default_hooks.logger.interval=1',
    ]


def seg_options(ade_root: str, checkpoint: str, eval_loader: str) -> List[str]:
    """Shrink an UperNet ADE20K config onto the shapes data (CPU, fp32)."""
    classes = _tuple(SEG_CLASSES)
    loaders = ('train_dataloader', eval_loader)
    options = _loader_options(ade_root, loaders) + [
        f'model.backbone.init_cfg.checkpoint={checkpoint}',
        f'model.decode_head.num_classes={len(SEG_CLASSES)}',
        f'model.auxiliary_head.num_classes={len(SEG_CLASSES)}',
        'model.data_preprocessor.size=(64,64)',
        'optim_wrapper.type=OptimWrapper',
        'train_dataloader.batch_size=2',
        'train_dataloader.dataset.pipeline.2.scale=(128,64)',
        'train_dataloader.dataset.pipeline.3.crop_size=(64,64)',
        f'{eval_loader}.dataset.pipeline.1.scale=(128,64)',
        'train_cfg.max_iters=1',
        'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1',
    ]
    # the shapes classes are not ADE's 150, so the generic dataset class
    for loader in loaders:
        options += [
            f'{loader}.dataset.type=BaseSegDataset',
            f'{loader}.dataset.reduce_zero_label=True',
            f'{loader}.dataset.metainfo.classes={classes}',
        ]
    return options


def load_tool(name: str, folder: str = 'tools'):
    """``FOLDER/NAME.py`` as a module (tools/ and benchmarks/ are not
    packages)."""
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, folder, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python tools/...`` as a user would; output captured as text."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, *args],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=timeout)


QUICKSTART_DET = 'configs/quickstart/mask-rcnn_hvit3-t_fpn_shapes.py'
QUICKSTART_SEG = 'configs/quickstart/hvit3-t_upernet_shapes.py'


def quickstart_det_options(coco_root: str) -> List[str]:
    """Point the quick-start detector at tiny test data (2 images)."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return _loader_options(f'{coco_root}/', loaders) + [
        'train_dataloader.batch_size=2',
        f'val_evaluator.ann_file={coco_root}/annotations/instances_val.json',
        f'test_evaluator.ann_file={coco_root}/annotations/instances_val.json',
        'default_hooks.logger.interval=1',
    ]


def quickstart_seg_options(ade_root: str, max_iters: int) -> List[str]:
    """Point the quick-start segmentor at tiny test data."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return _loader_options(ade_root, loaders) + [
        'train_dataloader.batch_size=2',
        f'train_cfg.max_iters={max_iters}',
        f'train_cfg.val_interval={max_iters}',
        'default_hooks.logger.interval=1',
    ]
