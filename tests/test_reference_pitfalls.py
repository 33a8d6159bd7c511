"""The reference's pitfalls (the README's pitfall table) that no module test covers on its own.

Each test names the pitfall it guards in its docstring; the table in the README maps every
pitfall 1-34 to its tests (most live beside the module they concern). Tiny configs, the
bundled sample data (data/sample, configs/tiny.yaml) and small generated records; one short
training run (pitfall 16).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import image_record, make_word_tokenizer, text_record, write_json, write_jsonl, write_png
from flax import nnx

from jaxllava.config import build_config, dump_yaml, load_config
from jaxllava.data.batch import ImageBatch, TextBatch
from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.images import load_image
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.records import read_records
from jaxllava.data.samples import build_sample_table, record_pieces
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.model.config import LlamaConfig, ModelConfig, ResamplerConfig
from jaxllava.model.llava import LlavaModel
from jaxllava.model.sharding import make_mesh
from jaxllava.model.vision import VisionTower
from jaxllava.train.loop import train
from jaxllava.model.llava import create_model
from jaxllava.train.setup import plan_steps
from jaxllava.train.optimizer import lr_multiplier, trainable_manifest
from jaxllava.train.step import microbatch_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
CANONICAL = os.path.join(ROOT, "configs", "babylm_reference.yaml")
SAMPLE_PAIRS = os.path.join(ROOT, "data", "sample", "minimal_pairs.jsonl")
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves CPU compile time; numerics unchanged
N = 6  # image tokens of the generated-data pipelines
COLOURS = [(200, 0, 0), (0, 0, 200), (0, 200, 0), (200, 200, 0), (0, 200, 200)]
CAPTIONS = ["a red circle", "two blue squares", "one green square", "the big circle", "this small square"]
SENTENCES = ["the dog runs .", "these dogs run .", "a cat sees the dog .", "the big cat runs .",
             "those cats see a dog .", "this dog is small .", "two red circles ."]


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def tiny():
    """configs/tiny.yaml, one epoch: the 2-layer LLaVA on the bundled sample data (N = 16)."""
    return load_config(TINY, ["data.epochs=1"])


@pytest.fixture(scope="module")
def sample_pipeline(tiny):
    """The bundled sample data (3300 text records; 400 captions and 400 questions on the same images) as
    tiny.yaml feeds it."""
    sources = tuple(dataclasses.replace(s, path=os.path.join(ROOT, s.path)) for s in tiny.data.sources)
    data = dataclasses.replace(tiny.data, tokenizer=os.path.join(ROOT, tiny.data.tokenizer), sources=sources,
                               validation_fraction=0.0)  # every record trains
    return DataPipeline(data, image_tokens=tiny.model.image_tokens, image_size=tiny.model.vision.image_size)


def first_batch(pipeline: DataPipeline, modality: str):
    index = next(k for k, plan in enumerate(pipeline.plans) if plan.modality == modality)
    return pipeline.dataset()[index]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """7 text and 5 image records (every image a different colour and caption): both modalities
    leave a partial last microbatch with text_rows=4, image_rows=2."""
    root = tmp_path_factory.mktemp("generated")
    texts = [text_record(i, SENTENCES[i]) for i in range(7)]
    images = []
    for i, (colour, caption) in enumerate(zip(COLOURS, CAPTIONS)):
        write_png(str(root / "img" / f"{i}.png"), size=(9 + i, 7), color=colour)
        images.append(image_record(i, f"img/{i}.png", caption))
    return root, write_jsonl(root / "text.jsonl", texts), write_json(root / "images.json", images)


def generated_pipeline(generated, tokenizer_dir, **overrides) -> DataPipeline:
    _, text, images = generated
    settings = dict(sources=(SourceConfig(text), SourceConfig(images)), tokenizer=tokenizer_dir, buckets=(16,),
                    text_rows=4, image_rows=2, epochs=2, pack_text=False)
    settings.update(overrides)
    process = {k: settings.pop(k) for k in ("process_index", "process_count") if k in settings}
    return DataPipeline(DataConfig(**settings), image_tokens=N, image_size=8, **process)


def all_batches(pipeline: DataPipeline) -> list:
    iterator = pipeline.iterator()
    return [next(iterator) for _ in range(len(pipeline))]


def non_word_ids(pipeline: DataPipeline) -> list[int]:
    ids = special_ids(pipeline.tokenizer)
    return [i for i in (ids.bos, ids.eos, ids.im_start, ids.im_patch, ids.im_end) if i is not None]


def words_in_rows(batch, skip: list[int]) -> int:
    """Words the rows really hold: with a word-level tokenizer every token of a segment that is not
    BOS, EOS or an image placeholder is one whitespace word of the trained text."""
    real = batch.segment_ids > 0
    return int((real & ~np.isin(batch.input_ids, skip)).sum())


def random_model(model_config: ModelConfig, seed: int = 0):
    """(graphdef, state) of a model whose parameters are drawn here with numpy: no init compile."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if jax.tree_util.keystr(path).endswith("scale']") else 0.2 * noise)

    return graphdef, jax.tree_util.tree_map_with_path(draw, state)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return random_model(dataclasses.replace(tiny.model, dtype="float32"))


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _embeddings(graphdef, state, input_ids, pixels, image_mask):
    """(input embeddings with the images spliced in, plain token embeddings)."""
    model = nnx.merge(graphdef, state)
    return model.embed_inputs(input_ids, pixels, image_mask), model.lm.embed(input_ids)


