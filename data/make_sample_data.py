"""Generate the bundled sample data set (deterministic, offline).

    python data/make_sample_data.py --out data/sample

Writes, under --out:
  images/NNNN.png        small scenes of coloured shapes (mostly 64x64 RGB; a few
                         non-square, palette, RGBA and greyscale files)
  captions.json          LLaVA-format image records whose caption describes the
                         scene; the scene itself is kept under the extra key "scene"
  text.jsonl             text-only records in the CHILDES style of the reference
                         data: an empty human turn, then the sentence as the gpt turn
  minimal_pairs.jsonl    BLiMP-format pairs built from held-out grammar sentences
  minimal_pairs_hard.jsonl  harder held-out pairs: agreement across relative clauses and
                         across a prepositional phrase plus a relative clause
  qa.json                LLaVA-format image records asking one question about a training
                         image ("how many shapes are there ?" -> "two"), the VQA format's text
  multimodal/            held-out scenes (images/N.png) with VQA-style (vqa.jsonl: count,
                         colour, shape and position questions, 7 distractors) and
                         Winoground-style items (winoground.jsonl: two captions that differ
                         in colour, shape or position, one image), in the BabyLM 2025
                         pipeline's field layout
  tokenizer/             a word-level Hugging Face tokenizer (BOS added, no EOS)

The sentence grammar is small on purpose: about 150 words and short sentences,
so that a 2-layer, width-64 decoder learns subject-verb and determiner-noun
agreement on a CPU in a few hundred steps. Every random choice comes from one
seeded `random.Random`; JSON is written with sorted keys, so a re-run gives the
same bytes (PNG bytes also depend on the zlib that Pillow links).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil

SEED = 20240611
NUM_IMAGES = 400
NUM_TEXT_RECORDS = 3000  # the first release's sentences, byte-identical
NUM_RELATIVE_RECORDS = 300  # then sentences with a relative clause, from their own generator
PAIRS_PER_UID = 100
ROLE_CONTENT_EVERY = 600  # a handful of records use the {"role", "content"} turn variant

# ---------------------------------------------------------------- scenes
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "black": (20, 20, 20),
}
BACKGROUND = (255, 255, 255)
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
# Fraction of the free axis where each of n shapes sits; with the radii below the spacing
# keeps shapes apart (a gap of 2+ px after the +-1 px jitter), so every shape is its own blob.
SPREAD = {1: (0.5,), 2: (0.27, 0.73), 3: (0.17, 0.5, 0.83)}
MIDDLE_SPREAD = {1: (0.5,), 2: (0.34, 0.66), 3: (0.25, 0.5, 0.75)}
SIDE = 0.22  # distance of a side group's centre line from its edge, as a fraction
# Radius (px on a 64-px side) from the drawn size r in 5..7. Shapes are large on purpose: the
# tiny tower sees the scene at 32 px in 8-px patches, and a shape must cover a few patches for
# its colour, shape and place to reach the visual vectors (data/README.md, vision in the tiny run).
RADIUS_ADDED = {1: 5, 2: 4, 3: 1}
MIDDLE_RADIUS = {2: 8, 3: 6}  # a middle row is short: smaller shapes, no size draw


def scene_file_mode(index: int) -> tuple[str, tuple[int, int], bool]:
    """(PIL mode, (width, height), palette transparency) for image `index`.

    One in ten images is stored as something other than a square RGB PNG, so
    the loader's mode conversion and padding run on real bundled files.
    """
    slot = index % 40
    if slot == 5:
        return "P", (64, 64), index % 80 == 5
    if slot == 15:
        return "RGBA", (64, 64), False
    if slot == 25:
        return "L", (64, 64), False
    if slot == 35:
        return "RGB", ((96, 64) if index % 80 == 35 else (64, 96)), False
    return "RGB", (64, 64), False


def make_scene(rng: random.Random, index: int) -> dict:
    mode, (width, height), transparent = scene_file_mode(index)
    # A greyscale file cannot show a hue, so its shapes are black.
    colour = "black" if mode == "L" else rng.choice(sorted(COLOURS))
    count = rng.randint(1, 3)
    position = rng.choice(sorted(POSITION_PHRASES))
    shape = rng.choice(sorted(SHAPES))
    short = min(width, height)
    # The draws (and their order) are those of the first release, so the sentences that follow
    # from the same generator, and the minimal pairs, stay byte-identical.
    if position == "middle" and count > 1:
        radius = MIDDLE_RADIUS[count]
    else:
        radius = rng.randint(5, 7) + RADIUS_ADDED[count]
    radius = round(radius * short / 64)
    spread = MIDDLE_SPREAD[count] if position == "middle" else SPREAD[count]
    centres = []
    for fraction in spread:
        if position in ("left", "right"):
            x, y = (SIDE if position == "left" else 1 - SIDE) * width, fraction * height
        elif position in ("top", "bottom"):
            x, y = fraction * width, (SIDE if position == "top" else 1 - SIDE) * height
        else:
            x, y = fraction * width, 0.5 * height
        centres.append([round(x) + rng.randint(-1, 1), round(y) + rng.randint(-1, 1)])
    return {"colour": colour, "shape": shape, "count": count, "position": position, "radius": radius,
            "centres": centres, "mode": mode, "width": width, "height": height, "transparent": transparent}


def caption(scene: dict) -> str:
    count = scene["count"]
    noun = scene["shape"] if count == 1 else SHAPES[scene["shape"]]
    return f"{COUNT_WORDS[count]} {scene['colour']} {noun} {POSITION_PHRASES[scene['position']]} ."


def draw_scene(scene: dict):
    from PIL import Image, ImageDraw

    size, mode = (scene["width"], scene["height"]), scene["mode"]
    rgb = COLOURS[scene["colour"]]
    if mode == "P":
        image = Image.new("P", size, 0)
        image.putpalette(list(BACKGROUND) + list(rgb))
        fill = 1
    elif mode == "RGBA":
        # Transparent white background: white-compositing and dropping alpha agree.
        image, fill = Image.new("RGBA", size, BACKGROUND + (0,)), rgb + (255,)
    elif mode == "L":
        image, fill = Image.new("L", size, BACKGROUND[0]), rgb[0]
    else:
        image, fill = Image.new("RGB", size, BACKGROUND), rgb
    draw = ImageDraw.Draw(image)
    r = scene["radius"]
    for cx, cy in scene["centres"]:
        box = [cx - r, cy - r, cx + r, cy + r]
        if scene["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif scene["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def save_png(image, path: pathlib.Path, transparent: bool) -> None:
    extra = {"transparency": 0} if transparent else {}
    image.save(path, format="PNG", optimize=False, compress_level=9, **extra)


# ---------------------------------------------------------------- sentences
# (singular, plural) pairs. Regular plurals only, so number is visible on every noun.
ANIMALS = [("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("duck", "ducks"), ("frog", "frogs"),
           ("bear", "bears"), ("cow", "cows"), ("pig", "pigs"), ("horse", "horses"), ("boy", "boys"),
           ("girl", "girls"), ("baby", "babies"), ("puppy", "puppies"), ("bunny", "bunnies"),
           ("kitty", "kitties")]
THINGS = [("ball", "balls"), ("tree", "trees"), ("box", "boxes"), ("door", "doors"), ("bed", "beds"),
          ("car", "cars"), ("hat", "hats"), ("cookie", "cookies"), ("book", "books"), ("cup", "cups"),
          ("chair", "chairs"), ("table", "tables"), ("house", "houses"), ("shoe", "shoes"),
          ("block", "blocks")]
# (3rd person singular, plural) present-tense forms.
INTRANSITIVE = [("runs", "run"), ("jumps", "jump"), ("sleeps", "sleep"), ("plays", "play"),
                ("sits", "sit"), ("sings", "sing"), ("swims", "swim"), ("walks", "walk"),
                ("cries", "cry"), ("laughs", "laugh"), ("hides", "hide"), ("eats", "eat")]
TRANSITIVE = [("sees", "see"), ("likes", "like"), ("wants", "want"), ("has", "have"), ("finds", "find"),
              ("chases", "chase"), ("holds", "hold"), ("pushes", "push")]
COPULA = ("is", "are")
ADJECTIVES = ["big", "little", "happy", "sad", "brown", "small", "funny", "sleepy", "hungry", "silly"]
PREPOSITIONS = ["near", "behind", "under", "by", "with", "on"]
# Determiners by the number they require; None = either number.
DETERMINERS = {"the": None, "my": None, "your": None, "a": "sg", "this": "sg", "that": "sg",
               "these": "pl", "those": "pl", "two": "pl", "some": "pl"}
DEMONSTRATIVES = {"sg": ["this", "that"], "pl": ["these", "those"]}


def determiner(rng: random.Random, number: str) -> str:
    return rng.choice([d for d, n in DETERMINERS.items() if n in (None, number)])


def noun_phrase(rng: random.Random, nouns, number: str, *, det: str | None = None,
                adjective_p: float = 0.3) -> list[str]:
    noun = rng.choice(nouns)[0 if number == "sg" else 1]
    words = [det or determiner(rng, number)]
    if rng.random() < adjective_p:
        words.append(rng.choice(ADJECTIVES))
    return words + [noun]


def random_number(rng: random.Random) -> str:
    return rng.choice(("sg", "pl"))


def pick_verb(forms: tuple[str, str], number: str) -> str:
    return forms[0] if number == "sg" else forms[1]


def predicate(rng: random.Random, number: str) -> list[str]:
    """A verb phrase whose first word is the verb that agrees with the subject."""
    kind = rng.choice(("intransitive", "transitive", "copula"))
    if kind == "intransitive":
        return [pick_verb(rng.choice(INTRANSITIVE), number)]
    if kind == "copula":
        return [pick_verb(COPULA, number), rng.choice(ADJECTIVES)]
    obj = noun_phrase(rng, rng.choice((ANIMALS, THINGS)), random_number(rng), adjective_p=0.2)
    return [pick_verb(rng.choice(TRANSITIVE), number)] + obj


def agreement_sentence(rng: random.Random, *, with_pp: bool,
                       opposite_attractor: bool = False) -> tuple[list[str], int]:
    """A declarative sentence; returns (words, index of the agreeing verb).

    With `with_pp` the subject carries a prepositional phrase whose noun (the
    attractor) has a random number, or the subject's other number when
    `opposite_attractor`.
    """
    n = random_number(rng)
    subject = noun_phrase(rng, ANIMALS, n)
    if with_pp:
        attractor_number = {"sg": "pl", "pl": "sg"}[n] if opposite_attractor else random_number(rng)
        attractor = noun_phrase(rng, rng.choice((ANIMALS, THINGS)), attractor_number, adjective_p=0.1)
        subject += [rng.choice(PREPOSITIONS)] + attractor
    return subject + predicate(rng, n) + ["."], len(subject)


def modal_sentence(rng: random.Random) -> list[str]:
    # "can" does not agree, so only the determiner marks number.
    return noun_phrase(rng, ANIMALS, random_number(rng)) + ["can", rng.choice(INTRANSITIVE)[1], "."]


def filler_sentence(rng: random.Random) -> list[str]:
    """Child-directed frames: imperatives and questions (questions agree too)."""
    n = random_number(rng)
    np_ = noun_phrase(rng, rng.choice((ANIMALS, THINGS)), n)
    frame = rng.choice(("look", "where", "see", "here"))
    if frame == "look":
        return ["look", "at"] + np_ + ["!"]
    if frame == "where":
        return ["where", pick_verb(COPULA, n)] + np_ + ["?"]
    if frame == "see":
        return ["do", "you", "see"] + np_ + ["?"]
    return ["here", pick_verb(COPULA, n)] + np_ + ["."]


def training_sentence(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.40:
        words = agreement_sentence(rng, with_pp=False)[0]
    elif roll < 0.65:
        words = agreement_sentence(rng, with_pp=True)[0]
    elif roll < 0.80:
        words = modal_sentence(rng)
    else:
        words = filler_sentence(rng)
    return " ".join(words)


def flip_number(word: str, pairs) -> str:
    for sg, pl in pairs:
        if word == sg:
            return pl
        if word == pl:
            return sg
    raise ValueError(f"{word!r} has no number pair")


def subject_verb_pair(rng: random.Random, *, with_pp: bool) -> tuple[str, str]:
    # Across a PP the held-out attractor always has the other number: the hard case.
    words, verb_at = agreement_sentence(rng, with_pp=with_pp, opposite_attractor=True)
    bad = list(words)
    bad[verb_at] = flip_number(words[verb_at], INTRANSITIVE + TRANSITIVE + [COPULA])
    return " ".join(words), " ".join(bad)


def determiner_noun_pair(rng: random.Random) -> tuple[str, str]:
    n = random_number(rng)
    det = rng.choice(DEMONSTRATIVES[n])
    if rng.random() < 0.5:
        words = noun_phrase(rng, ANIMALS, n, det=det) + ["can", rng.choice(INTRANSITIVE)[1], "."]
        noun_at = len(words) - 4
    else:
        subject_number = random_number(rng)
        words = (noun_phrase(rng, ANIMALS, subject_number) + [pick_verb(rng.choice(TRANSITIVE), subject_number)]
                 + noun_phrase(rng, rng.choice((ANIMALS, THINGS)), n, det=det) + ["."])
        noun_at = len(words) - 2
    bad = list(words)
    bad[noun_at] = flip_number(words[noun_at], ANIMALS + THINGS)
    return " ".join(words), " ".join(bad)


PHENOMENA = {
    # UID: (field, linguistics_term, pair maker); terms follow BLiMP's.
    "determiner_noun_agreement": ("morphology", "determiner_noun_agreement", determiner_noun_pair),
    "subject_verb_agreement": ("morphology", "subject_verb_agreement",
                               lambda rng: subject_verb_pair(rng, with_pp=False)),
    "subject_verb_agreement_across_pp": ("morphology", "subject_verb_agreement",
                                         lambda rng: subject_verb_pair(rng, with_pp=True)),
}


def held_out_pairs(rng: random.Random, training: set[str], phenomena: dict = PHENOMENA) -> list[dict]:
    pairs = []
    for uid, (field, term, make_pair) in phenomena.items():
        seen: set[str] = set()
        while len(seen) < PAIRS_PER_UID:
            good, bad = make_pair(rng)
            if good in training or good in seen:
                continue
            seen.add(good)
            pairs.append({"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term,
                          "UID": uid, "pair_id": len(seen) - 1})
    for pair in pairs:
        assert pair["sentence_good"] not in training and pair["sentence_bad"] not in training, pair
        assert pair["sentence_good"] != pair["sentence_bad"], pair
    return pairs


# ---------------------------------------------------------------- relative clauses (the hard pairs)
def relative_clause(rng: random.Random, head_number: str, kind: str, attractor_number: str) -> list[str]:
    """'that' + a subject relative ("that chases the cats": its verb agrees with the head) or an
    object relative ("that the cats see": its verb agrees with its own subject, the attractor)."""
    verb = rng.choice(TRANSITIVE)
    if kind == "subject":
        obj = noun_phrase(rng, rng.choice((ANIMALS, THINGS)), attractor_number, adjective_p=0.1)
        return ["that", pick_verb(verb, head_number)] + obj
    rc_subject = noun_phrase(rng, ANIMALS, attractor_number, adjective_p=0.1)
    return ["that"] + rc_subject + [pick_verb(verb, attractor_number)]


def relative_sentence(rng: random.Random, kind: str, *, opposite_attractor: bool = False,
                      with_pp: bool = False) -> tuple[list[str], int]:
    """A declarative whose subject carries a relative clause (after a prepositional phrase with
    `with_pp`); returns (words, index of the main verb). Every attractor has a random number,
    or the subject's other number when `opposite_attractor`."""
    n = random_number(rng)

    def attractor_number() -> str:
        return {"sg": "pl", "pl": "sg"}[n] if opposite_attractor else random_number(rng)

    subject = noun_phrase(rng, ANIMALS, n)
    if with_pp:
        subject += [rng.choice(PREPOSITIONS)] + noun_phrase(rng, rng.choice((ANIMALS, THINGS)), attractor_number(),
                                                             adjective_p=0.1)
    subject += relative_clause(rng, n, kind, attractor_number())
    return subject + predicate(rng, n) + ["."], len(subject)


