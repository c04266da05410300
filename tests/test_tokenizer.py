"""Tokenizer: text cleaning (ftfy's fix_text), byte round trip, BPE training, CLIP's real merges,
batching, state dict."""
import gzip
import io

import pytest
import torch
from tokenizer import _fix_text, Tokenizer




@pytest.fixture(scope="module")
def clip_tok():
    return Tokenizer.from_clip()  # the merges file shipped in assets/


@pytest.fixture(scope="module")
def toy_tok():
    # a small trained vocabulary, so round trips go through real merges without the CLIP file
    corpus = ["a small red circle on green grass", "two big blue squares", "a red star in the sky"] * 20
    return Tokenizer.train(corpus, vocab_size=560)


# (raw text, the cleaned text by hand: ftfy's fixes, html unescaped, whitespace collapsed, lowercased)
ODD_TEXTS = [
    ("Café &amp;amp; CRÈME brûlée", "café & crème brûlée"),
    ("  a\tcat\n\nsat 🐱🐈 on the mat!!  ", "a cat sat 🐱🐈 on the mat!!"),  # emoji: bytes 0x80-0x9f
    ("東京タワー, 2024年", "東京タワー, 2024年"),
    ("x\x00y\x7fz ÿ\u00ad", "xyz ÿ\u00ad"),  # controls dropped; soft hyphen (bytes c2 ad) -> chr(256+k)
    ("don't / it's (1.5 m) [ok] — ¿qué?", "don't / it's (1.5 m) [ok] — ¿qué?"),
]


# (raw text, what ftfy.fix_text makes of it): each step of fix_text that _fix_text redoes. All
# were checked against ftfy 6.3 once; the tests do not need ftfy.
FIX_TEXT_CASES = [
    ("ＣＬＩＰ\u3000２！", "CLIP 2!"),  # fix_character_width (U+3000 is the ideographic space)
    ("ﬁsh oﬀ ﬂy ĳs", "fish off fly ijs"),  # fix_latin_ligatures
    ("it’s a “cat” ‚x‛ „y‟", "it's a \"cat\" 'x' \"y\""),  # uncurl_quotes
    ("cafe\u0301 A\u030a", "café Å"),  # NFC: e + combining acute -> é
    ("\ufeffc\x00at\x7f a\x0bcat\x1b[1m!\x1b[0m", "cat acat!"),  # controls (\x0b too), BOM, escapes
    ("a\r\nb\rc\u2028d", "a\nb\nc\nd"),  # fix_line_breaks
    ("\x85 \x80 \x93x\x94", "… € \"x\""),  # fix_c1_controls: C1 controls read as Windows-1252
    ("it&rsquo;s &EACUTE;t&eacute; &amp;amp; &#x2019;", "it's Été & '"),  # ftfy's unescape_html...
    ("a <b> &amp;amp;", "a <b> &amp;amp;"),  # ...but not in text that may be HTML
    # fix_encoding: UTF-8 read as Windows-1252 or Latin-1, also twice over, or inside good text
    ("cafÃ©", "café"), ("itâ€™s", "it's"), ("ÃƒÂ©tÃƒÂ©", "été"), ("Â£5 Ã— 2, 25Â°C", "£5 × 2, 25°C"),
    ("ðŸ˜€ â†’ dÅ‚ugi", "😀 → długi"), ("naïve cafÃ©", "naïve café"),
    ("CAFÉ’S", "CAFÉ'S"),  # É’ would re-decode (to ɒ), but is no mojibake
    ("Nikeâ„¢", 'Nikeâ"¢'),  # mojibake of ™ that ftfy misses (it uncurls the „): CLIP saw this
]
# Ordinary text that fix_text leaves as it is
PLAIN_TEXTS = ["a photo of a cat.", "naïve café", "Ã", "SÃO PAULO", "IRMÃ", "Ålesund", "« café\xa0»",
               "Straße…", "東京タワー 🐱 ❤️", "x\ty\nz\x0cw", "10×20 cm, ½ cup, 25°C", "© 2020 «Ñandú»"]


