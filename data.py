"""Data for tagalign: the tokenizer, the tag parser and vocabulary, the synthetic world.

Sections, top to bottom:
- tokenizer: CLIP-compatible byte-level BPE, trained on a corpus or read from CLIP's merges file;
- tag parser: captions -> (objects, attributes), the tag vocabulary, offline tagging of corpora;
- the synthetic world: procedural images, captions and exact segmentation maps;
- world batches and benchmarks: tensors for training, and the three world-* benchmarks.
"""
import gzip
import html
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
# Rule-based caption tag parser, tag vocabulary and offline tagging (DESIGN.md section 6).
#
# TagAlign's authors never released their tagger. Ours is a regex tokenizer, word lists written
# for this project and a small noun-phrase grammar:
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
# Written for this project. Words are separated by white space, lines starting with "#" are
# comments, "_" joins the words of a multi-word name ("traffic_light"), "goose/geese" gives an
# irregular plural and "sheep/=" an unchanged one; other plurals are made by rule (_plural).

# People, animals and vehicles: objects, and likely subjects of a verb ("a man skis",
# "dogs play", "a plane flies over").
_ANIMATE_NOUNS = """
man/men woman/women person/persons child/children kid boy girl guy lady gentleman/gentlemen
toddler infant teenager teen youngster family/families couple friend crowd stranger mother
father mom mum dad parent son daughter brother sister grandmother grandfather grandma grandpa
grandparent husband wife/wives boyfriend girlfriend bride groom bridesmaid twin player athlete
skier snowboarder surfer skateboarder skater cyclist biker rider runner jogger swimmer diver
climber hiker tourist traveler traveller visitor passenger pedestrian driver pilot conductor
chef cook baker waiter waitress bartender barista farmer fisherman/fishermen worker builder
doctor nurse surgeon dentist patient teacher student pupil professor scientist soldier officer
policeman/policemen policewoman/policewomen cop firefighter fireman/firemen guard sailor
captain cowboy cowgirl clown artist painter musician singer guitarist drummer pianist
violinist dancer ballerina actor actress model priest monk nun king queen prince princess
knight warrior pirate wizard witch angel fairy/fairies ghost zombie robot alien monster
superhero vendor seller customer shopper spectator fan referee umpire catcher batter pitcher
goalkeeper goalie jockey shepherd businessman/businessmen businesswoman/businesswomen
executive manager employee mechanic plumber electrician carpenter gardener janitor cashier
clerk photographer cameraman/cameramen reporter journalist tailor hairdresser barber butcher
lifeguard astronaut miner lumberjack bodybuilder boxer wrestler golfer gymnast kayaker paddler
rower archer hunter camper backpacker protester performer magician juggler acrobat snowman/snowmen
scarecrow mannequin doll mascot puppet passerby/passersby bystander neighbor neighbour owner
human individual santa santa_claus cheerleader coach instructor trainer vet veterinarian
graduate schoolgirl schoolboy celebrity/celebrities politician president host presenter rapper
dj preschooler newborn brunette redhead motorcyclist motorist
commuter laborer labourer volunteer nanny maid tennis_player baseball_player soccer_player
football_player basketball_player hockey_player golf_player volleyball_player ski_instructor
police_officer security_guard construction_worker flight_attendant
dog puppy pup cat kitten kitty horse pony foal cow calf/calves bull ox/oxen sheep/= lamb goat
pig piglet chicken hen rooster chick duck duckling goose/geese swan turkey bird parrot pigeon
dove seagull gull crow raven eagle hawk falcon owl sparrow robin finch hummingbird pelican
flamingo penguin ostrich peacock heron crane stork kingfisher woodpecker elephant giraffe zebra
lion lioness tiger leopard cheetah jaguar panther bear cub polar_bear panda koala kangaroo
monkey ape gorilla chimpanzee orangutan deer/= moose/= elk reindeer/= antelope gazelle camel
llama alpaca donkey mule rhino rhinoceros hippo hippopotamus buffalo bison/= wolf/wolves fox
coyote rabbit bunny hare squirrel chipmunk mouse/mice rat hamster guinea_pig hedgehog raccoon
skunk beaver otter badger bat frog toad turtle tortoise lizard snake crocodile alligator
iguana gecko chameleon dinosaur dragon unicorn fish/= shark whale dolphin seal sea_lion walrus
octopus squid jellyfish/= crab lobster shrimp/= starfish/= snail slug worm insect bug
butterfly moth bee wasp ant spider fly/flies mosquito dragonfly ladybug beetle grasshopper
caterpillar scorpion animal pet creature poodle terrier bulldog labrador retriever
golden_retriever husky beagle dachshund chihuahua pug collie sheepdog german_shepherd corgi
spaniel rottweiler doberman greyhound dalmatian stallion mare ewe ram boar fawn ferret
parakeet canary cockatoo macaw toucan vulture seahorse goldfish/= trout/= tuna/= oyster clam
mussel scallop mammal reptile bumblebee hornet firefly/fireflies cricket puffin mallard
goldfinch bluebird blackbird magpie jay cardinal starling koi/= carp/= cod/= stingray manatee
lynx bobcat cougar puma hyena warthog meerkat mongoose lemur sloth armadillo porcupine possum
opossum weasel mink platypus yak piggy doggy
car truck bus/buses van taxi cab suv jeep pickup pickup_truck limousine limo ambulance
fire_truck fire_engine police_car motorcycle motorbike scooter moped bicycle bike tricycle
unicycle train tram trolley streetcar subway metro locomotive engine carriage wagon cart
stroller pram wheelchair boat ship yacht sailboat canoe kayak raft ferry/ferries submarine
airplane aeroplane plane jet aircraft/= airliner helicopter glider balloon hot_air_balloon
blimp rocket spaceship spacecraft/= tractor bulldozer excavator forklift trailer camper rv
caravan sled sleigh snowmobile skateboard surfboard snowboard ski wakeboard paddleboard kite
parachute go-kart kart atv segway chariot gondola cable_car vehicle automobile sedan
convertible coupe minivan hatchback lorry/lorries rickshaw barge tugboat tanker cruise_ship
speedboat jet_ski hovercraft race_car sports_car school_bus dump_truck tow_truck garbage_truck
rowboat motorboat houseboat warship battleship
aardvark albatross anaconda anteater baboon barracuda blue_jay boa
buzzard capybara caribou cassowary catfish centipede chinchilla cobra
cockroach condor crane_fly crawfish crayfish cuttlefish dingo dodo dormouse
dragonfish drake dugong eel egret emu ermine flounder fruit_bat
gerbil gibbon gila_monster gnat gnu gopher grizzly grizzly_bear grouse guppy
harbor_seal hawk_moth heifer hermit_crab honeybee hound ibex
ibis impala jackal jackrabbit kangaroo_rat kestrel killer_whale
kinkajou kiwi_bird koala_bear komodo_dragon kookaburra krill ladybird lark leech
lemming limpet locust loon lovebird
mamba mandrill manta manta_ray marmot marten mastiff mayfly minnow mole mollusk
mongoose_pup monitor_lizard moray mosquito_fish mountain_goat mountain_lion mudskipper
mustang narwhal newt nightingale ocelot okapi orca oriole oryx osprey owlet
parrotfish partridge peahen pekingese
pheasant pike piranha polecat porpoise prairie_dog
praying_mantis mantis pronghorn ptarmigan puffer_fish pufferfish python quail
rattlesnake ray roadrunner
sailfish salamander sandpiper sea_turtle sea_urchin urchin sea_otter sea_star
sea_cucumber sea_anemone anemone serval sheep_dog shih_tzu shrew shrimp_fish silkworm skink
skylark sloth_bear snapping_turtle snow_leopard snowy_owl sparrow_hawk
spider_monkey springbok squirrel_monkey stag stick_insect stoat
sturgeon sugar_glider sunbird swallow tadpole tamarin tapir tarantula
tarsier termite tern terrier_dog thrush tick tiger_shark tree_frog turtle_dove
vicuna viper vole wallaby warbler wart_hog water_buffalo whale_shark
wildcat wildebeest wolverine wombat woodchuck woodlouse wren zebu
labrador_retriever yorkshire_terrier jack_russell border_collie great_dane saint_bernard
bernese pomeranian shiba_inu akita malamute samoyed whippet basset_hound bloodhound
schnauzer maltese bichon cocker_spaniel springer_spaniel weimaraner vizsla pit_bull
staffordshire boxer_dog pointer setter maine_coon siamese_cat persian_cat
bengal_cat sphynx ragdoll_cat calico tortoiseshell_cat
clydesdale thoroughbred arabian_horse shetland_pony draft_horse racehorse workhorse
jersey_cow holstein longhorn angus hog sow ewe_lamb billy_goat nanny_goat kid_goat
bantam broiler cockerel gander gosling cygnet mallard_duck wood_duck teal_duck

"""

