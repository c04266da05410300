"""Tags: the rule-based caption tag parser TagAlign's authors never released, the tag
vocabulary (optionally synonym-aware), the `tags` command's reading and writing, and ShardTags,
which joins training samples to their tags.

    parse_caption("A man in a red shirt riding a bike.")  # (['man', 'shirt', 'bike'], ['red'])
    parse_pairs("a red shirt")  # (['shirt'], ['red'], [('red', 'shirt')]): for pair tags "red shirt"
    python tagalign.py tags --captions 'cc12m/{00000..01242}.tar' --out tags/ [--pairs]
"""
import functools
import json
import multiprocessing
import os
import re
import time
from array import array
from collections import Counter, deque
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import data


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
# Every word maps by one dict lookup to a precomputed Entry (word class, lemma, noun kind, the
# attribute it gives, flags); the parser walks the entries once. A noun phrase is a run of adjectives and
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
class Entry(NamedTuple):
    """What the parser knows of a word (or a multi-word name)."""
    pos: int                # word class: _N, _A, ... below
    lemma: str              # the name it stands for (a noun's singular)
    kind: int               # a noun's kind: _OBJ, _ABS, ... below (0 for other words)
    attribute: str | None   # the attribute it gives inside a noun phrase, or None
    flags: int              # _PL, _ANIM, ... below


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
    (an Entry: word class, lemma, noun kind, the attribute it gives or None, flags)."""
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
        table[f] = Entry(_X, f, 0, None, _VERB) if fl & (_VB_BASE | _VB_S) else Entry(_G, f, 0, None, 0)
    for w in _word_list("other_adjectives.txt"):
        table[w] = Entry(_J, w, 0, None, 0)

    # Nouns, in rising precedence. Plurals are written first and singulars after, so a listed
    # word ("woods", "glasses") wins over another word's plural.
    nouns = []  # (word, plural or None, kind, the attribute it gives or None, flags)

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
            table[p] = Entry(_N, w, kind, None, fl | _PL)
    for w, p, kind, attr, fl in nouns:
        table[w] = Entry(_N, w, kind, attr, fl | (_PL if p == w and p is not None else 0))
    for w in _word_list("attributes.txt"):
        table[w] = Entry(_A, w, 0, w, 0)
    for w in _word_list("attributes_size.txt"):  # dropped on a quantity frame (_close)
        table[w] = Entry(_A, w, 0, w, _SIZE)
    # Materials and colour nouns: an attribute as a modifier, an object as a head.
    for w in _word_list("material_nouns.txt") + _word_list("dual_nouns.txt"):
        fl = table[w].flags if w in table and table[w].pos == _N else 0
        table[w] = Entry(_N, w, _OBJ, w, fl & _ANIM)
        p = _plural(w)
        if p not in table or table[p].pos != _N:
            table[p] = Entry(_N, w, _OBJ, None, _PL)
    # A noun that is also a verb form remembers it; the parser decides by context.
    for f, fl in verb.items():
        e = table[f]
        if e.pos == _N:
            table[f] = e._replace(flags=e.flags | fl)

    # Closed classes last: they win over everything.
    for w in _word_list("determiners.txt"):
        table[w] = Entry(_D, w, 0, None, 0)
    for w in _word_list("prepositions.txt"):
        table[w] = Entry(_P, w, 0, None, 0)
    for w in _word_list("other_words.txt"):
        table[w] = Entry(_X, w, 0, None, 0)
    for w in _word_list("subject_words.txt"):
        table[w] = Entry(_P if w == "to" else _X, w, 0, None, _SUBJ)
    for w in _word_list("negators.txt"):
        table[w] = Entry(_NEG, w, 0, None, 0)
    for w in ("and", "but", "&", "/", "+"):
        table[w] = Entry(_C, w, 0, None, 0)
    for w in ("or", "nor", ","):
        table[w] = Entry(_C, w, 0, None, _OR)
    for w in ". ; : ! ? ( ) [ ] { } | \" \u201c \u201d".split():
        table[w] = Entry(_END, w, 0, None, 0)
    table["no one"] = Entry(_X, "no one", 0, None, 0)
    table["each other"] = Entry(_X, "each other", 0, None, 0)
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
_SKIP_ENTRY = Entry(_SKIP, "", 0, None, 0)
_NUMBER_ENTRY = Entry(_D, "#", 0, None, 0)
_ADVERB_ENTRY = Entry(_X, "", 0, None, 0)
_ADJECTIVE_ENTRY = Entry(_J, "", 0, None, 0)
_PARTICIPLE_ENTRY = Entry(_G, "", 0, None, 0)
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
            e = b._replace(flags=b.flags | _POSS) if b.pos == _N and suffix == "s" else b
    elif any(ch.isdigit() for ch in w):
        e = _NUMBER_ENTRY
    elif "-" in w:
        parts = w.split("-")
        e = _TABLE.get(" ".join(parts))  # "hot-dog" -> "hot dog"
        if e is None:
            last = parts[-1]
            if last == "shaped":
                e = Entry(_A, w, 0, w, 0)
            elif last in ("colored", "coloured", "color", "colour"):
                e = _TABLE.get(parts[0]) or _ADJECTIVE_ENTRY
                if e.pos != _A:
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
            e = Entry(_N, b.lemma, b.kind, None, b.flags | _PL) if b.pos == _N else b
        else:  # an unknown plural noun, or the -s form of an unknown verb after its subject
            e = Entry(_N, s, _OBJ, None, _PL | _VB_S | _GUESS)
    else:
        e = Entry(_N, w, _OBJ, None, _VB_BASE | _GUESS)  # an unknown noun (or a base verb)
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
def _close(phrase, neg, of_next, objects, attributes, pairs):
    """Emit a closed noun phrase: its head to objects, its attributes to attributes, unless a
    negator waits for it (then it is dropped). Returns whether it was negated.
    phrase: entries, the head last (a phrase without a noun has only attributes);
    of_next: the phrase is followed by "of" ("group of", "photo of");
    pairs: None, or a list that gets each (attribute, object) of the phrase."""
    if neg:
        return True
    head = phrase[-1]
    mods = phrase
    if head.pos == _N:
        mods = phrase[:-1]
        kind = head.kind
        if kind == _MED_OBJ:
            kind = _MED if of_next else _OBJ
        elif kind == _QTY_OBJ:
            kind = _QTY if of_next else _OBJ
        obj = None
        if kind == _OBJ:
            # "glasses of wine" are drinking glasses, not spectacles
            obj = "glass" if of_next and head.lemma == "glasses" else head.lemma
        elif kind == _MED or kind == _WEAK:
            # "cartoon cat illustration" -> cat; "a heart shape" -> heart
            if mods and mods[-1].pos == _N and mods[-1].kind == _OBJ:
                obj = mods[-1].lemma
                mods = mods[:-1]
            elif kind == _WEAK:
                obj = head.lemma
        elif kind == _POS:
            return False  # "the left side of": no object, no attributes
        elif kind == _QTY:  # "a large group of": its size is not the members'; colours are
            mods = [m for m in mods if not m.flags & _SIZE]
        if obj is not None:
            if obj not in objects:
                objects.append(obj)
            if pairs is not None:  # the binding the separate tags lose: "red circle", "blue ring"
                for m in mods:
                    if m.attribute is not None and (m.attribute, obj) not in pairs:
                        pairs.append((m.attribute, obj))
    for m in mods:
        a = m.attribute
        if a is not None and a not in attributes:
            attributes.append(a)
    return False


def _parse(text, pairs):
    """parse_caption's work; pairs: None, or a list that gets the (attribute, object) pairs."""
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
        cls = e.pos
        if cls == _N:
            fl = e.flags
            # A noun that is also a verb form, right after a subject, is the verb: "a man skis
            # down", "he skis", "to ski", "stands and watches", "the food looks good". After a
            # noun, agreement decides; after a thing, a concrete noun stays a noun ("tea
            # leaves", "city lights").
            if not (fl & _VB_ANY and subj and (
                    subj & _SUBJ or (subj & _ANIM or e.kind != _OBJ) and (
                        fl & _VB_S and not subj & _PL or fl & _VB_BASE and subj & _PL
                        or fl & _VB_PART))):
                phrase.append(e)
                subj = fl & _PL_ANIM | _NOUN
                vchain = False
                if fl & _POSS:  # "the boy's bicycle": the possessor is a phrase of its own
                    neg_or = _close(phrase, neg, False, objects, attributes, pairs)
                    neg, phrase, subj = False, [], 0
                continue
            if phrase:  # the verb ends the phrase
                neg_or = _close(phrase, neg, False, objects, attributes, pairs)
                neg, phrase = False, []
            subj, vchain = 0, True
        elif cls >= _D:  # determiners, prepositions, other words, negators, the end
            if phrase:
                neg_or = _close(phrase, neg, e is _OF, objects, attributes, pairs)
                neg, phrase = False, []
            if cls == _D:
                subj, vchain = 0, False
            elif cls == _P:
                subj = e.flags  # _SUBJ for "to"
            elif cls == _X:
                subj = e.flags & _SUBJ
                if e.flags & _VERB:
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
            if phrase and phrase[-1].attribute is None and phrase[-1].pos == _N:
                if phrase[-1].flags & _GUESS:
                    phrase.pop()
                else:
                    neg_or = _close(phrase, neg, False, objects, attributes, pairs)
                    neg, phrase = False, []
            if cls == _A:
                phrase.append(e)
            subj = 0
        elif cls == _G:  # a participle ends a phrase that has its head, else it is skipped
            if phrase and phrase[-1].pos == _N:
                neg_or = _close(phrase, neg, False, objects, attributes, pairs)
                neg, phrase = False, []
            subj, vchain = 0, True
        elif cls == _C:
            # "black and white cat", "stone and brick wall": adjectives joined inside a phrase.
            nxt = ents[i + 1]
            if phrase and not (phrase[-1].attribute is not None and nxt.attribute is not None
                               and (nxt.pos == _A or nxt.pos == _N and not nxt.flags & _PL)):
                neg_or = _close(phrase, neg, False, objects, attributes, pairs)
                neg, phrase = False, []
            # "no cars or people", "no cats, dogs or birds"; not "no people, a man ..."
            if e.flags & _OR and neg_or and (e.lemma != "," or nxt.pos != _D):
                neg = True
            subj = _SUBJ if vchain else 0
    return objects, attributes


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
    return _parse(text, None)