@pytest.mark.parametrize("raw,fixed", FIX_TEXT_CASES)
def test_fix_text(raw, fixed):
    assert _fix_text(raw) == fixed
    assert _fix_text(fixed) == fixed  # fixing is idempotent


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_fix_text_leaves_plain_text(text):
    assert _fix_text(text) == text


def test_clip_ids_after_cleaning(clip_tok):
    # Derived as in test_clip_ids_by_hand: a merge of rank r is id 512 + r, printable ASCII byte c
    # with </w> is 256 + ord(c) - 33. Each text is cleaned first, as CLIP's ftfy.fix_text does:
    #   "ＣＡＴ ２！" -> "cat 2!": cat = a t</w> (24), c at</w> (1856) = 2368; "2" 273; "!" 256
    #   "ﬁsh" -> "fish": i s (83), is h</w> (549), f ish</w> (2247) = 2759
    #   "it’s a “cat”" -> it's a "cat": "it" = i t</w> (73) = 585, "'s" = ' s</w> (56) = 568
    #       (CLIP's contraction rule needs the straight '), "a" 320, '"' = 256 + 1 = 257
    #   "cafe\u0301" -> NFC "café" = 15304 (as in test_clip_ids_by_hand)
    #   "\ufeffc\x00at\x7f a\x0bcat" -> "cat acat": \x0b is dropped, not a space; "acat" =
    #       a c a t</w>: a t</w> (24), a c (34), then "ac at</w>" is no merge -> [546, 536]
    #   "cafÃ©" -> "café" = 15304;  "itâ€™s" and "it&rsquo;s" -> "it's" = [585, 568]
    assert clip_tok.merges[83] == ("i", "s") and clip_tok.merges[2247] == ("f", "ish</w>")
    assert clip_tok.merges[73] == ("i", "t</w>") and clip_tok.merges[56] == ("'", "s</w>")
    assert clip_tok.merges[34] == ("a", "c")
    assert clip_tok.encode("ＣＡＴ ２！") == [2368, 273, 256]
    assert clip_tok.encode("ﬁsh") == [2759]
    assert clip_tok.encode("it’s a “cat”") == [585, 568, 320, 257, 2368, 257]
    assert clip_tok.encode("cafe\u0301") == [15304]
    assert clip_tok.encode("\ufeffc\x00at\x7f a\x0bcat") == [2368, 546, 536]
    assert clip_tok.encode("cafÃ©") == [15304]
    assert clip_tok.encode("itâ€™s") == clip_tok.encode("it&rsquo;s") == [585, 568]


@pytest.mark.parametrize("raw,cleaned", ODD_TEXTS)
def test_round_trip_bytes(raw, cleaned, toy_tok):
    # decode puts a space at each word end, so compare with whitespace removed
    for tok in (Tokenizer([]), toy_tok):
        ids = tok.encode(raw)
        assert all(0 <= i < tok.sot_id for i in ids)
        assert "".join(tok.decode(ids).split()) == "".join(cleaned.split())


def test_round_trip_clip(clip_tok):
    for raw, cleaned in ODD_TEXTS:
        assert "".join(clip_tok.decode(clip_tok.encode(raw)).split()) == "".join(cleaned.split())


