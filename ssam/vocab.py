"""Vocabularies: bundled class lists with synonyms, users' files and lists, one synonym file format.

Bundled: ``lvis`` (LVIS v1, 1,203 categories with their 1,825 synonyms and definitions),
``coco``, ``objects365``, ``ade20k``. The synonym file format, shared by vocabularies and synonym
maps (docs/CANDIDATES.md)::

    # a comment
    television: tv, telly, television set     canonical name, then the words that mean it
    person: man, woman, child
    bicycle                                    a category with no synonyms
    -: corn dog, sea lion                      "-": these words name no category

Names are lower-cased and ``_`` read as a space; a ``(qualifier)`` disambiguates a name
(``bow (weapon)``), and the label written is the name without it. In a vocabulary file, line n
(not counting comments and blank lines) is category id n.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

BUNDLED_VOCABS = {
    "lvis": "lvis_v1_synonyms.txt",
    "coco": "coco.txt",
    "objects365": "objects365_v2.txt",
    "ade20k": "ade20k_instance.txt",
}
NO_CATEGORY = "-"
_DEFINITIONS = {"lvis": "lvis_v1_definitions.txt"}
_QUALIFIER = re.compile(r"\s*\([^)]*\)")
_COMMENT = re.compile(r"(^|\s)#.*")


def normalize_name(name: str) -> str:
    """A category name as vocabularies hold it: ``Traffic_Light `` -> ``traffic light``."""
    return re.sub(r"\s+", " ", name.strip().replace("_", " ").lower())


def plain_name(name: str) -> str:
    """The name without its qualifier: ``car (automobile)`` -> ``car``."""
    return _QUALIFIER.sub("", name).strip()


@dataclass(frozen=True)
class Category:
    """One vocabulary entry. ``label`` is what a candidate carries: the name without qualifier."""

    id: int  # 1-based position in its vocabulary (LVIS: the LVIS category id)
    name: str  # normalised, qualifier kept: "car (automobile)"
    synonyms: tuple[str, ...] = ()  # normalised surface names besides ``name``
    definition: str = ""  # LVIS: WordNet gloss; used to tell senses apart
    frequency: str = ""  # LVIS: r / c / f (rare / common / frequent in LVIS train)

    @property
    def label(self) -> str:
        return plain_name(self.name)


def parse_synonym_lines(lines: list[str], source: str = "synonyms") -> list[tuple[str, list[str]]]:
    """``canonical: syn, syn`` lines -> ``[(canonical, [syn, ...])]`` in file order, normalised.

    Raises:
        ValueError: a line with an empty canonical name, naming where it is.
    """
    entries = []
    for n, raw in enumerate(lines, 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        head, _, tail = line.partition(":")
        canonical = normalize_name(head)
        if not canonical:
            raise ValueError(f"{source}:{n}: no canonical name before ':' in {raw.strip()!r}")
        words = [normalize_name(s) for s in tail.split(",")] if tail else []
        entries.append((canonical, [w for w in words if w and w != canonical]))
    return entries


def read_synonyms(spec: str | dict[str, list[str] | str] | None) -> list[tuple[str, list[str]]]:
    """A synonym map from a file in the synonym format, or a mapping ``{canonical: [syn, ...]}``."""
    if not spec:
        return []
    if isinstance(spec, dict):
        lines = [f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in spec.items()]
        return parse_synonym_lines(lines, "config")
    return parse_synonym_lines(Path(spec).read_text(encoding="utf-8").splitlines(), str(spec))


def _bundled_text(file: str) -> str:
    return (resources.files("ssam") / "vocab" / file).read_text(encoding="utf-8")


@cache
def _bundled_categories(name: str) -> tuple[Category, ...]:
    entries = parse_synonym_lines(_bundled_text(BUNDLED_VOCABS[name]).splitlines(), name)
    defs: list[list[str]] = []
    if name in _DEFINITIONS:
        rows = _bundled_text(_DEFINITIONS[name]).splitlines()
        defs = [r.split("\t") for r in rows if r and not r.startswith("#")]
    cats = []
    for i, (canonical, syns) in enumerate(entries):
        freq, _, gloss = defs[i] if i < len(defs) else ("", "", "")
        cats.append(Category(i + 1, canonical, tuple(syns), gloss, freq))
    return tuple(cats)


def load_categories(spec: str | list[str]) -> list[Category]:
    """Categories with ids and synonyms.

    Args:
        spec: a bundled name (``lvis``, ``coco``, ``objects365``, ``ade20k``), a file in the
            synonym format (a plain list of names is one), a comma-separated list
            (``"cat,dog"``), or a Python list of names (each may be a ``name: syn, syn`` line).

    Raises:
        ValueError: the vocabulary is empty or names a category twice. OSError: unreadable file.
    """
    if isinstance(spec, str) and spec in BUNDLED_VOCABS:
        return list(_bundled_categories(spec))
    if isinstance(spec, list):
        lines, source = spec, "list"
    elif "," in spec and not Path(spec).is_file():
        lines, source = spec.split(","), "list"
    else:
        lines, source = Path(spec).read_text(encoding="utf-8").splitlines(), spec
    entries, seen = [], set()
    for canonical, syns in parse_synonym_lines(lines, str(source)):
        if canonical == NO_CATEGORY:
            raise ValueError(f"{source}: '-' lines belong in a synonym map, not a vocabulary")
        if canonical not in seen:  # a repeated plain name is a repeat, not a new category
            seen.add(canonical)
            entries.append((canonical, syns))
    if not entries:
        raise ValueError(f"vocabulary {spec!r} is empty")
    return [Category(i + 1, c, tuple(s)) for i, (c, s) in enumerate(entries)]


def load_vocabulary(spec: str | list[str]) -> list[str]:
    """Class names, lower case, underscores as spaces, deduplicated in order (no synonyms).

    Args:
        spec: as :func:`load_categories`.

    Raises:
        ValueError: the vocabulary is empty. OSError: the file cannot be read.
    """
    return [c.name for c in load_categories(spec)]


def bundled_lexicon(file: str) -> list[tuple[str, list[str]]]:
    """A bundled word list in the synonym format (``lexicon.txt``, ``brands.txt``)."""
    return parse_synonym_lines(_bundled_text(file).splitlines(), file)


# --- matching captions against a vocabulary -------------------------------------------------------

# Nouns that stay plural ("sunglasses" is one object) and lemmas lemminflect gets wrong.
_KEEP_PLURAL = {
    "sunglasses", "eyeglasses", "trousers", "pants", "shorts", "jeans", "scissors", "pliers",
    "tongs", "goggles", "binoculars", "pajamas", "pyjamas", "clothes", "tights", "overalls", "boxers",
    "news", "series", "species", "chips", "crisps", "fries", "brussels",
}  # fmt: skip
_LEMMA_FIX = {"leaves": "leaf", "oxen": "ox", "dice": "die", "mice": "mouse", "hooves": "hoof"}


@cache
def singular(word: str) -> str:
    """Noun lemma (``wheels -> wheel``, ``mice -> mouse``); pluralia tantum stay (``sunglasses``)."""
    if word in _KEEP_PLURAL or len(word) < 3:
        return word
    if word in _LEMMA_FIX:
        return _LEMMA_FIX[word]
    from lemminflect import getLemma

    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


@cache
def _lemminflect_oov() -> tuple[list[tuple[int, str, bool]], dict, dict] | None:
    """How lemminflect lemmatises a word it has no NOUN entry for: its suffix rules (strip so many
    letters, add these, maybe drop the last letter), with its word tables (lemmas, overrides).
    None where that is not known; then every word is lemmatised, as before.

    lemminflect 0.2.3 gives such a word the lemma of one of its rules, its model choosing which
    ("berries" -> "berr" + "y"). This reads its internals, so it holds for that version only, and it
    checks itself on a few words.
    """
    try:
        import lemminflect

        if lemminflect.__version__ != "0.2.3":
            return None
        lemmatizer = lemminflect.Lemmatizer()
        rules = []
        for rule in lemmatizer._getOOVLemmatizer().rules:
            strip, add, undouble = rule.split(",")
            if add != add.lower() or undouble not in ("True", "False"):
                return None
            rules.append((len(strip), add, undouble == "True"))
        lemmas, overrides = lemmatizer._getLemmaDict(), lemmatizer._getOverridesDict()
        for word in ("woodentables", "glassberries", "foxxes", "cupcakes"):
            known = "NOUN" in lemmas.get(word, ()) or "NOUN" in overrides.get(word, ())
            if not known and singular(word) not in _rule_lemmas(word, rules):
                return None
        return rules, lemmas, overrides
    except Exception:  # any surprise just turns the shortcut off
        return None


def _rule_lemmas(word: str, rules: list[tuple[int, str, bool]]) -> set[str]:
    """The lemmas lemminflect's suffix rules can give ``word`` (as its ``_applyRule``)."""
    lemmas = set()
    for strip, add, undouble in rules:
        lemma = (word[:-strip] if strip else word) + add
        lemmas.add(lemma[:-1] if undouble else lemma)
    return lemmas


