"""``rlvr_kernels.integrations.trl.ChunkedLogProbFunction``: TRL 1.16's ``trl.kernels.ChunkedLogProbFunction`` on this
package's vocabulary pass, and ``use_rlvr_kernels_in_trl()``, the one-line patch that makes a stock ``GRPOTrainer``
use it.

- parity with TRL's own function (values of every output, gradients w.r.t. hidden, weight and bias; fp32 and bf16;
  softcap, logit scale, temperature, bias; targets outside [0, V) as TRL treats them; outputs not requested are None;
  output dtypes; autocast);
- exact gradients: the softcap chain rule of the reference rows against torch autograd in float64, and the whole
  function against autograd on the full logits;
- the Triton row kernels (constexpr flags) under the interpreter against the reference rows and TRL;
- the patch: TRL's ``add_fused_lm_head`` forward and a stock ``GRPOTrainer`` call ours, and train like TRL's.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from trl.kernels.chunked_logprob import ChunkedLogProbFunction as TRLFunction  # noqa: E402

from rlvr_kernels._backend import triton_interpreting  # noqa: E402
from rlvr_kernels.integrations.trl import (  # noqa: E402
    OPTIONAL_OUTPUTS,
    ChunkedLogProbFunction,
    rlvr_kernels_in_trl,
    use_rlvr_kernels_in_trl,
)
from rlvr_kernels.reference import logprobs as ref  # noqa: E402

ALL = ("log_probs",) + OPTIONAL_OUTPUTS
N, H, V = 11, 16, 300
CASES = {  # (final_logit_softcapping, logit_scale, temperature)
    "plain": (None, 1.0, 1.0),
    "temperature": (None, 1.0, 0.7),
    "scale": (None, 0.5, 0.9),
    "softcap": (30.0, 1.0, 1.0),
    "softcap_scale_temp": (3.0, 1.7, 0.6),
}


@pytest.fixture(autouse=True)
def restore_trl():
    yield
    use_rlvr_kernels_in_trl(False)


def inputs(dtype, bias=True, oor=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = 0  # first column (no earlier column for is_top1)
    if oor:  # TRL's function ignores no row: a target outside [0, V) has the target logit 0
        t[0], t[1] = -100, V + 3
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), t


def call(fn, h, w, b, t, case, outputs=ALL, grads=True):
    """Outputs and (hidden, weight, bias) gradients of ``fn`` for a loss weighting logp and entropy differently."""
    sc, ls, temp = CASES[case] if isinstance(case, str) else case
    h, w = h.clone().requires_grad_(grads), w.clone().requires_grad_(grads)
    b = None if b is None else b.clone().requires_grad_(grads)
    out = fn.apply(h, w, b, t, temp, 64, sc, ls, outputs)
    if not grads:
        return out, None
    gl = torch.linspace(-1.0, 1.0, N)
    loss = (out[0] * gl).sum()
    if out[1] is not None:
        loss = loss + (out[1] * torch.linspace(0.5, -0.3, N)).sum()
    loss.backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


def naive(h, w, b, t, case):
    """float64 full-logits oracle with TRL's semantics, differentiable by autograd."""
    sc, ls, temp = CASES[case] if isinstance(case, str) else case
    y = h @ w.T + (0 if b is None else b)
    y = y * ls
    if sc is not None:
        y = sc * torch.tanh(y / sc)
    z = y / temp
    lse = torch.logsumexp(z, -1)
    ok = (t >= 0) & (t < V)
    zt = torch.where(ok, z.gather(1, t.clamp(0, V - 1).unsqueeze(1)).squeeze(1), 0.0)
    p = torch.softmax(z, -1)
    ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    lssp = torch.logsumexp(2 * z, -1) - 2 * lse
    top1 = ok & (z.argmax(-1) == t)
    return zt - lse, ent, lssp, z.mean(-1), top1


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, err


def rel(a, b, tol):
    scale = max(b.double().abs().max().item(), 1e-12)
    close(a / scale, b / scale, tol)


