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


_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*'?|\d+|\S")
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
    """Words of a caption with the breaks between them; ``'s`` and ``s'`` become a flag."""
    tokens, brk, prev_end = [], True, 0
    for m in _WORD.finditer(caption):
        t = m.group()
        if not t[0].isalpha():
            hyphen = (
                t == "-" and m.start() == prev_end and m.end() < len(caption) and caption[m.end()].isalpha()
            )
            brk = brk or not hyphen
            prev_end = m.end()
            continue
        word, low, form, possessive, camel = _word_info(t)
        tokens.append(_Token(word, low, form, brk, possessive, camel, (m.start(), m.start() + len(word))))
        brk, prev_end = False, m.end()
    return tokens


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


@dataclass(frozen=True)
class Match:
    """A category a caption names, and the caption's words for it (``("pram",)``, ``("man", "men")``)."""

    category: Category
    words: tuple[str, ...]


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    cands: tuple[int, ...]  # category indices; () when the words name no category
    cat: int = -1  # the chosen index, -1 when none
    keep: bool = True


class CaptionMatcher:
    """Finds the categories a caption names: longest phrase first, on raw and singular word forms.

    Args:
        categories: the vocabulary (:func:`load_categories`).
        synonyms: a synonym map laid over it (:func:`read_synonyms`); a canonical name that is not a
            category's name or label becomes a new category.
        lexicon: lay the bundled English lexicon and brand list over the vocabulary (``lexicon.txt``,
            ``brands.txt``).
    """

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
        for key in self.index:
            self._reach[key[0]] = max(self._reach.get(key[0], 1), len(key))
            if len(key) == 1 and len(key[0]) >= 4:
                self._join_heads.update(key[0][:n] for n in range(2, len(key[0]) - 1))

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

    def __call__(self, caption: str) -> list[Match]:
        toks = tokenize(caption)
        spans = self._spans(toks)
        context = {t.form for t in toks if t.low not in _FUNCTION_WORDS}
        title_case = _is_title_case(toks)
        for s in spans:
            if s.cands and not self._is_brand(toks, s, context, title_case):
                s.cat = self._sense(s, toks, context)
            s.keep = s.cat >= 0 and not _not_an_object(toks, s)
        self._drop_modifiers(toks, spans, title_case)
        found: dict[int, list[str]] = {}
        for s in spans:
            if s.keep:
                words = caption[toks[s.start].span[0] : toks[s.end - 1].span[1]]
                if words not in found.setdefault(s.cat, []):
                    found[s.cat].append(words)
        return [Match(self.categories[i], tuple(w)) for i, w in found.items()]

    def phrase_category(self, phrase: str) -> Category | None:
        """The category a whole phrase names ("cellphone", "tabby cat"), or None."""
        toks = tokenize(phrase)
        spans = self._spans(toks)
        if len(spans) != 1 or (spans[0].start, spans[0].end) != (0, len(toks)) or not spans[0].cands:
            return None
        return self.categories[self._sense(spans[0], toks, {t.form for t in toks})]

    def _spans(self, toks: list[_Token]) -> list[_Span]:
        spans, i, n = [], 0, len(toks)
        while i < n:
            t = toks[i]
            joins = t.low in self._join_heads and t.low not in _FUNCTION_WORDS
            reach = (
                1
                if t.camel
                else max(self._reach.get(t.low, 1), self._reach.get(t.form, 1), 3 if joins else 1)
            )
            limit = 1
            while limit < reach and i + limit < n and not (toks[i + limit].brk or toks[i + limit].camel):
                limit += 1  # a phrase does not run over punctuation or into a name
            for k in range(limit, 0, -1):
                hit = self._lookup(toks[i : i + k])
                if hit is not None:
                    spans.append(_Span(i, i + k, hit))
                    i += k
                    break
            else:
                i += 1
        return spans

    def _lookup(self, part: list[_Token]) -> tuple[int, ...] | None:
        raw = tuple(t.low for t in part)
        hit = self.index.get(raw)
        if hit is None and part[-1].form != part[-1].low:
            hit = self.index.get((*raw[:-1], part[-1].form))
        if hit is None and 1 < len(part) <= 3 and all(len(w) > 1 and w not in _FUNCTION_WORDS for w in raw):
            joined = "".join(raw)
            hit = self.index.get((joined,)) or self.index.get((singular(joined),))
        return hit

    def _is_brand(self, toks: list[_Token], s: _Span, context: set[str], title_case: bool) -> bool:
        """A single word that is also a brand, written CamelCase or near one of its cue words."""
        tok = toks[s.start]
        cues = self.brand_cues.get(tok.low)
        if s.end - s.start != 1 or cues is None:
            return False
        proper = tok.text[0].isupper() and s.start > 0 and not title_case
        return tok.camel or proper or bool(cues & (context - {tok.form}))

    def _sense(self, s: _Span, toks: list[_Token], context: set[str]) -> int:
        """Of the categories a word can name, the one whose definition shares most caption words."""
        if len(s.cands) == 1:
            return s.cands[0]
        own = {t.form for t in toks[s.start : s.end]}

        def score(i: int) -> tuple[int, int]:
            return len(self._bag(i) & (context - own)), _FREQ_RANK.get(self.categories[i].frequency, 0)

        return max(s.cands, key=score)  # max keeps the first of equals: vocabulary / lexicon order

    def _bag(self, i: int) -> frozenset[str]:
        if i not in self._bags:
            c = self.categories[i]
            text = " ".join((c.definition, c.name, *c.synonyms))
            self._bags[i] = frozenset(t.form for t in tokenize(text) if t.low not in _FUNCTION_WORDS)
        return self._bags[i]

    def _drop_modifiers(self, toks: list[_Token], spans: list[_Span], title_case: bool) -> None:
        """A noun right before another noun modifies it: "pencil skirt", "dog bed", "lion cub"."""
        starts = {s.start: s for s in spans}
        for s in spans:
            if not s.keep or s.end >= len(toks) or toks[s.end].brk:
                continue
            if toks[s.end].low in HEAD_NOUNS:
                s.keep = False
                continue
            head = starts.get(s.end)
            if head is None or head.cat == s.cat:
                continue
            if head.cat >= 0 and self._is_kind_of(s.cat, head.cat):
                head.keep = False  # "teddy bear toy": the head only says what the modifier is
            elif not _in_list(toks, spans, s, title_case):
                s.keep = False

    def _is_kind_of(self, i: int, j: int) -> bool:
        """Whether category j's head word appears in category i's definition (teddy bear: toy)."""
        definition = self.categories[i].definition
        return bool(definition) and singular(self.categories[j].label.split()[-1]) in {
            t.form for t in tokenize(definition)
        }