class _SingularGuard:
    """Tells, without lemmatising a word (slow: a small neural net), when its :func:`singular` cannot
    be one of ``keys``: a lower-case ASCII word that lemminflect has no entry for gets one of the
    lemmas of its suffix rules, so it is enough that none of those is a key. The rules are turned
    around once: per strip length, the stems whose rule lemma is a key."""

    def __init__(self, keys: set[str]):
        self.keys = keys
        oov = _lemminflect_oov()
        self.on = oov is not None
        by_strip: dict[int, tuple[set[str], list[bool]]] = {}
        for strip, add, undouble in oov[0] if oov else ():
            stems, drops = by_strip.setdefault(strip, (set(), [False]))
            if undouble and not add:
                drops[0] = True  # the lemma is the stem less its last letter
            else:  # the lemma is the stem + tail
                tail = add[:-1] if undouble else add
                stems.update(key[: len(key) - len(tail)] for key in keys if key.endswith(tail))
        self.by_strip = [(strip, frozenset(stems), drops[0]) for strip, (stems, drops) in by_strip.items()]

    def may_be_key(self, word: str) -> bool:
        """False only when ``singular(word)`` is sure not to be one of the keys."""
        if word in self.keys or word in _KEEP_PLURAL or word in _LEMMA_FIX or len(word) < 3:
            return True
        if not self.on or not (word.isascii() and word.islower()):
            return True
        _, lemmas, overrides = _lemminflect_oov()
        if "NOUN" in lemmas.get(word, ()) or "NOUN" in overrides.get(word, ()):
            return True  # lemminflect knows the word: its lemma may be anything ("mice" -> "mouse")
        for strip, stems, drops in self.by_strip:
            stem = word[:-strip] if strip else word
            if stem in stems or (drops and stem[:-1] in self.keys):
                return True
        return False


