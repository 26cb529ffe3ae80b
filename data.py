"""
From raw records to exactly the tokens, labels and pixels that STLLaVA-Med trains on (its §2, both stages).

- Tokenizer: `tokenizer.json`, or a LLaMA SentencePiece `tokenizer.model` whose protobuf is read field by
  field and rebuilt as the same byte-fallback BPE (merges from piece scores, as transformers' LlamaConverter).
- Templates: `vicuna_v1` (LLaVA-1.5), `vicuna_v1_sq` (STLLaVA-Med stage 1: Vicuna plus the questioner
  role VUSER, from SQ-LLaVA) and `mistral_instruct` (LLaVA-Med v1.5), rendered as the authors' get_prompt.
- Encoding: `<image>` becomes image_seq_length copies of the image id; labels are -100 except the
  answers and the VUSER questions with their "</s>"; checked against the authors' split/length arithmetic.
- Images: LLaVA's pad-to-square with the CLIP mean colour, then CLIP's resize/crop/normalise, in PIL+numpy.
- Datasets: a validating reader for LLaVA conversation JSON, and a collate with right or left padding.
- Concept alignment (LLaVA-Med §3, Tables 6-7): image-caption pairs as one-turn "describe" instructions.
- Replies: `generate_text` (evaluation and both stages) and `ask_questions` (stage 2's VUSER questioner).

References: heliossun/STLLaVA-Med@9113c41 `train.py` (preprocess_v1_sq2, preprocess_multimodal,
LazySupervisedDataset), `llava/conversation.py`, `llava/mm_utils.py` (tokenizer_image_token);
microsoft/LLaVA-Med@d406e3f `llava/conversation.py` (conv_mistral_instruct); transformers
`convert_slow_tokenizer.py` (LlamaConverter, SentencePieceExtractor); `sentencepiece_model.proto`.
"""
import json
import os
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from model import generate

IGNORE_INDEX = -100                 # labels with this value get no loss (PyTorch's cross-entropy default)
IMAGE_TAG = "<image>"               # LLaVA's DEFAULT_IMAGE_TOKEN, expanded here to image_seq_length ids
BOS = "<s>"                         # LLaMA's; the templates write EOS into the prompt text
EOS = "</s>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as in CLIPImageProcessor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# Tokenizer: tokenizer.json, or a SentencePiece tokenizer.model read without sentencepiece/protobuf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # ModelProto.SentencePiece.Type
# field numbers from sentencepiece_model.proto -> (name, default); only what the conversion needs
TRAINER_FIELDS = {3: ("model_type", 1), 24: ("treat_whitespace_as_suffix", 0), 35: ("byte_fallback", 0),
                  40: ("unk_id", 0), 41: ("bos_id", 1), 42: ("eos_id", 2)}
NORMALIZER_FIELDS = {1: ("name", b""), 2: ("precompiled_charsmap", b""), 3: ("add_dummy_prefix", 1),
                     4: ("remove_extra_whitespaces", 1), 5: ("escape_whitespaces", 1)}


def _proto_fields(buf):
    """Yield (field number, value) of a protobuf message: each field is a varint key (number << 3 | wire
    type) then a varint (type 0), 8 bytes (1), a varint length and bytes (2) or 4 bytes (5)."""
    def varint(i):  # 7 bits a byte, low bits first; a set high bit means another byte follows
        value = shift = 0
        while buf[i] & 0x80:
            value |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
        return value | buf[i] << shift, i + 1
    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 2, 5):  # (n, i): a varint length for type 2, a fixed 8 or 4 bytes for types 1 and 5
            n, i = varint(i) if wire == 2 else (8 if wire == 1 else 4, i)
            value = buf[i:i + n]
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield key >> 3, value


