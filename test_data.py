"""Tests for data.py items 1-5 (issue 4), against oracles: sentencepiece for the tokenizer conversion, the
authors' tokenizer_image_token + preprocess_v1_sq2 masking (ported below) run on transformers' slow
sentencepiece tokenizer for the tokens and labels, and transformers' CLIPImageProcessorPil for the pixels.
sentencepiece and transformers are test-only. Real questions and images come from ../shared/data."""

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "vqa_rad").is_dir(), reason="needs ../shared/data (VQA-RAD, SLAKE)")
N_IMG, IMG_ID = 7, 1500  # a short image placeholder run; an id just past the test vocabulary, as llava-hf's 32000

# -----------------------------------------------------------------------------
# Oracles: a SentencePiece model trained here, and the authors' code ported line by line


def _vqa_rad():
    return json.loads((SHARED / "vqa_rad" / "VQA_RAD_Dataset_Public.json").read_text())


def _corpus():
    rad, slake = _vqa_rad(), json.loads((SHARED / "slake" / "test.json").read_text())
    qa = [(r["question"], str(r["answer"])) for r in rad + slake]  # SLAKE has Chinese questions too
    lines = [q for q, _ in qa] + [a for _, a in qa]
    lines += [f"USER: {q} ASSISTANT: {a}" for q, a in qa[:4000:3]] + [f"VUSER: {q}" for q, _ in qa[1:4000:5]]
    lines += [D.QUESTIONER_SYSTEM] * 20 + ["  two  spaces,\ttabs\t\tand", "line one\nline two\n\n", "code:    indented"] * 10
    return lines


def _train_sp(path, lines, **kw):
    import sentencepiece as spm
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(  # LLaMA's trainer settings, small
        sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=1500, byte_fallback=True,
        character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, **kw)
    path.write_bytes(f.getvalue())
    return path


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    """A BPE tokenizer.model normalised as LLaMA's: identity, whitespace kept, dummy prefix."""
    return _train_sp(tmp_path_factory.mktemp("sp") / "tokenizer.model", _corpus(),
                     normalization_rule_name="identity", remove_extra_whitespaces=False)


@pytest.fixture(scope="module")
def oracle(llama_sp):
    """LLaVA's tokenizer: LlamaTokenizer(use_fast=False), i.e. sentencepiece per text piece between special
    tokens (legacy); in transformers 5 that is SentencePieceBackend. pad = unk as LLaVA sets it."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    return SentencePieceBackend(vocab_file=str(llama_sp), legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<unk>", special_tokens_pattern="bos")


def authors_tokenizer_image_token(prompt, tokenizer, image_token_index=-200):
    """STLLaVA-Med llava/mm_utils.py tokenizer_image_token, verbatim logic."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]
    input_ids, offset = [], 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def authors_labels(conversation, input_ids, tokenizer, roles=("USER", "ASSISTANT", "VUSER")):
    """STLLaVA-Med train.py preprocess_v1_sq2 masking (L555-610, has_image=True), on one sample."""
    tii = lambda text: authors_tokenizer_image_token(text, tokenizer)
    target = list(input_ids)
    total_len = sum(t != tokenizer.pad_token_id for t in target)
    sep, sep_vur = " " + roles[1] + ": ", roles[2] + ": "
    cur_len = 1
    target[:cur_len] = [-100]
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) == 2:
            parts[0] += sep
            round_len = len(tii(rou))
            instruction_len = len(tii(parts[0])) - 2
            target[cur_len:cur_len + instruction_len] = [-100] * len(target[cur_len:cur_len + instruction_len])
        else:
            round_len = len(tii(rou))
            if i == 0:
                parts = rou.split("<image>\n")
                sep_len = len(tii(parts[0] + "<image>\n"))
            else:
                sep_len = len(tii(sep_vur)) - 2
            target[cur_len:cur_len + sep_len] = [-100] * len(target[cur_len:cur_len + sep_len])
        cur_len += round_len
    target[cur_len:] = [-100] * len(target[cur_len:])
    if cur_len != total_len:  # "WARNING: tokenization mismatch" -> the whole sample is ignored
        target = [-100] * len(target)
    return target


