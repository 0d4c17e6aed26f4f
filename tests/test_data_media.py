"""Pixels equal transformers' CLIP / SigLIP image processors (square, pad, keep) within 1e-5; video
frames are sampled as NeMo's VideoNeVA loader does, from a folder or a tar indexed once."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from neva.data.images import ImageSpec, expand_to_square, process
from neva.data.synthetic_video import encode_mp4
from neva.data.video import VideoSource, frame_indices

SIZES = [(40, 57), (57, 40), (32, 32), (90, 31), (20, 25)]   # (h, w): wide, tall, square, extreme, upsampled


def hf_processor(kind: str, size: int):
    if kind == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size})


def images():
    rs = np.random.RandomState(0)
    return [Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["square", "pad", "keep"])
def test_pixels_match_the_hf_image_processor(kind, mode):
    hf = hf_processor(kind, 32)
    for img in images():
        ours = process(img, ImageSpec(kind, 32, mode))
        if mode == "square":
            ref = hf(img, return_tensors="pt")["pixel_values"][0]
        elif mode == "pad":   # NeMo / LLaVA-1.5: expand2square with the mean colour, then the processor
            ref = hf(expand_to_square(img, tuple(int(m * 255) for m in hf.image_mean)), return_tensors="pt")
            ref = ref["pixel_values"][0]
        else:                 # NeMo's keep: shortest edge to min(max_len / aspect, min_len), no crop
            w, h = img.size
            short = int(min(64 / (max(w, h) / min(w, h)), 32))
            ref = hf(img, do_center_crop=False, size={"shortest_edge": short}, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == ref.shape, (img.size, mode)
        assert (ours - ref).abs().max().item() < 1e-5, (img.size, mode)


def test_pad_fills_with_the_mean_colour_centred():
    img = Image.new("RGB", (10, 4), (255, 0, 0))
    sq = np.asarray(expand_to_square(img, (1, 2, 3)))
    assert sq.shape == (10, 10, 3)
    assert (sq[3:7] == (255, 0, 0)).all() and (sq[:3] == (1, 2, 3)).all() and (sq[7:] == (1, 2, 3)).all()


def test_frame_indices_follow_videoneva():
    assert frame_indices(10, 4) == [0, 3, 6, 9]                  # linspace(0, 9, 4) as int
    assert frame_indices(3, 5) == [0, 1, 2, 2, 2]                # shorter video: repeat the last frame
    assert frame_indices(5, -1) == [0, 1, 2, 3, 4]               # -1: all frames
    assert [frame_indices(9, 4, s) for s in ("first", "middle", "last")] == [[0], [4], [8]]
    with pytest.raises(ValueError, match="no frames"):
        frame_indices(0, 4)


def clip(n=7):
    """Frame k is a flat grey of 30 * k: the decoded frame's mean tells which frame it is."""
    return np.stack([np.full((32, 32, 3), 30 * k, np.uint8) for k in range(n)])


def test_folder_and_tar_give_the_same_frames_and_the_tar_is_indexed_once(tmp_path, monkeypatch):
    data = encode_mp4(clip())
    (tmp_path / "c.mp4").write_bytes(data)
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for name in ("a/c.mp4", "b.mp4"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder, tar = VideoSource(tmp_path), VideoSource(tmp_path / "v.tar")
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("the tar was rescanned"))
    f1 = folder.frames("c.mp4", 4)
    f2 = tar.frames("a/c.mp4", 4)
    assert f1.shape == (4, 32, 32, 3) and np.array_equal(f1, f2)
    means = f1.reshape(4, -1).mean(1)
    assert np.allclose(means, [0, 60, 120, 180], atol=4)          # frames 0, 2, 4, 6 of 7
    padded = tar.frames("b.mp4", 9)                               # 7 frames -> all 7, then the last repeated
    assert padded.shape[0] == 9 and np.array_equal(padded[7], padded[6]) and np.array_equal(padded[8], padded[6])
    assert tar.frames("b.mp4", 4, "middle").reshape(-1).mean() == pytest.approx(90, abs=4)
    assert tar.n_frames("b.mp4") == 7
    with pytest.raises(FileNotFoundError, match=r"sample 's'.*v.tar:nope.mp4 does not exist"):
        tar.reader("nope.mp4", "sample 's'")
