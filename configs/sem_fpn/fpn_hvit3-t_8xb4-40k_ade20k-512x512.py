# H-ViT3-T Semantic FPN on ADE20K: mmseg's Semantic FPN recipe for
# transformer-era backbones (PoolFormer, after PVT: 40k iterations, 8 x 4
# images, 512x512 crops, AdamW lr 2e-4 wd 1e-4, poly decay, AMP).
# Not one of the published recipes.
_base_ = 'mmseg::poolformer/fpn_poolformer_s12_8xb4-40k_ade20k-512x512.py'
# replaces the base's mmpretrain import, which only PoolFormer needed
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
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
