"""The README's code runs as written.

- Every ```python block of the API tour runs on CPU by itself, in a fresh namespace.
- The ```python trl-recipe block trains three steps of a tiny offline model with RLVRGRPOTrainer (only test-sized
  settings such as max_steps are added to its GRPOConfig call, and the test's tokenizer to the trainer).
- The ```python tp-recipe block runs on every rank of 2 real gloo processes (its assertion: the unsharded numbers).
- The ```bash verl-recipe block: its Hydra overrides compose on verl's own ppo_trainer config, resolve to our
  policy-loss config and loss, and the module it exports to verl registers that loss.
"""

import importlib
import os
import pathlib
import re
import shlex

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def blocks(info: str) -> list:
    return re.findall(rf"```{re.escape(info)}\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_readme_snippet_runs_by_itself(i):
    """Each API-tour block is copied alone by a reader: it must run in a fresh namespace."""
    block = blocks("python")[i]
    exec(compile(block, f"README.md[python block {i}]", "exec"), {})


def test_readme_has_snippets():
    assert len(blocks("python")) >= 5


def _run_block(rank, world, src):
    namespace = {}
    exec(compile(src, "README.md[python tp-recipe]", "exec"), namespace)
    return float(namespace["loss"]), namespace["shard"].grad.shape[0]


def test_readme_tp_recipe_runs_on_two_ranks():
    from _gloo import run_ranks

    (src,) = blocks("python tp-recipe")
    (loss0, rows0), (loss1, rows1) = run_ranks(_run_block, 2, src)
    assert loss0 == loss1 and rows0 == rows1 == 512


def test_readme_trl_recipe_trains(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import test_integration_trl as t

    (src,) = blocks("python trl-recipe")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(t.WORDS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model_dir = tmp_path / "tiny"
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    test_args = dict(t.BASE, max_steps=3)  # q(1) = 0.495, q(2) = q(3) = 0 with schedule_end_frac=0.8
    assert "GRPOConfig(\n" in src
    src = src.replace("GRPOConfig(\n", "GRPOConfig(**_test_args,\n", 1)
    assert src.count("GRPOTrainer(model=") == 1  # the tiny model has no tokenizer files: hand it ours
    src = src.replace("GRPOTrainer(model=", "GRPOTrainer(processing_class=_tokenizer, model=")
    monkeypatch.chdir(tmp_path)
    ns = dict(
        model=Qwen2ForCausalLM.from_pretrained(model_dir),
        reward_fn=t.even_words,
        dataset=t.dataset(),
        _test_args=test_args,
        _tokenizer=t.tokenizer(),
    )
    exec(compile(src, "README.md[trl-recipe]", "exec"), ns)
    trainer = ns["trainer"]
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == test_args["max_steps"]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in logs)
    q = [row["rlvr/schedule_value"] for row in logs]
    assert q[0] > q[-1]  # the schedule advanced with the trainer's step


def test_readme_verl_recipe_resolves_to_our_loss():
    pytest.importorskip("verl")
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils.config import omega_conf_to_dataclass

    (src,) = blocks("bash verl-recipe")
    lines = [ln.split("#", 1)[0] for ln in src.splitlines()]
    text = " ".join(ln.rstrip().rstrip("\\") for ln in lines)
    env = re.search(r"export VERL_USE_EXTERNAL_MODULES=(\S+)", text)
    assert env, "the recipe exports VERL_USE_EXTERNAL_MODULES"
    words = shlex.split(text[text.index("verl.trainer.main_ppo") + len("verl.trainer.main_ppo") :])
    overrides = [w for w in words if "=" in w]
    assert overrides and len(overrides) == len(words)
    rv = importlib.import_module(env.group(1))  # what verl imports in every process
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer/config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, rv.RLVRPolicyLossConfig)
    mode = actor.policy_loss.loss_mode
    assert mode in rv.LOSS_NAMES and get_policy_loss_fn(mode) is rv._LOSSES[mode]
    opts = rv._options(actor)
    assert (opts.schedule_mode, opts.schedule_end_frac) == ("linear", 0.8)
    assert cfg.actor_rollout_ref.model.use_fused_kernels is True
    assert cfg.actor_rollout_ref.model.fused_kernel_options.impl_backend in rv._FORWARD_BACKENDS


def test_readme_methods_table_is_the_catalogue():
    """The README's method/option table is generated from rlvr_kernels/methods.py and must not drift from it."""
    from rlvr_kernels import methods

    text = README.read_text()
    start, end = "<!-- methods-table:start -->\n", "<!-- methods-table:end -->"
    assert start in text and end in text
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block == methods.markdown_table(), (
        "README method table is stale: replace the block between the methods-table markers with "
        "rlvr_kernels.methods.markdown_table()"
    )
