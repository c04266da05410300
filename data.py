"""Data for tagalign: the tokenizer, the tag parser and vocabulary, image-text shards, the
synthetic world.

Sections, top to bottom:
- tokenizer: CLIP's text cleaning (ftfy's fix_text, without the dependency) and CLIP-compatible
  byte-level BPE, trained on a corpus or read from CLIP's merges file (shipped in assets/);
- tag parser: captions -> (objects, attributes), its word lists read from words/, the tag
  vocabulary (optionally synonym-aware), offline tagging of corpora (the `tags` command);
- image-text shards: webdataset tars or caption tables streamed for paper-mode training, joined
  to the `tags` output, exactly resumable;
- the synthetic world: procedural images, captions and exact segmentation maps, and as shards;
- world batches and benchmarks: tensors for training, and the three world-* benchmarks.
"""
import functools
import gzip
import html
import io
import json
import math
import multiprocessing
import os
import re
import tarfile
import time
import unicodedata
from array import array
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import regex
import torch
from tqdm import tqdm


# ---------------------------------------------------------------- tokenizer: text cleaning (ftfy's fix_text)
# CLIP cleans every text with ftfy.fix_text (ftfy, by Robyn Speer: github.com/rspeer/python-ftfy,
# Apache-2.0) before BPE. _fix_text redoes what fix_text does with its default settings, in
# its order, for what real captions contain, so that ids equal OpenAI's without the dependency.
# The character tables restate ftfy's. Not covered: mojibake through encodings other than
# Windows-1252 / Latin-1 (ftfy also tries Windows-1250/1251/1253/1254/1257, ISO-8859-2, MacRoman,
# cp437), the repairs of damaged mojibake (an a0 byte turned into a space: "voilÃ le"; lost bytes
# shown as "�"), CESU-8, and ftfy's line-by-line treatment of multi-line text.

# unescape_html: named entities ending in ";" ("&rsquo;"), and the all-caps forms of lowercase
# names that html.unescape would not read ("&EACUTE;" -> "É"); "&#...;" when it decodes whole.
_ENTITIES = {"&" + k: v for k, v in html.entities.html5.items() if k.endswith(";")}
_ENTITIES |= {"&" + k.upper(): v.upper() for k, v in html.entities.html5.items()
              if k.endswith(";") and k == k.lower() and html.unescape("&" + k.upper()) == "&" + k.upper()}
_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
# One table for the per-character fixes (ftfy runs them one by one; as fix_text repeats its
# steps until nothing changes, the result is the same):
# fix_c1_controls: U+0080-U+009F read as Windows-1252 ("\x85" -> "…"), the 5 bytes it lacks stay;
_CP1252 = {chr(b): bytes([b]).decode("cp1252") for b in range(0x80, 0xA0) if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}
_CHAR_FIXES = dict(_CP1252)
# fix_latin_ligatures: Latin ligatures and digraphs -> letters (not æ or œ, written on purpose);
_CHAR_FIXES |= {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
                "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
                "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
# fix_character_width: full-width ASCII ("ＣＬＩＰ") and half-width kana / Hangul -> their NFKC
# form, the ideographic space U+3000 -> " ";
_CHAR_FIXES |= {chr(i): unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)} | {"\u3000": " "}
# uncurl_quotes: ʼ ‘ ’ ‚ ‛ -> ', “ ” „ ‟ -> ";
_CHAR_FIXES |= dict.fromkeys("ʼ‘’‚‛", "'") | dict.fromkeys("“”„‟", '"')
# fix_line_breaks: \r\n, \r, U+2028, U+2029 -> \n.
_CHAR_FIXES |= dict.fromkeys(["\r\n", "\r", "\u2028", "\u2029"], "\n")
_CHAR_FIX_RE = re.compile("|".join(map(re.escape, sorted(_CHAR_FIXES, key=len, reverse=True))))  # \r\n first
# remove_terminal_escapes ("\x1b[31m"), then remove_control_chars: C0 controls but \t \n \f \r,
# DEL, the deprecated format characters U+206A-U+206F, the BOM, U+FFF9-U+FFFC.
_CONTROL_RE = re.compile("\x1b\\[[0-9;]*[a-zA-Z]|[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
# fix_encoding: UTF-8 that was decoded as Windows-1252 or Latin-1 ("cafÃ©" for "café", "â€™"
# for "’"), one character per byte. _TO_LATIN1 maps Windows-1252's characters back to their bytes.
_TO_LATIN1 = {ord(c): ord(b) for b, c in _CP1252.items()}
_CONT = "[\x80-\xbf" + "".join(_CP1252.values()) + "]"  # a character that was a byte 80-bf
_SEQ = f"(?:[\xc2-\xdf]{_CONT}|[\xe0-\xef]{_CONT}{{2}}|[\xf0-\xf4]{_CONT}{{3}})"  # one UTF-8 character
_SEQ_RUN_RE = re.compile(f"{_SEQ}+")
_SEQ_START_RE = re.compile(f"[\xc2-\xf4]{_CONT}")  # 10x faster than _SEQ_RUN_RE to rule runs out
_C1_RE = re.compile("[\x80-\x9f]")  # C1 controls: no text has them but mojibake
_ODD_RE = re.compile("[\x80-\x9f¤¦¨¬¯¸ªºƒˆ˜†‡‰]")  # ...nor these, after a letter (ftfy's "bad" signs)


def _entity(m: re.Match) -> str:
    """One "&...;" as ftfy's unescape_html reads it; unknown names stay as they are."""
    if m[0] in _ENTITIES:
        return _ENTITIES[m[0]]
    u = html.unescape(m[0]) if m[0][1] == "#" else m[0]
    return m[0] if ";" in u else u  # "&#...;" only when read whole


def _mojibake(run: str, after: str) -> str | None:
    """`run` (would-be UTF-8 characters) decoded, when our rule calls it mojibake; else None.

    ftfy weighs "badness" over the whole text; our rule is simpler. A run that re-decodes is
    mojibake when it is two or more characters ("Ã©tÃ©", "Ð¿Ñ€Ð¸"), a Latin-1 character ("Ã©",
    "Â°"), an emoji, a 3-byte character (U+0800-U+FFFF: "â€™", "æ—¥") unless it reads as an
    accented letter and common punctuation ("é\xa0»" in French), or holds a sign that text
    never puts after a letter ("Ã¦", "Ä\x8d"), or a quote-like sign and a letter follows
    ("dÅ‚ugi"; `after` is the character after the run). Like ftfy, it leaves a single C1
    control ("Â€") and a few runs its rules miss ("Ã…", "â„¢").
    """
    try:
        u = run.translate(_TO_LATIN1).encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None
    if len(u) == 1 and (_C1_RE.match(u) or run in ("Ã…", "ÃŽ", "Ã’", "â„¢")):
        return None
    if (len(u) > 1 or run[0] in "ÂÃ" or len(run) == 4 or _ODD_RE.search(run)
            or (len(run) == 3 and (run[0] == "â" or run[1] not in "\xa0\xad·´–—…’"))
            or (run[1] in "¡«¿©‘‚“„•‹®»”›™" and after.isalpha())):
        return u
    return None


def _fix_encoding(text: str) -> str:
    """ftfy's fix_encoding, for UTF-8 read as Windows-1252 or Latin-1. When a run is mojibake,
    decode the whole text if it all re-decodes (ftfy's first choice), else the runs that are
    mojibake without looking at what follows them (its decode_inconsistent_utf8). Repeats until
    nothing changes, for mojibake of mojibake ("ÃƒÂ©" -> "Ã©" -> "é")."""
    while _SEQ_START_RE.search(text) and any(
            _mojibake(m[0], text[m.end():m.end() + 1]) for m in _SEQ_RUN_RE.finditer(text)):
        try:
            fixed = text.translate(_TO_LATIN1).encode("latin-1").decode("utf-8")
        except UnicodeError:
            fixed = _SEQ_RUN_RE.sub(lambda m: _mojibake(m[0], "") or m[0], text)
        if fixed == text:
            break
        text = fixed
    return text


def _fix_text(text: str) -> str:
    r"""ftfy.fix_text with its default settings, for captions (see the notes above).

    >>> _fix_text("ＣＬＩＰ ﬁsh, “cafe\u0301” or cafÃ©")
    'CLIP fish, "café" or café'
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        return text  # no step changes printable ASCII without entities (CLIP's captions, mostly)
    unescape = "<" not in text  # fix_text's unescape_html="auto": leave what may be HTML alone
    while True:  # fix_text repeats its steps until the text no longer changes
        before = text
        if unescape:
            text = _ENTITY_RE.sub(_entity, text)
        text = _fix_encoding(text)
        text = _CHAR_FIX_RE.sub(lambda m: _CHAR_FIXES[m[0]], text)
        # fix_surrogates: pair up UTF-16 surrogates, a lone one -> U+FFFD
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        text = _CONTROL_RE.sub("", text)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


# ---------------------------------------------------------------- tokenizer: byte-level BPE (CLIP-compatible)


_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokeniser: special tokens, English contractions, runs of letters, single digits,
# runs of anything else that is not a space. BPE then works inside each piece, never across.
_WORD_RE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)
_SPACE_RE = regex.compile(r"\s+")
# CLIP keeps lines 1..48894 of its merges file (line 0 is a version header), so that
# 256 bytes + 256 bytes</w> + 48894 merges + 2 specials = 49408 ids.
_CLIP_MERGES = 48894
# OpenAI CLIP's merges file, shipped in assets/ (MIT License, see assets/LICENSE-CLIP)
CLIP_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
_CACHE_MAX = 1 << 18  # words cached per tokenizer; bounds memory on huge corpora


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> one printable character, the map of openai/CLIP's simple_tokenizer.py (from GPT-2).

    The 188 bytes that are visible latin-1 characters stand for themselves; the other 68
    (controls, space, 0x7f-0xa0, 0xad) get chr(256 + k) in byte order. BPE can then work on
    str without spaces or control characters inside symbols. The dict order is the id order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(rest)}


_BYTE_SYM = _bytes_to_unicode()


def _words(text: str) -> list[str]:
    """Clean a text as CLIP does, then split it into pre-tokens.

    CLIP's basic_clean: ftfy.fix_text (here _fix_text), HTML unescaped twice ("&amp;amp;" ->
    "&"), stripped; then whitespace_clean: runs of white space -> " "; then lowercase.
    """
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    text = _SPACE_RE.sub(" ", text).strip().lower()
    return _WORD_RE.findall(text)


def _symbols(word: str) -> list[str]:
    """A pre-token as byte symbols; the last one carries the word-end marker </w>."""
    s = "".join(_BYTE_SYM[b] for b in word.encode("utf-8"))
    return [*s[:-1], s[-1] + "</w>"]


def _merge(parts: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` in `parts`, left to right, by the joined symbol."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


class Tokenizer:
    """Byte-level BPE with CLIP's vocabulary layout; trains its own merges or reads CLIP's.

    ids: 0..255 the byte symbols (in `_bytes_to_unicode` order), 256..511 the same with the
    word-end marker </w>, then one id per merge in rank order, then <|startoftext|> and
    <|endoftext|> last, so eot_id = vocab_size - 1 is the largest id in any sequence (the text
    model finds the EOT position by argmax, as CLIP does).

    Layout and pre-tokenisation follow openai/CLIP's simple_tokenizer.py; the code is ours.

    Worked example, with CLIP's merges file (rank r = line r + 1 of the file, id 512 + r):
        "A photo of a cat."  -> cleaned "a photo of a cat."
        pre-tokens           -> ["a", "photo", "of", "a", "cat", "."]
        "a"  is one byte     -> "a</w>"  = 256 + 64 (byte 'a' is the 65th symbol)   = 320
        "photo": p h o t o</w>; apply the lowest-ranked merge present, until none applies:
            pairs ranked  p h: 233, h o: 94, o t: 1351, t o</w>: 19
            rank  19 "t o</w>"   -> p h o to</w>
            rank  94 "h o"       -> p ho to</w>
            rank 304 "p ho"      -> pho to</w>
            rank 613 "pho to</w>"-> photo</w>                              = 512 + 613 = 1125
        "of": rank 27 -> 539; "cat": rank 24 "a t</w>", rank 1856 "c at</w>" -> 2368
        "."  is one byte     -> ".</w>" = 256 + 13                                  = 269
        encode(...)          -> [320, 1125, 539, 320, 2368, 269]
        tok(["A photo of a cat."]) -> [[49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, ...]]
    """

    def __init__(self, merges: list[tuple[str, str]]):
        base = list(_BYTE_SYM.values())
        made = set(base) | {s + "</w>" for s in base}  # symbols a merge may join
        self.merges = []
        for r, m in enumerate(merges):
            if not (isinstance(m, (tuple, list)) and len(m) == 2 and m[0] in made and m[1] in made):
                raise ValueError(f"merge {r}: expected a pair of known symbols, got {m!r}")
            self.merges.append((m[0], m[1]))
            made.add(m[0] + m[1])
        vocab = base + [s + "</w>" for s in base] + [a + b for a, b in self.merges] + [_SOT, _EOT]
        self.vocab = vocab  # id -> symbol
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = len(vocab) - 2, len(vocab) - 1
        self._id = {s: i for i, s in enumerate(vocab)}  # symbol -> id (a repeated symbol keeps the last id, as CLIP)
        self._rank = {m: r for r, m in enumerate(self.merges)}
        # id -> the bytes it stands for; </w> becomes a space, specials decode to nothing
        sym_byte = {c: b for b, c in _BYTE_SYM.items()}
        self._bytes = [bytes(sym_byte[c] for c in s.removesuffix("</w>")) + b" " * s.endswith("</w>")
                       for s in vocab[:-2]] + [b"", b""]
        self._cache = {_SOT: [self.sot_id], _EOT: [self.eot_id]}  # pre-token -> ids

    @classmethod
    def from_clip(cls, path: str = CLIP_BPE) -> "Tokenizer":
        """Read OpenAI CLIP's merges file (bpe_simple_vocab_16e6.txt.gz; by default the copy in assets/)."""
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: CLIP merges file not found (bpe_simple_vocab_16e6.txt.gz)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a gzip-compressed CLIP merges file ({e})") from None
        merges = [tuple(line.split()) for line in lines[1:_CLIP_MERGES + 1]]
        if "#version" not in lines[0] or len(merges) < _CLIP_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: not a CLIP merges file (expected a '#version' header, then "
                             f"{_CLIP_MERGES} lines 'a b')")
        return cls(merges)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn merges on a corpus until the vocabulary has `vocab_size` ids (or no pair is left).

        Word-frequency BPE (Sennrich et al. 2016): merges never cross pre-tokens, so each
        distinct word is stored once with its count. Each step merges the most frequent
        adjacent pair; ties go to the smallest pair in string order, so training is deterministic.
        """
        n_merges = vocab_size - 2 * 256 - 2
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size}: must be at least 514 (2 x 256 byte symbols + 2 specials)")
        texts = [texts] if isinstance(texts, str) else texts
        freq = Counter(w for text in texts for w in _words(text) if w not in (_SOT, _EOT))
        words, counts = [_symbols(w) for w in freq], list(freq.values())
        # pair -> total count, and pair -> the words holding it, so a merge revisits only those
        # words (entries may go stale: re-counting a word without the pair changes nothing)
        pair_n, where = Counter(), defaultdict(set)
        for i, (w, n) in enumerate(zip(words, counts)):
            for p in zip(w, w[1:]):
                pair_n[p] += n
                where[p].add(i)
        merges = []
        while len(merges) < n_merges and pair_n:
            top = max(pair_n.values())
            best = min(p for p, n in pair_n.items() if n == top)
            merges.append(best)
            for i in where.pop(best):
                w, n = words[i], counts[i]
                for p in zip(w, w[1:]):
                    pair_n[p] -= n
                words[i] = w = _merge(w, best)
                for p in zip(w, w[1:]):
                    pair_n[p] += n
                    where[p].add(i)
            pair_n = +pair_n  # drop pairs whose count fell to zero
        return cls(merges)

    def _bpe(self, word: str) -> list[int]:
        """ids of one pre-token: apply the lowest-ranked merge present until none applies."""
        parts = _symbols(word)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self._rank.get(p, len(self._rank)))
            if pair not in self._rank:
                break
            parts = _merge(parts, pair)
        return [self._id[s] for s in parts]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start and end tokens."""
        ids = []
        for w in _words(text):
            w_ids = self._cache.get(w)
            if w_ids is None:
                w_ids = self._bpe(w)
                if len(self._cache) < _CACHE_MAX:
                    self._cache[w] = w_ids
            ids.extend(w_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids: specials dropped, each word end (</w>) becomes a space."""
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        # a cut inside a multi-byte character decodes to U+FFFD rather than failing
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def __call__(self, texts: list[str] | str, context_length: int = 77) -> torch.Tensor:
        """(B, context_length) int64: <sot> ids <eot>, zero padded. Too long texts are cut and
        keep <eot> last, as CLIP's tokenize(..., truncate=True)."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: must be at least 2 (start and end tokens)")
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = [self.sot_id, *self.encode(text)[:context_length - 2], self.eot_id]
            rows.append(ids + [0] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), context_length)  # (B, L)

    def state_dict(self) -> dict:
        """Plain python (lists of str) to store in a checkpoint; see from_state_dict."""
        return {"merges": [[a, b] for a, b in self.merges]}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Tokenizer":
        if not isinstance(d, dict) or "merges" not in d:
            raise ValueError("tokenizer state: expected a dict with 'merges' (from Tokenizer.state_dict())")
        return cls(d["merges"])


