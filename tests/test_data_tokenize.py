"""The consistency check: a sample whose rendered text, tokens and labels disagree raises, naming it;
truncation is counted and never cuts a media span."""
import copy

import pytest

from neva.data import templates, tokenizers
from neva.data.templates import Piece, Turn
from neva.data.tokenize import BadSample, encode
from neva.loss import IGNORE

IMG = 32000


def enc(pieces, frames=(), tok=None, **kw):
    return encode(pieces, tok or tokenizers.mixtral(), image_token_id=IMG, tokens_per_image=4, frames=list(frames),
                  name="sample 'x7' (d.jsonl:3)", **kw)


def test_labels_are_the_trained_tokens_and_media_are_masked():
    e = enc([Piece("<s>[INST] <image>\nWhat? [/INST]"), Piece("red</s>", True)], frames=[1])
    ids, labels = e.input_ids.tolist(), e.labels.tolist()
    assert ids.count(IMG) == 4 and all(l == IGNORE for t, l in zip(ids, labels) if t == IMG)
    trained = [t for t, l in zip(ids, labels) if l != IGNORE]
    assert tokenizers.mixtral().convert_ids_to_tokens(trained) == ["red", "</s>"]   # "[/INST]red": no '▁'

    assert e.spans[0].tag == "<image>" and e.spans[0].end - e.spans[0].start == 4


def test_a_token_across_the_prompt_reply_boundary_raises_naming_the_sample():
    # "hel" + "lo" tokenises as "▁hell" "o": the reply would start inside a prompt token
    with pytest.raises(BadSample, match=r"sample 'x7' \(d.jsonl:3\).*'hell' spans a prompt/reply boundary"):
        enc([Piece("hel"), Piece("lo", True)])


def test_whitespace_from_the_prompt_may_join_the_first_reply_token():
    e = enc([Piece("USER: hi ASSISTANT: "), Piece("red</s>", True)])
    assert tokenizers.mixtral().convert_ids_to_tokens(e.labels[e.labels != IGNORE].tolist()) == ["▁red", "</s>"]


def test_tokens_that_do_not_decode_to_the_rendered_text_raise():
    """A tokenizer that lower-cases (loses text) must not train: its tokens disagree with the template."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizers.mixtral().backend_tokenizer)
    backend.normalizer = normalizers.Lowercase()
    lossy = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    with pytest.raises(BadSample, match=r"sample 'x7'.*decode to text that differs from the rendered template"):
        enc([Piece("<s>[INST] What colour? [/INST]"), Piece("Red</s>", True)], tok=lossy)


def test_media_tag_in_a_reply_no_trained_token_and_tag_count_raise():
    with pytest.raises(BadSample, match="sample 'x7'.*media tag appears in an assistant reply"):
        enc([Piece("q"), Piece("<image> red", True)], frames=[1])
    with pytest.raises(BadSample, match="sample 'x7'.*no token is trained"):
        enc([Piece("<s>only a prompt")])
    with pytest.raises(BadSample, match="sample 'x7'.*2 media tags but 1 media"):
        enc([Piece("<image><image>q"), Piece("a", True)], frames=[1])


def test_text_that_produces_the_image_token_id_raises():
    with pytest.raises(BadSample, match="image_token_id=2"):
        encode([Piece("q"), Piece("a</s>", True)], tokenizers.mixtral(), image_token_id=2, tokens_per_image=1,
               frames=[], name="s")


def test_truncation_never_cuts_a_media_span_and_is_counted():
    pieces = [Piece("<s>[INST] a b c <image> d [/INST]"), Piece("red</s>", True),
              Piece("[INST] <video> again [/INST]"), Piece("blue</s>", True)]
    full = enc(pieces, frames=[1, 3])
    v = full.spans[1]                        # the video span: 3 frames x 4 tokens
    assert v.frames == 3 and v.end - v.start == 12
    cut = enc(pieces, frames=[1, 3], max_seq_len=v.start + 5)  # the limit falls inside the video
    assert len(cut) == v.start and cut.truncated == len(full) - v.start
    assert [s.tag for s in cut.spans] == ["<image>"]
    assert cut.input_ids.tolist() == full.input_ids[:v.start].tolist()
    with pytest.raises(BadSample, match="no token is trained after truncation to max_seq_len=6"):
        enc(pieces, frames=[1, 3], max_seq_len=6)


def test_text_after_media_has_no_word_start_marker():
    """As after HF's <image> special token: "\\nWhat" -> '<0x0A>', 'What' (no leading '▁')."""
    e = enc([Piece("<image>\nWhat? "), Piece("red", True)], frames=[1])
    toks = tokenizers.mixtral().convert_ids_to_tokens(e.input_ids[4:].tolist())
    assert toks[:2] == ["<0x0A>", "What"]


def test_llama3_template_tokenises_specials_as_single_tokens():
    tok = tokenizers.llama3()
    pieces = templates.render("llama_3", [Turn("user", "<image>\nHi"), Turn("assistant", "yes")])
    e = encode(pieces, tok, image_token_id=128256, tokens_per_image=2, frames=[1], name="s")
    assert e.input_ids[0] == 128000 and e.labels[e.labels != IGNORE].tolist() == [9891, 128009]