def spliced_positions(graphdef, state, batch: ImageBatch) -> np.ndarray:
    merged, tokens = _embeddings(graphdef, state, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixels),
                                 jnp.asarray(batch.image_mask))
    return np.asarray(jnp.any(merged != tokens, axis=-1))


# ----------------------------------------------------------------------------- pitfalls 1-4: modality


def test_text_only_microbatch_never_calls_the_vision_tower(tiny, sample_pipeline, monkeypatch):
    """Pitfall 1: the reference ran the vision tower on a black image for text-only samples. The
    train step's loss on a text microbatch of the bundled data traces no call of the tower;
    on an image microbatch it traces exactly one."""
    calls = []
    original = VisionTower.__call__

    def counting(self, pixels):
        calls.append(pixels.shape)
        return original(self, pixels)

    monkeypatch.setattr(VisionTower, "__call__", counting)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(tiny.model, rngs=nnx.Rngs(0))))

    def trace(batch):
        calls.clear()
        jax.make_jaxpr(lambda s: microbatch_loss(nnx.merge(graphdef, s), batch, 32))(state)
        return list(calls)

    text = first_batch(sample_pipeline, "text")
    assert isinstance(text, TextBatch) and text.stats.samples > 0
    assert trace(text) == []
    image = first_batch(sample_pipeline, "image")
    assert trace(image) == [image.pixels.shape]


def test_only_image_samples_hold_placeholders_and_image_tokens(sample_pipeline):
    """Pitfall 2: the reference added image_token_num to the length of every sample. Over the whole
    bundled table a sample holds N placeholder ids exactly when it has an image, and every
    microbatch's image-token count is N per image sample."""
    table, n = sample_pipeline.table, sample_pipeline.image_tokens
    ids = special_ids(sample_pipeline.tokenizer)
    placeholders = np.isin(table.tokens, [ids.im_start, ids.im_patch, ids.im_end])
    per_sample = np.add.reduceat(placeholders.astype(np.int64), table.offsets[:-1])
    assert table.has_image.sum() == 800 and (~table.has_image).sum() == 3300
    np.testing.assert_array_equal(per_sample, n * table.has_image)
    assert all((image is not None) == has for image, has in zip(table.images, table.has_image))
    for stats in sample_pipeline.stats():
        expected = n * stats.samples if stats.modality == "image" else 0
        assert stats.image_tokens == expected


def test_every_microbatch_of_two_epochs_is_single_modality_including_the_tails(generated, word_tokenizer_dir):
    """Pitfalls 3-4: the reference mixed modalities in every microbatch, and its grouped sampler
    appended one mixed tail batch. Here no microbatch mixes them, the partial last microbatches of
    both modalities included (they are filled with empty rows, never with the other modality)."""
    for pack in (False, True):
        pipeline = generated_pipeline(generated, word_tokenizer_dir, pack_text=pack)
        ids = special_ids(pipeline.tokenizer)
        batches = all_batches(pipeline)
        filler_rows = {"text": 0, "image": 0}
        for batch in batches:
            placeholders = np.isin(batch.input_ids, [ids.im_start, ids.im_patch, ids.im_end])
            used = (batch.segment_ids > 0).any(axis=1)
            filler_rows[batch.modality] += int((~used).sum())
            if isinstance(batch, TextBatch):
                assert not placeholders.any()
            else:
                assert isinstance(batch, ImageBatch)
                np.testing.assert_array_equal(batch.image_rows, used)  # every used row is an image row
                np.testing.assert_array_equal(placeholders.sum(axis=1), N * used)
        assert filler_rows["image"] == 2  # 5 images in rows of 2, per epoch: one empty row each
        assert filler_rows["text"] > 0
        assert sum(b.stats.samples for b in batches) == 2 * 12


