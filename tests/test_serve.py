"""``python -m neva.serve`` on a free localhost port, talked to with the real ``openai`` client: an
image question answered as our own generate answers it, streaming, 8 concurrent clients batched, video,
every kind of bad request (a 4xx naming the problem), and a good request after them."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_helpers import synth_dir, tiny_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parents[1]


def png_url(colour=(255, 0, 0), size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text: str, *images: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                                         {"type": "text", "text": text}]}]


def launch(model: Path, root: Path, *launcher_and_overrides: str, torchrun: int = 0):
    """Start ``python -m neva.serve model`` (under torchrun with ``torchrun`` processes) on a free
    port -> (process, base url) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
            if torchrun else [sys.executable])
    cmd = head + ["-m", "neva.serve", str(model), "--port", str(port), "--dtype", "float32",
                  "--allowed-local-media-path", str(root), "--max-media-per-prompt", "4", "--threads", "1",
                  *launcher_and_overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1500):
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("the server did not answer /health in 5 minutes")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, model folder, media folder) of a server on a tiny exported model (float32)."""
    import neva
    import neva.hf
    from neva.data.config import DataConfig
    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_model("mixtral")
    neva.hf.save(neva.init_params(cfg, seed=0), cfg, str(root / "tiny"), data=DataConfig(template="mistral", num_frames=3))
    Image.new("RGB", (50, 20), (0, 0, 255)).save(root / "blue.png")
    proc, url = launch(root / "tiny", root)
    yield url, root / "tiny", root
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def ours(folder: Path, messages_text: str, image: Image.Image | None, max_new: int) -> tuple[str, int]:
    """Our own greedy answer and prompt length, through the data pipeline and neva.generate."""
    import neva.hf
    from neva.data import images as imaging
    from neva.data import templates, tokenizers
    from neva.data.config import DataConfig
    from neva.generate import Sampling, generate
    from neva.hf import folder as serving
    cfg, params = neva.hf.load(str(folder))
    tok = tokenizers.load(str(folder))
    ids = serving.ours_ids(cfg, tok, DataConfig(template="mistral"), [templates.Turn("user", messages_text)], None)
    px = imaging.process(image, imaging.spec_for(cfg.vision))[None] if image is not None else None
    res = generate(params, cfg, [ids], px, Sampling(max_new_tokens=max_new))
    return tok.decode(res["tokens"][0], skip_special_tokens=True), len(ids)


def test_image_question_is_answered_as_our_generate_answers(server, client):
    url, folder, root = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=ask("What colour is it?", png_url()), max_tokens=6,
                                       temperature=0)
    want, n = ours(folder, "<image>\nWhat colour is it?", Image.open(io.BytesIO(base64.b64decode(png_url()[22:]))), 6)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == n and r.usage.total_tokens == n + r.usage.completion_tokens
    local = client.chat.completions.create(model="tiny", messages=ask("What colour is it?", str(root / "blue.png")),
                                           max_tokens=6, temperature=0)
    assert local.choices[0].message.content == ours(folder, "<image>\nWhat colour is it?",
                                                    Image.open(root / "blue.png"), 6)[0]


def test_streaming_gives_the_same_text_in_pieces(client):
    kw = dict(model="tiny", messages=ask("Describe it.", png_url((0, 255, 0))), max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1        # not one lump
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_eight_concurrent_clients_are_batched_and_answered_as_alone(server, client):
    qs = [(f"Question {i}?", png_url((30 * i, 0, 255 - 30 * i))) for i in range(8)]
    alone = [client.chat.completions.create(model="tiny", messages=ask(q, u), max_tokens=5, temperature=0)
             .choices[0].message.content for q, u in qs]
    before = httpx.get(server[0] + "/health").json()["batches"]
    with ThreadPoolExecutor(9) as ex:
        busy = ex.submit(client.chat.completions.create, model="tiny", messages=ask("Long?"), max_tokens=300,
                         temperature=0, stop=["never-seen-stop"])      # the worker decodes while the 8 queue
        time.sleep(0.5)
        got = list(ex.map(lambda qu: client.chat.completions.create(model="tiny", messages=ask(*qu), max_tokens=5,
                                                                     temperature=0).choices[0].message.content, qs))
        busy.result()
    assert got == alone
    assert httpx.get(server[0] + "/health").json()["batches"] - before < 9               # some shared a batch


def test_video_url(server, client):
    d = synth_dir()
    with tarfile.open(d / "videos.tar") as tf:
        m = next(x for x in tf.getmembers() if x.name.endswith(".mp4"))
        data = tf.extractfile(m).read()
    msg = [{"role": "user", "content": [{"type": "video_url",
                                         "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}},
                                        {"type": "text", "text": "Which way?"}]}]
    r = client.chat.completions.create(model="tiny", messages=msg, max_tokens=3, temperature=0)
    import neva.hf
    from neva.data import templates, tokenizers
    from neva.data.config import DataConfig
    from neva.hf import folder as serving
    cfg = neva.hf.load(str(server[1]))[0]
    ids = serving.ours_ids(cfg, tokenizers.load(str(server[1])), DataConfig(template="mistral", num_frames=3),
                           [templates.Turn("user", "<video>\nWhich way?")], None)
    assert r.usage.prompt_tokens == len(ids) and ids.count(cfg.image_token_id) == 3 * cfg.tokens_per_image


BAD = {
    "malformed JSON": (dict(content=b'{"model": "tiny", "messages": [}', headers={"content-type": "application/json"}),
                       400, "not valid JSON"),
    "wrong content type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "application/json"),
    "unknown model": (dict(json={"model": "gpt-9", "messages": ask("Hi")}), 404, "`gpt-9` does not exist"),
    "bad base64": (dict(json={"model": "tiny", "messages": ask("Hi", "data:image/png;base64,@@@")}), 400, "bad base64"),
    "unreadable image": (dict(json={"model": "tiny", "messages": ask("Hi", "data:image/png;base64,"
                                                                    + base64.b64encode(b"not a png").decode())}),
                         400, "not an image"),
    "too many images": (dict(json={"model": "tiny", "messages": ask("Hi", *[png_url()] * 5)}), 400, "at most 4"),
    "too long prompt": (dict(json={"model": "tiny", "messages": ask("word " * 600)}), 400, "takes at most 511"),
    "a tag without its image": (dict(json={"model": "tiny", "messages": ask("<image> Hi")}), 400, "1 media tags"),
    "n > 1": (dict(json={"model": "tiny", "messages": ask("Hi"), "n": 2}), 400, "n must be 1"),
    "a network URL": (dict(json={"model": "tiny", "messages": ask("Hi", "https://x.org/a.png")}), 400, "fetches nothing"),
    "a path outside": (dict(json={"model": "tiny", "messages": ask("Hi", "/etc/hostname")}), 400, "outside"),
    "bad temperature": (dict(json={"model": "tiny", "messages": ask("Hi"), "temperature": "hot"}), 400, "temperature"),
    "no messages": (dict(json={"model": "tiny"}), 400, "messages must be a non-empty list"),
}


def test_bad_requests_get_4xx_naming_the_problem_and_the_server_goes_on(server, client):
    url = server[0] + "/v1/chat/completions"
    for what, (kw, status, words) in BAD.items():
        r = httpx.post(url, timeout=60, **kw)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"], (what, err)
    with pytest.raises(openai.NotFoundError, match="does not exist"):           # as the openai client sees one
        client.chat.completions.create(model="other", messages=ask("Hi"))
    r = client.chat.completions.create(model="tiny", messages=ask("What colour?", png_url()), max_tokens=3,
                                       temperature=0)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1


def test_sampling_fields_and_seed(client):
    kw = dict(model="tiny", messages=ask("Hi"), max_tokens=6, temperature=1.5, top_p=0.9, seed=7,
              extra_body={"top_k": 50})
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b                                                            # a client seed reproduces
    stop = client.chat.completions.create(model="tiny", messages=ask("Hi"), max_tokens=6, temperature=0)
    first = stop.choices[0].message.content
    cut = client.chat.completions.create(model="tiny", messages=ask("Hi"), max_tokens=6, temperature=0,
                                         stop=[first[2:4]])
    assert cut.choices[0].message.content == first[:first.index(first[2:4])] and cut.choices[0].finish_reason == "stop"


def test_float16_on_cpu_runs(server):
    """The default --dtype float16: params load in half precision and generate on the CPU."""
    from neva.serve.__main__ import load
    from neva.generate import Sampling, generate
    cfg, params, tok, data, _ = load(str(server[1]), torch.float16)
    assert params["llm"]["embed"]["w"].dtype == torch.float16 and data.template == "mistral"
    res = generate(params, cfg, [[1, 733, 16289, 28793]], None, Sampling(max_new_tokens=4))
    assert len(res["tokens"][0]) >= 1
    assert json.loads((server[1] / "config.json").read_text())["neva"]["num_frames"] == 3


def test_torchrun_tp2_serves_under_the_plan(server, client):
    """``torchrun --nproc_per_node 2 -m neva.serve MODEL parallel.tp=2``: the weights sharded over two
    ranks, rank 0 on HTTP; greedy answers (plain and streamed) equal the one-process server's."""
    url, folder, root = server
    proc, url2 = launch(folder, root, "parallel.tp=2", torchrun=2)
    try:
        tp2 = openai.OpenAI(base_url=url2 + "/v1", api_key="none", max_retries=0)
        kw = dict(model="tiny", messages=ask("What colour is it?", png_url()), max_tokens=6, temperature=0)
        want = client.chat.completions.create(**kw).choices[0].message.content
        assert tp2.chat.completions.create(**kw).choices[0].message.content == want
        assert "".join(c.choices[0].delta.content or "" for c in tp2.chat.completions.create(**kw, stream=True)
                       if c.choices) == want
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "2 ranks: tp2)" in out, out[-2000:]


def test_identical_image_requests_beyond_one_batch_are_all_answered():
    """Three equal requests with the same image and max_batch 2: the third waits for a second batch
    (taking the first batch out of the waiting list once compared jobs field by field, image
    tensors included, which raised in the worker thread and left every request hanging)."""
    from neva.generate import Sampling
    from neva.serve.engine import Engine, Job
    from neva.serve.prompts import Prompt

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    def fn(prompts, pixel_values, sampling, on_token=None):
        return {"tokens": [[5, 6]] * len(prompts), "finish": ["length"] * len(prompts)}

    engine = Engine(fn, Tok(), eos_id=2, dtype=torch.float32, max_batch=2)
    pix = torch.ones(1, 3, 4, 4)
    jobs = [Job(Prompt([1, 7, 3], pix.clone()), Sampling(max_new_tokens=2)) for _ in range(3)]
    for j in jobs:                         # queued before the worker takes any: all wait together
        engine.q.put_nowait(j)
    assert all(j.done.wait(10) for j in jobs)
    assert [j.result["text"] for j in jobs] == ["5 6"] * 3 and sum(engine.sizes) == 3
