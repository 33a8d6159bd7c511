"""`launch.py generate`: a trained model's continuations and captions.

    python launch.py generate --checkpoint runs/tiny --image data/sample/images/0001.png --prompt ""
    python launch.py generate --checkpoint runs/tiny --inputs prompts.jsonl [--max-new-tokens 32]
                              [--temperature 0.8 --top-p 0.9 --seed 0] [--batch-size 8]

An inputs file holds one JSON object per line, {"prompt": str, "image": optional path}; an
image path is relative to the inputs file's folder (as a record's image is relative to its
record file), `--image` to the working directory.

A prompt becomes ids exactly as training turns an image record into a sample
(jaxllava/data/samples.py, `record_pieces`), under the checkpoint's own objective, minus
the end-of-sequence piece: plain_lm and captions give BOS, the image span
`<im_start> + placeholders + <im_end>`, then the prompt as the start of the text, so
`--prompt ""` with an image asks a caption-trained model for a caption. Under chat the
prompt is the user turn, and the assistant wrapper's opening text follows when it is not
just whitespace (a lone space would be tokenized apart from the words after it, which
training never did).

Image and text prompts are generated in separate batches (a text batch never runs the
vision tower); rows are left-padded to a bucketed length (jaxllava/model/decode.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

from jaxllava.errors import ConfigError, DataError

DEFAULT_MAX_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class GenerationInput:
    prompt: str
    image: Optional[str] = None  # path, already resolved
    file: Optional[str] = None  # where the input came from, for errors: the inputs file, or None
    where: str = "--prompt"  # "line 3" of the inputs file, or the command-line option


def read_inputs(path: str) -> list[GenerationInput]:
    """The inputs of a JSONL file; a bad line is a DataError naming the file, line and field."""
    if not os.path.isfile(path):
        raise DataError("no such inputs file", file=path, field="--inputs")
    folder = os.path.dirname(os.path.abspath(path))
    inputs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not a JSON object: {e}", file=path, record=where) from None
            if not isinstance(entry, dict):
                raise DataError(f"expected a JSON object, got {type(entry).__name__}", file=path, record=where)
            prompt, image = entry.get("prompt"), entry.get("image")
            if not isinstance(prompt, str):
                raise DataError(f"expected a string, got {prompt!r}", file=path, record=where, field="prompt")
            if image is not None and not isinstance(image, str):
                raise DataError(f"expected a path or null, got {image!r}", file=path, record=where, field="image")
            image = os.path.join(folder, image) if image else None
            inputs.append(GenerationInput(prompt, image, path, where))
    if not inputs:
        raise DataError("holds no inputs (one JSON object per line)", file=path)
    return inputs


def _error(item: GenerationInput, message: str, field: str) -> DataError:
    return DataError(message, file=item.file, record=item.where, field=field)


def prompt_ids(item: GenerationInput, tokenizer, config) -> tuple[list[int], int]:
    """(ids, index of the image span or -1) of one prompt, built as training builds a sample."""
    from jaxllava.data.records import Record, Turn
    from jaxllava.data.samples import assemble_pieces, record_pieces
    from jaxllava.data.templates import get_template
    from jaxllava.data.tokenizer import IMAGE_TOKEN, PLACEHOLDER_TOKENS, VIDEO_TOKEN, special_ids

    data = config.data
    marked = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN, *PLACEHOLDER_TOKENS) if t in item.prompt]
    if marked:
        raise _error(item, f"holds {marked[0]}: an image goes in the 'image' field, never in the text", "prompt")
    if data.objective == "chat":
        turns = (Turn("user", item.prompt),)
    else:  # plain_lm and captions: the prompt is the beginning of the text to continue
        turns = (Turn("user", ""), Turn("assistant", item.prompt))
    record = Record(file=item.file or "<command line>", where=item.where, id=item.where, turns=turns,
                    image=item.image)
    ids = special_ids(tokenizer)
    pieces = [p for p in record_pieces(record, data, has_bos=ids.bos is not None) if p[0] != "eos"]
    if data.objective == "chat":
        opening = get_template(data.chat_template).assistant.split("{text}")[0]
        if opening.strip():
            pieces.append(("text", opening, False))
    texts = [p[1] for p in pieces if p[0] == "text"]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    span = ids.image_span(config.model.image_tokens) if item.image is not None else []
    tokens, _, start = assemble_pieces(pieces, encoded, ids, span)
    if not tokens:
        raise _error(item, "is empty and the tokenizer has no BOS: there is nothing to continue", "prompt")
    return tokens, start


class GenerationSession:
    """A model, its tokenizer and its training config, ready to generate (one Generator, so one
    compilation per batch shape for the whole session)."""

    def __init__(self, model, tokenizer, config):
        from jaxllava.data.pipeline import image_processing_for
        from jaxllava.data.tokenizer import special_ids
        from jaxllava.model.decode import Generator

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.ids = special_ids(tokenizer)
        self.generator = Generator(model, eos_id=self.ids.eos)
        vision = config.model.vision
        self.processing = (image_processing_for(config.data, vision.image_size)
                           if vision is not None and vision.kind != "features" else None)

    def _check_image(self, item: GenerationInput) -> None:
        vision = self.config.model.vision
        if vision is None:
            raise _error(item, "the model has no vision input (model.vision is null)", "image")
        if self.processing is None:
            raise _error(item, "the model reads precomputed features (model.vision.kind: features), not images; "
                               "generate takes images only for a model with a vision tower", "image")
        if not self.config.data.use_images:
            raise _error(item, "the model was trained with data.use_images false: it never saw an image", "image")
        if not os.path.isfile(item.image):
            raise _error(item, f"no such image file: {item.image}", "image")

    def encode(self, item: GenerationInput, max_new_tokens: int) -> tuple[list[int], int]:
        if item.image is not None:
            self._check_image(item)
        tokens, start = prompt_ids(item, self.tokenizer, self.config)
        limit = self.config.model.lm.max_position_embeddings
        if len(tokens) + max_new_tokens > limit:
            raise _error(item, f"{len(tokens)} prompt tokens and {max_new_tokens} new tokens exceed the "
                               f"model's max_position_embeddings {limit}, the longest sequence the cache holds "
                               f"(shorten the prompt or lower --max-new-tokens)", "prompt")
        return tokens, start

    def generate(self, items: Sequence[GenerationInput], max_new_tokens: int, sampling=None, *,
                 batch_size: int = 8) -> list[list[int]]:
        """Generated ids per input (up to and including EOS), in input order."""
        from jaxllava.model.decode import Sampling

        sampling = sampling or Sampling()
        encoded = [self.encode(item, max_new_tokens) for item in items]  # every input checked before any work
        outputs: list[Optional[list[int]]] = [None] * len(items)
        for with_image in (False, True):
            group = [i for i, item in enumerate(items) if (item.image is not None) == with_image]
            rows = min(batch_size, len(group))
            for lo in range(0, len(group), max(rows, 1)):
                chunk = group[lo:lo + rows]
                generated = self._generate_chunk([items[i] for i in chunk], [encoded[i] for i in chunk], rows,
                                                 max_new_tokens, sampling)
                for i, tokens in zip(chunk, generated):
                    outputs[i] = tokens
        return outputs

    def _generate_chunk(self, items, encoded, rows: int, max_new_tokens: int, sampling) -> list[list[int]]:
        import numpy as np

        from jaxllava.data.images import load_image
        from jaxllava.model.decode import left_padded, prompt_bucket

        # The last chunk is filled up to `rows` with copies of its first prompt: one shape, one compilation.
        fill = rows - len(items)
        items, encoded = list(items) + [items[0]] * fill, list(encoded) + [encoded[0]] * fill
        prompts = [tokens for tokens, _ in encoded]
        length = prompt_bucket(max(len(p) for p in prompts))
        if items[0].image is None:
            batch = left_padded(prompts, pad_id=self.ids.pad, length=length)
        else:
            pixels = np.stack([load_image(item.image, self.processing, record=item.where) for item in items])
            batch = left_padded(prompts, pad_id=self.ids.pad, length=length, image_starts=[s for _, s in encoded],
                                image_tokens=self.config.model.image_tokens, pixels=pixels)
        generated = self.generator.generate(batch, max_new_tokens, sampling)
        return [generated.row(b) for b in range(len(items) - fill)]

    def text(self, tokens: Sequence[int]) -> str:
        """Generated ids as text, without the EOS and other special tokens."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def caption_example(model, tokenizer, config, image_path: str, *, max_new_tokens: int = 24) -> str:
    """The caption `model` writes for the image at `image_path` (greedy, empty prompt): what
    the end of a training run prints next to the reference caption."""
    session = GenerationSession(model, tokenizer, config)
    item = GenerationInput("", image_path, where="caption example")
    room = config.model.lm.max_position_embeddings - len(prompt_ids(item, tokenizer, config)[0])
    return session.text(session.generate([item], max(1, min(max_new_tokens, room)))[0])