# ---------------------------------------------------------------- tag parser
# Rule-based caption tag parser, tag vocabulary and offline tagging.
#
# TagAlign's authors never released their tagger. Ours is a regex tokenizer, word lists written
# for this project (words/) and a small noun-phrase grammar:
#
#     "A man in a red shirt riding a bike down a busy street."
#      a/D man/N in/P a/D red/A shirt/N riding/G a/D bike/N down/P a/D busy/J street/N
#      -> objects ['man', 'shirt', 'bike', 'street'], attributes ['red']
#
# Every word maps by one dict lookup to a precomputed entry (class, lemma, noun kind, attribute
# reading, flags); the parser walks the entries once. A noun phrase is a run of adjectives and
# nouns; its head, the last noun, is an object when it names a concrete thing, and the listed
# adjectives in it are attributes. The rules that make it hold up on real captions:
# - multi-word names are merged longest-first ("traffic light", "hot dog", "living room");
# - a material or colour noun before a head is an attribute ("stone wall" -> wall + stone,
#   "orange cat" -> cat + orange); as a head it is an object ("an orange", "broken glass");
# - quantity frames ("group of"), position words ("top of") and the medium ("photo of",
#   "vector illustration") are no objects; a medium noun after a noun yields that noun
#   ("cartoon cat illustration" -> cat);
# - "no", "not", "without" drop the next phrase, and phrases joined to it by "or";
# - a noun that is also a verb form is the verb after its subject ("a man skis down");
# - -ing and -ed words are never attributes unless listed as a visible state ("sliced").
# Unknown words get a class from their suffix (-ly adverb, -ous/-ful/... adjective, -ing/-ed
# participle) or else count as nouns, so rare concrete nouns still become objects.


# ---------------------------------------------------------------- tag parser: word lists
# One plain-text file per list in words/ (format, and which list wins for a word in several:
# words/README.md), so that the parser learns a word without a code change. Each file is read
# once, at import, by _build_table.
_WORDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "words")
_LIST_WORD = r"[a-z0-9]+(?:['_-][a-z0-9]+)*"  # "traffic_light", "t-shirt", "n't", "3d"
_LIST_WORD_RE = re.compile(_LIST_WORD)
_LIST_NOUN_RE = re.compile(rf"{_LIST_WORD}(?:/(?:=|{_LIST_WORD}))?")  # + "goose/geese", "sheep/="


def _word_list(name, plurals=False):
    """Entries of words/<name>, "_" turned into spaces. A line holds one entry, "#" starts a
    comment; plurals: an entry may give its plural ("goose/geese", "sheep/=")."""
    path = os.path.join(_WORDS_DIR, name)
    entry_re = _LIST_NOUN_RE if plurals else _LIST_WORD_RE
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            w = line.partition("#")[0].strip()
            if not w:
                continue
            if not entry_re.fullmatch(w):
                want = "one lower-case word" + (' (or "word/plural", "word/=")' if plurals else "")
                raise ValueError(f"{path}:{i}: expected {want} a line, '_' joining the words of a "
                                 f"name; got {w!r}")
            out.append(w.replace("_", " "))
    return out


# ---------------------------------------------------------------- tag parser: word table
# Word classes: noun, attribute adjective, other adjective, participle (-ing/-ed), determiner,
# preposition, conjunction, other phrase-ending word, negator, skipped symbol, hard break.
_N, _A, _J, _G, _C, _SKIP, _D, _P, _X, _NEG, _END = range(11)
# Noun kinds: object, abstract, position, medium, quantity frame, weak head, and the two that
# depend on a following "of" (medium or object, quantity or object).
_OBJ, _ABS, _POS, _MED, _QTY, _WEAK, _MED_OBJ, _QTY_OBJ = range(8)
# Flags.
_PL = 1  # plural noun form
_ANIM = 2  # person, animal or vehicle: a likely subject of a verb
_VB_S = 4  # the word is also a verb's -s form ("skis")
_VB_BASE = 8  # ... a verb's base form ("ski")
_VB_PART = 16  # ... an -ing/-ed/irregular verb form ("building")
_POSS = 32  # possessive noun ("man's"): the phrase ends after it
_SUBJ = 64  # he/she/to/can...: a noun-or-verb word after it is the verb
_OR = 128  # "or", "nor", ",": extends a negation to the next phrase
_VERB = 256  # a finite verb: "and" after it joins verbs ("stands and watches")
_NOUN = 512  # parser state only: the previous word was a noun
_SIZE = 1024  # a size adjective: dropped on a quantity frame ("a large group of")
_GUESS = 2048  # a word the lists do not know, read as a noun
_VB_ANY = _VB_S | _VB_BASE | _VB_PART
_PL_ANIM = _PL | _ANIM

_IRREGULAR_F = {"knife": "knives", "wife": "wives", "leaf": "leaves", "loaf": "loaves",
                "shelf": "shelves", "wolf": "wolves", "calf": "calves", "half": "halves",
                "scarf": "scarves", "life": "lives", "hoof": "hooves", "elf": "elves",
                "thief": "thieves"}
_NOT_MEN = {"human", "german", "shaman", "caiman", "ottoman", "talisman", "walkman", "doberman"}


def _plural(w):
    """Regular English plural of a (possibly multi-word) noun: the last word is inflected."""
    head, _, last = w.rpartition(" ")
    if last in _IRREGULAR_F:
        p = _IRREGULAR_F[last]
    elif last.endswith("man") and last not in _NOT_MEN:
        p = last[:-3] + "men"
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        p = last + "es"
    elif last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return head + " " + p if head else p


def _singular(w):
    """Best-guess singular of an unknown word ending in s (used only for unknown words)."""
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return w[:-2]
    if w.endswith(("ss", "us", "is")) or len(w) < 4:
        return w
    return w[:-1]


