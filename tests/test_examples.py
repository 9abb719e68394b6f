"""The scripts under ``examples/``, run on CPU with a tiny model.

- ``examples/trl_grpo_rlvr.py`` trains end to end as a subprocess (the command a user types, ``--model_name_or_path``
  pointing at a tiny random Qwen2 and a character-level tokenizer with a chat template saved to a folder): two
  optimizer steps with TP-Schedule, and two with forking tokens under CPPO's trust region with ``num_iterations=2``
  (the second update of a generation batch is where CPPO's mask can act). The ``rlvr/...`` metrics must be logged and
  finite in ``<output_dir>/trainer_state.json``, and the model saved.
- ``examples/verl/run_grpo_rlvr.sh``: a real verl run needs GPUs, Ray workers and a rollout engine (vLLM), none of
  which this machine has, so the test checks what can honestly run on CPU: the script is valid bash (``bash -n``);
  the script itself runs with ``python3`` replaced by a stub on ``PATH`` that records its environment variable and
  arguments, so the overrides checked are exactly the ones the script passes (variables expanded, ``"$@"``
  appended); those overrides are composed by Hydra on verl's own ``ppo_trainer`` config (unknown keys fail there),
  the composed config passes verl's ``validate_config`` (the driver-side check ``main_ppo`` runs before starting
  Ray; it builds the actor config with ``omega_conf_to_dataclass``, which instantiates ``RLVRPolicyLossConfig`` and
  validates the loss mode and every ``policy_loss.rlvr`` option), and the loss mode resolves through verl's
  ``get_policy_loss_fn`` to the registered ``rlvr_*`` loss. Nothing is stubbed inside verl: composing and validating
  its config needs no rollout-server package.
- ``examples/verl/custom_loop.py``: its ``main`` runs in this process on its own argument parser (a second of plain
  torch with verl's loss registry, once verl is imported).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 600
pytestmark = pytest.mark.filterwarnings("ignore:Disabled critic:UserWarning")  # verl's notice: GRPO has no critic


def _env(**extra) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
    out = proc.stdout if isinstance(proc.stdout, str) else proc.stdout.decode()
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{out[-6000:]}"
    return out


# ----------------------------------------------------------------------------------------------------------------
# TRL


def _char_tokenizer():
    """A character-level tokenizer (digits, operators, letters, punctuation) with a minimal chat template: the
    arithmetic prompts of the example tokenize without unknown tokens, and completions decode to plain text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (
        list("0123456789+-*=?.:, \n")
        + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    )
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    hf.padding_side = "left"
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return hf


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 (tests/_trl_common.py's configuration, this tokenizer's vocabulary) and its tokenizer,
    saved to one folder: what ``--model_name_or_path`` gets (TRL loads both, and the reference model, from it)."""
    if importlib.util.find_spec("trl") is None:  # (not imported here: the example imports it in its process)
        pytest.skip("trl is not installed")
    import torch
    from transformers import Qwen2ForCausalLM

    from _trl_common import tiny_config

    path = tmp_path_factory.mktemp("tiny-qwen2-chars")
    tok = _char_tokenizer()
    cfg = tiny_config()
    cfg.vocab_size = len(tok)
    cfg.max_position_embeddings = 128  # chat prompt (~65 characters) + completion
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


TRL_COMMON = (
    "--max_steps 2 --per_device_train_batch_size 4 --num_generations 4 --max_completion_length 8 --use_cpu "
    "--logging_steps 1 --report_to none --learning_rate 5e-2 --num_prompts 16 --save_strategy no --disable_tqdm true "
    "--seed 0"
).split()
TRL_RUNS = {
    # q(k) over the 2 steps with schedule_end_frac=1: 0.495 at step 1, 0 at step 2
    "tp_schedule": ["--credit", "tp_schedule", "--schedule_mode", "linear", "--schedule_end_frac", "1.0"],
    # the entropy-based mask (half of each completion) under CPPO, two updates per generation batch
    "forking_cppo": ["--credit", "forking", "--credit_rho", "0.5", "--trust_region", "cppo", "--num_iterations", "2"],
}


def _trl_logs(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [row for row in state["log_history"] if "loss" in row]


def _finite(rows, key) -> list[float]:
    values = [row[key] for row in rows]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (key, values)
    return values


def test_trl_example_trains_on_cpu(tiny_model_dir, tmp_path):
    """Both runs start at once (two CPU processes), then each must exit 0 with finite rlvr/... metrics."""
    procs = {}
    for name, flags in TRL_RUNS.items():
        cmd = [
            sys.executable,
            str(EXAMPLES / "trl_grpo_rlvr.py"),
            "--model_name_or_path",
            tiny_model_dir,
            "--output_dir",
            str(tmp_path / name),
            *TRL_COMMON,
            *flags,
        ]
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    outputs = {}
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=TIMEOUT)
            outputs[name] = _check(subprocess.CompletedProcess(proc.args, proc.returncode, out), f"TRL run {name}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for name in TRL_RUNS:
        assert "Training completed." in outputs[name]
        out_dir = tmp_path / name
        assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
        rows = _trl_logs(out_dir)
        assert len(rows) == 2, rows  # --max_steps 2, --logging_steps 1
        _finite(rows, "loss")
        _finite(rows[:1], "reward")  # logged at a generation (with num_iterations=2 only the first step generates)

    rows = _trl_logs(tmp_path / "tp_schedule")
    q = _finite(rows, "rlvr/schedule_value")
    active = _finite(rows, "rlvr/active_fraction")
    assert q[0] == pytest.approx(0.495, abs=1e-6) and q[1] == 0.0  # the schedule followed the trainer's steps
    assert 0.0 < active[0] < 1.0 and active[1] == 1.0  # only the tail of each completion early, all of it at the end

    rows = _trl_logs(tmp_path / "forking_cppo")
    assert all(0.0 < a < 1.0 for a in _finite(rows, "rlvr/active_fraction"))  # the forking mask kept about half
    assert all(0.0 <= m <= 1.0 for m in _finite(rows, "rlvr/trust_region_masked_fraction"))
    assert all(b >= 0.02 - 1e-6 for b in _finite(rows, "rlvr/cppo_delta_b_mean"))  # CPPO's budget, >= cppo_delta_b
    assert "schedule_value" not in " ".join(rows[0])  # forking without --schedule: no schedule


# ----------------------------------------------------------------------------------------------------------------
# verl: the launcher script


VERL_SCRIPT = EXAMPLES / "verl" / "run_grpo_rlvr.sh"


def test_verl_script_is_valid_bash():
    bash = shutil.which("bash")
    assert bash, "bash not found"
    _check(subprocess.run([bash, "-n", str(VERL_SCRIPT)], capture_output=True, text=True), "bash -n")


def _script_argv(tmp_path: Path, *extra: str, **env) -> tuple[str, list[str]]:
    """Run the script with ``python3`` replaced by a stub that records VERL_USE_EXTERNAL_MODULES and its arguments;
    returns (that variable, the arguments after ``-m verl.trainer.main_ppo``)."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "python3"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$VERL_USE_EXTERNAL_MODULES" "$@" > "$RLVR_ARGV_FILE"\n')
    stub.chmod(0o755)
    argv_file = tmp_path / "argv"
    proc = subprocess.run(
        ["bash", str(VERL_SCRIPT), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(
            PATH=f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            HOME=str(tmp_path),
            RLVR_ARGV_FILE=str(argv_file),
            **env,
        ),
    )
    _check(proc, "examples/verl/run_grpo_rlvr.sh (python3 stubbed)")
    external, *argv = argv_file.read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"], argv[:2]
    return external, argv[2:]


def _compose_and_validate(overrides: list[str]):
    """What ``python3 -m verl.trainer.main_ppo <overrides>`` does before it starts Ray: Hydra composes verl's
    ``ppo_trainer`` config with the overrides, then ``validate_config`` (which builds the actor config)."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None
    ):
        cfg = compose("ppo_trainer", overrides=overrides)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    return cfg, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


@pytest.mark.parametrize(
    "loss_mode, extra",
    [
        (None, ()),  # the script as written: rlvr_tp_schedule
        ("rlvr_forking_cppo", ("+actor_rollout_ref.actor.policy_loss.rlvr.credit_rho=0.2",)),  # its header's variant
    ],
)
def test_verl_script_overrides_compose_and_validate(tmp_path, loss_mode, extra):
    pytest.importorskip("verl")
    pytest.importorskip("hydra")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    external, overrides = _script_argv(tmp_path, *extra, **({"LOSS_MODE": loss_mode} if loss_mode else {}))
    assert overrides and all("=" in o for o in overrides), overrides
    if extra:
        assert overrides[-len(extra) :] == list(extra)  # "$@" is passed on, last
    assert f"data.train_files={tmp_path}/data/gsm8k/train.parquet" in overrides  # $HOME-relative default
    assert external == "rlvr_kernels.integrations.verl"
    rv = importlib.import_module(external)  # what verl's `import verl` does with VERL_USE_EXTERNAL_MODULES

    cfg, actor = _compose_and_validate(overrides)
    mode = loss_mode or "rlvr_tp_schedule"
    assert isinstance(actor.policy_loss, rv.RLVRPolicyLossConfig) and actor.policy_loss.loss_mode == mode
    assert mode in rv.LOSS_NAMES and get_policy_loss_fn(mode) is rv._LOSSES[mode]
    opts = rv._options(actor)
    schedule = (opts.schedule_mode, opts.schedule_start_value, opts.schedule_end_value, opts.schedule_end_frac)
    assert schedule == ("linear", 0.99, 0.0, 0.8)
    if extra:
        assert opts.credit_rho == 0.2
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert cfg.algorithm.adv_estimator == "grpo"
    model = cfg.actor_rollout_ref.model
    assert model.use_fused_kernels is True and model.fused_kernel_options.impl_backend in rv._FORWARD_BACKENDS
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == external


def test_verl_script_typo_fails_at_config_time(tmp_path):
    """The same path rejects a misspelt option: the test above would catch a script that verl refuses."""
    pytest.importorskip("verl")
    _, overrides = _script_argv(tmp_path, "+actor_rollout_ref.actor.policy_loss.rlvr.schedule_end_fraction=0.5")
    with pytest.raises(Exception, match="schedule_end_fraction"):
        _compose_and_validate(overrides)


# ----------------------------------------------------------------------------------------------------------------
# verl: the custom loop


def _custom_loop_module():
    spec = importlib.util.spec_from_file_location("rlvr_example_custom_loop", EXAMPLES / "verl" / "custom_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verl_custom_loop_runs(capsys):
    """The script's own ``main`` on its own argument parser, in this process (verl is imported already by the tests
    above: a subprocess would spend most of its time importing it again)."""
    pytest.importorskip("verl")
    module = _custom_loop_module()
    rows = module.main(module.parse_args(["--steps", "4"]))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step=")]
    assert len(printed) == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    q = [r["rlvr/schedule_value"] for r in rows]
    active = [r["rlvr/active_fraction"] for r in rows]
    assert q == sorted(q, reverse=True) and q[-1] == 0.0  # the step declared by set_training_step reached the loss
    assert active[0] < active[-1] == 1.0  # forking keeps rho = 1 - q(k) of each response: more as q falls
    from rlvr_kernels.integrations._verl.context import current

    assert current() == {}  # the loop cleared the step it declared


@pytest.mark.filterwarnings("ignore::UserWarning")  # CPPO's notice that the first update (pi = mu) masks nothing
def test_verl_custom_loop_every_loss_mode(capsys):
    """Every registered ``rlvr_*`` loss runs in the example's loop (one rollout batch, two updates), with the
    default options the script picks for it (DelTA's coefficients computed by the loop)."""
    pytest.importorskip("verl")
    module = _custom_loop_module()
    for name in module.rv.LOSS_NAMES:
        rows = module.main(module.parse_args(["--loss_mode", name, "--steps", "1"]))
        assert len(rows) == 1 and all(math.isfinite(v) for v in rows[0].values()), (name, rows)
        assert ("rlvr/delta_coef_std" in rows[0]) == name.startswith("rlvr_delta"), (name, rows)
    capsys.readouterr()