def expand_images(ids, labels=None):
    """What llava_arch.prepare_inputs_labels_for_multimodal does with the -200 placeholder (ids side: ours)."""
    out_ids, out_labels = [], []
    for k, t in enumerate(ids):
        out_ids += [IMG_ID] * N_IMG if t == -200 else [t]
        if labels is not None:
            out_labels += [-100] * N_IMG if t == -200 else [labels[k]]
    return (out_ids, out_labels) if labels is not None else out_ids


def loss_runs(labels):
    """[(start, end)] of the contiguous runs of positions with loss."""
    runs, start = [], None
    for k, l in enumerate(labels + [-100]):
        if l != -100 and start is None:
            start = k
        elif l == -100 and start is not None:
            runs, start = runs + [(start, k)], None
    return runs

# -----------------------------------------------------------------------------
# 1. Tokenizer


VARIED = ["", " ", "   ", "\t", "\n", "a", "  leading spaces", "trailing spaces   ", "tabs\tin\t\tthe middle",
          "multi\nline\n\ntext\n", " \t \n mixed whitespace", "naïve café, Ångström, façade", "Ça va? Ñandú über",
          "这张图片的成像方式是什么?", "肺部 CT 显示 左下叶 结节", "emoji 😀🫀🩻 test", "ﬁ ligature ① Ⅻ",
          "\u00a0nbsp\u3000ideographic space", "x-ray: 12345 67.8% (p<0.05)", "<0x0A> literal",
          "▁ literal metaspace ▁▁", "ASSISTANT:  two spaces", "VUSER:\tQ", "Is there a mass?\n\n\n"]


@needs_shared
def test_tokenizer_matches_sentencepiece(llama_sp, tmp_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp))
    tok = D.load_tokenizer(llama_sp)
    texts = VARIED + [line for line in _corpus()[::23]]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    assert any(3 <= i < 259 for t in VARIED for i in sp.encode(t))  # byte fallback was exercised
    assert (tok.token_to_id("<unk>"), tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert tok.encode("Is the liver normal?").ids == [1] + sp.encode("Is the liver normal?")  # BOS, no EOS
    assert tok.padding["pad_id"] == 0 and tok.padding["pad_token"] == "<unk>"  # LLaVA pads with unk
    for text in ["naïve café 😀", "Is there a mass?", "肺部 CT"]:
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    tok.save(str(tmp_path / "tokenizer.json"))
    tok2 = D.load_tokenizer(tmp_path)  # a folder: tokenizer.json
    for text in texts:
        assert tok2.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    # the layout transformers 5's LlamaTokenizer writes: no normaliser, Metaspace(prepend_scheme="first")
    from tokenizers import Tokenizer, pre_tokenizers
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(" x", add_special_tokens=False).ids != sp.encode(" x")
    tok3 = D.load_tokenizer(tmp_path / "tokenizer.json")
    for text in texts + ["a</s> b</s>c"]:
        assert tok3.encode(text, add_special_tokens=False).ids == tok2.encode(text, add_special_tokens=False).ids, repr(text)


@needs_shared
def test_tokenizer_nfkc_normalizer(tmp_path):
    """sentencepiece's defaults (nmt_nfkc, remove_extra_whitespaces) convert too, via the precompiled charsmap."""
    import sentencepiece as spm
    path = _train_sp(tmp_path / "tokenizer.model", _corpus()[::2])
    pieces, trainer, norm = D.read_sentencepiece(path)
    assert norm["name"] == "nmt_nfkc" and norm["remove_extra_whitespaces"] and trainer["byte_fallback"]
    sp, tok = spm.SentencePieceProcessor(model_file=str(path)), D.load_tokenizer(path)
    for text in VARIED:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)