def read_sentencepiece(path):
    """Parse a SentencePiece ModelProto: ([(piece, score, type)], trainer_spec dict, normalizer_spec dict)."""
    pieces = []
    specs = {2: {}, 3: {}}  # trainer_spec = 2, normalizer_spec = 3: {field number: value}
    try:
        for field, value in _proto_fields(Path(path).read_bytes()):
            if field == 1:    # repeated SentencePiece pieces = 1 {piece = 1; score = 2; type = 3}
                p = dict(_proto_fields(value))
                pieces.append((p[1].decode(), struct.unpack("<f", p.get(2, bytes(4)))[0], p.get(3, NORMAL)))
            elif field in specs:
                specs[field] = dict(_proto_fields(value))
        if not pieces:
            raise ValueError("no pieces")
    except (ValueError, IndexError, KeyError, AttributeError, TypeError, UnicodeDecodeError,
            struct.error) as e:
        raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from e
    trainer = {name: specs[2].get(field, default) for field, (name, default) in TRAINER_FIELDS.items()}
    normalizer = {name: specs[3].get(field, default) for field, (name, default) in NORMALIZER_FIELDS.items()}
    for key in ("unk_id", "bos_id", "eos_id"):  # int32 -1 ("none") comes as a 64-bit two's complement varint
        trainer[key] -= (1 << 64) if trainer[key] >= 1 << 63 else 0
    normalizer["name"] = normalizer["name"].decode()
    return pieces, trainer, normalizer


def _from_sentencepiece(path):
    """The byte-fallback BPE `tokenizers` equivalent of a SentencePiece BPE model (LLaMA's kind)."""
    pieces, trainer, norm = read_sentencepiece(path)
    if trainer["model_type"] != 2:
        raise ValueError(f"{path}: only SentencePiece BPE models (model_type 2, LLaMA's) are supported, "
                         f"got model_type {trainer['model_type']}")
    if trainer["treat_whitespace_as_suffix"] or any(t in (USER_DEFINED, UNUSED) for _, _, t in pieces):
        raise ValueError(f"{path}: treat_whitespace_as_suffix and user-defined/unused pieces "
                         "are not supported")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring
    # normal piece; as ranked merges that is every (left, right) split of each piece, by descending score
    normal = {piece: score for piece, score, t in pieces if t == NORMAL}
    merges = sorted((-score, vocab[piece], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                    for piece, score in normal.items() for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    unk = pieces[trainer["unk_id"]][0]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[-2:] for m in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=bool(trainer["byte_fallback"])))
    # normalisation in SentencePiece's order: charsmap (nmt_nfkc etc.; LLaMA: none), extra-space removal (' '
    # only; LLaMA: off), the dummy-prefix space, then ' ' -> '▁'. No pre-tokenizer: SentencePiece merges over
    # the whole string. Prepend runs per segment between special tokens, like LLaMA's slow "legacy" tokenizer.
    steps = [normalizers.Precompiled(norm["precompiled_charsmap"])] if norm["precompiled_charsmap"] else []
    if norm["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    if norm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * bool(norm["add_dummy_prefix"]))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, t in pieces if t in (UNKNOWN, CONTROL)])
    if trainer["bos_id"] >= 0:  # LLaMA adds BOS, not EOS (add_bos_token=True, add_eos_token=False)
        bos = pieces[trainer["bos_id"]][0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, trainer["bos_id"])])
    tok.enable_padding(pad_id=trainer["unk_id"], pad_token=unk)  # LLaVA: pad_token = unk (train.py L1131)
    return tok


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from tokenizer.json / tokenizer.model or a checkpoint folder (tokenizer.json
    first). A SentencePiece BPE model is converted so that `tok.encode(text, add_special_tokens=False).ids ==
    sentencepiece.encode(text)` for any text without "<s>", "</s>" or "<unk>" (read as those tokens)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found")
    if path.suffix == ".model":
        return _from_sentencepiece(path)
    tok = Tokenizer.from_file(str(path))
    pre = tok.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace) and not pre.split and tok.normalizer is None:
        # LLaMA's tokenizer.json as transformers >= 4.41 writes it: Metaspace adds no dummy prefix after a
        # special token or before a leading space. LLaVA's slow tokenizer adds it to every text piece, as
        # sentencepiece does; the normaliser form (LlamaConverter's for legacy=True) gives those ids.
        tok.pre_tokenizer = None
        prepend = [normalizers.Prepend(pre.replacement)] * (pre.prepend_scheme != "never")
        tok.normalizer = normalizers.Sequence(prepend + [normalizers.Replace(" ", pre.replacement)])
    return tok

# -----------------------------------------------------------------------------
# Conversation templates

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# STLLaVA-Med llava/conversation.py conv_vicuna_v1_sq: appended with no space before "Also" (sic)
QUESTIONER_SYSTEM = VICUNA_SYSTEM + (
    "Also, the artificial intelligence assistant is a curious virtual user. The virtual user asks complex "
    "questions that are relevant to the content in the image, for example, asking about background knowledge "
    "of the objects in the image, asking to discuss about events happening in the image, etc. Again, do not "
    "ask about uncertain details.")


