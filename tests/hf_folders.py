"""Tiny Hugging Face folders built offline for the tests: a BERT-style encoder and a GPT-2 causal LM,
random weights, tokenizers from vocabulary files the helpers write."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the a an of to and in is was it for on with as by at from that this which be are not or "
         "model layer rank weight input output text token compress small large fast slow data test run "
         "python code file line value error number matrix vector cat dog house tree river stone light").split()

TEXTS = [
    "the model is small and fast",
    "a large matrix of weight values",
    "the cat and the dog run in the house",
    "compress the layer to a small rank",
    "the river is slow and the stone is large",
    "this text is a test of the tokenizer",
    "an error in the code of the file",
    "the output of the model is a vector",
    "light from the tree on the river",
    "data for the test run is in a file",
    "the input is text and the output is a number",
    "which layer is not small",
]


def bert_folder(root: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = root / "tiny-bert"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gpt2_folder(root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = root / "tiny-gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_texts(path: Path, jsonl: bool = False) -> Path:
    lines = [json.dumps({"text": t}) for t in TEXTS] if jsonl else TEXTS
    path.write_text("\n".join(lines) + "\n")
    return path
