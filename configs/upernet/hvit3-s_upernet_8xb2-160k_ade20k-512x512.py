_base_ = './hvit3-t_upernet_8xb2-160k_ade20k-512x512.py'

pretrained = 'checkpoints/hvit3_small.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
