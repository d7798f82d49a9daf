"""tools/export_onnx.py: onnxruntime matches PyTorch, at any H and W."""
import os.path as osp

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

import mmvit3  # noqa: F401  (registers HViT3)
from mmvit3.models import HViT3Backbone
from mmvit3.testing import REPO, load_tool, write_published_checkpoint

ATOL, RTOL = 1e-4, 1e-3


def session(path: str):
    return onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])


def assert_parity(session, module, sizes):
    """Max |onnx - torch| over ``sizes``; fails beyond ATOL + RTOL|torch|."""
    worst = 0.
    generator = torch.Generator().manual_seed(0)
    for height, width in sizes:
        image = torch.randn(1, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = module(image)
        if isinstance(expected, torch.Tensor):
            expected = [expected]
        actual = session.run(None, {'image': image.numpy()})
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert a.shape == tuple(e.shape), (height, width)
            np.testing.assert_allclose(a, e.numpy(), rtol=RTOL, atol=ATOL)
            worst = max(worst, float(np.abs(a - e.numpy()).max()))
    return worst


def test_trace_size_takes_every_padding_branch():
    tool = load_tool('export_onnx')
    assert tool.trace_size(64, 3) == 65  # stem 65 -> 17, then 9, 5: all odd
    assert tool.trace_size(224, 3) == 225  # 57, 29, 15
    assert not tool.pads_at_every_step(64, 3)  # the stem does not pad
    assert not tool.pads_at_every_step(70, 3)  # 18: first downsample does not
    assert tool.pads_at_every_step(33, 3)  # 9, 5, 3


@pytest.mark.slow
def test_backbone_dynamic_hw_matches_pytorch(tmp_path, capsys):
    checkpoint = str(tmp_path / 'hvit3_tiny.pth')
    write_published_checkpoint(checkpoint, 'tiny', seed=5, with_ema=False)
    out = str(tmp_path / 'hvit3-t.onnx')
    tool = load_tool('export_onnx')
    assert tool.main([
        '--arch', 'tiny', '--checkpoint', checkpoint, '--out', out,
        '--shape', '64', '96'
    ]) == 0
    assert 'ok' in capsys.readouterr().out

    graph = onnx.load(out)
    onnx.checker.check_model(graph)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[:2]] == [1, 3]
    assert [d.dim_param for d in dims[2:]] == ['height', 'width']

    backbone = HViT3Backbone('tiny', drop_path_rate=0.)
    backbone.load_pretrained(checkpoint)
    # sides needing no padding, padding in the stem only, in some or in
    # every downsample, in one axis only
    sizes = [(64, 96), (96, 64), (70, 101), (33, 47), (128, 72), (65, 97)]
    worst = assert_parity(session(out), backbone.eval(), sizes)
    print(f'backbone: max |onnx - torch| = {worst:.2e}')


def build_segmentor(config: str):
    cfg = Config.fromfile(osp.join(REPO, 'configs', config))
    init_default_scope('mmseg')
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    return revert_sync_batchnorm(model).eval()


def export_segmentor(tmp_path, config, shape, static=False):
    model = build_segmentor(config)
    checkpoint = str(tmp_path / 'segmentor.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    out = str(tmp_path / 'segmentor.onnx')
    args = [
        '--config', osp.join(REPO, 'configs', config), '--checkpoint',
        checkpoint, '--whole', '--out', out, '--shape', *map(str, shape)
    ]
    if static:
        args.append('--static')
    assert load_tool('export_onnx').main(args) == 0
    return model, out


@pytest.mark.slow
def test_whole_segmentor_dynamic_hw(tmp_path):
    """SegFormer's MLP head keeps every size dynamic."""
    config = 'segformer/segformer_hvit3-t_8xb2-160k_ade20k-512x512.py'
    model, out = export_segmentor(tmp_path, config, (64, 64))
    tool = load_tool('export_onnx')
    scores = tool.SegmentorScores(model).eval()
    exported = session(out)
    worst = assert_parity(exported, scores, [(64, 64), (80, 48), (57, 71)])
    (logits, ) = exported.run(None, {'image': np.zeros((1, 3, 57, 71), 'f')})
    assert logits.shape == (1, 150, 57, 71)
    print(f'segformer head: max |onnx - torch| = {worst:.2e}')


@pytest.mark.slow
def test_whole_segmentor_static_when_head_fixes_sizes(tmp_path):
    """Semantic FPN's upsampling computes sizes in Python: one fixed size."""
    config = 'sem_fpn/fpn_hvit3-t_8xb4-40k_ade20k-512x512.py'
    model, out = export_segmentor(tmp_path, config, (64, 96), static=True)
    tool = load_tool('export_onnx')
    worst = assert_parity(
        session(out), tool.SegmentorScores(model).eval(), [(64, 96)])
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 64, 96]
    print(f'semantic FPN (static): max |onnx - torch| = {worst:.2e}')


def test_whole_detector_is_refused():
    tool = load_tool('export_onnx')
    config = osp.join(REPO, 'configs', 'retinanet',
                      'retinanet_hvit3-t_fpn_1x_coco.py')
    with pytest.raises(SystemExit, match='segmentors only'):
        tool.main(['--config', config, '--whole', '--out', 'unused.onnx'])
