"""Tiny randomly initialised LMs of real architectures, built in-process (no downloads).

A small byte-level BPE tokenizer is trained on a fixed text so that models and tokenizer
round-trip through save_pretrained/from_pretrained like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "gpt2", "gpt_neox")
D_MODEL = 64
N_LAYERS = 3

_TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "Sparse autoencoders find features in language models. import os, sys\n"
    "for i in range(10): print(i * i)  # squares\nclass Foo:\n    pass\n"
) * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=D_MODEL,
            intermediate_size=128,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=D_MODEL,
            intermediate_size=128,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def save_tiny(folder: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model + tokenizer into ``folder`` (loadable by saeforge.models.load_model)."""
    folder = Path(folder)
    tok = make_tokenizer()
    model = make_model(family, len(tok), seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_args(model, corpus, out, name, options: dict, *flags) -> list[str]:
    """`saeforge train` arguments for a quick run of a tiny model: 64-token windows with 20% held out,
    batches of 256 rows, written to ``out/name``, then ``options`` as ``--key value`` (they replace
    these defaults) and ``flags`` as given. Every value is a string, as ``cli.main`` receives them."""
    base = {
        "model": model,
        "corpus": corpus,
        "data.context_size": 64,
        "data.holdout_fraction": 0.2,
        "activations.batch_size": 256,
        "train.out_dir": out,
        "name": name,
    }
    args = ["train"] + [str(v) for key, value in (base | options).items() for v in (f"--{key}", value)]
    return args + [str(f) for f in flags]
