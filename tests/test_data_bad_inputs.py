"""Each bad input of the issue gets a clear error naming the file, line or sample id; with
on_bad_sample=skip it is counted and logged, and nothing else is dropped."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_helpers import tiny_model
from neva.data import DataConfig, NevaDataset
from neva.data.collate import collate
from neva.data.loader import Loader
from neva.data.synthetic_video import encode_mp4
from neva.data.tokenize import BadSample

GOOD = {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                        {"from": "gpt", "value": "red"}]}


def rec(id, **kw):
    return {**GOOD, "id": id, **kw}


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    clip = np.zeros((5, 32, 32, 3), np.uint8)
    clip[:, 8:16, 8:16] = 200
    (tmp_path / "v.mp4").write_bytes(encode_mp4(clip))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 this is not a video" * 10)
    return tmp_path


def write(folder, rows, name="d.jsonl"):
    p = folder / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def dataset(path, **kw):
    cfg = DataConfig(data_path=str(path), eval_path=None, num_workers=0, batch_size=1, **kw)
    return NevaDataset(cfg, tiny_model())


BAD_RECORDS = [
    ('{"id": "broken", "conversations": [', r"d.jsonl:2: malformed JSON line"),
    (rec("noreply", conversations=[{"from": "human", "value": "<image>\nWhat?"}]),
     r"sample 'noreply' \(d.jsonl:2\).*no assistant \(gpt\) turn"),
    (rec("moretags", conversations=[{"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "x"}]),
     r"sample 'moretags' \(d.jsonl:2\): 2 <image> tags but 1 entries in 'image' \(more tags than images\)"),
    (rec("fewertags", image=["a.png", "a.png"]), r"sample 'fewertags'.*1 <image> tags but 2 entries.*fewer tags"),
    (rec("missing", image="nope.png"), r"sample 'missing' \(d.jsonl:2\): image file .*nope.png does not exist"),
    (rec("badrole", conversations=[{"from": "bot", "value": "<image>"}, {"from": "gpt", "value": "x"}]),
     r"sample 'badrole'.*turn 0 is from 'bot'"),
    ({"id": "vidmissing", "video": "gone.mp4", "conversations": [{"from": "human", "value": "<video>\nq"},
                                                                 {"from": "gpt", "value": "a"}]},
     r"sample 'vidmissing'.*video .*gone.mp4 does not exist"),
]


@pytest.mark.parametrize("row,message", BAD_RECORDS, ids=[m.split(":")[0][:20] for _, m in BAD_RECORDS])
def test_bad_record_errors_name_it_and_skip_counts_it(folder, row, message, caplog):
    path = write(folder, [GOOD, row, rec("ok2")])
    with pytest.raises(BadSample, match=message):
        dataset(path)
    with caplog.at_level(logging.WARNING, logger="neva.data"):
        ds = dataset(path, on_bad_sample="skip")
    assert [r.id for r in ds.records] == ["ok", "ok2"]          # only the bad one is gone
    assert len(ds.stats.skipped) == 1 and "1 skipped" in ds.stats.summary()
    assert any("skipping" in r.message for r in caplog.records)


def test_a_json_list_names_the_index(folder):
    p = folder / "d.json"
    p.write_text(json.dumps([GOOD, rec("noreply", conversations=[{"from": "human", "value": "<image>"}])]))
    with pytest.raises(BadSample, match=r"sample 'noreply' \(d.json\[1\]\)"):
        dataset(p)
    p.write_text("[{]")
    with pytest.raises(BadSample, match=r"d.json: not valid JSON at line 1"):
        dataset(p)


def test_unknown_template_and_bad_config_values():
    with pytest.raises(ValueError, match=r"data.template='vicuna' is not a known template"):
        DataConfig(template="vicuna").validate()
    with pytest.raises(ValueError, match=r"data.on_bad_sample='ignore'"):
        DataConfig(on_bad_sample="ignore").validate()
    with pytest.raises(ValueError, match=r"data.image_mode='crop'"):
        DataConfig(image_mode="crop").validate()


def _media_sample(media: dict) -> dict:
    tag = "<video>" if "video" in media else "<image>"
    return {"id": "m", **media, "conversations": [{"from": "human", "value": tag + "\nq"}, {"from": "gpt", "value": "a"}]}


@pytest.mark.parametrize("media,message", [
    ({"image": "corrupt.png"}, r"sample 'm'.*image file .*corrupt.png is not an image PIL can read"),
    ({"video": "empty.mp4"}, r"sample 'm'.*video .*empty.mp4 is empty \(0 bytes\)"),
    ({"video": "junk.mp4"}, r"sample 'm'.*video .*junk.mp4 does not start like an MP4/QuickTime file"),
])
def test_media_with_a_bad_header_are_found_at_start(folder, media, message):
    """Headers and sizes are cheap to read: the scan finds these before training, naming the file and
    the sample; with skip only that sample goes."""
    path = write(folder, [GOOD, _media_sample(media)])
    with pytest.raises(BadSample, match=message):
        dataset(path)
    assert [r.id for r in dataset(path, on_bad_sample="skip", max_skip_fraction=0.5).records] == ["ok"]


@pytest.mark.parametrize("media,message", [
    ({"image": "cut.png"}, r"sample 'm'.*image file .*cut.png cannot be decoded"),
    ({"video": "cut.mp4"}, r"sample 'm'.*video .*cut.mp4 (cannot be decoded|failed to decode)"),
])
def test_media_that_fail_to_decode(folder, media, message, caplog):
    """A body cut short passes the header check and is found by the worker that decodes it: error
    names the file and sample; skip drops only it, logged once."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "cut.png")
    for name in ("v.mp4", "cut.png"):
        data = (folder / name).read_bytes()
        (folder / f"cut{Path(name).suffix}").write_bytes(data[:len(data) // 2])
    path = write(folder, [GOOD, _media_sample(media)])
    ds = dataset(path)                        # the scan reads headers only
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ds[1]
    ds = dataset(path, on_bad_sample="skip")
    loader = Loader(ds, ds.cfg)
    with caplog.at_level(logging.WARNING, logger="neva.data"):
        batch = collate([[ds[0]], [ds[1]]], packed=False)
        assert batch["input_ids"].shape[0] == 1 and batch["_stats"]["skipped"][0].startswith("sample 'm'")
        it = iter(loader)
        got = [next(it)["input_ids"].shape[0] for _ in range(3)]
    assert got == [1, 1, 1] and loader.stats["skipped"] >= 1 and loader.stats["samples"] >= 3
    assert sum("skipped sample 'm'" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("num_frames,splice,frames", [(3, None, 3), (8, None, 8), (-1, None, 5), (4, "last", 1)])
def test_a_video_sample_has_its_frames_times_tokens_per_image(folder, num_frames, splice, frames):
    """The 5-frame clip: linspace, padded to 8 by repeating, all frames (-1), or one spliced frame."""
    v = {"id": "v", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nq"},
                                                        {"from": "gpt", "value": "a"}]}
    ds = dataset(write(folder, [v]), num_frames=num_frames, splice_single_frame=splice)
    s = ds[0]
    assert s.pixel_values.shape == (frames, 3, 32, 32) and int((s.input_ids == 32000).sum()) == frames * 16