# ----------------------------------------------------------------------------- pitfall 5: lm_head


def test_canonical_config_trains_the_untied_lm_head():
    """Pitfall 5: the reference's stage 1 froze its randomly initialised lm_head. The canonical
    config (configs/babylm_reference.yaml) has an untied head and the trainable manifest that the
    run writes marks it trained."""
    config = load_config(CANONICAL)
    assert not config.model.lm.tie_word_embeddings and not config.optim.freeze_lm_head
    # One layer each is enough: what trains depends on the parts and the head, not the depth.
    shallow = dataclasses.replace(config.model, lm=dataclasses.replace(config.model.lm, num_layers=1),
                                  vision=dataclasses.replace(config.model.vision, num_layers=1))
    abstract = nnx.eval_shape(lambda: LlavaModel(shallow, rngs=nnx.Rngs(0)))
    manifest = trainable_manifest(nnx.state(abstract, nnx.Param), config.optim)
    assert manifest["lm/lm_head/kernel"] is True
    assert manifest["lm/embed_tokens/embedding"] is True and manifest["projector/layers/0/kernel"] is True
    assert not any(trained for path, trained in manifest.items() if path.startswith("vision/"))


# ----------------------------------------------------------------------------- pitfalls 6, 22, 28: formatting


def test_training_and_evaluation_encode_every_minimal_pair_sentence_with_the_same_ids(tmp_path):
    """Pitfalls 6, 22, 28: the reference trained on chat-formatted text with a slow tokenizer and
    scored BLiMP on bare sentences with a fast one. With the canonical config's data settings,
    the tokenizer the training pipeline loads and the one the evaluator loads (each through
    load_tokenizer, as launch.py train and eval do) turn every bundled minimal-pair sentence into
    the same ids: [BOS] + tokenizer(sentence)."""
    canonical = load_config(CANONICAL).data
    tokenizer_dir = os.path.join(ROOT, "data", "sample", "tokenizer")
    training_tokenizer, eval_tokenizer = load_tokenizer(tokenizer_dir), load_tokenizer(tokenizer_dir)
    assert training_tokenizer.is_fast and eval_tokenizer.is_fast

    evaluator = MinimalPairEvaluator({"pairs": SAMPLE_PAIRS}, eval_tokenizer)
    task = evaluator.tasks["pairs"]
    sentences = [s for item in task.items for s in item.sentences]
    assert len(sentences) == 600
    records = read_records(write_jsonl(tmp_path / "sentences.jsonl",
                                       [text_record(i, s) for i, s in enumerate(sentences)]))
    table = build_sample_table([records], training_tokenizer, dataclasses.replace(canonical, tokenizer=tokenizer_dir),
                               image_tokens=256, max_len=max(canonical.buckets))
    for row, sentence in enumerate(sentences):
        trained, _ = table.sample(row)
        bare = [eval_tokenizer.bos_token_id] + eval_tokenizer(sentence, add_special_tokens=False)["input_ids"]
        assert trained.tolist() == task.encoded["text"].token_ids[row].tolist() == bare, sentence


# ----------------------------------------------------------------------------- pitfall 7: empty human turns


def test_empty_human_turn_keeps_assistant_targets_under_the_chat_template(tmp_path):
    """Pitfall 7: under the reference's LLAMA_2 template an empty human turn masked every label.
    Here the chat template still trains the assistant turn and its EOS, and a sample with no target
    at all is an error naming the file, record and field."""
    tok = load_tokenizer(make_word_tokenizer(str(tmp_path / "tok"), extra_words=("[INST]", "[/INST]")))
    path = write_jsonl(tmp_path / "r.jsonl", [text_record(0, "the dog runs .")])
    table = build_sample_table([read_records(path)], tok, DataConfig(tokenizer="x", objective="chat"),
                               image_tokens=0, max_len=64)
    tokens, is_target = table.sample(0)
    targets = tok.convert_ids_to_tokens(tokens[is_target].tolist())
    assert targets == ["the", "dog", "runs", ".", "</s>"]

    user_only = write_jsonl(tmp_path / "u.jsonl", [{"id": "u", "conversations": [{"from": "human", "value": "a dog"}]}])
    with pytest.raises(DataError) as caught:
        build_sample_table([read_records(user_only)], tok, DataConfig(tokenizer="x", objective="chat"),
                           image_tokens=0, max_len=64)
    error = caught.value
    assert (error.file, error.record, error.record_id, error.field, error.reason) == (
        user_only, "line 1", "u", "conversations", "no_targets")