@dataclass(frozen=True)
class Template:  # what rendering needs of the authors' Conversation objects
    system: str
    roles: dict       # record role ("human", "gpt", "vuser") -> role tag in the prompt
    style: str        # "two": Vicuna "ROLE: msg" (SeparatorStyle.TWO); "llama_2": "[INST] msg [/INST] answer"
    sep: str = " "    # after a user turn
    sep2: str = EOS   # after an assistant turn


TEMPLATES = {
    "vicuna_v1": Template(VICUNA_SYSTEM, dict(human="USER", gpt="ASSISTANT"), "two"),
    "vicuna_v1_sq": Template(QUESTIONER_SYSTEM, dict(human="USER", gpt="ASSISTANT", vuser="VUSER"), "two"),
    # LLaVA-Med v1.5 (Mistral-7B-Instruct): conv_mistral_instruct = SeparatorStyle.LLAMA_2, system "", sep ""
    "mistral_instruct": Template("", dict(human="USER", gpt="ASSISTANT"), "llama_2", sep=""),
}


def _check_turns(turns, tpl):
    """Turns alternate user (human, or vuser after the first) and gpt; only the last value may be None."""
    if not turns:
        raise ValueError("empty conversation")
    for j, t in enumerate(turns):
        allowed = ("gpt",) if j % 2 else ("human", "vuser") if j else ("human",)
        if not isinstance(t, dict) or t.get("from") not in allowed or t["from"] not in tpl.roles:
            raise ValueError(f"turn {j} is from {t.get('from') if isinstance(t, dict) else t!r}, "
                             f"expected one of {[r for r in allowed if r in tpl.roles]}")
        v = t.get("value")
        if not (isinstance(v, str) and v) and not (v is None and j == len(turns) - 1):
            raise ValueError(f"turn {j} has an empty or non-string value {v!r}")


def _spans(turns, tpl):
    """The prompt as [(text, kind)], kind None (no loss), "answer" or "question"; joined = get_prompt()."""
    _check_turns(turns, tpl)
    out = [] if tpl.style == "llama_2" else [(tpl.system + tpl.sep, None)]
    for j, t in enumerate(turns):
        msg = t["value"]
        if tpl.style == "llama_2":  # LLaVA-Med conversation.py get_prompt, LLAMA_2 branch
            if msg is None:
                break               # a None message renders as "", so the prompt ends with "[/INST]"
            if j == 0 and tpl.system:
                msg = f"<<SYS>>\n{tpl.system}\n<</SYS>>\n\n{msg}"
            out.append((f"{tpl.sep}[INST] {msg} [/INST]", None) if j % 2 == 0
                       else (f" {msg} {tpl.sep2}", "answer"))
            continue
        role = tpl.roles[t["from"]]  # TWO branch: role + ": " + msg + (sep, sep2)[j % 2]; None -> role + ":"
        if msg is None:
            out.append((role + ":", None))
        elif t["from"] == "human":
            out.append((f"{role}: {msg}{(tpl.sep, tpl.sep2)[j % 2]}", None))
        elif t["from"] == "gpt":    # gpt sits at odd j, so its separator is sep2 = "</s>"
            out += [(role + ":", None), (f" {msg}{tpl.sep2}", "answer")]
        else:  # preprocess_v1_sq2 appends conv.sep2 to a VUSER message; the even-j sep " " follows it
            out += [(role + ":", None), (f" {msg}{tpl.sep2}", "question"), (tpl.sep, None)]
    return out


def render_conversation(turns, template):
    """The prompt string the authors' Conversation.get_prompt() builds for these turns
    ([{"from": "human"|"gpt"|"vuser", "value": str | None}]; template: a TEMPLATES key or a Template)."""
    tpl = TEMPLATES[template] if isinstance(template, str) else template
    return "".join(text for text, _ in _spans(turns, tpl))