def _verb_forms(v):
    """(-s form, [-ed forms], [-ing forms]) of a verb. A consonant-vowel-consonant ending gets
    both the doubled and the plain form ("sitting", "visiting"); the unused one is harmless."""
    if v.endswith(("s", "x", "z", "ch", "sh", "o")):
        s = v + "es"
    elif v.endswith("y") and v[-2] not in "aeiou":
        s = v[:-1] + "ies"
    else:
        s = v + "s"
    cvc = len(v) > 2 and v[-1] not in "aeiouwxy" and v[-2] in "aeiou" and v[-3] not in "aeiou"
    if v.endswith("ie"):
        ing = [v[:-2] + "ying"]
    elif v.endswith("e") and not v.endswith(("ee", "oe", "ye")):
        ing = [v[:-1] + "ing"]
    else:
        ing = [v + "ing"] + ([v + v[-1] + "ing"] if cvc else [])
    if v.endswith("e"):
        ed = [v + "d"]
    elif v.endswith("y") and v[-2] not in "aeiou":
        ed = [v[:-1] + "ied"]
    else:
        ed = [v + "ed"] + ([v + v[-1] + "ed"] if cvc else [])
    return s, ed, ing


def _build_table():
    """Map every known surface form (and multi-word name) to its entry
    (class, lemma, noun kind, attribute reading or None, flags)."""
    table = {}
    verb = {}  # surface -> verb flag
    for v in _word_list("verbs.txt"):
        s, ed, ing = _verb_forms(v)
        verb[v] = verb.get(v, 0) | _VB_BASE
        verb[s] = verb.get(s, 0) | _VB_S
        for f in ed + ing:
            verb[f] = verb.get(f, 0) | _VB_PART
    for f in _word_list("irregular_verb_forms.txt"):
        verb[f] = verb.get(f, 0) | _VB_PART
    for f, fl in verb.items():  # finite forms end a phrase, participles may sit inside one
        table[f] = (_X, f, 0, None, _VERB) if fl & (_VB_BASE | _VB_S) else (_G, f, 0, None, 0)
    for w in _word_list("other_adjectives.txt"):
        table[w] = (_J, w, 0, None, 0)

    # Nouns, in rising precedence. Plurals are written first and singulars after, so a listed
    # word ("woods", "glasses") wins over another word's plural.
    nouns = []  # (word, plural or None, kind, attribute reading, flags)

    def add(name, kind, attr=False, flags=0, plural=True):
        for item in _word_list(name, plurals=plural):
            w, _, p = item.partition("/")
            p = w if p == "=" else (p or (_plural(w) if plural else None))
            nouns.append((w, p, kind, w if attr else None, flags))

    add("animate_nouns.txt", _OBJ, flags=_ANIM)
    add("object_nouns.txt", _OBJ)
    add("plural_only_nouns.txt", _OBJ, flags=_PL, plural=False)
    add("abstract_nouns.txt", _ABS)
    add("position_nouns.txt", _POS)
    add("medium_nouns.txt", _MED)
    add("medium_or_object_nouns.txt", _MED_OBJ)
    add("quantity_nouns.txt", _QTY)
    add("quantity_or_object_nouns.txt", _QTY_OBJ, flags=_ANIM)
    add("weak_nouns.txt", _WEAK)
    for w, p, kind, attr, fl in nouns:
        if p is not None and p != w:
            table[p] = (_N, w, kind, None, fl | _PL)
    for w, p, kind, attr, fl in nouns:
        table[w] = (_N, w, kind, attr, fl | (_PL if p == w and p is not None else 0))
    for w in _word_list("attributes.txt"):
        table[w] = (_A, w, 0, w, 0)
    for w in _word_list("attributes_size.txt"):  # dropped on a quantity frame (_close)
        table[w] = (_A, w, 0, w, _SIZE)
    # Materials and colour nouns: an attribute as a modifier, an object as a head.
    for w in _word_list("material_nouns.txt") + _word_list("dual_nouns.txt"):
        fl = table[w][4] if w in table and table[w][0] == _N else 0
        table[w] = (_N, w, _OBJ, w, fl & _ANIM)
        p = _plural(w)
        if table.get(p, (None,))[0] != _N:
            table[p] = (_N, w, _OBJ, None, _PL)
    # A noun that is also a verb form remembers it; the parser decides by context.
    for f, fl in verb.items():
        e = table[f]
        if e[0] == _N:
            table[f] = e[:4] + (e[4] | fl,)

    # Closed classes last: they win over everything.
    for w in _word_list("determiners.txt"):
        table[w] = (_D, w, 0, None, 0)
    for w in _word_list("prepositions.txt"):
        table[w] = (_P, w, 0, None, 0)
    for w in _word_list("other_words.txt"):
        table[w] = (_X, w, 0, None, 0)
    for w in _word_list("subject_words.txt"):
        table[w] = (_P if w == "to" else _X, w, 0, None, _SUBJ)
    for w in _word_list("negators.txt"):
        table[w] = (_NEG, w, 0, None, 0)
    for w in ("and", "but", "&", "/", "+"):
        table[w] = (_C, w, 0, None, 0)
    for w in ("or", "nor", ","):
        table[w] = (_C, w, 0, None, _OR)
    for w in ". ; : ! ? ( ) [ ] { } | \" \u201c \u201d".split():
        table[w] = (_END, w, 0, None, 0)
    table["no one"] = (_X, "no one", 0, None, 0)
    table["each other"] = (_X, "each other", 0, None, 0)
    return table


_TABLE = _build_table()
# Multi-word names by first word: the longest name's length, and the words that can follow.
_FIRSTS, _SECONDS = {}, {}
for _name in _TABLE:
    if " " in _name:
        _ws = _name.split(" ")
        _FIRSTS[_ws[0]] = max(_FIRSTS.get(_ws[0], 0), len(_ws))
        _SECONDS.setdefault(_ws[0], set()).add(_ws[1])
_FIRST_WORDS = frozenset(_FIRSTS)
del _name, _ws
_OF = _TABLE["of"]
_END_ENTRY = _TABLE["."]
_SKIP_ENTRY = (_SKIP, "", 0, None, 0)
_NUMBER_ENTRY = (_D, "#", 0, None, 0)
_ADVERB_ENTRY = (_X, "", 0, None, 0)
_ADJECTIVE_ENTRY = (_J, "", 0, None, 0)
_PARTICIPLE_ENTRY = (_G, "", 0, None, 0)
_NEG_ENTRY = _TABLE["not"]
_ADJECTIVE_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "ical", "less", "ish", "esque", "etic",
                       "atic", "istic", "ific", "onic")
_CACHE_LIMIT = 200_000  # unknown words remembered per process (bounds memory on web corpora)
_CACHED = [0]

# Tokens: words with inner apostrophes or hyphens ("t-shirt", "man's"), or one symbol. Plain
# lower-case ASCII captions (most of them) take a faster path: split on spaces after
# separating commas and periods, which gives the same tokens.
_TOKEN_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*|[^\w\s]")
_NOT_PLAIN = re.compile(r"[^a-z0-9 ,.'\-]")


def _classify(w):
    """Entry for a word missing from the table, from its form; remembered up to a limit."""
    core = w.strip("'-")
    if not core or not core[0].isalnum():
        e = _SKIP_ENTRY
    elif core != w:  # "'hello'", "x-" from the fast tokenizer
        e = _TABLE.get(core) or _classify(core)
    elif "'" in w:
        base, _, suffix = w.partition("'")
        if w.endswith("n't"):
            e = _NEG_ENTRY
        else:
            b = _TABLE.get(base) or _classify(base)
            # "man's" is a possessor that ends its phrase; "it's", "we're" are what they start.
            e = b[:4] + (b[4] | _POSS,) if b[0] == _N and suffix == "s" else b
    elif any(ch.isdigit() for ch in w):
        e = _NUMBER_ENTRY
    elif "-" in w:
        parts = w.split("-")
        e = _TABLE.get(" ".join(parts))  # "hot-dog" -> "hot dog"
        if e is None:
            last = parts[-1]
            if last == "shaped":
                e = (_A, w, 0, w, 0)
            elif last in ("colored", "coloured", "color", "colour"):
                e = _TABLE.get(parts[0]) or _ADJECTIVE_ENTRY
                if e[0] != _A:
                    e = _ADJECTIVE_ENTRY
            else:  # "snow-covered" -> participle, "e-bike" -> bike
                e = _TABLE.get(last) or _classify(last)
    elif len(w) > 4 and w.endswith("ly"):
        e = _ADVERB_ENTRY
    elif len(w) > 5 and w.endswith("ing") or len(w) > 4 and w.endswith("ed"):
        e = _PARTICIPLE_ENTRY
    elif len(w) > 5 and w.endswith(_ADJECTIVE_SUFFIXES):
        e = _ADJECTIVE_ENTRY
    elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        s = _singular(w)
        b = _TABLE.get(s)
        if b is not None:  # "zebras" -> zebra (if its plural was not listed), "ones" -> one
            e = (_N, b[1], b[2], None, b[4] | _PL) if b[0] == _N else b
        else:  # an unknown plural noun, or the -s form of an unknown verb after its subject
            e = (_N, s, _OBJ, None, _PL | _VB_S | _GUESS)
    else:
        e = (_N, w, _OBJ, None, _VB_BASE | _GUESS)  # an unknown noun (or a base verb)
    if _CACHED[0] < _CACHE_LIMIT:
        _TABLE[w] = e
        _CACHED[0] += 1
    return e


def _merge_names(toks, hits):
    """Join the words of multi-word names, longest first: ["hot", "dog"] -> ["hot dog"].
    hits: the tokens that start some name. Most captions have such a word ("street") but
    not one that can follow it, which two set tests find without a loop over the tokens."""
    firsts = [w for w in hits if not _SECONDS[w].isdisjoint(toks)]
    if not firsts:
        return toks
    out, i, n = [], 0, len(toks)
    for j in [j for j, w in enumerate(toks) if w in firsts]:
        if j < i or j + 1 == n or toks[j + 1] not in _SECONDS[toks[j]]:
            continue
        for L in range(min(_FIRSTS[toks[j]], n - j), 1, -1):
            name = " ".join(toks[j:j + L])
            if name in _TABLE:
                out += toks[i:j]
                out.append(name)
                i = j + L
                break
    out += toks[i:]
    return out


# ---------------------------------------------------------------- tag parser: the parser
def _close(phrase, neg, of_next, objects, attributes):
    """Emit a closed noun phrase: its head to objects, its attributes to attributes, unless a
    negator waits for it (then it is dropped). Returns whether it was negated.
    phrase: entries, the head last (a phrase without a noun has only attributes);
    of_next: the phrase is followed by "of" ("group of", "photo of")."""
    if neg:
        return True
    head = phrase[-1]
    mods = phrase
    if head[0] == _N:
        mods = phrase[:-1]
        kind = head[2]
        if kind == _MED_OBJ:
            kind = _MED if of_next else _OBJ
        elif kind == _QTY_OBJ:
            kind = _QTY if of_next else _OBJ
        obj = None
        if kind == _OBJ:
            # "glasses of wine" are drinking glasses, not spectacles
            obj = "glass" if of_next and head[1] == "glasses" else head[1]
        elif kind == _MED or kind == _WEAK:
            # "cartoon cat illustration" -> cat; "a heart shape" -> heart
            if mods and mods[-1][0] == _N and mods[-1][2] == _OBJ:
                obj = mods[-1][1]
                mods = mods[:-1]
            elif kind == _WEAK:
                obj = head[1]
        elif kind == _POS:
            return False  # "the left side of": no object, no attributes
        elif kind == _QTY:  # "a large group of": its size is not the members'; colours are
            mods = [m for m in mods if not m[4] & _SIZE]
        if obj is not None and obj not in objects:
            objects.append(obj)
    for m in mods:
        a = m[3]
        if a is not None and a not in attributes:
            attributes.append(a)
    return False


