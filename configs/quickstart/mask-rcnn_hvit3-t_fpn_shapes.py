# H-ViT3-T Mask R-CNN trained from scratch on the synthetic shapes dataset
# (tools/make_shapes.py -> data/shapes/coco/), sized for a 2-core CPU: the
# published 1x recipe with 64 x 64 images, slimmer heads, fewer proposals
# and a short schedule. Everything else (model, AdamW, evaluator) is
# inherited.
_base_ = '../mask_rcnn/mask-rcnn_hvit3-t_fpn_1x_coco.py'

data_root = 'data/shapes/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle', 'star'))
image_scale = (64, 64)

model = dict(
    # from scratch: no ImageNet checkpoint to start from
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    # 128-channel FPN and heads: at 256 the mask head's convs and the RoI
    # features cost several times the backbone at this size
    neck=dict(out_channels=128),
    rpn_head=dict(in_channels=128, feat_channels=128),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=128),
        bbox_head=dict(in_channels=128, fc_out_channels=512, num_classes=4),
        mask_roi_extractor=dict(out_channels=128),
        mask_head=dict(
            in_channels=128, conv_out_channels=128, num_classes=4)),
    # 1-3 objects per image need far fewer proposals and RoIs than COCO
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.8, 1.25),
         keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# fp32: mmengine's AMP wrapper needs a GPU; the fused AdamW kernel is
# several times faster than the per-tensor loop on a CPU too
optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(lr=5e-4, fused=True))
max_epochs = 5
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=20),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[4], gamma=0.1)
]
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=1, max_keep_ckpts=2))
# a fixed seed, so that a rerun repeats the reported figures closely
randomness = dict(seed=0)