def _glued_heads(keys: set[str], guard: _SingularGuard) -> tuple[int, frozenset[str] | None]:
    """What an ASCII word glued of caption words ("hotdog") starts with when it has an index entry
    (:meth:`CaptionMatcher._compound`): ``(cut, heads)``, the word less its last ``cut`` letters is one
    of ``heads``. ``heads`` is None where that is not known (the guard is off): then any word may.

    Such a word is a key, or its :func:`singular` is: the word is one of ``_KEEP_PLURAL`` or
    ``_LEMMA_FIX``, a word lemminflect knows (its tables give the lemma), or a new word, whose lemma is
    one of its suffix rules' (``guard.by_strip``: a stem, or a key and one letter where the rule drops
    the last letter, then ``strip`` letters). Built once per matcher from the keys, not per word.
    """
    rules = guard.by_strip
    cut = max((strip + drops for strip, _, drops in rules), default=0)
    if not guard.on or cut > 4:  # a glued word has 4 letters or more: cut within it
        return 0, None
    _, lemmas, overrides = _lemminflect_oov()
    words = keys | _KEEP_PLURAL | _LEMMA_FIX.keys()
    for table in (lemmas, overrides):
        words.update(w for w, pos in table.items() if not keys.isdisjoint(pos.get("NOUN", ())))
    heads = {w[: max(0, len(w) - cut)] for w in words}
    for strip, stems, drops in rules:
        heads.update(stem[: max(0, len(stem) - (cut - strip))] for stem in stems)
        if drops:  # the stem is a key and one more letter
            heads.update(key[: max(0, len(key) - (cut - strip - 1))] for key in keys)
    return cut, frozenset(heads)


# One caption word, as the pattern below finds it: letters with inner apostrophes ("rock'n'roll") and a
# possessive ending ("dog's", "dogs'"). Anything else is a digit run or a single character.
_ALPHA = r"[A-Za-z]+(?:'[A-Za-z]+)*'?"
_WORD = re.compile(rf"{_ALPHA}|\d+|\S")
_ALPHA_SPLIT = re.compile(f"({_ALPHA})")  # split() -> [gap, word, gap, word, ..., gap]
_FUNCTION_WORDS = {
    "a", "an", "the", "of", "and", "or", "with", "without", "on", "in", "at", "to", "for", "from", "by",
    "is", "are", "was", "be", "it", "its", "his", "her", "their", "this", "that", "as", "into", "onto",
    "over", "under", "near", "next", "some", "two", "three", "new", "set", "made", "like", "while",
}  # fmt: skip
# A vocabulary word followed by one of these is a modifier ("dog print", "cat food", "wheelchair ramp").
HEAD_NOUNS = {
    "print", "prints", "pattern", "patterned", "shaped", "shape", "costume", "food", "treat", "treats",
    "flavor", "flavour", "flavored", "flavoured", "scented", "themed", "motif", "logo", "lover", "lovers",
    "mom", "dad", "owner", "charm", "sticker", "decal", "ramp", "stand", "holder", "rack", "hook", "case",
    "pendant", "blossom", "blossoms", "silhouette", "emoji", "icon", "brand", "market", "shop", "store",
}  # fmt: skip
# Words that name a colour as well as a thing; "lime green", "peach and cream", "in orange" are colours.
_COLOUR_THINGS = {
    "orange", "lime", "peach", "cherry", "lemon", "salmon", "olive", "plum", "apricot", "mint", "chocolate",
    "coral", "cream", "wine", "rose", "lavender", "mustard", "avocado", "banana",
}  # fmt: skip
_COLOURS = _COLOUR_THINGS | {
    "black", "white", "red", "green", "blue", "yellow", "pink", "purple", "brown", "grey", "gray", "beige",
    "navy", "gold", "golden", "silver", "turquoise", "teal", "maroon", "burgundy", "ivory", "tan", "khaki",
    "colored", "coloured", "color", "colour", "multicolor", "dark", "light", "bright", "pastel",
}  # fmt: skip
# Materials: "leather ankle boots", "glass vase", "denim jacket" name no leather, glass, or jeans.
_MATERIALS = {
    "leather", "denim", "fleece", "flannel", "tartan", "plaid", "bamboo", "glass", "cork", "straw",
    "wicker", "tinfoil", "lace", "velvet", "rubber",
}  # fmt: skip
_LIST_WORDS = {"set", "sets", "kit", "combo", "bundle", "collection", "pack", "lot"}
_QUANTITY = {"couple", "pair", "bunch", "lot"}
_FREQ_RANK = {"f": 3, "c": 2, "r": 1}