# ----------------------------------------------------------------------------------------------------------------
# parity with TRL's function


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_trl(case, bias):
    h, w, b, t = inputs(torch.float32, bias)
    (o_t, g_t), (o_r, g_r) = call(TRLFunction, h, w, b, t, case), call(ChunkedLogProbFunction, h, w, b, t, case)
    for a, c in zip(o_r[:4], o_t[:4]):
        assert a.dtype == torch.float32 and a.shape == (N,)
        close(a, c, 5e-6)
    assert o_r[4].dtype == torch.bool
    assert torch.equal(o_r[4][2:], o_t[4][2:])  # in-range rows; TRL's is_top1 of an out-of-range target is noise
    assert not o_r[4][:2].any()
    for a, c, x in zip(g_r, g_t, (h, w, b)):
        if x is None:
            assert a is None and c is None
            continue
        assert a.dtype == x.dtype
        rel(a, c, 2e-6)


@pytest.mark.parametrize("case", ["plain", "softcap_scale_temp"])
def test_bf16_matches_trl_and_is_closer_to_the_truth(case):
    h, w, b, t = inputs(torch.bfloat16)
    (o_t, g_t), (o_r, g_r) = call(TRLFunction, h, w, b, t, case), call(ChunkedLogProbFunction, h, w, b, t, case)
    # the truth for these (bf16-rounded) inputs, in float64
    hd, wd, bd = (x.double().requires_grad_() for x in (h, w, b))
    o_x = naive(hd, wd, bd, t, case)
    (o_x[0] * torch.linspace(-1.0, 1.0, N).double() + o_x[1] * torch.linspace(0.5, -0.3, N).double()).sum().backward()
    for i in range(4):
        assert o_r[i].dtype == torch.float32
        close(o_r[i], o_t[i], 0.05)  # TRL rounds every logits tile to bf16, the package keeps fp32 logits
        close(o_r[i], o_x[i], 2e-5)
    assert torch.equal(o_r[4], o_x[4])
    for a, c, x in zip(g_r, g_t, (hd, wd, bd)):
        assert a.dtype == torch.bfloat16
        rel(a, c, 0.03)
        rel(a, x.grad, 0.01)  # bf16 rounding of the returned gradient


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"), ("is_top1",), ("mean_logits", "x")])
def test_outputs_not_requested_are_none(outputs):
    h, w, b, t = inputs(torch.float32)
    o_t, _ = call(TRLFunction, h, w, b, t, "softcap", outputs, grads=False)
    o_r, _ = call(ChunkedLogProbFunction, h, w, b, t, "softcap", outputs, grads=False)
    for a, c in zip(o_r, o_t):
        assert (a is None) == (c is None)
    close(o_r[0], o_t[0], 5e-6)
    # the non-differentiable ones, as TRL
    o_r, _ = call(ChunkedLogProbFunction, h, w, b, t, "softcap")
    assert [o.requires_grad for o in o_r] == [True, True, False, False, False]


def test_entropy_only_gradient_and_no_gradient():
    h, w, b, t = inputs(torch.float32)
    outs = {}
    for fn in (TRLFunction, ChunkedLogProbFunction):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
        _, ent, *_ = fn.apply(hh, ww, bb, t, 0.8, 64, 5.0, 1.1, ("entropy",))
        ent.sum().backward()
        outs[fn] = (hh.grad, ww.grad, bb.grad)
    for a, c in zip(outs[ChunkedLogProbFunction], outs[TRLFunction]):
        rel(a, c, 2e-6)
    # no input needs a gradient: nothing is recomputed
    lp, *_ = ChunkedLogProbFunction.apply(h, w, b, t, 1.0, 64, None, 1.0, ())
    assert not lp.requires_grad


def test_autocast_as_trl():
    h, w, b, t = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (o_t, g_t), (o_r, g_r) = (
            call(TRLFunction, h, w, b, t, "softcap"),
            call(ChunkedLogProbFunction, h, w, b, t, "softcap"),
        )
    for i in range(4):
        assert o_r[i].dtype == torch.float32
        close(o_r[i], o_t[i], 0.05)
    for a, c in zip(g_r, g_t):
        assert a.dtype == torch.float32  # the inputs' dtype, computed in bf16 like TRL
        rel(a, c, 0.03)
    # the GEMM ran on bf16 operands: not the fp32 result
    (o32, _) = call(ChunkedLogProbFunction, h, w, b, t, "softcap", grads=False)
    assert (o_r[0] - o32[0]).abs().max() > 1e-4


