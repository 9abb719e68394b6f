"""An ``rlvr_*`` policy loss of verl inside a plain-torch training loop (no Ray, no rollout engine, no GPU).

verl's trainer feeds the losses the training step and the micro-batch's entropy through hooks. A custom loop says
them itself: :func:`rlvr_kernels.integrations.verl.set_training_step` (the 1-based step k of ``total_steps``, for the
schedule q(k)) and :func:`rlvr_kernels.integrations.verl.loss_context` (the current policy's ``entropy``, DelTA's
``delta_coefficients``, the rollout engine's ``rollout_log_probs``), then calls the loss registered in verl's
registry with verl's 7-argument signature and a real verl ``ActorConfig``.

The toy task: fixed random "hidden states" of each response position, a linear LM head (the policy), responses
sampled from it, a verifiable reward (the share of the response's tokens that are even ids), GRPO advantages from
verl's ``compute_grpo_outcome_advantage``, log-probs and entropies from ``rlvr_kernels.fused_linear_logprobs``,
DelTA's coefficients (``rlvr_delta*``) from ``rlvr_kernels.delta_coefficients`` on the rollout policy's hidden states.

    python examples/verl/custom_loop.py                                   # rlvr_forking with the schedule (k of K)
    python examples/verl/custom_loop.py --loss_mode rlvr_tp_schedule_cppo --rlvr schedule_end_frac=1.0
    python examples/verl/custom_loop.py --loss_mode rlvr_entropy_adv --rlvr schedule=true --rlvr entropy_adv_alpha=0.2
    python examples/verl/custom_loop.py --loss_mode rlvr_delta_cppo --rlvr delta_coef_iters=2

It prints one line per step (loss, mean reward and the loss's ``rlvr/...`` metrics) and runs in seconds on CPU.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import yaml
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_policy_loss_fn
from verl.workers.config import FSDPActorConfig

import rlvr_kernels.integrations.verl as rv  # registers the rlvr_* losses with verl
from rlvr_kernels import delta_coefficients, fused_linear_logprobs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss_mode", default="rlvr_forking", choices=rv.LOSS_NAMES)
    p.add_argument(
        "--rlvr",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a policy_loss.rlvr option (YAML value), repeatable; default: schedule_end_frac=1.0, and schedule=true "
        "for the credit rules with a scheduled variant (forking, entropy_adv, d3s)",
    )
    p.add_argument("--dro_beta", type=float, default=0.1, help="verl's policy_loss.dro_beta (the rlvr_*dro losses)")
    p.add_argument("--steps", type=int, default=8, help="training steps (one rollout batch each)")
    p.add_argument("--ppo_epochs", type=int, default=2, help="updates per rollout batch")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4, help="responses per prompt (the GRPO group)")
    p.add_argument("--response_len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def rlvr_options(pairs, loss_mode: str) -> dict:
    if pairs is None:  # the demo's default: the schedule reaches its end value at the last step
        rule = get_policy_loss_fn(loss_mode).rlvr_spec.rule  # the loss's credit rule in the method catalogue
        return {"schedule_end_frac": 1.0, **({"schedule": True} if rule.schedule == "optional" else {})}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--rlvr expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(args) -> list[dict]:
    torch.manual_seed(args.seed)
    B, T, V, H = args.prompts * args.n, args.response_len, args.vocab, args.hidden

    # What verl's workers build from actor_rollout_ref.actor (options checked here, as verl does at config time).
    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=args.n,
        ppo_micro_batch_size_per_gpu=B,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        loss_agg_mode="token-mean",
        policy_loss=rv.RLVRPolicyLossConfig(
            loss_mode=args.loss_mode, rlvr=rlvr_options(args.rlvr, args.loss_mode), dro_beta=args.dro_beta
        ),
    )
    opts = {**rv.RLVR_OPTION_DEFAULTS, **config.policy_loss.rlvr}
    loss_fn = get_policy_loss_fn(config.policy_loss.loss_mode)

    head = torch.nn.Linear(H, V, bias=False)  # the policy
    opt = torch.optim.SGD(head.parameters(), lr=args.lr)
    hidden = torch.randn(B, T, H)  # each response position's (fixed) hidden state
    group = np.repeat(np.arange(args.prompts), args.n)  # GRPO groups: n responses per prompt

    history = []
    try:
        for step in range(1, args.steps + 1):
            # rollout: sample the responses from the current policy; their log-probs are old_log_prob
            with torch.no_grad():
                responses = torch.distributions.Categorical(logits=head(hidden)).sample()  # [B, T]
                lengths = torch.randint(T // 2, T + 1, (B,))
                mask = torch.arange(T)[None, :] < lengths[:, None]
                old_log_prob, _ = fused_linear_logprobs(hidden, head.weight, responses, return_entropy=False)
            reward = ((responses % 2 == 0) & mask).sum(-1) / lengths  # verifiable: the share of even token ids
            token_rewards = torch.zeros(B, T)
            token_rewards[torch.arange(B), lengths - 1] = reward
            advantages, _ = compute_grpo_outcome_advantage(token_rewards, mask, group)
            extra = {}
            if args.loss_mode.startswith("rlvr_delta"):  # DelTA: c~ from theta_old's hidden states, once per batch
                extra["delta_coefficients"] = delta_coefficients(
                    hidden,
                    old_log_prob,
                    advantages,
                    mask,
                    iters=opts["delta_coef_iters"],
                    lam_min=opts["delta_coef_lam_min"],
                    lam_max=opts["delta_coef_lam_max"],
                    exclude_zero_adv=opts["delta_coef_exclude_zero_adv"],
                )

            rv.set_training_step(step, total_steps=args.steps)  # the schedule's k of K (verl: global_steps)
            for _ in range(args.ppo_epochs):
                log_prob, entropy = fused_linear_logprobs(hidden, head.weight, responses)
                # forking / entropy_adv / d3s read the current policy's entropy, DelTA its coefficients
                with rv.loss_context(entropy=entropy.detach(), **extra):
                    loss, metrics = loss_fn(
                        old_log_prob=old_log_prob,
                        log_prob=log_prob,
                        advantages=advantages,
                        response_mask=mask,
                        loss_agg_mode=config.loss_agg_mode,
                        config=config,
                        rollout_is_weights=None,
                    )
                opt.zero_grad()
                loss.backward()
                opt.step()
            row = {
                "step": step,
                "loss": loss.item(),
                "reward": float(reward.mean()),
                **{k: float(v) for k, v in metrics.items() if k.startswith("rlvr/")},
            }
            history.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        rv.clear_training_step()  # forget the step declared above
    if not all(math.isfinite(v) for row in history for v in row.values()):
        raise SystemExit("non-finite loss or metric")
    return history


if __name__ == "__main__":
    main(parse_args())
