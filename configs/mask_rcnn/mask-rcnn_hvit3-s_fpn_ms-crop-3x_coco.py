_base_ = './mask-rcnn_hvit3-t_fpn_ms-crop-3x_coco.py'

pretrained = 'checkpoints/hvit3_small.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