# ----------------------------------------------------------------------------- pitfalls 8, 14, 15: the splice


def test_plain_lm_keeps_the_human_turn_after_the_image_span(tmp_path, word_tokenizer_dir):
    """Pitfall 8: the reference's first plain-LM version dropped human turns (and with them the
    image placeholders). Here the image span comes from the record's image, and the human text
    stays in the sample as trained text."""
    tok = load_tokenizer(word_tokenizer_dir)
    write_png(str(tmp_path / "img.png"))
    path = write_jsonl(tmp_path / "r.jsonl", [image_record(0, "img.png", "runs .", prompt="<image> the dog")])
    table = build_sample_table([read_records(path)], tok, DataConfig(tokenizer="x"), image_tokens=N, max_len=64)
    tokens, is_target = table.sample(0)
    ids = special_ids(tok)
    words = tok("the dog runs .", add_special_tokens=False)["input_ids"]
    assert tokens.tolist() == [ids.bos, *ids.image_span(N), *words]
    assert is_target.tolist() == [False] * (1 + N) + [True] * 4


def test_each_image_row_of_a_pipeline_batch_gets_exactly_n_spliced_vectors(tiny_model, sample_pipeline):
    """Pitfall 8: in the reference's gen 23 images were encoded and their features discarded. On an
    image microbatch of the bundled data the model overwrites exactly the N placeholder positions
    of each image row, and nothing else: one spliced image per image row."""
    batch = first_batch(sample_pipeline, "image")
    changed = spliced_positions(*tiny_model, batch)
    np.testing.assert_array_equal(changed, batch.image_mask)
    assert int(changed.any(axis=1).sum()) == int(batch.image_rows.sum()) == batch.stats.samples
    assert (changed.sum(axis=1) == sample_pipeline.image_tokens * batch.image_rows).all()


def test_spliced_features_follow_the_pixels_and_the_current_projector(tiny_model, sample_pipeline):
    """Pitfall 15: the reference kept a black-image feature cache that, had it hit, would have
    replaced the trainable projector's output with init-time features. Here different pixels give
    different spliced vectors, black pixels included, and changing the projector's weights changes
    the vectors for the same pixels: nothing is cached."""
    graphdef, state = tiny_model
    batch = first_batch(sample_pipeline, "image")
    ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.image_mask)

    def spliced(pixels, params):
        merged, _ = _embeddings(graphdef, params, ids, jnp.asarray(pixels), mask)
        return np.asarray(merged)[batch.image_mask].reshape(batch.input_ids.shape[0], -1)

    base = spliced(batch.pixels, state)
    black = batch.pixels.copy()
    black[0] = (0.0 - np.asarray(sample_pipeline.processing.mean)) / np.asarray(sample_pipeline.processing.std)
    other = spliced(black, state)
    assert np.abs(other[0] - base[0]).max() > 1e-3  # the row with new pixels changed
    np.testing.assert_array_equal(other[1:], base[1:])  # the other rows did not
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "projector" in jax.tree_util.keystr(path) else x, state)
    assert np.abs(spliced(batch.pixels, moved) - base).max() > 1e-3


def test_resampler_output_is_what_the_decoder_reads_or_there_is_no_resampler(tiny):
    """Pitfall 14: the reference computed its TokenPacker and added 0·mean(output), so dead
    parameters still ran (and a NaN there poisoned the features). Here the identity resampler has
    no parameters at all, and a real resampler's parameters change the spliced features."""
    identity = nnx.eval_shape(lambda: LlavaModel(tiny.model, rngs=nnx.Rngs(0)))
    assert tiny.model.resampler.kind == "identity"
    assert jax.tree.leaves(nnx.state(identity.resampler, nnx.Param)) == []

    config = dataclasses.replace(tiny.model, dtype="float32",
                                 resampler=ResamplerConfig("perceiver", num_latents=4, depth=1, num_heads=4))
    graphdef, state = random_model(config)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    encode = jax.jit(lambda s: nnx.merge(graphdef, s).encode_images(pixels), compiler_options=FAST_COMPILE)
    base = np.asarray(encode(state))
    noise = np.random.default_rng(1)
    for name in ("latents", "norm", "layers"):  # every part of the resampler reaches the features
        moved = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.1 * noise.normal(size=x.shape).astype(np.float32)
            if jax.tree_util.keystr(path).startswith(f"['resampler']['{name}']") else x, state)
        assert np.abs(np.asarray(encode(moved)) - base).max() > 1e-3, name