def first_image_caption(table, tokenizer) -> Optional[tuple[str, str]]:
    """(image path, reference text) of the first image sample of a SampleTable with an image file
    (its target tokens, decoded), or None when it has none: the example a training run captions at
    its end. The black image of the `data.text_only_images` ablation is no picture to caption."""
    import numpy as np

    from jaxllava.data.images import BLACK_IMAGE

    row = next((int(i) for i in np.flatnonzero(table.has_image)
                if table.images[i] is not None and table.images[i] != BLACK_IMAGE), None)
    if row is None:
        return None
    tokens, is_target = table.sample(row)
    reference = tokenizer.decode(tokens[is_target].tolist(), skip_special_tokens=True).strip()
    return table.images[row], reference


# --- the command line ------------------------------------------------------------------------------

def add_generate_parser(subparsers):
    """The `generate` subcommand's parser (its `func` is set by launch.py)."""
    p = subparsers.add_parser("generate", help="continue prompts and caption images with a checkpoint "
                                               "(greedy, or temperature / top-p sampling)")
    p.add_argument("--checkpoint", required=True,
                   help="jaxllava work directory (its latest complete step), step directory, or "
                        "milestones/chck_<N>M entry; the model and tokenizer come from it")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help='text to continue ("" with --image: a caption)')
    source.add_argument("--inputs", help='JSONL file, one {"prompt": ..., "image": optional path} per line; '
                                         "images relative to the file's folder")
    p.add_argument("--image", help="image for --prompt (relative to the working directory)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"tokens generated per prompt at most; EOS stops earlier (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept when sampling (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same output (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default float32)")
    return p


def _sampling_from_args(args):
    from jaxllava.model.decode import Sampling

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image is not None and args.prompt is None:
        raise ConfigError("--image goes with --prompt; in an --inputs file give each line its 'image'")
    if (args.top_p != 1.0 or args.seed != 0) and args.temperature == 0:
        raise ConfigError("--top-p and --seed apply to sampling: give --temperature > 0 too")
    try:
        return Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"--temperature/--top-p: {e}") from None


def run_generate(args, out=None) -> int:
    import dataclasses as dc

    import jax

    from jaxllava.checkpoint import load_checkpoint_params, model_from_params
    from jaxllava.data.tokenizer import load_tokenizer

    out = out or sys.stdout
    sampling = _sampling_from_args(args)
    items = (read_inputs(args.inputs) if args.inputs is not None
             else [GenerationInput(args.prompt, args.image, where="--prompt")])
    config, params, _ = load_checkpoint_params(args.checkpoint)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = model_from_params(dc.replace(config.model, dtype=args.dtype), jax.device_put(params))
    session = GenerationSession(model, tokenizer, config)
    started = time.monotonic()
    outputs = session.generate(items, args.max_new_tokens, sampling, batch_size=args.batch_size)
    seconds = time.monotonic() - started
    for item, tokens in zip(items, outputs):
        text = session.text(tokens)
        if args.inputs is None:
            print(text, file=out)
        else:
            print(json.dumps({"line": item.where, "prompt": item.prompt, "image": item.image, "output": text}),
                  file=out)
    generated = sum(len(t) for t in outputs)
    print(f"{generated} tokens for {len(items)} prompt(s) in {seconds:.2f} s ({generated / seconds:.1f} tokens/s, "
          f"compilation included) on {jax.devices()[0].device_kind}", file=sys.stderr)
    return 0
