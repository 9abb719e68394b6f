"""What the benchmark runs: the ops, the implementations of each, and how one point is built.

A *point* is a dict ``{op, impl, case, N, H, V, T, dtype}``; :func:`build` turns it into a zero-argument ``step``
callable (one forward, or one forward + backward) on fresh inputs (:mod:`rlvr_kernels.bench.timing` times it and
takes its peak memory). Every builder raises :class:`NotAvailable` (or any exception) when the implementation cannot
run here; the caller turns that into a record with an ``error`` field instead of a number.

Ops:
- ``logprobs_fwd``: per-token log-prob + entropy from hidden states ``[N, H]`` and an lm_head ``[V, H]``, no grad.
- ``logprobs_fwd_bwd``: the same plus the backward of ``sum(logp) + sum(entropy)`` (the composable path).
- ``loss_fused``: a DAPO loss (PPO clip, token mean, beta = 0) from hidden states, forward + backward.
- ``token_pass``: the ``[B, T]`` token-level ops alone (``case`` names which: percentile, TP mask, forking, ...).
- ``loss_<name>``: whole ``RLVRLoss`` objectives and credit rules, forward + backward (e.g. ``loss_dapo_forking``).
  The method cases come from the catalogue :mod:`rlvr_kernels.methods` (:func:`method_cases`): one
  ``dapo_<credit>`` per credit rule and one ``<trust region>`` per trust region carried by a ``loss_type``.
- ``tp_logprobs_fwd_bwd``, ``tp_loss_fused``: the vocabulary-parallel forms, per TP degree; their points start
  ranks and are built and measured by :mod:`rlvr_kernels.bench.tp`, not here.

The GEMM roofline rows have the implementation id ``cublas_gemm`` (kept so that results stay comparable across
runs); they run ``torch.mm``, which is cuBLAS only on a GPU. Text shows them as :func:`impl_label` names them:
``torch.mm (CPU)`` or ``cuBLAS (torch.mm)``.
"""

from __future__ import annotations

import math

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

LOGPROB_OPS = ("logprobs_fwd", "logprobs_fwd_bwd")
# implementations per op, in the order they are run and shown
LOGPROB_IMPLS = (
    "cublas_gemm",
    "rlvr_kernels",
    "torch_full_logits",
    "torch_compile",
    "trl_unfused",
    "trl_chunked",
    "liger_flsce",
    "verl_triton",
    "verl_torch",
)
LOSS_FUSED_IMPLS = (
    "cublas_gemm",
    "rlvr_kernels",
    "rlvr_kernels_composable",
    "torch_full_logits",
    "torch_compile",
    "trl_unfused",
    "trl_chunked",
    "liger_grpo",
    "liger_flsce",
    "verl_triton",
    "verl_torch",
)
TOKEN_CASES = ("percentile", "tp_mask", "forking", "entropy_adv", "d3s", "cppo_mask", "delta_coef")
# GEMM-equivalents each op is bounded by: its cublas_gemm row runs that many [N,H]x[H,V]-sized GEMMs
GEMMS = {"logprobs_fwd": 1, "logprobs_fwd_bwd": 4, "loss_fused": 3, "loss_ragged": 3}
# The fused loss on a batch of realistic length spread (rows of T/4 ... T loss tokens, the rest padding): time per
# valid token; its roofline is the 3 GEMMs over every position, the work of an implementation that skips nothing.
RAGGED_OP = "loss_ragged"