def relative_training_sentence(rng: random.Random) -> str:
    # Subject and object relatives only: the pairs across a PP and a relative clause stay a
    # combination never trained on.
    return " ".join(relative_sentence(rng, rng.choice(("subject", "object")))[0])


def main_verb_pair(rng: random.Random, kind: str, with_pp: bool = False) -> tuple[str, str]:
    words, verb_at = relative_sentence(rng, kind, opposite_attractor=True, with_pp=with_pp)
    bad = list(words)
    bad[verb_at] = flip_number(words[verb_at], INTRANSITIVE + TRANSITIVE + [COPULA])
    return " ".join(words), " ".join(bad)


HARD_PHENOMENA = {
    # Harder than PHENOMENA: the tiny run does not saturate them (data/README.md has its numbers).
    "subject_verb_agreement_across_subject_relative": (
        "morphology", "subject_verb_agreement", lambda rng: main_verb_pair(rng, "subject")),
    "subject_verb_agreement_across_object_relative": (
        "morphology", "subject_verb_agreement", lambda rng: main_verb_pair(rng, "object")),
    # The longest dependency: the verb agrees with a head noun 7-10 words back, across two attractors.
    "subject_verb_agreement_across_pp_and_relative": (
        "morphology", "subject_verb_agreement", lambda rng: main_verb_pair(rng, "object", with_pp=True)),
}


