"""An exported folder serves as trained: its own ``AutoProcessor`` (chat template, ``<image>`` token,
image processor) gives, for every template, the prompt ids and pixels our data pipeline gives, and
``LlavaForConditionalGeneration.generate`` on it answers as our generate does (``hf_answers_match``,
called on the main job's trained run in test_train_main_job.py)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_helpers import mixtral_with, synth_dir, tiny_model
from neva.data import NevaDataset, tokenizers
from neva.data import images as imaging
from neva.data.config import DataConfig
from neva.hf import folder as serving

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
SYSTEM = "Answer in one word."
TEMPLATES = ["plain", "v1", "llama_2", "mistral", "mistral_vila", "llama_3", "nvgpt", "chatml"]
SPECIALS = {"nvgpt": ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>"), "chatml": ("<|im_end|>", "<|im_start|>")}


def records(d: Path) -> list[dict]:
    """Media at the start and in the middle of a turn, a system prompt, two rounds, a video (plain:
    the single-pair ones)."""
    v = json.loads((d / "video_eval.jsonl").read_text().splitlines()[0])
    im = [json.loads(x)["image"] for x in (d / "eval.jsonl").read_text().splitlines()[:2]]
    c = lambda *ts: [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(ts)]  # noqa: E731
    return [{"id": "start", "image": im[0], "conversations": c("<image>\nWhat colour is the circle?", "Red.")},
            {"id": "middle", "image": im[1], "system": SYSTEM, "conversations": c("Look at this <image>\nWhat is it?", "A star.")},
            {"id": "two_rounds", "image": [im[0], im[1]],
             "conversations": c("<image>\nHow many shapes?", "Two.", "And here? <image>", "One.")},
            {"id": "video", "video": v["video"], "conversations": c("<video>\nWhich way?", "Up.")}]


def setup(template: str, tmp_path: Path):
    """(dataset, model config, tokenizer) for ``template`` on a tokenizer that has what it needs."""
    d = synth_dir()
    if template == "llama_3":
        tok, spec = tokenizers.llama3(), "llama3"
    elif template in SPECIALS:
        tok, spec = mixtral_with(*SPECIALS[template]), str(tmp_path / "tok")
        tok.save_pretrained(spec)
    else:
        tok, spec = tokenizers.mixtral(), "mixtral"
    recs = [r for r in records(d) if template != "plain" or r["id"] in ("start", "video")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = tiny_model()
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok) + 64), image_token_id=len(tok))
    data = DataConfig(data_path=str(tmp_path / "d.jsonl"), image_folder=str(d), video_folder=str(d / "videos.tar"),
                      tokenizer=spec, template=template, num_frames=3)
    return NevaDataset(data, cfg, tok=tok), cfg, tok


@pytest.mark.parametrize("template", TEMPLATES)
def test_exported_chat_template_gives_our_prompt_ids_and_pixels(template, tmp_path):
    """For every record: the exported processor's ``apply_chat_template(..., add_generation_prompt=True)``
    (string content as LLaVA data writes it, and OpenAI-style parts for images) then the processor on
    the text and the images (a video: its frames) == ``NevaDataset.prompt``'s ids and pixel values."""
    ds, cfg, tok = setup(template, tmp_path)
    out = tmp_path / "hf"
    serving.write(str(out), cfg, tok, ds.cfg)
    proc = transformers.AutoProcessor.from_pretrained(str(out))
    assert type(proc).__name__ == "LlavaProcessor"
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    for i, rec in enumerate(ds.records):
        want_ids, want_px = ds.prompt(i)
        turns = list(rec.turns)[:-1]
        msgs = ([{"role": "system", "content": rec.system}] if rec.system else []) + \
            [{"role": t.role, "content": t.text} for t in turns]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        n = text.count("<image>")
        pics = [Image.open(Path(ds.cfg.image_folder) / p) for p in rec.images]
        if rec.videos:
            pics = [Image.fromarray(f) for f in ds.sources[0].video.frames(rec.videos[0], ds.cfg.num_frames, None)]
        got = proc(text=text, images=pics[:n] or None, return_tensors="pt")
        assert got["input_ids"][0].tolist() == want_ids.tolist(), (rec.id, text)
        if n:
            torch.testing.assert_close(got["pixel_values"], want_px, atol=2e-6, rtol=0)
        if rec.id == "start" and template != "plain":       # the same question as OpenAI-style parts
            parts = [{"type": "image_url", "image_url": {"url": str(Path(ds.cfg.image_folder) / rec.images[0])}},
                     {"type": "text", "text": turns[0].text.split("\n", 1)[1]}]
            got = proc.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
            assert got["input_ids"][0].tolist() == want_ids.tolist()
            torch.testing.assert_close(got["pixel_values"], want_px, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["square", "pad"])