# ----------------------------------------------------------------------------- pitfall 12: preprocessing record


def test_pipeline_fingerprint_changes_with_the_image_preprocessing(generated, word_tokenizer_dir, tmp_path):
    """Pitfall 12: the reference never saved the processor settings it trained with. jaxllava
    reads mean and std from `data.image.preprocessor_config` (as the canonical config does), so the
    file's content must be part of what the run records: two preprocessor configs that normalise
    differently must give different data fingerprints (DatasetSummary.fingerprint, the run's
    `pipeline_sha256`)."""
    summaries, pixels = [], []
    for k, mean in enumerate(([0.485, 0.456, 0.406], [0.5, 0.5, 0.5])):
        config_path = write_json(tmp_path / f"preprocessor_{k}.json", {
            "crop_size": {"height": 8, "width": 8}, "do_center_crop": True, "image_mean": mean,
            "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": {"shortest_edge": 8}})
        pipeline = generated_pipeline(generated, word_tokenizer_dir,
                                      image=dataclasses.replace(DataConfig().image, preprocessor_config=config_path))
        summaries.append(pipeline.summary.fingerprint)
        pixels.append(first_batch(pipeline, "image").pixels)
    assert np.abs(pixels[0] - pixels[1]).max() > 0.1  # the two runs train on different inputs
    assert summaries[0] != summaries[1], "the data fingerprint ignores the preprocessor config's content"


# ----------------------------------------------------------------------------- pitfall 13: geometry from config


def test_resampler_geometry_comes_from_the_config_alone(tiny, monkeypatch):
    """Pitfall 13: the reference's TokenPacker took its grid from the config's 37×37, ignored depth
    and ff_mult, and let MM_PERCEIVER_LATENTS* environment variables override the config at load.
    Here the environment changes nothing, the output count is num_latents, and the perceiver
    builds `depth` layers of width ff_mult·D."""
    monkeypatch.setenv("MM_PERCEIVER_LATENTS", "32")
    monkeypatch.setenv("MM_PERCEIVER_LATENTS_FAST", "9")
    vision = tiny.model.vision  # 4×4 grid of width 64
    for resampler in (ResamplerConfig("token_packer", num_latents=4, num_heads=4),
                      ResamplerConfig("perceiver", num_latents=9, depth=3, ff_mult=2, num_heads=4)):
        config = dataclasses.replace(tiny.model, resampler=resampler)
        model = nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0)))
        assert config.image_tokens == resampler.num_latents
        graphdef, state = nnx.split(model)
        features = jax.ShapeDtypeStruct((2, vision.output_tokens, 64), jnp.float32)
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).resampler(x), state, features)
        assert out.shape == (2, resampler.num_latents, 64)
        if resampler.kind == "perceiver":
            assert len(model.resampler.layers) == 3
            assert model.resampler.layers[0].ff_in.kernel.shape == (64, 2 * 64)


# ----------------------------------------------------------------------------- pitfall 16: word counting


def test_step_words_equal_the_words_in_the_steps_microbatches_over_two_epochs(generated, word_tokenizer_dir):
    """Pitfall 16: the reference counted words by file position, once, at logging steps, ignoring
    the world size. Here, over two epochs and steps of 3 microbatches, each step's BatchStats words
    equal the words its rows really hold (read back from the token ids), on one process and summed
    over the rows of two processes; the word budget's stop step follows from those words."""
    single = generated_pipeline(generated, word_tokenizer_dir, text_rows=2)
    skip = non_word_ids(single)
    batches = all_batches(single)
    assert len(single.epoch_starts) == 2 and {b.modality for b in batches} == {"text", "image"}
    held = [words_in_rows(b, skip) for b in batches]
    assert [b.stats.words for b in batches] == held
    grad_accum = 3
    step_words = [sum(held[i:i + grad_accum]) for i in range(0, len(held), grad_accum)]
    assert sum(step_words) == 2 * int(single.table.words.sum())
    budget = sum(step_words[:3]) + 1  # reached during step 4
    assert plan_steps(step_words, len(batches), grad_accum, None, budget) == (4, "word_budget")
    assert list(single.plans.step_words(grad_accum)) == step_words  # what training plans from

    parts = [generated_pipeline(generated, word_tokenizer_dir, text_rows=2, process_index=i, process_count=2)
             for i in range(2)]
    for plan, whole in zip(single.plans, held):
        shares = [part.builder(plan) for part in parts]
        assert sum(words_in_rows(share, skip) for share in shares) == whole
        assert shares[0].stats.words == shares[1].stats.words == whole