def test_empty_batch():
    h, w, b, _ = inputs(torch.float32)
    t = torch.zeros(0, dtype=torch.long)
    hh = h[:0].clone().requires_grad_()
    ww = w.clone().requires_grad_()
    out = ChunkedLogProbFunction.apply(hh, ww, b, t, 1.0, 64, 3.0, 1.0, ALL)
    assert [tuple(o.shape) for o in out] == [(0,)] * 5
    (out[0].sum() + out[1].sum()).backward()
    assert ww.grad is not None and float(ww.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# exact gradients (float64)


@pytest.mark.parametrize("case", ["temperature", "softcap_scale_temp"])
def test_reference_rows_against_autograd_fp64(case):
    sc, ls, temp = CASES[case]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 50, (6,), generator=g)
    zr = z.clone().requires_grad_()
    y = zr * ls
    if sc is not None:
        y = sc * torch.tanh(y / sc)
    x = y / temp
    lse = torch.logsumexp(x, -1)
    logp = x.gather(1, t.unsqueeze(1)).squeeze(1) - lse
    ent = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    lp, en, ls_, ex = ref.row_stats_ext(
        z, t, 1 / temp, -1, logit_scale=ls, softcap=sc, log_sum_sq_probs=True, mean_logits=True, is_top1=True
    )
    close(lp, logp, 1e-12)
    close(en, ent, 1e-12)
    close(ls_, lse, 1e-12)
    close(ex["log_sum_sq_probs"], torch.log((torch.softmax(x, -1) ** 2).sum(-1)), 1e-12)
    close(ex["mean_logits"], x.mean(-1), 1e-12)
    assert torch.equal(ex["is_top1"], x.argmax(-1) == t)
    gl = torch.randn(6, generator=g, dtype=torch.float64)
    gh = torch.randn(6, generator=g, dtype=torch.float64)
    (logp * gl + ent * gh).sum().backward()
    dz = ref.row_grad_ext_(z.clone(), t, ls_, en, gl, gh, gl, 1 / temp, -1, logit_scale=ls, softcap=sc)
    close(dz, zr.grad, 1e-12)


@pytest.mark.parametrize("case", ["plain", "softcap_scale_temp"])
def test_function_against_autograd_on_full_logits(case):
    h, w, b, t = inputs(torch.float64)
    o_r, g_r = call(ChunkedLogProbFunction, h, w, b, t, case)
    hd, wd, bd = (x.clone().requires_grad_() for x in (h, w, b))
    o_x = naive(hd, wd, bd, t, case)
    (o_x[0] * torch.linspace(-1.0, 1.0, N).double() + o_x[1] * torch.linspace(0.5, -0.3, N).double()).sum().backward()
    for i in range(4):
        close(o_r[i], o_x[i], 1e-5)  # the outputs are fp32, as TRL's
    assert torch.equal(o_r[4], o_x[4])
    for a, x in zip(g_r, (hd, wd, bd)):
        assert a.dtype == torch.float64
        rel(a, x.grad, 1e-6)


def test_cpu_routes_plain_case_to_native_rows(monkeypatch):
    seen = []
    from rlvr_kernels import vocab_pass  # the pass with extra outputs lives there

    rows = vocab_pass.vocab_rows
    real_native, real_ext = rows.row_stats, ref.row_stats_ext
    monkeypatch.setattr(rows, "row_stats", lambda *a, **k: seen.append("native") or real_native(*a, **k))
    monkeypatch.setattr(ref, "row_stats_ext", lambda *a, **k: seen.append("ext") or real_ext(*a, **k))
    monkeypatch.setenv("RLVR_KERNELS_BACKEND", "torch")
    h, w, b, t = inputs(torch.float32)
    call(ChunkedLogProbFunction, h, w, b, t, "scale", ("log_probs", "entropy"), grads=False)
    assert seen == ["native"]
    seen.clear()
    call(ChunkedLogProbFunction, h, w, b, t, "softcap", ("log_probs", "entropy"), grads=False)
    call(ChunkedLogProbFunction, h, w, b, t, "plain", ("mean_logits",), grads=False)
    assert seen == ["ext", "ext"]


# ----------------------------------------------------------------------------------------------------------------
# Triton row kernels (interpreter)