# Other concrete nouns: things, places, stuff. Objects when they head a phrase.
_OBJECT_NOUNS = """
# body
head face hair eye ear nose mouth lip tooth/teeth tongue chin cheek forehead eyebrow eyelash
beard mustache moustache neck shoulder arm elbow hand wrist finger thumb fingernail nail palm
fist chest belly stomach waist hip leg knee thigh ankle foot/feet toe heel skin body torso
skeleton skull bone muscle tattoo wing tail paw claw hoof/hooves horn antler beak feather mane
whisker fin trunk tusk snout muzzle hump braid ponytail bun curl lap freckle eyelid
# clothing and accessories
shirt t-shirt tshirt tee blouse sweater jumper hoodie sweatshirt cardigan jacket coat blazer
vest waistcoat suit tuxedo uniform dress gown robe skirt sock shoe boot sneaker trainer sandal
slipper flip-flop clog loafer stiletto hat cap helmet beanie hood scarf/scarves glove mitten
tie bow_tie necktie belt bag handbag purse backpack wallet watch wristwatch bracelet necklace
earring ring jewelry jewellery pendant brooch crown tiara veil mask apron bikini swimsuit
wetsuit raincoat poncho underwear bra lingerie costume outfit garment kimono sari turban
headscarf hijab bandana headband collar sleeve pocket button zipper ribbon jersey kilt cape
cloak shawl tunic tank_top polo_shirt dress_shirt bathing_suit leotard tutu sombrero fedora
bonnet visor earmuff suitcase luggage umbrella parasol rucksack briefcase tote clutch hairband
hairpin headdress overcoat parka trench_coat windbreaker life_jacket baseball_cap cowboy_hat
top_hat hard_hat high_heel wedding_dress evening_dress sundress nightgown bathrobe sweatband
# vehicle parts
wheel tire tyre windshield windscreen headlight
taillight bumper steering_wheel dashboard license_plate number_plate handlebar pedal chain
saddle propeller cockpit mast sail anchor oar paddle rudder hull cabin cargo container rail
railway railroad track train_track platform antenna side_mirror rearview_mirror seatbelt
seat_belt car_seat seat
# street, city and buildings
street road highway freeway motorway lane alley avenue boulevard path pathway trail sidewalk
pavement crosswalk intersection roundabout bridge tunnel overpass parking_lot parking_space
parking_garage garage driveway curb kerb gutter manhole traffic_light traffic_signal stop_light
stop_sign street_sign road_sign sign signpost billboard banner flag pole lamppost lamp_post
street_light streetlight street_lamp light_pole utility_pole telephone_pole power_line wire
cable fence gate wall railing barrier cone traffic_cone bollard hydrant fire_hydrant
parking_meter bench park_bench trash_can garbage_can bin dumpster mailbox phone_booth bus_stop
shelter fountain monument sculpture statue figurine tower clock_tower clock building skyscraper
house apartment condo cottage hut shed barn stable farmhouse mansion palace castle fort
fortress church cathedral chapel temple mosque pagoda shrine synagogue school
university/universities college hospital library/libraries museum gallery/galleries theater
theatre cinema stadium arena gym restaurant cafe coffee_shop bar pub bakery/bakeries shop store
market supermarket mall office bank hotel motel station train_station bus_station gas_station
fire_station police_station railway_station subway_station airport terminal runway tarmac
hangar port harbor harbour dock pier marina wharf boardwalk lighthouse windmill
factory/factories warehouse plant farm ranch vineyard orchard garden yard backyard courtyard
patio porch balcony/balconies terrace deck rooftop roof chimney steeple dome spire arch column
pillar facade entrance exit doorway door window staircase stairway stair step escalator
elevator lift ramp ladder hallway corridor lobby room kitchen bedroom bathroom classroom studio
basement attic closet living_room dining_room laundry_room meeting_room waiting_room
conference_room locker_room dressing_room changing_room fitting_room throne_room control_room
family_room guest_room sitting_room emergency_room playground park plaza town_square city town
village downtown neighborhood neighbourhood suburb street_corner campus cemetery graveyard tomb
grave gravestone tombstone ruin zoo aquarium circus carnival fair amusement_park ferris_wheel
roller_coaster carousel merry-go-round tent campsite campfire bonfire court tennis_court
basketball_court field baseball_field soccer_field football_field golf_course race_track
racetrack pool swimming_pool stage podium booth stall kiosk counter checkout skyline
construction_site skate_park ski_slope ski_lift slope water_park theme_park shopping_mall
shopping_center picnic_table picnic_area storefront shop_window greenhouse gazebo pergola
trellis canopy awning scaffolding silo kennel doghouse birdhouse nest hive beehive coop corral
trough water_tower dam canal post bleachers dugout home_plate scoreboard hot_tub jacuzzi sauna
floor ceiling shingle beam paint plank board floorboard banister handrail steps pew altar
mosaic mural graffiti
# nature and landscape
sky cloud sun moon star sunset sunrise lightning rain snow snowflake fog mist smoke steam fire
flame water sea ocean lake pond river stream creek waterfall wave beach shore coast coastline
seashore seaside dune desert island cliff rock pebble boulder mountain hill hillside
mountainside valley/valleys canyon cave volcano/volcanoes glacier iceberg meadow prairie
grassland pasture farmland forest woods jungle rainforest tree palm_tree pine_tree
christmas_tree oak_tree apple_tree bush shrub hedge grass lawn weed flower rose tulip
daisy/daisies sunflower lily/lilies orchid lotus lavender dandelion poppy/poppies blossom
petal leaf/leaves branch twig root log stump moss vine ivy fern cactus/cacti mushroom seaweed
algae/= coral_reef reef soil mud puddle swamp marsh wetland bay lagoon horizon shadow
reflection moonlight planet earth galaxy/galaxies nebula comet meteor icicle snowdrift hay
haystack pine palm oak maple birch willow cherry_blossom bouquet wreath garland flowerbed
flower_bed potted_plant houseplant succulent bonsai vegetation foliage/= greenery/= treetop
hilltop mountaintop peak ridge shoreline riverbank bank waterfront surf rapids/= pine_cone
acorn seed thorn stem bud clover grain wheat barley tide geyser hot_spring oasis/oases
savanna savannah tundra crater lava ember seashell shell
# food and drink
food meal dish plate bowl pizza sandwich burger hamburger cheeseburger hot_dog hotdog salad
soup pasta spaghetti noodle rice bread toast bagel croissant muffin cupcake cake pie cookie
biscuit cracker donut doughnut pastry/pastries dessert ice_cream candy/candies popcorn pretzel
waffle pancake crepe taco burrito sushi/= dumpling steak meat beef pork bacon ham sausage egg
omelet omelette cheese butter yogurt yoghurt cereal oatmeal granola wrap kebab fruit apple
banana grape strawberry/strawberries blueberry/blueberries raspberry/raspberries
blackberry/blackberries cherry/cherries peach plum pear pineapple mango/mangoes watermelon
melon kiwi coconut avocado papaya fig pomegranate apricot berry/berries vegetable broccoli/=
carrot tomato/tomatoes potato/potatoes onion garlic pepper cucumber lettuce cabbage spinach
corn pea bean zucchini eggplant pumpkin squash celery asparagus cauliflower radish beet olive
herb basil parsley cilantro nut peanut almond walnut cashew pistachio drink beverage coffee tea
juice orange_juice milk wine beer cocktail soda smoothie latte cappuccino espresso lemonade
champagne whiskey vodka liquor bottle can cup mug jar sauce soy_sauce ketchup mustard
mayonnaise honey jam syrup sugar salt spice flour dough frosting icing whipped_cream topping
gravy dip hummus tofu curry stew casserole lasagna quesadilla nacho chip crisp snack breakfast
lunch dinner brunch pepperoni salami meatball ramen dim_sum spring_roll sashimi/= seafood
chicken_wing chicken_breast drumstick fillet wedding_cake birthday_cake cheesecake brownie
macaron tart pudding jelly custard marshmallow lollipop candy_bar chocolate_bar cotton_candy
gingerbread gingerbread_man baguette roll loaf/loaves scone pita tortilla hot_chocolate
coffee_cup coffee_mug teacup tea_cup wine_glass teapot kettle coffee_pot coffee_maker
espresso_machine ice_cube ice_cream_cone popsicle sundae milkshake cocoa broth chili salsa
guacamole pesto vinegar oil olive_oil mayo cream_cheese cottage_cheese feta mozzarella
parmesan cheddar porridge muesli peanut_butter maple_syrup kale leek ginger turnip artichoke
okra yam sweet_potato bell_pepper chili_pepper jalapeno scallion shallot pickle lentil
chickpea grapefruit tangerine clementine nectarine cantaloupe lychee dragon_fruit passion_fruit
persimmon guava raisin prune cranberry/cranberries currant
# household, furniture and everyday things
table dining_table coffee_table side_table end_table desk chair armchair stool highchair
high_chair sofa couch recliner ottoman bed bunk_bed crib cradle mattress pillow cushion blanket
quilt duvet comforter bedspread rug carpet mat doormat curtain drape blind lamp chandelier
lantern candle candlestick vase pot flowerpot planter basket box crate barrel bucket
shelf/shelves bookshelf/bookshelves bookcase cabinet cupboard drawer dresser wardrobe
nightstand mirror frame picture_frame photo_frame calendar fireplace mantel mantelpiece
radiator heater fan air_conditioner windowsill window_sill sill doorknob handle knob lock
padlock key switch light_switch outlet socket plug cord remote remote_control television tv
monitor screen computer laptop laptop_computer desktop keyboard mousepad mouse_pad printer
speaker microphone circuit_board motherboard phone cell_phone cellphone mobile_phone smartphone
telephone tablet camera
tripod headset charger battery radio stereo record_player console controller joystick book
notebook magazine newspaper envelope letter card map pen pencil marker crayon eraser ruler
stapler tape glue brush paintbrush easel palette toy teddy_bear stuffed_animal stuffed_toy
ball puzzle die/dice chess chessboard board_game lego gift present package parcel
wrapping_paper refrigerator fridge freezer oven stove stovetop microwave toaster dishwasher
sink faucet tap countertop cutting_board chopping_board knife/knives fork spoon chopstick
spatula ladle whisk pan frying_pan skillet wok saucepan grater peeler colander tray platter
saucer lid napkin tissue towel dishcloth sponge soap toilet toilet_paper bathtub tub shower
showerhead toothbrush toothpaste comb hairbrush razor hair_dryer hair_drier hairdryer perfume
lipstick makeup lotion shampoo scale laundry washing_machine washer dryer ironing_board hanger
clothesline clothespin broom mop vacuum vacuum_cleaner dustpan hose rake shovel spade hoe
wheelbarrow lawn_mower lawnmower hammer screw screwdriver wrench drill saw axe ax tool toolbox
rope hook bolt gear pipe tube valve tank cylinder cube sphere pyramid rectangle oval hexagon
octagon pentagon triangle circle disk disc dot heart diamond cross plus/pluses spiral arrow
stripe crescent donut block ring star rack jug pitcher carafe flask thermos canteen lunchbox
lunch_box cooler shoebox postbox piggy_bank coin money cash banknote bill ticket receipt
credit_card business_card keychain key_chain badge medal trophy/trophies poster sticker label
tag chalkboard blackboard whiteboard bulletin_board clipboard folder binder file document
paper notepad sticky_note post-it calculator globe locker projector drone satellite_dish
solar_panel wind_turbine turbine generator bulb light_bulb thermostat alarm_clock hourglass
sundial compass telescope microscope magnifying_glass hearing_aid walking_stick cane crutch
walker stretcher syringe pill bandage thermometer stethoscope cigarette cigar ashtray lighter
match matchbox torch flashlight lampshade lamp_shade light_fixture ornament firework confetti
bow cage birdcage fish_tank terrarium leash litter_box scratching_post feeder rubber_duck
yo-yo frisbee hula_hoop jump_rope skipping_rope rattle pacifier bib diaper baby_bottle
baby_carriage playpen rocking_chair rocking_horse swing slide seesaw sandbox sandpit trampoline
monkey_bars jungle_gym painting picture portrait drawing print photograph sketch
# more everyday things (LVIS / Open Images-like categories)
# kitchen and table
teaspoon tablespoon soup_spoon ladle butter_knife steak_knife cleaver paring_knife bread_knife
corkscrew bottle_opener can_opener nutcracker rolling_pin measuring_cup mixing_bowl sieve
strainer funnel baking_sheet baking_tray muffin_tin cake_stand cake_pan pie_dish casserole_dish
dutch_oven crock_pot slow_cooker pressure_cooker rice_cooker food_processor juicer toaster_oven
hot_plate griddle grill_pan barbecue_grill grill skewer tongs oven_mitt pot_holder apron
tablecloth placemat coaster napkin_ring salt_shaker pepper_shaker pepper_mill grinder spice_rack
sugar_bowl creamer gravy_boat butter_dish cheese_board bread_basket bread_box cookie_jar
canister tupperware thermos ice_bucket wine_cooler punch_bowl serving_bowl serving_tray
tureen ramekin goblet tumbler chalice stein straw
drinking_straw toothpick dish_rack dish_soap scouring_pad trash_bin recycling_bin
compost_bin bento
# rooms, furniture, fixtures
loveseat futon chaise daybed headboard footboard bedframe bed_frame canopy_bed hammock
beanbag bean_bag rocking_chair folding_chair lawn_chair deck_chair office_chair swivel_chair
stool footstool  breakfast_bar kitchen_island island console_table coffee_maker
sideboard buffet hutch credenza armoire chest chest_of_drawers vanity medicine_cabinet
shelving bookend filing_cabinet file_cabinet display_case showcase
shutter blinds valance curtain_rod towel_rack towel_bar toilet_brush plunger bath_mat shower_head
shower_stall bidet urinal soap_dish soap_dispenser tissue_box toilet_roll hand_dryer
skylight dormer bay_window french_door sliding_door screen_door garage_door trapdoor hatch
banister newel baseboard molding wainscoting rafter joist truss stairwell landing
mantle hearth chimney_stack woodstove wood_stove furnace boiler water_heater ceiling_light
spotlight floodlight lamppost nightlight night_light sconce pendant_light
doorbell intercom peephole door_knocker welcome_mat
# electronics and office
touchscreen touchpad webcam modem router server
usb_drive flash_drive hard_drive memory_card sd_card power_strip extension_cord adapter
earpiece headphone earphone speakerphone walkie-talkie pager smartwatch fitness_tracker
e-reader kindle camcorder video_camera security_camera lens
selfie_stick gimbal mixer loudspeaker subwoofer jukebox
typewriter fax_machine photocopier copier scanner shredder paper_shredder laminator
hole_punch paper_clip binder_clip rubber_band push_pin thumbtack pushpin pencil_case
pencil_sharpener sharpener protractor set_square compass_set highlighter fountain_pen ink
inkwell quill stamp_pad rubber_stamp envelope_opener letter_opener desk_organizer in-tray
legal_pad sketchbook diary journal planner scrapbook photo_album album
bookmark booklet brochure pamphlet leaflet flyer catalog catalogue menu
# clothing and accessories
undershirt singlet camisole crop_top halter bodysuit onesie romper jumpsuit dungarees
cargo_pants chinos khakis slacks capris culottes tracksuit track_suit sweatsuit
windcheater anorak puffer_jacket down_jacket gilet poncho shawl wrap
pashmina muffler balaclava ski_mask earflap trapper_hat beret bowler_hat boater panama_hat
stetson bucket_hat snapback trucker_hat sun_visor headscarf durag hairnet shower_cap
wig toupee hair_clip barrette scrunchie hair_tie tiara diadem circlet cufflinks tie_clip
lapel_pin pocket_square handkerchief bandanna neckerchief ascot cravat suspenders
garter corset girdle petticoat nightdress nightshirt negligee
tights stocking knee_sock ankle_sock legwarmer leg_warmer spat gaiter wader galosh
wellington moccasin espadrille oxford brogue pump mule platform_shoe wedge
ballet_flat ankle_boot cowboy_boot combat_boot hiking_boot snow_boot rain_boot ugg
skate_shoe shoelace lace insole heel_strap buckle clasp zipper_pull drawstring
eyeglass monocle contact_lens lanyard badge_holder id_card name_badge wristband armband
anklet toe_ring nose_ring lip_ring piercing locket charm charm_bracelet bangle cuff choker
chain_necklace bead rosary amulet talisman medallion signet_ring engagement_ring
wedding_ring wedding_band
# food, more
baguette brioche ciabatta focaccia sourdough rye pumpernickel flatbread naan chapati roti
cornbread biscotti shortbread scone crumpet english_muffin pretzel_roll hot_cross_bun
danish cinnamon_roll eclair profiterole cannoli churro beignet fritter funnel_cake strudel
baklava tiramisu mousse panna_cotta creme_brulee souffle trifle parfait cobbler crumble
gelato sorbet snow_cone slushie granita ice_pop fudge toffee caramel nougat
praline truffle bonbon gumdrop jelly_bean licorice gummy_bear candy_cane lollipop cotton_candy
pizza_crust calzone stromboli panini hoagie hero_sandwich club_sandwich blt grilled_cheese
sloppy_joe hamburger_bun slider wrap gyro shawarma falafel pita_bread enchilada
tamale fajita tostada chimichanga empanada pierogi ravioli tortellini gnocchi penne macaroni
fettuccine linguine rigatoni lasagne risotto paella pilaf biryani couscous quinoa polenta
grits hash_brown tater_tot onion_ring mozzarella_stick nugget chicken_nugget
chicken_tender fish_stick fish_and_chips chowder bisque gazpacho minestrone pho
udon soba miso_soup tempura teriyaki katsu bibimbap kimchi spring_onion
meatloaf pot_roast roast brisket rib spare_rib pork_chop lamb_chop veal venison duck_breast
turkey_leg drumstick wing chicken_leg cutlet schnitzel sirloin ribeye filet_mignon burger_patty
patty bratwurst chorizo prosciutto pastrami corned_beef jerky
salmon_steak tuna_steak lobster_tail crab_leg oyster_shell clam_shell calamari
caviar roe anchovy sardine herring mackerel tilapia halibut swordfish catfish bass_fillet
egg_yolk egg_white quiche frittata
pancake_stack waffle_iron french_toast oatmeal_bowl cereal_box granola_bar
protein_bar energy_bar trail_mix sunflower_seed pumpkin_seed sesame_seed
pecan hazelnut macadamia chestnut brazil_nut pine_nut coconut_milk almond_milk soy_milk
oat_milk buttermilk cream_soda root_beer ginger_ale cola iced_tea
herbal_tea chai matcha mocha americano macchiato frappuccino cold_brew cider
sangria margarita mojito daiquiri pina_colada martini cosmopolitan mimosa bellini punch
rum gin tequila brandy cognac sake soju pint keg
# fruit and vegetables, more
plantain starfruit jackfruit durian rambutan longan mangosteen kumquat quince loquat
gooseberry elderberry mulberry boysenberry huckleberry blackcurrant redcurrant cherry_tomato
grape_tomato heirloom_tomato romaine iceberg_lettuce arugula watercress endive radicchio
bok_choy napa_cabbage brussels_sprout collard chard swiss_chard mustard_greens dandelion_greens
parsnip rutabaga kohlrabi fennel jicama taro cassava yucca daikon horseradish wasabi
bean_sprout snow_pea snap_pea string_bean lima_bean kidney_bean
edamame soybean corn_cob corn_on_the_cob ear_of_corn pumpkin_pie squash_blossom
butternut_squash acorn_squash spaghetti_squash zucchini_flower shiitake portobello truffle_mushroom
chanterelle enoki button_mushroom scallion_bunch garlic_clove ginger_root
chili chilli paprika cayenne peppercorn cinnamon_stick vanilla_bean nutmeg clove rosemary thyme
oregano sage dill chive mint_leaf bay_leaf lemongrass tarragon
# garden, yard and farm
flower_pot window_box planter_box raised_bed garden_bed vegetable_garden herb_garden
compost_heap garden_gnome bird_bath birdbath sundial_stone stepping_stone garden_path
trellis_arch arbor gazebo_roof pergola_beam fence_panel gate_post picket rail_fence
hedge_row hedgerow shrubbery flower_border lawn_chair patio_umbrella sun_umbrella
beach_umbrella parasol_stand deckchair sun_lounger lounger hammock_stand swing_set tire_swing
treehouse tree_house sandpit kiddie_pool paddling_pool garden_hose sprinkler_head hose_reel
watering_can wheelbarrow_load leaf_blower hedge_trimmer chainsaw pruning_shears shears
secateurs trowel pitchfork hayfork scythe sickle plow plough harrow tiller cultivator
hay_bale haybale straw_bale silo_tower feed_trough water_trough hay_wagon grain_bin
tractor_trailer combine_harvester harvester baler chicken_coop hen_house rabbit_hutch hutch
pigpen pigsty sty stall_door horse_stall horseshoe saddle_blanket bridle reins stirrup harness
halter lead_rope hitching_post cowbell sheepfold fold beehive_box scarecrow_post
# tools and workshop
toolkit tool_belt workbench vise vice clamp anvil chisel rasp sandpaper
sander lathe jigsaw circular_saw hacksaw handsaw bandsaw tape_measure
measuring_tape spirit_level plumb_line crowbar pry_bar sledgehammer mallet
hatchet pickaxe shovel_blade putty_knife caulk_gun glue_gun staple_gun nail_gun
soldering_iron multimeter headlamp head_torch
extension_ladder stepladder step_ladder scaffold sawhorse
hinge latch hasp keyring key_ring coil cable_tie
zip_tie duct_tape masking_tape twine knitting_needle
crochet_hook sewing_machine sewing_kit thimble pincushion spool bobbin
loom spinning_wheel
# toys, games, hobbies
action_figure toy_soldier toy_robot toy_truck toy_boat toy_plane toy_gun water_gun
squirt_gun nerf_gun slingshot kaleidoscope spinning_top jacks
domino playing_card deck_of_cards poker_chip checkers checkerboard
backgammon mahjong game_piece pawn chess_piece rook
jigsaw_puzzle rubik's_cube rubiks_cube building_blocks lego_brick toy_block stuffed_bear
plush plushie plush_toy rag_doll barbie dollhouse doll_house toy_kitchen play_tent
teepee tipi hobby_horse pogo_stick roller_skate roller_skates inline_skate
rollerblade skateboard_deck snowboard_binding kite_string model_airplane model_car
model_train train_set remote_control_car rc_car drone_controller video_game game_controller
gamepad joypad arcade_machine pinball_machine slot_machine claw_machine foosball
foosball_table pool_table billiard_table pool_cue cue_stick billiard_ball bowling_alley
dartboard_cabinet ping_pong_table ping_pong_paddle paddle_ball shuttlecock badminton_racket
badminton_net volleyball_net tennis_net basketball_net hockey_puck hockey_net goal_net
lacrosse_stick cricket_bat cricket_ball wicket rugby_ball golf_tee golf_bag caddie
fishing_net fishing_line fishing_hook fishing_lure bait tackle_box life_preserver
surf_leash water_ski kneeboard bodyboard boogie_board skimboard
snorkel diving_mask flipper scuba_tank oxygen_tank wetsuit_top swim_cap
swimming_goggles pool_noodle float inner_tube beach_towel beach_bag
sandcastle sand_castle sand_bucket
# vehicles, transport, road
hubcap rim spare_tire tire_track tread mudflap mud_flap fender grille grill_guard hood_ornament
windshield_wiper wiper side_window rear_window sunroof roof_rack bike_rack luggage_rack
trailer_hitch tow_bar towbar tailgate truck_bed flatbed cab_roof sidecar kickstand
bicycle_seat bike_seat bicycle_helmet bike_helmet bike_lock bicycle_lock bike_chain
bike_bell bicycle_basket bike_basket training_wheels
gas_pump fuel_pump petrol_pump charging_station car_wash toll_booth tollbooth traffic_island
speed_bump median guardrail guard_rail crash_barrier road_barrier jersey_barrier sandbag
road_marking lane_marking zebra_crossing pedestrian_crossing bike_lane bus_lane cycle_path
footpath footbridge walkway overpass_bridge viaduct aqueduct railway_bridge railroad_crossing
level_crossing signal_box railway_signal train_signal platform_sign departure_board
ticket_machine ticket_booth turnstile subway_entrance metro_station tram_stop taxi_stand
cab_stand bus_bench street_name_sign one_way_sign yield_sign speed_limit_sign
road_work_sign detour_sign parking_sign no_parking_sign exit_sign arrow_sign
shop_sign storefront_sign marquee
# buildings and places, more
bungalow chalet villa lodge inn hostel guesthouse guest_house resort spa
high-rise highrise tower_block townhouse row_house terrace_house duplex
apartment_building office_building office_tower department_store
boutique grocery_store convenience_store corner_shop liquor_store pharmacy drugstore
bookstore bookshop toy_store shoe_store florist flower_shop butcher_shop fish_market
flea_market bazaar souk food_court food_stall market_stall street_market
night_market hawker_centre diner cafeteria canteen bistro brasserie tavern saloon nightclub
club_house clubhouse casino arcade opera_house
concert_hall auditorium lecture_hall gymnasium sports_hall locker ice_rink
skating_rink hockey_rink ski_resort ski_lodge boathouse boat_ramp slipway
shipyard dockyard container_port container_ship cargo_ship freighter oil_tanker tanker_truck
oil_rig watchtower bell_tower church_tower minaret belfry cupola rotunda
colonnade portico veranda verandah loggia cloister crypt vault catacomb mausoleum
obelisk stupa totem_pole totem statue_of_liberty triumphal_arch archway gateway
city_gate town_hall city_hall courthouse capitol parliament embassy consulate
post_office police_box fire_house firehouse barracks castle_wall battlement
rampart moat drawbridge turret dungeon
# nature, more
creek_bed riverbed stream_bank river_bank lakeshore lakeside seabed sea_floor ocean_floor
sandbar sand_bar spit cove inlet estuary delta fjord_cliff headland cape peninsula isthmus
archipelago atoll islet reef_flat tide_pool rock_pool boulder_field scree talus rockface
rock_face crag bluff mesa butte plateau gorge ravine gully arroyo wadi gulch chasm
sinkhole crevasse ice_cave ice_field snowfield snow_field ice_sheet ice_shelf ice_floe
permafrost frost dew raindrop rain_drop dewdrop hail hailstone sleet drizzle snowbank
snowball snow_angel snowdrop mudflat mud_puddle quicksand salt_flat
spring_water waterhole watering_hole lily_pad lilypad reed
cattail bulrush rush sedge papyrus marsh_grass sea_grass seagrass kelp plankton driftwood
deadwood brushwood firewood kindling woodpile log_pile timber lumber branchlet
bough limb tree_trunk tree_stump tree_root pine_needle conifer
evergreen deciduous_tree sapling seedling sprout shoot tendril leaflet frond palm_frond
coconut_tree banana_tree olive_tree fig_tree lemon_tree orange_tree cherry_tree peach_tree
plum_tree pear_tree magnolia dogwood redwood sequoia cedar cypress fir spruce hemlock larch
juniper yew holly boxwood laurel eucalyptus acacia baobab mangrove banyan bamboo_grove
birch_tree maple_tree willow_tree oak_leaf maple_leaf
rosebush rose_bush hydrangea azalea rhododendron camellia gardenia jasmine hibiscus peony
chrysanthemum carnation marigold zinnia petunia pansy geranium begonia
snapdragon foxglove lupine delphinium daffodil crocus hyacinth bluebell
buttercup primrose forget-me-not cornflower thistle heather gorse bracken
wildflower wild_flower dandelion_clock seed_head pinecone
# sports and music
soccer_ball football basketball tennis_ball golf_ball volleyball beach_ball bowling_ball
bowling_pin racket racquet tennis_racket tennis_racquet bat baseball_bat baseball_glove
baseball_mitt mitt net goal hoop puck stick hockey_stick club golf_club golf_cart dumbbell
barbell kettlebell treadmill cleat whistle base fishing_rod fishing_pole rod reel target dart
dartboard sword shield spear gun rifle pistol cannon bullet ski_pole boxing_glove punching_bag
life_vest life_ring buoy guitar piano violin cello double_bass drum drum_kit drumstick trumpet
saxophone flute clarinet harp accordion banjo ukulele harmonica trombone tuba xylophone
tambourine bell cymbal gong organ music_stand amplifier amp turntable record vinyl cd dvd
cassette
"""

