"""The synthetic task: deterministic, answers true to the pixels, balanced, one-word-ish answers; the
CLI and the inspect command work on it with the Mixtral tokenizer."""
import collections
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from data_helpers import synth_dir
from neva.data import inspect as inspect_cli
from neva.data import synthetic
from neva.data.shapes import BACKGROUND, COLOURS, QUADRANTS, render_scene, rng_for
from neva.data.synthetic import sample_scene
from neva.data.video import VideoSource


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_cli_is_deterministic_and_seeded(tmp_path):
    args = ["--train-images", "6", "--eval-images", "2", "--train-videos", "2", "--eval-videos", "1"]
    synthetic.main([str(tmp_path / "a"), *args])
    synthetic.main([str(tmp_path / "b"), *args])
    synthetic.main([str(tmp_path / "c"), *args, "--seed", "1"])
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "images", "train.jsonl", "captions.jsonl", "eval.jsonl", "video_train.jsonl", "video_eval.jsonl", "videos.tar"}


def quadrant_colour(img: np.ndarray, q: int) -> str | None:
    """The colour name of the shape in quadrant q, read from the pixels."""
    h = img.shape[0] // 2
    y, x = (h if q >= 2 else 0), (h if q % 2 else 0)
    block = img[y:y + h, x:x + h].reshape(-1, 3).astype(int)
    for name, rgb in COLOURS.items():
        if (np.abs(block - rgb).sum(1) == 0).sum() > 10:
            return name
    return None


def test_answers_are_true_to_the_pixels():
    d = synth_dir()
    for line in (d / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        img = np.asarray(Image.open(d / r["image"]))
        colours = [quadrant_colour(img, q) for q in range(4)]
        q = r["conversations"][0]["value"].split("\n", 1)[1]
        if r["qtype"] == "count":
            assert int(r["answer"]) == sum(c is not None for c in colours)
        if r["qtype"] == "colour" and "shape at the" in q:
            assert colours[QUADRANTS.index(q.split("shape at the ")[1].rstrip("?"))] == r["answer"]
        if r["qtype"] == "position":
            assert colours[QUADRANTS.index(r["answer"])] == q.split()[3]
        assert r["conversations"][1]["value"] == r["answer"] and len(r["answer"].split()) <= 2


def test_question_types_are_balanced():
    counts = collections.defaultdict(collections.Counter)
    for i in range(1500):
        rng = rng_for(0, "eval", i)
        shapes = sample_scene(rng)
        for qt in synthetic.QTYPES:
            counts[qt][synthetic.question(rng, shapes, qt)[1]] += 1
    for qt, c in counts.items():
        prior = max(c.values()) / sum(c.values())
        assert prior < {"yesno": 0.55, "shape": 0.38, "count": 0.38}.get(qt, 0.30), (qt, c)


def test_motion_clips_move_the_way_the_answer_says():
    d = synth_dir()
    vs = VideoSource(d / "videos.tar")
    for line in (d / "video_train.jsonl").read_text().splitlines():
        r = json.loads(line)
        f = vs.frames(r["video"], 6).astype(int)
        ys, xs = [], []
        for fr in (f[0], f[-1]):
            m = (np.abs(fr - BACKGROUND).sum(-1) > 60)
            yy, xx = np.nonzero(m)
            ys.append(yy.mean()), xs.append(xx.mean())
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == r["answer"] and max(abs(dx), abs(dy)) > 8


def test_scene_rendering_is_pure():
    a = render_scene(sample_scene(rng_for(3, "train", 5)))
    b = render_scene(sample_scene(rng_for(3, "train", 5)))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_inspect_shows_trained_tokens_and_media_spans(capsys):
    d = synth_dir()
    assert inspect_cli.main([str(d / "train.jsonl"), "--template", "mistral", "--tokenizer", "mixtral",
                             "--index", "1"]) == 0
    out = capsys.readouterr().out
    rec = json.loads((d / "train.jsonl").read_text().splitlines()[1])
    assert "<image x 16>" in out and "sample 'train_000001'" in out
    assert f"⟦▁{rec['conversations'][1]['value'].split()[0]}⟧" in out and "⟦</s>⟧" in out   # the reply's word-start trains
    assert inspect_cli.main([str(d / "video_train.jsonl"), "--template", "mistral", "--tokenizer", "mixtral",
                             "--num-frames", "4"]) == 0
    assert "<video x 4 frames x 16>" in capsys.readouterr().out
    assert inspect_cli.main([str(d / "train.jsonl"), "--template", "llama_3", "--tokenizer", "mixtral"]) == 2
    assert "needs '<|begin_of_text|>' to be one special token" in capsys.readouterr().err
    files = f"{d / 'train.jsonl'},{d / 'video_train.jsonl'}"
    assert inspect_cli.main([files, "--template", "mistral", "--video-folder", str(d / "videos.tar"), "--padding",
                             "--max-seq-len", "512", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    fracs = [float(x) for x in re.findall(r"([0-9.]+)% padding", out)]
    assert "padded to the longest" in out and len(fracs) == 3
    assert fracs[1] > fracs[0] and fracs[1] > fracs[2]      # a fixed 512 pads the most for these short samples


@pytest.mark.parametrize("template", ["mistral", "plain"])
def test_synthetic_files_load_with_the_main_job_template(template):
    from data_helpers import tiny_model
    from neva.data import DataConfig, NevaDataset

    d = synth_dir()
    files = f"{d / 'captions.jsonl'}" if template == "plain" else f"{d / 'train.jsonl'},{d / 'video_train.jsonl'}"
    ds = NevaDataset(DataConfig(data_path=files, template=template, video_folder=str(d / "videos.tar")), tiny_model())
    assert ds.stats.skipped == [] and len(ds) == (48 if template == "plain" else 54)
    s = ds[len(ds) - 1]
    assert s.pixel_values.shape[0] == (1 if template == "plain" else 4)


def test_generation_prompt_is_a_prefix_of_the_training_tokens():
    """What eval feeds the model is exactly what training saw before the first answer token."""
    from data_helpers import tiny_model
    from neva.data import DataConfig, NevaDataset

    d = synth_dir()
    ds = NevaDataset(DataConfig(data_path=f"{d / 'eval.jsonl'},{d / 'video_eval.jsonl'}",
                                video_folder=str(d / "videos.tar")), tiny_model())
    assert ds.stop_strings() == ["</s>"]
    for i in (0, 3, len(ds) - 1):
        ids, pix = ds.prompt(i)
        s = ds[i]
        first = int((s.labels != -100).nonzero()[0])
        assert ids.tolist() == s.input_ids[:first].tolist()
        assert pix.shape == s.pixel_values.shape and bool((pix == s.pixel_values).all())


def test_shapes_stay_inside_their_quadrant():
    for jitter in (1, None):
        for i in range(200):
            for s in sample_scene(rng_for(0, "train", i), jitter=jitter):
                x0, y0 = (16 if s.quadrant % 2 else 0), (16 if s.quadrant >= 2 else 0)
                assert x0 < s.x and s.x + s.size < x0 + 16 and y0 < s.y and s.y + s.size < y0 + 16