# ---------------------------------------------------------------- records
def text_record(index: int, sentence: str) -> dict:
    record_id = f"txt-{index:05d}"
    if index % ROLE_CONTENT_EVERY == 0:
        turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": sentence}]
    else:
        turns = [{"from": "human", "value": ""}, {"from": "gpt", "value": sentence}]
    return {"id": record_id, "conversations": turns}


def image_record(index: int, scene: dict) -> dict:
    name = f"images/{index:04d}.png"
    return {"id": f"cap-{index:04d}", "image": name, "scene": scene,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]}


def write_json_lines(path: pathlib.Path, records: list[dict]) -> None:
    """A JSON list with one record per line: valid LLaVA JSON, still diffable."""
    lines = ",\n".join(json.dumps(r, sort_keys=True) for r in records)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


# ---------------------------------------------------------------- questions and the multimodal evaluation
NUM_EVAL_IMAGES = 60
# One question per attribute; answers are single words so the scored completion is one token.
QUESTIONS = {
    "count": "how many shapes are there ?",
    "colour": "what colour are the shapes ?",
    "shape": "what shape are they ?",
    "position": "where are the shapes ?",
}
ANSWERS = {
    "count": {1: "one", 2: "two", 3: "three"},
    "colour": {c: c for c in COLOURS},
    "shape": {s: s for s in SHAPES},
    "position": {p: p for p in POSITION_PHRASES},
}
ATTRIBUTE = {"count": "count", "colour": "colour", "shape": "shape", "position": "position"}
DISTRACTORS = 7  # as the pipeline's VQA items