# Nouns that only exist in the plural keep that form as their lemma.
_PLURALIA = """
people glasses sunglasses eyeglasses goggles scissors pants trousers jeans shorts leggings
tights pajamas pyjamas overalls binoculars tongs pliers tweezers clippers clothes headphones
earphones earbuds stairs cattle police livestock french_fries fries sweatpants sprinkles
groceries high_heels woods
"""

# Materials: an attribute before a head ("stone wall"), an object as a head ("a pile of stones").
_MATERIAL_NOUNS = """
wood metal plastic glass stone brick concrete marble granite leather paper cardboard ceramic
porcelain steel iron rubber cotton wool silk denim velvet lace linen fur wicker bamboo straw
clay tin aluminum aluminium copper bronze brass chrome crystal gold silver canvas fabric cloth
suede satin nylon polyester foam cork cobblestone gravel ivory pearl jade ice dirt sand wax
tile rattan burlap tweed fleece corduroy plywood terracotta stucco slate sandstone limestone cement
asphalt mesh chalk charcoal neon
"""

# Nouns that are also a colour, shape, age or pattern: same split as materials
# ("orange cat" vs "an orange", "baby elephant" vs "a baby", "square table" vs "a red square").
_DUAL_NOUNS = "orange coral cream rainbow emerald ruby sapphire square light baby adult tabby"