def test_image_processor_reproduces_ours(kind, mode):
    """On a non-square image (so that pad and the CLIP crop act)."""
    cfg = tiny_model(vision=kind)
    img = Image.fromarray(torch.randint(0, 256, (45, 70, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy())
    got = serving.image_processor(cfg, mode)(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, imaging.process(img, imaging.spec_for(cfg.vision, mode)), atol=2e-6, rtol=0)


def test_keep_mode_and_a_misplaced_image_token_are_refused(tmp_path):
    cfg = tiny_model()
    with pytest.raises(ValueError, match="image_mode='keep' cannot be exported.*square and pad"):
        serving.image_processor(cfg, "keep")
    tok = mixtral_with("<|im_end|>")
    with pytest.raises(ValueError, match="the tokenizer has 32001 tokens.*model.image_token_id=32001"):
        serving.write(str(tmp_path), cfg, tok, DataConfig())


def test_saved_folder_is_complete(tmp_path):
    """config.json records training's data settings and MoE loss coefficient; generation_config stops at
    EOS and the template's end token; LlavaProcessor loads by name too."""
    import neva
    import neva.hf
    tok = mixtral_with(*SPECIALS["chatml"])
    tok.save_pretrained(str(tmp_path / "tok"))
    cfg = replace(tiny_model("mixtral", aux_loss_coef=0.02), image_token_id=32002)
    params = neva.init_params(cfg, seed=0)
    data = DataConfig(tokenizer=str(tmp_path / "tok"), template="chatml", image_mode="pad")
    files = neva.hf.save(params, cfg, str(tmp_path / "hf"), data=data)
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "chat_template.jinja", "tokenizer.json", "model.safetensors"} <= set(files)
    conf = json.loads((tmp_path / "hf/config.json").read_text())
    assert conf["neva"]["aux_loss_coef"] == 0.02 and conf["text_config"]["router_aux_loss_coef"] == 0.01
    assert conf["neva"]["template"] == "chatml" and conf["neva"]["image_mode"] == "pad"
    gen = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 32000] and gen["pad_token_id"] == 2          # </s> and <|im_end|>
    proc = transformers.LlavaProcessor.from_pretrained(str(tmp_path / "hf"))
    assert proc.tokenizer.convert_ids_to_tokens(32002) == "<image>" and proc.image_processor.do_pad
    assert neva.hf.load(str(tmp_path / "hf"))[0].llm.aux_loss_coef == pytest.approx(0.02)


def hf_answers_match(run: Path, n: int = 6) -> list[tuple[str, str]]:
    """The run's hf/ folder through AutoProcessor + apply_chat_template + LlavaForConditionalGeneration.generate
    (greedy) gives, on the first ``n`` held-out questions of each modality, the tokens our ``generate`` gives
    on the same folder and the answers the run wrote to samples.jsonl. -> [(ours, theirs)] texts."""
    import neva.hf
    from neva.generate import Sampling, generate
    from neva.train import qa_eval
    conf = json.loads((run / "config.json").read_text())
    hf = run / "hf"
    proc = transformers.AutoProcessor.from_pretrained(str(hf))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf)).eval()
    cfg, params = neva.hf.load(str(hf))
    data = DataConfig(**{k: v for k, v in conf["data"].items() if k in DataConfig.__dataclass_fields__})
    samples = {s["id"]: s for s in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}
    max_new = conf["eval"]["max_new_tokens"]
    out = []
    for path in data.eval_path.split(","):
        ds = NevaDataset(data, cfg, data_path=path)
        for i in range(min(n, len(ds))):
            rec = ds.records[i]
            ids, px = ds.prompt(i)
            ours = generate(params, cfg, [ids.tolist()], px, Sampling(max_new_tokens=max_new))["tokens"][0]
            msgs = [{"role": t.role, "content": t.text} for t in list(rec.turns)[:-1]]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            pics = [Image.open(ds.sources[0].image_root / p) for p in rec.images] or \
                [Image.fromarray(f) for f in ds.sources[0].video.frames(rec.videos[0], data.num_frames, None)]
            enc = proc(text=text, images=pics, return_tensors="pt")
            assert enc["input_ids"][0].tolist() == ids.tolist(), rec.id
            with torch.no_grad():
                g = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
            theirs = g[0, enc["input_ids"].shape[1]:].tolist()
            theirs = theirs[:theirs.index(cfg.llm.eos_id)] if cfg.llm.eos_id in theirs else theirs
            assert theirs == ours, (rec.id, theirs, ours)
            answer = qa_eval.normalize(proc.tokenizer.decode(theirs, skip_special_tokens=True))
            assert answer == samples[rec.id]["pred"], (rec.id, answer, samples[rec.id]["pred"])
            out.append((samples[rec.id]["pred"], answer))
    return out