def answer(scene: dict, kind: str) -> str:
    return ANSWERS[kind][scene[ATTRIBUTE[kind]]]


def qa_record(index: int, scene: dict, rng: random.Random) -> dict:
    """A training image's question (the kinds in turn) and its one-word answer, as VQA items read."""
    kind = sorted(QUESTIONS)[index % len(QUESTIONS)]
    return {"id": f"qa-{index:04d}", "image": f"images/{index:04d}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"},
                              {"from": "gpt", "value": answer(scene, kind)}]}


def distractors(kind: str, target: str, rng: random.Random) -> list[str]:
    """The other answers of the question's kind first (what vision must tell apart), then
    answers of other kinds until there are 7."""
    same = sorted(set(ANSWERS[kind].values()) - {target})
    others = sorted({a for k, values in ANSWERS.items() if k != kind for a in values.values()})
    rng.shuffle(same)
    return same[:DISTRACTORS] + rng.sample(others, max(0, DISTRACTORS - len(same)))


def swapped_caption(scene: dict, attribute: str, rng: random.Random) -> str:
    """The scene's caption with one attribute changed: a Winoground-style foil."""
    values = {"colour": sorted(COLOURS), "shape": sorted(SHAPES), "position": sorted(POSITION_PHRASES)}[attribute]
    other = rng.choice([v for v in values if v != scene[attribute]])
    return caption({**scene, attribute: other})


