"""The bundled sample (data/sample) is valid, self-consistent, held out where it must be, and reproducible."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxllava.data.images import ImageProcessing, load_image, to_rgb

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
GENERATOR = ROOT / "data" / "make_sample_data.py"
FEATURES = pathlib.Path("babylm/captions_features.npy")
# Written by hand, not by the generator: the eval suite's map of the sample's task files (jaxllava/eval/suite.py).
SUITE_MANIFEST = pathlib.Path("babylm_tasks.json")
IMAGE_TOKENS = ("<im_start>", "<im_patch>", "<im_end>")


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _gpt_text(record: dict) -> str:
    turn = record["conversations"][1]
    return turn.get("value", turn.get("content"))


@pytest.fixture(scope="module")
def captions() -> list[dict]:
    return json.loads((SAMPLE / "captions.json").read_text())


@pytest.fixture(scope="module")
def text_records() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "text.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "minimal_pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hard_pairs() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "minimal_pairs_hard.jsonl").read_text().splitlines()]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labelling (tiny images, so a plain flood fill)."""
    labels, count = np.zeros(mask.shape, np.int32), 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x], stack = count, [(y, x)]
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
    return labels, count


def _parse_caption(text: str) -> dict:
    words = text.split()
    count = {"a": 1, "two": 2, "three": 3}[words[0]]
    plural_to_shape = {plural: shape for shape, plural in gen.SHAPES.items()}
    shape = words[2] if count == 1 else plural_to_shape[words[2]]
    position = {phrase: name for name, phrase in gen.POSITION_PHRASES.items()}[" ".join(words[3:6])]
    assert words[6:] == ["."], text
    return {"count": count, "colour": words[1], "shape": shape, "position": position}


VIDEO_FILES = ("videos", "videos_eval", "videos.json", "videos_eval.jsonl")  # data/make_sample_videos.py's


def _made_by_video_generator(relative) -> bool:
    return relative.parts[0] in VIDEO_FILES


def test_sample_stays_small():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    videos = sum(p.stat().st_size for p in files if _made_by_video_generator(p.relative_to(SAMPLE)))
    assert sum(p.stat().st_size for p in files) - videos < 1_500_000
    assert videos < 1_800_000


def test_every_caption_record_is_an_image_record_with_an_existing_file(captions):
    assert len(captions) == gen.NUM_IMAGES
    assert len({r["id"] for r in captions}) == len(captions)
    for record in captions:
        assert (SAMPLE / record["image"]).is_file(), record["id"]
        human, gpt = record["conversations"]
        assert (human["from"], human["value"], gpt["from"]) == ("human", "<image>", "gpt")


def test_captions_describe_the_drawn_pixels(captions):
    """Count, colour, shape and position read back from the pixels match the caption words."""
    for record in captions:
        said = _parse_caption(_gpt_text(record))
        assert said == {k: record["scene"][k] for k in said}, record["id"]
        rgb = np.asarray(to_rgb(Image.open(SAMPLE / record["image"])))
        mask = (rgb != 255).any(-1)
        labels, count = _components(mask)
        assert count == said["count"], record["id"]
        assert {tuple(c) for c in rgb[mask]} == {gen.COLOURS[said["colour"]]}, record["id"]
        for k in range(1, count + 1):
            ys, xs = np.nonzero(labels == k)
            fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # of the bounding box
            drawn = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            assert drawn == said["shape"], record["id"]
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]
        at = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65,
              "middle": 0.35 < cx < 0.65 and 0.35 < cy < 0.65}
        assert at[said["position"]], (record["id"], cx, cy)


def test_bundled_images_cover_other_modes_and_non_square_sizes(captions):
    kinds = set()
    for record in captions:
        with Image.open(SAMPLE / record["image"]) as image:
            kinds.add(image.mode)
            kinds.add("transparent palette" if image.mode == "P" and "transparency" in image.info else None)
            kinds.add("non-square" if image.width != image.height else None)
    assert {"RGB", "P", "RGBA", "L", "transparent palette", "non-square"} <= kinds


