# H-ViT3-T UperNet on ADE20K: the published recipe (160k iterations, 512x512
# crops, 8 GPUs x 2 images, AdamW lr 6e-5 wd 0.01, 1500-iteration linear
# warm-up then poly decay, AMP). Data, schedule and heads come from mmseg's
# Swin-T UperNet config.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'  # noqa
custom_imports = dict(imports=['mmvit3'], allow_failed_imports=False)

# The authors' ImageNet-1K checkpoint (their release link; downloaded once
# into the torch hub cache, or $MMVIT3_CACHE). Offline, point at a copy with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH
pretrained = 'https://cloud.tsinghua.edu.cn/f/f0c7c73ceabe49b7b161/?dl=1'
model = dict(
    backbone=dict(
        _delete_=True,
        type='HViT3',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    paramwise_cfg=dict(
        _delete_=True, custom_keys={'norm': dict(decay_mult=0.)}))
