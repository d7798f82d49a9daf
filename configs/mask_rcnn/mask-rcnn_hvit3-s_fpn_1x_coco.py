_base_ = './mask-rcnn_hvit3-t_fpn_1x_coco.py'

# the authors' ImageNet-1K H-ViT3-S checkpoint (release link)
pretrained = 'https://cloud.tsinghua.edu.cn/f/3eeab8621a7f43929a87/?dl=1'
model = dict(
    backbone=dict(
        arch='small', init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