def test_train_first_merges():
    # Sennrich et al.'s toy corpus. Words as symbols, with counts:
    #   l o w</w> x5, l o w e r</w> x2, n e w e s t</w> x6, w i d e s t</w> x3
    # 1. pair counts: e s 9, s t</w> 9, w e 8, l o 7, ... -> tie at 9, smaller pair wins: (e, s)
    # 2. es t</w> 9 (newest 6 + widest 3) is now the top                    -> (es, t</w>)
    # 3. w e is left only in "lower" (2); top is l o 7                        -> (l, o)
    # 4. tie at 6 between e w, n e, w est</w>: smallest is (e, w)             -> (e, w)
    # 5. newest is n ew est</w>: tie at 6, (ew, est</w>) < (n, ew)            -> (ew, est</w>)
    # 6. n ewest</w> 6                                                       -> (n, ewest</w>)
    # 7. lo w</w> 5 beats lo w 2, w e 2, e r</w> 2, w i 3, ...              -> (lo, w</w>)
    corpus = ["low"] * 5 + ["Lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    tok = Tokenizer.train(corpus, vocab_size=512 + 7 + 2)
    assert tok.merges == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w"),
                          ("ew", "est</w>"), ("n", "ewest</w>"), ("lo", "w</w>")]
    assert tok.vocab_size == 521 and (tok.sot_id, tok.eot_id) == (519, 520)
    # ids 512 + rank: newest</w> is merge 5, low</w> merge 6; "lower" -> lo (2), w, e, r</w>
    # whose byte ids are their index among printable bytes from '!' (ord - 33), +256 with </w>
    assert tok.encode("newest low lower") == [512 + 5, 512 + 6, 512 + 2, ord("w") - 33, ord("e") - 33, 256 + ord("r") - 33]
    assert tok.decode(tok.encode("Newest low")) == "newest low "


def test_train_stops_when_no_pair_is_left():
    # "aa" has one pair; after merging it nothing is left, so the vocabulary stays small
    tok = Tokenizer.train(["aa", "a"], vocab_size=600)
    assert tok.merges == [("a", "a</w>")] and tok.vocab_size == 515
    # special tokens in a training text are not words to learn from
    assert Tokenizer.train(["aa <|endoftext|>"], vocab_size=600).merges == [("a", "a</w>")]
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(["aa"], vocab_size=100)


def test_clip_vocab_layout(clip_tok):
    assert len(clip_tok.merges) == 48894  # lines 1..48894 of the file
    assert (clip_tok.vocab_size, clip_tok.sot_id, clip_tok.eot_id) == (49408, 49406, 49407)


