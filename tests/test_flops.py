"""tools/get_flops.py: mmengine's FLOP count, TTT inner step included."""
import os.path as osp

import pytest
import torch
from mmengine.analysis import FlopAnalyzer

from mmvit3.models import HViT3Backbone as HViT3
from mmvit3.testing import REPO, load_tool

HEAD_DIM = 32


def inner_step_flops(dims, depths, height, width):
    """Per TTT layer on N tokens of C channels (one multiply-add = 1 FLOP):
    SwiGLU branch 6 N C d (k w1, k w2, the two gradients, q w1', q w2');
    depthwise branch 2 * 9 N d (its kernel gradient and its convolution)."""
    total = 0
    height, width = -(-height // 4), -(-width // 4)
    for stage, (dim, depth) in enumerate(zip(dims, depths)):
        if stage:
            height, width = -(-height // 2), -(-width // 2)
        tokens = height * width
        total += depth * tokens * HEAD_DIM * (6 * dim + 18)
    return total


def test_inner_step_is_counted_on_the_default_fast_path():
    arch = dict(dims=(64, 128), depths=(1, 2))
    model = HViT3(arch, out_indices=(0, 1)).eval()
    image = torch.randn(1, 3, 72, 104)
    analyzer = FlopAnalyzer(model, (image, ))
    analyzer.unsupported_ops_warnings(False)
    by_module = analyzer.by_module()
    inner = sum(
        by_module[name] - by_module[f'{name}.qkv'] - by_module[f'{name}.proj']
        for name, module in model.named_modules()
        if type(module).__name__ == 'TTT')
    assert inner == inner_step_flops(arch['dims'], arch['depths'], 72, 104)


ARCHS = {
    't': dict(dims=(64, 128, 320, 512), depths=(1, 3, 9, 4)),
    's': dict(dims=(64, 128, 320, 512), depths=(2, 6, 18, 8)),
    'b': dict(dims=(96, 192, 448, 640), depths=(2, 6, 18, 8)),
}


@pytest.mark.slow
@pytest.mark.parametrize('config,published_gflops,published_params', [
    ('mask_rcnn/mask-rcnn_hvit3-t_fpn_1x_coco.py', 271, 48.4),
    ('mask_rcnn/mask-rcnn_hvit3-s_fpn_1x_coco.py', 349, 74.0),
    ('mask_rcnn/mask-rcnn_hvit3-b_fpn_1x_coco.py', 510, 114),
    ('upernet/hvit3-t_upernet_8xb2-160k_ade20k-512x512.py', 946, 57.9),
    # UperNet-S/-B (1026 / 1195 G) add only backbone FLOPs to this one, at
    # about 50 s each; tools/get_flops.py reproduces them (BENCHMARKS.md).
])
def test_reproduces_published_figures(config, published_gflops,
                                      published_params):
    """Published: 1280 x 800 (Mask R-CNN), 512 x 2048 (UperNet); params
    rounded as published (0.1 M; 1 M above 100 M)."""
    from mmengine.config import Config
    tool = load_tool('get_flops')
    result = tool.complexity(Config.fromfile(osp.join(REPO, 'configs',
                                                      config)))
    assert result['flops'] / 1e9 == pytest.approx(published_gflops, rel=0.02)
    rounding = 0.5 if published_params > 100 else 0.05
    assert abs(result['params'] / 1e6 - published_params) <= rounding
    arch = ARCHS[config.split('hvit3-')[1][0]]
    assert result['ttt_inner_flops'] == inner_step_flops(
        arch['dims'], arch['depths'], *result['shape'])