def write_multimodal_evaluation(out: pathlib.Path, rng: random.Random) -> list[str]:
    """Held-out scenes, their VQA-style and Winoground-style items; returns every text in them.
    Image N is images/N.png: the folder key of VQA's image_id and Winoground's image_idx."""
    (out / "images").mkdir(parents=True)
    vqa, winoground = [], []
    for index in range(NUM_EVAL_IMAGES):
        scene = make_scene(rng, 0)  # index 0: a 64x64 RGB file
        save_png(draw_scene(scene), out / "images" / f"{index}.png", False)
        for k, kind in enumerate(sorted(QUESTIONS)):
            target = answer(scene, kind)
            vqa.append({"question": QUESTIONS[kind], "target_ans": target,
                        "distractors": distractors(kind, target, rng), "idx_in_hf_dataset": index,
                        "image_id": index, "question_id": index * len(QUESTIONS) + k, "question_type": kind})
        attribute = ("colour", "shape", "position")[index % 3]
        winoground.append({"id": index, "caption_0": caption(scene), "caption_1": swapped_caption(scene, attribute, rng),
                           "image_idx": index, "tag": attribute, "secondary_tag": "", "collapsed_tag": attribute,
                           "num_main_preds": 1})
    write_jsonl(out / "vqa.jsonl", vqa)
    write_jsonl(out / "winoground.jsonl", winoground)
    return ([f"{v['question']} {a}" for v in vqa for a in [v["target_ans"]] + v["distractors"]]
            + [w[k] for w in winoground for k in ("caption_0", "caption_1")])