def parse_caption(text):
    """Objects and attributes of a caption, before any vocabulary filtering.

    Returns two lists of lower-case strings, de-duplicated, in order of appearance:
    objects as singular lemmas (multi-word names kept whole), attributes as written.

    >>> parse_caption("A man in a red shirt riding a bike down a busy street.")
    (['man', 'shirt', 'bike', 'street'], ['red'])
    >>> parse_caption("wooden chairs and a round table in a sunny garden")
    (['chair', 'table', 'garden'], ['wooden', 'round', 'sunny'])
    >>> parse_caption("a room with no people, a man skis down a stone wall")
    (['room', 'man', 'wall'], ['stone'])
    """
    low = text.lower().replace("-and-", " and ")  # "black-and-white" -> black, white
    if _NOT_PLAIN.search(low) is None:
        toks = low.replace(",", " , ").replace(".", " . ").split()
    else:
        toks = _TOKEN_RE.findall(low.replace("\u2019", "'"))
    hits = _FIRST_WORDS.intersection(toks)
    if hits:
        toks = _merge_names(toks, hits)
    get = _TABLE.get
    ents = [get(w) or _classify(w) for w in toks]
    ents.append(_END_ENTRY)
    objects, attributes = [], []
    phrase = []  # entries of the open noun phrase: adjectives, modifier nouns, the head last
    neg = False  # a negator waits for its phrase
    neg_or = False  # the last phrase was negated: "or" negates the next one too
    subj = 0  # after a noun: _NOUN (+_PL, +_ANIM); after "he", "to", a verb and "and": _SUBJ
    vchain = False  # a verb came last, through adjectives and prepositions
    for i, e in enumerate(ents):
        cls = e[0]
        if cls == _N:
            fl = e[4]
            # A noun that is also a verb form, right after a subject, is the verb: "a man skis
            # down", "he skis", "to ski", "stands and watches", "the food looks good". After a
            # noun, agreement decides; after a thing, a concrete noun stays a noun ("tea
            # leaves", "city lights").
            if not (fl & _VB_ANY and subj and (
                    subj & _SUBJ or (subj & _ANIM or e[2] != _OBJ) and (
                        fl & _VB_S and not subj & _PL or fl & _VB_BASE and subj & _PL
                        or fl & _VB_PART))):
                phrase.append(e)
                subj = fl & _PL_ANIM | _NOUN
                vchain = False
                if fl & _POSS:  # "the boy's bicycle": the possessor is a phrase of its own
                    neg_or = _close(phrase, neg, False, objects, attributes)
                    neg, phrase, subj = False, [], 0
                continue
            if phrase:  # the verb ends the phrase
                neg_or = _close(phrase, neg, False, objects, attributes)
                neg, phrase = False, []
            subj, vchain = 0, True
        elif cls >= _D:  # determiners, prepositions, other words, negators, the end
            if phrase:
                neg_or = _close(phrase, neg, e is _OF, objects, attributes)
                neg, phrase = False, []
            if cls == _D:
                subj, vchain = 0, False
            elif cls == _P:
                subj = e[4]  # _SUBJ for "to"
            elif cls == _X:
                subj = e[4] & _SUBJ
                if e[4] & _VERB:
                    vchain = True
            elif cls == _NEG:
                neg, subj = True, 0
            else:  # _END
                neg = neg_or = vchain = False
                subj = 0
        elif cls <= _J:  # adjectives
            # An adjective after a plain noun starts a new phrase ("a cat, black and ..."),
            # unless that "noun" was an unknown word: then it modified the adjective ("lush
            # green field") and is dropped.
            if phrase and phrase[-1][3] is None and phrase[-1][0] == _N:
                if phrase[-1][4] & _GUESS:
                    phrase.pop()
                else:
                    neg_or = _close(phrase, neg, False, objects, attributes)
                    neg, phrase = False, []
            if cls == _A:
                phrase.append(e)
            subj = 0
        elif cls == _G:  # a participle ends a phrase that has its head, else it is skipped
            if phrase and phrase[-1][0] == _N:
                neg_or = _close(phrase, neg, False, objects, attributes)
                neg, phrase = False, []
            subj, vchain = 0, True
        elif cls == _C:
            # "black and white cat", "stone and brick wall": adjectives joined inside a phrase.
            nxt = ents[i + 1]
            if phrase and not (phrase[-1][3] is not None and nxt[3] is not None
                               and (nxt[0] == _A or nxt[0] == _N and not nxt[4] & _PL)):
                neg_or = _close(phrase, neg, False, objects, attributes)
                neg, phrase = False, []
            # "no cars or people", "no cats, dogs or birds"; not "no people, a man ..."
            if e[4] & _OR and neg_or and (e[1] != "," or nxt[0] != _D):
                neg = True
            subj = _SUBJ if vchain else 0
    return objects, attributes