def test_every_bundled_image_goes_through_load_image(captions):
    processing = ImageProcessing(size=16)
    pixels = np.stack([load_image(SAMPLE / r["image"], processing, record=i, record_id=r["id"])
                       for i, r in enumerate(captions)])
    assert pixels.shape == (len(captions), 16, 16, 3) and np.isfinite(pixels).all()


def test_text_records_are_text_only_with_an_empty_prompt_turn(text_records):
    assert len(text_records) == gen.NUM_TEXT_RECORDS + gen.NUM_RELATIVE_RECORDS
    assert len({r["id"] for r in text_records}) == len(text_records)
    spellings = set()
    for record in text_records:
        assert "image" not in record
        human, gpt = record["conversations"]
        spellings.add(tuple(sorted(human)))
        assert human.get("value", human.get("content")) == "" and human.get("from", human.get("role")) in ("human",
                                                                                                           "user")
        assert gpt.get("from", gpt.get("role")) in ("gpt", "assistant")
        assert _gpt_text(record).strip() and "<" not in _gpt_text(record)
    assert spellings == {("from", "value"), ("content", "role")}


def _number_of(word: str, pairs) -> str | None:
    for singular, plural in pairs:
        if word in (singular, plural):
            return "sg" if word == singular else "pl"
    return None


def _relativizer(words: list[str], i: int) -> bool:
    """'that' right after a noun opens a relative clause; elsewhere it is a determiner."""
    return words[i] == "that" and i > 0 and _number_of(words[i - 1], gen.ANIMALS + gen.THINGS) is not None


def _verb_agreement(words: list[str]) -> list[tuple[str, str]]:
    """(verb number, number of its subject's head noun) for every finite verb of a declarative.

    Subjects wait on a stack: the sentence's head noun, and an object relative's own subject
    ("that the cats see"). A verb right after the relativizer ("that chases") agrees with the
    head that waits; any other verb takes the latest waiting subject. Nouns after a verb or a
    preposition are not subjects.
    """
    nouns, verbs = gen.ANIMALS + gen.THINGS, gen.INTRANSITIVE + gen.TRANSITIVE + [gen.COPULA]
    waiting, wants_subject, found = [], True, []
    for i, word in enumerate(words):
        if _relativizer(words, i):
            wants_subject = words[i + 1] in gen.DETERMINERS
        elif _number_of(word, nouns) and wants_subject:
            waiting.append(_number_of(word, nouns))
            wants_subject = False
        elif _number_of(word, verbs) and waiting:
            subject = waiting[-1] if _relativizer(words, i - 1) else waiting.pop()
            found.append((_number_of(word, verbs), subject))
        elif word in gen.PREPOSITIONS:
            wants_subject = False
    return found


def test_training_sentences_obey_agreement(text_records):
    """Every determiner agrees with its noun and every finite verb with the head noun of its
    subject, relative clauses included."""
    nouns, verbs = gen.ANIMALS + gen.THINGS, gen.INTRANSITIVE + gen.TRANSITIVE + [gen.COPULA]
    mismatched_attractors = relatives = 0
    for record in text_records:
        words = _gpt_text(record).split()
        numbered = [(i, _number_of(w, nouns)) for i, w in enumerate(words) if _number_of(w, nouns)]
        for i, det in enumerate(words):
            if gen.DETERMINERS.get(det) and not _relativizer(words, i):
                next_noun = next(n for j, n in numbered if j > i)
                assert next_noun == gen.DETERMINERS[det], words
        if words[0] in gen.DETERMINERS and "can" not in words:  # a declarative with a finite verb
            agreement = _verb_agreement(words)
            assert agreement and all(verb == subject for verb, subject in agreement), words
            relative = any(_relativizer(words, i) for i in range(len(words)))
            relatives += relative
            verb_at = next(i for i, w in enumerate(words) if _number_of(w, verbs) and i > numbered[0][0])
            before_verb = [n for j, n in numbered if j < verb_at]
            mismatched_attractors += not relative and len(before_verb) == 2 and before_verb[0] != before_verb[1]
    assert mismatched_attractors > 200  # attraction cases are well represented in training
    assert relatives == gen.NUM_RELATIVE_RECORDS  # relative clauses are trained on, in this many sentences


