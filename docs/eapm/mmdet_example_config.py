# Libra RetinaNet (ResNet-50-FPN, 1x) with EAPM on both losses, the setting of the EAPM
# paper's Table 3 (Wu et al., ICASSP 2022): mu = 1.5 for the focal loss, theta = 1.0 for the
# balanced L1 loss. mmdetection 3.x; needs `pip install visionscale` in the same environment.
#
#   python tools/train.py docs/eapm/mmdet_example_config.py     (from an mmdetection checkout,
#   after copying this file next to configs/, or with the mim-installed configs below)
#
# Inside an mmdetection checkout `_base_` can also be the relative path
# '../libra_rcnn/libra-retinanet_r50-fpn_1x_coco.py'.
_base_ = "mmdet::libra_rcnn/libra-retinanet_r50-fpn_1x_coco.py"

# Importing the module registers EAPMFocalLoss and EAPMBalancedL1Loss in mmdet's MODELS.
custom_imports = dict(imports=["visionscale.integrations.mmdet"], allow_failed_imports=False)

model = dict(
    bbox_head=dict(
        loss_cls=dict(
            _delete_=True,
            type="EAPMFocalLoss",
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            mu=1.5,  # paper Table 1: 1.5 is best for Libra RetinaNet, RetinaNet and FCOS
            mf_grad="paper",  # gradient = focal loss gradient at the modulated prediction (paper Sec. 2.1)
            loss_weight=1.0,
        ),
        loss_bbox=dict(
            _delete_=True,
            type="EAPMBalancedL1Loss",
            alpha=0.5,
            gamma=1.5,
            beta=0.11,  # Libra RetinaNet's value
            theta=1.0,  # paper Table 2: 1.0 is best for Libra RetinaNet
            xy="plain",  # GoS modulates t_w, t_h only (the paper defines it for w and h)
            mf_grad="paper",
            loss_weight=1.0,
        ),
    )
)

# The paper trains on 8 images per iteration (4 GPUs x 2) with lr 0.005 for 12 epochs,
# decayed by 0.1 at epochs 9 and 12 (mmdetection's 1x schedule at half the batch):
train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.005))
