"""Injects known porting bugs into the JAX side and reports which parity stages catch them.

  PYTHONPATH=. python tools/inject_bugs.py model [BUG ...]   # tests/test_parity.py's cases
  PYTHONPATH=. python tools/inject_bugs.py eval               # tests/test_eval_parity.py's case

Each bug is a temporary, in-process patch (a method's source with one substring replaced, or a
module attribute, or a norm's settings after the model is built), undone afterwards. For every
bug it prints the first failing stage, its error as a multiple of the abs tolerance, and how many
stages fail (plain tiny case, norm-sensitive case, and the split path for some). Not a test (one
bug costs several compilations); the table in tests/test_parity.py's docstring comes from it.
"""
import contextlib
import inspect
import sys
import textwrap
import numpy as np, jax, jax.numpy as jnp, torch
from flax import nnx
from convert_weights import verify, torch_noc
from convert_weights.torch_reference import build_reference
from skipclick_jax import config_lib, resize
from skipclick_jax.model import skipclick as sk, dinov2 as dv, layers as ly
from skipclick_jax.evaluation import protocol as pr, scheduler as sc
from skipclick_jax.model.api import model_functions
from tests.norm_sensitive import make_norm_sensitive_
from tests import test_parity as tp

@contextlib.contextmanager
def src(obj_owner, name, old, new, module):
    """Replaces `old` by `new` in the source of obj_owner.name, executed in module's globals."""
    orig = getattr(obj_owner, name)
    code = textwrap.dedent(inspect.getsource(orig))
    assert old in code, (name, old)
    ns = dict(vars(module))
    exec(code.replace(old, new), ns)
    setattr(obj_owner, name, ns[name])
    try:
        yield
    finally:
        setattr(obj_owner, name, orig)

@contextlib.contextmanager
def setattr_(owner, name, value):
    orig = getattr(owner, name); setattr(owner, name, value)
    try: yield
    finally: setattr(owner, name, orig)

def cubic_taps_ac(n_in, n_out):
    a = np.float32(-0.75); F = np.float32
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    scale = F(n_in - 1) / F(n_out - 1)
    idx = np.zeros((n_out, 4), np.int32); wts = np.zeros((n_out, 4), np.float32)
    for i in range(n_out):
        s = F(scale * i); f = int(np.floor(s)); t = s - F(f)
        idx[i] = [min(max(k, 0), n_in - 1) for k in range(f - 1, f + 3)]
        wts[i] = [far(t + 1), near(t), near(1 - t), far((1 - t) + 1)]
    return idx, wts
bicubic_ac = lambda x, size, channels_last=True: resize._resize(x, size, cubic_taps_ac, channels_last)

def norms(model, prefix, kind):
    return [m for path, m in nnx.iter_graph(model) if isinstance(m, kind) and path and path[0] == prefix]

def post(prefix, kind, fn):
    def apply(model):
        for m in norms(model, prefix, kind): fn(m)
    return apply
def eps(v): return lambda m: setattr(m, "epsilon", v)
onepass = lambda m: setattr(m, "use_fast_variance", True)
def no_affine(m):
    m.scale[...] = jnp.ones_like(m.scale[...]); m.bias[...] = jnp.zeros_like(m.bias[...])
LN, GN = nnx.LayerNorm, nnx.GroupNorm
tanh_gelu = lambda x: jax.nn.gelu(x, approximate=True)
nullctx = contextlib.nullcontext

