_base_ = './hvit3-t_upernet_8xb2-160k_ade20k-512x512.py'

# the authors' ImageNet-1K H-ViT3-B checkpoint (release link)
pretrained = 'https://cloud.tsinghua.edu.cn/f/1d0d7fb840254275b29d/?dl=1'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 448, 640]),
    auxiliary_head=dict(in_channels=448))
