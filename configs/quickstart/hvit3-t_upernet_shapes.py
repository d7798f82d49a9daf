# H-ViT3-T UperNet trained from scratch on the synthetic shapes dataset
# (tools/make_shapes.py -> data/shapes/ade/, ADE20K layout), sized for a
# 2-core CPU: the published recipe with 64 x 64 images, slimmer heads and a
# short schedule. Everything else (model, AdamW, IoU metric) is inherited.
_base_ = '../upernet/hvit3-t_upernet_8xb2-160k_ade20k-512x512.py'

data_root = 'data/shapes/ade'
metainfo = dict(
    classes=('background', 'circle', 'square', 'triangle', 'star'))
crop_size = (64, 64)
# SyncBN needs GPUs; plain BN lets this config also run distributed on CPUs
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    # from scratch: no ImageNet checkpoint to start from
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    # 512/256-channel heads cost several times the backbone at this size
    decode_head=dict(channels=128, num_classes=5, norm_cfg=norm_cfg),
    auxiliary_head=dict(channels=64, num_classes=5, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.8, 1.25),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    # no photometric distortion: the short schedule goes to the shapes
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# the shapes classes are not ADE20K's 150: the generic dataset class
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(**dataset, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1, dataset=dict(**dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader

# fp32: mmengine's AMP wrapper needs a GPU; the fused AdamW kernel is
# several times faster than the per-tensor loop on a CPU too
optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(lr=1e-3, fused=True))
# as long as the detector's run beside it takes
max_iters = 1600
train_cfg = dict(max_iters=max_iters, val_interval=400)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20,
         end=max_iters)
]
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=400, max_keep_ckpts=2))
# a fixed seed, so that a rerun repeats the reported figures closely
randomness = dict(seed=0)