def score_tags(gold, pred):
    """Micro precision, recall and F1 of predicted tags against gold, for objects and
    attributes separately. gold, pred: sequences of (objects, attributes) pairs, one per caption.
    Returns {"objects": {"precision", "recall", "f1", "tp", "fp", "fn"}, "attributes": {...}}."""
    out = {}
    for k, name in enumerate(("objects", "attributes")):
        tp = fp = fn = 0
        for g, p in zip(gold, pred, strict=True):
            g, p = set(g[k]), set(p[k])
            tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[name] = {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
    return out


# ---------------------------------------------------------------- tag vocabulary
def read_synonyms(path):
    """Synonym groups from a word-list file: one group a line, the tag that stands for the group
    first ("grass lawn field"), "_" joining the words of a multi-word name, "#" comments.
    Returns {name: the group's first name} for the others; a name in two groups is an error."""
    canon = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--synonyms {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            names = [w.replace("_", " ") for w in line.split("#")[0].lower().split()]
            for i, w in enumerate(names):  # the group's name may not be another group's synonym
                if w in canon or (i and (w == names[0] or w in canon.values())):
                    raise ValueError(f"{path}:{n}: {w!r} is in two synonym groups")
                if i:
                    canon[w] = names[0]
    return canon


def _caption_tags(text, synonyms=None):
    """Tags of one caption as counted and encoded: its objects, then its attributes that are
    not also objects ("an orange cat next to an orange" counts "orange" once); with synonyms
    (read_synonyms), each name replaced by its group's, counted once."""
    objects, attributes = parse_caption(text)
    if synonyms:
        objects = list(dict.fromkeys(synonyms.get(t, t) for t in objects))
        attributes = list(dict.fromkeys(synonyms.get(t, t) for t in attributes))
    return objects, [a for a in attributes if a not in objects]


class TagVocab:
    """The K tags of TagAlign's classification loss: objects first, then attributes, one index
    space. A name is one tag even if captions use it both ways ("orange").

    tags: list[str]; kinds: "object" or "attribute" per tag; counts: number of captions of the
    building corpus that mention the tag; index: name -> position; meta: what built it, with
    meta["synonyms"] the synonym map applied to parsed names (read_synonyms), if any."""

    def __init__(self, tags, kinds, counts, meta=None):
        if not len(tags) == len(kinds) == len(counts):
            raise ValueError(f"TagVocab: {len(tags)} tags, {len(kinds)} kinds, {len(counts)} counts")
        if any(k not in ("object", "attribute") for k in kinds):
            raise ValueError("TagVocab: kinds must be 'object' or 'attribute'")
        self.tags, self.kinds, self.counts = list(tags), list(kinds), [int(c) for c in counts]
        self.index = {t: i for i, t in enumerate(self.tags)}
        if len(self.index) != len(self.tags):
            raise ValueError("TagVocab: duplicate tag names")
        self.meta = dict(meta or {})
        self.synonyms = self.meta.get("synonyms") or {}

    @classmethod
    def from_tags(cls, tags, synonyms=None):
        """A vocabulary from tag names alone (e.g. a checkpoint's): a name the parser reads
        as an attribute adjective is an attribute, anything else an object; counts are 0."""
        kinds = ["attribute" if _TABLE.get(t, (None,))[0] == _A else "object" for t in tags]
        return cls(tags, kinds, [0] * len(tags), {"synonyms": synonyms} if synonyms else None)

    def __len__(self):
        return len(self.tags)

    def __repr__(self):
        n_obj = self.kinds.count("object")
        return f"TagVocab({n_obj} objects + {len(self) - n_obj} attributes)"

    def encode(self, caption):
        """Indices of the caption's tags that are in the vocabulary, objects first.
        >>> TagVocab(["cat", "black"], ["object", "attribute"], [1, 1]).encode("A black cat.")
        [0, 1]
        """
        objects, attributes = _caption_tags(caption, self.synonyms)
        index, out = self.index, []
        for t in objects:
            j = index.get(t)
            if j is not None:
                out.append(j)
        for t in attributes:
            j = index.get(t)
            if j is not None and j not in out:
                out.append(j)
        return out

    def save(self, path):
        """Write vocab.json atomically (a temporary file, then a rename)."""
        data = {"format": "tagalign-tags/1", "tags": self.tags, "kinds": self.kinds,
                "counts": self.counts, **self.meta}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"tag vocabulary not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a tag vocabulary (bad JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != "tagalign-tags/1":
            raise ValueError(f"{path}: not a tag vocabulary written by `tagalign.py tags`")
        meta = {k: v for k, v in data.items() if k not in ("format", "tags", "kinds", "counts")}
        try:
            return cls(data["tags"], data["kinds"], data["counts"], meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: broken tag vocabulary ({e})") from None


def _check_vocab_args(top_objects, top_attributes, min_count):
    for flag, v, low in (("--top-objects", top_objects, 0), ("--top-attributes", top_attributes, 0),
                         ("--min-count", min_count, 1)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {v!r}")


def _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count, meta=None):
    """The most frequent objects and attributes (ties by name, so the result is deterministic);
    an attribute whose name is already an object tag is not added twice."""
    def top(counts, k, taken):
        ranked = sorted((-c, t) for t, c in counts.items() if c >= min_count and t not in taken)
        return [t for _, t in ranked[:k]]

    objects = top(object_counts, top_objects, ())
    attributes = top(attribute_counts, top_attributes, set(objects))
    tags = objects + attributes
    counts = [object_counts.get(t, 0) + attribute_counts.get(t, 0) for t in tags]
    kinds = ["object"] * len(objects) + ["attribute"] * len(attributes)
    params = {"top_objects": top_objects, "top_attributes": top_attributes, "min_count": min_count}
    return TagVocab(tags, kinds, counts, {"params": params, **(meta or {})})


def build_vocab(captions, top_objects=9000, top_attributes=1000, min_count=5, synonyms=None):
    """Count the tags of an iterable of captions and keep the most frequent ones.

    The paper keeps the top 10,000 tags. Attributes are a closed class (the parser knows a few
    hundred), so 1,000 slots hold all that occur and the other 9,000 go to objects; a tag seen
    in fewer than min_count captions is too rare to learn and is often a typo. synonyms: a
    read_synonyms map; each group then counts as one tag, named by its first name."""
    _check_vocab_args(top_objects, top_attributes, min_count)
    object_counts, attribute_counts = Counter(), Counter()
    for c in captions:
        objects, attributes = _caption_tags(c, synonyms)
        object_counts.update(objects)
        attribute_counts.update(attributes)
    return _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count,
                        {"synonyms": synonyms} if synonyms else None)


# ---------------------------------------------------------------- offline tagging
_CAPTION_FORMATS = {".txt": "text", ".tsv": "tsv", ".jsonl": "jsonl", ".tar": "tar",
                    ".tar.gz": "tar", ".tgz": "tar"}


def _caption_format(path):
    name = path.lower()
    for ext in (".tar.gz", ".tgz", ".tar", ".jsonl", ".tsv", ".txt"):
        if name.endswith(ext):
            return _CAPTION_FORMATS[ext]
    raise ValueError(f"{path}: unsupported caption file (expected .txt, .tsv, .jsonl or .tar)")


def _json_caption(raw):
    """The "caption" string of a JSON object given as bytes, and the object; or ValueError."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"bad JSON ({e.__class__.__name__})") from None
    cap = obj.get("caption") if isinstance(obj, dict) else None
    if not isinstance(cap, str):
        raise ValueError("no 'caption' string")
    return cap, obj


def _tsv_caption_column(path, header_line):
    header = header_line.decode("utf-8", "replace").rstrip("\r\n").split("\t")
    names = [h.strip().lower() for h in header]
    if "caption" not in names:
        raise ValueError(f"{path}: TSV header has no 'caption' column (header: {header[:8]})")
    return names.index("caption")


def _key_column(names):
    """The column (or field) that names a sample: "key", else "image", else None."""
    return next((c for c in ("key", "image") if c in names), None)


def iter_captions(path):
    """The samples of one caption file, in order, as (key, caption, None), or (key, None, reason)
    for a malformed one, so that row i of the tag file is sample i of the input.

    .txt: one caption a line. .tsv: a header line naming a "caption" column, then one row a
    sample. .jsonl: one {"caption": ...} object a line. .tar (webdataset): one sample per key,
    its caption in KEY.txt, else in the "caption" field of KEY.json; a key with neither (an
    image alone) is a malformed sample. Non-UTF-8 text and empty captions are malformed.
    The key: the tar key; a "key" (else "image") column or field of .tsv / .jsonl rows; else
    the line number."""
    fmt = _caption_format(path)
    if fmt == "tar":
        yield from _iter_tar_captions(path)
        return
    with open(path, "rb") as f:
        col = key_col = None
        if fmt == "tsv":
            header = f.readline()
            col = _tsv_caption_column(path, header)
            names = [h.strip().lower() for h in header.decode("utf-8", "replace").rstrip("\r\n").split("\t")]
            key_col = names.index(_key_column(names)) if _key_column(names) else None
        for n, raw in enumerate(f, 2 if fmt == "tsv" else 1):
            where, key = f"{path}:{n}", str(n)
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                yield key, None, f"{where}: empty line"
                continue
            try:
                if fmt == "jsonl":
                    cap, obj = _json_caption(raw)
                    k = _key_column(obj)
                    key = str(obj[k]) if k else key
                else:
                    line = raw.decode("utf-8")
                    if fmt == "tsv":
                        fields = line.split("\t")
                        if key_col is not None and len(fields) > key_col:
                            key = fields[key_col]
                        if len(fields) <= col:
                            raise ValueError("missing caption column")
                        line = fields[col]
                    cap = line
            except UnicodeDecodeError:
                yield key, None, f"{where}: not UTF-8"
                continue
            except ValueError as e:
                yield key, None, f"{where}: {e}"
                continue
            cap = cap.strip()
            yield (key, cap, None) if cap else (key, None, f"{where}: empty caption")


def tar_groups(tf):
    """The samples of an open tar in the webdataset layout: consecutive members with the same
    key (the path up to the first dot of the file name) form one sample. Yields (key,
    {extension: TarInfo}); a broken tar raises tarfile.TarError, EOFError or OSError."""
    key, members = None, {}
    for m in tf:
        if not m.isfile():
            continue
        d, base = os.path.split(m.name)
        stem, _, ext = base.partition(".")
        k = f"{d}/{stem}" if d else stem
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        members[ext.lower()] = m
    if key is not None:
        yield key, members


def caption_of(txt, js):
    """The caption of a webdataset sample from its .txt (preferred) or .json bytes; ValueError
    (UnicodeDecodeError included) when there is none."""
    if txt is not None:
        cap = txt.decode("utf-8").strip()
    elif js is not None:
        cap = _json_caption(js)[0].strip()
    else:
        raise ValueError("no .txt or .json caption")
    if not cap:
        raise ValueError("empty caption")
    return cap


def _iter_tar_captions(path):
    try:
        tf = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from None
    key = None
    with tf:
        try:
            for key, members in tar_groups(tf):
                read = lambda ext: tf.extractfile(members[ext]).read() if ext in members else None  # noqa: E731
                try:
                    yield key, caption_of(read("txt"), read("json")), None
                except ValueError as e:
                    yield key, None, f"{path}:{key}: {'not UTF-8' if isinstance(e, UnicodeDecodeError) else e}"
        except (tarfile.TarError, EOFError, OSError) as e:
            yield None, None, f"{path}: truncated or corrupt tar after key {key!r} ({e.__class__.__name__})"


def _tag_chunk(captions, synonyms=None):
    """Worker: tags of a chunk of captions (None = malformed). Returns the chunk's distinct
    (kind, name) keys, kind 0 object / 1 attribute, and per caption the key numbers
    (int32 bytes) and their count (int32 bytes): small to send back to the main process."""
    local, ids, lens = {}, array("i"), array("i")
    for c in captions:
        if c is None:
            lens.append(0)
            continue
        objects, attributes = _caption_tags(c, synonyms)
        for t in objects:
            ids.append(local.setdefault((0, t), len(local)))
        for t in attributes:
            ids.append(local.setdefault((1, t), len(local)))
        lens.append(len(objects) + len(attributes))
    return list(local), ids.tobytes(), lens.tobytes()


def _map_ordered(fn, items, workers):
    """fn over items in order, on `workers` processes, with at most 2 x workers items in
    flight (Pool.imap would read the whole input ahead into memory)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.Pool(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(it, size):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tag_files(paths, out_dir, top_objects=9000, top_attributes=1000, min_count=5, workers=None,
              chunk_size=2048, progress=True, synonyms=None):
    """The `tags` command: parse every caption of the files, build the vocabulary, and write

        out_dir/vocab.json        TagVocab.save: tags, kinds, counts, params, the input files
                                  (path, name, bytes, first_row, samples, malformed)
        out_dir/tag_offsets.npy   int64 (N+1,): sample i has tags ids[offsets[i]:offsets[i+1]]
        out_dir/tag_ids.npy       uint16 (int32 if K > 65535) tag indices, objects first
        out_dir/tag_keys.npy      bytes (N,): sample i's key (see iter_captions)

    with one row per input sample in input order (files in the given order; a malformed
    sample gets an empty row and is counted). Streams: the captions are read once, parsed on
    `workers` processes (None: all cores) in chunks, and their provisional tag numbers spill
    to a temporary file; memory holds one number per distinct tag, not the parses.
    synonyms: a read_synonyms map applied to every parsed name (a synonym-aware vocabulary).
    Returns a dict of stats (see format_tag_stats)."""
    _check_vocab_args(top_objects, top_attributes, min_count)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
    if not paths:
        raise ValueError("--captions: no caption files given")
    for p in paths:
        fmt = _caption_format(p)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"caption file not found: {p}")
        if fmt == "tsv":
            with open(p, "rb") as f:
                _tsv_caption_column(p, f.readline())
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    # What the rows were read from, so that training can join its samples to them and refuse
    # tags of other data: each file's name, size and first row.
    files = [{"path": os.path.abspath(p), "name": os.path.basename(p), "bytes": os.path.getsize(p),
              "first_row": 0, "samples": 0, "malformed": 0} for p in paths]
    examples = []  # the first few malformed samples, "file:line: reason"
    tmp_keys = os.path.join(out_dir, "tag_keys.tmp")
    longest_key = 1

    def captions(f_keys):
        nonlocal longest_key
        row = 0
        for rec in files:
            rec["first_row"] = row
            for key, cap, why in iter_captions(rec["path"]):
                rec["samples"] += 1
                row += 1
                k = (key or "").encode("utf-8")
                longest_key = max(longest_key, len(k))
                f_keys.write(k.replace(b"\n", b" ") + b"\n")
                if cap is None:
                    rec["malformed"] += 1
                    if len(examples) < 5:
                        examples.append(why)
                yield cap

    # Pass 1: parse, number each distinct (kind, name) key in order of first appearance, spill
    # the numbers and the per-sample counts to temporary files, and count captions per key.
    keys = {}  # (kind, name) -> provisional number
    counts = np.zeros(1024, np.int64)
    tmp_ids, tmp_lens = os.path.join(out_dir, "tag_ids.tmp"), os.path.join(out_dir, "tag_lens.tmp")
    bar = tqdm(desc="tagging", unit=" captions", unit_scale=True, disable=not progress)
    try:
        with open(tmp_ids, "wb") as f_ids, open(tmp_lens, "wb") as f_lens, open(tmp_keys, "wb") as f_keys:
            tag_chunk = functools.partial(_tag_chunk, synonyms=synonyms)  # picklable for the workers
            for chunk_keys, ids, lens in _map_ordered(tag_chunk, _chunks(captions(f_keys), chunk_size), workers):
                remap = np.array([keys.setdefault(k, len(keys)) for k in chunk_keys], np.int32)
                g = remap[np.frombuffer(ids, np.int32)] if ids else np.zeros(0, np.int32)
                if len(keys) > len(counts):
                    grow = max(len(keys), 2 * len(counts)) - len(counts)
                    counts = np.concatenate([counts, np.zeros(grow, np.int64)])
                counts[:len(keys)] += np.bincount(g, minlength=len(keys))
                f_ids.write(g.tobytes())
                f_lens.write(lens)
                bar.update(len(lens) // 4)
    except BaseException:
        for p in (tmp_ids, tmp_lens, tmp_keys):
            if os.path.exists(p):
                os.remove(p)
        raise
    bar.close()
    n = sum(rec["samples"] for rec in files)

    # The vocabulary, and each provisional number's tag index (-1: not kept).
    object_counts = {name: int(counts[i]) for (kind, name), i in keys.items() if kind == 0}
    attribute_counts = {name: int(counts[i]) for (kind, name), i in keys.items() if kind == 1}
    corpus = {"samples": n, "malformed": sum(rec["malformed"] for rec in files), "files": files}
    vocab = _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count,
                         {"corpus": corpus, **({"synonyms": synonyms} if synonyms else {})})
    final = np.full(max(len(keys), 1), -1, np.int64)
    for (kind, name), i in keys.items():
        final[i] = vocab.index.get(name, -1)
    nnz = int(counts[:len(keys)][final[:len(keys)] >= 0].sum())

    # Pass 2 (over the temporary files only): keep the vocabulary's tags, write the CSR arrays.
    id_dtype = np.uint16 if len(vocab) <= 65535 else np.int32
    offsets = np.lib.format.open_memmap(os.path.join(out_dir, "tag_offsets.npy.tmp"), "w+", np.int64, (n + 1,))
    tag_ids = np.lib.format.open_memmap(os.path.join(out_dir, "tag_ids.npy.tmp"), "w+", id_dtype, (nnz,))
    offsets[0] = 0
    done = written = tagged = 0
    with open(tmp_ids, "rb") as f_ids, open(tmp_lens, "rb") as f_lens:
        while done < n:
            lens = np.fromfile(f_lens, np.int32, count=1 << 16).astype(np.int64)  # bounded memory
            g = np.fromfile(f_ids, np.int32, count=int(lens.sum()))
            t = final[g]
            keep = t >= 0
            kept = np.concatenate([[0], np.cumsum(keep)])
            ends = np.cumsum(lens)
            new_lens = kept[ends] - kept[ends - lens]
            offsets[done + 1:done + 1 + len(lens)] = written + np.cumsum(new_lens)
            tag_ids[written:written + int(kept[-1])] = t[keep]
            done, written = done + len(lens), written + int(kept[-1])
            tagged += int(np.count_nonzero(new_lens))
    offsets.flush()
    tag_ids.flush()
    del offsets, tag_ids
    # The sample keys, fixed-width bytes, row by row (what training checks its samples against).
    keys = np.lib.format.open_memmap(os.path.join(out_dir, "tag_keys.npy.tmp"), "w+", f"S{longest_key}", (n,))
    with open(tmp_keys, "rb") as f_keys:
        for i, line in enumerate(f_keys):
            keys[i] = line.rstrip(b"\n")
    keys.flush()
    del keys
    for name in ("tag_offsets.npy", "tag_ids.npy", "tag_keys.npy"):
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    for p in (tmp_ids, tmp_lens, tmp_keys):
        os.remove(p)
    vocab_path = os.path.join(out_dir, "vocab.json")
    vocab.save(vocab_path)
    seconds = time.perf_counter() - t0
    return {
        "samples": n, "malformed": corpus["malformed"], "malformed_examples": examples,
        "tagged": tagged, "tags": len(vocab), "objects": vocab.kinds.count("object"),
        "attributes": vocab.kinds.count("attribute"), "distinct_objects": len(object_counts),
        "distinct_attributes": len(attribute_counts), "tag_occurrences": written,
        "seconds": seconds, "captions_per_s": n / seconds if seconds > 0 else 0.0,
        "workers": workers, "files": files, "vocab": vocab_path,
        "offsets": os.path.join(out_dir, "tag_offsets.npy"), "ids": os.path.join(out_dir, "tag_ids.npy"),
        "keys": os.path.join(out_dir, "tag_keys.npy"),
    }


def format_tag_stats(stats):
    """The `tags` command's report, a few lines."""
    lines = [
        f"tagged {stats['samples']:,} samples in {stats['seconds']:.1f}s "
        f"({stats['captions_per_s']:,.0f} captions/s, {stats['workers']} workers); "
        f"{stats['tagged']:,} have at least one tag",
        f"vocabulary: {stats['tags']:,} tags = {stats['objects']:,} objects + "
        f"{stats['attributes']:,} attributes (of {stats['distinct_objects']:,} distinct objects, "
        f"{stats['distinct_attributes']:,} distinct attributes seen)",
        f"malformed samples: {stats['malformed']:,} (empty rows in the tag file)",
    ]
    lines += [f"  {w}" for w in stats["malformed_examples"]]
    lines.append(f"wrote {stats['vocab']}, {stats['offsets']}, {stats['ids']}, {stats['keys']}")
    return "\n".join(lines)


def read_tags(out_dir, keys=False):
    """The per-sample tags written by tag_files: (offsets int64 (N+1,), ids (nnz,)), memory-
    mapped. Sample i's tag indices into vocab.json's tags are ids[offsets[i]:offsets[i+1]].
    keys: also the (N,) sample keys."""
    names = ("tag_offsets.npy", "tag_ids.npy") + (("tag_keys.npy",) if keys else ())
    paths = [os.path.join(out_dir, f) for f in names]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tag file not found: {p} (run `python tagalign.py tags`)")
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    offsets, ids = arrays[:2]
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError(f"{paths[0]}: offsets do not match {paths[1]} ({len(ids)} ids)")
    if keys and len(arrays[2]) != len(offsets) - 1:
        raise ValueError(f"{paths[2]}: {len(arrays[2])} keys for {len(offsets) - 1} rows")
    return tuple(arrays)


# ---------------------------------------------------------------- image-text shards (paper mode)
# Training data as CC12M is distributed: webdataset tar shards (KEY.jpg|jpeg|png|webp beside
# KEY.txt or KEY.json), or a folder with captions.tsv / captions.jsonl naming image files. The
# stream is exactly resumable: a worker's state is small (where it is in its shards, the
# shuffle buffer as references into the shards, its random generator) and travels with every
# batch, so a checkpoint can hold the state of the batches it has consumed.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the official training norm
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}  # --norm
SKIPS = ("unpaired", "bad_image", "bad_caption", "truncated")  # what the stream skips and counts


def _braces(pattern):
    """Brace expansion as the shell and webdataset do: "a{00..02}b" -> a00b a01b a02b (zero
    padding kept), "{x,y}" -> x y; nested and repeated braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in _braces(head + item + tail)]


def expand_shards(spec):
    """--data as a list of sources: tar shards given by brace lists and globs (several specs
    separated by spaces or given as a list), or a folder holding captions.tsv / captions.jsonl
    (with an "image" column or field: image paths relative to the folder)."""
    import glob
    specs = spec.split() if isinstance(spec, str) else list(spec)
    sources = []
    for one in specs:
        if os.path.isdir(one):
            table = next((os.path.join(one, f) for f in ("captions.tsv", "captions.jsonl")
                          if os.path.isfile(os.path.join(one, f))), None)
            if table is None:
                raise ValueError(f"--data {one}: a folder needs captions.tsv or captions.jsonl")
            sources.append(table)
            continue
        for p in _braces(one):
            found = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
            if not found:
                raise ValueError(f"--data {one}: no file matches {p}")
            sources += found
    if not sources:
        raise ValueError(f"--data {spec!r}: no shards")
    return sources


class ShardTags:
    """The `tags` command's output, joined to training samples by (file, key): a source's
    sample j is tag row first_row + j, and its key must be the one `tags` read there. Tags
    built from other files, or from a file that has changed since, are refused."""

    def __init__(self, tags_dir, sources):
        self.vocab = TagVocab.load(os.path.join(tags_dir, "vocab.json"))
        self.offsets, self.ids, self.keys = read_tags(tags_dir, keys=True)
        files = {f["name"]: f for f in self.vocab.meta.get("corpus", {}).get("files", [])}
        self.first_row = []
        for src in sources:
            f = files.get(os.path.basename(src))
            if f is None or "first_row" not in f:
                raise ValueError(f"--tags {tags_dir} was built from other files: {os.path.basename(src)} "
                                 f"is not among them (run `tagalign.py tags` on the training data)")
            if f["bytes"] != os.path.getsize(src):
                raise ValueError(f"--tags {tags_dir}: {src} has {os.path.getsize(src)} bytes, "
                                 f"{f['bytes']} when it was tagged (re-run `tagalign.py tags`)")
            self.first_row.append(f["first_row"])

    def row(self, source, j, key):
        row = self.first_row[source] + j
        if row >= len(self.keys) or self.keys[row].decode("utf-8", "replace") != key:
            got = self.keys[row].decode("utf-8", "replace") if row < len(self.keys) else "nothing"
            raise ValueError(f"tags do not match the data: sample {j} of source {source} has key {key!r}, "
                             f"the tags have {got!r} (re-run `tagalign.py tags` on these files)")
        return row

    def targets(self, rows):
        """(B,) rows -> (B, K) bool multi-hot targets."""
        t = torch.zeros(len(rows), len(self.vocab), dtype=torch.bool)
        for i, r in enumerate(rows.tolist()):
            t[i, torch.from_numpy(self.ids[self.offsets[r]:self.offsets[r + 1]].astype(np.int64))] = True
        return t


def random_resized_crop(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(x, y, w, h) of torchvision's RandomResizedCrop: up to 10 tries at an area fraction in
    `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop clamped to `ratio`."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(image, size, rng, mean, std, scale=(0.08, 1.0)):
    """A PIL image -> (3, size, size) float32: random resized crop (area fraction in `scale`, the
    official img_scale), horizontal flip, normalised (the official training transform without
    its colour jitter, RandAugment and random erasing)."""
    from PIL import Image
    x, y, w, h = random_resized_crop(image.width, image.height, rng, scale)
    image = image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
    a = np.asarray(image, np.float32) / 255
    if rng.uniform() < 0.5:
        a = a[:, ::-1]
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def as_is(batch):
    """A DataLoader's collate_fn for a dataset that yields whole batches."""
    return batch


class ImageTextStream(torch.utils.data.IterableDataset):
    """Endless batches of (image, caption, tag row) from shards, for a DataLoader with
    batch_size=None: each worker yields whole batches.

    Split without duplicates: each epoch the sources are shuffled (seed, epoch) and source i
    goes to slot i mod (ranks x workers); a slot with one source fewer than others starts its
    next epoch that much earlier. A worker scans its sources into a shuffle buffer of
    references (source, tag row, key, byte ranges or an image path) and reads and decodes a
    sample only when it leaves the buffer. Skipped and counted, never fatal: a sample without
    its image or caption ("unpaired"), an image that does not decode ("bad_image"), a caption
    that is not UTF-8 or is empty ("bad_caption"), a tar that ends early ("truncated": the
    rest of that shard is lost).

    Batch: {"images" (B, 3, S, S), "tokens" (B, L), "rows" (B,) tag rows (-1 without tags),
    "epochs" (B,), "worker": its logical worker, "state": that worker's state after the batch}.
    Batch g of the stream comes from worker g mod W (the DataLoader's round robin), so
    resume(states, g) restarts every worker where the batches consumed so far left it.
    """

    def __init__(self, sources, tags, tokenizer, context_length, batch_size, image_size=224,
                 seed=0, buffer=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, rank=0, world_size=1, workers=0,
                 crop_scale=(0.08, 1.0)):
        super().__init__()
        self.crop_scale = crop_scale
        self.sources, self.tags, self.tokenizer = sources, tags, tokenizer
        self.context_length, self.batch_size, self.image_size = context_length, batch_size, image_size
        self.seed, self.buffer, self.mean, self.std = seed, max(buffer, 1), mean, std
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.states, self.step = {}, 0
        if len(sources) < self.world_size * self.workers:
            raise ValueError(f"--data has {len(sources)} shards for {self.world_size} ranks x {self.workers} "
                             f"workers: give fewer --workers or more shards")
        for p in sources:
            if not p.endswith(".tar"):
                with open(p, "rb") as f:
                    head = f.readline().decode("utf-8", "replace").lower()
                fields = head.rstrip("\r\n").split("\t") if p.endswith(".tsv") else json.loads(head or "{}")
                if "image" not in fields or "key" in fields:
                    raise ValueError(f"--data {p}: a captions table needs an 'image' column (the image path, "
                                     f"relative to its folder, is the sample's key) and no 'key' column")
        self._tables = {}

    def resume(self, states, step):
        """Continue from the worker states of a checkpoint taken after `step` batches."""
        self.states, self.step = {int(k): v for k, v in states.items()}, step

    # -- reading sources
    def _refs(self, i, resume, counts):
        """References to the samples of source i, each with the position to resume after it:
        (source, row in source, key, image, caption). A tar's image and caption are byte ranges;
        a table's image is a path and its caption the text. Unpaired samples are counted."""
        path = self.sources[i]
        if not path.endswith(".tar"):
            if i not in self._tables:  # read once per worker
                self._tables[i] = [(k, c) for k, c, _ in iter_captions(path)]
            for j, (key, cap) in enumerate(self._tables[i][resume or 0:], resume or 0):
                if cap is None:
                    counts["bad_caption"] += 1
                else:
                    yield (i, j, key, os.path.join(os.path.dirname(path), key), cap), j + 1
            return
        offset, j, skip = resume or (0, 0, False)  # skip: the group at offset was taken before
        size, end = os.path.getsize(path), offset  # end: where the last member's data blocks end
        with open(path, "rb") as f:
            f.seek(offset)
            try:
                for key, members in tar_groups(tarfile.open(fileobj=f, mode="r:")):
                    end = max(m.offset_data + -(-m.size // 512) * 512 for m in members.values())
                    if end > size:
                        raise EOFError  # a cut member: tarfile reads its header and stops quietly
                    here = (min(m.offset for m in members.values()), j, True)  # resume after this one
                    j += 1
                    if skip:
                        skip = False
                        continue
                    img = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                    cap = members.get("txt") or members.get("json")
                    if img is None or cap is None:
                        counts["unpaired"] += 1
                        continue
                    ext = "txt" if "txt" in members else "json"
                    yield (i, j - 1, key, (img.offset_data, img.size), (cap.offset_data, cap.size, ext)), here
                f.seek(end)  # a whole tar ends in zero blocks; one cut between members does not
                if f.read(512).strip(b"\0") or f.tell() - end < 512:
                    raise EOFError
            except (tarfile.TarError, EOFError, OSError):
                counts["truncated"] += 1

    def _load(self, ref, rng):
        """A reference -> (image tensor, caption), or the name of the skip count it falls under."""
        from PIL import Image
        i, _, _, img, cap = ref
        if not isinstance(img, str):  # a tar: read both byte ranges
            with open(self.sources[i], "rb") as f:
                f.seek(img[0])
                raw = f.read(img[1])
                f.seek(cap[0])
                text = f.read(cap[1])
            try:
                cap = caption_of(text, None) if cap[2] == "txt" else caption_of(None, text)
            except ValueError:
                return "bad_caption"
            img = io.BytesIO(raw)
        try:
            with Image.open(img) as image:
                return train_transform(image.convert("RGB"), self.image_size, rng, self.mean, self.std,
                                       self.crop_scale), cap
        except Exception:  # corrupt, truncated, missing or not an image
            return "bad_image"

    def _collate(self, batch, logical, state):
        images, captions, rows, epochs = zip(*batch)
        return {"images": torch.stack(images), "tokens": self.tokenizer(list(captions), self.context_length),
                "rows": torch.tensor(rows), "epochs": torch.tensor(epochs), "worker": logical, "state": state}

    # -- the stream
    def _slot(self, logical):
        return self.rank * self.workers + logical

    def _my_sources(self, epoch, logical):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sources))
        return order[self._slot(logical)::self.world_size * self.workers].tolist()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise ValueError(f"ImageTextStream made for {self.workers} workers, read by {info.num_workers if info else 1}")
        logical = ((info.id if info else 0) + self.step) % self.workers  # the round robin goes on
        st = self.states.get(logical) or {
            "epoch": 0, "cursor": 0, "resume": None, "buffer": [], "counts": dict.fromkeys(SKIPS, 0),
            "rng": np.random.default_rng([self.seed, self._slot(logical)]).bit_generator.state}
        rng = np.random.default_rng()
        rng.bit_generator.state = st["rng"]
        epoch, cursor, resume, counts = st["epoch"], st["cursor"], st["resume"], dict(st["counts"])
        buffer = [tuple(x) for x in st["buffer"]]  # (reference with its tag row, epoch)
        batch, idle = [], 0
        while True:
            sources, pushed, tried, loaded = self._my_sources(epoch, logical), 0, 0, 0
            for cursor in range(cursor, len(sources)):
                i = sources[cursor]
                for ref, resume in self._refs(i, resume, counts):
                    row = self.tags.row(i, ref[1], ref[2]) if self.tags is not None else -1
                    buffer.append(((i, row, *ref[2:]), epoch))
                    pushed += 1
                    while len(buffer) >= self.buffer:  # full: one leaves at random
                        ref_out, e = buffer.pop(int(rng.integers(len(buffer))))
                        sample = self._load(ref_out, rng)
                        tried += 1
                        if isinstance(sample, str):
                            counts[sample] += 1
                            continue
                        loaded += 1
                        batch.append((*sample, ref_out[1], e))
                        if len(batch) == self.batch_size:
                            state = {"epoch": epoch, "cursor": cursor, "resume": resume, "counts": dict(counts),
                                     "buffer": [[list(r), e] for r, e in buffer], "rng": rng.bit_generator.state}
                            yield self._collate(batch, logical, state)
                            batch = []
                resume = None
            epoch, cursor = epoch + 1, 0
            idle = 0 if pushed and (loaded or not tried) else idle + 1
            if idle >= 2:  # two epochs without a usable sample: fail rather than hang
                raise RuntimeError(f"worker {logical}: its shards gave no usable sample in a whole epoch "
                                   f"(skipped: {counts})")


# ---------------------------------------------------------------- the synthetic world
# A procedural world of coloured shapes on textured ground. Every sample is a
# pure function of (seed, split, index): nothing is stored, and the validation images are the
# same for every training seed. Ground truth is exact, so segmentation can be scored.
#
# The world is built to give shape, the hard part, its best chance on a CPU budget without
# changing the model (RESULTS.md has the measurements behind each choice): TagAlign's image
# embedding is the MEAN of the patch embeddings, which dilutes the few patches an object covers,
# so the shapes are few, big and distinct (a ring is hollow, a cross has arms, a triangle has
# points), each with its own surface marking; colours are well apart from each other and from
# the grounds; "binding" scenes give objects a shared colour or shape, so that colour alone
# cannot place "red circle"; and the training split comes in contrast pairs (World.sample).

SHAPES = ("circle", "triangle", "cross", "ring")  # the default world's; _shape_mask also draws square, star
COLOURS = {  # name -> RGB
    "red": (215, 35, 35), "green": (40, 190, 70), "blue": (35, 75, 225),
    "yellow": (245, 215, 30), "purple": (150, 55, 195), "black": (20, 20, 20),
    "orange": (245, 135, 20), "white": (245, 245, 245),  # not in the default world
}
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "black")  # the default world's
STUFF = ("grass", "sand", "water", "snow", "sky", "road")
SIZES = {"small": (0.12, 0.15), "big": (0.19, 0.24)}  # object radius as a fraction of the side