@dataclass(slots=True)
class _Token:
    text: str
    low: str
    form: str
    brk: bool  # punctuation (not a joining hyphen) between this word and the previous one
    possessive: bool
    camel: bool  # BlackBerry, iPhone: a name, never a plain vocabulary word
    span: tuple[int, int]  # character offsets in the caption


def tokenize(caption: str) -> list[_Token]:
    """Words of a caption with the breaks between them; ``'s`` and ``s'`` become a flag.

    The reference tokeniser (vocabulary surfaces, definitions); :class:`CaptionMatcher` reads captions
    with :func:`_split_caption`, which splits them the same way.
    """
    tokens = []
    for m, brk in _word_matches(caption):
        word, low, form, possessive, camel = _word_info(m.group())
        tokens.append(_Token(word, low, form, brk, possessive, camel, (m.start(), m.start() + len(word))))
    return tokens


def _word_matches(caption: str):
    """Each word's match in a caption and whether a break (punctuation other than a joining hyphen,
    or the caption's start) comes before it since the previous word."""
    brk, prev_end = True, 0
    for m in _WORD.finditer(caption):
        t = m.group()
        if not t[0].isalpha():
            hyphen = (
                t == "-" and m.start() == prev_end and m.end() < len(caption) and caption[m.end()].isalpha()
            )
            brk = brk or not hyphen
            prev_end = m.end()
            continue
        yield m, brk
        brk, prev_end = False, m.end()


@lru_cache(maxsize=200_000)
def _word_info(t: str) -> tuple[str, str, str, bool, bool]:
    possessive = t.endswith(("'s", "s'", "'S"))
    word = t[:-2] if t.endswith(("'s", "'S")) else t.rstrip("'")
    low = word.lower()
    camel = word[1:] != word[1:].lower() and not word.isupper()
    return word, low, singular(low), possessive, camel


def surface_words(surface: str) -> tuple[str, ...]:
    """The lower-case words of a vocabulary surface, split as captions are (qualifier dropped)."""
    return tuple(t.low for t in tokenize(plain_name(surface)))


@lru_cache(maxsize=4096)
def _gap_breaks(gap: str) -> bool:
    """Whether the text between two words of an ASCII caption breaks a phrase: anything but spaces or
    one joining hyphen ("hot-air"); a digit, a comma, " - " all break."""
    return not (gap.isspace() or gap == "-")


_NO_BREAKS = (True,) + (False,) * 255  # read-only, so one shared tuple serves every short caption


def _no_breaks(n: int) -> Sequence[bool]:
    """``brk`` flags of ``n`` words with only spaces between them (only the first word starts anew)."""
    return _NO_BREAKS if n <= len(_NO_BREAKS) else [True] + [False] * (n - 1)