def test_agreement_reader_sees_relative_clauses():
    """_verb_agreement itself, on hand-parsed sentences, so that the test above can fail."""
    assert _verb_agreement("the dog that the cats see runs .".split()) == [("pl", "pl"), ("sg", "sg")]
    assert _verb_agreement("the dog that chases the cats runs .".split()) == [("sg", "sg"), ("sg", "sg")]
    assert _verb_agreement("the dogs near the cat sees that ball .".split()) == [("sg", "pl")]
    assert _verb_agreement("the dog that the cats sees run .".split()) == [("sg", "pl"), ("pl", "sg")]


def test_minimal_pairs_are_blimp_format_and_held_out_from_training(pairs, text_records):
    training = {_gpt_text(r) for r in text_records}
    by_uid: dict[str, list[int]] = {}
    for pair in pairs:
        assert set(pair) == {"sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pair_id"}
        assert pair["sentence_good"] not in training and pair["sentence_bad"] not in training, pair
        by_uid.setdefault(pair["UID"], []).append(pair["pair_id"])
    assert set(by_uid) == {"determiner_noun_agreement", "subject_verb_agreement",
                           "subject_verb_agreement_across_pp"}
    assert all(ids == list(range(gen.PAIRS_PER_UID)) for ids in by_uid.values())
    assert len({p["sentence_good"] for p in pairs}) == len(pairs)


def test_bad_sentence_differs_only_by_the_agreement_violation(pairs):
    nouns, verbs = gen.ANIMALS + gen.THINGS, gen.INTRANSITIVE + gen.TRANSITIVE + [gen.COPULA]
    for pair in pairs:
        good, bad = pair["sentence_good"].split(), pair["sentence_bad"].split()
        diff = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        assert len(good) == len(bad) and len(diff) == 1, pair
        flipped = {good[diff[0]], bad[diff[0]]}
        lexicon = nouns if pair["UID"] == "determiner_noun_agreement" else verbs
        assert flipped in [set(p) for p in lexicon], pair
        if pair["UID"] == "determiner_noun_agreement":
            assert good[diff[0] - 1] in ("this", "that", "these", "those") or \
                good[diff[0] - 2] in ("this", "that", "these", "those"), pair
        if pair["UID"] == "subject_verb_agreement_across_pp":
            numbered = [_number_of(w, nouns) for w in good[:diff[0]] if _number_of(w, nouns)]
            assert len(numbered) == 2 and numbered[0] != numbered[1], pair


HARD_UIDS = {"subject_verb_agreement_across_subject_relative", "subject_verb_agreement_across_object_relative",
             "subject_verb_agreement_across_pp_and_relative"}


def test_hard_minimal_pairs_are_new_uids_held_out_from_training(hard_pairs, pairs, text_records):
    training = {_gpt_text(r) for r in text_records}
    by_uid: dict[str, list[int]] = {}
    for pair in hard_pairs:
        assert set(pair) == {"sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pair_id"}
        assert pair["sentence_good"] not in training and pair["sentence_bad"] not in training, pair
        by_uid.setdefault(pair["UID"], []).append(pair["pair_id"])
    assert set(by_uid) == HARD_UIDS and not HARD_UIDS & {p["UID"] for p in pairs}
    assert all(ids == list(range(gen.PAIRS_PER_UID)) for ids in by_uid.values())
    assert len({p["sentence_good"] for p in hard_pairs + pairs}) == len(hard_pairs) + len(pairs)
    # What the hard pairs test is trained on only in parts: relative clauses, never after a PP.
    with_relatives = [s.split() for s in training if " that " in s and any(
        _relativizer(s.split(), i) for i in range(len(s.split())))]
    assert with_relatives and not any(set(w) & set(gen.PREPOSITIONS) for w in with_relatives)