def parse_pairs(text):
    """parse_caption's objects and attributes, and which attribute modifies which object:
    (objects, attributes, pairs), pairs a de-duplicated list of (attribute, object) in order of
    appearance, one for each attribute in an object's noun phrase. A phrase without an object
    ("a large group of", "black and white") pairs nothing, and a negated one is dropped whole.

    >>> parse_pairs("two big red circles and no blue ring next to a black cat")
    (['circle', 'cat'], ['big', 'red', 'black'], [('big', 'circle'), ('red', 'circle'), ('black', 'cat')])
    """
    pairs = []
    objects, attributes = _parse(text, pairs)
    return objects, attributes, pairs


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


def _caption_tags(text, synonyms=None, pairs=False):
    """Tags of one caption as counted and encoded: its objects, then its attributes that are
    not also objects ("an orange cat next to an orange" counts "orange" once); with synonyms
    (read_synonyms), each name replaced by its group's, counted once; and the pair tags
    "attribute object" (parse_pairs; pairs=False: none, and the cheaper parse_caption), both
    names through the synonym map ("red disk" -> "red circle"). Returns (objects, attributes,
    pairs)."""
    if pairs:
        objects, attributes, bound = parse_pairs(text)
    else:  # the parser's hot path (every caption of a corpus): nothing more than the words
        (objects, attributes), bound = parse_caption(text), ()
    if synonyms:
        objects = list(dict.fromkeys(synonyms.get(t, t) for t in objects))
        attributes = list(dict.fromkeys(synonyms.get(t, t) for t in attributes))
    attributes = [a for a in attributes if a not in objects]
    if not bound:
        return objects, attributes, bound
    if synonyms:
        bound = [(synonyms.get(a, a), synonyms.get(o, o)) for a, o in bound]
    names = dict.fromkeys(f"{a} {o}" for a, o in bound)
    return objects, attributes, [p for p in names if p not in objects]  # one tag per name