def test_logged_words_and_learning_rate_follow_every_step_when_logging_every_third(tmp_path, word_tokenizer_dir):
    """Pitfalls 16 and 26: the reference added words only at logging steps, and a DeepSpeed config
    could silently replace the LR schedule. A two-epoch run logging every 3rd step reports at each
    logged step the words of every microbatch trained so far and the configured schedule's LR."""
    texts = [text_record(i, " ".join(SENTENCES[i % 7].split()[:2 + i % 3])) for i in range(24)]
    source = write_jsonl(tmp_path / "text.jsonl", texts)
    config = build_config({
        "model": {"lm": {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1,
                         "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 16},
                  "vision": None, "dtype": "float32", "attention_impl": "xla"},
        "data": {"sources": [{"path": source}], "tokenizer": word_tokenizer_dir, "buckets": [8], "text_rows": 2,
                 "epochs": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"grad_accum": 2, "log_every": 3},
        "checkpoint": {"every_steps": 0, "milestones": False, "async_save": False},
        "logging": {"tensorboard": False, "progress": False},
    })
    pipeline = DataPipeline(config.data, image_tokens=0, image_size=None)
    skip = non_word_ids(pipeline)
    held = [words_in_rows(b, skip) for b in all_batches(pipeline)]
    cumulative = np.cumsum([sum(held[i:i + 2]) for i in range(0, len(held), 2)])
    assert len(cumulative) >= 7

    summary = train(config, str(tmp_path / "run"), compiler_options=FAST_COMPILE)
    assert summary["steps"] == len(cumulative) and summary["words_seen"] == cumulative[-1]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r["step"] for r in rows]
    assert logged == sorted({1, *range(3, len(cumulative) + 1, 3), len(cumulative)})
    schedule = lr_multiplier(config.optim, len(cumulative))
    for row in rows:
        assert row["words_seen"] == cumulative[row["step"] - 1], row
        assert row["lr"] == pytest.approx(config.optim.lr * float(schedule(row["step"] - 1)), rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------- pitfalls 20-21: images


def test_each_image_row_carries_the_pixels_of_its_own_record(generated, word_tokenizer_dir):
    """Pitfall 20: the reference matched images to rows by order. Here row r of an image microbatch
    holds its record's caption and pixels[r] is that record's image (every record has its own
    colour and caption), for every row of two epochs."""
    root, _, _ = generated
    pipeline = generated_pipeline(generated, word_tokenizer_dir)
    tok = pipeline.tokenizer
    caption_of = {tuple(tok(c, add_special_tokens=False)["input_ids"]): i for i, c in enumerate(CAPTIONS)}
    checked = 0
    for batch in all_batches(pipeline):
        if not isinstance(batch, ImageBatch):
            continue
        for r in np.flatnonzero(batch.image_rows):
            end = np.flatnonzero(batch.image_mask[r])[-1] + 1
            caption = tuple(batch.input_ids[r, end:][batch.segment_ids[r, end:] > 0].tolist())
            record = caption_of[caption]
            expected = load_image(str(root / "img" / f"{record}.png"), pipeline.processing)
            np.testing.assert_array_equal(batch.pixels[r], expected)
            checked += 1
    assert checked == 2 * len(CAPTIONS)


def test_corrupt_image_stops_the_run_naming_the_records_file_record_and_field(tmp_path, word_tokenizer_dir):
    """Pitfall 21: the reference replaced a sample whose image failed to load by its neighbour.
    Under the default error policy a corrupt image stops iteration with a DataError that names
    the image file, the record (its file, position and id) and the field; no batch holds a
    substitute."""
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_png(str(tmp_path / "ok.png"))
    records = write_json(tmp_path / "captions.json", [image_record(0, "ok.png", "a red circle"),
                                                      image_record(1, "broken.png", "two blue squares")])
    config = DataConfig(sources=(SourceConfig(records),), tokenizer=word_tokenizer_dir, buckets=(16,), image_rows=1)
    pipeline = DataPipeline(config, image_tokens=N, image_size=8)
    yielded = []
    with pytest.raises(DataError) as caught:
        for batch in pipeline.iterator():
            yielded.append(batch)
    assert len(yielded) < len(pipeline)
    error, message = caught.value, str(caught.value)
    assert error.field == "image" and error.reason == "corrupt_image" and error.record_id == "i1"
    assert str(tmp_path / "broken.png") in message and "'i1'" in message and "'image'" in message
    assert records in message and "record 1" in message, message


# ----------------------------------------------------------------------------- pitfall 23: pad id = real id


def test_pad_id_tokens_inside_a_sample_stay_attended(tmp_path, tiny_model):
    """Pitfall 23: the reference padded with <unk> (id 0) and built its attention mask as
    ids != pad, so genuine <unk> tokens were never attended. With a tokenizer whose pad id is the
    <unk> id, an unknown word inside a sample is a real, attended token: its segment id is set,
    it is a target, and the logits after it depend on its embedding, while the same id on padding
    positions (segment 0) influences nothing."""
    tok = load_tokenizer(make_word_tokenizer(str(tmp_path / "tok")))
    tok.pad_token = tok.unk_token
    assert tok.pad_token_id == tok.unk_token_id == 0
    source = write_jsonl(tmp_path / "r.jsonl", [text_record(0, "the zebra runs .")])  # "zebra" is unknown
    pipeline = DataPipeline(DataConfig(sources=(SourceConfig(source),), tokenizer="x", buckets=(8,), text_rows=1),
                            image_tokens=0, image_size=None, tokenizer=tok)
    (batch,) = all_batches(pipeline)
    ids = batch.input_ids[0]
    assert ids[:5].tolist() == [tok.bos_token_id, *tok("the", add_special_tokens=False)["input_ids"], 0,
                                *tok("runs .", add_special_tokens=False)["input_ids"]]
    assert (ids[5:] == 0).all()  # right padding with the same id
    assert batch.segment_ids[0].tolist() == [1] * 5 + [0] * 3
    assert batch.targets[0, 1] == 0  # the unknown word is predicted like any other

    graphdef, state = tiny_model  # the text path of the tiny LLaVA: no pixels, so only its LM runs
    padded = np.array([[1, 7, 9, 11, 0, 0, 0, 0]], np.int32)  # a second row: id 0 only as padding
    input_ids = jnp.asarray(np.concatenate([batch.input_ids, padded]))
    segment_ids = jnp.asarray(np.concatenate([batch.segment_ids, (padded > 0).astype(np.int32)]))
    positions = jnp.asarray(np.concatenate([batch.positions, np.where(padded > 0, np.arange(8), 0)]))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def logits(state):
        return nnx.merge(graphdef, state)(input_ids, segment_ids=segment_ids, positions=positions)

    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0].add(1.0) if "embed_tokens" in jax.tree_util.keystr(path) else x, state)
    before, after = np.asarray(logits(state)), np.asarray(logits(moved))
    change = np.abs(after - before).max(axis=-1)
    assert (change[0, 2:5] > 1e-3).all()  # the <unk> position and every later one read the <unk> token
    np.testing.assert_array_equal(change[0, :2], 0.0)  # causal: earlier positions do not
    np.testing.assert_array_equal(change[1, :4], 0.0)  # padding with id 0 is never attended