# Nouns that are never objects: abstract, time and event words.
_ABSTRACT_NOUNS = """
time day night dawn dusk twilight daybreak nightfall morning afternoon evening noon midnight today
tonight yesterday tomorrow week
weekend month year decade century hour minute moment season summer winter spring autumn fall
christmas halloween easter thanksgiving holiday vacation birthday anniversary wedding
party/parties event ceremony celebration festival concert show performance game match race
competition tournament championship practice training lesson class meeting conference protest
parade trip journey tour travel adventure life/lives lifestyle love fun joy happiness beauty
nature world environment concept idea business success teamwork health fitness exercise sport
sports tennis baseball soccer golf hockey rugby yoga art music dance fashion style design
color colour size pattern texture
sight area region space place spot location position direction distance
surface way thing something nothing anything everything someone somebody anyone anybody
everyone everybody air wind weather heat sound noise text word name title message quote trick
stunt jump turn ride walk run swim look pose smile kiss hug laugh display order use work job
activity action motion speed attention traffic daylight sunlight sunshine shade darkness
silhouette picnic barbecue bbq safari hike climb dive flight landing takeoff wilderness
outdoors indoors home decoration decor copy copyspace copy_space quality
fantasy dream memory story/stories history culture religion science technology education
industry economy finance marketing communication network internet website app software data
information service medicine treatment therapy diet nutrition skincare detail version mid_air
midair chance luck peace war freedom hope faith power energy force reason fact part_of
mood atmosphere vibe theme opportunity occasion visit stroll ecosystem habitat species/= concept
process method system solution strategy problem issue risk project plan goal future past
caption description explanation manner expression emotion feeling reaction reflex attitude
behavior behaviour habit skill talent experience knowledge opinion choice decision question
answer news newscast broadcast report interview speech discussion conversation argument
agreement contract deal price cost value amount total result effect impact benefit advantage
example sample type category list series episode chapter rush
horseback trade tradition custom ritual arrival departure
welcome greeting invitation occasion anniversary evening_out night_out
"""

