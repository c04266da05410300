"""CLIP's tokenizer: text cleaning as ftfy's fix_text does it (without the dependency), and
CLIP-compatible byte-level BPE, trained on a corpus (the world) or read from CLIP's merges file
(shipped in assets/, so that token ids mean what they mean in OpenAI's CLIP files).

    tok = Tokenizer.from_clip()          # CLIP's 49,408 tokens
    tok(["a photo of a cat."], 77)       # (1, 77) int64: <start> a photo of a cat . <end> 0 ...
"""
import gzip
import html
import os
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Iterable

import regex
import torch


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
    def from_checkpoint(cls, entry: str | dict) -> "Tokenizer":
        """The tokenizer a checkpoint names in its "tokenizer" entry: "clip" (CLIP's own merges,
        shipped in assets/, so a checkpoint need not copy them) or a trained one's state_dict()."""
        return cls.from_clip() if entry == "clip" else cls.from_state_dict(entry)

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
