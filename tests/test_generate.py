"""Generation: the KV-cache path against full-sequence recomputation, sampling, compile counts,
prompts built as training builds samples, and the errors of bad inputs.

The model is configs/tiny.yaml's LLaVA (tiny DINOv2 tower, 16 image tokens) with random
weights and the bundled tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllava.config import load_config
from jaxllava.data.images import load_image
from jaxllava.data.pipeline import image_processing_for
from jaxllava.data.records import Record, Turn
from jaxllava.data.samples import build_sample_table
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.errors import ConfigError, DataError
from jaxllava.generate import (GenerationInput, GenerationSession, add_generate_parser, caption_example,
                               first_image_caption, prompt_ids, read_inputs, run_generate)
from jaxllava.model.decode import TRACES, Generator, Sampling, left_padded, prompt_bucket, top_p_filter
from jaxllava.model.llava import LlavaModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
IMAGES = [str(SAMPLE / "images" / "0001.png"), str(SAMPLE / "images" / "0002.png")]


@pytest.fixture(scope="module")
def tiny():
    """(config, model, tokenizer) of configs/tiny.yaml with random weights."""
    config = load_config(ROOT / "configs" / "tiny.yaml")
    tokenizer = load_tokenizer(config.data.tokenizer)
    return config, LlavaModel(config.model, rngs=nnx.Rngs(0)), tokenizer


def _jitted_forward(model):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs))
    return lambda *args, **kwargs: forward(state, *args, **kwargs)


def _full_forward_greedy(forward, model, prompt, steps, pixels=None, image_start=-1, width=48):
    """Reference: argmax of a full forward pass over prompt + tokens so far, one token at a time
    (rows right-padded to `width` as in training, so the jitted forward compiles once)."""
    sequence, logits_per_step = list(prompt), []
    for _ in range(steps):
        n = len(sequence)
        ids = np.zeros((1, width), np.int32)
        ids[0, :n] = sequence
        segment_ids = (np.arange(width) < n)[None].astype(np.int32)
        kwargs = {}
        if pixels is not None:
            mask = np.zeros(ids.shape, bool)
            mask[0, image_start:image_start + model.config.image_tokens] = True
            kwargs = dict(pixels=pixels[None], image_mask=mask)
        logits = forward(ids, segment_ids=segment_ids, positions=np.arange(width)[None], **kwargs)
        logits_per_step.append(np.asarray(logits[0, n - 1]))
        sequence.append(int(logits_per_step[-1].argmax()))
    return sequence[len(prompt):], np.stack(logits_per_step)


def _assert_cached_equals_full(model, generated, prompts, pixels=None, starts=None):
    forward = _jitted_forward(model)
    for b, prompt in enumerate(prompts):
        steps = generated.tokens.shape[1]
        expected, logits = _full_forward_greedy(forward, model, prompt, steps, None if pixels is None else pixels[b],
                                                -1 if starts is None else starts[b])
        assert generated.tokens[b].tolist() == expected
        np.testing.assert_allclose(generated.logits[b], logits, atol=1e-4, rtol=1e-4)


def test_cached_greedy_text_generation_equals_full_recomputation(tiny):
    config, model, tokenizer = tiny
    ids = special_ids(tokenizer)
    prompts = [prompt_ids(GenerationInput(text), tokenizer, config)[0]
               for text in ("the dog sees two red circles on the left", "a cat")]
    batch = left_padded(prompts, pad_id=ids.pad, length=prompt_bucket(max(map(len, prompts))))
    assert batch.pad.tolist() == [16 - len(prompts[0]), 16 - len(prompts[1])]  # rows of different lengths
    generated = Generator(model, eos_id=None).generate(batch, 6, keep_logits=True)
    _assert_cached_equals_full(model, generated, prompts)


def test_cached_greedy_image_generation_equals_full_recomputation(tiny):
    config, model, tokenizer = tiny
    ids = special_ids(tokenizer)
    encoded = [prompt_ids(GenerationInput(text, image), tokenizer, config)
               for text, image in (("", IMAGES[0]), ("two purple", IMAGES[1]))]
    prompts, starts = [p for p, _ in encoded], [s for _, s in encoded]
    processing = image_processing_for(config.data, config.model.vision.image_size)
    pixels = np.stack([load_image(path, processing) for path in IMAGES])
    batch = left_padded(prompts, pad_id=ids.pad, length=32, image_starts=starts,
                        image_tokens=config.model.image_tokens, pixels=pixels)
    assert batch.image_mask.sum(axis=1).tolist() == [16, 16]
    generated = Generator(model, eos_id=None).generate(batch, 5, keep_logits=True)
    _assert_cached_equals_full(model, generated, prompts, pixels, starts)
    # The image matters: the same ids with the other image give other logits.
    swapped = dataclasses.replace(batch, pixels=pixels[::-1].copy())
    other = Generator(model, eos_id=None).generate(swapped, 5, keep_logits=True)  # compiled already
    assert np.abs(other.logits[:, 0] - generated.logits[:, 0]).max() > 1e-3


def test_decode_step_compiles_once_whatever_the_number_of_tokens(tiny):
    config, model, tokenizer = tiny
    batch = left_padded([prompt_ids(GenerationInput("the dog"), tokenizer, config)[0]] * 2,
                        pad_id=special_ids(tokenizer).pad, length=16)
    generator = Generator(model, eos_id=None)
    before = dict(TRACES)
    generator.generate(batch, 3, cache_len=40)  # a cache length no other test uses: compiled here
    first = {name: TRACES[name] - before.get(name, 0) for name in ("prefill", "decode_step")}
    assert first == {"prefill": 1, "decode_step": 1}  # two decode steps, one compilation
    long = generator.generate(batch, 20, cache_len=40)
    assert long.tokens.shape == (2, 20)
    again = Generator(model, eos_id=None).generate(batch, 20, cache_len=40)  # a new Generator reuses it
    np.testing.assert_array_equal(again.tokens, long.tokens)
    assert {name: TRACES[name] - before.get(name, 0) for name in first} == first  # 38 more steps, no compilation


def test_sampling_is_reproducible_by_seed_and_seeds_differ(tiny):
    config, model, tokenizer = tiny
    batch = left_padded([prompt_ids(GenerationInput("the"), tokenizer, config)[0]] * 4,
                        pad_id=special_ids(tokenizer).pad, length=16)
    generator = Generator(model, eos_id=None)

    def sample(seed):
        return generator.generate(batch, 12, Sampling(temperature=1.5, top_p=0.95, seed=seed)).tokens

    first = sample(1)
    compiled = dict(TRACES)
    again, other = sample(1), sample(2)
    assert dict(TRACES) == compiled  # the seed is an argument, not a compile-time constant
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len({tuple(row) for row in first}) > 1  # rows draw independently within one batch


def test_top_p_and_temperature_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32) * 3
    for temperature, top_p in ((1.0, 0.9), (0.7, 0.5), (2.0, 0.05)):
        ours = np.asarray(top_p_filter(jnp.asarray(logits / temperature), top_p))
        scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
        theirs = TopPLogitsWarper(top_p)(None, scores).numpy()
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)


def test_generation_stops_at_eos(tiny):
    config, model, tokenizer = tiny
    batch = left_padded([prompt_ids(GenerationInput("the dog"), tokenizer, config)[0]],
                        pad_id=special_ids(tokenizer).pad, length=16)
    greedy = Generator(model, eos_id=None).generate(batch, 10).tokens[0]
    # Call the third greedy token EOS: generation keeps it and stops there.
    stopped = Generator(model, eos_id=int(greedy[2])).generate(batch, 10, check_every=1)
    assert stopped.row(0) == greedy[:3].tolist() and stopped.tokens.shape[1] < 10


@pytest.mark.parametrize("objective", ["plain_lm", "captions"])
def test_prompt_is_the_training_sample_prefix(tiny, objective):
    """A prompt holding a record's caption gives exactly the ids training built for that record."""
    config, _, tokenizer = tiny
    data = dataclasses.replace(config.data, objective=objective, add_eos=True)
    config = dataclasses.replace(config, data=data)
    caption = "two purple circles in the middle ."
    record = Record(file="captions.json", where="record 0", id="cap-0001",
                    turns=(Turn("user", "<image>"), Turn("assistant", caption)), image=IMAGES[0])
    table = build_sample_table([[record]], tokenizer, data, image_tokens=config.model.image_tokens, max_len=64)
    trained, _ = table.sample(0)
    ids, start = prompt_ids(GenerationInput(caption, IMAGES[0]), tokenizer, config)
    assert ids == trained[:-1].tolist()  # all but the EOS training appends
    assert start == int(table.image_start[0]) == 1  # right after BOS
    empty, _ = prompt_ids(GenerationInput("", IMAGES[0]), tokenizer, config)
    assert empty == trained[:1 + config.model.image_tokens].tolist()  # BOS + the image span: caption it