_POSITION_NOUNS = """
top bottom front back rear side middle center centre edge end left right inside outside tip
corner base underside backside
"""

_MEDIUM_NOUNS = """
photo photograph photography picture image illustration vector drawing painting portrait sketch
print artwork render rendering graphic graphics icon logo clipart clip_art animation screenshot
snapshot shot closeup close-up close_up selfie stock stock_photo stock_image stock_vector
footage video film still collage infographic diagram chart template mockup mock-up wallpaper
engraving etching lithograph caricature doodle emblem symbol pic photoshoot depiction
representation rendition view aerial_view top_view side_view front_view panorama
panoramic_view birds_eye_view fish_eye fisheye fish-eye background foreground backdrop scene
scenery landscape seascape
cityscape interior exterior
"""
# These are things in a scene unless followed by "of"
# ("a painting hanging on the wall" vs "a painting of a ship").
_MEDIUM_OR_OBJECT = "picture painting drawing portrait poster sketch print"

# Quantity frames: dropped with their adjectives before "of" ("a large group of people");
# alone, the first list are objects ("a young couple") and the second nothing.
_QUANTITY_OR_OBJECT = "couple crowd family/families pack slice sheet stack pile heap row"
_QUANTITY_NOUNS = """
group bunch pair lot lots number amount kind type sort variety assortment collection selection
set series array range herd flock swarm team squad crew bundle cluster dozen plenty handful mix
mixture batch
load piece bit part portion chunk line queue strip drop spoonful scoop cupful mouthful armful
majority
"""
# Weak heads: "a heart shape" -> heart; alone ("a red shape") they are the object.
_WEAK_NOUNS = "shape object item figure form"

# Attribute adjectives, by the visual class they describe.
_ATTRIBUTES = """
# colour
red green blue yellow purple violet white black pink gray grey brown cyan magenta beige tan
maroon navy teal indigo crimson scarlet burgundy khaki lilac aqua azure golden silvery blond
blonde auburn ginger turquoise colorful colourful multicolored multicoloured multicolor
multi-colored multi-coloured multi-color pastel dark pale bright vivid monochrome monochromatic
transparent translucent opaque shiny glossy matte metallic sparkly sparkling glittery
iridescent fluorescent reddish bluish greenish yellowish brownish pinkish grayish greyish
whitish blackish purplish orangish darker darkest brighter brightest paler
# size (with comparative and superlative forms)
small little tiny big large huge giant enormous massive gigantic miniature mini tall short long
wide narrow thick thin fat skinny slim slender petite oversized jumbo deep shallow chubby plump
high low smaller smallest bigger biggest larger largest taller tallest longer longest shorter
shortest wider widest thicker thickest thinner thinnest tinier tiniest higher highest lower
lowest deeper huger
# shape
round rectangular circular triangular oval spherical cylindrical curved curly straight wavy
flat pointed pointy spiky jagged crooked bent twisted hexagonal octagonal heart-shaped
star-shaped angular conical cubic geometric
# material
wooden metal plastic glass stone brick concrete marble leather paper cardboard ceramic
porcelain steel iron rubber cotton woolen woollen silk denim velvet lace linen fur wicker
bamboo straw clay copper bronze brass chrome crystal silver gold canvas knit knitted woven
crocheted stainless rattan suede satin tweed
# pattern
striped stripy plaid checkered checked chequered spotted dotted polka-dot polka_dot
polka-dotted floral flowered patterned camouflage camo paisley tartan speckled mottled dappled
textured embroidered sequined tie-dye tie-dyed leopard-print leopard_print animal_print
herringbone houndstooth gingham argyle
# age
old young new elderly ancient antique vintage retro modern older younger oldest youngest newer
newest aged middle-aged
teenage newborn contemporary futuristic medieval victorian
# physical state
wet dry empty full open closed broken clean dirty messy cluttered torn ripped rusty rusted
frozen melted sliced chopped diced minced cooked raw fried deep-fried grilled baked roasted
burnt burned boiled steamed toasted poached scrambled mashed peeled ripe unripe rotten dead
withered wilted dried folded wrinkled crumpled lit unlit illuminated glowing blurry blurred
hazy foggy misty snowy sunny cloudy overcast rainy stormy dusty muddy sandy grassy rocky leafy
bare naked nude shirtless barefoot bald bearded shaved shaven tattooed masked uniformed hooded
sleeveless tanned sunlit shady shaded dim frosty icy smoky steamy flooded overgrown fluffy
furry hairy feathered scaly cracked dented chipped shattered bloody half-empty half-full blank
upturned inflated deflated puffy mossy wooded forested cloudless starry moonlit snowcapped
snow-capped
# visual style
cartoon animated abstract realistic photorealistic 3d 2d hand-drawn handdrawn sepia grayscale
greyscale black-and-white pixelated minimalist isometric watercolor watercolour psychedelic
low-poly pixel
"""