@pytest.mark.skipif(not os.environ.get("STLLAVA_LLAMA_TOKENIZER"), reason="set STLLAVA_LLAMA_TOKENIZER=<LLaMA tokenizer.model>")
def test_real_llama_tokenizer():
    """Optional: the real LLaMA/Vicuna tokenizer.model (32000 pieces), against sentencepiece and the authors' code."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    path = os.environ["STLLAVA_LLAMA_TOKENIZER"]
    sp, tok = spm.SentencePieceProcessor(model_file=path), D.load_tokenizer(path)
    for text in VARIED + [D.QUESTIONER_SYSTEM, "    def f(x):\n        return x"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    slow = SentencePieceBackend(vocab_file=path, legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<unk>", special_tokens_pattern="bos")
    ref_ids = authors_tokenizer_image_token(TURNS_PROMPT, slow)
    assert D.encode_conversation(TURNS, tok, "vicuna_v1_sq", N_IMG, IMG_ID) == expand_images(ref_ids, authors_labels(TURNS_PROMPT, ref_ids, slow))


def test_tokenizer_errors(tmp_path):
    import sentencepiece as spm
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["is there a mass in the left lung"] * 50), model_writer=f,
                                   model_type="unigram", vocab_size=20, minloglevel=2, num_threads=1)
    (tmp_path / "uni.model").write_bytes(f.getvalue())
    with pytest.raises(ValueError, match="only SentencePiece BPE"):
        D.load_tokenizer(tmp_path / "uni.model")
    (tmp_path / "junk.model").write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="junk.model: not a readable SentencePiece model"):
        D.load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.json or tokenizer.model"):
        D.load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.json not found"):
        D.load_tokenizer(tmp_path / "nope.json")

# -----------------------------------------------------------------------------
# 2. Templates and questioner roles

SQ_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.Also, the artificial intelligence assistant is a "
             "curious virtual user. The virtual user asks complex questions that are relevant to the content in the "
             "image, for example, asking about background knowledge of the objects in the image, asking to discuss "
             "about events happening in the image, etc. Again, do not ask about uncertain details.")
TURNS = [{"from": "human", "value": "<image>\nWhat modality is this?"}, {"from": "gpt", "value": "It is a CT scan."},
         {"from": "vuser", "value": "Is there a lesion?"}, {"from": "gpt", "value": "Yes, on the left."},
         {"from": "human", "value": "How many lesions are there?"}, {"from": "gpt", "value": "One."}]
# hand-worked from conv_vicuna_v1_sq: system + " ", then role + ": " + msg + [" ", "</s>"][i % 2], and
# preprocess_v1_sq2 appends "</s>" to the VUSER message (so "</s> " follows it)
TURNS_PROMPT = (SQ_SYSTEM + " USER: <image>\nWhat modality is this? ASSISTANT: It is a CT scan.</s>"
                "VUSER: Is there a lesion?</s> ASSISTANT: Yes, on the left.</s>"
                "USER: How many lesions are there? ASSISTANT: One.</s>")


def test_render_templates():
    assert D.render_conversation(TURNS, "vicuna_v1_sq") == TURNS_PROMPT
    assert D.TEMPLATES["vicuna_v1_sq"].system == SQ_SYSTEM and "questions.Also" in SQ_SYSTEM
    v1_system = SQ_SYSTEM[:SQ_SYSTEM.index("Also")]
    ask = TURNS[:2] + [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": None}]
    assert D.render_conversation(ask, "vicuna_v1") == (
        v1_system + " USER: <image>\nWhat modality is this? ASSISTANT: It is a CT scan.</s>USER: Where? ASSISTANT:")
    # LLaVA-Med v1.5 conv_mistral_instruct (LLAMA_2 style, empty system, sep ""): "[INST] q [/INST]", " a </s>"
    assert D.render_conversation(ask, "mistral_instruct") == (
        "[INST] <image>\nWhat modality is this? [/INST] It is a CT scan. </s>[INST] Where? [/INST]")
    assert D.render_conversation(TURNS[:2] + [{"from": "vuser", "value": None}], "vicuna_v1_sq").endswith(
        "It is a CT scan.</s>VUSER:")  # stage 2 question generation (llava/eval/visual_sq.py)
    for bad, msg in [(TURNS, "turn 2 is from 'vuser'"), (TURNS[1:], "turn 0 is from 'gpt'"),
                     ([TURNS[0], {"from": "gpt", "value": None}, TURNS[2]], "turn 1 has an empty"),
                     ([TURNS[0], {"from": "gpt", "value": ""}], "turn 1 has an empty"), ([], "empty conversation")]:
        with pytest.raises(ValueError, match=msg):
            D.render_conversation(bad, "vicuna_v1")


def test_assign_questioner_roles():
    turns = [{"from": ("human", "gpt")[j % 2], "value": f"m{j}"} for j in range(8)]
    roles = lambda ts: [t["from"] for t in ts]
    assert roles(D.assign_questioner_roles(turns, 0.0, random.Random(0))) == roles(turns)
    assert roles(D.assign_questioner_roles(turns, 1.0, random.Random(0))) == ["human", "gpt"] + ["vuser", "gpt"] * 3
    assert roles(turns) == ["human", "gpt"] * 4  # the input is not modified
    for seed in range(20):  # the same draws as the authors' loop: random() once per human turn j > 0
        rng = random.Random(seed)
        theirs = ["vuser" if t["from"] == "human" and j > 0 and rng.random() < 0.5 else t["from"] for j, t in enumerate(turns)]
        assert roles(D.assign_questioner_roles(turns, 0.5, random.Random(seed))) == theirs
    n = sum(t["from"] == "vuser" for s in range(300) for t in D.assign_questioner_roles(turns, 0.5, random.Random(s)))
    assert 0.4 < n / 900 < 0.6

# -----------------------------------------------------------------------------
# 3. Encoding


@needs_shared
def test_encode_conversation_hand_worked(llama_sp, oracle):
    tok = D.load_tokenizer(llama_sp)
    ids, labels, question = D.encode_conversation(TURNS, tok, "vicuna_v1_sq", N_IMG, IMG_ID, return_question_mask=True)
    ref_ids = authors_tokenizer_image_token(TURNS_PROMPT, oracle)
    assert (ids, labels) == expand_images(ref_ids, authors_labels(TURNS_PROMPT, ref_ids, oracle))
    first = ids.index(IMG_ID)
    assert ids.count(IMG_ID) == N_IMG and ids[first:first + N_IMG] == [IMG_ID] * N_IMG
    # hand-worked loss positions: the two answers, the VUSER question and the last answer, each with its
    # "</s>" and starting at the token that holds the space before it; nothing else (BOS, system, USER
    # turns, role tags, image) has loss
    runs = loss_runs(labels)
    assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in runs] == [
        "It is a CT scan.</s>", "Is there a lesion?</s>", "Yes, on the left.</s>", "One.</s>"]
    assert all(oracle.convert_ids_to_tokens(ids[a]).startswith("▁") and ids[b - 1] == 2 for a, b in runs)
    assert all(l in (-100, t) for l, t in zip(labels, ids)) and ids[0] == 1 and labels[0] == -100
    assert [k for k, q in enumerate(question) if q] == list(range(*runs[1]))
    assert "▁" in oracle.convert_ids_to_tokens(ids[runs[1][1]])  # text after "</s>" gets a dummy prefix (legacy)


@needs_shared
def test_encode_matches_authors_on_real_questions(llama_sp, oracle):
    """Multi-round conversations of real VQA-RAD questions, VUSER turns drawn at random, both Vicuna templates."""
    tok, by_image = D.load_tokenizer(llama_sp), {}
    for r in _vqa_rad():
        by_image.setdefault(r["image_name"], []).append((r["question"], str(r["answer"])))
    rng = random.Random(0)
    for k, qa in enumerate(list(by_image.values())[:40]):
        turns = [{"from": f, "value": v} for q, a in qa[:1 + k % 4] for f, v in (("human", q), ("gpt", a))]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        for template, ts in [("vicuna_v1", turns), ("vicuna_v1_sq", D.assign_questioner_roles(turns, 0.5, rng))]:
            prompt = D.render_conversation(ts, template)
            ref_ids = authors_tokenizer_image_token(prompt, oracle)
            ref_labels = authors_labels(prompt, ref_ids, oracle)
            assert any(l != -100 for l in ref_labels)  # no mismatch on the authors' side
            assert D.encode_conversation(ts, tok, template, N_IMG, IMG_ID, name=f"rad-{k}") == expand_images(ref_ids, ref_labels)
    ask = [{"from": "human", "value": "<image>\nIs the liver normal?"}, {"from": "gpt", "value": "No."},
           {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It is enlarged."}]
    ids, labels = D.encode_conversation(ask, tok, "mistral_instruct", N_IMG, IMG_ID)
    prompt = "[INST] <image>\nIs the liver normal? [/INST] No. </s>[INST] Why? [/INST] It is enlarged. </s>"
    assert ids == expand_images(authors_tokenizer_image_token(prompt, oracle))
    assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in loss_runs(labels)] == ["No. </s>", "It is enlarged. </s>"]


@needs_shared
def test_encode_prompt_truncation_and_errors(llama_sp, oracle):
    tok = D.load_tokenizer(llama_sp)
    for turns, template, end in [(TURNS[:2] + [{"from": "vuser", "value": None}], "vicuna_v1_sq", "VUSER:"),
                                 ([TURNS[0], {"from": "gpt", "value": None}], "vicuna_v1", "ASSISTANT:"),
                                 ([TURNS[0], {"from": "gpt", "value": None}], "mistral_instruct", "[/INST]")]:
        prompt = D.render_conversation(turns, template)
        assert prompt.endswith(end)
        assert D.encode_prompt(turns, tok, template, N_IMG, IMG_ID) == expand_images(authors_tokenizer_image_token(prompt, oracle))
    with pytest.raises(ValueError, match="last turn must have value None"):
        D.encode_prompt(TURNS, tok, "vicuna_v1_sq", N_IMG, IMG_ID)
    ids, labels = D.encode_conversation(TURNS, tok, "vicuna_v1_sq", N_IMG, IMG_ID)
    end = ids.index(IMG_ID) + N_IMG
    assert D.encode_conversation(TURNS, tok, "vicuna_v1_sq", N_IMG, IMG_ID, max_length=end + 3) == (ids[:end + 3], labels[:end + 3])
    with pytest.raises(ValueError, match=f"rec-9: max_length={end - 1} would cut into the image tokens"):
        D.encode_conversation(TURNS, tok, "vicuna_v1_sq", N_IMG, IMG_ID, max_length=end - 1, name="rec-9")
    tagged = [{"from": "human", "value": "<image>\nWhat does ASSISTANT: mean?"}, {"from": "gpt", "value": "A role tag."}]
    with pytest.raises(ValueError, match="tokenization mismatch in rec-7"):  # the authors would mask it wrongly
        D.encode_conversation(tagged, tok, "vicuna_v1", N_IMG, IMG_ID, name="rec-7")
    with pytest.raises(ValueError, match="rec-8: a training conversation ends with a gpt answer"):
        D.encode_conversation(TURNS[:3], tok, "vicuna_v1_sq", N_IMG, IMG_ID, name="rec-8")

# -----------------------------------------------------------------------------
# 4. Images


def authors_expand2square(pil_img, background_color):
    """STLLaVA-Med train.py LazySupervisedDataset.__getitem__ expand2square, verbatim logic."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def _real_images():
    """Real images of several shapes: square, tall, wide, small, one from SLAKE."""
    paths = sorted((SHARED / "vqa_rad" / "images").glob("*.jpg"))
    sizes = {p: Image.open(p).size for p in paths}
    pick = [next(p for p, (w, h) in sizes.items() if test(w, h)) for test in
            (lambda w, h: w == h and w >= 512, lambda w, h: h > w * 1.2, lambda w, h: w > h * 1.2, lambda w, h: w < 300)]
    return pick + [sorted((SHARED / "slake" / "imgs").glob("*/source.jpg"))[0]]