@dataclass
class WorldConfig:
    """The world's settings, each settable from the command line (`--set world.pairs=false`)."""
    shapes: tuple = SHAPES          # object shapes, any of circle, square, triangle, star, cross, ring
    colours: tuple = COLOUR_NAMES   # object colours, names from COLOURS
    patterns: bool = True           # shapes carry a surface marking as well as a silhouette (_pattern)
    objects: tuple = (0.3, 0.4, 0.3)  # probability of 1, 2, 3, ... objects in a scene
    rotation: float = 0.3           # objects turn by up to this many radians either way
    binding: float = 0.3            # probability of a binding scene (shared colour or shape)
    pairs: bool = True              # the training split comes in contrast pairs (World.sample)
    drop_object: float = 0.1        # probability that a caption leaves one object out
    name_ground: float = 0.7        # probability that a caption names the ground
    name_colour: float = 0.9        # probability that a caption names an object's colour
    synonyms: bool = True           # captions also say disk, donut, lawn, beach, sea, street ...

    def check(self):
        """Raise ValueError with one line naming the setting when the world cannot be made."""
        for k, names, known in (("shapes", self.shapes, tuple(_SHAPE_WORDS)),
                                ("colours", self.colours, tuple(COLOURS))):
            bad = [n for n in names if n not in known]
            if bad or not names or len(set(names)) != len(names):
                raise ValueError(f"world.{k}={','.join(names)}: expected distinct names from {','.join(known)}")
        if self.pairs and len(self.shapes) < 2:
            raise ValueError("world.pairs: contrast pairs need at least two shapes")
        if not self.objects or min(self.objects) < 0 or abs(sum(self.objects) - 1) > 1e-6:
            raise ValueError(f"world.objects={self.objects}: probabilities of 1, 2, ... objects, summing to 1")
        for k in ("binding", "drop_object", "name_ground", "name_colour"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"world.{k}={getattr(self, k)}: a probability in [0, 1]")
        return self


