"""Long video: LLaVA-Video's fps sampling with a max_frames cap, frame timestamps in the prompt, a
video given as frame images (a folder, in a folder or a tar, or a list), and frames average-pooled
after the projector (fewer tokens per frame than per image, in one batch); HF export refuses pooling."""
import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_helpers import tiny_model
from neva import model
from neva.batch import media_per_row, split
from neva.config import ModelConfig, ProjectorConfig, tiny_llm, tiny_vision
from neva.data import DataConfig, NevaDataset
from neva.data.collate import collate
from neva.data.records import parse
from neva.data.synthetic_video import encode_mp4
from neva.data.video import FrameChoice, VideoSource, fps_indices
from neva.hf.translate import llava_json
from neva.projector import pool_frames


def grey(k: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), 30 * k, np.uint8)


def test_fps_sampling_follows_llava_video():
    assert fps_indices(80, 8.0, 1.0, 32) == list(range(0, 80, 8))          # 10 s at 8 fps, 1 fps: every 8th
    assert fps_indices(80, 8.0, 2.0, 32) == list(range(0, 80, 4))
    assert fps_indices(80, 8.0, 1.0, 4) == [0, 26, 52, 79]                # over the cap: uniform over all of it
    assert fps_indices(5, 30.0, 1.0, 8) == [0]                              # shorter than a second
    assert FrameChoice(fps=1.0).fixed is None and FrameChoice(num_frames=4).fixed == 4