# Adjectives that are not attributes: judgements, feelings, non-visual properties.
_OTHER_ADJECTIVES = """
beautiful pretty cute lovely nice good great best better amazing awesome adorable gorgeous
stunning happy sad funny fun cool hot cold warm busy crowded favorite favourite perfect
delicious tasty yummy healthy fancy elegant stylish fashionable trendy famous popular typical
traditional local professional simple different various same other own certain main whole
entire real actual natural special unique strange weird interesting boring scary creepy angry
excited serious confident attractive handsome sexy hungry tired lonely alone peaceful quiet
calm romantic cozy cosy luxury luxurious expensive cheap rich poor important free public
private personal social national international urban rural tropical exotic wild domestic
industrial residential commercial outdoor indoor early late next last first second third
fourth fifth final recent daily annual digital electric human male female fresh organic
homemade festive seasonal spicy sweet sour salty bitter crispy crunchy juicy creamy soft hard
smooth rough heavy lightweight strong weak fast slow quick easy difficult serene tranquil
idyllic picturesque scenic majestic magnificent spectacular impressive incredible wonderful
fantastic fabulous glorious magical mysterious dramatic charming lively vibrant cheerful
playful friendly curious shy proud brave sleepy asleep awake alive ready able unable likely
possible impossible full-size life-size sized medium medium-sized vertical horizontal diagonal
upright upside-down upside sideways parallel central western eastern northern southern
american european asian african british english french italian spanish german chinese
japanese indian mexican russian greek thai korean canadian australian irish scottish dutch
swiss turkish arabic brazilian christian jewish muslim catholic royal military official
classic classical iconic historic historical religious spiritual cultural creative artistic
decorative ornamental ornate plain basic ordinary normal common rare unusual similar identical
matching single double triple extra additional assorted mixed live living dying pregnant
nervous worried scared frightened surprised shocked bored relaxed joyful fit sick ill injured
hurt safe dangerous lucky brand-new latest current former future past present everyday casual
formal sporty athletic muscular successful wealthy homeless welcome open-air comfortable
uncomfortable neat tidy organized well-dressed dressed seamless isolated free-standing handmade
hand-made high-quality premium deluxe vast endless holy sacred secret hidden visible invisible
exposed deserted abandoned remote distant nearby close far faraway underwater aerial panoramic
wide-angle top-down macro daytime nighttime springtime summertime wintertime autumnal wintry
electronic mechanical automatic manual wireless portable mobile virtual kawaii silly crazy
goofy quirky odd bizarre surreal epic legendary royalty-free various own adult-only
"""

# Closed classes. Determiners and numbers start a phrase; prepositions and the other words end
# one; negators drop the next phrase.
_DETERMINERS = """
a an the this these those some any each every all both either another other others such
whatever whichever my your his her its our their one two three four five six seven eight nine
ten eleven twelve thirteen fourteen fifteen twenty thirty forty fifty hundred thousand million
several many few much more most plenty various numerous multiple half dozens hundreds thousands
"""
_PREPOSITIONS = """
in on at of with by for from into onto over under above below beneath beside besides between
among amongst through across along around behind near next inside outside against toward
towards upon within off down up past via like as than during atop underneath amid amidst
throughout before after about beyond opposite alongside thru aboard despite except including
per versus vs unlike
"""
# Words after which a noun-or-verb word is the verb ("he skis", "to ski", "can ski").
_SUBJECT_WORDS = """
i you he she it we they who which that to can could will would shall should may might must
"""
_OTHER_WORDS = """
me him us them myself yourself himself herself itself ourselves themselves whom whose what
where when why how whether while whilst if because since though although unless until till so
then there here now also too very really quite rather just only even still almost nearly
already yet again ever always often sometimes usually once twice together away apart ahead
forward forwards backward backwards aside out upstairs downstairs somewhere everywhere anywhere
elsewhere overhead is are was were be been being am do does did done doing have has had having
let lets please yes ok okay oh hey wow seemingly apparently perhaps maybe probably possibly
definitely certainly clearly simply mostly mainly partly fully completely totally entirely
slightly highly extremely incredibly somewhat kinda sorta alot well s
"""
_NEGATORS = "no not without never nor neither none nobody n't isnt arent dont doesnt cannot"

# Verbs (base forms); -s, -ed and -ing forms are made by rule (_verb_forms).
_VERBS = """
be have do go get make take give put set see look watch stare gaze view show display sit stand
lie lay rest lean kneel squat crouch sleep nap wake walk run jog sprint race hurry rush stroll
wander hike climb jump hop leap skip dance spin twirl swim dive float sink splash surf ski
skate snowboard skateboard sled sail row paddle fly soar glide hover land drive ride steer park
stop wait cross pass turn head come arrive leave enter exit approach follow chase lead guide
pull push drag carry hold grab grip catch throw toss pitch hit swing kick strike punch bat
serve shoot aim score block tackle bounce roll slide fall drop lift raise pick place hang mount
attach tie wrap cover fill empty pour spill mix stir cook bake fry grill roast boil chop slice
cut peel eat bite chew drink sip lick taste feed share offer sell buy shop pay order prepare
arrange decorate paint draw write read study learn teach talk speak say tell ask answer call
shout yell sing play perform practice train exercise stretch pose smile laugh grin cry frown
wink wave point gesture clap cheer celebrate hug kiss cuddle pet stroke brush comb wash clean
scrub wipe dry fold iron sew knit build construct repair fix work operate use type text browse
photograph film record capture frame focus blur reflect shine glow burn melt freeze grow bloom
sprout blossom graze herd fish hunt nest perch roost crawl creep slither bark meow growl roar
chirp sniff scratch groom shake wag tug fetch gnaw surround line border face overlook touch
contain include feature depict illustrate represent combine match wear dress undress try fit
model search find discover explore visit travel tour camp relax enjoy love like want need hate
seem appear become remain stay keep let help assist protect guard save rescue fight battle
compete win lose beat gather meet greet crowd queue rally march protest vote load unload
deliver pack unpack ship post mail open close shut lock unlock ring knock sign check count
measure weigh balance juggle flip sweep mop vacuum plant water dig rake mow harvest milk shear
tow haul transport connect stack pile sort reach bend tilt drift flow rain snow rise sunbathe
tan bathe shower shave style trim braid curl blow pop burst inflate smoke dine feast toast gulp
slurp devour nibble munch scream whisper listen hear observe spot notice examine inspect marry
wed propose graduate age wilt die kill attack sting pour serve hand pose doze snuggle nuzzle
start begin continue finish try establish create produce provide allow enable support
consider choose decide plan design develop prepare gather collect invite join share post
check compare cause affect improve increase reduce protect describe explain discuss
kneel bow peek peer glance grimace yawn stretch wade skid drip soak dangle hang tower loom sag
sprawl lounge rest recline huddle cluster crowd swarm flock fill occupy await cook clean
"""
# Irregular verb forms that the rules do not make; all end a phrase.
_IRREGULAR_VERB_FORMS = """
went gone got gotten made took taken gave given saw seen showed shown sat stood lain laid slept
woke woken ran swam swum dove flew flown drove driven rode ridden came left led held caught
threw thrown swung struck shot fell fallen hung fed sold bought paid spoke spoken said told
taught sang sung wore worn built brought thought kept found grew grown froze shone bit bitten
won lost beaten met sought knelt leapt leant dreamt spread split spun slid stuck wove woven
sewn shook shaken tore broke sank sunk blew blown drew drawn wrote written began begun
"""

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


def _items(text):
    """Words of a word list: comment lines dropped, "_" turned into spaces."""
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            for w in line.split():
                yield w.replace("_", " ")


