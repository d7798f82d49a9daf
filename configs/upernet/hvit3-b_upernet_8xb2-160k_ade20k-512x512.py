_base_ = './hvit3-t_upernet_8xb2-160k_ade20k-512x512.py'

pretrained = 'checkpoints/hvit3_base.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 448, 640]),
    auxiliary_head=dict(in_channels=448))