# ---------------------------------------------------------------- tokenizer
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Image placeholders, one id each (docs/reference.md#special-tokens-and-vocabulary-growth).
IMAGE_TOKENS = ["<im_start>", "<im_patch>", "<im_end>"]


def write_tokenizer(out: pathlib.Path, sentences: list[str]) -> None:
    """A Llama-like word-level tokenizer: BOS prepended, no EOS, offsets available.

    tokenizer_config.json is written by hand with the class name and key that
    both transformers 4.x (the BabyLM 2025 pipeline pins 4.51.3) and 5.x load.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for s in sentences for w in s.split()})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + IMAGE_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer.add_special_tokens(SPECIAL_TOKENS + IMAGE_TOKENS)
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": IMAGE_TOKENS,
              "padding_side": "right", "model_max_length": 2048, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "additional_special_tokens": IMAGE_TOKENS}
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- main
OUTPUTS = ("images", "tokenizer", "captions.json", "text.jsonl", "minimal_pairs.jsonl", "minimal_pairs_hard.jsonl",
           "babylm/train",
           "babylm/captions.json", "qa.json", "multimodal")
# The miniature of BabyLM's own files: the same sentences as plain-text *.train files (one sentence
# a line, split into corpora as BabyLM's text half is) and the captions as a JSON list of strings.
# Their features (babylm/captions_features.npy) come from the tiny tower: data/README.md.
TRAIN_FILES = ("childes", "simple_wiki", "switchboard")


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # only what this script writes, so a re-run leaves no stale files
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    rng = random.Random(SEED)

    (out / "images").mkdir()
    captions = []
    for index in range(1, NUM_IMAGES + 1):
        scene = make_scene(rng, index)
        save_png(draw_scene(scene), out / "images" / f"{index:04d}.png", scene["transparent"])
        captions.append(image_record(index, scene))
    write_json_lines(out / "captions.json", captions)

    sentences = [training_sentence(rng) for _ in range(NUM_TEXT_RECORDS)]

    pairs = held_out_pairs(rng, set(sentences))
    write_jsonl(out / "minimal_pairs.jsonl", pairs)
    # Relative clauses come after, from their own generator, so that everything above stays
    # as the first release wrote it. No relative sentence is an easy pair's either sentence.
    relative_rng = random.Random(SEED + 2)
    easy = {p[k] for p in pairs for k in ("sentence_good", "sentence_bad")}
    relatives = []
    while len(relatives) < NUM_RELATIVE_RECORDS:
        sentence = relative_training_sentence(relative_rng)
        if sentence not in easy:
            relatives.append(sentence)
    sentences += relatives
    write_jsonl(out / "text.jsonl", [text_record(i, s) for i, s in enumerate(sentences, start=1)])
    hard_pairs = held_out_pairs(relative_rng, set(sentences), HARD_PHENOMENA)
    write_jsonl(out / "minimal_pairs_hard.jsonl", hard_pairs)

    caption_texts = [c["conversations"][1]["value"] for c in captions]
    write_babylm_miniature(out / "babylm", sentences, caption_texts)
    # Its own generator, so the files above do not change with the multimodal evaluation's design.
    qa_rng = random.Random(SEED + 1)
    qa = [qa_record(index, c["scene"], qa_rng) for index, c in enumerate(captions, start=1)]
    write_json_lines(out / "qa.json", qa)
    eval_texts = write_multimodal_evaluation(out / "multimodal", qa_rng)
    qa_texts = [" ".join(turn["value"].replace("<image>", " ") for turn in r["conversations"]) for r in qa]
    write_tokenizer(out / "tokenizer", sentences + caption_texts + qa_texts + eval_texts)
    vocabulary = set(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    unknown = {w for p in pairs + hard_pairs for s in (p["sentence_good"], p["sentence_bad"])
               for w in s.split()} - vocabulary
    assert not unknown, f"minimal-pair words missing from the tokenizer: {sorted(unknown)}"


def write_babylm_miniature(out: pathlib.Path, sentences: list[str], captions: list[str]) -> None:
    (out / "train").mkdir(parents=True, exist_ok=True)
    share = -(-len(sentences) // len(TRAIN_FILES))
    for k, name in enumerate(TRAIN_FILES):
        lines = sentences[k * share:(k + 1) * share]
        (out / "train" / f"{name}.train").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out / "captions.json").write_text(json.dumps(captions, indent=0) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "sample")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
