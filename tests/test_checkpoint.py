"""Loading checkpoints in the authors' published layout into the backbone.

The reader itself (crafted files, the yacs config) is tested in
test_checkpoint_safety.py."""
import pytest
import torch

from mmvit3.models import HViT3Backbone as HViT3
from mmvit3.testing import write_published_checkpoint


def features(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'hvit3_tiny.pth'
    states = write_published_checkpoint(str(path), 'tiny', seed=3)
    return str(path), states


@pytest.mark.parametrize('state, key', [('model', 'model'),
                                        ('ema', 'state_dict_ema')])
def test_loads_published_weights(tiny_ckpt, state, key):
    path, states = tiny_ckpt
    model = HViT3(
        'tiny',
        pretrained_state=state,
        init_cfg=dict(type='Pretrained', checkpoint=path))
    x = torch.randn(1, 3, 64, 64)
    before = features(model, x)
    model.init_weights()
    after = features(model, x)
    assert not torch.allclose(before[-1], after[-1])
    loaded = model.state_dict()
    for name, value in states[key].items():
        if name in loaded:
            torch.testing.assert_close(loaded[name], value, msg=name)
    # every backbone tensor but the dense-only output norms came from the file
    not_loaded = [k for k in loaded if k not in states[key]]
    assert all(k.startswith(('norm0', 'norm1', 'norm2', 'norm3'))
               for k in not_loaded)


def test_ema_requested_but_absent(tmp_path):
    path = str(tmp_path / 'no_ema.pth')
    write_published_checkpoint(path, 'tiny', with_ema=False)
    model = HViT3(
        'tiny',
        pretrained_state='ema',
        init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(KeyError, match="no 'state_dict_ema'"):
        model.init_weights()


def test_other_variant_is_named(tiny_ckpt):
    path, _ = tiny_ckpt
    model = HViT3('small', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError,
                       match="looks like H-ViT3 arch 'tiny', but the model is "
                       "H-ViT3 arch 'small'"):
        model.init_weights()


def test_missing_and_unexpected_keys_are_errors(tmp_path):
    path = str(tmp_path / 'broken.pth')
    states = write_published_checkpoint(path, 'tiny', with_ema=False,
                                        with_training_state=False)
    state_dict = dict(states['model'])
    del state_dict['layers.0.blocks.0.attn.w1']
    state_dict['layers.0.blocks.0.attn.extra'] = torch.zeros(1)
    torch.save({'model': state_dict}, path)
    model = HViT3('tiny', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(KeyError) as info:
        model.init_weights()
    assert "missing keys: ['layers.0.blocks.0.attn.w1']" in str(info.value)
    assert "unexpected keys: ['layers.0.blocks.0.attn.extra']" in str(
        info.value)


def test_shape_mismatch_is_an_error(tmp_path):
    path = str(tmp_path / 'bad_shape.pth')
    states = write_published_checkpoint(path, 'tiny', with_ema=False,
                                        with_training_state=False)
    state_dict = dict(states['model'])
    state_dict['layers.0.blocks.0.attn.w3'] = torch.zeros(16, 1, 3, 3)
    torch.save({'model': state_dict}, path)
    model = HViT3('tiny', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match=r'attn.w3: checkpoint \(16, 1, 3, 3\)'):
        model.init_weights()


def test_missing_file_says_what_to_do(tmp_path):
    model = HViT3(
        'tiny',
        init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'no.pth')))
    with pytest.raises(FileNotFoundError,
                       match='model.backbone.init_cfg.checkpoint'):
        model.init_weights()


def test_mmengine_checkpoint_with_prefix(tmp_path):
    source = HViT3('tiny')
    path = str(tmp_path / 'detector.pth')
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v
                for k, v in source.state_dict().items()
            },
            'meta': {}
        }, path)
    model = HViT3(
        'tiny',
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(features(model, x), features(source, x))