def _frames_everywhere(tmp_path, n=6):
    """The same n grey frames as an mp4 (8 fps), a folder of PNGs, and the folder inside a tar."""
    (tmp_path / "v.mp4").write_bytes(encode_mp4(np.stack([grey(k) for k in range(n)]), fps=8))
    (tmp_path / "clip").mkdir()
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for k in range(n):
            Image.fromarray(grey(k)).save(tmp_path / "clip" / f"{k:03d}.png")
            data = (tmp_path / "clip" / f"{k:03d}.png").read_bytes()
            info = tarfile.TarInfo(f"clip/{k:03d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_video_as_frame_images_folder_tar_or_list(tmp_path):
    _frames_everywhere(tmp_path)
    folder, tar = VideoSource(tmp_path), VideoSource(tmp_path / "v.tar")
    choice = FrameChoice(fps=1.0, folder_fps=2.0)                           # frames 2 a second: every 2nd
    got, times = folder.sample("clip", choice)
    assert times == [0.0, 1.0, 2.0] and np.allclose(got.reshape(3, -1).mean(1), [0, 60, 120])
    got_tar, _ = tar.sample("clip", choice)
    assert np.array_equal(got, got_tar)
    listed, _ = folder.sample(tuple(f"clip/{k:03d}.png" for k in (5, 1)), FrameChoice(num_frames=2))
    assert np.allclose(listed.reshape(2, -1).mean(1), [150, 30])            # a list keeps its order
    assert folder.n_frames("clip") == tar.n_frames("clip") == 6 and tar.exists("clip") and not tar.exists("nope")
    vid, vt = folder.sample("v.mp4", FrameChoice(fps=2.0))                   # 8 fps file at 2 fps: 0 and 4
    assert vt == [0.0, 0.5] and np.allclose(vid.reshape(2, -1).mean(1), [0, 120], atol=4)
    with pytest.raises(FileNotFoundError, match="sample 's'.*nope.mp4 does not exist"):
        folder.sample("nope.mp4", choice, "sample 's'")


def test_records_take_frame_lists():
    conv = [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]
    flat = parse({"id": "a", "video": ["f/0.jpg", "f/1.jpg"], "conversations": conv}, "x")
    nested = parse({"id": "b", "video": [["f/0.jpg", "f/1.jpg"]], "conversations": conv}, "x")
    assert flat.videos == nested.videos == (("f/0.jpg", "f/1.jpg"),)
    assert parse({"id": "c", "video": "f", "conversations": conv}, "x").videos == ("f",)
    with pytest.raises(ValueError, match="'video' must be a path"):
        parse({"id": "d", "video": [3], "conversations": conv}, "x")


def _pooled_model() -> ModelConfig:
    return replace(tiny_model(), projector=ProjectorConfig("mlp2x_gelu", frame_pool=2))


def test_fps_timestamps_and_pooled_frames_end_to_end(tmp_path):
    """fps=1 over a 6-frame folder at 2 fps -> 3 frames; the prompt names their times; each frame is
    tokens_per_frame (4) tokens, the image 16; the batch marks which media are frames."""
    _frames_everywhere(tmp_path)
    Image.fromarray(grey(7)).save(tmp_path / "a.png")
    rows = [{"id": "v", "video": "clip", "conversations": [{"from": "human", "value": "<video>\nWhen?"},
                                                           {"from": "gpt", "value": "soon"}]},
            {"id": "i", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                            {"from": "gpt", "value": "grey"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _pooled_model()
    assert (cfg.tokens_per_image, cfg.tokens_per_frame) == (16, 4)
    data = DataConfig(data_path=str(tmp_path / "d.jsonl"), eval_path=None, num_workers=0, fps=1.0, max_frames=8,
                      frame_timestamps=True, frame_folder_fps=2.0)
    ds = NevaDataset(data, cfg)
    v, i = ds[0], ds[1]
    text = ds.tok.decode([t for t in v.input_ids.tolist() if t != cfg.image_token_id])
    assert "sampled at 0.0s, 1.0s, 2.0s" in text
    assert int((v.input_ids == cfg.image_token_id).sum()) == 3 * 4 and v.video_frames.tolist() == [True] * 3
    assert int((i.input_ids == cfg.image_token_id).sum()) == 16 and i.video_frames.tolist() == [False]
    batch = {k: b for k, b in collate([[v], [i]], packed=False).items() if k != "_stats"}
    assert batch["video_frames"].tolist() == [True, True, True, False] and media_per_row(batch, cfg) == [3, 1]
    halves = split(batch, cfg, 2)
    assert [h["pixel_values"].shape[0] for h in halves] == [3, 1] and halves[1]["video_frames"].tolist() == [False]
    params = model.init_params(cfg)
    assert torch.isfinite(model.loss(params, cfg, batch))
    with pytest.raises(ValueError, match="do not add up to whole media"):
        model.loss(params, cfg, {**batch, "video_frames": torch.zeros(4, dtype=torch.bool)})


def test_pooling_is_average_pooling_per_frame_in_media_order():
    cfg = ModelConfig(vision=tiny_vision(image_size=40, patch_size=8), projector=ProjectorConfig("linear", frame_pool=2),
                      llm=tiny_llm("llama3"), image_token_id=255)               # a 5x5 grid: 3x3 pooled
    assert (cfg.tokens_per_image, cfg.tokens_per_frame) == (25, 9)
    x = torch.randn(2, 25, 6)
    got = pool_frames(x, 2)
    grid = x.transpose(1, 2).reshape(2, 6, 5, 5)
    assert torch.allclose(got[:, 0], grid[:, :, :2, :2].mean((2, 3)), atol=1e-6)
    assert torch.allclose(got[:, 8], grid[:, :, 4, 4], atol=1e-6)           # the odd corner pools alone
    assert torch.allclose(pool_frames(x[:, :16], 2), F.avg_pool2d(x[:, :16].transpose(1, 2).reshape(2, 6, 4, 4), 2)
                          .flatten(2).transpose(1, 2), atol=1e-6)
    params = model.init_params(cfg)
    pix = torch.randn(3, 3, 40, 40)
    flags = torch.tensor([True, False, True])
    emb = model.encode_images(params, cfg, pix)
    want = torch.cat([pool_frames(emb[:1], 2)[0], emb[1], pool_frames(emb[2:], 2)[0]])
    assert torch.equal(model.media_tokens(params, cfg, pix, flags), want)


def test_hf_export_refuses_pooled_frames():
    with pytest.raises(ValueError, match="frame_pool=2.*no frame pooling"):
        llava_json(_pooled_model(), "float32")