KINDS = ("object", "attribute", "pair")


class TagVocab:
    """The K tags of TagAlign's classification loss: objects first, then attributes, then (if
    built with pairs) the pair tags "attribute object", one index space. A name is one tag even
    if captions use it both ways ("orange").

    tags: list[str]; kinds: "object", "attribute" or "pair" per tag; counts: number of captions
    of the building corpus that mention the tag; index: name -> position; meta: what built it,
    with meta["synonyms"] the synonym map applied to parsed names (read_synonyms), if any;
    pairs: whether any tag is a pair (then encode parses the bindings too)."""

    def __init__(self, tags, kinds, counts, meta=None):
        if not len(tags) == len(kinds) == len(counts):
            raise ValueError(f"TagVocab: {len(tags)} tags, {len(kinds)} kinds, {len(counts)} counts")
        if any(k not in KINDS for k in kinds):
            raise ValueError("TagVocab: kinds must be 'object', 'attribute' or 'pair'")
        self.tags, self.kinds, self.counts = list(tags), list(kinds), [int(c) for c in counts]
        self.index = {t: i for i, t in enumerate(self.tags)}
        if len(self.index) != len(self.tags):
            raise ValueError("TagVocab: duplicate tag names")
        self.meta = dict(meta or {})
        self.synonyms = self.meta.get("synonyms") or {}
        self.pairs = "pair" in self.kinds

    @classmethod
    def from_tags(cls, tags, synonyms=None, kinds=None):
        """A vocabulary from tag names alone (e.g. a checkpoint's), with their kinds if given;
        else a name the parser reads as an attribute adjective is an attribute, anything else
        an object; counts are 0."""
        if kinds is None:
            kinds = ["attribute" if t in _TABLE and _TABLE[t].pos == _A else "object" for t in tags]
        return cls(tags, kinds, [0] * len(tags), {"synonyms": synonyms} if synonyms else None)

    def __len__(self):
        return len(self.tags)

    def __repr__(self):
        n_obj, n_pair = self.kinds.count("object"), self.kinds.count("pair")
        pairs = f" + {n_pair} pairs" if self.pairs else ""
        return f"TagVocab({n_obj} objects + {len(self) - n_obj - n_pair} attributes{pairs})"

    def encode(self, caption):
        """Indices of the caption's tags that are in the vocabulary, objects first, pairs last.
        >>> TagVocab(["cat", "black"], ["object", "attribute"], [1, 1]).encode("A black cat.")
        [0, 1]
        >>> TagVocab(["cat", "black", "black cat"], ["object", "attribute", "pair"], [1, 1, 1]).encode(
        ...     "A black cat.")
        [0, 1, 2]
        """
        objects, attributes, bound = _caption_tags(caption, self.synonyms, self.pairs)
        if bound:
            attributes += bound  # a pair is never an object's name (_caption_tags)
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
        """Write vocab.json atomically (data.write_atomic)."""
        doc = {"format": "tagalign-tags/1", "tags": self.tags, "kinds": self.kinds,
                "counts": self.counts, **self.meta}
        with data.write_atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"tag vocabulary not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a tag vocabulary (bad JSON: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != "tagalign-tags/1":
            raise ValueError(f"{path}: not a tag vocabulary written by `tagalign.py tags`")
        meta = {k: v for k, v in doc.items() if k not in ("format", "tags", "kinds", "counts")}
        try:
            return cls(doc["tags"], doc["kinds"], doc["counts"], meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: broken tag vocabulary ({e})") from None


def _check_vocab_args(top_objects, top_attributes, min_count, top_pairs=0, min_pair_count=1):
    for flag, v, low in (("--top-objects", top_objects, 0), ("--top-attributes", top_attributes, 0),
                         ("--min-count", min_count, 1), ("--top-pairs", top_pairs, 0),
                         ("--min-pair-count", min_pair_count, 1)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {v!r}")


def _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count, meta=None,
                 pair_counts=None, top_pairs=1000, min_pair_count=5):
    """The most frequent objects and attributes (ties by name, so the result is deterministic);
    an attribute whose name is already an object tag is not added twice. pair_counts: also the
    most frequent pairs, under their own cap and threshold (a pair is rarer than its words)."""
    def top(counts, k, taken, low=min_count):
        ranked = sorted((-c, t) for t, c in counts.items() if c >= low and t not in taken)
        return [t for _, t in ranked[:k]]

    objects = top(object_counts, top_objects, ())
    attributes = top(attribute_counts, top_attributes, set(objects))
    pairs = [] if pair_counts is None else top(pair_counts, top_pairs, set(objects + attributes), min_pair_count)
    tags = objects + attributes + pairs
    counts = [object_counts.get(t, 0) + attribute_counts.get(t, 0) for t in objects + attributes]
    counts += [pair_counts[t] for t in pairs]
    kinds = ["object"] * len(objects) + ["attribute"] * len(attributes) + ["pair"] * len(pairs)
    params = {"top_objects": top_objects, "top_attributes": top_attributes, "min_count": min_count}
    if pair_counts is not None:
        params.update(top_pairs=top_pairs, min_pair_count=min_pair_count)
    return TagVocab(tags, kinds, counts, {"params": params, **(meta or {})})


def build_vocab(captions, top_objects=9000, top_attributes=1000, min_count=5, synonyms=None,
                pairs=False, top_pairs=1000, min_pair_count=5):
    """Count the tags of an iterable of captions and keep the most frequent ones.

    The paper keeps the top 10,000 tags. Attributes are a closed class (the parser knows a few
    hundred), so 1,000 slots hold all that occur and the other 9,000 go to objects; a tag seen
    in fewer than min_count captions is too rare to learn and is often a typo. synonyms: a
    read_synonyms map; each group then counts as one tag, named by its first name. pairs: also
    the top_pairs most frequent pair tags "attribute object" seen in min_pair_count captions
    (not in the paper: the binding that separate tags lose, "red circle" vs "blue circle")."""
    _check_vocab_args(top_objects, top_attributes, min_count, top_pairs, min_pair_count)
    object_counts, attribute_counts, pair_counts = Counter(), Counter(), Counter() if pairs else None
    for c in captions:
        objects, attributes, bound = _caption_tags(c, synonyms, pairs)
        if pairs:
            pair_counts.update(bound)
        object_counts.update(objects)
        attribute_counts.update(attributes)
    return _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count,
                        {"synonyms": synonyms} if synonyms else None, pair_counts, top_pairs, min_pair_count)


