"""timm's hvit3_{tiny,small,base}: creation, published weights, features,
FX and TorchScript."""
import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

import mmvit3  # noqa: F401  (registers the timm models)
from mmvit3.models import HViT3, HViT3Backbone
from mmvit3.testing import write_published_checkpoint

PUBLISHED_BACKBONE_PARAMS_M = {'tiny': 28.19, 'small': 53.85, 'base': 93.73}


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'hvit3_tiny.pth'
    states = write_published_checkpoint(str(path), 'tiny', seed=7)
    return str(path), states


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_registered_and_same_modules_as_backbone(arch):
    name = f'hvit3_{arch}'
    assert name in timm.list_models('hvit3_*')
    model = timm.create_model(name)
    assert type(model) is HViT3
    assert isinstance(model.norm, torch.nn.BatchNorm1d)
    assert model.head.out_features == 1000
    # the dense backbone adds one LayerNorm (weight + bias) per stage map
    backbone = count(model) - count(model.norm) - count(model.head)
    out_norms = 2 * sum(model.dims)
    assert round((backbone + out_norms) / 1e6, 2) == \
        PUBLISHED_BACKBONE_PARAMS_M[arch]
    assert model.pretrained_cfg['first_conv'] == 'patch_embed.conv.0.conv'
    assert model.pretrained_cfg['url'].startswith(
        'https://cloud.tsinghua.edu.cn/f/')


def test_classifier_forward_and_head():
    model = timm.create_model('hvit3_tiny', num_classes=7, drop_rate=0.1)
    model.eval()
    x = torch.randn(2, 3, 70, 100)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
    assert logits.shape == (2, 7)
    assert features.shape == (2, 512, 3, 4)  # 70x100 padded to 72x100, /32
    assert pre_logits.shape == (2, 512)
    torch.testing.assert_close(logits, model.get_classifier()(pre_logits))
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre_logits)


def test_loads_published_file_as_is(tiny_file):
    path, states = tiny_file
    model = timm.create_model(
        'hvit3_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    published = states['model']
    own = model.state_dict()
    assert set(own) == {k for k in published if 'rope.rotations' not in k}
    for key, value in own.items():
        assert torch.equal(value, published[key]), key

    ema = timm.create_model(
        'hvit3_tiny',
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        pretrained_state='ema')
    key = 'layers.2.blocks.4.attn.w3'
    assert torch.equal(ema.state_dict()[key], states['state_dict_ema'][key])
    assert not torch.equal(ema.state_dict()[key], published[key])


def test_other_class_count_keeps_backbone_and_new_head(tiny_file):
    path, states = tiny_file
    model = timm.create_model(
        'hvit3_tiny',
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        num_classes=5)
    assert model.head.weight.shape == (5, 512)
    key = 'layers.3.blocks.0.mlp.fc2.weight'
    assert torch.equal(model.state_dict()[key], states['model'][key])
    assert torch.equal(model.norm.running_var,
                       states['model']['norm.running_var'])


def test_pretrained_errors(tiny_file):
    path, _ = tiny_file
    with pytest.raises(ValueError, match="looks like H-ViT3 arch 'tiny'.*"
                       "model is H-ViT3 arch 'small'"):
        timm.create_model(
            'hvit3_small',
            pretrained=True,
            pretrained_cfg_overlay=dict(file=path))
    # offline: the release URL is named, and how to pass a file instead
    with pytest.raises(Exception, match=r'(?s)https://cloud\.tsinghua\.edu'
                       r'\.cn/f/f0c7c73ceabe49b7b161/.*pretrained_cfg_overlay='
                       r'dict\(file=PATH\)'):
        timm.create_model('hvit3_tiny', pretrained=True)


def test_in_memory_state_dict_through_timms_loader(tiny_file):
    _, states = tiny_file
    model = timm.create_model(
        'hvit3_tiny',
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=dict(states['model'])))
    assert torch.equal(model.head.weight, states['model']['head.weight'])


