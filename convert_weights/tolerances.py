"""Parity tolerances: the one table, each entry about 2x the error measured for it.

Per table (a model family at a size, or a parity case) and stage: (max abs error, max rel error),
rel = max abs error / max |reference| over the stage (numbered stages share one entry: taps_0..3
-> "taps", pyramid_0..3 -> "pyramid"). A stage passes if both its abs and its rel error are within
the tolerance. Measured in float32 on CPU at matmul precision 'highest', random O(1) weights
(`torch_reference.randomize_`: LayerScale, norms and biases randomised); CPU 'default' precision
gives bit-identical numbers, so it uses the same table. No other backend has been measured at
'default' precision (TF32/bf16 passes on GPU/TPU): `tolerance` refuses it rather than guess.

Measurement commands (the max over every row printed):
  dinov2_tiny: `verify.compare` of `build_reference(test_tiny, seed=0..2)` on
               `example_inputs(224, 224)` and (168, 560), input seeds 0..2 (what
               `python -m convert_weights.verify --random --config configs/test_tiny.py --size 224
               224 --size 168 560 --seed S` prints for S = 0..2), and the split path
               (tests/test_parity.py)
  dinov2_tiny_x2_x4: the same for the two head variants of tests/test_parity.py (seed 1)
  dinov2_vitb: `python -m convert_weights.verify --random --config configs/skipclick.py
               --size 448 448 --size 280 420` (model seed 0, input seeds 0..2) and timm's own
               vit_base_patch14_reg4_dinov2 taps at 224, 280x420, 448 (tests/test_parity.py)
  dinov2_tiny_norm_sensitive: tests/test_parity.py::test_norm_sensitive_every_stage (every
               LayerNorm/GroupNorm input scaled to variance ~2x its eps, mean ~300 std)
  dinov3_tiny: `verify.compare` of `build_reference(test_tiny_dinov3, seed=0..1)` (timm Eva
               backbone) on `example_inputs` at 224x224, 224x160 and 160x224, input seeds 0..1,
               split path included (tests/test_dinov3_model.py)
  dinov3_vitb: configs/skipclick_dinov3.py at 448x448 and 448x320 (model seed 0): max abs
               measured per stage group; rel tolerances are the ViT-B/14 ones (not measured)
"""

from __future__ import annotations