def assign_questioner_roles(turns, sq_r=0.5, rng=None):
    """STLLaVA-Med train.py preprocess_v1_sq2: each human turn after the first (the image's) becomes a VUSER
    turn, whose question gets loss, with probability sq_r (--sq_r 0.5). They redraw with global random() per
    candidate turn each __getitem__; a random.Random per (seed, epoch, index) makes it repeatable."""
    rng = rng or random
    return [{**t, "from": "vuser"} if j > 0 and t["from"] == "human" and rng.random() < sq_r else dict(t)
            for j, t in enumerate(turns)]

# -----------------------------------------------------------------------------
# Encoding: token ids and loss labels

def _tokenize(text, tok, image_seq_length, image_token_id):
    """Ids of text, without BOS, as LLaVA produces them: mm_utils.tokenizer_image_token splits at "<image>",
    and the slow LLaMA tokenizer (use_fast=False, legacy) splits at "</s>" and runs sentencepiece on each
    piece, so every piece gets its own dummy-prefix "▁" (also the text right after a "</s>")."""
    eos = tok.token_to_id(EOS)
    ids = []
    for k, part in enumerate(text.split(IMAGE_TAG)):
        ids += [image_token_id] * image_seq_length * (k > 0)  # model.py swaps these for the image features
        for j, piece in enumerate(part.split(EOS)):
            ids += [eos] * (j > 0) + (tok.encode(piece, add_special_tokens=False).ids if piece else [])
    return ids


def _authors_labels(prompt, ids, tpl, n_tokens):
    """The authors' masking, kept as a check (STLLaVA-Med train.py preprocess_v1_sq2 L555-610; LLaVA's
    preprocess_v1 and preprocess_llama_2 do the same): split the prompt at "</s>" into rounds and mask
    by token counts of separately tokenized pieces. Returns (labels, counted length)."""
    answer_sep = tpl.sep + tpl.roles["gpt"] + ": " if tpl.style == "two" else "[/INST] "
    labels = [IGNORE_INDEX] + ids[1:]  # BOS: no loss
    cur = 1
    for rou in prompt.split(EOS):
        if rou == "":
            break
        parts = rou.split(answer_sep)
        if len(parts) == 2:  # a QA round: mask up to the answer. Their "- 2" drops BOS and the trailing "▁"
            masked = n_tokens(parts[0] + answer_sep) - 1  # of "ASSISTANT: ", which merges into the answer
        else:                # a VUSER round: mask the role tag (their i == 0 branch needs a VUSER first turn)
            masked = n_tokens(tpl.roles.get("vuser", "") + ": ") - 1
        labels[cur:cur + masked] = [IGNORE_INDEX] * len(labels[cur:cur + masked])
        cur += n_tokens(rou) + 1  # their len(tokenizer(rou)) counts a BOS in place of the removed "</s>"
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    return labels, cur


def encode_conversation(turns, tokenizer, template, image_seq_length, image_token_id, max_length=2048,
                        name="conversation", return_question_mask=False):
    """(input_ids, labels) for training, as the authors' with "<image>" expanded to image_seq_length copies of
    image_token_id: BOS + the rendered prompt; labels -100 except the answers and VUSER questions, each with
    its "</s>"; plus an is-question mask if asked. Labels that differ from the authors' arithmetic (their
    "tokenization mismatch") raise ValueError naming `name`; truncation never cuts into the image tokens."""
    def tokenize(text):
        return _tokenize(text, tokenizer, image_seq_length, image_token_id)
    tpl = TEMPLATES[template] if isinstance(template, str) else template
    try:
        spans = _spans(turns, tpl)
        if turns[-1]["from"] != "gpt" or turns[-1]["value"] is None:
            raise ValueError("a training conversation ends with a gpt answer")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    ids = [tokenizer.token_to_id(BOS)]
    labels = [IGNORE_INDEX]
    question = [False]
    head = ""  # no-loss text not yet tokenized: it is tokenized together with the loss span after it,
    for text, kind in spans:  # since the space before an answer merges into the answer's first token ("▁Yes")
        if kind is None:
            head += text
            continue
        prefix = tokenize(head)
        both = tokenize(head + text)  # each loss span ends with "</s>", so both tokenize as in the prompt
        if both[:len(prefix)] != prefix:
            raise ValueError(f"tokenization mismatch in {name}: {head!r} does not tokenize as a prefix "
                             "of its round")
        ids += both
        labels += [IGNORE_INDEX] * len(prefix) + both[len(prefix):]
        question += [False] * len(prefix) + [kind == "question"] * (len(both) - len(prefix))
        head = ""
    tail = tokenize(head)
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    question += [False] * len(tail)
    expected, counted = _authors_labels("".join(t for t, _ in spans), ids, tpl, lambda t: len(tokenize(t)))
    if labels != expected or counted != len(ids):
        raise ValueError(f"tokenization mismatch in {name}: loss mask differs from the authors' (counted "
                         f"{counted} vs {len(ids)} tokens); does a message contain '</s>' or a role tag?")
    if len(ids) > max_length:
        image_end = max((k + 1 for k, t in enumerate(ids) if t == image_token_id), default=0)
        if image_end > max_length:
            raise ValueError(f"{name}: max_length={max_length} would cut into the image tokens "
                             f"(they end at {image_end})")
        ids, labels, question = (seq[:max_length] for seq in (ids, labels, question))
    return (ids, labels, question) if return_question_mask else (ids, labels)