def test_features_only_shapes_and_weights(tiny_file):
    path, states = tiny_file
    model = timm.create_model(
        'hvit3_tiny',
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 320, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert not hasattr(model.model.head, 'weight')  # classifier pruned
    x = torch.randn(1, 3, 96, 130)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 24, 33),
                                              (1, 128, 12, 17),
                                              (1, 320, 6, 9), (1, 512, 3, 5)]

    # The OpenMMLab backbone loading the same file gives the same stage maps,
    # passed through its (freshly initialised) output LayerNorms.
    backbone = HViT3Backbone(
        'tiny', init_cfg=dict(type='Pretrained', checkpoint=path))
    backbone.init_weights()
    with torch.no_grad():
        dense = backbone.eval()(x)
    for raw, normed in zip(maps, dense):
        expected = F.layer_norm(raw.permute(0, 2, 3, 1), raw.shape[1:2])
        torch.testing.assert_close(
            normed, expected.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_features_only_subset_prunes_later_stages():
    model = timm.create_model(
        'hvit3_tiny', features_only=True, out_indices=(0, 1))
    assert model.feature_info.channels() == [64, 128]
    assert len(model.model.layers) == 2
    assert model.model.layers[1].downsample is None
    maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [64, 128]


def test_layer_decay_groups_follow_depth():
    model = timm.create_model('hvit3_tiny')
    optimizer = timm.optim.create_optimizer_v2(
        model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            scale_of[param] = group['lr_scale']
    named = dict(model.named_parameters())

    def scale(name):
        return scale_of[named[name]]

    order = [
        'patch_embed.conv.0.conv.weight',
        'layers.0.blocks.0.attn.w1',
        'layers.1.blocks.0.attn.w1',
        'layers.1.blocks.2.attn.w1',
        'layers.3.blocks.3.attn.w1',
        'head.weight',
    ]
    scales = [scale(name) for name in order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales)
    assert scales[-1] == 1.0
    # a stage's downsample runs after its blocks: it shares the last one's
    assert scale('layers.1.downsample.conv.0.conv.weight') == scales[3]
    assert scale('norm.weight') == scales[4]


def test_reset_classifier_to_unpooled_map():
    model = timm.create_model('hvit3_tiny').eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, '')
        unpooled = model(x)
        assert unpooled.shape == (1, 512, 2, 3)
        # eval-mode BatchNorm1d is per-channel affine: pooling commutes
        torch.testing.assert_close(
            unpooled.mean((2, 3)),
            model.forward_head(features.mean((2, 3), keepdim=True),
                               pre_logits=True).flatten(1))
        model.reset_classifier(5, '')
        assert model(x).shape == (1, 5, 2, 3)
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (1, 5)
    with pytest.raises(ValueError, match="'avg' or ''"):
        model.reset_classifier(5, 'max')


@pytest.mark.parametrize('out_indices', [(1, 3), (0, 2)])
def test_features_only_with_out_indices(out_indices):
    model = timm.create_model('hvit3_tiny', features_only=True,
                              out_indices=out_indices).eval()
    dims, strides = [64, 128, 320, 512], [4, 8, 16, 32]
    assert model.feature_info.channels() == [dims[i] for i in out_indices]
    assert model.feature_info.reduction() == [strides[i] for i in out_indices]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1:] for m in maps] == [
        (dims[i], 64 // strides[i], 64 // strides[i]) for i in out_indices
    ]


def small_timm_model():
    return HViT3(dict(dims=(32, 64), depths=(1, 2)), num_classes=7).eval()


def test_fx_feature_extraction_matches_intermediates():
    """torchvision's create_feature_extractor and timm's FX feature path
    trace the model (the ops are leaf functions); at run time they take the
    fast paths, with the same maps."""
    model = small_timm_model()
    x = torch.randn(2, 3, 30, 42)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        extractor = create_feature_extractor(
            model, return_nodes={'layers.0.blocks': 'stage0',
                                 'layers.1.blocks': 'stage1'})
        maps = extractor(x)
        for got, want in zip(maps.values(), expected):
            torch.testing.assert_close(got, want)
    torch.manual_seed(1)
    getter = timm.create_model('hvit3_tiny', features_only=True).eval()
    torch.manual_seed(1)  # the same weights
    fx = timm.create_model('hvit3_tiny', features_only=True,
                           feature_cls='fx').eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for got, want in zip(fx(x), getter(x)):
            torch.testing.assert_close(got, want)


def test_torchscript_matches_eager():
    """TorchScript compiles the reference ops (torch.jit.is_scripting
    branches); the scripted model computes what the eager fast paths do."""
    model = small_timm_model()
    x = torch.randn(2, 3, 30, 42)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4,
                                   atol=1e-5)
