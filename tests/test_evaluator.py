"""MinimalPairEvaluator: encode once, score any model of the architecture, touch nothing of training.

Tiny text-only LlavaModels (configs/presets/lm/tiny.yaml sizes), the bundled tokenizer and a
30-pair slice of the bundled minimal pairs; the EWoK file is synthetic (EWoK's shape only).
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import score_items
from flax import nnx

from jaxllava.config import load_config
from jaxllava.data.tokenizer import load_tokenizer
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval import scoring
from jaxllava.eval.config import EvalConfig
from jaxllava.eval.evaluator import MinimalPairEvaluator, detect_task_kind
from jaxllava.eval.minimal_pairs import read_minimal_pairs
from jaxllava.model.llava import LlavaModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = "<image>\n{text}"
EWOK_LINES = [  # hand-written, EWoK-shaped, in the bundled vocabulary
    ("the cat sees the dog .", "the dog runs .", "the dogs runs ."),
    ("my happy puppy jumps .", "two frogs eat .", "two frogs eats ."),
    ("the girls have my cat .", "a duck sees your chairs .", "a duck see your chairs ."),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(ROOT / "data" / "sample" / "tokenizer"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    lines = (ROOT / "data" / "sample" / "minimal_pairs.jsonl").read_text().splitlines()[::10]
    blimp = directory / "pairs.jsonl"
    blimp.write_text("\n".join(lines) + "\n")
    ewok = directory / "ewok" / "physical-dynamics.jsonl"
    ewok.parent.mkdir()
    ewok.write_text("".join(json.dumps({"Domain": "physical-dynamics", "ContextType": "t", "ContextDiff": "d",
                                        "TargetDiff": "d", "Context1": c, "Context2": c, "Target1": t1,
                                        "Target2": t2}) + "\n" for c, t1, t2 in EWOK_LINES))
    return {"pairs": str(blimp), "ewok": str(ewok.parent)}


def _model(seed: int, *overrides: str) -> LlavaModel:
    config = load_config(ROOT / "configs" / "tiny.yaml", ["model.vision=null", *overrides])
    return LlavaModel(config.model, rngs=nnx.Rngs(seed))


def test_evaluator_scores_equal_the_scoring_functions_in_every_setting(tokenizer, tasks):
    model = _model(0)
    evaluator = MinimalPairEvaluator(tasks, tokenizer, image_templates=(TEMPLATE,), batch_size=16)
    results = evaluator.evaluate(model)

    assert {name: task.kind for name, task in evaluator.tasks.items()} == {"pairs": "blimp", "ewok": "ewok"}
    assert list(results["pairs"]) == ["text", "image_template"]
    for name, kind in (("pairs", "blimp"), ("ewok", "ewok")):
        items = read_minimal_pairs(tasks[name], kind)
        for setting, template in (("text", None), ("image_template", TEMPLATE)):
            expected = score_items(scoring.module_logits_fn(model), tokenizer, items, image_template=template,
                                  batch_size=16, buckets=evaluator.buckets)
            got = results[name][setting]
            np.testing.assert_array_equal(np.stack(got.scores), np.stack(expected.scores))
            assert got.average == expected.average and got.accuracy == expected.accuracy
            assert got.image_template == template
    assert results["ewok"]["text"].items[0].completions[0] == " " + EWOK_LINES[0][1]  # EWoK scores the target
    assert np.ptp(np.stack(results["pairs"]["text"].scores)) > 1.0  # real, spread scores


def test_scores_do_not_depend_on_batch_size_or_buckets_through_the_evaluator(tokenizer, tasks):
    model = _model(1)
    # Every row fits 16 positions: one padded shape (5, 24) here, (16, 16) and (6, 16) in the large one.
    small = MinimalPairEvaluator(tasks, tokenizer, image_templates=(TEMPLATE,), batch_size=5, buckets=(24,))
    large = MinimalPairEvaluator(tasks, tokenizer, image_templates=(TEMPLATE,), batch_size=16)
    a, b = small.evaluate(model), large.evaluate(model)
    for task in tasks:
        for setting in ("text", "image_template"):
            np.testing.assert_allclose(np.stack(a[task][setting].scores), np.stack(b[task][setting].scores),
                                       atol=1e-4, rtol=0)
            np.testing.assert_array_equal(a[task][setting].chosen, b[task][setting].chosen)


def test_evaluation_leaves_the_model_bitwise_unchanged_and_draws_no_random_numbers(tokenizer, tasks):
    model = _model(2)
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(model))]  # every variable, not only params
    MinimalPairEvaluator({"pairs": tasks["pairs"]}, tokenizer, batch_size=16).evaluate(model)
    after = jax.tree.leaves(nnx.state(model))
    assert len(before) == len(after) and all(np.array_equal(x, np.asarray(y)) for x, y in zip(before, after))

    ids = np.zeros((2, 8), np.int32)
    jaxpr = str(jax.make_jaxpr(scoring.module_logits_fn(model))(ids, np.ones_like(ids), ids))
    assert "dot_general" in jaxpr  # the real forward pass was traced
    assert not any(word in jaxpr for word in ("random_bits", "random_seed", "random_wrap", "threefry"))


def test_a_second_checkpoint_reuses_every_compiled_shape(tokenizer, tasks):
    # batch_size 7 is used by no other test, so the first call compiles here.
    evaluator = MinimalPairEvaluator(tasks, tokenizer, image_templates=(TEMPLATE,), batch_size=7,
                                     buckets=(16, 32))
    first = evaluator.evaluate(_model(3))
    second = evaluator.evaluate(_model(4))
    compiled = sum(r.compiles for settings in first.values() for r in settings.values())
    assert 1 <= compiled <= len(evaluator.buckets)  # at most one shape per bucket, across tasks and settings
    assert all(r.compiles == 0 for settings in second.values() for r in settings.values())
    assert not np.allclose(np.stack(first["pairs"]["text"].scores), np.stack(second["pairs"]["text"].scores))


def test_from_config_reads_templates_protocol_and_batch_size(tokenizer, tasks):
    bare = MinimalPairEvaluator.from_config(EvalConfig(tasks={"pairs": tasks["pairs"]}, batch_size=4), tokenizer)
    assert bare.settings == {"text": None} and bare.batch_size == 4
    two = EvalConfig(tasks={"pairs": tasks["pairs"]}, image_templates=(TEMPLATE, "Say: {text}"), protocol="2024")
    with pytest.raises(ConfigError, match="2025"):  # templates exist for the 2025 protocol only
        MinimalPairEvaluator.from_config(two, tokenizer)
    two = EvalConfig(tasks={"pairs": tasks["pairs"]}, image_templates=(TEMPLATE, "Say: {text}"))
    assert MinimalPairEvaluator.from_config(two, tokenizer).settings == {
        "text": None, "image_template_1": TEMPLATE, "image_template_2": "Say: {text}"}


def test_task_kind_comes_from_the_fields_and_a_stray_line_names_its_file_and_line(tokenizer, tasks, tmp_path):
    assert detect_task_kind(tasks["pairs"]) == "blimp" and detect_task_kind(tasks["ewok"]) == "ewok"
    first, second = (ROOT / "data" / "sample" / "minimal_pairs.jsonl").read_text().splitlines()[:2]
    ewok_line = json.dumps({"Domain": "d", "Context1": "a", "Context2": "b", "Target1": "c", "Target2": "d"})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([first, ewok_line, second]) + "\n")
    with pytest.raises(DataError, match=rf"{mixed}.*line 2.*sentence_good"):
        MinimalPairEvaluator({"mixed": str(mixed)}, tokenizer)


def test_exact_model_input_is_recorded_and_scalars_name_task_and_setting(tokenizer, tasks):
    # README pitfall 28: the reference's eval formatting drifted unrecorded.
    evaluator = MinimalPairEvaluator({"pairs": tasks["pairs"]}, tokenizer, image_templates=(TEMPLATE,),
                                     batch_size=16)
    sentence = evaluator.tasks["pairs"].items[0].sentences[0]
    text = evaluator.example("pairs", "text")
    assert text["input_ids"] == [tokenizer.bos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert text["target_mask"] == [False] + [True] * (len(text["input_ids"]) - 1)
    assert evaluator.example("pairs", "image_template")["text"] == "<image>\n" + sentence

    results = evaluator.evaluate(_model(5))
    assert evaluator.scalars(results) == {
        "eval/pairs/text/accuracy": results["pairs"]["text"].average,
        "eval/pairs/image_template/accuracy": results["pairs"]["image_template"].average}
    summary = evaluator.summary(results)["pairs"]
    assert summary["kind"] == "blimp" and summary["settings"]["image_template"]["image_template"] == TEMPLATE
    assert summary["settings"]["text"]["by"]["UID"]["subject_verb_agreement"]["n"] == 10
    table = evaluator.format(results)
    assert "chance" in table and "text vs image_template" in table and "subject_verb_agreement" in table


def test_a_pair_identical_after_tokenization_shows_as_a_tie_in_the_table_and_the_summary(tokenizer, tmp_path):
    # `zorps` and `zorped` are not in the bundled word-level tokenizer: both become <unk>, so the
    # pair is the same token ids and must tie (counted correct); the other pair differs.
    def pair(k, good, bad):
        return json.dumps({"UID": "agreement", "field": "morphology", "linguistics_term": "t", "pair_id": k,
                           "sentence_good": good, "sentence_bad": bad})
    path = tmp_path / "pairs.jsonl"
    path.write_text(pair(0, "the dog zorps .", "the dog zorped .") + "\n"
                    + pair(1, "these bears can play .", "these bear can play .") + "\n")
    evaluator = MinimalPairEvaluator({"pairs": str(path)}, tokenizer, image_templates=(TEMPLATE,), batch_size=16)
    results = evaluator.evaluate(_model(3))
    text = results["pairs"]["text"]
    assert text.identical == 1 and text.ties == 1 and text.correct[0]
    table = evaluator.format(results)
    assert "ties: 1 (1 of them identical after tokenization), counted correct as the pipeline does" in table
    row = next(line for line in table.splitlines() if line.startswith("ties (identical after tokenization)"))
    assert row.split()[-4:] == ["1", "(1)", "1", "(1)"]
    for setting in ("text", "image_template"):
        summary = evaluator.summary(results)["pairs"]["settings"][setting]
        assert summary["ties"] == 1 and summary["identical_after_tokenization"] == 1
    written = json.loads(open(evaluator.write(results, str(tmp_path / "out"))).read())
    assert written["tasks"]["pairs"]["settings"]["text"]["identical_after_tokenization"] == 1


def test_bad_lengths_and_vocabularies_are_refused_before_scoring(tokenizer, tasks):
    with pytest.raises(DataError, match=rf"{tasks['pairs']}:1.*largest bucket 4"):
        MinimalPairEvaluator({"pairs": tasks["pairs"]}, tokenizer, buckets=(4,))
    evaluator = MinimalPairEvaluator({"pairs": tasks["pairs"]}, tokenizer)
    with pytest.raises(ConfigError, match="embedding rows"):
        evaluator.evaluate(_model(0, "model.lm.vocab_size=100"))  # the bundled tokenizer has 165 tokens
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        MinimalPairEvaluator({"pairs": tasks["pairs"]}, tokenizer, bare_text=False)


# ---------------------------------------------------------------------------- on a mesh
#
# One script for both mesh tests: the parameters (pickled numpy) are placed on the mesh
# as training leaves them, `evaluate` runs twice, and every call of the jitted scorer is
# recorded with the layout of its inputs and output.

MESH_SCRIPT = """
import json, pickle, sys
import jax
spec = json.loads(sys.argv[1])
if spec["processes"] > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{spec['port']}", spec["processes"], spec["process_id"])
from flax import nnx
from jaxllava.config import load_config
from jaxllava.checkpoint import model_from_params
from jaxllava.data.tokenizer import load_tokenizer
from jaxllava.eval import scoring
from jaxllava.eval.config import EvalConfig
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.model.sharding import make_mesh, tree_shardings