def _tag_chunk(captions, synonyms=None, pairs=False):
    """Worker: tags of a chunk of captions (None = malformed). Returns the chunk's distinct
    (kind, name) keys, kind 0 object / 1 attribute / 2 pair, and per caption the key numbers
    (int32 bytes) and their count (int32 bytes): small to send back to the main process."""
    local, ids, lens = {}, array("i"), array("i")
    for c in captions:
        if c is None:
            lens.append(0)
            continue
        objects, attributes, bound = _caption_tags(c, synonyms, pairs)
        for t in objects:
            ids.append(local.setdefault((0, t), len(local)))
        for t in attributes:
            ids.append(local.setdefault((1, t), len(local)))
        for t in bound:
            ids.append(local.setdefault((2, t), len(local)))
        lens.append(len(objects) + len(attributes) + len(bound))
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
              chunk_size=2048, progress=True, synonyms=None, pairs=False, top_pairs=1000, min_pair_count=5):
    """The `tags` command: parse every caption of the files, build the vocabulary, and write

        out_dir/vocab.json        TagVocab.save: tags, kinds, counts, params, the input files
                                  (path, name, bytes, first_row, samples, malformed)
        out_dir/tag_offsets.npy   int64 (N+1,): sample i has tags ids[offsets[i]:offsets[i+1]]
        out_dir/tag_ids.npy       uint16 (int32 if K > 65535) tag indices, objects first,
                                  pairs last (vocab.json's kinds say which tags are pairs)
        out_dir/tag_keys.npy      bytes (N,): sample i's key (see iter_captions)

    with one row per input sample in input order (files in the given order; a malformed
    sample gets an empty row and is counted). Streams: the captions are read once, parsed on
    `workers` processes (None: all cores) in chunks, and their provisional tag numbers spill
    to a temporary file; memory holds one number per distinct tag, not the parses.
    synonyms: a read_synonyms map applied to every parsed name (a synonym-aware vocabulary).
    pairs, top_pairs, min_pair_count: also pair tags "attribute object", as in build_vocab.
    Returns a dict of stats (see format_tag_stats)."""
    _check_vocab_args(top_objects, top_attributes, min_count, top_pairs, min_pair_count)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
    if not paths:
        raise ValueError("--captions: no caption files given")
    for p in paths:
        fmt = data.caption_format(p)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"caption file not found: {p}")
        if fmt == "tsv":
            with open(p, "rb") as f:
                data.tsv_caption_column(p, f.readline())
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
            for key, cap, why in data.iter_captions(rec["path"]):
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
            tag_chunk = functools.partial(_tag_chunk, synonyms=synonyms, pairs=pairs)  # picklable for the workers
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
    pair_counts = {name: int(counts[i]) for (kind, name), i in keys.items() if kind == 2} if pairs else None
    corpus = {"samples": n, "malformed": sum(rec["malformed"] for rec in files), "files": files}
    vocab = _select_tags(object_counts, attribute_counts, top_objects, top_attributes, min_count,
                         {"corpus": corpus, **({"synonyms": synonyms} if synonyms else {})},
                         pair_counts, top_pairs, min_pair_count)
    final = np.full(max(len(keys), 1), -1, np.int64)
    for (kind, name), i in keys.items():
        final[i] = vocab.index.get(name, -1)
    nnz = int(counts[:len(keys)][final[:len(keys)] >= 0].sum())

    # Pass 2 (over the temporary files only): keep the vocabulary's tags, write the CSR arrays
    # and the sample keys; the three files replace earlier ones together, at the end.
    id_dtype = np.uint16 if len(vocab) <= 65535 else np.int32
    paths = [os.path.join(out_dir, name) for name in ("tag_offsets.npy", "tag_ids.npy", "tag_keys.npy")]
    with data.write_atomic(paths[0]) as tmp_offsets, data.write_atomic(paths[1]) as tmp_tag_ids, \
            data.write_atomic(paths[2]) as tmp_tag_keys:
        offsets = np.lib.format.open_memmap(tmp_offsets, "w+", np.int64, (n + 1,))
        tag_ids = np.lib.format.open_memmap(tmp_tag_ids, "w+", id_dtype, (nnz,))
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
        keys = np.lib.format.open_memmap(tmp_tag_keys, "w+", f"S{longest_key}", (n,))
        with open(tmp_keys, "rb") as f_keys:
            for i, line in enumerate(f_keys):
                keys[i] = line.rstrip(b"\n")
        keys.flush()
        del keys
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
        "pairs": vocab.kinds.count("pair"), "distinct_pairs": len(pair_counts) if pairs else None,
        "seconds": seconds, "captions_per_s": n / seconds if seconds > 0 else 0.0,
        "workers": workers, "files": files, "vocab": vocab_path,
        "offsets": paths[0], "ids": paths[1], "keys": paths[2],
    }


