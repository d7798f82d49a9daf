# H-ViT3-T Mask R-CNN, 3x schedule: the published COCO recipe (AdamW lr 2e-4,
# wd 0.05, 8 GPUs x 2 images, multi-scale 480-800 with the DETR-style crop
# branch, AMP). Pipeline, schedule and AMP come from mmdet's Swin config.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_amp-ms-crop-3x_coco.py'
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
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys={'norm': dict(decay_mult=0.)}),
    optimizer=dict(lr=2e-4, weight_decay=0.05))