needs_interpreter = pytest.mark.skipif(not triton_interpreting(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")


@needs_interpreter
@pytest.mark.parametrize("case", ["scale", "softcap_scale_temp"])
def test_triton_row_kernels_match_reference_rows(case):
    from rlvr_kernels.kernels import logprobs as K

    sc, ls, temp = CASES[case]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, 300, generator=g) * 3
    t = torch.randint(0, 300, (5,), generator=g)
    t[1] = 0
    z[2, t[2]] = 40.0
    ex = dict.fromkeys(("log_sum_sq_probs", "mean_logits", "is_top1"))
    got = K.logits_forward(z, t, 1 / temp, -1, logit_scale=ls, softcap=sc, extras=ex)
    want = ref.row_stats_ext(
        z, t, 1 / temp, -1, logit_scale=ls, softcap=sc, log_sum_sq_probs=True, mean_logits=True, is_top1=True
    )
    for a, c in zip(got, want[:3]):
        close(a, c, 5e-6)
    for k in ex:
        close(ex[k].float(), want[3][k].float(), 5e-6)
    assert bool(ex["is_top1"][2])
    gl, gh = torch.randn(5, generator=g), torch.randn(5, generator=g)
    dz = K.logits_backward(z, t, want[2], want[1], gl, gh, 1 / temp, -1, logit_scale=ls, softcap=sc)
    close(
        dz,
        ref.row_grad_ext_(z.clone(), t, want[2], want[1], gl, gh, gl, 1 / temp, -1, logit_scale=ls, softcap=sc),
        1e-6,
    )


@needs_interpreter
@pytest.mark.parametrize(
    "case, outputs", [("scale", ("log_probs", "entropy")), ("plain", ALL), ("softcap_scale_temp", ALL)]
)
def test_triton_backend_matches_trl(case, outputs, monkeypatch):
    """("scale", log-probs and entropy): the plain row kernels (the scale folded into the temperature)."""
    monkeypatch.setenv("RLVR_KERNELS_BACKEND", "triton")
    h, w, b, t = inputs(torch.float32)
    (o_t, g_t) = call(TRLFunction, h, w, b, t, case, outputs)
    (o_r, g_r) = call(ChunkedLogProbFunction, h, w, b, t, case, outputs)
    for i in range(4):
        assert (o_r[i] is None) == (o_t[i] is None)
        if o_r[i] is not None:
            close(o_r[i], o_t[i], 5e-6)
    if "is_top1" in outputs:
        assert torch.equal(o_r[4][2:], o_t[4][2:])
    for a, c in zip(g_r, g_t):
        rel(a, c, 2e-6)


_COMPILE_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlvr_kernels.kernels import logprobs as K

target = GPUTarget("cuda", 90, 32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(k):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text)}


out = []
flags = {"HAS_SOFTCAP": True, "HAS_SQ": True, "HAS_MEAN": True, "HAS_TOP1": True}
for block in K.ROW_BLOCKS:
    warps = K.row_warps(block)
    sig = {"Z": "*fp32", "Tgt": "*i64", "Logp": "*fp32", "Ent": "*fp32", "Lse": "*fp32", "Sq": "*fp32",
           "Mean": "*fp32", "Top1": "*i8", "N": "i32", "V": "i32", "stride_zn": "i64", "inv_temp": "fp32",
           "ignore_index": "i64", "logit_scale": "fp32", "softcap": "fp32", "BLOCK_V": "constexpr",
           **{f: "constexpr" for f in flags}}
    fwd_block = min(block, K.EXT_MAX_BLOCK)  # the launcher caps the forward's block
    k = triton.compile(ASTSource(fn=K._logits_fwd_ext_kernel, signature=sig,
                                 constexprs={"BLOCK_V": fwd_block, **flags}),
                       target=target, options=dict(num_warps=K.row_warps(fwd_block)))
    out.append(("fwd", fwd_block, usage(k)))
    for dz in ("*bf16", "*fp32"):
        sig = {"Z": "*fp32", "Tgt": "*i64", "Lse": "*fp32", "Ent": "*fp32", "GL": "*fp32", "GH": "*fp32",
               "CP": "*fp32", "DZ": dz, "N": "i32", "V": "i32", "stride_zn": "i64", "stride_dzn": "i64",
               "col_offset": "i64", "inv_temp": "fp32", "ignore_index": "i64", "logit_scale": "fp32",
               "softcap": "fp32", "HAS_GH": "constexpr", "BLOCK_V": "constexpr"}
        k = triton.compile(ASTSource(fn=K._logits_bwd_softcap_kernel, signature=sig,
                                     constexprs={"HAS_GH": True, "BLOCK_V": block}),
                           target=target, options=dict(num_warps=warps))
        out.append(("bwd " + dz, block, usage(k)))
