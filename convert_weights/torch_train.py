"""The original trainer's optimisation steps restated in PyTorch (the reference of `train_parity`).

`batch_forward` is `ISTrainer.batch_forward` of the original: `num_clicks` eval-mode rounds of
predict -> sigmoid -> `get_next_points` (OpenCV 5x5 chamfer distance, a uniformly random pixel of
the deep error region), then a train-mode forward whose `NormalizedFocalLossSigmoid(alpha=0.5,
gamma=2)` loss, averaged over the batch, is minimised with `torch.optim.Adam`. `run_steps` takes K
such steps on given batches and returns what `convert_weights.train_parity` writes, so the two are
compared key for key (original PyTorch names and layouts).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from convert_weights.torch_reference import SkipClickTorch


def normalized_focal_loss(logits: torch.Tensor, label: torch.Tensor, alpha: float = 0.5,
                          gamma: float = 2.0, eps: float = 1e-12, ignore_label: float = -1.0) -> torch.Tensor:
    """NormalizedFocalLossSigmoid (detached normaliser, max_mult -1, size_average): [B,1,H,W] -> [B]."""
    one_hot = label > 0.5
    sample_weight = label != ignore_label
    pred = torch.sigmoid(logits)
    alpha_map = torch.where(one_hot, alpha * sample_weight, (1 - alpha) * sample_weight)
    pt = torch.where(sample_weight, 1.0 - torch.abs(label - pred), torch.ones_like(pred))
    beta = (1 - pt) ** gamma
    sw_sum = torch.sum(sample_weight, dim=(-2, -1), keepdim=True)
    beta_sum = torch.sum(beta, dim=(-2, -1), keepdim=True)
    mult = (sw_sum / (beta_sum + eps)).detach()
    beta = beta * mult
    loss = -alpha_map * beta * torch.log(torch.min(pt + eps, torch.ones(1, dtype=pt.dtype)))
    loss = loss * sample_weight
    bsum = torch.sum(sample_weight, dim=(1, 2, 3))
    return torch.sum(loss, dim=(1, 2, 3)) / (bsum + eps)


def get_next_points(pred: torch.Tensor, gt: torch.Tensor, points: torch.Tensor, click_index: int,
                    rng: np.random.RandomState, pred_thresh: float = 0.49,
                    given: np.ndarray | None = None) -> torch.Tensor:
    """The original training clicker: pred, gt [B,1,H,W], points [B,2P,3] -> updated copy.

    `given` [B,2P,3] (optional): instead of drawing the pixel, take it from these points (another
    implementation's clicks) at the slot this rule chooses; AssertionError unless it holds this
    click's index and is one of this rule's candidates.
    """
    pred = pred.numpy()[:, 0]
    gt = gt.numpy()[:, 0] > 0.5
    fn = np.pad(np.logical_and(gt, pred < pred_thresh), ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    fp = np.pad(np.logical_and(~gt, pred > pred_thresh), ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    num = points.size(1) // 2
    points = points.clone()
    for b in range(fn.shape[0]):
        dt_fn = cv2.distanceTransform(fn[b], cv2.DIST_L2, 5)[1:-1, 1:-1]
        dt_fp = cv2.distanceTransform(fp[b], cv2.DIST_L2, 5)[1:-1, 1:-1]
        fn_max, fp_max = np.max(dt_fn), np.max(dt_fp)
        is_positive = fn_max > fp_max
        dt = dt_fn if is_positive else dt_fp
        indices = np.argwhere(dt > max(fn_max, fp_max) / 2.0)
        if len(indices) > 0:
            slot = num - click_index if is_positive else 2 * num - click_index
            if given is None:
                row, col = indices[rng.randint(0, len(indices))]
            else:
                row, col, index = (int(v) for v in given[b, slot])
                assert index == click_index, (
                    f"sample {b}, click {click_index}: slot {slot} (is_positive={is_positive}) of the "
                    f"given points holds click {index}")
                assert dt[row, col] > max(fn_max, fp_max) / 2.0, (
                    f"sample {b}, click {click_index}: the given pixel ({row}, {col}) is not a candidate")
            points[b, slot] = torch.tensor([float(row), float(col), float(click_index)])
    return points


def batch_forward(net: SkipClickTorch, image: torch.Tensor, gt: torch.Tensor, points: torch.Tensor,
                  num_clicks: int, rng: np.random.RandomState, dropout: bool = True,
                  pred_thresh: float = 0.49, given: np.ndarray | None = None, **loss_kw) -> torch.Tensor:
    """image [B,3,S,S] in [0,1], gt [B,1,S,S], points [B,2P,3] -> the scalar training loss
    (`given`: see `get_next_points`)."""
    prev = torch.zeros_like(gt)
    with torch.no_grad():
        for i in range(num_clicks):
            net.eval()
            prev = torch.sigmoid(net(torch.cat([image, prev], dim=1), points)["instances"])
            points = get_next_points(prev, gt, points, i + 1, rng, pred_thresh, given)
            net.train()
    net.train()
    if not dropout:
        net.head.dropout.eval()
    out = net(torch.cat([image, prev], dim=1), points)["instances"]
    return normalized_focal_loss(out, gt, **loss_kw).mean()


def step_lr(train_cfg, steps_per_epoch: int, step: int) -> float:
    """MultiStepLR stepped once per epoch, as a function of the optimizer step."""
    passed = sum(step >= int(m) * steps_per_epoch for m in train_cfg.lr_milestones)
    return float(train_cfg.optimizer.lr) * float(train_cfg.lr_gamma) ** passed


def run_steps(net: SkipClickTorch, batches: dict[str, np.ndarray], train_cfg, *, frozen_backbone: bool,
              steps_per_epoch: int, dropout: bool = True, seed: int = 0,
              dtype: torch.dtype = torch.float32,
              given_points: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """K Adam steps of `batch_forward` on `batches` (the `train_parity` .npz arrays).

    `given_points` [K,B,2P,3] (e.g. the `points` written by `train_parity`): simulated clicks take
    their pixels from these, each checked to be a candidate of the original rule, so that steps
    with clicks compare deterministically.

    `dtype` float64 gives the (nearly) exact result the float32 runs are measured against.
    Returns {'loss': [K], 'grad_norm': [K], 'grad/<key>': first step's gradient of each trainable
    parameter, 'param/<key>': every state-dict entry after the K steps} (numpy, in `dtype`).
    """
    torch.manual_seed(seed)
    net.to(dtype)
    rng = np.random.RandomState(seed)
    net.feature_extractor.requires_grad_(not frozen_backbone)
    params = [p for p in net.parameters() if p.requires_grad]
    o = train_cfg.optimizer
    optim = torch.optim.Adam(params, lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                             weight_decay=float(o.weight_decay))
    names = {id(p): k for k, p in net.named_parameters()}
    out: dict[str, np.ndarray] = {}
    losses, norms = [], []
    for k in range(len(batches["num_clicks"])):
        for group in optim.param_groups:
            group["lr"] = step_lr(train_cfg, steps_per_epoch, k)
        image = torch.from_numpy(np.asarray(batches["images"][k])).permute(0, 3, 1, 2).to(dtype) / 255.0
        gt = torch.from_numpy(np.asarray(batches["gt"][k], np.float32))[:, None].to(dtype)
        points = torch.from_numpy(np.asarray(batches["points"][k], np.float32)).to(dtype)
        optim.zero_grad()
        loss = batch_forward(net, image, gt, points, int(batches["num_clicks"][k]), rng, dropout,
                             float(train_cfg.pred_thresh),
                             None if given_points is None else np.asarray(given_points[k]),
                             **dict(train_cfg.loss))
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
        losses.append(float(loss.detach()))
        if k == 0:
            out.update({f"grad/{names[id(p)]}": g.detach().numpy().copy() for p, g in zip(params, grads)})
        optim.step()
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    out["loss"] = np.asarray(losses, np_dtype)
    out["grad_norm"] = np.asarray(norms, np_dtype)
    out.update({f"param/{k}": v.detach().numpy().copy() for k, v in net.state_dict().items()})
    return out