def ragged_lengths(B: int, T: int) -> list:
    """Loss tokens of each row of the ragged batch: evenly spread from T/4 to T (about 37% padding)."""
    lo = max(1, T // 4)
    return [lo + (i * (T - lo)) // max(1, B - 1) for i in range(B)]


def valid_tokens(p: dict) -> int:
    """Positions of a point that take part in the loss (every one but in the ragged batch)."""
    B = p["N"] // p["T"]
    return sum(ragged_lengths(B, p["T"])) if p["op"] == RAGGED_OP else p["N"]


GEMM_IMPL = "cublas_gemm"  # the roofline rows' implementation id (a record field; see impl_label for its name)
# other names the command line accepts for an implementation
IMPL_ALIASES = {"gemm": GEMM_IMPL, "torch_mm": GEMM_IMPL}


def impl_label(impl: str, device: str) -> str:
    """How text, legends and tables name an implementation on ``device`` (``"cpu"``, ``"cuda"`` or a record's device
    name such as ``cpu-x86_64``): the GEMM roofline is ``torch.mm``, cuBLAS only on a GPU."""
    if impl == GEMM_IMPL:
        return "torch.mm (CPU)" if str(device).startswith("cpu") else "cuBLAS (torch.mm)"
    return impl


# Whole losses: name -> dict(ours=RLVRLoss keywords, liger=LigerFusedLinearGRPOLoss keywords or None, ref=True when
# the loss reads reference log-probs, schedule=True in ours when the loss runs under a TemporalSchedule at step 10,
# coefficients=True when its forward takes DelTA-style per-token coefficients). Every loss has beta = 0 and old
# log-probs unless it says otherwise; "T" stands for the sequence length.

# The objectives that are not catalogue methods (the peers' own loss types and variants), compared with Liger.
BASE_LOSSES = {
    "grpo": dict(ours=dict(loss_type="grpo"), liger=dict(loss_type="grpo")),
    "dapo": dict(ours=dict(loss_type="dapo", epsilon_high=0.28), liger=dict(loss_type="dapo", epsilon_high=0.28)),
    "bnpo": dict(ours=dict(loss_type="bnpo"), liger=dict(loss_type="bnpo")),
    "dr_grpo": dict(
        ours=dict(loss_type="dr_grpo", max_completion_length="T"),
        liger=dict(loss_type="dr_grpo", max_completion_length="T"),
    ),
    "gspo": dict(
        ours=dict(loss_type="grpo", importance_sampling_level="sequence"),
        liger=dict(loss_type="grpo", importance_sampling_level="sequence"),
    ),
    "grpo_kl": dict(ours=dict(loss_type="grpo", beta=0.04), liger=dict(loss_type="grpo", beta=0.04), ref=True),
}
# Non-method extras, after the method cases.
EXTRA_LOSSES = {
    "dapo_entropy_bonus": dict(ours=dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01)),
}
# The base objective of the credit-rule cases (DAPO with clip-higher).
CREDIT_BASE = dict(loss_type="dapo", epsilon_high=0.28)
# Settings a trust-region case uses beyond its loss_type (none: RLVRLoss's defaults). CISPO's clip bound of 4 is the
# paper's and the one it was always benchmarked with; DRO needs its penalty weight.
TRUST_REGION_SETTINGS = {"cispo": dict(epsilon_high=4.0), "dro": dict(dro_beta=0.1)}
# Loss types LigerFusedLinearGRPOLoss 0.8.5 offers: a trust-region case whose loss_type Liger has is compared with it.
LIGER_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def method_cases(credits=None, trust_regions=None) -> dict:
    """The loss cases of the method catalogue: ``{name: spec}``, one ``<trust region>`` per trust region that a
    ``loss_type`` carries (``dppo``, ``cispo``, ``cppo``, ...), then one ``dapo_<credit>`` per credit rule but
    ``none`` (a schedule when the rule's ``schedule`` is ``"required"``, coefficients when it needs them).
    Defaults: :data:`rlvr_kernels.methods.CREDITS` and :data:`rlvr_kernels.methods.TRUST_REGIONS`."""
    if credits is None or trust_regions is None:
        from rlvr_kernels import methods

        credits = methods.CREDITS if credits is None else credits
        trust_regions = methods.TRUST_REGIONS if trust_regions is None else trust_regions
    out = {}
    for name, tr in trust_regions.items():
        if tr.loss_type is None:  # "clip" (the base objectives' own PPO clip) and "gspo" (a base case)
            continue
        ours = dict(loss_type=tr.loss_type, **TRUST_REGION_SETTINGS.get(name, {}))
        out[name] = dict(ours=ours, liger=dict(ours) if tr.loss_type in LIGER_LOSS_TYPES else None)
    for name, rule in credits.items():
        if name == "none":
            continue
        ours = dict(CREDIT_BASE, credit=name)
        if rule.schedule == "required":
            ours["schedule"] = True
        spec = dict(ours=ours)
        if "coefficients" in rule.needs:
            spec["coefficients"] = True
        out[f"dapo_{name}"] = spec
    return out


def _loss_variants() -> dict:
    out = dict(BASE_LOSSES)
    for name, spec in list(method_cases().items()) + list(EXTRA_LOSSES.items()):
        if name in out:
            raise RuntimeError(f"benchmark loss case {name!r} is defined twice")
        out[name] = spec
    return out


LOSS_VARIANTS = _loss_variants()
LOSS_VARIANT_IMPLS = ("rlvr_kernels", "liger_grpo")

# Modules each implementation imports (preloaded by the CPU fork server so that a point does not pay for them).
PEER_MODULES = {
    "trl_unfused": ("trl.trainer.utils",),
    "trl_chunked": ("trl.kernels.chunked_logprob",),
    "liger_flsce": ("liger_kernel.ops.fused_linear_scaled_cross_entropy",),
    "liger_grpo": ("liger_kernel.chunked_loss",),
    "verl_torch": ("verl.utils.experimental.torch_functional",),
    "verl_triton": ("verl.utils.kernel.linear_cross_entropy",),
}


class NotAvailable(RuntimeError):
    """The implementation cannot run on this device / in this checkout (the message says why)."""


def loss_ops() -> tuple:
    return tuple(f"loss_{name}" for name in LOSS_VARIANTS)


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a peer that does not import gets a row saying why
        raise NotAvailable(f"cannot import {name}: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# inputs


class Inputs:
    """Fresh inputs of one point, on ``device``: hidden ``x [B, T, H]``, weight ``w [V, H]``, targets ``t [B, T]``,
    loss mask ``mask [B, T]`` (fp32), per-row advantages ``adv [B]``, old / ref log-probs ``[B, T]``."""

    def __init__(self, p: dict, device: str, *, grad: bool):
        import torch

        dtype = getattr(torch, DTYPES[p["dtype"]])
        n, h, v, T = p["N"], p["H"], p["V"], p["T"]
        if n % T:
            raise ValueError(f"N={n} must be a multiple of the sequence length T={T}")
        B = n // T
        gen = torch.Generator(device=device).manual_seed(0)
        # logits of unit scale: x ~ N(0, 1), w ~ N(0, 1/H)
        self.x = torch.randn(B, T, h, device=device, generator=gen).to(dtype)
        self.w = (torch.randn(v, h, device=device, generator=gen) / math.sqrt(h)).to(dtype)
        self.t = torch.randint(0, v, (B, T), device=device, generator=gen)
        self.mask = torch.ones(B, T, device=device)
        if p.get("op") == RAGGED_OP:
            lengths = torch.tensor(ragged_lengths(B, T), device=device)
            self.mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
        self.adv = torch.randn(B, device=device, generator=gen)
        self.old = -torch.rand(B, T, device=device, generator=gen) * 8.0 - 2.0
        self.ref = self.old + 0.05 * torch.randn(B, T, device=device, generator=gen)
        self.B, self.T = B, T
        if grad:
            self.x.requires_grad_()
            self.w.requires_grad_()

    def x2d(self):
        return self.x.view(-1, self.x.shape[-1])

    def grad_bytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.w.numel() * self.w.element_size()

    def clear_grads(self):
        self.x.grad = None
        self.w.grad = None


def dapo_loss_torch(logp, old, adv, mask, eps_low=0.2, eps_high=0.2):
    """Plain-torch DAPO objective on per-token log-probs ``[B, T]`` (PPO clip, token mean over the batch): the loss
    the peers that only produce log-probs are completed with."""
    import torch

    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _torch_full_logits(x2d, w, t):
    """Plain torch with the full ``[N, V]`` fp32 logits: log-softmax, gather, entropy."""
    import torch

    z = (x2d @ w.T).float()
    logz = torch.log_softmax(z, -1)
    return logz.gather(-1, t[:, None])[:, 0], -(logz.exp() * logz).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# per-token log-probs + entropy from hidden states, one function per implementation: (inp, device) -> fn()
# returning (logp [N], entropy [N]); called under no_grad for logprobs_fwd.


def _lp_fn(impl: str, inp: Inputs, device: str):
    import torch

    x2d, w, t = inp.x2d(), inp.w, inp.t.view(-1)
    if impl == "rlvr_kernels":
        from rlvr_kernels import fused_linear_logprobs

        return lambda: fused_linear_logprobs(x2d, w, t)
    if impl == "torch_full_logits":
        return lambda: _torch_full_logits(x2d, w, t)
    if impl == "torch_compile":
        import torch._dynamo

        torch._dynamo.reset()
        compiled = torch.compile(_torch_full_logits)
        return lambda: compiled(x2d, w, t)
    if impl == "trl_unfused":
        utils = _import("trl.trainer.utils")
        B, T = inp.B, inp.T

        def trl():
            # TRL's trainer works on [B, T, V] logits from the model's lm_head.
            logits = (x2d @ w.T).view(B, T, -1)
            return utils.selective_log_softmax(logits, inp.t).view(-1), utils.entropy_from_logits(logits).view(-1)

        return trl
    if impl == "trl_chunked":
        # TRL 1.16's own fused head (GRPOTrainer's add_fused_lm_head): chunked log-probs and entropy, fp32 dW
        mod = _import("trl.kernels.chunked_logprob")
        fn, chunk = mod.ChunkedLogProbFunction, mod.TOKEN_CHUNK_SIZE

        def trl_chunked():
            return fn.apply(x2d, w, None, t, 1.0, chunk, None, 1.0, ("entropy",))[:2]

        return trl_chunked
    if impl == "liger_flsce":
        mod = _import("liger_kernel.ops.fused_linear_scaled_cross_entropy")
        fn = mod.LigerFusedLinearScaledCrossEntropyFunction

        def liger():
            nll, ent = fn.apply(x2d, w, t, 1.0, -100, 1, True)[:2]
            return -nll, ent

        return liger
    if impl == "verl_triton":
        if device != "cuda":
            raise NotAvailable(
                "verl's Triton linear_cross_entropy runs only on CUDA tensors (its kernels are "
                "GPU Triton); verl_torch is its CPU path"
            )
        if x2d.shape[-1] % 128:
            raise NotAvailable(f"verl's linear_cross_entropy needs H % 128 == 0, got H={x2d.shape[-1]}")
        lce = _import("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy
        return lambda: lce(x2d, w, t, 1.0, "none")
    if impl == "verl_torch":
        mod = _import("verl.utils.experimental.torch_functional")
        f = mod.FusedLinearForPPO(chunk_size=512)
        return lambda: f(x2d, w, t, 1.0)
    raise ValueError(f"unknown implementation {impl!r} for the log-prob ops")


# ----------------------------------------------------------------------------------------------------------------
# builders


def _gemm_step(inp: Inputs, gemms: int):
    """``gemms`` GEMMs of the op's shapes in the input dtype, outputs preallocated: 1 = logits; 3 = logits, dX, dW
    (fused loss); 4 = logits, recomputed logits, dX, dW (composable forward + backward)."""
    import torch

    x, w = inp.x2d().detach(), inp.w.detach()
    z = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)

    def step():
        torch.mm(x, w.T, out=z)
        if gemms == 4:
            torch.mm(x, w.T, out=z)
        if gemms >= 3:
            torch.mm(z, w, out=dx)
            torch.mm(z.T, x, out=dw)

    return step


def _build_logprobs(p: dict, device: str):
    import torch

    bwd = p["op"] == "logprobs_fwd_bwd"
    inp = Inputs(p, device, grad=bwd)
    if p["impl"] == "cublas_gemm":
        return _gemm_step(inp, GEMMS[p["op"]]), 0
    fn = _lp_fn(p["impl"], inp, device)

    def step():
        if bwd:
            logp, ent = fn()
            (logp.sum() + ent.float().sum()).backward()
            inp.clear_grads()
        else:
            with torch.no_grad():
                fn()

    return step, (inp.grad_bytes() if bwd else 0)


def _build_loss_fused(p: dict, device: str):
    import torch

    impl = p["impl"]
    inp = Inputs(p, device, grad=True)
    if impl == "cublas_gemm":
        return _gemm_step(inp, GEMMS["loss_fused"]), 0
    B, T = inp.B, inp.T
    if impl in ("rlvr_kernels", "rlvr_kernels_composable"):
        from rlvr_kernels import RLVRLoss

        lf = RLVRLoss(beta=0.0, loss_type="dapo", fused=impl == "rlvr_kernels")

        def run():
            return lf(inp.x, inp.w, inp.t, inp.mask, inp.adv, old_per_token_logps=inp.old)[0]
    elif impl == "liger_grpo":
        mod = _import("liger_kernel.chunked_loss")
        lf = mod.LigerFusedLinearGRPOLoss(beta=0.0, loss_type="dapo", use_ref_model=False, compiled=device == "cuda")

        def run():
            return lf(inp.x, inp.w, inp.t, inp.mask, inp.adv, old_per_token_logps=inp.old)[0]
    else:
        if impl == "torch_compile":
            import torch._dynamo

            torch._dynamo.reset()

            def full(x, w, t, old, adv, mask):
                z = (x.view(-1, x.shape[-1]) @ w.T).float()
                logz = torch.log_softmax(z, -1)
                logp = logz.gather(-1, t.view(-1, 1)).view(B, T)
                with torch.no_grad():
                    ent = -(logz.exp() * logz).sum(-1)
                return dapo_loss_torch(logp, old, adv, mask), ent

            compiled = torch.compile(full)

            def run():
                return compiled(inp.x, inp.w, inp.t, inp.old, inp.adv, inp.mask)[0]
        else:
            if impl == "torch_full_logits":

                def lp():
                    z = (inp.x2d() @ inp.w.T).float()
                    logz = torch.log_softmax(z, -1)
                    with torch.no_grad():  # entropy as a metric, as the trainers log it
                        -(logz.exp() * logz).sum(-1)
                    return logz.gather(-1, inp.t.view(-1, 1))[:, 0]
            elif impl == "trl_unfused":
                utils = _import("trl.trainer.utils")

                def lp():
                    logits = (inp.x2d() @ inp.w.T).view(B, T, -1)
                    with torch.no_grad():
                        utils.entropy_from_logits(logits)
                    return utils.selective_log_softmax(logits, inp.t)
            else:
                fn = _lp_fn(impl, inp, device)

                def lp():
                    return fn()[0]

            def run():
                return dapo_loss_torch(lp().view(B, T).float(), inp.old, inp.adv, inp.mask)

    def step():
        run().backward()
        inp.clear_grads()

    return step, inp.grad_bytes()


def _build_loss_variant(p: dict, device: str):
    name = p["op"][len("loss_") :]
    spec = LOSS_VARIANTS.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}")
    impl = p["impl"]
    inp = Inputs(p, device, grad=True)

    def fill(kw):
        return {k: (inp.T if v == "T" else v) for k, v in kw.items()}

    extra = {"old_per_token_logps": inp.old}
    if spec.get("ref"):
        extra["ref_per_token_logps"] = inp.ref
    if impl == "rlvr_kernels":
        from rlvr_kernels import RLVRLoss, TemporalSchedule

        kw = fill(spec["ours"])
        if kw.pop("schedule", False):
            kw["schedule"] = TemporalSchedule(total_steps=100)
            extra["step"] = 10
        if kw.get("beta", 0.0) == 0.0:
            kw["beta"] = 0.0
        if spec.get("coefficients"):
            extra["delta_coefficients"] = _delta_coefficients(inp)
        lf = RLVRLoss(**kw)
    elif impl == "liger_grpo":
        if spec.get("liger") is None:
            raise NotAvailable(f"Liger's LigerFusedLinearGRPOLoss has no {name}")
        mod = _import("liger_kernel.chunked_loss")
        kw = dict(beta=0.0, use_ref_model=bool(spec.get("ref")), compiled=device == "cuda")
        kw.update(fill(spec["liger"]))
        lf = mod.LigerFusedLinearGRPOLoss(**kw)
    else:
        raise ValueError(f"unknown implementation {impl!r} for {p['op']}")

    def step():
        lf(inp.x, inp.w, inp.t, inp.mask, inp.adv, **extra)[0].backward()
        inp.clear_grads()

    return step, inp.grad_bytes()


def _delta_coefficients(inp: Inputs):
    """DelTA coefficients from the old policy's hidden states (computed once per rollout batch, outside the step):
    the per-token coefficients of the credit rules that need them."""
    import torch

    from rlvr_kernels.delta import delta_coefficients

    with torch.no_grad():
        out = delta_coefficients(inp.x.detach(), inp.old, inp.adv, inp.mask.bool())
    return getattr(out, "coefficients", out)


def _token_inputs(p: dict, device: str):
    import torch

    n, T = p["N"], p["T"]
    B = n // T
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=gen)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    ent = torch.rand(B, T, device=device, generator=gen) * 3.0
    adv = torch.randn(B, device=device, generator=gen)
    logp = -torch.rand(B, T, device=device, generator=gen) * 4.0
    mu = logp + 0.1 * torch.randn(B, T, device=device, generator=gen)
    return mask, ent, adv, logp, mu


