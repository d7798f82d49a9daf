_base_ = './mask-rcnn_hvit3-t_fpn_1x_coco.py'

pretrained = 'checkpoints/hvit3_base.pth'
model = dict(
    backbone=dict(
        arch='base', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 448, 640]))