config = load_config(spec["config"], ["model.vision=null"])
with open(spec["params"], "rb") as f:
    graphdef, host = nnx.split(model_from_params(config.model, pickle.load(f)))
place = lambda x, sharding: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
model = nnx.merge(graphdef, jax.tree.map(place, host, tree_shardings(host, make_mesh(**spec["mesh"]))))
kernel = model.lm.layers[0].mlp.up_proj.kernel.get_value()

calls = []
make_scorer = scoring._scorer
def spying_scorer(mesh):
    score = make_scorer(mesh)
    def call(fn, *arrays):
        sums = score(fn, *arrays)
        calls.append({"shape": list(arrays[0].shape), "specs": sorted({str(a.sharding.spec) for a in arrays}),
                      "shards": len(arrays[0].sharding.device_set), "local": arrays[0].is_fully_addressable,
                      "replicated": sums.is_fully_replicated})
        return sums
    return call
scoring._scorer = spying_scorer

evaluator = MinimalPairEvaluator({"pairs": spec["pairs"]}, load_tokenizer(spec["tokenizer"]),
                                 batch_size=spec["batch_size"], buckets=(16,))
first, again = (evaluator.evaluate(model)["pairs"]["text"] for _ in range(2))
print("RESULT", json.dumps({"scores": [s.tolist() for s in first.scores], "average": first.average,
                            "again": [s.tolist() for s in again.scores], "compiles": [first.compiles, again.compiles],
                            "calls": calls, "kernel_local": kernel.is_fully_addressable}))
