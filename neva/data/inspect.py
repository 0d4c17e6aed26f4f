"""Print a sample as the model sees it: check a template before spending GPU hours.

    python -m neva.data.inspect DATA --template mistral --tokenizer mixtral [--image-folder DIR] [--index i]

Shows the rendered prompt, then the token stream: trained tokens inside ``⟦ ⟧`` (green on a
terminal), masked tokens plain, and each media span as ``<image x N>`` (``<video x F frames x N>``).
``--table`` adds one line per token (position, id, piece, label). Then it checks the template against
the tokenizer's own chat template (a local folder's ``chat_template``, or the published one of a
shipped tokenizer's model): the same conversation rendered by that template and tokenised whole must
give the same ids; a pair that differs is flagged with the first token where they part.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neva.data import templates, tokenizers
from neva.data.records import read
from neva.data.templates import Piece
from neva.data.tokenize import Encoded, encode
from neva.batch import IGNORE

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def show_sample(rec, enc, tok, *, color: bool = False, table: bool = False) -> str:
    """The token view of one encoded sample (see the module docstring)."""
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    span_at = {s.start: s for s in enc.spans}
    out, i = [], 0
    while i < len(ids):
        if i in span_at:
            s = span_at[i]
            n = (s.end - s.start) // s.frames
            txt = f"<image x {n}>" if s.tag == "<image>" else f"<video x {s.frames} frames x {n}>"
            out.append(f"{DIM}{txt}{RESET}" if color else txt)
            i = s.end
            continue
        piece = tok.convert_ids_to_tokens(ids[i])   # the vocabulary's own piece: ▁ / Ġ mark a word start
        if piece is None:
            piece = f"<id {ids[i]}>"
        if labels[i] != IGNORE:
            out.append(f"{GREEN}⟦{piece}⟧{RESET}" if color else f"⟦{piece}⟧")
        else:
            out.append(piece)
        i += 1
    lines = [" ".join(out)]
    if table:
        lines.append(f"{'pos':>5} {'id':>7}  {'label':>7}  piece")
        for p, (t, l) in enumerate(zip(ids, labels)):
            piece = "<media>" if any(s.start <= p < s.end for s in enc.spans) else repr(tok.decode([t]))
            lines.append(f"{p:>5} {t:>7}  {'-' if l == IGNORE else l:>7}  {piece}")
    return "\n".join(lines)


def chat_template_diff(t: templates.Template, turns, system: str | None, ours: Encoded, tok, chat_template: str, *,
                       image_token_id: int, tokens_per_image: int, frames: list[int]) -> str | None:
    """None if ``ours`` (the conversation under template ``t``) has the ids that ``chat_template`` renders
    and the tokenizer tokenises whole (media tags expanded the same way); else what differs."""
    sys_prompt = t.system if system is None else system
    msgs = ([{"role": "system", "content": sys_prompt}] if sys_prompt and t.uses_system else []) + \
        [{"role": turn.role, "content": turn.text} for turn in turns]
    try:
        text = tok.apply_chat_template(msgs, chat_template=chat_template, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that raises (e.g. no system role) is reported
        return f"the tokenizer's chat template cannot render this conversation: {e}"
    theirs = encode([Piece(text)], tok, image_token_id=image_token_id, tokens_per_image=tokens_per_image,
                    frames=frames, require_trained=False)
    a, b = ours.input_ids.tolist(), theirs.input_ids.tolist()
    if a == b:
        return None
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    show = lambda ids: " ".join(str(tok.convert_ids_to_tokens(x)) for x in ids[max(0, i - 3):i + 4])  # noqa: E731
    return (f"template {t.name} and the tokenizer's own chat template give different tokens ({len(a)} vs {len(b)}); "
            f"from token {i}: ours [{show(a)}] vs theirs [{show(b)}]")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError) as e:   # BadSample is a ValueError: it names the sample
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m neva.data.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("data", help="LLaVA .json or .jsonl")
    ap.add_argument("--template", required=True, help=f"one of {sorted(templates.TEMPLATES)}")
    ap.add_argument("--tokenizer", default="mixtral", help="mixtral | llama3 | a local HF tokenizer folder")
    ap.add_argument("--image-folder", default=None, help="image paths are relative to this (default: DATA's folder)")
    ap.add_argument("--video-folder", default=None, help="a folder or .tar of videos (needed for --num-frames -1)")
    ap.add_argument("--index", type=int, default=0, help="which record (0-based)")
    ap.add_argument("--tokens-per-image", type=int, default=16, help="media tokens per image (the model's)")
    ap.add_argument("--image-token-id", type=int, default=None, help="default: len(tokenizer)")
    ap.add_argument("--num-frames", type=int, default=4)
    ap.add_argument("--splice-single-frame", default=None, choices=["first", "middle", "last"])
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--system-prompt", default=None)
    ap.add_argument("--table", action="store_true", help="also one line per token")
    ap.add_argument("--padding", action="store_true",
                    help="instead of one sample: the padding fraction of DATA (files, comma-separated) with and "
                         "without packing, in rows of --max-seq-len (default 256) and batches of --batch-size")
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args(argv)

    tok = tokenizers.load(a.tokenizer)
    t = templates.get(a.template)
    templates.check_tokenizer(t, tok)
    image_token_id = a.image_token_id if a.image_token_id is not None else len(tok)
    if a.padding:
        return _padding(a, tok, image_token_id)
    recs, _ = read(a.data, "error")
    if not 0 <= a.index < len(recs):
        ap.error(f"--index {a.index} is outside the {len(recs)} records of {a.data}")
    rec = recs[a.index]
    image_root = Path(a.image_folder) if a.image_folder else Path(a.data).parent
    missing = [p for p in rec.images if not (image_root / p).is_file()]
    frames, vi = [], 0
    for tag in rec.media_tags():
        if tag == "<image>":
            frames.append(1)
            continue
        n = 1 if a.splice_single_frame else a.num_frames
        if n == -1:
            from neva.data.video import VideoSource

            n = VideoSource(a.video_folder or Path(a.data).parent).n_frames(rec.videos[vi], rec.name)
        frames.append(n)
        vi += 1
    pieces = templates.render(t, list(rec.turns), bos=tok.bos_token or "", eos=tok.eos_token or "",
                              system=a.system_prompt if a.system_prompt is not None else rec.system)
    enc = encode(pieces, tok, image_token_id=image_token_id, tokens_per_image=a.tokens_per_image, frames=frames,
                 max_seq_len=a.max_seq_len, name=rec.name)
    color = sys.stdout.isatty()
    print(f"{rec.name}: template={t.name} tokenizer={a.tokenizer} tokens={len(enc)} trained={enc.n_trained} "
          f"media={len(enc.spans)} image_token_id={image_token_id}"
          + (f" truncated={enc.truncated}" if enc.truncated else ""))
    if missing:
        print(f"warning: image files not found under {image_root}: {missing}")
    print("--- rendered prompt (trained text in ⟦ ⟧)")
    print("".join(f"⟦{p.text}⟧" if p.trained else p.text for p in pieces))
    print("--- tokens (trained ⟦ ⟧, media as <image x N>)")
    print(show_sample(rec, enc, tok, color=color, table=a.table))
    own = tokenizers.own_chat_template(tok, a.tokenizer)
    skip = ("plain is a pretraining layout, not a chat" if t.name == "plain" else
            f"tokenizer {a.tokenizer} has no chat_template" if own is None else
            "--max-seq-len truncates the sample" if a.max_seq_len is not None else None)
    if skip:
        print(f"--- the tokenizer's own chat template: not compared ({skip})")
        return 0
    sys_prompt = a.system_prompt if a.system_prompt is not None else rec.system
    diff = chat_template_diff(t, list(rec.turns), sys_prompt, enc, tok, own, image_token_id=image_token_id,
                              tokens_per_image=a.tokens_per_image, frames=frames)
    print("--- the tokenizer's own chat template: " + ("same tokens" if diff is None else f"DIFFERS\nwarning: {diff}"))
    return 0


def _padding(a, tok, image_token_id: int) -> int:
    """Print how much of each batch is padding over one epoch: unpacked (padded to the batch's
    longest sample, or to max_seq_len) and packed (first-fit rows of max_seq_len)."""
    from types import SimpleNamespace

    from neva.config import VisionConfig
    from neva.data.config import DataConfig
    from neva.data.dataset import NevaDataset
    from neva.data.loader import padding_report

    cfg = DataConfig(data_path=a.data, image_folder=a.image_folder, video_folder=a.video_folder, template=a.template,
                     tokenizer=a.tokenizer, system_prompt=a.system_prompt, num_frames=a.num_frames,
                     splice_single_frame=a.splice_single_frame, max_seq_len=a.max_seq_len or 256,
                     batch_size=a.batch_size)
    # lengths need only the media token counts; the image spec is never used to decode here
    shape = SimpleNamespace(image_token_id=image_token_id, tokens_per_image=a.tokens_per_image, vision=VisionConfig())
    ds = NevaDataset(cfg, shape, tok=tok)
    r = padding_report(ds.lengths, cfg)
    L = ds.lengths
    print(f"{r['samples']} samples of {L.min()}-{L.max()} tokens (mean {L.mean():.1f}); batches of {cfg.batch_size}, "
          f"rows of {cfg.max_seq_len}")
    print(f"  unpacked, padded to the longest in the batch: {r['unpacked_longest']:6.1%} padding")
    print(f"  unpacked, padded to max_seq_len:              {r['unpacked_fixed']:6.1%} padding")
    print(f"  packed, {cfg.packing_algorithm + ':':37s} {r['packed']:6.1%} padding in {r['rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