def test_chat_prompt_is_the_user_turn_of_training(tiny):
    config, _, tokenizer = tiny
    data = dataclasses.replace(config.data, objective="chat", chat_template="llama_2")
    config = dataclasses.replace(config, data=data)
    record = Record(file="chat.json", where="record 0", id="c0", image=IMAGES[0],
                    turns=(Turn("user", "<image>\nwhat is this ?"), Turn("assistant", "a circle")))
    table = build_sample_table([[record]], tokenizer, data, image_tokens=config.model.image_tokens, max_len=64)
    trained, is_target = table.sample(0)
    ids, _ = prompt_ids(GenerationInput("what is this ?", IMAGES[0]), tokenizer, config)
    assert ids == trained[:int(np.argmax(is_target))].tolist()  # everything before the first target


def test_bad_inputs_give_named_errors(tiny, tmp_path):
    config, model, tokenizer = tiny
    session = GenerationSession(model, tokenizer, config)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"prompt": "the dog"}) + "\n" + json.dumps({"prompt": "", "image": "gone.png"}))
    with pytest.raises(DataError, match=r"inputs.jsonl, line 2, field 'image': no such image file"):
        session.generate(read_inputs(str(inputs)), 4)
    long = GenerationInput(" ".join(["dog"] * 250), file=str(inputs), where="line 1")
    with pytest.raises(DataError, match=r"line 1, field 'prompt': .* exceed the model's max_position_embeddings"):
        session.generate([long], 8)
    with pytest.raises(DataError, match=r"field 'prompt': holds <im_patch>"):
        session.generate([GenerationInput("a <im_patch> b")], 4)
    inputs.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"line 1, field 'prompt': expected a string"):
        read_inputs(str(inputs))
    text_only = dataclasses.replace(config, model=dataclasses.replace(config.model, vision=None))
    with pytest.raises(DataError, match=r"field 'image': the model has no vision input"):
        GenerationSession(model, tokenizer, text_only).encode(GenerationInput("", IMAGES[0]), 4)
    batch = left_padded([[1, 2, 3]], pad_id=0, length=16)
    with pytest.raises(ValueError, match="the cache has 18 columns: too few"):
        Generator(model, eos_id=None).generate(batch, 4, cache_len=18)


