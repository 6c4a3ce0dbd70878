"""A torch reference whose every LayerNorm and GroupNorm input has a variance of about twice the
norm's eps and a mean about 300 of its standard deviations away from 0 (for tests/test_parity.py).

Each norm is scale-invariant apart from its eps, so scaling what feeds it changes nothing
downstream except through the eps: the DINOv2 residual stream is scaled as a whole (patch embed,
tokens, position embedding, every LayerScale), the EncoderStack stream likewise (fuse, click patch
embed, its position embedding, every attn.proj and mlp.fc2), and the layer before each GroupNorm
is scaled on its own. The offset is a constant added to the stream (or the layer's bias).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from convert_weights import verify

VAR_OVER_EPS = 2.0
MEAN_OVER_STD = 300.0


def norm_input_stats(ref, inputs) -> dict[str, tuple[float, float]]:
    """Per norm module: (median variance / eps, median |mean| / std) of its input, over its
    normalisation groups (LayerNorm: tokens; GroupNorm(1): samples)."""
    stats = {}

    def hook(name):
        def record(mod, args):
            x = args[0].double()
            x = x if isinstance(mod, nn.LayerNorm) else x.flatten(1)
            mean, var = x.mean(-1), x.var(-1, unbiased=False)
            stats[name] = (float(var.median() / mod.eps), float((mean.abs() / var.sqrt()).median()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in ref.named_modules()
               if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    verify.torch_stages(ref, *inputs)
    for h in handles:
        h.remove()
    return stats


def _std(stats, name, eps):
    return float(np.sqrt(stats[name][0] * eps))


@torch.no_grad()
def make_norm_sensitive_(ref, inputs):
    """Rescales `ref` in place (see the module docstring); `inputs` as `verify.example_inputs`."""
    dino, stack = ref.feature_extractor.dinov2, ref.backbone_mix
    ln_std = np.sqrt(VAR_OVER_EPS * 1e-6)
    s = ln_std / _std(norm_input_stats(ref, inputs), "feature_extractor.dinov2.blocks.0.norm1", 1e-6)
    for p in (dino.patch_embed.proj.weight, dino.patch_embed.proj.bias, dino.cls_token,
              dino.pos_embed, dino.register_tokens):
        p.mul_(s)
    for block in dino.blocks:
        block.ls1.gamma.mul_(s)
        block.ls2.gamma.mul_(s)
    for p in (dino.patch_embed.proj.bias, dino.cls_token, dino.register_tokens):
        p.add_(MEAN_OVER_STD * ln_std)

    s = ln_std / _std(norm_input_stats(ref, inputs), "backbone_mix.blocks.0.norm1", 1e-6)
    scaled = [ref.fuse, ref.patch_embed_coords.proj]
    scaled += [m for b in stack.blocks for m in (b.attn.proj, b.mlp.fc2)]
    for m in scaled:
        m.weight.mul_(s)
        m.bias.mul_(s)
    stack.pos_embed.mul_(s)
    ref.fuse.bias.add_(MEAN_OVER_STD * ln_std)

    groupnorms = [(f"{name}.{i}", seq[i - 1], m) for name, seq in ref.named_modules()
                  if isinstance(seq, nn.Sequential) for i, m in enumerate(seq)
                  if isinstance(m, nn.GroupNorm)]
    for _ in range(3):  # a GroupNorm's output scale moves the next one's input: iterate
        stats = norm_input_stats(ref, inputs)
        for name, prev, gn in groupnorms:
            factor = np.sqrt(VAR_OVER_EPS * gn.eps) / _std(stats, name, gn.eps)
            prev.weight.mul_(factor)
            prev.bias.mul_(factor)
    for _, prev, gn in groupnorms:
        prev.bias.add_(MEAN_OVER_STD * np.sqrt(VAR_OVER_EPS * gn.eps))
    return ref
