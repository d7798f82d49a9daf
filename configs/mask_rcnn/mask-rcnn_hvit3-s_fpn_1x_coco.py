_base_ = './mask-rcnn_hvit3-t_fpn_1x_coco.py'

pretrained = 'checkpoints/hvit3_small.pth'
model = dict(
    backbone=dict(
        arch='small', init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