# ----------------------------------------------------------------------------- pitfalls 25, 27, 29, 33


def test_parameters_stay_float32_whatever_the_compute_dtype(tiny):
    """Pitfall 25: the reference saved an fp32 LM beside an fp16 DINOv2 in one file. Every jaxllava
    parameter is float32 (the compute dtype is a config field saved with the checkpoint), so a
    checkpoint holds one dtype and a round trip is exact."""
    for dtype in ("bfloat16", "float32"):
        config = dataclasses.replace(tiny.model, dtype=dtype)
        model = nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0)))
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
        assert dtypes == {jnp.dtype("float32")}, (dtype, dtypes)


def test_buckets_longer_than_the_lm_position_range_are_rejected(tmp_path, word_tokenizer_dir):
    """Pitfall 27: the reference allowed 32768-token samples for a 2048-position LM without a check.
    A config whose largest bucket exceeds model.lm.max_position_embeddings is a ConfigError naming
    both, before any training."""
    raw = {"model": {"lm": {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1,
                            "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 64}, "vision": None},
           "data": {"sources": [{"path": str(tmp_path / "text.jsonl")}], "tokenizer": word_tokenizer_dir,
                    "buckets": [32, 128]}}
    build_config({**raw, "data": {**raw["data"], "buckets": [32, 64]}})  # fits: accepted
    with pytest.raises(ConfigError, match=r"max_position_embeddings.*64|64.*max_position_embeddings"):
        build_config(raw)


@pytest.mark.parametrize("resampler", [ResamplerConfig("identity"), ResamplerConfig("avg_pool", pool_stride=2),
                                       ResamplerConfig("perceiver", num_latents=5, depth=1, num_heads=4),
                                       ResamplerConfig("token_packer", num_latents=4, num_heads=4)],
                         ids=lambda r: r.kind)
@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_placeholder_count_from_the_saved_config_equals_the_encoder_output(tiny, tmp_path, resampler, select):
    """Pitfall 29: the reference never saved image_token_num and changed its default three times.
    Here N is derived from the config written with the run (config.yaml): read back, it equals the
    number of vectors the whole encoder (tower → resampler → projector) produces, and the data
    pipeline's placeholder span has that length."""
    vision = dataclasses.replace(tiny.model.vision, feature_select=select)
    config = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, vision=vision, resampler=resampler))
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(config))
    model_config = load_config(saved).model
    assert model_config == config.model
    n = model_config.image_tokens
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0))))
    pixels = jax.ShapeDtypeStruct((2, vision.image_size, vision.image_size, 3), jnp.float32)
    out = jax.eval_shape(lambda s, p: nnx.merge(graphdef, s).encode_images(p), state, pixels)
    assert out.shape == (2, n, model_config.lm.hidden_size)
    ids = special_ids(load_tokenizer(os.path.join(ROOT, tiny.data.tokenizer)))
    assert len(ids.image_span(n)) == n