# Caption words. Synonyms make the tag vocabulary realistic: "disk" and "circle" become two tags
# that name the same thing, as web captions do.
_SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("circle", "circles"), ("disk", "disks")),
    "square": (("square", "squares"), ("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"),),
    "ring": (("ring", "rings"), ("ring", "rings"), ("donut", "donuts")),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}
_STUFF_PHRASES = {
    "grass": ("on grass", "on the grass"), "sand": ("on sand", "on the sand"),
    "water": ("on water", "in the water"), "snow": ("in the snow", "on snow", "lying in the snow"),
    "sky": ("in the sky", "against the sky", "up in the sky"), "road": ("on a road", "on the road"),
}
_STUFF_PHRASES = {
    "grass": ("on grass", "on the grass", "on a lawn", "in a field"),
    "sand": ("on sand", "on the sand", "on the beach", "in the desert"),
    "water": ("on water", "in the water", "floating on the sea", "on a lake"),
    "snow": ("in the snow", "on snow", "lying in the snow"),
    "sky": ("in the sky", "against the sky", "up in the sky"),
    "road": ("on a road", "on the road", "on the street", "on asphalt"),
}
# Without synonyms (WorldConfig.synonyms false) a stuff is named by the phrases that say its name.
_PLAIN_STUFF_PHRASES = {k: tuple(p for p in v if k in p.split()) for k, v in _STUFF_PHRASES.items()}
_PREFIXES = ("", "", "", "", "a picture of ", "an image showing ", "we can see ",
             "in this scene, ", "a photo of ", "there is ")
_LINKS = (" and ", " and ", ", ", " next to ", " beside ", " near ", " together with ")
_COUNTS = ("a", "two", "three", "four", "five", "six")


@dataclass
class Scene:
    image: np.ndarray    # (H, W, 3) uint8
    caption: str
    objects: np.ndarray  # (H, W) uint8: 0 background, 1 + shape index
    stuff: np.ndarray    # (H, W) uint8: stuff index on the ground, len(STUFF) + shape on objects
    attr: np.ndarray     # (H, W) uint8: 0 background, 1 + colour * len(shapes) + shape


def _smooth(x, passes):
    """Cheap separable box blur with wrap-around, so texture tiles tile seamlessly."""
    for _ in range(passes):
        x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0)) / 3
        x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 3
    return x


def _texture(kind, S, rng):
    """One (S, S, 3) float texture tile of a stuff class."""
    y, x = np.mgrid[0:S, 0:S] / S
    n = lambda sigma, passes=0: _smooth(rng.normal(0, sigma, (S, S)), passes)  # noqa: E731
    if kind == "grass":  # green with vertical blades: noise smeared along y
        g = n(1.0)
        for _ in range(3):
            g = (g + np.roll(g, 1, 0) + np.roll(g, 2, 0)) / 3
        base, var = np.array([70, 135, 45]), g[..., None] * np.array([18, 40, 12])
    elif kind == "sand":  # beige, fine grain and slow ripples
        r = np.sin(2 * np.pi * (3 * x + 2 * y + rng.uniform())) * 8
        base, var = np.array([205, 180, 130]), (n(10) + r)[..., None]
    elif kind == "water":  # blue with horizontal wave bands
        w = np.sin(2 * np.pi * (5 * y + 0.6 * np.sin(2 * np.pi * (2 * x + rng.uniform()))))
        base, var = np.array([45, 110, 165]), (w * 22 + n(6))[..., None] * np.array([0.5, 0.8, 1])
    elif kind == "snow":  # near white, soft blue-grey shading and speckles
        s = n(14, 3) + (rng.uniform(size=(S, S)) < 0.02) * -40
        base, var = np.array([222, 228, 238]), s[..., None]
    elif kind == "sky":  # vertical gradient with soft white clouds
        c = np.clip(n(1.0, 6) * 6, 0, None)
        base = np.array([120, 175, 235])
        var = y[..., None] * np.array([-40, -30, -15]) + c[..., None] * np.array([60, 45, 15])
    elif kind == "road":  # dark grey asphalt with gravel speckles
        base, var = np.array([88, 88, 92]), (n(12) + n(8, 1))[..., None]
    else:
        raise ValueError(f"unknown stuff kind {kind!r}")
    return np.clip(base + var, 0, 255).astype(np.float32)


def _pick(rng, seq):
    """rng.choice without its conversion to an array (10x faster on a short tuple)."""
    return seq[int(rng.integers(len(seq)))]