@needs_shared
def test_preprocess_image_matches_clip(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    for size in (336, 48):
        clip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        ref = lambda img: torch.from_numpy(np.asarray(clip(images=img, return_tensors="np")["pixel_values"][0]))
        bg = tuple(int(x * 255) for x in clip.image_mean)
        assert bg == (122, 116, 104)
        for path in _real_images()[:5 if size == 336 else 2]:
            rgb = Image.open(path).convert("RGB")
            alpha = rgb.convert("RGBA")
            alpha.putalpha(Image.linear_gradient("L").resize(rgb.size))
            for img in [rgb, rgb.convert("L"), rgb.convert("LA"), alpha, rgb.convert("P"), rgb.convert("CMYK")]:
                ours = D.preprocess_image(img, size)
                assert ours.shape == (3, size, size) and ours.dtype == torch.float32
                theirs = ref(authors_expand2square(img.convert("RGB"), bg))  # LLaVA: .convert('RGB'), pad, CLIP
                assert (ours - theirs).abs().max() < 1e-5, (path.name, img.mode, size)
            assert (D.preprocess_image(rgb, size, pad_to_square=False) - ref(rgb)).abs().max() < 1e-5
    gray = Image.open(_real_images()[1]).convert("L")
    gray.save(tmp_path / "gray.png")
    assert torch.equal(D.preprocess_image(tmp_path / "gray.png"), D.preprocess_image(gray))  # a path works
    # 16-bit: scaled to 8 bits (v * 257 -> v), where PIL's convert('RGB') would clip at 255
    deep = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16))
    assert deep.mode.startswith("I;16") and torch.equal(D.preprocess_image(deep), D.preprocess_image(gray))


