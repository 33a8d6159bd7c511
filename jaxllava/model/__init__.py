"""The LLaVA-style model: Llama decoder, vision towers, resamplers, projectors, and their configs.

Axis letters: see the package docstring (`jaxllava/__init__.py`).

Errors: a model module raises only `ValueError`, and only for a call with wrong
shapes (a programming error). A configuration mistake is a `ConfigError`, raised
by the config dataclasses in `model/config.py` when a config is loaded, so model
constructors do not check their config again; the one exception is
`sharding.make_mesh`, which compares the mesh with the devices present at run time. Loading and conversion errors
(`ConversionError`: a missing tensor, a mis-shaped one, an unsupported
checkpoint) belong to `jaxllava.convert`; `model/` only declares the key maps
between parameter paths and transformers names (`hf_keys`).
"""
