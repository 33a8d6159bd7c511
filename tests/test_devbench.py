"""DevBench: manifest and human-data parsing, the exp(−KL) temperature fit and RSA against restatements
of the pipeline's stats_helper.py, the image–text score and image embedding against PyTorch, and the
tower once per distinct image."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.io
import scipy.stats
import torch
from PIL import Image

from jaxllava.data.images import ImageProcessing, load_image
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval import devbench, image_scoring
from test_eval_multimodal import IMAGE_SIZE, N, TOKENIZER, reference, torch_score  # noqa: F401 (fixture)

PROCESSING = ImageProcessing(size=IMAGE_SIZE)


def write_csv(path, header, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_pngs(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for name in names:
        Image.fromarray(rng.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(folder / name)


def make_devbench(root):
    """A tiny evaluation_data/full_eval/devbench in the official layout and column order."""
    trog = root / "assets" / "gram-trog"
    write_pngs(trog / "images", [f"{i}.png" for i in range(5)])
    trials = [("eating", [0, 1, 2, 3]), ("the boy is running, fast", [4, 0, 1, 2]), ("red", [3, 4, 0, 1])]
    write_csv(trog / "manifest.csv", ["image1", "image2", "image3", "image4", "text1"],
              [[f"images/{i}.png" for i in images] + [text] for text, images in trials])
    write_csv(root / "evals" / "gram-trog" / "human.csv", ["trial", "text1", "image1", "image2", "image3", "image4"],
              [[1, "eating", 0.9, 0.05, 0.03, 0.02], [2, "the boy is running, fast", 0.7, 0.1, 0.1, 0.1],
               [3, "red", 0.6, 0.2, "", 0.2], [4, "not in the manifest", 0.25, 0.25, 0.25, 0.25]])
    vv = root / "assets" / "lex-viz_vocab"
    write_pngs(vv / "images", ["acorn.jpg", "key.jpg", "aloe.jpg"], seed=1)
    write_csv(vv / "manifest.csv", ["image1", "image2", "image3", "image4", "text1"],
              [["images/acorn.jpg", "images/key.jpg", "images/aloe.jpg", "images/key.jpg", "acorn"],
               ["images/aloe.jpg", "images/acorn.jpg", "images/key.jpg", "images/acorn.jpg", "aloe"]])
    write_csv(root / "evals" / "lex-viz_vocab" / "human.csv",
              ["text1", "age_bin", "trial", "image1", "image2", "image3", "image4"],
              [["acorn", 4, 1, 0.5, 0.2, 0.2, 0.1], ["acorn", 25, 1, 1, 0, 0, 0],
               ["aloe", 4, 2, 0.4, 0.3, 0.2, 0.1], ["aloe", 25, 2, 0.9, 0.1, 0, 0]])
    things = root / "assets" / "sem-things"
    names = ["aardvark", "abacus", "acorn", "bear"]
    write_pngs(things / "object_images_CC0", [f"{n}.jpg" for n in names], seed=2)
    write_csv(things / "manifest.csv", ["text1", "image1"], [[n, f"object_images_CC0/{n}.jpg"] for n in names], bom=True)
    human = np.random.RandomState(3).rand(4, 4)
    (root / "evals" / "sem-things").mkdir(parents=True)
    scipy.io.savemat(root / "evals" / "sem-things" / "spose_similarity.mat", {"spose_sim": (human + human.T) / 2})
    return root


# ---------------------------------------------------------------------------- files


def test_manifests_and_human_files_read_as_the_pipeline_ships_them(tmp_path):
    root = make_devbench(tmp_path)
    trog = devbench.read_manifest(str(root / "assets/gram-trog/manifest.csv"), images_per_row=4)
    assert trog.texts[1] == "the boy is running, fast" and trog.lines == [2, 3, 4]
    assert trog.images[1][0] == str(root / "assets/gram-trog/images/4.png")
    things = devbench.read_manifest(str(root / "assets/sem-things/manifest.csv"), images_per_row=1)
    assert things.texts[0] == "aardvark"  # the BOM is not part of the header
    human = devbench.read_human_choices(str(root / "evals/gram-trog/human.csv"))
    assert human.trials.tolist() == [1, 2, 3, 4] and human.groups == ["all"] * 4
    assert human.probs[2].tolist() == [0.6, 0.2, 0.0, 0.2]  # an empty cell is 0 (fillna(0))
    vv = devbench.read_human_choices(str(root / "evals/lex-viz_vocab/human.csv"))
    assert vv.groups == ["4", "25", "4", "25"]


@pytest.mark.parametrize("rows, line, field, message", [
    ([["images/0.png", "images/1.png", "images/2.png", "images/3.png", ""]], 2, "text1", "empty cell"),
    ([["images/0.png"] * 4 + ["a"], ["images/0.png", "images/9.png", "images/1.png", "images/2.png", "b"]], 3,
     "image2", "no image file"),
])
def test_a_bad_manifest_row_is_named_by_file_line_and_field(tmp_path, rows, line, field, message):
    write_pngs(tmp_path / "images", [f"{i}.png" for i in range(4)])
    path = write_csv(tmp_path / "manifest.csv", ["image1", "image2", "image3", "image4", "text1"], rows)
    with pytest.raises(DataError, match=message) as error:
        devbench.read_manifest(path, images_per_row=4)
    assert f"file {path}" in str(error.value) and f"line {line}, field {field!r}" in str(error.value)


def test_a_manifest_without_its_columns_and_bad_human_rows_are_errors(tmp_path):
    path = write_csv(tmp_path / "m.csv", ["image1", "image2", "text1"], [["a", "b", "c"]])
    with pytest.raises(DataError, match="field 'image3'"):
        devbench.read_manifest(path, images_per_row=4)
    header = ["trial", "text1", "image1", "image2", "image3", "image4"]
    bad = write_csv(tmp_path / "h.csv", header, [[1, "a", 1, 0, 0, 0], [2, "b", "lots", 0, 0, 0]])
    with pytest.raises(DataError, match=f"file {bad}, line 3, field 'image1': not a number"):
        devbench.read_human_choices(bad)
    twice = write_csv(tmp_path / "t.csv", header, [[1, "a", 1, 0, 0, 0], [1, "b", 1, 0, 0, 0]])
    with pytest.raises(DataError, match="line 3, field 'trial': trial 1 appears twice"):
        devbench.read_human_choices(twice)
    scipy.io.savemat(tmp_path / "s.mat", {"spose_sim": np.eye(3)})
    with pytest.raises(DataError, match="shape \\(3, 3\\), the manifest has 4 images"):
        devbench.read_things_human(str(tmp_path / "s.mat"), 4)


# ---------------------------------------------------------------------------- statistics


def hand_mean_kl(human, scores, beta):
    """stats_helper.py restated one trial at a time: softmax of beta·(x − table max), clipped KL(p‖q)."""
    top = max(max(row) for row in scores)
    total = 0.0
    for p_row, s_row in zip(human, scores):
        weights = [np.exp(beta * (s - top)) for s in s_row]
        q_row = [w / sum(weights) for w in weights]
        total += sum(min(max(p, 1e-10), 1) * np.log(min(max(p, 1e-10), 1) / min(max(q, 1e-10), 1))
                     for p, q in zip(p_row, q_row))
    return total / len(human)


def test_the_temperature_fit_minimises_the_pipelines_mean_kl():
    rng = np.random.RandomState(0)
    scores = rng.randn(6, 4) * 2 - 5
    human = rng.dirichlet(np.ones(4), size=5)
    human[0] = [1, 0, 0, 0]
    rows = np.array([0, 1, 2, 3, 5])  # model trial 5 has no human row
    for beta in (0.3, 2.0, 17.5):
        assert devbench.mean_kl(human, scores, rows, beta) == pytest.approx(hand_mean_kl(human, scores[rows], beta),
                                                                           rel=1e-12)
    kl, beta = devbench.fit_temperature(human, scores, rows)
    dense = np.linspace(0.025, 40, 40_001)
    brute = min(hand_mean_kl(human, scores[rows], b) for b in dense[::50])
    brute = min(brute, min(devbench.mean_kl(human, scores, rows, b) for b in dense))
    assert 0.025 <= beta <= 40 and kl <= brute + 1e-9 and kl == pytest.approx(devbench.mean_kl(human, scores, rows, beta))
    # a human table that is exactly the model's softmax at beta = 2.5: found, KL 0, exp(−KL) 1
    exact = devbench.softmax_images(scores, 2.5)[rows]
    kl, beta = devbench.fit_temperature(exact, scores, rows)
    assert beta == pytest.approx(2.5, abs=1e-3) and kl < 1e-8
    assert devbench.HumanFit(kl, beta, 5, 0).human_similarity == pytest.approx(1.0, abs=1e-8)


def test_rsa_is_spearman_of_the_lower_triangles():
    rng = np.random.RandomState(1)
    embeddings = rng.randn(7, 5)
    human = rng.rand(7, 7)
    model = devbench.cosine_similarity(embeddings)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(model, unit @ unit.T, atol=1e-12)
    lower = [(i, j) for i in range(7) for j in range(i)]
    expected = scipy.stats.spearmanr([human[i, j] for i, j in lower], [model[i, j] for i, j in lower]).statistic
    assert devbench.rsa(human, model) == pytest.approx(expected, abs=1e-12)
    assert devbench.rsa(model, model) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the model


def torch_mean_score(ref, tokenizer, text, pixels):
    """−(mean token loss) of the babylm_models.py prompt: the 2025 targets' summed log-prob / their count."""
    prompt = devbench.PROMPT.format(text=text)
    offsets = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    targets = sum(end > offsets[0][0] for _, end in offsets[1:])
    return torch_score(ref, tokenizer, prompt, prompt, pixels) / targets