def test_initial_parameters_come_from_the_configured_seed():
    """Pitfall 33: the reference hard-coded its init seed for a while. `create_model`, which the
    loop calls with train.seed (saved in run.json), gives identical parameters for the same seed
    and different ones for another."""
    config = ModelConfig(lm=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
                                        num_heads=2, num_kv_heads=1, max_position_embeddings=16),
                         vision=None, dtype="float32", attention_impl="xla")
    mesh = make_mesh(devices=jax.devices()[:1])

    def embedding(seed):
        model = create_model(config, mesh, seed, compiler_options=FAST_COMPILE)
        return np.asarray(model.lm.embed_tokens.embedding[...])

    first = embedding(3)
    np.testing.assert_array_equal(embedding(3), first)
    assert np.abs(embedding(4) - first).max() > 1e-3


# ----------------------------------------------------------------------------- pitfall 32: template building


@pytest.mark.parametrize("template", ["llama_2", "vicuna_v1"])
def test_chat_prompt_building_never_strips_characters_from_turns(tmp_path, template):
    """Pitfall 32: the reference's get_prompt called lstrip("<s>"), which strips the characters
    '<', 's' and '>' from the start of a turn, not the prefix "<s>". Turns starting with those
    characters reach the template and the token ids unchanged."""
    responses = ["sees the dog .", "s s dog", "<3 the dog", ">> dog", "ss"]
    questions = ["sss dog", "<3 cat", "s", ">> cat", "sss"]
    words = ("[INST]", "[/INST]", "USER:", "ASSISTANT:", "s", "ss", "<3", ">>", "sss")
    tok = load_tokenizer(make_word_tokenizer(str(tmp_path / "tok"), extra_words=words))
    config = DataConfig(tokenizer="x", objective="chat", chat_template=template)
    turns = [{"from": role, "value": text} for pair in zip(questions, responses)
             for role, text in zip(("human", "gpt"), pair)]
    record = {"id": "c", "conversations": turns}
    path = write_jsonl(tmp_path / "r.jsonl", [record])
    (parsed,) = read_records(path)
    texts = [piece[1] for piece in record_pieces(parsed, config, has_bos=True) if piece[0] == "text"]
    assert texts[1::2] == [f" {r} " if template == "llama_2" else f" {r}" for r in responses]
    assert all(f" {question} " in text for question, text in zip(questions, texts[0::2]))

    table = build_sample_table([[parsed]], tok, config, image_tokens=0, max_len=256)
    tokens, is_target = table.sample(0)
    trained = tok.convert_ids_to_tokens(tokens[is_target].tolist())
    assert trained == [w for r in responses for w in r.split() + ["</s>"]]
    read = " ".join(tok.convert_ids_to_tokens(tokens.tolist()))
    assert all(f" {question} " in read for question in questions)