def _write_checkpoint(model, config, root):
    from jaxllava.checkpoint import write_params_checkpoint

    return write_params_checkpoint(str(root / "run"), config, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                   str(SAMPLE / "tokenizer"), {"imported_from": "test"})


def test_cli_generates_for_every_input_line_in_order(tiny, tmp_path, capsys):
    import argparse

    config, model, tokenizer = tiny
    workdir = _write_checkpoint(model, config, tmp_path)
    inputs = tmp_path / "inputs.jsonl"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(pathlib.Path(IMAGES[0]).read_bytes())
    inputs.write_text("\n".join(json.dumps(line) for line in (
        {"prompt": "", "image": "images/a.png"}, {"prompt": "the dog"}, {"prompt": "a", "image": "images/a.png"})))
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--checkpoint", workdir, "--inputs", str(inputs), "--max-new-tokens", "5",
                              "--batch-size", "2"])
    assert run_generate(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["line"] for row in rows] == ["line 1", "line 2", "line 3"]
    # The CLI's outputs are the in-memory model's greedy outputs.
    session = GenerationSession(model, tokenizer, config)
    expected = session.generate(read_inputs(str(inputs)), 5)
    assert [row["output"] for row in rows] == [session.text(tokens) for tokens in expected]
    with pytest.raises(ConfigError, match="--top-p and --seed apply to sampling"):
        run_generate(parser.parse_args(["generate", "--checkpoint", workdir, "--prompt", "a", "--top-p", "0.5"]))


def test_caption_example_captions_a_bundled_image(tiny):
    config, model, tokenizer = tiny
    records = [Record(file="captions.json", where="record 0", id="cap-0001", image=IMAGES[0],
                      turns=(Turn("user", "<image>"), Turn("assistant", "two purple circles in the middle .")))]
    table = build_sample_table([records], tokenizer, config.data, image_tokens=config.model.image_tokens, max_len=64)
    image, reference = first_image_caption(table, tokenizer)
    assert (image, reference) == (IMAGES[0], "two purple circles in the middle .")
    caption = caption_example(model, tokenizer, config, image, max_new_tokens=6)
    session = GenerationSession(model, tokenizer, config)
    assert caption == session.text(session.generate([GenerationInput("", image)], 6)[0])
    assert isinstance(caption, str) and caption
