# ---------------------------------------------------------------- tokenizer: byte-level BPE (CLIP-compatible)
import gzip
import html
from collections import Counter, defaultdict
from typing import Iterable

import regex
import torch

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
    """Clean a caption as CLIP does, then split it into pre-tokens.

    CLIP first runs ftfy.fix_text (repairs mojibake such as "cafÃ©"); we do not depend on ftfy,
    so only text with such broken encodings tokenises differently from CLIP. CLIP unescapes HTML
    twice ("&amp;amp;" -> "&").
    """
    text = _SPACE_RE.sub(" ", html.unescape(html.unescape(text))).strip().lower()
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
    def from_clip(cls, path: str) -> "Tokenizer":
        """Read OpenAI CLIP's merges file (bpe_simple_vocab_16e6.txt.gz)."""
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