"""


@pytest.fixture(scope="module")
def mesh_case(tokenizer, tasks, tmp_path_factory):
    """(script arguments shared by the mesh tests, the single-device results they must match)."""
    model = _model(6)
    params = tmp_path_factory.mktemp("mesh") / "params.pkl"
    with open(params, "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))), f)
    spec = {"config": str(ROOT / "configs" / "tiny.yaml"), "params": str(params), "pairs": tasks["pairs"],
            "tokenizer": str(ROOT / "data" / "sample" / "tokenizer"), "batch_size": 5, "processes": 1}
    expected = MinimalPairEvaluator({"pairs": tasks["pairs"]}, tokenizer, batch_size=5,
                                    buckets=(16,)).evaluate(model)["pairs"]["text"]
    return spec, expected


def _mesh_result(stdout: str, stderr: str) -> dict:
    assert "RESULT " in stdout, stderr[-4000:]
    return json.loads(stdout.split("RESULT ", 1)[1])


def _assert_scores_like_one_device(result: dict, expected) -> None:
    np.testing.assert_allclose(np.stack(result["scores"]), np.stack(expected.scores), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result["again"], result["scores"])
    assert result["average"] == expected.average
    assert result["compiles"] == [1, 0]  # one bucket: one compile on the mesh, reused
    assert all(call["replicated"] for call in result["calls"])  # np.asarray reads them on every process


def test_eight_device_mesh_splits_the_batch_rows_and_scores_like_one_device(mesh_case):
    spec, expected = mesh_case
    spec = {**spec, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(spec)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    result = _mesh_result(out.stdout, out.stderr)
    _assert_scores_like_one_device(result, expected)
    # batch_size 5 rounds up to 8 rows, 2 per (data, fsdp) shard, replicated over tensor.
    assert {(tuple(c["shape"]), tuple(c["specs"]), c["shards"]) for c in result["calls"]} == {
        ((8, 16), ("P(('data', 'fsdp'),)",), 8)}
    assert len(result["calls"]) == 2 * 8  # 60 candidates in 8 batches, twice


def test_two_processes_with_gloo_score_like_one_process(mesh_case):
    spec, expected = mesh_case
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-c", MESH_SCRIPT,
                               json.dumps({**spec, "mesh": {"fsdp": 2}, "processes": 2, "process_id": i,
                                           "port": port})],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for result in (_mesh_result(out, err) for out, err in outputs):
        _assert_scores_like_one_device(result, expected)
        assert not result["kernel_local"]  # the parameters are split between the processes
        assert len(result["calls"]) == 2 * 10  # 60 candidates in batches of 6 (5 rounded up to 2 shards)
        assert all(not c["local"] and c["shape"] == [6, 16] and c["specs"] == ["P('fsdp',)"]
                   for c in result["calls"])  # and so is every batch: 3 rows on each process
