_base_ = './mask-rcnn_hvit3-t_fpn_ms-crop-3x_coco.py'

# the authors' ImageNet-1K H-ViT3-S checkpoint (release link)
pretrained = 'https://cloud.tsinghua.edu.cn/f/3eeab8621a7f43929a87/?dl=1'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