@needs_shared
def test_preprocess_image_errors(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(bytes(range(256)) * 4)
    good = _real_images()[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[:len(good) // 2])
    for name in ("noise.jpg", "cut.jpg", "missing.png"):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            D.preprocess_image(tmp_path / name)

# -----------------------------------------------------------------------------
# 5. Datasets and collation


def test_read_conversations(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10), (40, 80, 120)).save(tmp_path / "images" / "a.png")
    qa = lambda q, a="A CT.": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    good = {"id": "r0", "image": "a.png", "conversations": qa("What is shown?\n<image>") + qa("Which side?", "Left.")}
    text_only = {"id": "t", "conversations": qa("Define CT.", "Computed tomography.")}
    bad = [({"id": "r1", "image": "missing.png", "conversations": qa("<image>\nQ?")}, "image file .*missing.png not found"),
           ({"id": "r2", "image": "a.png", "conversations": qa("Q?")}, "no <image> tag"),
           ({"id": "r2b", "image": "a.png", "conversations": qa("Q?", "See <image>.")}, "needs exactly one <image> tag, in a human turn \\(found 1\\)"),
           ({"id": "r3", "image": "a.png", "conversations": []}, "empty conversation"),
           ({"id": "r4", "image": "a.png", "conversations": qa("<image>\nQ?")[::-1]}, "turn 0 is from 'gpt'"),
           ({"id": "r5", "image": "a.png", "conversations": qa("<image>\nQ?")[:1] * 2}, "turn 1 is from 'human'"),
           ({"id": "r6", "image": "a.png", "conversations": qa("<image>\nQ?") + qa("Q2?")[:1]}, "conversation does not end with a gpt"),
           ({"id": "r7", "image": "a.png", "conversations": qa("<image>\nQ?", "")}, "turn 1 has an empty"),
           ({"id": "r8", "conversations": qa("<image>\nQ?")}, "<image> tag but no 'image' field"),
           ({"id": "r9", "image": "a.png"}, "no 'conversations' list")]
    path = tmp_path / "data.json"
    for rec, msg in bad:
        path.write_text(json.dumps([good, rec]))
        with pytest.raises(ValueError, match=f"data.json record 1 \\(id '{rec['id']}'\\): {msg}"):
            D.read_conversations(path, tmp_path / "images")
    path.write_text(json.dumps([good, text_only] + [rec for rec, _ in bad]))
    out = D.read_conversations(path, tmp_path / "images", skip_bad=True)
    assert f"skipped {len(bad)} of {len(bad) + 2} records" in capsys.readouterr().out
    assert [r["id"] for r in out] == ["r0", "t"] and out[1]["image"] is None
    assert out[0]["image"] == tmp_path / "images" / "a.png"
    assert out[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat is shown?"}  # tag moved to front
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: cannot read JSON"):
        D.read_conversations(tmp_path / "broken.json", tmp_path)


def test_collate(tmp_path):
    ex = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "pixel_values": torch.zeros(3, 4, 4)},
          {"input_ids": torch.tensor([1, 7]), "labels": [-100, 7], "pixel_values": torch.ones(3, 4, 4)}]
    b = D.collate(ex)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert b["pixel_values"].shape == (2, 3, 4, 4) and b["pixel_values"][1].eq(1).all()
    b = D.collate([{"input_ids": e["input_ids"]} for e in ex], padding_side="left")  # generation
    assert b["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]] and b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert "labels" not in b and b["pixel_values"] is None
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "x.png")
    b = D.collate([{"input_ids": [1, 2], "image": tmp_path / "x.png", "question_mask": [False, True]}], image_size=48)
    assert torch.equal(b["pixel_values"][0], D.preprocess_image(tmp_path / "x.png", 48))
    assert b["question_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="padding_side"):
        D.collate(ex, padding_side="middle")