def _split_caption(caption: str) -> tuple[list[str], Sequence[bool], list[str] | None]:
    """A caption's words as :func:`tokenize` finds them (before ``_word_info``), each word's ``brk``
    flag (a read-only sequence; it may run on past the last word), and the caption as
    ``[gap, word, gap, word, ..., gap]`` (None: words and single spaces).

    Most captions are ASCII words and single spaces: one ``str.split``, nothing breaks. Other ASCII
    captions are one ``re.split`` (the words are ASCII letter runs; a gap breaks unless it is blank or
    a lone hyphen). Otherwise a non-ASCII letter ("é") is a word of its own, as in :func:`tokenize`,
    and the walk below repeats tokenize's rules.
    """
    try:
        ascii_only = caption.isascii()
    except AttributeError:  # not a string: the walk below fails as tokenize does (TypeError)
        ascii_only = False
    if ascii_only:
        if "  " not in caption and caption.replace(" ", "").isalpha():
            tokens = caption.split()
            return tokens, _no_breaks(len(tokens)), None
        pieces = _ALPHA_SPLIT.split(caption)
        if len(pieces) == 1:
            return [], [], pieces
        gaps = pieces[2:-1:2]  # the gaps between words; the first word always starts a phrase
        if gaps.count(" ") == len(gaps):
            return pieces[1::2], _no_breaks(len(pieces) // 2), pieces
        return pieces[1::2], [True, *map(_gap_breaks, gaps)], pieces
    pieces, brks, word_end = [], [], 0
    for m, brk in _word_matches(caption):
        pieces += (caption[word_end : m.start()], m.group())
        brks.append(brk)
        word_end = m.end()
    pieces.append(caption[word_end:])
    return pieces[1::2], brks, pieces


@dataclass(frozen=True)
class Match:
    """A category a caption names, and the caption's words for it (``("pram",)``, ``("man", "men")``)."""

    category: Category
    words: tuple[str, ...]


@dataclass(slots=True)
class _Word:
    """A caption word and what the span search needs to know of it; the matcher keeps one per
    distinct word (captions share a small, Zipfian vocabulary), so a caption costs a dict look-up per
    word, not a lemmatisation and an object. (Slots: the fastest attribute reads.)"""

    text: str  # the word without possessive ending: "Dog's" -> "Dog"
    low: str
    form: str  # singular of ``low``
    possessive: bool
    camel: bool  # BlackBerry, iPhone: a name, never a plain vocabulary word
    reach: int  # the most words a phrase starting here may span (1: this word alone); see _new_word
    hit: tuple[int, ...] | None  # the index entry of this word alone, None when it has none
    inert: bool  # hit is None and reach == 1: no span starts here (most words)
    longest: int  # the longest key starting with ``low`` (1: none of two or more words)
    seconds: frozenset[str]  # the second words of the keys starting with ``low``
    joinable: bool  # may be glued to its neighbours into a compound ("hot dog" -> "hotdog")
    content: bool  # not a function word
    check: bool  # a span ending on this word may not name an object (_not_an_object has work to do)
    cues: set[str] | None  # a brand's cue words (brands.txt), None when the word names no brand
    head_noun: bool  # in HEAD_NOUNS: the word before it is a modifier ("dog print")


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    cands: tuple[int, ...]  # category indices; () when the words name no category
    cat: int  # the chosen index, -1 when none
    keep: bool


_MISSING = object()
_NONE: frozenset[str] = frozenset()


class CaptionMatcher:
    """Finds the categories a caption names: longest phrase first, on raw and singular word forms.

    Args:
        categories: the vocabulary (:func:`load_categories`).
        synonyms: a synonym map laid over it (:func:`read_synonyms`); a canonical name that is not a
            category's name or label becomes a new category.
        lexicon: lay the bundled English lexicon and brand list over the vocabulary (``lexicon.txt``,
            ``brands.txt``).
    """

    # Entries each of the matcher's memories (words, compounds, matches) holds; a full one starts over.
    _CACHE_SIZE = 200_000

    def __init__(self, categories: list[Category], synonyms=(), lexicon: bool = True):
        self.categories = list(categories)
        self.index: dict[tuple[str, ...], tuple[int, ...]] = {}
        self._by_name = {c.name: i for i, c in enumerate(self.categories)}
        for i, c in enumerate(self.categories):
            self._by_name.setdefault(c.label, i)
        base: dict[tuple[str, ...], list[int]] = {}
        for i, c in enumerate(self.categories):
            for surface in (c.name, *c.synonyms):
                for key in _keys(surface):
                    if i not in base.setdefault(key, []):
                        base[key].append(i)
        self.index = {k: tuple(v) for k, v in base.items()}
        self.brand_cues: dict[str, set[str]] = {}
        if lexicon:
            self._lay(bundled_lexicon("lexicon.txt"), add_missing=False)
            for word, cues in bundled_lexicon("brands.txt"):
                self.brand_cues[word] = {singular(w) for cue in cues for w in surface_words(cue)}
        self._lay(list(synonyms), add_missing=True)
        self._bags: dict[int, frozenset[str]] = {}
        # Where a phrase can start: its first word -> the longest key it starts; joinable prefixes.
        self._reach: dict[str, int] = {}
        self._join_heads: set[str] = set()
        # The proper prefixes of keys of two or more words: a phrase of k words can only be a key (as
        # is or with its last word singular) when its first k - 1 words are one of these.
        self._prefixes: set[tuple[str, ...]] = set()
        for key in self.index:
            self._reach[key[0]] = max(self._reach.get(key[0], 1), len(key))
            if len(key) == 1 and len(key[0]) >= 4:
                self._join_heads.update(key[0][:n] for n in range(2, len(key[0]) - 1))
            self._prefixes.update(key[:n] for n in range(1, len(key)))
        # A key's first word -> the words that follow it in keys: most pairs of words start no key.
        seconds: dict[str, set[str]] = {}
        for key in self.index:
            if len(key) > 1:
                seconds.setdefault(key[0], set()).add(key[1])
        self._seconds = {first: frozenset(s) for first, s in seconds.items()}
        self._guard: _SingularGuard | None = None  # for _compound; made with _glue_cut, _glue_heads
        self._glue_cut, self._glue_heads = 0, None  # _glued_heads, for _lookup
        self._words: dict[str, _Word] = {}  # caption token -> _Word, filled as captions come
        self._compounds: dict[str, tuple[int, ...] | None] = {}  # "hotdog" -> its index entry
        self._kinds: dict[tuple[int, int], bool] = {}  # _is_kind_of's answers
        self._head_words: dict[int, str] = {}  # category index -> its label's last word, singular
        self._def_forms: dict[int, frozenset[str]] = {}  # _definition_forms
        self._matches: dict[tuple[int, tuple[str, ...]], Match] = {}

    def __getstate__(self) -> dict:
        """Pickled (sent to a worker) without its memories: they fill again as captions come."""
        return {
            **self.__dict__,
            "_words": {},
            "_compounds": {},
            "_kinds": {},
            "_head_words": {},
            "_def_forms": {},
            "_matches": {},
            "_guard": None,
            "_glue_heads": None,
        }

    def _resolve(self, canonical: str, add_missing: bool) -> int | None:
        if canonical in self._by_name:
            return self._by_name[canonical]
        if add_missing:
            self.categories.append(Category(len(self.categories) + 1, canonical))
            self._by_name[canonical] = len(self.categories) - 1
            return len(self.categories) - 1
        hits = self.index.get(surface_words(canonical), ())
        return hits[0] if len(hits) == 1 else None

    def _lay(self, entries: list[tuple[str, list[str]]], add_missing: bool) -> None:
        """Lay a synonym map over the index: its words replace what they meant before."""
        layer: dict[tuple[str, ...], list[int]] = {}
        for canonical, syns in entries:
            i = None if canonical == NO_CATEGORY else self._resolve(canonical, add_missing)
            if i is None and canonical != NO_CATEGORY:
                continue  # the lexicon names a category this vocabulary does not have
            for surface in syns if i is None else (canonical, *syns):
                for key in _keys(surface):
                    ids = layer.setdefault(key, [])
                    if i is not None and i not in ids:
                        ids.append(i)
        self.index.update({k: tuple(v) for k, v in layer.items()})

    def _words_of(self, tokens: list[str]) -> list[_Word]:
        """Each token's :class:`_Word`, made on first sight."""
        try:
            return list(map(self._words.__getitem__, tokens))  # all seen before: no Python-level loop
        except KeyError:
            get = self._words.get
            return [get(t) or self._new_word(t) for t in tokens]

    def _new_word(self, t: str) -> _Word:
        text, low, form, possessive, camel = _word_info(t)
        joinable = len(low) > 1 and low not in _FUNCTION_WORDS
        # How far a phrase from here may run, as the search has always tried: the longest key starting
        # with the word or its singular, 3 for a prefix of a compound ("hot" of "hotdog").
        joins = low in self._join_heads and low not in _FUNCTION_WORDS
        reach = 1 if camel else max(self._reach.get(low, 1), self._reach.get(form, 1), 3 if joins else 1)
        # Longer tries than these cannot hit: a phrase of k words is a key of k words starting with
        # `low` (the singular only replaces the last word), or 2 or 3 joinable words glued together.
        longest = self._reach.get(low, 1)
        reach = min(reach, max(longest, 3 if joinable else 1))
        hit = self.index.get((low,))
        if hit is None and form != low:
            hit = self.index.get((form,))
        check = (
            (possessive and (form != low or low.endswith("s")))
            or low in _QUANTITY
            or (low in _COLOUR_THINGS and form == low)
            or low in _MATERIALS
        )
        word = _Word(
            text=text,
            low=low,
            form=form,
            possessive=possessive,
            camel=camel,
            reach=reach,
            hit=hit,
            inert=hit is None and reach == 1,
            longest=longest,
            seconds=self._seconds.get(low, _NONE),
            joinable=joinable,
            content=low not in _FUNCTION_WORDS,
            check=check,
            cues=self.brand_cues.get(low),
            head_noun=low in HEAD_NOUNS,
        )
        if len(self._words) >= self._CACHE_SIZE:
            self._words.clear()
        self._words[t] = word
        return word

    def __call__(self, caption: str) -> list[Match]:
        tokens, brks, pieces = _split_caption(caption)
        try:
            words = list(map(self._words.__getitem__, tokens))  # (_words_of, inline: the common case)
        except KeyError:
            words = self._words_of(tokens)
        spans, pending = self._spans(words, brks)
        # The spans whose category _spans left open: brands and words of several senses. The caption's
        # content words and whether it is Title Case are made only for these (most captions have none).
        if pending:
            context = {w.form for w in words if w.content}
            title_case = _is_title_case(words)
            for s in pending:
                cues = words[s.start].cues if s.end - s.start == 1 else None
                if cues is None or not self._is_brand(words, s, cues, context, title_case):
                    s.cat = self._sense(s, words, context)
                s.keep = s.cat >= 0 and not (words[s.end - 1].check and _not_an_object(words, brks, s))
        # Left to right, drop modifiers ("dog bed") and gather the rest: a span's `keep` is final once
        # the span before it is done (that one may drop it as its head).
        found: dict[int, tuple[str, ...]] = {}  # category index -> its words, in caption order
        n = len(words)
        for j, s in enumerate(spans):
            if not s.keep:
                continue
            if s.end < n and not brks[s.end]:  # a word follows
                head = j + 1 < len(spans) and spans[j + 1].start == s.end
                if words[s.end].head_noun or (head and self._modifies(words, brks, spans, j)):
                    s.keep = False
                    continue
            surface = words[s.start].text if s.end - s.start == 1 else _surface(tokens, pieces, words, s)
            seen = found.get(s.cat)
            if seen is None:
                found[s.cat] = (surface,)
            elif surface not in seen:
                found[s.cat] = (*seen, surface)
        # One (immutable) Match per distinct (category, words), kept: a frozen dataclass is slow to build.
        try:
            return list(map(self._matches.__getitem__, found.items()))
        except KeyError:
            if len(self._matches) >= self._CACHE_SIZE:
                self._matches.clear()
            for pair in found.items():
                if pair not in self._matches:
                    self._matches[pair] = Match(self.categories[pair[0]], pair[1])
            return list(map(self._matches.__getitem__, found.items()))

    def phrase_category(self, phrase: str) -> Category | None:
        """The category a whole phrase names ("cellphone", "tabby cat"), or None."""
        tokens, brks, _ = _split_caption(phrase)
        words = self._words_of(tokens)
        spans, _ = self._spans(words, brks)
        if len(spans) != 1 or (spans[0].start, spans[0].end) != (0, len(words)) or not spans[0].cands:
            return None
        return self.categories[self._sense(spans[0], words, {w.form for w in words})]

    def _spans(self, words: list[_Word], brks: Sequence[bool]) -> tuple[list[_Span], list[_Span]]:
        """Longest phrase first, left to right: at each word the longest run of words (up to its reach,
        not over punctuation or into a name) that the index knows. Each span gets its category and
        ``keep`` here when that is plain (one category, no brand), else it is also listed as pending."""
        spans: list[_Span] = []
        pending: list[_Span] = []
        n, end = len(words), 0  # the words before `end` are in a span already
        for i, w in enumerate(words):
            if w.inert or i < end:
                continue
            hit, k = w.hit, 1
            # a phrase does not run over punctuation or into a name
            if w.reach > 1 and i + 1 < n and not (brks[i + 1] or words[i + 1].camel):
                nxt = words[i + 1]
                # A longer phrase needs a key going on with the next word, or two words to glue.
                if nxt.low in w.seconds or nxt.form in w.seconds or (w.joinable and nxt.joinable):
                    limit = 2
                    while (
                        limit < w.reach and i + limit < n and not (brks[i + limit] or words[i + limit].camel)
                    ):
                        limit += 1
                    for size in range(limit, 1, -1):
                        longer = self._lookup(words, i, size)
                        if longer is not None:
                            hit, k = longer, size
                            break
            if hit is None:
                continue
            end = i + k
            if hit and len(hit) == 1 and (k > 1 or w.cues is None):  # one category, not a brand
                s = _Span(i, end, hit, hit[0], True)
                s.keep = not (words[end - 1].check and _not_an_object(words, brks, s))
            else:
                s = _Span(i, end, hit, -1, False)  # () names no category
                if hit:
                    pending.append(s)
            spans.append(s)
        return spans, pending

    def _lookup(self, words: list[_Word], i: int, k: int) -> tuple[int, ...] | None:
        """The index entry of the k >= 2 words from i: as written, with the last word singular, or
        glued into one word ("hot dog" -> "hotdog"), in that order; None when none."""
        first, last = words[i], words[i + k - 1]
        # The key is (*prefix, last word) with the prefix a proper prefix of some key: skip the look-ups
        # when it cannot be (most tries).
        if k == 2:
            prefix: tuple[str, ...] = (
                (first.low,) if last.low in first.seconds or last.form in first.seconds else ()
            )
        elif k <= first.longest and words[i + 1].low in first.seconds:
            prefix = (first.low, words[i + 1].low) if k == 3 else tuple([w.low for w in words[i : i + k - 1]])
            if prefix not in self._prefixes:
                prefix = ()
        else:
            prefix = ()
        if prefix:
            hit = self.index.get((*prefix, last.low))
            if hit is None and last.form != last.low:
                hit = self.index.get((*prefix, last.form))
            if hit is not None:
                return hit
        if k == 2 and first.joinable and last.joinable:
            joined = first.low + last.low
        elif k == 3 and first.joinable and last.joinable and words[i + 1].joinable:
            joined = first.low + words[i + 1].low + last.low
        else:
            return None
        if self._guard is None:  # made on first need: they read lemminflect's tables
            keys = {key[0] for key in self.index if len(key) == 1}
            self._guard = _SingularGuard(keys)
            self._glue_cut, self._glue_heads = _glued_heads(keys, self._guard)
        # Most glued words have no entry, and their start shows it ("woodentable": "woodent").
        if self._glue_heads is not None and joined.isascii():
            if joined[: len(joined) - self._glue_cut] not in self._glue_heads:
                return None
        hit = self._compounds.get(joined, _MISSING)
        return self._compound(joined) if hit is _MISSING else hit

    def _compound(self, joined: str) -> tuple[int, ...] | None:
        """``joined``'s index entry, remembered; one naming no category (``()``) or none gives way to the
        entry of its singular. Most glued words are new ("woodentable"): their singular is looked up
        only when it may be a key, as lemmatising a new word is slow (tens of microseconds)."""
        hit = self.index.get((joined,))
        if not hit:
            hit = self.index.get((singular(joined),)) if self._guard.may_be_key(joined) else None
        if len(self._compounds) >= self._CACHE_SIZE:
            self._compounds.clear()
        self._compounds[joined] = hit
        return hit

    def _is_brand(
        self, words: list[_Word], s: _Span, cues: set[str], context: set[str], title_case: bool
    ) -> bool:
        """A single word that is also a brand, written CamelCase or near one of its cue words."""
        w = words[s.start]
        proper = w.text[0].isupper() and s.start > 0 and not title_case
        return w.camel or proper or bool(cues & (context - {w.form}))

    def _sense(self, s: _Span, words: list[_Word], context: set[str]) -> int:
        """Of the categories a word can name, the one whose definition shares most caption words."""
        if len(s.cands) == 1:
            return s.cands[0]
        own = {w.form for w in words[s.start : s.end]}

        def score(i: int) -> tuple[int, int]:
            return len(self._bag(i) & (context - own)), _FREQ_RANK.get(self.categories[i].frequency, 0)

        return max(s.cands, key=score)  # max keeps the first of equals: vocabulary / lexicon order

    def _bag(self, i: int) -> frozenset[str]:
        if i not in self._bags:
            c = self.categories[i]
            text = " ".join((c.definition, c.name, *c.synonyms))
            self._bags[i] = frozenset(t.form for t in tokenize(text) if t.low not in _FUNCTION_WORDS)
        return self._bags[i]

    def _modifies(self, words: list[_Word], brks: Sequence[bool], spans: list[_Span], j: int) -> bool:
        """Whether kept span ``spans[j]`` modifies the span right after it, its head: a noun before
        another noun does ("pencil skirt", "dog bed", "lion cub") unless they are a list ("Knife Fork
        Spoon"). When the head only says what ``spans[j]`` is ("teddy bear toy"), the head is dropped
        instead."""
        s, head = spans[j], spans[j + 1]
        if head.cat == s.cat:
            return False
        if head.cat >= 0 and self._is_kind_of(s.cat, head.cat):
            head.keep = False
            return False
        return not _in_list(words, brks, spans, j)

    def _is_kind_of(self, i: int, j: int) -> bool:
        """Whether category j's head word appears in category i's definition (teddy bear: toy)."""
        kind = self._kinds.get((i, j))
        if kind is None:
            head = self._head_words.get(j)
            if head is None:
                head = self._head_words[j] = singular(self.categories[j].label.split()[-1])
            kind = self._kinds[i, j] = head in self._definition_forms(i)
        return kind

    def _definition_forms(self, i: int) -> frozenset[str]:
        """The word forms of category i's definition (none without one), tokenised once."""
        forms = self._def_forms.get(i)
        if forms is None:
            forms = self._def_forms[i] = frozenset(t.form for t in tokenize(self.categories[i].definition))
        return forms


def _keys(surface: str) -> list[tuple[str, ...]]:
    words = surface_words(surface)
    if not words:
        return []
    return [words, ("".join(words),)] if len(words) > 1 else [words]


def _surface(tokens: list[str], pieces: list[str] | None, words: list[_Word], s: _Span) -> str:
    """The caption's text of a span: from its first word to its last, possessive ending dropped."""
    last = s.end - 1
    if s.start == last:
        return words[last].text
    if pieces is None:  # single spaces between words
        return " ".join(tokens[s.start : last]) + " " + words[last].text
    return "".join(pieces[2 * s.start + 1 : 2 * last + 1]) + words[last].text  # words and gaps


def _is_title_case(words: list[_Word]) -> bool:
    content = [w for w in words if w.content]
    return len(content) >= 3 and sum(w.text[0].isupper() for w in content) >= 0.7 * len(content)


def _not_an_object(words: list[_Word], brks: Sequence[bool], s: _Span) -> bool:
    """Possessive plurals ("Women's shoes"), quantities ("a couple of"), colours, materials."""
    last, n = words[s.end - 1], len(words)
    nxt = words[s.end] if s.end < n and not brks[s.end] else None
    if last.possessive and (last.form != last.low or last.low.endswith("s")):
        return True
    if nxt is not None and last.low in _QUANTITY and nxt.low == "of":
        return True
    if s.end - s.start != 1:
        return False
    word = last.low
    if word in _COLOUR_THINGS and last.form == word:
        after = [w.low for w in words[s.end : s.end + 2]]
        before = words[s.start - 1].low if s.start > 0 else ""
        if (after and after[0] in _COLOURS) or after[:1] == ["and"] and after[1:] and after[1] in _COLOURS:
            return True
        if before in _COLOURS or before == "in":
            return True
    return word in _MATERIALS and nxt is not None and nxt.low not in _FUNCTION_WORDS


def _in_list(words: list[_Word], brks: Sequence[bool], spans: list[_Span], j: int) -> bool:
    """Nouns in a row that are a list, not a compound: "Knife Fork Spoon", "Table Chair Set"."""
    run, end = [spans[j]], spans[j].end  # spans[j] and the spans right after it, word after word
    for x in spans[j + 1 :]:
        if x.start != end or brks[end]:
            break
        run.append(x)
        end = x.end
    after = words[end].low if end < len(words) and not brks[end] else ""
    return after in _LIST_WORDS or (len({x.cat for x in run}) >= 3 and _is_title_case(words))