def test_clip_ids_by_hand(clip_tok):
    # Byte ids: printable ASCII byte c is id ord(c) - 33 ('!' is 0); with </w> add 256.
    # A merge of rank r (0-based line r + 1 of the file) is id 512 + r. Derivation, taking the
    # lowest-ranked pair present each time (ranks read from the file with grep):
    #   "a" -> a</w> = 256 + 64 = 320;  "." -> .</w> = 256 + 13 = 269
    #   "photo": p h o t o</w>; t o</w> (19) -> h o (94) -> p ho (304) -> pho to</w> (613) = 1125
    #   "of": o f</w> (27) = 539;  "cat": a t</w> (24), then c at</w> (1856) = 2368
    #   "bozuman" (not a word): a n</w> (38), b o (135), m an</w> (274), z u (3579); then no pair
    #       of bo zu man</w> is a merge -> [512+135, 512+3579, 512+274] = [647, 4091, 786]
    #   "2" -> 2</w> = 256 + 17 = 273; "," -> 256 + 11 = 267; "10" is two digits: 1</w> 272, 0</w> 271
    #   "dogs": d o (127), g s</w> (833), do gs</w> (2743) = 3255
    #   "cats": a t (15), at s</w> (520), c ats</w> (3477) = 3989;  "!" -> !</w> = 256
    #   "café" = c a f Ã ©</w> (é is bytes c3 a9, both printable latin-1, so their own symbols):
    #       a f (190), c af (2959), Ã ©</w> (3654), caf Ã©</w> (14792) = 15304
    ranks = {19: ("t", "o</w>"), 94: ("h", "o"), 304: ("p", "ho"), 613: ("pho", "to</w>"),
             27: ("o", "f</w>"), 24: ("a", "t</w>"), 1856: ("c", "at</w>"), 3579: ("z", "u"),
             2743: ("do", "gs</w>"), 3477: ("c", "ats</w>"), 3654: ("Ã", "©</w>"), 14792: ("caf", "Ã©</w>")}
    for r, pair in ranks.items():
        assert clip_tok.merges[r] == pair
    assert clip_tok.encode("A photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert clip_tok.encode("bozuman") == [647, 4091, 786]
    assert clip_tok.encode("2 dogs, 10 cats!") == [273, 3255, 267, 272, 271, 3989, 256]
    assert clip_tok.encode("Café") == [15304]
    assert clip_tok(["a photo of a cat."])[0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0]


def test_byte_ids_follow_clips_byte_map():
    # CLIP's order: printable bytes first, '!'..'~' ids 0-93, 0xa1..0xac 94-105, 0xae..0xff
    # 106-187; then the other 68 in byte order: 0x00..0x20 ids 188-220, 0x7f..0xa0 221-254, 0xad 255.
    tok = Tokenizer([])
    # bytes 00-20 never reach BPE through encode (cleaning drops controls, splits at white space)
    assert tok._bpe("\x00") == [256 + 188]
    # U+0081 (a C1 control ftfy keeps) = bytes c2 81 -> 106 + 0x14 = 126, then 221 + 2 with </w>
    assert tok.encode("\x81 a") == [126, 256 + 223, 256 + 64]
    # cat emoji = bytes f0 9f 90 b1 -> 106 + 0x42, 221 + 0x20, 221 + 0x11, 256 + 106 + 3
    assert tok.encode("\U0001f431") == [172, 253, 238, 365]
    assert tok.encode("\xad") == [126, 256 + 255]  # soft hyphen = bytes c2 ad


def test_call_shape_padding_and_specials():
    tok = Tokenizer([])  # bytes only: "ab" -> a, b</w> = 64, 256 + 65
    x = tok(["ab", ""], context_length=6)
    assert x.dtype == torch.long and x.shape == (2, 6)
    assert x.tolist() == [[512, 64, 321, 513, 0, 0], [512, 513, 0, 0, 0, 0]]
    assert x.argmax(dim=-1).tolist() == [3, 1]  # the EOT position, as the text model finds it
    assert tok("ab").shape == (1, 77)
    assert tok([]).shape == (0, 77)
    # special tokens in the text map to their ids (as CLIP); decode drops them
    assert tok.encode("<|endoftext|>ab") == [513, 64, 321]
    assert tok.decode([512, 64, 321, 513]) == "ab "
    assert tok.decode(torch.tensor([64, 321])) == "ab "
    with pytest.raises(ValueError, match="decode"):
        tok.decode([64, -1])


def test_truncation_keeps_eot(toy_tok):
    text = "a small red circle on green grass " * 5
    ids = toy_tok.encode(text)
    assert len(ids) > 10
    x = toy_tok([text, "a"], context_length=8)
    assert x[0].tolist() == [toy_tok.sot_id, *ids[:6], toy_tok.eot_id]
    assert x[1, 2].item() == toy_tok.eot_id
    with pytest.raises(ValueError, match="context_length=1"):
        toy_tok(["a"], context_length=1)


def test_state_dict_round_trip(toy_tok):
    buf = io.BytesIO()
    torch.save({"tokenizer": toy_tok.state_dict()}, buf)
    buf.seek(0)
    tok = Tokenizer.from_state_dict(torch.load(buf, weights_only=True)["tokenizer"])
    assert tok.merges == toy_tok.merges and tok.vocab_size == toy_tok.vocab_size
    for text in ("a red star on green grass", "unseen words: zebra 42"):
        assert tok.encode(text) == toy_tok.encode(text)
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_state_dict({"vocab": []})


def test_empty_text(toy_tok):
    assert toy_tok.encode("") == [] and toy_tok.encode(" \n\t ") == []
    assert toy_tok.decode([]) == ""


def test_bad_merges_and_files(tmp_path):
    with pytest.raises(ValueError, match="merge 1"):
        Tokenizer([("a", "b"), ("ab", "zzz")])  # "zzz" is no symbol yet
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        Tokenizer.from_clip(str(missing))
    plain = tmp_path / "plain.txt"
    plain.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="plain.txt"):
        Tokenizer.from_clip(str(plain))
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="short.txt.gz"):
        Tokenizer.from_clip(str(short))
