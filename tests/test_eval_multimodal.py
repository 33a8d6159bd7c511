"""Image-conditioned zero-shot tasks: VQA/Winoground reading, image sources, the batched scorer
against a PyTorch restatement of the 2025 pipeline's formula, and one encoder pass per image."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from conftest import randomize_torch_model, write_jsonl
from jaxllava.data.images import ImageProcessing, load_image
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval import image_scoring
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.eval.multimodal import (FeatureRows, ImageFolder, SavedImageDataset, open_image_source, read_image_task,
                                      task_kind)
from jaxllava.model.config import LlamaConfig, ModelConfig, ProjectorConfig, ResamplerConfig, VisionConfig
from jaxllava.model.llava import LlavaModel
from jaxllava.model.vision import VisionTower

TOKENIZER = "data/sample/tokenizer"
IMAGE_SIZE, PATCH, VOCAB, WIDTH = 32, 8, 256, 48
N = (IMAGE_SIZE // PATCH) ** 2


def vqa_record(question="what colour are the shapes ?", target="red", distractors=None, image=0):
    distractors = distractors or ["blue", "green", "yellow", "purple", "orange", "black", "left"]
    return {"question": question, "target_ans": target, "distractors": distractors, "idx_in_hf_dataset": image,
            "image_id": image}


def winoground_record(c0="a red circle on the left .", c1="a blue circle on the left .", image=0):
    return {"caption_0": c0, "caption_1": c1, "image_idx": image, "tag": "colour", "secondary_tag": "",
            "collapsed_tag": "colour"}


def write_images(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        Image.fromarray(rng.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# ---------------------------------------------------------------------------- reading


def test_vqa_items_follow_decode_vqa(tmp_path):
    path = write_jsonl(tmp_path / "vqa.jsonl", [vqa_record(), vqa_record(target="two", image=3)])
    assert task_kind(path) == "vqa"
    task = read_image_task(path)
    first = task.items[0]
    assert first.sentences[0] == "what colour are the shapes ? red" and len(first.sentences) == 8
    assert first.completions[:2] == (" red", " blue") and first.metadata == {"UID": "vqa"}
    assert [ref.folder_key for ref in task.images] == ["0", "3"] and task.images[1].dataset_row == 3
    assert [item.id for item in task.items] == ["vqa_0", "vqa_1"]


def test_winoground_items_are_unpaired_captions_with_the_rows_image(tmp_path):
    record = {**winoground_record(image=5), "image_key": "image_1", "tag": "Object", "secondary_tag": "Symbolic"}
    path = write_jsonl(tmp_path / "w.jsonl", [record])
    assert task_kind(path) == "winoground"
    (item,) = read_image_task(path).items
    assert item.sentences == item.completions == ("a red circle on the left .", "a blue circle on the left .")
    assert item.metadata["Linguistic Sub-Feature"] == "Object Symbolic" and item.metadata["Type"] == "colour"
    assert read_image_task(path).images[0].folder_key == "5_image_1"


def test_text_tasks_are_not_image_tasks(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"sentence_good": "a", "sentence_bad": "b", "field": "x",
                                                "UID": "u", "linguistics_term": "t"}])
    assert task_kind(path) is None


@pytest.mark.parametrize("line, field", [
    ("{not json", None),
    (json.dumps({**vqa_record(), "distractors": "blue"}), "distractors"),
    (json.dumps({k: v for k, v in vqa_record().items() if k != "image_id"}), "image_id"),
    (json.dumps({**vqa_record(), "idx_in_hf_dataset": -1}), "idx_in_hf_dataset"),
    (json.dumps({**vqa_record(), "question": 7}), "question"),
])
def test_a_malformed_vqa_line_is_named_by_file_and_line(tmp_path, line, field):
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps(vqa_record()) + "\n" + line + "\n")
    with pytest.raises(DataError) as error:
        read_image_task(path, "vqa")
    assert f"file {path}" in str(error.value) and "line 2" in str(error.value)
    if field:
        assert f"field {field!r}" in str(error.value)


def test_a_winoground_line_without_its_tags_is_an_error(tmp_path):
    record = {k: v for k, v in winoground_record().items() if k != "collapsed_tag"}
    path = write_jsonl(tmp_path / "w.jsonl", [winoground_record(), record])
    with pytest.raises(DataError, match="line 2, field 'collapsed_tag'"):
        read_image_task(path, "winoground")


# ---------------------------------------------------------------------------- image sources


def test_image_folder_finds_files_by_key_and_names_a_missing_one(tmp_path):
    folder = ImageFolder(write_images(tmp_path / "images", 2))
    task = read_image_task(write_jsonl(tmp_path / "v.jsonl", [vqa_record(image=1), vqa_record(image=7)]))
    keys = [folder.key(ref) for ref in task.images]
    pixels = folder.load(keys[:1], ImageProcessing(size=16))
    np.testing.assert_array_equal(pixels[0], load_image(tmp_path / "images" / "1.png", ImageProcessing(size=16)))
    with pytest.raises(DataError, match=r"no image file 7\{"):
        folder.load(keys[1:], ImageProcessing(size=16))


def test_feature_rows_are_keyed_by_item_order(tmp_path):
    np.save(tmp_path / "f.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    rows = FeatureRows(tmp_path / "f.npy")
    task = read_image_task(write_jsonl(tmp_path / "v.jsonl", [vqa_record(image=9), vqa_record(image=4)]))
    keys = [rows.key(ref) for ref in task.images]
    assert keys == [0, 1]
    np.testing.assert_array_equal(rows.load(keys), [[[0, 1, 2, 3]], [[4, 5, 6, 7]]])
    too_many = read_image_task(write_jsonl(tmp_path / "w.jsonl", [vqa_record()] * 4))
    with pytest.raises(DataError, match="more items than the features file has rows"):
        rows.key(too_many.images[3])


def test_a_dataset_saved_with_save_to_disk_gives_the_pixels_of_its_image_files(tmp_path):
    """A real `datasets` split (Image feature, written by save_to_disk, two arrow shards) read with
    pyarrow alone: row idx_in_hf_dataset of its image column, pixels as from the file itself."""
    import datasets

    folder = write_images(tmp_path / "images", 3)
    data = datasets.Dataset.from_dict({"image": [str(folder / f"{k}.png") for k in range(3)],
                                       "question": ["q0", "q1", "q2"]}).cast_column("image", datasets.Image())
    data.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    source = open_image_source(tmp_path / "saved")
    assert isinstance(source, SavedImageDataset)
    task = read_image_task(write_jsonl(tmp_path / "v.jsonl", [vqa_record(image=2), vqa_record(image=0)]))
    keys = [source.key(ref) for ref in task.images]
    processing = ImageProcessing(size=16)
    pixels = source.load(keys, processing)
    for row, k in zip(pixels, (2, 0)):  # vqa_record(image=k) sets idx_in_hf_dataset = k
        np.testing.assert_array_equal(row, load_image(folder / f"{k}.png", processing))
    past = read_image_task(write_jsonl(tmp_path / "w.jsonl", [vqa_record(image=5)]))
    with pytest.raises(DataError, match="row 5 is past the dataset's 3 rows"):
        source.key(past.images[0])
    (tmp_path / "broken").mkdir()
    with pytest.raises(DataError, match="no state.json"):
        SavedImageDataset(tmp_path / "broken")


# ---------------------------------------------------------------------------- scoring vs PyTorch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random Dinov2Model → mlp2x_gelu → LlamaForCausalLM in PyTorch, and the same weights in jaxllava
    (through saved checkpoints, as tests/test_llava.py loads them)."""
    from jaxllava.convert.checkpoint_files import CheckpointTensors, read_config
    from jaxllava.convert.hf_configs import llama_config_from_hf, vision_config_from_hf
    from jaxllava.convert.weights import load_hf_llama_weights, load_hf_vision_weights, load_projector_weights

    lm = randomize_torch_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100.0, max_position_embeddings=64)), 0)
    dino = randomize_torch_model(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE_SIZE,
        patch_size=PATCH)), 1)
    projector = randomize_torch_model(torch.nn.Sequential(torch.nn.Linear(32, WIDTH), torch.nn.GELU(),
                                                          torch.nn.Linear(WIDTH, WIDTH)), 2)
    lm_dir, vision_dir = str(tmp_path_factory.mktemp("lm")), str(tmp_path_factory.mktemp("dinov2"))
    lm.save_pretrained(lm_dir)
    dino.save_pretrained(vision_dir)
    config = ModelConfig(lm=llama_config_from_hf(read_config(lm_dir)),
                         vision=vision_config_from_hf(read_config(vision_dir), image_size=IMAGE_SIZE),
                         resampler=ResamplerConfig(kind="identity"), projector=ProjectorConfig(kind="mlp2x_gelu"),
                         dtype="float32", attention_impl="xla")
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    assert load_hf_llama_weights(model.lm, CheckpointTensors(lm_dir)) == []
    assert load_hf_vision_weights(model.vision, CheckpointTensors(vision_dir)) == ["embeddings.mask_token"]
    assert load_projector_weights(model.projector, {k: v.numpy() for k, v in projector.state_dict().items()},
                                  prefix="") == []
    return dict(lm=lm.eval(), dino=dino.eval(), projector=projector, model=model)