def encode_prompt(turns, tokenizer, template, image_seq_length, image_token_id):
    """Prompt ids for generation: BOS + the rendered turns, whose last value is None, so the prompt ends
    with "ASSISTANT:" (or "VUSER:" to have the model ask a question, STLLaVA-Med llava/eval/visual_sq.py)."""
    if not turns or turns[-1].get("value") is not None:
        raise ValueError("encode_prompt: the last turn must have value None (the turn to generate)")
    text = render_conversation(turns, template)
    return [tokenizer.token_to_id(BOS)] + _tokenize(text, tokenizer, image_seq_length, image_token_id)

# -----------------------------------------------------------------------------
# Images: LLaVA's pad-to-square, then CLIP's preprocessing

def _open_image(path):
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that a truncated file fails here and names itself
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _to_rgb(img):
    """RGB as LLaVA's Image.open(...).convert('RGB') (alpha dropped, palette/CMYK/L mapped). 16-bit
    images (I;16, I) are scaled to 8 bits first, where convert('RGB') would clip everything above 255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray(np.clip(np.round(np.asarray(img, np.float64) / 257), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def expand2square(img, background):
    """Pad to a square, centred, with the background colour (STLLaVA-Med train.py LazySupervisedDataset)."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, background)
    out.paste(img, ((h - w) // 2, 0) if h > w else (0, (w - h) // 2))
    return out


def preprocess_image(img, size=336, pad_to_square=True):
    """FloatTensor (3, size, size) from a PIL image or a path: LLaVA's image_aspect_ratio="pad" (pad with
    int(255 * CLIP mean) = (122, 116, 104)), then CLIPImageProcessor: shortest side to `size` (bicubic),
    centre crop, rescale by 1/255, normalise with CLIP's mean/std. Unreadable files raise naming the file."""
    img = _to_rgb(_open_image(img) if isinstance(img, (str, Path)) else img)
    if pad_to_square:
        img = expand2square(img, tuple(int(255 * m) for m in CLIP_MEAN))
    w, h = img.size
    short, long = sorted((w, h))
    new_long = int(size * long / short)  # transformers get_resize_output_image_size(default_to_square=False)
    img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
    left, top = ((side - size) // 2 for side in img.size)
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0  # (3, size, size)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)

# -----------------------------------------------------------------------------
# Datasets: LLaVA conversation JSON, and batching

def _move_image_tag(value):
    """STLLaVA-Med train.py preprocess_multimodal: the "<image>" tag moves to the front, then a newline."""
    return (IMAGE_TAG + "\n" + value.replace(IMAGE_TAG, "").strip()).strip()


def _record_problem(rec, image_dir):
    """What is wrong with one record, or None."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return "no 'conversations' list"
    turns = rec["conversations"]
    try:
        _check_turns(turns, TEMPLATES["vicuna_v1_sq"])
    except ValueError as e:
        return str(e)
    if turns[-1]["value"] is None or turns[-1]["from"] != "gpt":
        return "conversation does not end with a gpt answer"
    tags = [t["value"].count(IMAGE_TAG) for t in turns]
    if "image" not in rec:
        return f"{IMAGE_TAG} tag but no 'image' field" if sum(tags) else None
    if not (image_dir / str(rec["image"])).is_file():
        return f"image file {image_dir / str(rec['image'])} not found"
    if sum(tags) == 0:
        return f"no {IMAGE_TAG} tag in a conversation with an image"
    if sum(tags) != 1 or turns[tags.index(max(tags))]["from"] != "human":
        return f"needs exactly one {IMAGE_TAG} tag, in a human turn (found {sum(tags)})"
    return None


def read_conversations(json_path, image_dir=None, skip_bad=False):
    """Records of a LLaVA conversation JSON (LLaVA-Med's instruct and alignment files: [{"id", "image",
    "conversations": [{"from", "value"}]}]) as [{"id", "image": Path | None, "conversations"}], image tag
    first; image_dir None or "" means the JSON's folder. Each record is checked (missing image file, no
    <image> tag, empty or odd-role conversation): errors name file and index; skip_bad=True skips them."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir else json_path.parent  # "": sft.py's and dpo.py's default
    try:
        records = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{json_path}: cannot read JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a list of records, got {type(records).__name__}")
    out = []
    bad = []
    for i, rec in enumerate(records):
        if problem := _record_problem(rec, image_dir):
            rec_id = rec.get("id") if isinstance(rec, dict) else None
            msg = f"{json_path} record {i} (id {rec_id!r}): {problem}"
            if not skip_bad:
                raise ValueError(msg)
            bad.append(msg)
            continue
        image = image_dir / str(rec["image"]) if "image" in rec else None
        turns = [{"from": t["from"], "value": _move_image_tag(t["value"]) if IMAGE_TAG in t["value"]
                  else t["value"]} for t in rec["conversations"]]
        out.append({"id": str(rec.get("id", i)), "image": image, "conversations": turns})
    if bad:
        print(f"read_conversations: skipped {len(bad)} of {len(records)} records in {json_path}; "
              f"first: {bad[0]}")
    return out