def _pattern(shape, x, y):
    """Where a shape's surface marking is, at (x, y) pixels from its centre in its own frame."""
    if shape == "triangle":  # horizontal stripes, 3 px dark in every 6
        return (y % 6) < 3
    if shape == "cross":  # a checkerboard of 4 px cells
        return ((x // 4) + (y // 4)) % 2 == 0
    return np.zeros(np.shape(x), bool)  # circle and ring: plain


def _shape_mask(shape, u, v):
    """Inside test in the object's own frame: u right, v up, radius 1."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # equilateral, apex up
        return (v >= -0.55) & (v <= 1.0 - math.sqrt(3) * np.abs(u))
    if shape == "star":  # five points: the radius swings between 0.42 and 1 with the angle
        rho, phi = np.sqrt(u * u + v * v), np.arctan2(u, v)
        return rho <= 0.42 + 0.58 * np.abs(np.cos(2.5 * phi)) ** 3
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    raise ValueError(f"unknown shape {shape!r}")


class World:
    """Coloured shapes on textured ground, with captions and exact segmentation maps.

    >>> w = World(seed=0)
    >>> s = w.sample(3)           # deterministic: the same scene every time
    >>> s.image.shape, s.caption  # doctest: +SKIP
    ((64, 64, 3), 'a big red circle and a blue star on the beach')
    """

    def __init__(self, seed=0, image_size=64, split="train", cfg=None):
        self.seed, self.S, self.split = seed, image_size, split
        self.cfg = c = (cfg or WorldConfig()).check()
        self.shapes, self.colours = tuple(c.shapes), tuple(c.colours)
        # Contrast pairs (the training split only): indices 2k and 2k + 1 show the same scene,
        # the odd one with every object's shape swapped for another (see sample).
        self.pairs = c.pairs and split == "train"
        self.object_cdf = np.cumsum(c.objects)[:-1]
        # Textures are the world's physics: fixed, whatever the training seed.
        trng = np.random.default_rng(1234)
        self.textures = [np.stack([_texture(k, image_size, trng) for _ in range(8)]) for k in STUFF]
        # Sensor noise is cropped from a fixed bank: drawing 3 S^2 normals per image is slow.
        self.noise = trng.normal(0, 4, (2 * image_size, 2 * image_size, 3)).astype(np.float32)
        self.yy, self.xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
        self._split_id = {"train": 0, "val": 1}[split]

    def caption(self, index):
        """The caption of sample `index` alone, without rendering (for building vocabularies)."""
        return self.sample(index, caption_only=True)

    def sample(self, index, caption_only=False):
        """Scene `index`. Layout, caption and pixels draw from three streams of one seed, so
        that a contrast pair's two scenes differ in their shapes alone: the same ground,
        colours, sizes, places and turns, the same caption but for the shape words, the same
        noise. A batch that holds both (the training batches do: they are even-sized runs of
        consecutive indices) cannot be matched to its captions without telling shapes apart;
        without pairs, colour, ground and count already identify a caption in a batch of 64,
        and neither loss needs shape (README, results)."""
        S = self.S
        key = index // 2 if self.pairs else index
        layout, words, rng = (np.random.default_rng(s) for s in
                                 np.random.SeedSequence([self.seed, self._split_id, key]).spawn(3))
        # Layout first, then the caption, then the pixels: a caption costs no rendering.
        stuff = int(layout.integers(len(STUFF)))
        placed = self._place(layout)
        if self.pairs:
            swap = layout.permutation(len(self.shapes))  # drawn by both scenes of a pair, used by the odd
            while np.any(swap == np.arange(len(self.shapes))):  # a derangement: every shape changes
                swap = layout.permutation(len(self.shapes))
            if index % 2:
                placed = [(int(swap[o[0]]), *o[1:]) for o in placed]
        caption = self._caption(words, placed, stuff)
        if caption_only:
            return caption
        # Ground: a random tile of the stuff's texture, shifted and flipped, brightness jittered.
        tile = self.textures[stuff][rng.integers(8)]
        oy, ox = rng.integers(S, size=2)
        if STUFF[stuff] == "sky":
            oy = 0  # the sky's gradient is not periodic in y
        tile = np.roll(tile, (int(oy), int(ox)), (0, 1))
        img = tile[:, ::-1] if rng.uniform() < 0.5 else tile
        img = img * np.float32(rng.uniform(0.9, 1.1))
        objects = np.zeros((S, S), np.uint8)
        attr = np.zeros((S, S), np.uint8)
        yy, xx = self.yy, self.xx
        for shape, colour, size, cy, cx, r in placed:
            # Only the bounding box is evaluated; the object frame is rotated a little.
            y0, y1, x0, x1 = (max(int(cy - r) - 1, 0), min(int(cy + r) + 2, S),
                              max(int(cx - r) - 1, 0), min(int(cx + r) + 2, S))
            th = rng.uniform(-self.cfg.rotation, self.cfg.rotation)
            dy, dx = (cy - yy[y0:y1, x0:x1]) / r, (xx[y0:y1, x0:x1] - cx) / r
            u, v = dx * math.cos(th) - dy * math.sin(th), dx * math.sin(th) + dy * math.cos(th)
            m = _shape_mask(self.shapes[shape], u, v)
            rgb = np.array(COLOURS[self.colours[colour]], np.float32) + rng.normal(0, 10, 3)
            shade = 1 + 0.08 * v[..., None]  # light from above: a hint of 3-D
            face = rgb * shade
            if self.cfg.patterns:  # each shape's surface marking, in the object's frame (turns with it)
                mark = _pattern(self.shapes[shape], u * r, v * r)[..., None]
                dark = rgb.mean() < 80  # a black object is marked lighter, the others darker
                face = np.where(mark, face + 90 if dark else face * 0.55, face)
            patch = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = np.where(m[..., None], face, patch)
            objects[y0:y1, x0:x1][m] = 1 + shape
            attr[y0:y1, x0:x1][m] = 1 + colour * len(self.shapes) + shape
        ny, nx = rng.integers(S, size=2)
        img = img + self.noise[ny:ny + S, nx:nx + S]  # sensor noise
        image = np.clip(img, 0, 255).astype(np.uint8)
        stuff_map = np.where(objects > 0, len(STUFF) - 1 + objects, stuff).astype(np.uint8)
        return Scene(image, caption, objects, stuff_map, attr)

    def _place(self, rng):
        """1-3 non-overlapping objects: (shape, colour, size, cy, cx, radius in px)."""
        S, n = self.S, 1 + int(np.searchsorted(self.object_cdf, rng.uniform()))
        shapes = rng.integers(len(self.shapes), size=n)
        colours = rng.integers(len(self.colours), size=n)
        if n >= 2 and rng.uniform() < self.cfg.binding:
            # Binding scene: the second object shares the first one's colour with another shape,
            # the third (if any) its shape with another colour.
            shapes[1] = (shapes[0] + rng.integers(1, len(self.shapes))) % len(self.shapes)
            colours[1] = colours[0]
            if n == 3:
                shapes[2] = shapes[0]
                colours[2] = (colours[0] + rng.integers(1, len(self.colours))) % len(self.colours)
        placed = []
        for shape, colour in zip(shapes, colours):
            size = int(rng.integers(2))
            r = rng.uniform(*SIZES[("small", "big")[size]]) * S
            for _ in range(20):  # rejection sampling; an object that does not fit is left out
                cy, cx = rng.uniform(r, S - r, 2)
                if all((cy - p[3]) ** 2 + (cx - p[4]) ** 2 > (r + p[5] + 2) ** 2 for p in placed):
                    placed.append((int(shape), int(colour), size, cy, cx, r))
                    break
        return placed

    def _caption(self, rng, placed, stuff):
        """A caption from a varied grammar; the only supervision the model gets."""
        objs = list(placed)
        if len(objs) >= 2 and rng.uniform() < self.cfg.drop_object:  # sometimes an object goes unmentioned
            objs.pop(int(rng.integers(len(objs))))
        rng.shuffle(objs)
        # Identical shape and colour are counted ("two red circles").
        groups = {}
        for o in objs:
            groups.setdefault((o[0], o[1]), []).append(o)
        phrases = []
        for (shape, colour), members in groups.items():
            words = [_COUNTS[len(members) - 1]]
            sizes = {m[2] for m in members}
            if len(sizes) == 1 and rng.uniform() < 0.5:
                words.append(_pick(rng, _SIZE_WORDS[("small", "big")[sizes.pop()]]))
            if rng.uniform() < self.cfg.name_colour:
                words.append(self.colours[colour])
            forms = _SHAPE_WORDS[self.shapes[shape]]  # one draw whatever the shape: pairs stay in step
            form = forms[int(rng.uniform() * len(forms))] if self.cfg.synonyms else forms[0]
            words.append(form[len(members) > 1])
            phrases.append((" ".join(words), members))
        text = phrases[0][0]
        for i, (phrase, members) in enumerate(phrases[1:]):
            if i == 0 and len(members) == len(phrases[0][1]) == 1 and rng.uniform() < 0.3:
                # a true spatial relation between two single objects
                (o,), (first,) = members, phrases[0][1]
                dy, dx = o[3] - first[3], o[4] - first[4]  # image y grows downwards
                link = ((" above ", " below ")[int(dy > 0)] if abs(dy) > abs(dx)
                        else (" to the left of ", " to the right of ")[int(dx > 0)])
                text = phrase + link + text
            else:
                text = text + _pick(rng, _LINKS) + phrase
        if rng.uniform() < self.cfg.name_ground:
            phrases = _STUFF_PHRASES if self.cfg.synonyms else _PLAIN_STUFF_PHRASES
            text += " " + _pick(rng, phrases[STUFF[stuff]])
        prefix = _pick(rng, _PREFIXES)
        if prefix == "there is " and not text.startswith("a "):
            prefix = "there are "
        return prefix + text


def write_world_shards(out_dir, scenes, per_shard=1000, seed=0, image_size=64, cfg=None, start=0):
    """The world's training split as webdataset shards, as CC12M is distributed: out_dir/
    world-00000.tar ..., scene i as KEY.png (lossless) and KEY.txt, KEY = its index, zero-padded.
    Scenes start .. start + scenes - 1; contrast pairs stay together in a shard when per_shard
    is even. Returns the shard paths."""
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    world, paths = World(seed, image_size, "train", cfg), []
    for first in range(start, start + scenes, per_shard):
        path = os.path.join(out_dir, f"world-{len(paths):05d}.tar")
        with tarfile.open(path + ".tmp", "w") as tf:
            for i in range(first, min(first + per_shard, start + scenes)):
                s, buf = world.sample(i), io.BytesIO()
                Image.fromarray(s.image).save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("txt", s.caption.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size, info.mtime = len(payload), 0
                    tf.addfile(info, io.BytesIO(payload))
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- world batches and benchmarks
WORLD_MEAN = (0.48, 0.57, 0.57)  # per-channel pixel statistics of the world, measured on 10k images
WORLD_STD = (0.28, 0.22, 0.29)
WORLD_TEMPLATES = ("a {}.",)  # zero-shot prompt; world captions read "a big red circle on grass"
WORLD_BENCHMARKS = ("world-object", "world-stuff", "world-attr")  # see WorldBenchmark


def to_tensor(images, mean, std):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised with per-channel mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


class WorldBenchmark:
    """A zero-shot segmentation benchmark on the world's validation split, in the form that
    eval_seg.py reads: classes, background flag, mean/std, templates, (image, label, id) items.

    world-object: background (by score threshold) + the shapes, like VOC.
    world-stuff:  the ground textures + the shapes, every pixel labelled, like COCO-Stuff.
    world-attr:   "red circle", "blue circle", ...: every colour x shape. Only object pixels are
                  scored (the ground is 255, ignored), so it measures binding alone: a model that
                  finds the circle but calls it blue, or finds red but calls it a star, scores 0.
    """

    def __init__(self, name, n_images=500, seed=0, image_size=64, cfg=None):
        self.world = World(seed, image_size, split="val", cfg=cfg)
        shapes, colours = self.world.shapes, self.world.colours
        if name == "world-object":
            self.classes, self.background = ["background", *shapes], True
        elif name == "world-stuff":
            self.classes, self.background = [*STUFF, *shapes], False
        elif name == "world-attr":
            self.classes, self.background = [f"{c} {s}" for c in colours for s in shapes], False
        else:
            raise ValueError(f"unknown world benchmark {name!r} ({', '.join(WORLD_BENCHMARKS)})")
        self.name, self.n = name, n_images
        self.mean, self.std, self.templates = WORLD_MEAN, WORLD_STD, list(WORLD_TEMPLATES)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.world.sample(i)
        if self.name == "world-object":
            label = s.objects
        elif self.name == "world-stuff":
            label = s.stuff
        else:  # attr map 1 + colour * shapes + shape -> 0-based, the ground ignored
            label = np.where(s.attr > 0, s.attr.astype(np.int16) - 1, 255).astype(np.uint8)
        return s.image, label, f"{self.name}-{i:05d}"


def world_benchmark(name, n_images=500, seed=0, image_size=64, cfg=None):
    return WorldBenchmark(name, n_images, seed, image_size, cfg)
