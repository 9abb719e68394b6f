"""Offline fixtures of the TRL tests (tests/test_integration_trl.py, tests/test_trl_users.py) and of the scripts they
launch (tests/_trl_multiproc.py): a word-level tokenizer, a tiny random Qwen2, a toy prompt set and a toy reward.
Nothing here downloads anything."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

WORDS = [f"w{i}" for i in range(58)]

# The settings every TRL test starts from (CPU, fp32, two optimizer steps of 4 completions of 4 prompts' groups).
BASE = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    bf16=False,
    seed=0,
    learning_rate=5e-2,
    save_strategy="no",
    dataloader_num_workers=0,
    disable_tqdm=True,
)


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    hf.padding_side = "left"
    return hf


def tiny_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(WORDS) + 3,
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


def save_tiny_model(path) -> str:
    """A tiny random Qwen2 (seed 0) saved at ``path``: TRL builds the reference model from the policy's name_or_path."""
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_config()).save_pretrained(path)
    return str(path)


def tiny_model(path, dtype=None):
    return (
        Qwen2ForCausalLM.from_pretrained(path) if dtype is None else Qwen2ForCausalLM.from_pretrained(path, dtype=dtype)
    )


def dataset():
    return Dataset.from_dict({"prompt": [" ".join(WORDS[i : i + 3]) for i in range(0, 48, 3)]})


def even_words(completions, **kwargs):
    """Fraction of the completion's words with an even index: varies across random completions."""
    out = []
    for c in completions:
        ws = [w for w in c.split() if w.startswith("w")]
        out.append(sum(int(w[1:]) % 2 == 0 for w in ws) / 8.0)
    return out


def delta_oracle_inputs(trainer, out):
    """Independently of the integration, DelTA's inputs for a scored generation batch ``out``: the backbone's final
    hidden states (``model.model(...).last_hidden_state``, the lm_head input) ``[B, T, H]``, the log-probs of the
    completions from explicit logits at the rollout temperature ``[B, T]`` and the completion mask (theta_old)."""
    import torch

    P = out["prompt_ids"].size(1)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        h = trainer.model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, P - 1 : -1]
        z = trainer.model.lm_head(h).float() / trainer.args.temperature
        lp = torch.log_softmax(z, -1).gather(-1, out["completion_ids"][..., None])[..., 0]
    return h, lp, out["completion_mask"].bool()
