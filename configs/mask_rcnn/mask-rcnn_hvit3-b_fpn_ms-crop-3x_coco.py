_base_ = './mask-rcnn_hvit3-t_fpn_ms-crop-3x_coco.py'

pretrained = 'checkpoints/hvit3_base.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 448, 640]))
