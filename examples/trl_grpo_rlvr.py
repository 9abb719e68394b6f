"""GRPO on a verifiable arithmetic reward with rlvr_kernels' credit rules and trust regions, in the style of TRL's own
``trl/scripts/grpo.py``.

The trainer is ``rlvr_kernels.integrations.trl.RLVRGRPOTrainer`` with ``RLVRGRPOConfig``: TRL's ``GRPOConfig`` plus
the method options, so every TRL flag and every rlvr option comes from the command line (or a ``--config`` YAML):
``--credit`` (none | tp_schedule | forking | entropy_adv | d3s | delta) with ``--schedule``, ``--schedule_mode``,
``--schedule_start_value``, ``--schedule_end_value``, ``--schedule_begin_frac``, ``--schedule_end_frac``,
``--schedule_gamma``, ``--credit_rho``, ``--entropy_adv_alpha``, ``--entropy_adv_kappa``, ``--d3s_scope``,
``--delta_coef_*``; ``--trust_region`` (clip | dppo | cispo | cppo) with ``--trust_region_delta``, ``--ratio_cap``,
``--cppo_*``; ``--rlvr_backend``. ``python examples/trl_grpo_rlvr.py --help`` lists them with their help.

The data are generated here (no download): ``--num_prompts`` questions "What is a + b?" (``+``, ``-``, ``*`` on
operands up to ``--max_operand``), asked as chat messages. Two verifiable rewards score each completion:
``accuracy_reward`` (1 if the first integer of the completion is the answer) and ``format_reward`` (the share of the
completion's non-blank characters that are digits or a minus sign: 1 for a bare number). To train on your own data,
replace ``arithmetic_dataset`` by a dataset with a ``prompt`` column and the columns your reward functions read.

Install: ``pip install -e ".[trl]"`` in this repository (``peft`` too for ``--use_peft``).

Usage, a real run (one node, the GPUs of ``accelerate config``; add ``--use_vllm`` for vLLM generation)::

    accelerate launch examples/trl_grpo_rlvr.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --output_dir Qwen2.5-0.5B-GRPO-arith \\
        --dtype bfloat16 --bf16 --gradient_checkpointing \\
        --learning_rate 1e-6 --max_steps 200 --logging_steps 1 \\
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 256 \\
        --loss_type dapo --epsilon_high 0.28 \\
        --credit tp_schedule --schedule_mode linear --schedule_end_frac 0.8

    # other methods, same command with e.g.
    #   --credit forking --credit_rho 0.2
    #   --credit entropy_adv --schedule true
    #   --trust_region cppo --trust_region_delta 0.15 --num_iterations 2

CPU smoke test (what ``tests/test_examples.py`` runs, with a tiny random model and tokenizer saved to a folder)::

    python examples/trl_grpo_rlvr.py --model_name_or_path /tmp/tiny-qwen2 --output_dir /tmp/out --use_cpu \\
        --max_steps 2 --per_device_train_batch_size 4 --num_generations 4 --max_completion_length 8 \\
        --logging_steps 1 --report_to none --credit tp_schedule --schedule_end_frac 0.8

The ``rlvr/...`` metrics (``rlvr/schedule_value``, ``rlvr/active_fraction``, ``rlvr/trust_region_masked_fraction``,
``rlvr/cppo_delta_b_mean``, ``rlvr/delta_coef_std``) are logged with TRL's own and saved in
``<output_dir>/trainer_state.json``.
"""

import random
import re
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from rlvr_kernels.integrations.trl import RLVRGRPOConfig, RLVRGRPOTrainer


@dataclass
class ArithmeticScriptArguments(ScriptArguments):
    """
    Script arguments of the arithmetic GRPO example.

    Args:
        num_prompts (`int`, *optional*, defaults to `1024`):
            Number of generated arithmetic questions.
        max_operand (`int`, *optional*, defaults to `99`):
            Largest operand of a question.
        dataset_seed (`int`, *optional*, defaults to `0`):
            Seed of the question generator.
    """

    num_prompts: int = field(default=1024, metadata={"help": "Number of generated arithmetic questions."})
    max_operand: int = field(default=99, metadata={"help": "Largest operand of a question."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the question generator."})


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INT = re.compile(r"-?\d+")


def arithmetic_dataset(num_prompts: int, max_operand: int, seed: int = 0):
    """``num_prompts`` chat prompts "What is a op b?" and their integer answers (as strings)."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(num_prompts):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(sorted(_OPS))
        prompts.append([{"role": "user", "content": f"What is {a} {op} {b}? Answer with the number only."}])
        answers.append(str(_OPS[op](a, b)))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def _text(completion) -> str:
    """The text of a completion: a string (standard format) or a list of messages (conversational format)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def accuracy_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the first integer in the completion is the answer, else 0.0."""
    rewards = []
    for completion, target in zip(completions, answer):
        found = _INT.search(_text(completion))
        rewards.append(float(found is not None and found.group() == target))
    return rewards


def format_reward(completions, **kwargs) -> list[float]:
    """The share of the completion's non-blank characters that are digits or '-' (1.0 for a bare number)."""
    rewards = []
    for completion in completions:
        chars = [c for c in _text(completion) if not c.isspace()]
        rewards.append(sum(c.isdigit() or c == "-" for c in chars) / len(chars) if chars else 0.0)
    return rewards


def main(script_args, training_args, model_args):
    if script_args.dataset_name:
        raise ValueError(
            "this example generates its own arithmetic dataset (--num_prompts, --max_operand); to train "
            "on another dataset, replace arithmetic_dataset() and the reward functions"
        )

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    dataset = arithmetic_dataset(script_args.num_prompts, script_args.max_operand, script_args.dataset_seed)

    trainer = RLVRGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[accuracy_reward, format_reward],
        args=training_args,
        train_dataset=dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    trainer.save_state()  # trainer_state.json: the log history, rlvr/... metrics included
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name="arithmetic")


if __name__ == "__main__":
    parser = TrlParser((ArithmeticScriptArguments, RLVRGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