def torch_score(ref, tokenizer, sentence: str, completion: str, pixels: np.ndarray) -> float:
    """The 2025 rule restated (dataset.py::process_causal_sentences, compute_results.py), one candidate
    at a time as the pipeline's image tasks run: phrase mask from char offsets, the image span after
    BOS overwritten with the projected patches, sum of log_softmax at the masked targets."""
    out = tokenizer(sentence, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = out["input_ids"], out["offset_mapping"]
    start_char = len(sentence) - len(completion) + offsets[0][0]
    phrase = [int(end > start_char) for _, end in offsets]
    span = special_ids(tokenizer).image_span(N)
    ids, phrase = ids[:1] + span + ids[1:], phrase[:1] + [0] * N + phrase[1:]
    with torch.no_grad():
        patches = ref["dino"](pixel_values=torch.from_numpy(pixels[None]).permute(0, 3, 1, 2)).last_hidden_state[:, 1:]
        embeds = ref["lm"].model.embed_tokens(torch.tensor([ids])).clone()
        embeds[0, 1:1 + N] = ref["projector"](patches)[0]
        logits = ref["lm"](inputs_embeds=embeds).logits[0, :-1]
    log_probs = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float((log_probs * torch.tensor(phrase[1:])).sum())


def test_image_scores_and_decisions_match_the_torch_restatement(reference, tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    write_images(tmp_path / "images", 3)
    vqa = write_jsonl(tmp_path / "vqa.jsonl", [
        vqa_record(image=0), vqa_record("how many shapes are there ?", "two",
                                        ["one", "three", "red", "left", "square", "top", "blue"], image=1),
        vqa_record("where are the shapes ?", "left", ["right", "top", "bottom", "middle", "red", "one", "circle"], 0)])
    wino = write_jsonl(tmp_path / "wino.jsonl", [winoground_record(image=2), winoground_record(
        "two green squares at the top .", "two green triangles at the top .", image=1)])
    processing = ImageProcessing(size=IMAGE_SIZE)
    evaluator = MinimalPairEvaluator({"vqa": vqa, "wino": wino}, tokenizer, image_processing=processing,
                                     batch_size=5, image_batch_size=2)
    results = evaluator.evaluate(reference["model"])
    for name in ("vqa", "wino"):
        r = results[name]["image"]
        task = evaluator.tasks[name]
        expected = [[torch_score(reference, tokenizer, s, c, load_image(tmp_path / "images" / f"{key}.png", processing))
                     for s, c in zip(item.sentences, item.completions)]
                    for item, key in zip(task.items, task.image_keys)]
        np.testing.assert_allclose(np.concatenate(r.scores), np.concatenate(expected), rtol=0, atol=1e-4)
        assert r.chosen.tolist() == [int(np.argmax(e)) for e in expected]
        assert len(set(np.round(np.concatenate(expected), 3))) > 1  # not a degenerate model
        # no vision: the same items as bare text, different scores
        assert results[name]["no_vision"].items == r.items
        assert np.abs(np.concatenate(results[name]["no_vision"].scores) - np.concatenate(r.scores)).max() > 1e-3
    assert set(MinimalPairEvaluator.scalars(results)) == {
        "eval/vqa/image/accuracy", "eval/vqa/no_vision/accuracy", "eval/wino/image/accuracy",
        "eval/wino/no_vision/accuracy"}
    assert "vqa: image vs no_vision" in evaluator.format(results)


def test_the_tower_runs_once_per_unique_image_and_never_in_the_scorer(reference, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(TOKENIZER)
    write_images(tmp_path / "images", 2)
    # 6 items × 8 candidates = 48 rows, over 2 images
    path = write_jsonl(tmp_path / "vqa.jsonl", [vqa_record(image=i % 2) for i in range(6)])
    evaluator = MinimalPairEvaluator({"vqa": path}, tokenizer, image_processing=ImageProcessing(size=IMAGE_SIZE),
                                     batch_size=16)
    encoded_rows = []
    original = image_scoring.encode_images
    monkeypatch.setattr(image_scoring, "encode_images",
                        lambda model, visual, **kw: encoded_rows.append(len(visual)) or original(model, visual, **kw))
    before = image_scoring.counts()["images_encoded"]
    evaluator.evaluate(reference["model"])
    assert encoded_rows == [2] and image_scoring.counts()["images_encoded"] - before == 2

    # The scorer's trace holds no tower call: tracing it with a tower that raises succeeds.
    def no_tower(*args, **kwargs):
        raise AssertionError("the vision tower ran inside the scorer")

    monkeypatch.setattr(VisionTower, "__call__", no_tower)
    graphdef, state = nnx.split(reference["model"])
    b, t = 2, 32
    ints = jnp.zeros((b, t), jnp.int32)
    jax.make_jaxpr(functools.partial(image_scoring._score, mesh=None), static_argnums=0)(
        graphdef, state, ints, ints, ints, ints, jnp.zeros((b, t), bool), jnp.zeros((b, N, WIDTH)),
        jnp.zeros((b, t), bool))


def test_image_rows_put_the_span_after_bos_as_training_does():
    tokenizer = load_tokenizer(TOKENIZER)
    from jaxllava.eval.minimal_pairs import MinimalPairItem

    item = MinimalPairItem("vqa_0", "vqa", ("where are the shapes ? left", "where are the shapes ? top"),
                           (" left", " top"), {"UID": "vqa"}, "x:1")
    candidates = image_scoring.encode_image_candidates(tokenizer, [item], ["0"], 4)
    ids = special_ids(tokenizer)
    text = tokenizer("where are the shapes ? left")["input_ids"]
    assert candidates.encoded.token_ids[0].tolist() == [ids.bos] + ids.image_span(4) + text[1:]
    assert candidates.encoded.target_mask[0].tolist() == [False] * 10 + [True]
    assert candidates.image_start.tolist() == [1, 1] and candidates.image_of_row.tolist() == [0, 0]


def test_a_model_without_vision_or_processing_is_refused(reference, tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    write_images(tmp_path / "images", 1)
    evaluator = MinimalPairEvaluator({"vqa": write_jsonl(tmp_path / "v.jsonl", [vqa_record()])}, tokenizer)
    with pytest.raises(ConfigError, match="pass image_processing"):
        evaluator.evaluate(reference["model"])
    text_model = LlavaModel(ModelConfig(lm=LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                       num_layers=1, num_heads=2, num_kv_heads=1),
                                        dtype="float32", attention_impl="xla"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.vision"):
        evaluator.evaluate(text_model)


def test_features_models_score_rows_of_a_features_file(tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    config = ModelConfig(lm=LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                                        num_heads=2, num_kv_heads=1),
                         vision=VisionConfig(kind="features", hidden_size=8, tokens=1),
                         resampler=ResamplerConfig(kind="identity"),
                         projector=ProjectorConfig(kind="mlp2x_gelu", expand=2), dtype="float32",
                         attention_impl="xla")
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    np.save(tmp_path / "f.npy", np.random.RandomState(0).randn(2, 8).astype(np.float32))
    path = write_jsonl(tmp_path / "v.jsonl", [vqa_record(image=5), vqa_record(image=5)])
    evaluator = MinimalPairEvaluator({"vqa": path}, tokenizer, image_sources={"vqa": tmp_path / "f.npy"})
    r = evaluator.evaluate(model)["vqa"]["image"]
    # same text, different feature rows (keyed by item): different scores
    assert np.abs(r.scores[0] - r.scores[1]).max() > 1e-4
