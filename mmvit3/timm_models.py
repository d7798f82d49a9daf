"""timm models ``hvit3_tiny``, ``hvit3_small``, ``hvit3_base``.

``timm.create_model('hvit3_tiny', pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))`` loads the authors' ImageNet file
as published; ``features_only=True`` returns the four stage maps. Imported
by ``mmvit3.registration`` when timm is installed.
"""
from timm.data import (DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN,
                       IMAGENET_DEFAULT_STD)
from timm.models import (build_model_with_cfg, generate_default_cfgs,
                         register_model)

from .models.classifier import HViT3Classifier, checkpoint_filter_fn

WEIGHT_SOURCES = ('file', 'state_dict')


def _create_hvit3(variant: str, pretrained: bool = False, **kwargs):
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if pretrained and not kwargs.get('pretrained_cfg') and not any(
            overlay.get(k) for k in WEIGHT_SOURCES):
        raise ValueError(
            f"{variant}: the authors' ImageNet weights are not on a hub; "
            'download their checkpoint and pass '
            'pretrained_cfg_overlay=dict(file=PATH)')
    # timm switches custom_load off when a file is given, but its
    # weights-only loader refuses the authors' files (a pickled yacs config):
    # the model's load_pretrained reads them.
    overlay.setdefault('custom_load', True)
    return build_model_with_cfg(
        HViT3Classifier,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs)


def _cfg(**kwargs):
    return dict(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=DEFAULT_CROP_PCT,
        interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv='patch_embed.conv.0.conv',
        classifier='head',
        paper_ids='arXiv:2512.01643',
        **kwargs)


default_cfgs = generate_default_cfgs({
    'hvit3_tiny.in1k': _cfg(),
    'hvit3_small.in1k': _cfg(),
    'hvit3_base.in1k': _cfg(),
})


@register_model
def hvit3_tiny(pretrained: bool = False, **kwargs) -> HViT3Classifier:
    return _create_hvit3('hvit3_tiny', pretrained, arch='tiny', **kwargs)


@register_model
def hvit3_small(pretrained: bool = False, **kwargs) -> HViT3Classifier:
    return _create_hvit3('hvit3_small', pretrained, arch='small', **kwargs)


@register_model
def hvit3_base(pretrained: bool = False, **kwargs) -> HViT3Classifier:
    return _create_hvit3('hvit3_base', pretrained, arch='base', **kwargs)