def _build_table():
    """Map every known surface form (and multi-word name) to its entry
    (class, lemma, noun kind, attribute reading or None, flags)."""
    table = {}
    verb = {}  # surface -> verb flag
    for v in _items(_VERBS):
        s, ed, ing = _verb_forms(v)
        verb[v] = verb.get(v, 0) | _VB_BASE
        verb[s] = verb.get(s, 0) | _VB_S
        for f in ed + ing:
            verb[f] = verb.get(f, 0) | _VB_PART
    for f in _items(_IRREGULAR_VERB_FORMS):
        verb[f] = verb.get(f, 0) | _VB_PART
    for f, fl in verb.items():  # finite forms end a phrase, participles may sit inside one
        table[f] = (_X, f, 0, None, _VERB) if fl & (_VB_BASE | _VB_S) else (_G, f, 0, None, 0)
    for w in _items(_OTHER_ADJECTIVES):
        table[w] = (_J, w, 0, None, 0)

    # Nouns, in rising precedence. Plurals are written first and singulars after, so a listed
    # word ("woods", "glasses") wins over another word's plural.
    nouns = []  # (word, plural or None, kind, attribute reading, flags)

    def add(text, kind, attr=False, flags=0, plural=True):
        for item in _items(text):
            w, _, p = item.partition("/")
            p = w if p == "=" else (p or (_plural(w) if plural else None))
            nouns.append((w, p, kind, w if attr else None, flags))

    add(_ANIMATE_NOUNS, _OBJ, flags=_ANIM)
    add(_OBJECT_NOUNS, _OBJ)
    add(_PLURALIA, _OBJ, flags=_PL, plural=False)
    add(_ABSTRACT_NOUNS, _ABS)
    add(_POSITION_NOUNS, _POS)
    add(_MEDIUM_NOUNS, _MED)
    add(_MEDIUM_OR_OBJECT, _MED_OBJ)
    add(_QUANTITY_NOUNS, _QTY)
    add(_QUANTITY_OR_OBJECT, _QTY_OBJ, flags=_ANIM)
    add(_WEAK_NOUNS, _WEAK)
    for w, p, kind, attr, fl in nouns:
        if p is not None and p != w:
            table[p] = (_N, w, kind, None, fl | _PL)
    for w, p, kind, attr, fl in nouns:
        table[w] = (_N, w, kind, attr, fl | (_PL if p == w and p is not None else 0))
    size = _ATTRIBUTES.index("# size")
    sizes = set(_items(_ATTRIBUTES[size:_ATTRIBUTES.index("# shape")]))
    for w in _items(_ATTRIBUTES):
        table[w] = (_A, w, 0, w, _SIZE if w in sizes else 0)
    # Materials and colour nouns: an attribute as a modifier, an object as a head.
    for w in _items(_MATERIAL_NOUNS + " " + _DUAL_NOUNS):
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
    for w in _items(_DETERMINERS):
        table[w] = (_D, w, 0, None, 0)
    for w in _items(_PREPOSITIONS):
        table[w] = (_P, w, 0, None, 0)
    for w in _items(_OTHER_WORDS):
        table[w] = (_X, w, 0, None, 0)
    for w in _items(_SUBJECT_WORDS):
        table[w] = (_P if w == "to" else _X, w, 0, None, _SUBJ)
    for w in _items(_NEGATORS):
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
def _caption_tags(text):
    """Tags of one caption as counted and encoded: its objects, then its attributes that are
    not also objects ("an orange cat next to an orange" counts "orange" once)."""
    objects, attributes = parse_caption(text)
    return objects, [a for a in attributes if a not in objects]


class TagVocab:
    """The K tags of TagAlign's classification loss: objects first, then attributes, one index
    space. A name is one tag even if captions use it both ways ("orange").

    tags: list[str]; kinds: "object" or "attribute" per tag; counts: number of captions of the
    building corpus that mention the tag; index: name -> position; meta: what built it."""

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

    @classmethod
    def from_tags(cls, tags):
        """A vocabulary from tag names alone (e.g. a checkpoint's): a name the parser reads
        as an attribute adjective is an attribute, anything else an object; counts are 0."""
        kinds = ["attribute" if _TABLE.get(t, (None,))[0] == _A else "object" for t in tags]
        return cls(tags, kinds, [0] * len(tags))

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
        objects, attributes = parse_caption(caption)
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


def build_vocab(captions, top_objects=9000, top_attributes=1000, min_count=5):
    """Count the tags of an iterable of captions and keep the most frequent ones.

    The paper keeps the top 10,000 tags. Attributes are a closed class (the parser knows a few
    hundred), so 1,000 slots hold all that occur and the other 9,000 go to objects; a tag seen
    in fewer than min_count captions is too rare to learn and is often a typo."""
    _check_vocab_args(top_objects, top_attributes, min_count)
    object_counts, attribute_counts = Counter(), Counter()
    for c in captions:
        objects, attributes = _caption_tags(c)
        object_counts.update(objects)
        attribute_counts.update(attributes)
    return _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count)


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
    """The "caption" string of a JSON object given as bytes, or raise ValueError."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"bad JSON ({e.__class__.__name__})") from None
    cap = obj.get("caption") if isinstance(obj, dict) else None
    if not isinstance(cap, str):
        raise ValueError("no 'caption' string")
    return cap


def _tsv_caption_column(path, header_line):
    header = header_line.decode("utf-8", "replace").rstrip("\r\n").split("\t")
    names = [h.strip().lower() for h in header]
    if "caption" not in names:
        raise ValueError(f"{path}: TSV header has no 'caption' column (header: {header[:8]})")
    return names.index("caption")


def iter_captions(path):
    """The samples of one caption file, in order: (caption, None), or (None, reason) for a
    malformed one, so that row i of the tag file is sample i of the input.

    .txt: one caption a line. .tsv: a header line naming a "caption" column, then one row a
    sample. .jsonl: one {"caption": ...} object a line. .tar (webdataset): one sample per key,
    its caption in KEY.txt, else in the "caption" field of KEY.json; a key with neither (an
    image alone) is a malformed sample. Non-UTF-8 text and empty captions are malformed."""
    fmt = _caption_format(path)
    if fmt == "tar":
        yield from _iter_tar_captions(path)
        return
    with open(path, "rb") as f:
        col = _tsv_caption_column(path, f.readline()) if fmt == "tsv" else None
        for n, raw in enumerate(f, 2 if fmt == "tsv" else 1):
            where = f"{path}:{n}"
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                yield None, f"{where}: empty line"
                continue
            try:
                if fmt == "jsonl":
                    cap = _json_caption(raw)
                else:
                    line = raw.decode("utf-8")
                    if fmt == "tsv":
                        fields = line.split("\t")
                        if len(fields) <= col:
                            raise ValueError("missing caption column")
                        line = fields[col]
                    cap = line
            except UnicodeDecodeError:
                yield None, f"{where}: not UTF-8"
                continue
            except ValueError as e:
                yield None, f"{where}: {e}"
                continue
            cap = cap.strip()
            yield (cap, None) if cap else (None, f"{where}: empty caption")


def _iter_tar_captions(path):
    def sample(key, txt, js):
        where = f"{path}:{key}"
        try:
            if txt is not None:
                cap = txt.decode("utf-8").strip()
            elif js is not None:
                cap = _json_caption(js).strip()
            else:
                return None, f"{where}: no .txt or .json caption"
        except UnicodeDecodeError:
            return None, f"{where}: not UTF-8"
        except ValueError as e:
            return None, f"{where}: {e}"
        return (cap, None) if cap else (None, f"{where}: empty caption")

    try:
        tf = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from None
    key = txt = js = None
    with tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                # webdataset: the key is the path up to the first dot of the file name
                d, base = os.path.split(m.name)
                stem, _, ext = base.partition(".")
                k = f"{d}/{stem}" if d else stem
                if k != key:
                    if key is not None:
                        yield sample(key, txt, js)
                    key, txt, js = k, None, None
                ext = ext.lower()
                if ext == "txt" or ext == "json":
                    data = tf.extractfile(m).read()
                    if ext == "txt":
                        txt = data
                    else:
                        js = data
        except (tarfile.TarError, EOFError, OSError) as e:
            yield None, f"{path}: truncated or corrupt tar after key {key!r} ({e.__class__.__name__})"
            return
        if key is not None:
            yield sample(key, txt, js)


def _tag_chunk(captions):
    """Worker: tags of a chunk of captions (None = malformed). Returns the chunk's distinct
    (kind, name) keys, kind 0 object / 1 attribute, and per caption the key numbers
    (int32 bytes) and their count (int32 bytes): small to send back to the main process."""
    local, ids, lens = {}, array("i"), array("i")
    for c in captions:
        if c is None:
            lens.append(0)
            continue
        objects, attributes = _caption_tags(c)
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
              chunk_size=2048, progress=True):
    """The `tags` command: parse every caption of the files, build the vocabulary, and write

        out_dir/vocab.json        TagVocab.save: tags, kinds, counts, params, the input files
        out_dir/tag_offsets.npy   int64 (N+1,): sample i has tags ids[offsets[i]:offsets[i+1]]
        out_dir/tag_ids.npy       uint16 (int32 if K > 65535) tag indices, objects first

    with one row per input sample in input order (files in the given order; a malformed
    sample gets an empty row and is counted). Streams: the captions are read once, parsed on
    `workers` processes (None: all cores) in chunks, and their provisional tag numbers spill
    to a temporary file; memory holds one number per distinct tag, not the parses.
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
    files = [{"path": p, "samples": 0, "malformed": 0} for p in paths]
    examples = []  # the first few malformed samples, "file:line: reason"

    def captions():
        for rec in files:
            for cap, why in iter_captions(rec["path"]):
                rec["samples"] += 1
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
        with open(tmp_ids, "wb") as f_ids, open(tmp_lens, "wb") as f_lens:
            for chunk_keys, ids, lens in _map_ordered(_tag_chunk, _chunks(captions(), chunk_size), workers):
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
        for p in (tmp_ids, tmp_lens):
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
                         {"corpus": corpus})
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
    for name in ("tag_offsets.npy", "tag_ids.npy"):
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    os.remove(tmp_ids)
    os.remove(tmp_lens)
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
    lines.append(f"wrote {stats['vocab']}, {stats['offsets']}, {stats['ids']}")
    return "\n".join(lines)