print(json.dumps(out))
"""


def test_softcap_and_extra_output_kernels_compile_for_sm90_without_spills(tmp_path):
    """The kernels with every TRL option on compile for sm_90 with Triton's bundled toolchain, without spills (as
    tests/test_logprobs.py checks the plain ones)."""
    import json
    import os
    import subprocess
    import sys

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, b)) for b in ("ptxas", "cuobjdump")):
        pytest.skip("triton's bundled ptxas / cuobjdump are not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 9
    for kind, block, use in rows:
        print(kind, f"BLOCK_V={block}", use)
        assert use.get("REG", 0) > 0, (kind, block)
        assert use.get("LOCAL", 0) == 0 and use.get("STACK", 0) == 0, ("spills", kind, block, use)


# ----------------------------------------------------------------------------------------------------------------
# the patch: TRL's fused head and a stock GRPOTrainer


def test_patch_swaps_the_name_trl_looks_up():
    import trl.kernels
    import trl.trainer.utils as trl_utils

    assert trl_utils._ChunkedLogProbFunction is TRLFunction and not rlvr_kernels_in_trl()
    use_rlvr_kernels_in_trl()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction and rlvr_kernels_in_trl()
    assert trl.kernels.ChunkedLogProbFunction is ChunkedLogProbFunction
    use_rlvr_kernels_in_trl(False)
    assert trl_utils._ChunkedLogProbFunction is TRLFunction and trl.kernels.ChunkedLogProbFunction is TRLFunction


def _tiny_lm(softcap=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    if softcap is not None:
        cfg.final_logit_softcapping = softcap
        cfg.logit_scale = 0.8
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_add_fused_lm_head_uses_ours(softcap, monkeypatch):
    """TRL's patched forward (labels with -100 padding, scored on CPU at every position with clamped labels, then
    masked) gives the same per-token outputs, loss and gradients through our function."""
    from trl.trainer.utils import add_fused_lm_head

    calls = []
    real = ChunkedLogProbFunction.forward
    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    results = []
    for patched in (False, True):
        use_rlvr_kernels_in_trl(patched)
        model = _tiny_lm(softcap)
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy", "is_top1"))
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 1
    (o_t, g_t), (o_r, g_r) = results
    close(o_r.loss, o_t.loss, 1e-6)
    for k in ("log_probs", "entropy"):
        close(getattr(o_r, k), getattr(o_t, k), 5e-6)
    assert torch.equal(o_r.is_top1, o_t.is_top1) and o_r.log_sum_sq_probs is None
    assert float(o_r.log_probs[0, :3].detach().abs().sum()) == 0.0  # masked as TRL masks
    assert g_r.keys() == g_t.keys()
    for n in g_t:
        rel(g_r[n], g_t[n], 1e-5)


def test_stock_grpo_trainer_calls_ours_and_trains_like_trl(tmp_path, monkeypatch):
    from trl import GRPOConfig, GRPOTrainer

    from _trl_common import BASE, dataset, even_words, save_tiny_model, tiny_model, tokenizer

    torch.set_num_threads(1)
    model_dir = save_tiny_model(tmp_path / "tiny")
    calls = []
    real = ChunkedLogProbFunction.forward
    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    logs = []
    for patched in (False, True):
        use_rlvr_kernels_in_trl(patched)  # the one line
        args = GRPOConfig(output_dir=str(tmp_path / str(patched)), **{**BASE, "max_steps": 1, "temperature": 0.9})
        trainer = GRPOTrainer(
            model=tiny_model(model_dir),
            reward_funcs=even_words,
            args=args,
            train_dataset=dataset(),
            processing_class=tokenizer(),
        )
        trainer.train()
        logs.append([row for row in trainer.state.log_history if "loss" in row])
        assert bool(calls) == patched
    for r, g in zip(*logs):
        for k in ("loss", "grad_norm", "entropy"):
            assert math.isclose(r[k], g[k], rel_tol=1e-4, abs_tol=1e-6), (k, r[k], g[k])
    assert abs(logs[0][0]["grad_norm"]) > 1e-6
