"""Video records through the pipeline: a third microbatch type holding only video rows, both
spans in every row, the counts in stats and inspect-data, bad videos named or counted, and the
settings that must agree with the model."""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import image_record, text_record, write_json, write_jsonl, write_png
from PIL import Image

from jaxllava.data.batch import IGNORE, ImageBatch, TextBatch, VideoBatch, batch_arrays
from jaxllava.data.config import DataConfig, SourceConfig, VideoFramesConfig
from jaxllava.data.inspect import batch_line, dataset_report
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.tokenizer import VIDEO_PLACEHOLDER_TOKENS
from jaxllava.errors import DataError

N = 6  # image tokens
SPANS = (6, 8)  # fast, slow
FRAMES = 3
SENTENCES = ["the dog runs .", "these dogs run .", "a cat sees the dog .", "the big cat runs ."]


def write_frames(folder, count=5, colour=(200, 30, 30)):
    """A frame folder: a square moving right over `count` frames."""
    os.makedirs(folder, exist_ok=True)
    for t in range(count):
        frame = Image.new("RGB", (16, 16), (255, 255, 255))
        frame.paste(colour, (2 * t, 4, 2 * t + 6, 10))
        frame.save(os.path.join(folder, f"frame_{t:02d}.png"))
    return str(folder)