def test_hard_bad_sentence_flips_the_main_verb_across_opposite_attractors(hard_pairs):
    """One word differs: the main verb, whose number the good sentence shares with its head noun
    while every noun between them (the attractors) has the other number."""
    nouns, verbs = gen.ANIMALS + gen.THINGS, gen.INTRANSITIVE + gen.TRANSITIVE + [gen.COPULA]
    for pair in hard_pairs:
        good, bad = pair["sentence_good"].split(), pair["sentence_bad"].split()
        diff = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        assert len(good) == len(bad) and len(diff) == 1, pair
        assert {good[diff[0]], bad[diff[0]]} in [set(p) for p in verbs], pair
        agreement = _verb_agreement(good)
        assert all(verb == subject for verb, subject in agreement), pair
        assert [v for v, _ in _verb_agreement(bad)] != [v for v, _ in agreement], pair
        head, *attractors = [_number_of(w, nouns) for w in good[:diff[0]] if _number_of(w, nouns)]
        expected = 2 if pair["UID"].endswith("pp_and_relative") else 1
        assert len(attractors) == expected and all(a != head for a in attractors), pair
        assert any(_relativizer(good, i) for i in range(len(good))), pair


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SAMPLE / "tokenizer"), local_files_only=True)


def test_tokenizer_adds_bos_only_and_reports_offsets(tokenizer):
    encoded = tokenizer("the dog runs .", return_offsets_mapping=True)
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids and len(ids) == 5
    assert tokenizer.unk_token_id not in ids
    assert [tuple(o) for o in encoded["offset_mapping"]] == [(0, 0), (0, 3), (4, 7), (8, 12), (13, 14)]
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4


def test_tokenizer_keeps_image_placeholders_as_single_ids(tokenizer):
    placeholder_ids = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    assert tokenizer.unk_token_id not in placeholder_ids and len(set(placeholder_ids)) == 3
    ids = tokenizer("<im_start><im_patch><im_patch><im_end> two red circles").input_ids
    assert ids[:5] == [tokenizer.bos_token_id, placeholder_ids[0], placeholder_ids[1], placeholder_ids[1],
                       placeholder_ids[2]]
    assert len(ids) == 8


def test_tokenizer_covers_every_sample_word(tokenizer, captions, text_records, pairs, hard_pairs):
    texts = [_gpt_text(r) for r in captions + text_records]
    texts += [p[k] for p in pairs + hard_pairs for k in ("sentence_good", "sentence_bad")]
    words = sorted({w for t in texts for w in t.split()})
    assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(words)


def test_generator_rerun_reproduces_the_bundled_sample(tmp_path):
    """JSON and tokenizer files must match byte for byte. PNGs are compared decoded
    (mode, size, palette, transparency, pixels): their compressed bytes also depend
    on the zlib that Pillow links, which is not what this test is about."""
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True, timeout=120)
    bundled = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*") if p.is_file()  # features: make_sample_features.py
                     and p.relative_to(SAMPLE) not in (FEATURES, SUITE_MANIFEST)
                     and not _made_by_video_generator(p.relative_to(SAMPLE)))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == bundled
    for relative in bundled:
        if relative.suffix != ".png":
            assert (tmp_path / relative).read_bytes() == (SAMPLE / relative).read_bytes(), relative
            continue
        with Image.open(SAMPLE / relative) as old, Image.open(tmp_path / relative) as new:
            assert (old.mode, old.size, old.info.get("transparency")) == (new.mode, new.size,
                                                                          new.info.get("transparency"))
            assert old.getpalette() == new.getpalette() and np.array_equal(np.asarray(old), np.asarray(new))


def test_babylm_miniature_features_are_the_tiny_towers_mean_of_each_captions_image(captions):
    """data/sample/babylm/captions_features.npy: BabyLM's (N, D) float32 layout, row i for caption i,
    and what data/make_sample_features.py (cache-features on configs/tiny.yaml) computes today."""
    spec = importlib.util.spec_from_file_location("make_sample_features", ROOT / "data" / "make_sample_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = np.load(SAMPLE / FEATURES)
    listed = json.loads((SAMPLE / "babylm" / "captions.json").read_text())
    assert listed == [_gpt_text(record) for record in captions]
    assert shipped.dtype == np.float32 and shipped.shape == (len(listed), 64)
    np.testing.assert_allclose(module.sample_features(), shipped, rtol=1e-5, atol=1e-6)
