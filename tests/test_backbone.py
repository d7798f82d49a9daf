"""HViT3 backbone: shapes, parameter counts, options and input errors."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

from mmvit3.models import ARCH_SETTINGS
from mmvit3.models import HViT3Backbone as HViT3
from mmvit3.models.hvit3 import DepthwiseConv
from mmvit3.ops import bands
from mmvit3.testing import backbone_outputs_and_grads

PUBLISHED_PARAMS_M = {'tiny': 28.19, 'small': 53.85, 'base': 93.73}


def count_m(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_published_parameter_counts(arch):
    assert round(count_m(HViT3(arch)), 2) == PUBLISHED_PARAMS_M[arch]


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
@pytest.mark.parametrize('size', [(224, 224), (225, 317), (32, 32)])
def test_output_shapes_and_strides(arch, size):
    model = HViT3(arch, drop_path_rate=0.).eval()
    height, width = size
    with torch.no_grad():
        outs = model(torch.randn(1, 3, height, width))
    dims = ARCH_SETTINGS[arch]['dims']
    assert len(outs) == 4
    for i, out in enumerate(outs):
        # stem pads to a multiple of 4, each downsample pads odd sides
        expected_h, expected_w = -(-height // 4), -(-width // 4)
        for _ in range(i):
            expected_h, expected_w = -(-expected_h // 2), -(-expected_w // 2)
        assert out.shape == (1, dims[i], expected_h, expected_w)
        assert torch.isfinite(out).all()
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]
    assert model.out_channels == list(dims)


def test_out_indices_subset_and_custom_arch():
    model = HViT3(dict(dims=(32, 64), depths=(1, 1)), out_indices=(1, ))
    (out, ) = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 64, 8, 6)
    assert not hasattr(model, 'norm0')
    # stages after the last returned one are not built: every parameter
    # gets a gradient (DDP needs no find_unused_parameters)
    model = HViT3('tiny', out_indices=(0, 2))
    assert len(model.layers) == 3 and model.layers[2].downsample is None
    sum(out.sum() for out in model(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(k.startswith(('norm.', 'head.'))
                   for k in model.state_dict())


def test_drop_path_rates_rise_linearly():
    model = HViT3('tiny', drop_path_rate=0.3)
    rates = [
        block.drop_path.drop_prob for stage in model.layers
        for block in stage.blocks
    ]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx(
        torch.linspace(0, 0.3, sum(model.depths)).tolist())


def test_with_cp_gives_same_gradients():
    plain = HViT3('tiny', drop_path_rate=0.)
    ckpt = HViT3('tiny', drop_path_rate=0., with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for model in (plain, ckpt):
        sum(o.sum() for o in model(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_frozen_stages_and_norm_eval():
    model = HViT3('tiny', frozen_stages=2, norm_eval=True)
    model.train()
    assert all(not p.requires_grad for p in model.patch_embed.parameters())
    assert all(not p.requires_grad for p in model.layers[1].parameters())
    assert all(not p.requires_grad for p in model.norm1.parameters())
    assert all(p.requires_grad for p in model.layers[2].parameters())
    assert not model.patch_embed.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.layers[2].blocks[0].training
    assert model.train() is model


@pytest.mark.parametrize(
    'kwargs, message',
    [(dict(arch='huge'), "Unknown H-ViT3 arch 'huge'"),
     (dict(arch=dict(dims=(64, )), ), "keys 'dims' and 'depths'"),
     (dict(arch=dict(dims=(60, ), depths=(1, ))), 'multiples of 32'),
     (dict(out_indices=(0, 4)), r'must be in \[0, 3\]'),
     (dict(pretrained_state='best'), "'model' or 'ema'"),
     (dict(pretrained='a.pth', init_cfg=dict(type='Pretrained')),
      'not both')])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HViT3(**kwargs)


def test_bad_inputs():
    model = HViT3('tiny').eval()
    message = r'4-D image batch \(B, 3, H, W\), got shape'
    with pytest.raises(ValueError, match=message + r' \[1, 1, 32, 32\]'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=message + r' \[3, 32, 32\]'):
        model(torch.randn(3, 32, 32))
    assert HViT3('tiny', in_channels=4).eval()(torch.randn(1, 4, 32, 32))


def test_core_model_imports_without_toolboxes():
    """torch + mmengine only: mmcv, mmdet and mmseg made unimportable."""
    code = (
        'import sys\n'
        'class Block:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name.split('.')[0] in ('mmcv', 'mmdet', 'mmseg'):\n"
        '            raise ImportError(name)\n'
        'sys.meta_path.insert(0, Block())\n'
        'import torch, mmvit3\n'
        'from mmvit3.models import HViT3Backbone\n'
        'assert mmvit3.REGISTERED_TOOLBOXES == []\n'
        'model = HViT3Backbone("tiny").eval()\n'
        'print(model(torch.randn(1, 3, 32, 32))[0].shape)\n')
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert 'torch.Size([1, 64, 8, 8])' in result.stdout


def test_blocks_get_row_major_tokens():
    """The stem and downsampling layers run channels-last, so the blocks'
    token sequences are contiguous (no copies before linear layers)."""
    model = HViT3(dict(dims=(32, 64), depths=(1, 1)), out_indices=(0, 1))
    layouts = []
    for stage in model.layers:
        for block in stage.blocks:
            block.register_forward_pre_hook(
                lambda _, args: layouts.append(args[0].is_contiguous()))
    model(torch.randn(2, 3, 30, 42))
    assert layouts == [True, True]


def two_stage_model_with_batchnorm_statistics(dtype=torch.float32):
    """A small HViT3 whose BatchNorm layers have non-trivial statistics and
    affine parameters, so that folding them is tested."""
    model = HViT3(dict(dims=(32, 64), depths=(1, 1)),
                  out_indices=(0, 1)).to(dtype)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                for stat in (bn.weight, bn.bias, bn.running_mean):
                    stat.normal_()
                bn.running_var.uniform_(0.5, 2)
    return model


def test_reparameterize_folds_batchnorm_into_convs():
    model = two_stage_model_with_batchnorm_statistics().eval()
    image = torch.randn(2, 3, 32, 48, requires_grad=True)
    unfolded = backbone_outputs_and_grads(model, image)
    timm.utils.reparameterize_model(model, inplace=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = backbone_outputs_and_grads(model, image)
    for got, expected in zip(folded, unfolded[:2]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the stem's five, the downsampling layer's one conv now have a bias
    assert sum(m.bias is not None for m in model.modules()
               if isinstance(m, nn.Conv2d) and m.groups == 1) >= 6


def test_residual_depthwise_conv_in_one_convolution():
    conv = DepthwiseConv(8).double()
    x = torch.randn(2, 15, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for out in (conv(x, 3, 5),
                x + nn.Conv2d.forward(conv, x.transpose(1, 2).reshape(
                    2, 8, 3, 5)).flatten(2).transpose(1, 2)):
        grads = torch.autograd.grad(out.square().sum(), [x, conv.weight])
        results.append([out, *grads])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('size', [(37, 50), (64, 40), (8, 12)])
@pytest.mark.parametrize('folded', [False, True])
def test_inference_in_bands_equals_whole_maps(monkeypatch, size, folded):
    """Stem, downsampling layers and MLPs computed in bands of rows, from
    one row up, give the whole-map result, with BatchNorm folded or not."""
    model = two_stage_model_with_batchnorm_statistics(torch.float64).eval()
    if folded:
        timm.utils.reparameterize_model(model, inplace=True)
    image = torch.randn(2, 3, *size, dtype=torch.float64)
    calls = []
    run = bands._run_in_bands
    monkeypatch.setattr(bands, '_run_in_bands',
                        lambda *args: calls.append(args[2]) or run(*args))
    with torch.no_grad():
        expected = model(image)
        assert not calls
        monkeypatch.setattr(bands, 'CPU_BAND_THRESHOLD_BYTES', 0)
        for band_bytes in (1, 3000, 20000):
            monkeypatch.setattr(bands, 'CPU_BAND_BYTES', band_bytes)
            for got, want in zip(model(image), expected):
                torch.testing.assert_close(got, want, rtol=1e-12,
                                           atol=1e-12)
        assert calls[:2] == [1, 1]  # stem and downsampling, row by row
        # Tracers (FLOP counters, ONNX export) see whole maps.
        calls.clear()
        torch.jit.trace(model, image, check_trace=False)
        assert not calls
    # Training keeps whole maps (bands would not save autograd's memory),
    # and so does train-mode BatchNorm, which needs the whole map's
    # statistics.
    model(image)
    if not folded:
        with torch.no_grad():
            model.train()(image)
    assert not calls
