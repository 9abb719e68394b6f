"""RLVRLoss under ``torch.compile(fullgraph=True)``: no graph break on both paths (fused and composable), the eager
numbers forward (loss and every metric) and backward, a schedule whose step changes every call without a
recompilation per step, bf16 inputs with NaN in padded positions, ``opcheck`` of the loss's custom ops, and the value
checks: ValueError in eager mode, device-side asserts (or nothing, ``compiled_value_checks=False``) when compiled.

Shapes are tiny; every test compiles one function after ``torch._dynamo.reset()``. Most use the ``aot_eager``
backend (dynamo + AOTAutograd: the same tracing, fake tensors and joint forward/backward graph as inductor, without
the C++ build); a few use inductor."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from rlvr_kernels import RLVRLoss, TemporalSchedule, fused_linear_logprobs

B, T, H, V = 3, 6, 8, 40
SCHEDULE = TemporalSchedule(total_steps=8)


def make(seed: int = 0, dtype=torch.float32):
    """Hidden states, head, ids, loss mask (ragged rows, one empty), advantages, old / ref log-probs, DelTA-like
    coefficients."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, H, generator=g) * 0.7).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.7).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([6, 4, 0])[:, None]).float()
    adv = torch.tensor([0.8, -0.5, 0.3])
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x.float(), w.float(), ids, backend="torch")
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, generator=g)
    coef = 0.8 + 0.4 * torch.rand(B, T, generator=g)
    return x, w, ids, mask, adv, old, ref, coef


CASES = {
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo", beta=0.0, entropy_coef=0.01),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=T),
    "bnpo": dict(loss_type="bnpo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0),
    "cispo": dict(loss_type="cispo", epsilon_high=2.0, beta=0.0),
    "dppo": dict(loss_type="dppo", beta=0.0),
    "cppo": dict(loss_type="cppo", beta=0.0),
    "tp_schedule": dict(loss_type="grpo", credit="tp_schedule", schedule=SCHEDULE),
    "forking": dict(loss_type="dapo", credit="forking", schedule=SCHEDULE, beta=0.0),
    "entropy_adv": dict(loss_type="dapo", credit="entropy_adv", schedule=SCHEDULE),
    "d3s": dict(loss_type="grpo", credit="d3s", d3s_scope="sequence", beta=0.0),
    "d3s_batch": dict(loss_type="dapo", credit="d3s", beta=0.0),  # batch-wide selection: composable path only
    "delta": dict(loss_type="dapo", credit="delta"),
}


def _loss_fn(module, ids, mask, adv, old, ref, coef, **kw):
    """The function to compile: ``(x, w, step) -> (loss, metrics by name)``."""
    delta = coef if module.config.credit == "delta" else None

    def f(x, w, step):
        loss, metrics = module(
            x,
            w,
            ids,
            mask,
            adv,
            old_per_token_logps=old,
            ref_per_token_logps=ref,
            step=step,
            delta_coefficients=delta,
            **kw,
        )
        return loss, dict(metrics.named)

    return f


def _run(fn, x, w, step, compiled: bool, backend: str = "aot_eager"):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend=backend)
    loss, named = fn(xx, ww, step)
    (loss * 0.5).backward()  # an upstream gradient != 1: the compiled backward scales the stored gradients
    return loss.detach(), {k: v.detach() for k, v in named.items()}, xx.grad, ww.grad


def _assert_same(got, want, atol=1e-6, rtol=1e-5):
    (lg, mg, xg, wg), (le, me, xe, we) = got, want
    torch.testing.assert_close(lg, le, atol=atol, rtol=rtol)
    assert mg.keys() == me.keys()
    for k in me:
        torch.testing.assert_close(mg[k], me[k], atol=atol, rtol=rtol, equal_nan=True, msg=k)
    torch.testing.assert_close(xg, xe, atol=atol, rtol=rtol)
    torch.testing.assert_close(wg, we, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_loss_matches_eager(case, fused):
    """fullgraph=True (a graph break would raise) and the eager loss, metrics and gradients."""
    kw = CASES[case]
    if fused and case == "d3s_batch":
        pytest.skip("d3s_scope='batch' has no fused path")
    x, w, ids, mask, adv, old, ref, coef = make(1)
    module = RLVRLoss(fused=fused, backend="torch", **kw)
    fn = _loss_fn(module, ids, mask, adv, old, ref, coef)
    step = 3 if module.config.schedule is not None else None
    want = _run(fn, x, w, step, compiled=False)
    got = _run(fn, x, w, step, compiled=True)
    _assert_same(got, want)


@pytest.mark.parametrize("fused", [True, False])
def test_no_graph_breaks_and_inductor(fused):
    """torch._dynamo.explain counts no break (one graph), and inductor gives the eager numbers."""
    x, w, ids, mask, adv, old, ref, coef = make(2)
    module = RLVRLoss(fused=fused, backend="torch", loss_type="grpo", credit="forking", schedule=SCHEDULE)
    fn = _loss_fn(module, ids, mask, adv, old, ref, coef)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x.clone().requires_grad_(), w.clone().requires_grad_(), 2)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    _assert_same(_run(fn, x, w, 2, compiled=True, backend="inductor"), _run(fn, x, w, 2, compiled=False))


