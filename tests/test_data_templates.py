"""Every template against hand-written prompt strings and trained spans: one turn, multi-turn, a
system prompt, and media in the second turn. Trained spans are the decoded runs of trained tokens
(their leading word-start space included), so one token too many or too few in a mask fails."""
import pytest

from data_helpers import mixtral_with, trained_runs
from neva.data import templates, tokenizers
from neva.data.templates import Turn
from neva.data.tokenize import encode

V = templates.VICUNA_SYSTEM
L = templates.LLAVA_SYSTEM
LBL = templates.NVGPT_LABEL

ONE = [Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A red circle.")]
MULTI = ONE + [Turn("user", "Is it big?"), Turn("assistant", "No.")]
SECOND = [Turn("user", "Hello"), Turn("assistant", "Hi."), Turn("user", "<image>\nWhat colour?"),
          Turn("assistant", "red")]
SYS_TURNS = [Turn("user", "Hi"), Turn("assistant", "Hello.")]

H3 = "<|start_header_id|>{}<|end_header_id|>\n\n".format

CASES = {
    # template: {case: (expected prompt, expected trained runs)}
    # each reply is its own tokenizer call, so its first token carries the word-start (mistral-common)
    "mistral": {
        "one": ("<s>[INST] <image>\nWhat is this? [/INST]A red circle.</s>", [" A red circle.</s>"]),
        "multi": ("<s>[INST] <image>\nWhat is this? [/INST]A red circle.</s>[INST] Is it big? [/INST]No.</s>",
                  [" A red circle.</s>", " No.</s>"]),
        "system": ("<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>", [" Hello.</s>"]),
        "second": ("<s>[INST] Hello [/INST]Hi.</s>[INST] <image>\nWhat colour? [/INST]red</s>",
                   [" Hi.</s>", " red</s>"]),
    },
    "mistral_vila": {
        "one": ("<s>[INST] <image>\nWhat is this? [/INST]A red circle.</s>", ["A red circle.</s>"]),
        "multi": ("<s>[INST] <image>\nWhat is this? [/INST]A red circle.</s>[INST] Is it big? [/INST]No.</s>",
                  ["A red circle.</s>", "No.</s>"]),
        "system": ("<s>[INST] Be brief.\nHi [/INST]Hello.</s>", ["Hello.</s>"]),
        "second": ("<s>[INST] Hello [/INST]Hi.</s>[INST] <image>\nWhat colour? [/INST]red</s>", ["Hi.</s>", "red</s>"]),
    },
    "v1": {
        "one": (f"<s>{V} USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>", [" A red circle.</s>"]),
        "multi": (f"<s>{V} USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>USER: Is it big? ASSISTANT: No.</s>",
                  [" A red circle.</s>", " No.</s>"]),
        "system": ("<s>Be brief. USER: Hi ASSISTANT: Hello.</s>", [" Hello.</s>"]),
        "second": (f"<s>{V} USER: Hello ASSISTANT: Hi.</s>USER: <image>\nWhat colour? ASSISTANT: red</s>",
                   [" Hi.</s>", " red</s>"]),
    },
    "llama_2": {
        "one": (f"<s>[INST] <<SYS>>\n{L}\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A red circle. </s>",
                [" A red circle. </s>"]),
        "multi": (f"<s>[INST] <<SYS>>\n{L}\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A red circle. </s>"
                  "<s>[INST] Is it big? [/INST] No. </s>", [" A red circle. </s>", " No. </s>"]),
        "system": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>", [" Hello. </s>"]),
        "second": (f"<s>[INST] <<SYS>>\n{L}\n<</SYS>>\n\nHello [/INST] Hi. </s><s>[INST] <image>\nWhat colour? [/INST] red </s>",
                   [" Hi. </s>", " red </s>"]),
    },
    "llama_3": {
        "one": (f"<|begin_of_text|>{H3('system')}{L}<|eot_id|>{H3('user')}<image>\nWhat is this?<|eot_id|>"
                f"{H3('assistant')}A red circle.<|eot_id|>", ["A red circle.<|eot_id|>"]),
        "multi": (f"<|begin_of_text|>{H3('system')}{L}<|eot_id|>{H3('user')}<image>\nWhat is this?<|eot_id|>"
                  f"{H3('assistant')}A red circle.<|eot_id|>{H3('user')}Is it big?<|eot_id|>{H3('assistant')}No.<|eot_id|>",
                  ["A red circle.<|eot_id|>", "No.<|eot_id|>"]),
        "system": (f"<|begin_of_text|>{H3('system')}Be brief.<|eot_id|>{H3('user')}Hi<|eot_id|>{H3('assistant')}"
                   "Hello.<|eot_id|>", ["Hello.<|eot_id|>"]),
        "second": (f"<|begin_of_text|>{H3('system')}{L}<|eot_id|>{H3('user')}Hello<|eot_id|>{H3('assistant')}Hi.<|eot_id|>"
                   f"{H3('user')}<image>\nWhat colour?<|eot_id|>{H3('assistant')}red<|eot_id|>",
                   ["Hi.<|eot_id|>", "red<|eot_id|>"]),
    },
    "nvgpt": {
        "one": (f"<extra_id_0>System\n{V}\n\n<extra_id_1>User\n<image>\nWhat is this?\n<extra_id_1>Assistant\n"
                f"<extra_id_2>{LBL}\nA red circle.\n<extra_id_1>", ["A red circle.\n<extra_id_1>"]),
        "multi": (f"<extra_id_0>System\n{V}\n\n<extra_id_1>User\n<image>\nWhat is this?\n<extra_id_1>Assistant\n"
                  f"<extra_id_2>{LBL}\nA red circle.\n<extra_id_1>User\nIs it big?\n<extra_id_1>Assistant\n"
                  f"<extra_id_2>{LBL}\nNo.\n<extra_id_1>", ["A red circle.\n<extra_id_1>", "No.\n<extra_id_1>"]),
        "system": (f"<extra_id_0>System\nBe brief.<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>{LBL}\n"
                   "Hello.\n<extra_id_1>", ["Hello.\n<extra_id_1>"]),
        "second": (f"<extra_id_0>System\n{V}\n\n<extra_id_1>User\nHello\n<extra_id_1>Assistant\n<extra_id_2>{LBL}\n"
                   f"Hi.\n<extra_id_1>User\n<image>\nWhat colour?\n<extra_id_1>Assistant\n<extra_id_2>{LBL}\n"
                   "red\n<extra_id_1>", ["Hi.\n<extra_id_1>", "red\n<extra_id_1>"]),
    },
    "chatml": {
        "one": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?"
                "<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n", ["A red circle.<|im_end|>"]),
        "multi": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?"
                  "<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nIs it big?<|im_end|>\n"
                  "<|im_start|>assistant\nNo.<|im_end|>\n", ["A red circle.<|im_end|>", "No.<|im_end|>"]),
        "system": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                   "Hello.<|im_end|>\n", ["Hello.<|im_end|>"]),
        "second": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                   "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n"
                   "<|im_start|>assistant\nred<|im_end|>\n", ["Hi.<|im_end|>", "red<|im_end|>"]),
    },
    "plain": {
        "one": ("<image>A red circle.\n", ["A red circle.\n"]),
    },
}
TURNS = {"one": (ONE, None), "multi": (MULTI, None), "system": (SYS_TURNS, "Be brief."), "second": (SECOND, None)}