MODEL_BUGS = {
  "DINOv2 LN eps 1e-5": (nullctx, post("feature_extractor", LN, eps(1e-5))),
  "EncoderStack LN eps 1e-5": (nullctx, post("backbone_mix", LN, eps(1e-5))),
  "neck GN eps 1e-6": (nullctx, post("neck", GN, eps(1e-6))),
  "head GN eps 1e-6": (nullctx, post("head", GN, eps(1e-6))),
  "DINOv2 LN one-pass var": (nullctx, post("feature_extractor", LN, onepass)),
  "EncoderStack LN one-pass var": (nullctx, post("backbone_mix", LN, onepass)),
  "neck GN one-pass var": (nullctx, post("neck", GN, onepass)),
  "head GN one-pass var": (nullctx, post("head", GN, onepass)),
  "DINOv2 LN no affine": (nullctx, post("feature_extractor", LN, no_affine)),
  "EncoderStack LN no affine": (nullctx, post("backbone_mix", LN, no_affine)),
  "neck GN no affine": (nullctx, post("neck", GN, no_affine)),
  "tanh GELU in MLPs": (lambda: setattr_(ly, "gelu", tanh_gelu), None),
  "tanh GELU in neck/head": (lambda: setattr_(sk, "gelu", tanh_gelu), None),
  "fuse: taps reversed": (lambda: src(sk.SkipClick, "fuse_taps", "jnp.concatenate(taps,", "jnp.concatenate(taps[::-1],", sk), None),
  "click maps [disks, prev]": (lambda: src(sk.SkipClick, "click_embedding", "[prev_mask[..., None].astype(jnp.float32), disks]", "[disks, prev_mask[..., None].astype(jnp.float32)]", sk), None),
  "click maps pos/neg swapped": (lambda: src(sk.SkipClick, "click_embedding", ", disks]", ", disks[..., ::-1]]", sk), None),
  "disk boundary < r^2": (lambda: setattr_(sk, "disk_maps", _strict_disks()), None),
  "neck concat [tap, X]": (lambda: contextlib.ExitStack(), "NECK"),
  "head concat reversed": (lambda: src(sk.SegFormerHead, "__call__", "jnp.concatenate(ys,", "jnp.concatenate(ys[::-1],", sk), None),
  "head resize align_corners=True": (lambda: src(sk.SegFormerHead, "__call__", "resize.bilinear(conv(f)", "resize.bilinear_ac(conv(f)", sk), None),
  "final resize align_corners=False": (lambda: contextlib.ExitStack(), "FINAL"),
  "stack pos-embed bicubic align_corners=True": (lambda: src(sk.EncoderStack, "position_embedding", "resize.bicubic(", "bicubic_ac(", _with(sk, bicubic_ac=bicubic_ac)), None),
  "stack pos-embed antialiased": (lambda: src(sk.EncoderStack, "position_embedding", "resize.bicubic(", "resize.bicubic_antialias(", sk), None),
  "DINOv2 pos-embed not antialiased": (lambda: src(dv.DinoV2, "position_embedding", "resize.bicubic_antialias(", "resize.bicubic(", dv), None),
  "no LayerScale": (nullctx, lambda model: [setattr(m.gamma, "value", jnp.ones_like(m.gamma[...])) for _, m in nnx.iter_graph(model) if isinstance(m, dv.LayerScale)]),
  "uint8 x*(1/255)": (lambda: src(sk.SkipClick, "backbone_taps", "_true_divide(images.astype(jnp.float32), 255.0)", "images.astype(jnp.float32) * (1 / 255.0)", sk), None),
}

class _with:
    def __init__(self, module, **extra): self.__dict__.update(vars(module)); self.__dict__.update(extra)

def _strict_disks():
    code = textwrap.dedent(inspect.getsource(sk.disk_maps)).replace("<= radius**2", "< radius**2")
    ns = dict(vars(sk)); exec(code, ns); return ns["disk_maps"]

def special(kind):
    st = contextlib.ExitStack()
    if kind == "NECK":
        st.enter_context(src(sk.SkipClick, "stages", "[grid, taps[i]]", "[taps[i], grid]", sk))
        st.enter_context(src(sk.SimpleFPN, "__call__", "channels=slice(0, self.in_dim)", "channels=slice(self.in_dim, None)", sk))
        st.enter_context(src(sk.SimpleFPN, "skip_halves", "channels=slice(self.in_dim, None)", "channels=slice(0, self.in_dim)", sk))
    if kind == "FINAL":
        st.enter_context(src(sk.SkipClick, "stages", "resize.bilinear_ac(head_logits", "resize.bilinear(head_logits", sk))
        st.enter_context(src(sk.SkipClick, "_decode", "resize.bilinear_ac(head_logits", "resize.bilinear(head_logits", sk))
    return st

SPLIT = {"baseline", "EncoderStack LN eps 1e-5", "neck GN eps 1e-6", "fuse: taps reversed",
         "click maps [disks, prev]", "neck concat [tap, X]", "final resize align_corners=False"}

def fresh():
    sk._initializer.cache_clear(); jax.clear_caches()

def failing(rows):
    return [f"{r['stage']}({r['max_abs']:.2g}/{r['tol_abs']:.2g})" for r in rows if not r["ok"]]

def summarize(rows):
    bad = [r for r in rows if not r["ok"]]
    if not bad: return "pass"
    first = bad[0]
    worst = max(bad, key=lambda r: r["max_abs"] / max(r["tol_abs"], 1e-30))
    return f"{first['stage']} {first['max_abs']:.2g} ({first['max_abs']/max(first['tol_abs'],1e-30):.0f}x tol); worst {worst['stage']} {worst['max_abs']/max(worst['tol_abs'],1e-30):.0f}x; {len(bad)} fail"