def test_compiled_module_returns_liger_metrics():
    """torch.compile of the module itself (fullgraph): ``(loss, LossMetrics)`` as in eager, names included."""
    x, w, ids, mask, adv, old, ref, coef = make(11)
    module = RLVRLoss(fused=True, backend="torch", loss_type="grpo")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    loss, metrics = compiled(x, w, ids, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref)
    want, want_m = module(x, w, ids, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref)
    assert type(metrics).__name__ == "LossMetrics" and len(metrics) == len(want_m) == 2
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics["kl"], want_m["kl"])
    torch.testing.assert_close(metrics[-1], want_m[-1])


@pytest.mark.parametrize("fused", [True, False])
def test_schedule_step_changes_without_recompiling_each_step(fused):
    """step = 1, 2, ..., 6 through one compiled loss: at most one recompilation (dynamo makes the int step dynamic
    when it first changes), never a graph break, and each step's eager numbers (q(k) moves the TP cut-off)."""
    x, w, ids, mask, adv, old, ref, coef = make(3)
    module = RLVRLoss(fused=fused, backend="torch", loss_type="grpo", credit="tp_schedule", schedule=SCHEDULE)
    fn = _loss_fn(module, ids, mask, adv, old, ref, coef)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend=counting)
    for step in range(1, 7):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, named = compiled(xx, ww, step)
        loss.backward()
        want = _run(fn, x, w, step, compiled=False)
        torch.testing.assert_close(named["schedule_value"], torch.tensor(SCHEDULE(step)))
        torch.testing.assert_close(loss.detach() * 0.5, want[0] * 0.5)
        torch.testing.assert_close(xx.grad * 0.5, want[2])
    assert len(graphs) <= 2, f"{len(graphs)} compilations for 6 steps"
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_with_nan_in_padded_positions(fused):
    """bf16 hidden states and head with NaN hidden states, NaN old log-probs and out-of-range ids where the loss
    mask is 0: compiled == eager, everything finite."""
    x, w, ids, mask, adv, old, ref, coef = make(4, dtype=torch.bfloat16)
    pad = mask == 0
    x = x.masked_fill(pad[..., None], float("nan"))
    old = old.masked_fill(pad, float("nan"))
    ids = ids.masked_fill(pad, 10_000)
    module = RLVRLoss(fused=fused, backend="torch", loss_type="dapo", beta=0.04)
    fn = _loss_fn(module, ids, mask, adv, old, ref, coef)
    want = _run(fn, x, w, None, compiled=False)
    got = _run(fn, x, w, None, compiled=True)
    assert torch.isfinite(want[0]) and torch.isfinite(want[2]).all() and torch.isfinite(want[3]).all()
    _assert_same(got, want, atol=1e-2, rtol=1e-2)
    assert not got[2][pad].any()  # padded positions get exactly zero gradient


def _fused_op_args(need=(True, True, True)):
    from rlvr_kernels.loss.token_pass import Batch

    x, w, ids, mask, adv, old, ref, coef = make(5)
    b = torch.randn(V) * 0.1
    cfg = RLVRLoss(loss_type="cppo", beta=0.04, backend="torch").config
    valid = mask != 0
    ids = torch.where(valid, ids, torch.full_like(ids, cfg.ignore_index))
    batch = Batch.build(x, ids, mask, mask, adv, old, ref, None, old, None, None)
    counts = mask.sum(-1)
    norm = counts.sum().clamp(min=1.0)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    return (
        cfg.to_json(),
        x,
        w,
        b,
        ids,
        batch.valid,
        batch.mask,
        batch.adv.contiguous(),
        old,
        ref,
        None,
        old,
        None,
        None,
        counts,
        torch.tensor(0.5, dtype=torch.float64),
        norm,
        norm.clone(),
        list(need),
    )


def test_opcheck_fused_loss():
    torch.library.opcheck(torch.ops.rlvr_kernels.fused_loss.default, _fused_op_args())
    args = _fused_op_args(need=(True, False, False))
    torch.library.opcheck(torch.ops.rlvr_kernels.fused_loss.default, args)


def test_opcheck_credit_hook_and_schedule_value():
    from rlvr_kernels import methods as M

    x, w, ids, mask, adv, old, ref, coef = make(6)
    ent = torch.rand(B, T) * 2
    advt = adv[:, None].expand(B, T).contiguous()
    q = torch.tensor(0.4, dtype=torch.float64)
    ops = torch.ops.rlvr_kernels
    cfg = RLVRLoss(credit="d3s", d3s_scope="sequence", schedule=SCHEDULE, backend="torch").config
    opts = M._hook_options(M.credit("d3s"), cfg)
    for hook, args in (
        ("policy_mask", (mask, advt, ent, None)),
        ("planned_counts", (mask, None, None, None)),
    ):
        torch.library.opcheck(ops.credit_hook.default, (hook, "d3s", opts, q, *args))
    tp = M._hook_options(M.credit("tp_schedule"), cfg)
    torch.library.opcheck(ops.credit_hook.default, ("static_mask", "tp_schedule", tp, q, mask, None, None, None))
    ea = M._hook_options(M.credit("entropy_adv"), cfg)
    torch.library.opcheck(ops.credit_hook.default, ("shape", "entropy_adv", ea, q, mask, advt, ent, None))
    from rlvr_kernels.schedule import _schedule_json

    torch.library.opcheck(ops.schedule_value.default, (_schedule_json(SCHEDULE), 3))
    assert float(ops.schedule_value(_schedule_json(SCHEDULE), 3)) == SCHEDULE(3)