def tokenizer_for(template: str):
    if template == "llama_3":
        return tokenizers.llama3()
    if template == "nvgpt":
        return mixtral_with("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
    if template == "chatml":
        return mixtral_with("<|im_start|>", "<|im_end|>")
    return tokenizers.mixtral()


@pytest.mark.parametrize("template,case", [(t, c) for t, cs in CASES.items() for c in cs])
def test_template_prompt_and_mask(template, case):
    tok = tokenizer_for(template)
    templates.check_tokenizer(template, tok)
    turns, system = TURNS[case]
    pieces = templates.render(template, turns, bos=tok.bos_token, eos=tok.eos_token, system=system)
    want_text, want_runs = CASES[template][case]
    assert templates.text_of(pieces) == want_text
    n_media = want_text.count("<image>")
    enc = encode(pieces, tok, image_token_id=len(tok) + 5, tokens_per_image=3, frames=[1] * n_media)
    assert trained_runs(tok, enc) == want_runs
    assert (enc.input_ids == len(tok) + 5).sum() == 3 * n_media


@pytest.mark.parametrize("template", ["mistral_vila", "plain"])
def test_tokens_equal_whole_string_tokenisation_with_image_as_special_token(template):
    """Chunked tokenisation of a one-call template == HF tokenising the whole prompt with <image> as an
    added special token (what LlavaProcessor does); the Mixtral vocab ends at 31999, so <image> gets
    id 32000. (Templates with own calls are checked against their references in test_data_references.)"""
    tok, hf = tokenizers.mixtral(), mixtral_with("<image>")
    assert hf.convert_tokens_to_ids("<image>") == 32000
    for turns in ([ONE] if template == "plain" else [ONE, MULTI, SECOND]):
        pieces = templates.render(template, turns, bos=tok.bos_token, eos=tok.eos_token)
        text = templates.text_of(pieces)
        enc = encode(pieces, tok, image_token_id=32000, tokens_per_image=4, frames=[1] * text.count("<image>"))
        whole = hf(text.replace("<image>", "<image>" * 4), add_special_tokens=False)["input_ids"]
        assert enc.input_ids.tolist() == whole


GEN_ENDS = {"mistral": "[/INST]", "mistral_vila": "[/INST]", "v1": "ASSISTANT:", "llama_2": "[/INST]", "llama_3": H3("assistant"),
            "chatml": "<|im_start|>assistant\n", "nvgpt": f"<extra_id_2>{LBL}\n"}


@pytest.mark.parametrize("template", sorted(GEN_ENDS))
def test_generation_prompt_is_the_training_prompt_up_to_the_reply(template):
    tok = tokenizer_for(template)
    train = templates.text_of(templates.render(template, MULTI, bos=tok.bos_token, eos=tok.eos_token))
    gen = templates.text_of(templates.render(template, MULTI[:3], bos=tok.bos_token, eos=tok.eos_token,
                                             generation=True))
    assert gen.endswith(GEN_ENDS[template])
    assert train.startswith(gen.rstrip(" "))


def test_turn_order_and_template_errors():
    with pytest.raises(ValueError, match="no assistant"):
        templates.render("mistral", [Turn("user", "hi")])
    with pytest.raises(ValueError, match="turn 1 is from user"):
        templates.render("mistral", [Turn("user", "a"), Turn("user", "b")])
    with pytest.raises(ValueError, match="unknown template 'vicuna'.*chatml"):
        templates.get("vicuna")
    with pytest.raises(ValueError, match="one human/gpt pair"):
        templates.render("plain", MULTI)
    with pytest.raises(ValueError, match="<\\|begin_of_text\\|>.*one special token.*tokenizer=llama3"):
        templates.check_tokenizer("llama_3", tokenizers.mixtral())