def read_tags(out_dir):
    """The per-sample tags written by tag_files: (offsets int64 (N+1,), ids (nnz,)), memory-
    mapped. Sample i's tag indices into vocab.json's tags are ids[offsets[i]:offsets[i+1]]."""
    paths = [os.path.join(out_dir, f) for f in ("tag_offsets.npy", "tag_ids.npy")]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tag file not found: {p} (run `python tagalign.py tags`)")
    offsets, ids = (np.load(p, mmap_mode="r") for p in paths)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError(f"{paths[0]}: offsets do not match {paths[1]} ({len(ids)} ids)")
    return offsets, ids


# ---------------------------------------------------------------- the synthetic world
# A procedural world of coloured shapes on textured ground (DESIGN section 5). Every sample is a
# pure function of (seed, split, index): nothing is stored, and the validation images are the
# same for every training seed. Ground truth is exact, so segmentation can be scored.
#
# Design choices. A prototype with 8 shapes x 8 colours learned colour and ground in minutes
# but never shape; measured here (tagalign's image tower, direct multi-label supervision of the
# mean-pooled embedding, batch 64): colour is learned in ~150 steps, shape needs ~1,000, while
# the same tower with MAX pooling learns shape in ~300. The mean over 64 patches dilutes the few
# patches an object covers (a multiple-instance problem), and TagAlign's image embedding IS that
# mean. So the world gives the short CPU budget the best chance without changing the model:
# - four shapes that differ in silhouette (a ring is hollow, a cross has arms, a triangle has
#   points), drawn big (radius 12-24% of the side) and turned by up to 17 degrees;
# - each shape also has its own surface marking (stripes on triangles, a checkerboard on
#   crosses, circles and rings plain), as real objects have texture as well as outline;
# - six object colours, well apart from each other and from the six ground textures;
# - "binding" scenes (30%): objects share a colour or a shape with another one in the same image
#   (a red circle, a red cross and a blue circle), so colour alone cannot place "red circle".
# SHAPES may be any subset of the shapes _shape_mask draws (square and star as well).

SHAPES = ("circle", "triangle", "cross", "ring")
COLOURS = {  # name -> RGB
    "red": (215, 35, 35), "green": (40, 190, 70), "blue": (35, 75, 225),
    "yellow": (245, 215, 30), "purple": (150, 55, 195), "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
STUFF = ("grass", "sand", "water", "snow", "sky", "road")
SIZES = {"small": (0.12, 0.15), "big": (0.19, 0.24)}  # object radius as a fraction of the side
PATTERNS = True  # shapes carry a surface marking as well as a silhouette (see _pattern)
OBJECTS = (0.3, 0.4, 0.3)  # probability of 1, 2, 3, ... objects in a scene
_OBJECT_CDF = np.cumsum(OBJECTS)[:-1]
ROTATION = 0.3  # objects turn by up to this many radians either way

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
    "grass": ("on grass", "on the grass", "on a lawn", "in a field"),
    "sand": ("on sand", "on the sand", "on the beach", "in the desert"),
    "water": ("on water", "in the water", "floating on the sea", "on a lake"),
    "snow": ("in the snow", "on snow", "lying in the snow"),
    "sky": ("in the sky", "against the sky", "up in the sky"),
    "road": ("on a road", "on the road", "on the street", "on asphalt"),
}
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
    attr: np.ndarray     # (H, W) uint8: 0 background, 1 + colour * len(SHAPES) + shape


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

    def __init__(self, seed=0, image_size=64, split="train", pairs=None):
        self.seed, self.S, self.split = seed, image_size, split
        # Contrast pairs (training split by default): indices 2k and 2k + 1 show the same scene,
        # the odd one with every object's shape swapped for another (see sample).
        self.pairs = (split == "train") if pairs is None else pairs
        if self.pairs and len(SHAPES) < 2:
            raise ValueError("contrast pairs need at least two SHAPES")
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
            swap = layout.permutation(len(SHAPES))  # drawn by both scenes of a pair, used by the odd
            while np.any(swap == np.arange(len(SHAPES))):  # a derangement: every shape changes
                swap = layout.permutation(len(SHAPES))
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
            th = rng.uniform(-ROTATION, ROTATION)
            dy, dx = (cy - yy[y0:y1, x0:x1]) / r, (xx[y0:y1, x0:x1] - cx) / r
            u, v = dx * math.cos(th) - dy * math.sin(th), dx * math.sin(th) + dy * math.cos(th)
            m = _shape_mask(SHAPES[shape], u, v)
            rgb = np.array(COLOURS[COLOUR_NAMES[colour]], np.float32) + rng.normal(0, 10, 3)
            shade = 1 + 0.08 * v[..., None]  # light from above: a hint of 3-D
            face = rgb * shade
            if PATTERNS:  # each shape's surface marking, in the object's frame (turns with it)
                mark = _pattern(SHAPES[shape], u * r, v * r)[..., None]
                dark = rgb.mean() < 80  # a black object is marked lighter, the others darker
                face = np.where(mark, face + 90 if dark else face * 0.55, face)
            patch = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = np.where(m[..., None], face, patch)
            objects[y0:y1, x0:x1][m] = 1 + shape
            attr[y0:y1, x0:x1][m] = 1 + colour * len(SHAPES) + shape
        ny, nx = rng.integers(S, size=2)
        img = img + self.noise[ny:ny + S, nx:nx + S]  # sensor noise
        image = np.clip(img, 0, 255).astype(np.uint8)
        stuff_map = np.where(objects > 0, len(STUFF) - 1 + objects, stuff).astype(np.uint8)
        return Scene(image, caption, objects, stuff_map, attr)

    def _place(self, rng):
        """1-3 non-overlapping objects: (shape, colour, size, cy, cx, radius in px)."""
        S, n = self.S, 1 + int(np.searchsorted(_OBJECT_CDF, rng.uniform()))
        shapes = rng.integers(len(SHAPES), size=n)
        colours = rng.integers(len(COLOURS), size=n)
        if n >= 2 and rng.uniform() < 0.3:
            # Binding scene: the second object shares the first one's colour with another shape,
            # the third (if any) its shape with another colour.
            shapes[1] = (shapes[0] + rng.integers(1, len(SHAPES))) % len(SHAPES)
            colours[1] = colours[0]
            if n == 3:
                shapes[2] = shapes[0]
                colours[2] = (colours[0] + rng.integers(1, len(COLOURS))) % len(COLOURS)
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
        if len(objs) >= 2 and rng.uniform() < 0.1:  # sometimes an object goes unmentioned
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
            if rng.uniform() < 0.9:
                words.append(COLOUR_NAMES[colour])
            forms = _SHAPE_WORDS[SHAPES[shape]]  # one draw whatever the shape: pairs stay in step
            words.append(forms[int(rng.uniform() * len(forms))][len(members) > 1])
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
        if rng.uniform() < 0.7:
            text += " " + _pick(rng, _STUFF_PHRASES[STUFF[stuff]])
        prefix = _pick(rng, _PREFIXES)
        if prefix == "there is " and not text.startswith("a "):
            prefix = "there are "
        return prefix + text


# ---------------------------------------------------------------- world batches and benchmarks
WORLD_MEAN = (0.48, 0.57, 0.57)  # per-channel pixel statistics of the world, measured on 10k images
WORLD_STD = (0.28, 0.22, 0.29)
WORLD_TEMPLATES = ("a {}.",)  # zero-shot prompt; world captions read "a big red circle on grass"


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

    def __init__(self, name, n_images=500, seed=0, image_size=64):
        if name == "world-object":
            self.classes, self.background = ["background", *SHAPES], True
        elif name == "world-stuff":
            self.classes, self.background = [*STUFF, *SHAPES], False
        elif name == "world-attr":
            self.classes, self.background = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES], False
        else:
            raise ValueError(f"unknown world benchmark {name!r} (world-object, world-stuff, world-attr)")
        self.name, self.n = name, n_images
        self.world = World(seed, image_size, split="val")
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


def world_benchmark(name, n_images=500, seed=0, image_size=64):
    return WorldBenchmark(name, n_images, seed, image_size)