def torch_embedding(ref, tokenizer, pixels):
    """babylm_models.py::get_all_image_feats restated: mean last hidden state over BOS + span + " "."""
    ids = tokenizer(" ", add_special_tokens=True)["input_ids"]
    ids = ids[:1] + special_ids(tokenizer).image_span(N) + ids[1:]
    with torch.no_grad():
        patches = ref["dino"](pixel_values=torch.from_numpy(pixels[None]).permute(0, 3, 1, 2)).last_hidden_state[:, 1:]
        embeds = ref["lm"].model.embed_tokens(torch.tensor([ids])).clone()
        embeds[0, 1:1 + N] = ref["projector"](patches)[0]
        return ref["lm"].model(inputs_embeds=embeds).last_hidden_state[0].mean(0).numpy()


def test_devbench_matches_torch_and_runs_the_tower_once_per_image(reference, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(TOKENIZER)
    root = make_devbench(tmp_path / "devbench")
    encoded = []
    original = image_scoring.encode_images
    monkeypatch.setattr(image_scoring, "encode_images",
                        lambda model, visual, **kw: encoded.append(len(visual)) or original(model, visual, **kw))
    results = devbench.evaluate_devbench(reference["model"], tokenizer, str(root), PROCESSING, batch_size=5)
    assert encoded == [3, 5, 4]  # viz_vocab, trog, things: distinct images, each once
    assert results.skipped == {}

    trog = results.tasks["gram-trog"]
    manifest = devbench.read_manifest(str(root / "assets/gram-trog/manifest.csv"), images_per_row=4)
    expected = np.array([[torch_mean_score(reference, tokenizer, text, load_image(path, PROCESSING)) for path in images]
                         for text, images in zip(manifest.texts, manifest.images)])
    np.testing.assert_allclose(trog.scores, expected, rtol=0, atol=1e-4)
    assert len(set(np.round(expected.ravel(), 4))) > 4  # images matter: not a degenerate model
    assert trog.correct.tolist() == [bool(row[0] > row[1:].max()) for row in expected]
    human = devbench.read_human_choices(str(root / "evals/gram-trog/human.csv"))
    fit = trog.fits["all"]
    assert fit.trials == 3 and fit.text_mismatches == 0
    assert fit.kl == pytest.approx(min(hand_mean_kl(human.probs[:3], trog.scores.astype(np.float64), b)
                                       for b in np.linspace(0.025, 40, 4001)), abs=1e-6)
    assert set(results.tasks["lex-viz_vocab"].fits) == {"4", "25"}

    things = results.tasks["sem-things"]
    paths = [root / "assets/sem-things/object_images_CC0" / f"{n}.jpg" for n in things.texts]
    embeddings = np.stack([torch_embedding(reference, tokenizer, load_image(p, PROCESSING)) for p in paths])
    np.testing.assert_allclose(things.embeddings, embeddings, rtol=0, atol=1e-4)
    spose = scipy.io.loadmat(root / "evals/sem-things/spose_similarity.mat")["spose_sim"]
    assert things.rsa == pytest.approx(devbench.rsa(spose, devbench.cosine_similarity(embeddings)), abs=1e-6)

    out = tmp_path / "out"
    devbench.write_devbench(results, str(out))
    assert np.load(out / "pipeline/gram-trog.npy").shape == (3, 4, 1)  # collate_preds.py: (trials, 4, 1)
    assert np.load(out / "pipeline/lex-viz_vocab.npy").shape == (2, 4, 1)
    assert np.load(out / "pipeline/sem-things_pairwise_sims.npy").shape == (4, 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gram-trog"]["accuracy"] == trog.accuracy
    assert results.headline()["devbench/gram-trog/accuracy"] == pytest.approx(100 * trog.accuracy)
    assert results.headline()["devbench/sem-things/rsa"] == pytest.approx(100 * things.rsa)
    table = devbench.format_devbench(results)
    assert "gram-trog" in table and "age_bin 25" in table and "sem-things" in table


def test_missing_tasks_are_skipped_and_a_text_only_model_is_refused(reference, tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    root = make_devbench(tmp_path / "devbench")
    (root / "evals/sem-things/spose_similarity.mat").unlink()
    (root / "evals/gram-trog/human.csv").unlink()
    results = devbench.evaluate_devbench(reference["model"], tokenizer, str(root), PROCESSING, batch_size=8)
    assert set(results.tasks) == {"lex-viz_vocab"}
    assert "spose_similarity.mat" in results.skipped["sem-things"] and "human.csv" in results.skipped["gram-trog"]
    text_only = type("M", (), {"config": type("C", (), {"vision": None})()})()
    with pytest.raises(ConfigError, match="model.vision"):
        devbench.evaluate_devbench(text_only, tokenizer, str(root), PROCESSING)