# stage: (abs tol, rel tol)            measured max (abs, rel)
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "dinov2_tiny": {  # configs/test_tiny.py, 224x224 and 168x560, 3 model x 3 input seeds
        "taps": (1.5e-5, 2.5e-6),         # 7.2e-6, 1.2e-6
        "fused": (1.2e-5, 1.8e-6),        # 6.0e-6, 8.1e-7
        "click_embed": (2.2e-6, 1.6e-6),  # 1.1e-6, 7.8e-7 (split path: 1.2e-6, 7.8e-7)
        "encoder_out": (1.4e-5, 1.8e-6),  # 6.7e-6, 8.6e-7
        "pyramid": (1.2e-5, 2.8e-6),      # 5.8e-6, 1.3e-6 (split path included)
        "head_logits": (2.7e-6, 3.4e-6),  # 1.3e-6, 1.7e-6
        "logits": (2.2e-6, 3.2e-6),       # 1.1e-6, 1.6e-6
    },
    "dinov2_tiny_x2_x4": {  # the x2 and x4 head variants of tests/test_parity.py, 224x224
        "taps": (1.3e-5, 2.1e-6),         # 6.2e-6, 1.1e-6
        "fused": (1.2e-5, 1.9e-6),        # 6.0e-6, 9.2e-7
        "click_embed": (2.2e-6, 1.6e-6),  # 1.1e-6, 7.6e-7
        "encoder_out": (1.4e-5, 1.8e-6),  # 6.7e-6, 8.6e-7
        "pyramid": (1.2e-5, 3e-6),        # 5.7e-6, 1.5e-6
        "head_logits": (1.2e-5, 2.9e-6),  # 6.1e-6, 1.4e-6
        "logits": (8.6e-6, 2.8e-6),       # 4.3e-6, 1.4e-6
    },
    "dinov2_vitb": {  # configs/skipclick.py, 448x448 and 280x420; timm ViT-B taps 224-448
        "taps": (2.2e-5, 3e-6),           # 1.1e-5, 1.5e-6 (timm backbone alone: 7.2e-6, 1.2e-6)
        "fused": (1.5e-5, 1.9e-6),        # 7.2e-6, 9.2e-7
        "click_embed": (2.5e-6, 1.5e-6),  # 1.3e-6, 7.1e-7
        "encoder_out": (2e-5, 1.9e-6),    # 1.0e-5, 9.1e-7
        "pyramid": (1.9e-5, 3.8e-6),      # 9.1e-6, 1.9e-6
        "head_logits": (3e-6, 4.6e-6),    # 1.5e-6, 2.3e-6
        "logits": (2.8e-6, 4.2e-6),       # 1.4e-6, 2.1e-6
    },
    "dinov2_tiny_norm_sensitive": {  # test_tiny with the x4 head, tests/norm_sensitive.py
        "taps": (4.2e-7, 1e-6),           # 2.1e-7, 4.9e-7 (values ~0.42 +- 1.4e-3: 2 ulp)
        "fused": (6e-8, 1.4e-7),          # 3.0e-8, 7.0e-8
        "click_embed": (3.3e-9, 1.3e-6),  # 1.6e-9, 6.2e-7
        "encoder_out": (5.4e-7, 1.2e-6),  # 2.7e-7, 6.2e-7 (split path)
        "pyramid": (1.1e-3, 4.4e-4),      # 5.4e-4, 2.2e-4 (mean 300 std: the mean's rounding)
        "head_logits": (4.6e-4, 4.4e-4),  # 2.3e-4, 2.2e-4
        "logits": (3e-4, 3.4e-4),         # 1.5e-4, 1.7e-4
    },
    "dinov3_tiny": {  # configs/test_tiny_dinov3.py, 224x224, 224x160, 160x224, 2 model x 2 input seeds
        "taps": (1.1e-5, 2.6e-6),         # 5.3e-6, 1.3e-6
        "fused": (8.1e-6, 1.9e-6),        # 4.1e-6, 9.3e-7
        "click_embed": (2.5e-6, 1.9e-6),  # 1.3e-6, 9.5e-7
        "encoder_out": (1.1e-5, 1.7e-6),  # 5.5e-6, 8.5e-7
        "pyramid": (1.1e-5, 2.6e-6),      # 5.1e-6, 1.3e-6
        "head_logits": (2.1e-6, 4e-6),    # 1.0e-6, 2.0e-6
        "logits": (1.9e-6, 4e-6),         # 9.4e-7, 2.0e-6
    },
    "dinov3_vitb": {  # configs/skipclick_dinov3.py, 448x448 and 448x320 (abs measured)
        "taps": (1.3e-5, 3e-6),           # 6.4e-6
        "fused": (1.9e-5, 1.9e-6),        # <= 9.5e-6 (every stage after the taps)
        "click_embed": (1.9e-5, 1.5e-6),  # <= 9.5e-6
        "encoder_out": (1.9e-5, 1.9e-6),  # <= 9.5e-6
        "pyramid": (1.9e-5, 3.8e-6),      # <= 9.5e-6
        "head_logits": (1.9e-5, 4.6e-6),  # <= 9.5e-6
        "logits": (3e-6, 4.2e-6),         # 1.5e-6
    },
}


def table_for(cfg) -> str:
    """The table measured for a model config section (test_tiny widths or ViT-B, per backbone)."""
    kind = cfg.backbone.get("kind", "dinov2")
    names = {("dinov2", 96, "x1"): "dinov2_tiny", ("dinov2", 96, "x2"): "dinov2_tiny_x2_x4",
             ("dinov2", 96, "x4"): "dinov2_tiny_x2_x4", ("dinov2", 768, "x1"): "dinov2_vitb",
             ("dinov3", 96, "x1"): "dinov3_tiny", ("dinov3", 768, "x1"): "dinov3_vitb"}
    key = (kind, cfg.backbone.dim, cfg.head.upsample)
    if key not in names:
        raise ValueError(f"no parity tolerances measured for backbone {key[0]} dim={key[1]} with "
                         f"head.upsample={key[2]!r} (measured: {sorted(names)}); measure them and "
                         f"add a table to {__name__}")
    return names[key]


def stage_key(stage: str) -> str:
    """taps_2 -> taps, pyramid_0 -> pyramid, fused -> fused."""
    return stage.rsplit("_", 1)[0] if stage[-1].isdigit() else stage


def tolerance(stage: str, table: str, precision: str = "highest",
              backend: str = "cpu") -> tuple[float, float]:
    """(abs, rel) tolerance of `stage` in `table`; 'default' precision only where it was measured."""
    if precision != "highest" and backend != "cpu":
        raise ValueError(f"no parity tolerances measured for matmul precision {precision!r} on "
                         f"{backend}; use precision 'highest' or measure them first")
    return TOLERANCES[table][stage_key(stage)]
