_base_ = './mask-rcnn_hvit3-t_fpn_ms-crop-3x_coco.py'

# the authors' ImageNet-1K H-ViT3-B checkpoint (release link)
pretrained = 'https://cloud.tsinghua.edu.cn/f/1d0d7fb840254275b29d/?dl=1'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 448, 640]))
