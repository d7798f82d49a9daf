# H-ViT3-T RetinaNet, 1x schedule: mmdet's RetinaNet R-50 1x with H-ViT3
# feeding FPN from stride 8 (P3-P7, as for Swin and PVT) and AdamW in place
# of SGD, as for those backbones. Not one of the published recipes.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
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
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 320, 512], start_level=0))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