def model_cases():
    cfg = config_lib.tiny_model_config()
    ref = build_reference(cfg, seed=0)
    ncfg = config_lib.tiny_model_config(); ncfg.head.upsample = "x4"
    nref = build_reference(ncfg, seed=0)
    make_norm_sensitive_(nref, verify.example_inputs(168, 280, seed=0))
    cases = []
    for name, r, c, table, size, seed in [("normal", ref, cfg, "dinov2_tiny", (168, 560), 0),
                                          ("norm", nref, ncfg, "dinov2_tiny_norm_sensitive", (168, 280), 1)]:
        inputs = verify.example_inputs(*size, seed=seed)
        t = verify.torch_stages(r, *inputs)
        (image, prev, num, den), tin = tp.split_inputs(168, 280)
        ts = verify.torch_stages(r, *tin)
        cases.append((name, r, c, table, inputs, t, (image, prev, num, den), ts))
    return cases

def run_model(bugs):
    cases = model_cases()
    out = {}
    for bug, (ctx, postfn) in bugs.items():
        line = {}
        cm = special(postfn) if isinstance(postfn, str) else ctx()
        with cm:
            for name, r, c, table, inputs, t, sin, ts in cases:
                fresh()
                model = verify.model_from_reference(r, c)
                if callable(postfn): postfn(model)
                rows = verify.compare(t, verify.jax_stages(model, *inputs), table)
                line[name] = summarize(rows)
                if bug in SPLIT:
                    srows = verify.compare(ts, verify.jax_split_stages(model, *sin), table)
                    line[name + "-split"] = summarize(srows)
                if bug == "baseline":
                    print(verify.format_rows(rows, name)); print(verify.format_rows(srows, name + " split"))
        out[bug] = line
        print(f"{bug:<45} " + " | ".join(f"{k}: {v}" for k, v in line.items()), flush=True)
    return out

if __name__ == "__main__" and sys.argv[1] == "model":
    run_model({"baseline": (nullctx, None), **{k: MODEL_BUGS[k] for k in sys.argv[2:] or MODEL_BUGS}})

EVAL_BUGS = {
  "eval: logits of the flip not flipped back": ("step", "0.5 * (both[:b] + flip(both[b:]))", "0.5 * (both[:b] + both[b:])"),
  "eval: flipped click column off by one": ("step", "(s - 1) * w[:, None] - s * points[..., 1]", "s * w[:, None] - s * points[..., 1]"),
  "eval: prev mask of the flip not flipped": ("step", "jnp.concatenate([prev, flip(prev)])", "jnp.concatenate([prev, prev])"),
  "eval: image of the flip not flipped": ("init_state", "image[:, :, ::-1]", "image"),
  "eval: image/prob resize align_corners=False": ("_host_taps", "resize.linear_taps(n_in, n_out, True)", "resize.linear_taps(n_in, n_out, False)"),
}

def run_eval():
    from tests import test_eval_parity as tep
    from skipclick_jax import metrics
    cfg = config_lib.tiny_model_config()
    ref = build_reference(cfg, seed=1)
    with torch.no_grad():
        ref.patch_embed_coords.proj.weight.mul_(5.0)
        ref.head.conv_seg.weight.mul_(10.0)
        ref.head.conv_seg.bias.mul_(10.0).add_(4.5)
    model = verify.model_from_reference(ref, cfg)
    protocol = pr.Protocol(size=56, max_clicks=6, flip=True)
    samples = tep.with_instances(tep.make_samples())
    expected = [torch_noc.noc_loop(ref, s["image"], s["gt"], size=56, max_clicks=6, flip=True) for s in samples]
    for bug, (fn, old, new) in {"baseline": ("step", "", ""), **EVAL_BUGS}.items():
        pr.jitted_functions.cache_clear(); jax.clear_caches()
        module = pr if hasattr(pr, fn) else sc
        with src(module, fn, old, new, module):
            res = sc.run_samples(model_functions(model), samples, protocol, batch_size=2, bucket=32)
        bad = [s["id"] for s, r, (c, i) in zip(samples, res, expected)
               if r["clicks"] != c or not np.array_equal(metrics.ious_from_counts(r["inter"], r["union"]), i)]
        first = next(((s["id"], k) for s, r, (c, _) in zip(samples, res, expected)
                      for k in range(min(len(c), len(r["clicks"]))) if r["clicks"][k] != c[k]), None)
        print(f"{bug:<45} samples differing: {len(bad)}/{len(samples)} {bad}; first differing click {first}", flush=True)

if __name__ == "__main__" and sys.argv[1] == "eval":
    run_eval()