def collate(examples, pad_id=0, padding_side="right", image_size=None):
    """Batch [{"input_ids", "labels"?, "question_mask"?, "pixel_values"? or "image" path}] into tensors:
    input_ids padded with pad_id (LLaVA pads with <unk> = 0), labels with -100, attention_mask 1 on real
    tokens; right padding for training, left for generation (prompts then end together). pixel_values (N_img,
    3, S, S) stacks the images in order, or None; an "image" without "pixel_values" is read at image_size."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    T = max(len(e["input_ids"]) for e in examples)
    def pad(seq, value, dtype):
        seq = seq.tolist() if torch.is_tensor(seq) else list(seq)
        fill = [value] * (T - len(seq))
        return torch.tensor(fill + seq if padding_side == "left" else seq + fill, dtype=dtype)
    batch = {"input_ids": torch.stack([pad(e["input_ids"], pad_id, torch.long) for e in examples]),
             "attention_mask": torch.stack([pad([1] * len(e["input_ids"]), 0, torch.long) for e in examples])}
    for key, value, dtype in (("labels", IGNORE_INDEX, torch.long), ("question_mask", False, torch.bool)):
        if all(key in e for e in examples):
            batch[key] = torch.stack([pad(e[key], value, dtype) for e in examples])
    images = [e["pixel_values"] if e.get("pixel_values") is not None
              else preprocess_image(e["image"], image_size)
              for e in examples if e.get("pixel_values") is not None or (image_size and e.get("image"))]
    batch["pixel_values"] = torch.stack(images) if images else None
    return batch

# -----------------------------------------------------------------------------
# LLaVA-Med stage 1, concept alignment: image-caption pairs -> one-turn "describe the image" instructions
# LLaVA-Med §3 "Biomedical Concept Alignment Data": for an image X_v and its caption X_c, sample a question
# X_q to describe the image and build "Human: X_q X_v<STOP>\n Assistant: X_c<STOP>\n", X_q concise or detailed
# by caption length. The lists are Tables 6 and 7 (App. A.2) verbatim: brief ones end with a period, detailed
# ones do not. microsoft/LLaVA-Med ships the JSON, not the code that built it, so the paper is the source.
ALIGN_BRIEF = [  # LLaVA-Med Table 6: "The list of instructions for brief image description."
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]
ALIGN_DETAILED = [  # LLaVA-Med Table 7: "The list of instructions for detailed image description."
    "Describe the following image in detail",
    "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see",
    "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image",
    "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner",
    "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative",
    "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation",
    "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
]
# LLaVA-Med §3: "In practice, 25% of captions have length less than 30 words in PMC-15M [51], and thus 30
# words is used as the cutoff point to determine which list to choose." So "short" means *less than* 30
# words: 29 or fewer -> brief list, 30 or more -> detailed list. Words = whitespace-separated tokens.
ALIGN_WORD_CUTOFF = 30


def alignment_instructions(caption):
    """The instruction list LLaVA-Med draws from for this caption: brief under 30 words, else detailed."""
    return ALIGN_BRIEF if len(caption.split()) < ALIGN_WORD_CUTOFF else ALIGN_DETAILED


def caption_to_alignment(record, rng):
    """One LLaVA-Med alignment record -> {"id", "image", "conversations": [{"from": "human", "value":
    "<image>\\n" + question}, {"from": "gpt", "value": caption}]}, image tag first as the reader puts it
    (STLLaVA-Med train.py preprocess_multimodal). record: {"id", "image", "conversations": [human, gpt]}
    (llava_med_alignment_500k.json; the caption is the first gpt turn, the human text is replaced) or {"id",
    "image", "caption"} (PMC-15M style). `rng` draws the question: random.Random(seed), or one per record
    (Random(f"{seed}-{id}")) for an order that does not depend on the file's."""
    caption = (record["caption"] if "caption" in record
               else next(t["value"] for t in record["conversations"] if t["from"] == "gpt")).strip()
    if not caption:
        raise ValueError(f"record {record.get('id')!r}: empty caption")
    question = rng.choice(alignment_instructions(caption))
    return {"id": record.get("id"), "image": record["image"],
            "conversations": [{"from": "human", "value": "<image>\n" + question},
                              {"from": "gpt", "value": caption}]}

