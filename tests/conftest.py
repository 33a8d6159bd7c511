"""Shared fixtures: a tiny word-level tokenizer and record-file writers (no network, no shared/ data)."""
from __future__ import annotations

import json
import os

import pytest

WORDS = ("the a dog dogs cat cats runs run sees see red blue circle circles square squares one two on left right "
         "this these that those . ? is are big small").split()


def make_word_tokenizer(directory: str, *, bos: bool = True, extra_words: tuple[str, ...] = ()):
    """A WordLevel Hugging Face tokenizer: one id per word, BOS added like Llama's (no EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS) + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<im_start>", "<im_patch>", "<im_end>"]})
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory) -> str:
    return make_word_tokenizer(str(tmp_path_factory.mktemp("word_tokenizer")))


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def text_record(i: int, text: str) -> dict:
    return {"id": f"t{i}", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": text}]}


def image_record(i: int, image: str, caption: str, prompt: str = "<image>") -> dict:
    return {"id": f"i{i}", "image": image,
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}


def write_png(path, size=(12, 8), color=(200, 30, 30)) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def randomize_torch_model(model, seed: int, *, unit_positions: bool = False):
    """Weights well away from transformers' init (norm scales ≠ 1, biases ≠ 0), so a swapped or
    skipped tensor shows in a parity test. `unit_positions`: position embeddings at unit scale,
    which makes the two DINOv2 interpolation modes clearly differ."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if unit_positions and "position" in name:
                p.copy_(noise)
            elif name.endswith("lambda1") or ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def score_items(logits_fn, tokenizer, items, *, protocol: str = "2025", image_template=None, batch_size: int = 64,
                buckets=None):
    """Encode, score and decide one task with the scoring module's functions (what the evaluator
    does per task and setting), as an independent path for tests to compare against."""
    from jaxllava.eval.scoring import DEFAULT_BUCKETS, compile_count, decide, encode_candidates, score_encoded

    encoded = encode_candidates(tokenizer, items, protocol=protocol, image_template=image_template)
    before = compile_count()
    flat = score_encoded(logits_fn, encoded, batch_size=batch_size, buckets=buckets or DEFAULT_BUCKETS)
    return decide(items, encoded, flat, compiles=compile_count() - before)
