# H-ViT3-T Cascade Mask R-CNN, 3x: mmdet's ConvNeXt-T cascade recipe
# (4conv1fc GIoU box heads, multi-scale 480-800 training with the DETR-style
# crop branch, AdamW lr 2e-4 wd 0.05, AMP) with H-ViT3 in place of ConvNeXt.
# Not one of the published recipes.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'  # noqa
# replaces the base's mmpretrain import, which only ConvNeXt needed
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
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]))

# mmdet's layer-wise lr decay constructor knows only ConvNeXt's layers:
# use the default one with the published H-ViT3 norm setting.
optim_wrapper = dict(
    constructor='DefaultOptimWrapperConstructor',
    paramwise_cfg=dict(
        _delete_=True, custom_keys={'norm': dict(decay_mult=0.)}))