# -----------------------------------------------------------------------------
# Replies: conversations in, the model's text out (evaluation, and both stages' sampling)

DESCRIBE = "Can you describe the image in detail?"  # the stage-2 opener (STLLaVA-Med llava/eval/visual_sq.py)


def load_images(paths, size):
    """(N, 3, size, size) pixel values of image files, padded to square (preprocess_image)."""
    return torch.stack([preprocess_image(p, size=size) for p in paths])


def copy_tokenizer(src, dst):
    """Copy the tokenizer files of model directory `src` into `dst`, so that `dst` loads alone."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def generate_text(model, tokenizer, conversations, pixel_values=None, template="vicuna_v1", max_new_tokens=64,
                  temperature=0.0, top_k=None, top_p=None, generator=None):
    """Replies of `model` to conversations whose last turn has value None: the one place prompts become text
    (evaluation, stage 2's sampling), left-padded; `generator`: one, or a list of one per row."""
    cfg = model.config
    prompts = [{"input_ids": encode_prompt(c, tokenizer, template, cfg.image_seq_length, cfg.image_token_id)}
               for c in conversations]
    b = collate(prompts, padding_side="left")
    device = model.lm_head.weight.device
    eos = cfg.text.eos_token_id
    pixels = None if pixel_values is None else pixel_values.to(device)
    new = generate(model, b["input_ids"].to(device), pixels, b["attention_mask"].to(device),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=eos, generator=generator).tolist()
    return [tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
            for row in new]


def questioner_turns(description=None):
    """Stage 2's turns (STLLaVA-Med `llava/eval/visual_sq.py`): describe, then ask ("...</s>VUSER:")."""
    opener = {"from": "human", "value": "<image>\n" + DESCRIBE}
    if description is None:
        return [opener, {"from": "gpt", "value": None}]
    # an untrained model may describe nothing; the template needs a non-empty turn
    return [opener, {"from": "gpt", "value": description or "."}, {"from": "vuser", "value": None}]


def ask_questions(model, tokenizer, image_paths, image_size, temperature=0.0, top_k=None, top_p=None,
                  generator=None, describe_tokens=64, question_tokens=32, descriptions=None):
    """Stage 2's questioner: each image described greedily (unless `descriptions` are given), then asked."""
    px = load_images(image_paths, image_size)
    if descriptions is None:
        descriptions = generate_text(model, tokenizer, [questioner_turns()] * len(px), px, "vicuna_v1_sq",
                                     describe_tokens)
    return generate_text(model, tokenizer, [questioner_turns(d) for d in descriptions], px, "vicuna_v1_sq",
                         question_tokens, temperature, top_k, top_p, generator)