def _keys(surface: str) -> list[tuple[str, ...]]:
    words = surface_words(surface)
    if not words:
        return []
    return [words, ("".join(words),)] if len(words) > 1 else [words]


def _is_title_case(toks: list[_Token]) -> bool:
    content = [t for t in toks if t.low not in _FUNCTION_WORDS]
    return len(content) >= 3 and sum(t.text[0].isupper() for t in content) >= 0.7 * len(content)


def _not_an_object(toks: list[_Token], s: _Span) -> bool:
    """Possessive plurals ("Women's shoes"), quantities ("a couple of"), colours, materials."""
    last, n = toks[s.end - 1], len(toks)
    nxt = toks[s.end] if s.end < n and not toks[s.end].brk else None
    if last.possessive and (last.form != last.low or last.low.endswith("s")):
        return True
    if nxt is not None and last.low in _QUANTITY and nxt.low == "of":
        return True
    if s.end - s.start != 1:
        return False
    word = last.low
    if word in _COLOUR_THINGS and last.form == word:
        after = [t.low for t in toks[s.end : s.end + 2]]
        before = toks[s.start - 1].low if s.start > 0 else ""
        if (after and after[0] in _COLOURS) or after[:1] == ["and"] and after[1:] and after[1] in _COLOURS:
            return True
        if before in _COLOURS or before == "in":
            return True
    return word in _MATERIALS and nxt is not None and nxt.low not in _FUNCTION_WORDS


def _in_list(toks: list[_Token], spans: list[_Span], s: _Span, title_case: bool) -> bool:
    """Nouns in a row that are a list, not a compound: "Knife Fork Spoon", "Table Chair Set"."""
    starts = {x.start: x for x in spans}
    run, end = [s], s.end
    while end in starts and end < len(toks) and not toks[end].brk:
        run.append(starts[end])
        end = starts[end].end
    after = toks[end].low if end < len(toks) and not toks[end].brk else ""
    return after in _LIST_WORDS or (title_case and len({x.cat for x in run}) >= 3)