def video_record(i, video, caption="a dog runs", prompt="<video>"):
    return {"id": f"v{i}", "video": video,
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_pipe")
    texts = [text_record(i, SENTENCES[i % len(SENTENCES)]) for i in range(17)]
    images = []
    for i in range(5):
        write_png(str(root / "img" / f"{i}.png"), size=(10, 8))
        images.append(image_record(i, f"img/{i}.png", "a red cat"))
    videos = []
    for i in range(7):
        write_frames(root / "clips" / f"{i}", colour=(30, 30, 200 - 10 * i))
        videos.append(video_record(i, f"clips/{i}", ["a dog runs", "the big cat runs ."][i % 2]))
    return (write_jsonl(root / "text.jsonl", texts), write_json(root / "images.json", images),
            write_json(root / "videos.json", videos))


def pipeline(files, tok_dir, *, video_frames=FRAMES, spans=SPANS, **overrides):
    text, images, videos = files
    settings = dict(sources=(SourceConfig(text), SourceConfig(images), SourceConfig(videos)), tokenizer=tok_dir,
                    buckets=(16, 32), text_rows=4, image_rows=2, video_rows=2, epochs=2,
                    video=VideoFramesConfig(num_frames=FRAMES))
    cfg = DataConfig(**{**settings, **overrides})
    return DataPipeline(cfg, image_tokens=N, image_size=8, video_spans=spans, video_frames=video_frames)


def all_batches(p):
    it = p.iterator(num_workers=0)
    try:
        return [next(it) for _ in range(len(p))]
    finally:
        it.close()


def test_a_video_microbatch_holds_only_video_rows_with_both_spans(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    ids = p.ids
    start, patch, end, slow_start, slow_end = ids.video
    expected = [start] + [patch] * (SPANS[0] - 2) + [end] + [slow_start] + [patch] * (SPANS[1] - 2) + [slow_end]
    batches = all_batches(p)
    assert {type(b) for b in batches} == {TextBatch, ImageBatch, VideoBatch}
    videos = [b for b in batches if isinstance(b, VideoBatch)]
    assert len(videos) == 2 * 4  # 7 videos, 2 rows each: 4 microbatches an epoch
    video_ids = list(ids.video)
    for b in videos:
        assert b.frames.shape == (2, FRAMES, 8, 8, 3) and b.stats.modality == "video"
        assert set(batch_arrays(b)) == {"input_ids", "targets", "segment_ids", "positions", "frames", "video_mask",
                                        "video_rows"}
        assert b.stats.video_tokens == sum(SPANS) * int(b.video_rows.sum()) and b.stats.image_tokens == 0
        for r in range(2):
            if not b.video_rows[r]:
                assert not b.video_mask[r].any() and not b.frames[r].any() and (b.segment_ids[r] == 0).all()
                continue
            assert b.segment_ids[r].max() == 1  # one video per row, never packed
            np.testing.assert_array_equal(b.input_ids[r, b.video_mask[r]], expected)
            # the span is never a target; its last position predicts the first word of the text
            assert (b.targets[r, b.video_mask[r]][:-1] == IGNORE).all()
            assert not np.isin(b.targets[r], video_ids + [ids.im_start, ids.im_patch, ids.im_end]).any()
            assert np.abs(b.frames[r]).sum() > 0
    for b in batches:
        if not isinstance(b, VideoBatch):
            assert not np.isin(b.input_ids, video_ids).any() and "frames" not in batch_arrays(b)


def test_stats_plans_and_inspect_count_video_samples_and_tokens(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    summary = p.summary
    assert (summary.text_samples, summary.image_samples, summary.video_samples) == (17, 5, 7)
    first_epoch = p.plans.epoch_stats(0, target_counts=p.builder.target_counts, image_tokens=N,
                                      video_tokens=sum(SPANS))
    assert first_epoch == [p.builder.stats(p.plans[j]) for j in range(len(first_epoch))]
    assert sum(s.samples for s in first_epoch if s.modality == "video") == 7
    assert sum(s.video_tokens for s in first_epoch) == 7 * sum(SPANS)
    report = dataset_report(p)
    assert report["video_samples"] == 7 and report["video_tokens_per_video"] == {"fast": 6, "slow": 8}
    assert "video" in report["token_length_percentiles"]
    video = next(b for b in all_batches(p) if isinstance(b, VideoBatch))
    line = batch_line(video)
    assert line["modality"] == "video" and line["has_frames"] and line["frames_shape"] == [FRAMES, 8, 8, 3]
    assert line["video_tokens"] == sum(SPANS) * int(video.video_rows.sum())
    assert all(span[1] - span[0] == sum(SPANS) for span in line["video_token_positions"] if span)


def test_without_videos_the_plans_are_the_two_modality_ones(files, word_tokenizer_dir):
    text, images, _ = files
    cfg = dict(sources=(SourceConfig(text), SourceConfig(images)), tokenizer=word_tokenizer_dir, buckets=(16, 32),
               text_rows=4, image_rows=2, epochs=2)
    plain = DataPipeline(DataConfig(**cfg), image_tokens=N, image_size=8)
    with_video_model = DataPipeline(DataConfig(**cfg, video=VideoFramesConfig(num_frames=FRAMES)), image_tokens=N,
                                    image_size=8, video_spans=SPANS, video_frames=FRAMES)
    assert list(plain.plans) == list(with_video_model.plans)
    assert plain.summary.fingerprint != with_video_model.summary.fingerprint  # the spans decide the batches


def test_video_records_need_a_model_that_reads_video(files, word_tokenizer_dir):
    with pytest.raises(DataError, match="video records need a model that reads video"):
        pipeline(files, word_tokenizer_dir, spans=(0, 0), video_frames=0)
    as_text = pipeline(files, word_tokenizer_dir, spans=(0, 0), video_frames=0, use_images=False)
    assert as_text.summary.video_samples == 0 and as_text.summary.text_samples == 17 + 5 + 7


def test_the_frame_rule_must_give_the_models_frame_count(files, word_tokenizer_dir):
    with pytest.raises(DataError, match=r"data.video keeps 3 frames .* model.video.frames is 4"):
        pipeline(files, word_tokenizer_dir, video_frames=4)
    upbound = pipeline(files, word_tokenizer_dir, video_frames=2,
                       video=VideoFramesConfig(num_frames=FRAMES, frames_upbound=2))
    video = next(b for b in all_batches(upbound) if isinstance(b, VideoBatch))
    assert video.frames.shape[1] == 2


@pytest.fixture()
def bad_files(tmp_path, files):
    """The module's files plus a video source holding a corrupt .mp4 and a good frame folder."""
    write_frames(tmp_path / "clips" / "good")
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    path = write_json(tmp_path / "bad_videos.json", [video_record(90, "clips/good"),
                                                     video_record(91, "clips/broken.mp4")])
    return files[0], files[1], path


def test_an_undecodable_video_is_a_named_error_when_its_batch_is_made(bad_files, word_tokenizer_dir):
    p = pipeline(bad_files, word_tokenizer_dir, video_rows=1)
    with pytest.raises(DataError) as caught:
        all_batches(p)
    error = caught.value
    assert (error.reason, error.field, error.record_id) == ("corrupt_video", "video", "v91")
    assert error.file.endswith("broken.mp4") and "bad_videos.json record 1" in str(error)


@pytest.mark.parametrize("how", [{"on_bad_record": "skip"}, {"check_images": True}])
def test_an_undecodable_video_is_skipped_and_counted_or_stops_the_run_at_start(bad_files, word_tokenizer_dir, how):
    if "check_images" in how:
        with pytest.raises(DataError, match="undecodable video"):
            pipeline(bad_files, word_tokenizer_dir, **how)
        return
    p = pipeline(bad_files, word_tokenizer_dir, **how)
    assert p.summary.skips.counts == {"corrupt_video": 1}
    assert p.summary.video_samples == 1 and p.table.ids.count("v91") == 0
    assert sum(isinstance(b, VideoBatch) for b in all_batches(p)) == 2  # one row a microbatch, two epochs


def test_a_missing_video_is_refused_when_records_are_read(tmp_path, files, word_tokenizer_dir):
    path = write_json(tmp_path / "missing.json", [video_record(5, "clips/absent.mp4")])
    with pytest.raises(DataError) as caught:
        pipeline((files[0], files[1], path), word_tokenizer_dir)
    assert (caught.value.reason, caught.value.field, caught.value.record_id) == ("missing_video", "video", "v5")


def test_video_placeholders_are_added_to_the_tokenizer_only_for_a_video_model(files, word_tokenizer_dir):
    with_video = pipeline(files, word_tokenizer_dir)
    vocab = with_video.tokenizer.get_vocab()
    assert all(token in vocab for token in VIDEO_PLACEHOLDER_TOKENS)
    text, images, _ = files
    plain = DataPipeline(DataConfig(sources=(SourceConfig(text),), tokenizer=word_tokenizer_dir, buckets=(16, 32)),
                         image_tokens=N, image_size=8)
    assert plain.ids.video is None and not any(t in plain.tokenizer.get_vocab() for t in VIDEO_PLACEHOLDER_TOKENS)


def test_a_table_cache_entry_keeps_the_video_samples(files, word_tokenizer_dir, tmp_path):
    first = pipeline(files, word_tokenizer_dir, table_cache=str(tmp_path / "tables"))
    second = pipeline(files, word_tokenizer_dir, table_cache=str(tmp_path / "tables"))
    assert list(second.table.videos) == list(first.table.videos) and any(v is not None for v in first.table.videos)
    np.testing.assert_array_equal(second.table.has_video, first.table.has_video)
    a = [b for b in all_batches(first) if isinstance(b, VideoBatch)]
    b = [b for b in all_batches(second) if isinstance(b, VideoBatch)]
    assert len(a) == len(b) and all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))


def test_loader_workers_decode_videos_into_the_same_batches(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir, epochs=1)
    inline = all_batches(p)
    it = p.iterator(num_workers=1)
    try:
        from_worker = [next(it) for _ in range(len(p))]
    finally:
        it.close()
    assert [type(b) for b in from_worker] == [type(b) for b in inline]
    for a, b in zip(inline, from_worker):
        assert a.stats == b.stats
        for name, value in batch_arrays(a).items():
            np.testing.assert_array_equal(batch_arrays(b)[name], value, err_msg=name)
