# H-ViT3-T Mask R-CNN, 1x schedule (12 epochs, lr steps at 8 and 11). The
# published 1x recipe keeps the multi-scale crop pipeline and AMP of the 3x.
_base_ = './mask-rcnn_hvit3-t_fpn_ms-crop-3x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.1))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