def test_credit_hook_with_a_tensor_q_equals_the_float_call():
    """methods.call_hook: a 0-dim tensor q gives the float call's result (the compiled loss's route)."""
    from rlvr_kernels import methods as M

    x, w, ids, mask, adv, old, ref, coef = make(7)
    ent = torch.rand(B, T) * 2
    advt = adv[:, None].expand(B, T)
    cfg = RLVRLoss(credit="forking", schedule=SCHEDULE, backend="torch").config
    rule = M.credit("forking")
    qf = SCHEDULE(2)
    qt = torch.tensor(qf, dtype=torch.float64)
    for hook, args in (("policy_mask", (advt, ent, mask)), ("planned_counts", (mask,))):
        torch.testing.assert_close(M.call_hook(rule, hook, cfg, *args, q=qt), M.call_hook(rule, hook, cfg, *args, q=qf))


def _bad_inputs(kind: str):
    x, w, ids, mask, adv, old, ref, coef = make(8)
    if kind == "advantages":
        adv = adv.clone()
        adv[0] = float("nan")  # row 0 has loss tokens
    else:
        ids = ids.clone()
        ids[0, 1] = V + 3  # a loss token
    return x, w, ids, mask, adv, old


@pytest.mark.parametrize("kind", ["advantages", "ids"])
@pytest.mark.parametrize("fused", [True, False])
def test_value_checks_eager_and_compiled(kind, fused):
    """Eager: the clear ValueError. Compiled: the same check as a device-side assert (RuntimeError with the message
    on CPU; ids out of range may also meet the op's own ValueError first); compiled_value_checks=False drops the
    asserts (ids are still checked by the ops, which index by them)."""
    x, w, ids, mask, adv, old = _bad_inputs(kind)
    match = "non-finite values on loss tokens" if kind == "advantages" else "must lie in"

    def f(module):
        return lambda x, w: module(x, w, ids, mask, adv, old_per_token_logps=old)[0]

    module = RLVRLoss(fused=fused, backend="torch", beta=0.0)
    with pytest.raises(ValueError, match=match):
        f(module)(x.clone().requires_grad_(), w)
    torch._dynamo.reset()
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.compile(f(module), fullgraph=True, backend="aot_eager")(x.clone().requires_grad_(), w)
    unchecked = RLVRLoss(fused=fused, backend="torch", beta=0.0, compiled_value_checks=False)
    torch._dynamo.reset()
    compiled = torch.compile(f(unchecked), fullgraph=True, backend="aot_eager")
    if kind == "ids":
        with pytest.raises(ValueError, match=match):
            compiled(x.clone().requires_grad_(), w)
    else:
        compiled(x.clone().requires_grad_(), w)  # unchecked: the numbers are undefined, but nothing raises


def _messages(exc: BaseException) -> str:
    """The messages of an exception and of its causes / contexts."""
    out = []
    while exc is not None and len(out) < 20:
        out.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def test_shape_checks_raise_at_trace_time():
    """A shape error is raised while tracing, before anything runs: the ValueError itself without fullgraph; with
    fullgraph=True dynamo reports it as an observed exception whose chain holds the ValueError's message."""
    x, w, ids, mask, adv, old, ref, coef = make(9)
    module = RLVRLoss(backend="torch", beta=0.0)
    match = "advantages must be a tensor of shape"

    def f(x):
        return module(x, w, ids, mask, adv[:2])[0]

    torch._dynamo.reset()
    with pytest.raises(ValueError, match=match):
        torch.compile(f, backend="aot_eager")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert match in _messages(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
def test_compiled_loss_on_cuda(fused, dtype):
    """On CUDA with the default backend (Triton row passes) under inductor: no graph break, the eager loss, metrics
    and gradients, NaN hidden states in padded positions; the schedule value is a CPU scalar read inside the ops."""
    dev = torch.device("cuda")
    x, w, ids, mask, adv, old, ref, coef = (t.to(dev) for t in make(10))
    x, w = x.to(dtype).masked_fill((mask == 0)[..., None], float("nan")), w.to(dtype)
    module = RLVRLoss(fused=fused, loss_type="grpo", credit="forking", schedule=SCHEDULE)
    fn = _loss_fn(module, ids, mask, adv, old, ref, coef)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x.clone().requires_grad_(), w.clone().requires_grad_(), 2)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    want = _run(fn, x, w, 2, compiled=False)
    got = _run(fn, x, w, 2, compiled=True, backend="inductor")
    assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()
    _assert_same(got, want, **tol)