def _build_token_pass(p: dict, device: str):
    import torch

    case, impl = p["case"], p["impl"]
    if impl == "rlvr_kernels":
        backend = "auto"
    elif impl == "torch_reference":
        backend = "torch"
    else:
        raise ValueError(f"unknown implementation {impl!r} for token_pass")
    mask, ent, adv, logp, mu = _token_inputs(p, device)
    if case in ("percentile", "tp_mask", "forking", "entropy_adv", "d3s"):
        import rlvr_kernels as rk

        fn = {
            "percentile": lambda: rk.trajectory_percentile(mask, backend=backend),
            "tp_mask": lambda: rk.tp_schedule_mask(mask, 0.7, backend=backend),
            "forking": lambda: rk.forking_token_mask(ent, mask, 0.2, backend=backend),
            "entropy_adv": lambda: rk.entropy_shaped_advantages(adv, ent, mask, 0.5, backend=backend),
            "d3s": lambda: rk.d3s_token_mask(adv, ent, mask, 0.2, backend=backend),
        }[case]
    elif case == "cppo_mask":
        if not _module_available("rlvr_kernels.cppo"):
            raise NotAvailable("rlvr_kernels.cppo is not in this checkout")
        from rlvr_kernels.cppo import cppo_mask

        def fn():
            return cppo_mask(logp, mu, adv, mask, backend=backend)
    elif case == "delta_coef":
        if not _module_available("rlvr_kernels.delta"):
            raise NotAvailable("rlvr_kernels.delta is not in this checkout")
        from rlvr_kernels.delta import delta_coefficients

        gen = torch.Generator(device=device).manual_seed(1)
        dtype = getattr(torch, DTYPES[p["dtype"]])
        hidden = torch.randn(*mask.shape, p["H"], device=device, generator=gen).to(dtype)

        def fn():
            return delta_coefficients(hidden, logp, adv, mask, backend=backend)
    else:
        raise ValueError(f"unknown token_pass case {case!r}")

    def step():
        with torch.no_grad():
            fn()

    return step, 0


def build(p: dict, device: str):
    """``(step, grad_bytes)`` for one point; raises when the implementation cannot run."""
    op = p["op"]
    if op in LOGPROB_OPS:
        return _build_logprobs(p, device)
    if op in ("loss_fused", RAGGED_OP):
        return _build_loss_fused(p, device)
    if op == "token_pass":
        return _build_token_pass(p, device)
    if op.startswith("loss_"):
        return _build_loss_variant(p, device)
    raise ValueError(f"unknown op {op!r}")
