"""The jitted train and evaluation steps lower for the CUDA platform, here on CPU, at the shapes of
`configs/babylm_reference.yaml` (Baby Llama + DINOv2-L, bf16): a CUDA-only lowering error fails CI
instead of a user's first GPU job. Only lowering (StableHLO) runs: nothing is compiled or allocated,
the parameters are shapes. cuDNN attention lowers only on a GPU, so attention is XLA's here."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxllava.checkpoint import abstract_model
from jaxllava.config import load_config
from jaxllava.data.batch import ImageBatch, TextBatch
from jaxllava.eval import scoring
from jaxllava.model.sharding import make_mesh
from jaxllava.train.step import TrainStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = load_config(os.path.join(ROOT, "configs", "babylm_reference.yaml"), ["model.attention_impl=xla"])
ROWS, LENGTH = CONFIG.data.image_rows, 512


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def abstract_batch(kind):
    ids = jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32)
    if kind is TextBatch:
        return TextBatch(ids, ids, ids, ids, stats=None)
    side = CONFIG.model.vision.image_size
    return ImageBatch(ids, ids, ids, ids, jax.ShapeDtypeStruct((ROWS, side, side, 3), jnp.float32),
                      jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.bool_), jax.ShapeDtypeStruct((ROWS,), jnp.bool_),
                      stats=None)


def stablehlo(exported) -> str:
    return exported.mlir_module()


def test_train_step_lowers_for_cuda_at_the_babylm_reference_shapes():
    mesh = make_mesh(devices=jax.devices()[:1])
    trainer = TrainStep(abstract_model(CONFIG.model), CONFIG.optim, total_steps=1000, mesh=mesh)
    params = shapes(trainer.abstract["params"])
    spec = trainer.spec.for_gradients()
    accum = jax.eval_shape(lambda p: trainer._zeros(p, spec=spec), params)
    matmuls = {}
    for kind in (TextBatch, ImageBatch):
        exported = jax.export.export(trainer._accumulate, platforms=("cuda",))(
            params, shapes(trainer.rest), accum, abstract_batch(kind), spec=spec)
        assert exported.platforms == ("cuda",)
        matmuls[kind] = stablehlo(exported).count("stablehlo.dot_general")
    # The image step adds the tower's 24 blocks and the projector; the text step has none of them.
    assert matmuls[TextBatch] > 0 and matmuls[ImageBatch] > matmuls[TextBatch] + 24 * 6
    update = jax.export.export(trainer._update, platforms=("cuda",))(shapes(trainer.abstract), accum, spec=trainer.spec)
    assert update.platforms == ("cuda",)


def test_evaluation_step_lowers_for_cuda_at_the_babylm_reference_shapes():
    model = abstract_model(dataclasses.replace(CONFIG.model, dtype="float32"))
    logits_fn = jax.tree.map(lambda x: x, scoring.module_logits_fn(model))
    scorer = scoring._scorer(None)
    ids = jax.ShapeDtypeStruct((64, 64), jnp.int32)
    exported = jax.export.export(scorer, platforms=("cuda",))(
        shapes(logits_fn), ids, ids, ids, ids, jax.ShapeDtypeStruct((64, 64), jnp.bool_))
    assert exported.platforms == ("cuda",)
    assert [tuple(a.shape) for a in exported.out_avals] == [(64,)]
    assert np.dtype(exported.out_avals[0].dtype) == np.float32