def format_tag_stats(stats):
    """The `tags` command's report, a few lines."""
    with_pairs = stats.get("distinct_pairs") is not None
    pairs, seen = (f" + {stats['pairs']:,} pairs", f", {stats['distinct_pairs']:,} distinct pairs") if with_pairs else ("", "")
    lines = [
        f"tagged {stats['samples']:,} samples in {stats['seconds']:.1f}s "
        f"({stats['captions_per_s']:,.0f} captions/s, {stats['workers']} workers); "
        f"{stats['tagged']:,} have at least one tag",
        f"vocabulary: {stats['tags']:,} tags = {stats['objects']:,} objects + "
        f"{stats['attributes']:,} attributes{pairs} (of {stats['distinct_objects']:,} distinct objects, "
        f"{stats['distinct_attributes']:,} distinct attributes{seen} seen)",
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
        """(B,) tag rows -> (B, K) bool multi-hot targets, in one scatter over the batch's
        concatenated tag ids (no loop over the rows: a DataLoader worker builds them per batch).

        Row b's ids are ids[offsets[r_b]:offsets[r_b + 1]], n_b of them; laid end to end, the
        k-th of them sits at ids position offsets[r_b] + (k - the ids of rows before b)."""
        rows = np.asarray(rows, dtype=np.int64)  # (B,)
        start = self.offsets[rows]  # (B,)
        n = self.offsets[rows + 1] - start  # (B,)
        before = np.cumsum(n) - n  # (B,) ids of the rows before b
        at = np.repeat(start - before, n) + np.arange(n.sum())  # (nnz,) positions in ids
        t = torch.zeros(len(rows), len(self.vocab), dtype=torch.bool)
        t[torch.from_numpy(np.repeat(np.arange(len(rows)), n)), torch.from_numpy(self.ids[at].astype(np.int64))] = True
        return t
