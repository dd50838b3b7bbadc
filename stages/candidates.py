"""Candidates: the categories a caption names, plus LLM expansion, as the names CLIP may choose.

A caption names what is notable ("a woman with a pram"); ``ssam.vocab.CaptionMatcher`` finds the
vocabulary's categories in it through their synonyms, compounds, word senses and brands
(docs/CANDIDATES.md). The LLM is asked, with several prompt templates, for what such an image also
holds ("car, traffic light, wheel"); its answers are parsed -- never executed -- into short noun
phrases (a JSON list where the backend supports structured output, free text otherwise), and a
phrase that is a vocabulary word gets its category's canonical name. The vocabulary controls
(synonym map, deny list, allow-only list, background labels) apply to both. Each candidate keeps
its ``label``, ``source`` (``caption`` or ``llm``), ``category_id``, ``words`` and ``template``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from ssam.configio import Section
from ssam.vocab import CaptionMatcher, Category, load_categories, read_synonyms, singular

from .common import ROW_COLUMNS, Stage, map_rows, ok_indices

PROMPT_TEMPLATES = (
    'A photo has the caption "{caption}". List the physical objects that are probably visible in it '
    "but not named in the caption. Answer with a comma-separated list of short nouns and nothing else.",
    'An image is described as "{caption}". Name other things that usually appear in such a scene, '
    "including parts of the objects. Reply only with nouns separated by commas.",
    'What objects and background items would you expect in a picture captioned "{caption}"? '
    "Give a comma-separated list of nouns.",
)

_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
_LEADING = {
    "a", "an", "the", "some", "many", "several", "few", "various", "other", "more", "lots", "of", "one",
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "multiple", "possibly",
    "maybe", "probably", "likely", "additional", "any", "each", "every", "plenty", "couple", "pair",
}  # fmt: skip
# Words that signal the model talking, refusing or being steered rather than naming an object.
_JUNK = {
    "here", "sure", "list", "answer", "object", "objects", "item", "items", "thing", "things", "image",
    "photo", "picture", "caption", "scene", "following", "etc", "none", "nothing", "noun", "nouns",
    "example", "visible", "background", "foreground", "comma", "note", "assistant", "user", "i", "you",
    "it", "they", "this", "that", "these", "those", "and", "or", "is", "are", "with", "without",
    "include", "includes", "including", "such", "as", "also", "ignore", "instruction", "instructions",
    "system", "prompt", "print", "execute", "reveal", "previous", "output", "respond", "repeat", "let",
    "me", "know", "need", "please", "provide", "sorry", "cannot", "can", "could", "would", "might",
    "may", "will", "based", "ai", "language", "so", "n", "na", "unknown", "word", "words", "else",
}  # fmt: skip
_CODE_LINE = re.compile(
    r"[`$<>{}=\\]|&&|\|\||://|\w\(|^\s*(?:import|from|def|class|return|sudo|rm|cd|ls|echo|curl|wget|pip|"
    r"python|bash|sh|chmod|select|drop|exec|eval|system)\b|\bimport\b"
)
_REFUSAL = re.compile(
    r"\b(?:sorry|cannot|can't|can not|unable to|as an ai|language model|i don't|i do not|please provide|"
    r"not possible|i'm not able)\b"
)
# After one of these, a sentence turns into the list: "the image shows a lamp" -> "a lamp".
_CUE = re.compile(
    r"^.*\b(?:include|includes|including|show|shows|showing|contain|contains|containing|feature|features|"
    r"find|see|spot|notice|expect|be|are|is|have|has|like|e\.g\.|such as|namely)\b\s*"
)
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b.*\b(?:instructions?|prompts?|rules|above)\b|system prompt|jailbreak"
)
_ASIDE = {
    "explanation", "note", "notes", "reason", "reasoning", "rationale", "context", "description", "summary",
}  # fmt: skip
_PREPOSITIONS = {
    "in", "on", "at", "to", "from", "for", "by", "into", "onto", "over", "under", "near", "behind",
    "inside", "outside", "above", "below", "beside", "between", "through", "around", "because",
}  # fmt: skip
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u25aa\u00b7\u2013>]+|\(?\d+[.)]|\(?[a-z][.)]|#+)\s+")
_DESCRIPTION_DASH = re.compile(r"\s+[-\u2013\u2014]+\s+")


def normalize_phrase(text: str, max_words: int = 4) -> str | None:
    """A short noun phrase in canonical form, or None for junk.

    Lower case; bullets, numbering, markdown, quotes and trailing punctuation stripped; leading
    articles and counts dropped; the head (last) word singular. Phrases with code symbols, digits
    past a leading count, too many words, or words that signal chatter or an instruction are
    rejected.
    """
    text = _BULLET.sub("", text.strip().lower().replace("**", "").replace("__", ""))
    text = text.strip(" \t\"'`.,;:!?()[]")
    text = re.sub(r"^\d+\s*[x\u00d7]?\s+", "", text)  # "3 chairs", "2x cups"
    if not text or len(text) > 48 or re.search(r"[\d`$<>{}=/\\|@#~^*()\[\]:;]", text):
        return None
    words = _WORD.findall(text.replace("_", " "))
    if " ".join(words) != re.sub(r"\s+", " ", text.replace("_", " ")):
        return None  # symbols or non-latin characters we cannot normalise safely
    while words and words[0] in _LEADING:
        words = words[1:]
    if (
        not words
        or len(words) > max_words
        or len(words[-1]) < 2
        or any(w in _JUNK or w in _PREPOSITIONS for w in words)
    ):
        return None
    words[-1] = singular(words[-1])
    return " ".join(words)


def _json_items(text: str) -> list[str] | None:
    """The strings of the first JSON list in ``text`` (bare, fenced, or inside an object), or None."""
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    end = max(text.rfind("]"), text.rfind("}"))
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except ValueError:
        return None
    items: list[str] = []

    def walk(node, in_list: bool) -> None:
        if isinstance(node, str) and in_list:
            items.append(node)
        elif isinstance(node, list):
            for x in node:
                walk(x, True)
        elif isinstance(node, dict):
            for x in node.values():
                walk(x, False)

    walk(data, isinstance(data, list))
    return items


def _line_items(line: str) -> list[str]:
    """The pieces of one answer line that may name an object."""
    was_item = bool(_BULLET.match(line))
    line = _BULLET.sub("", line.replace("**", "").replace("__", "")).strip()
    if not line or _CODE_LINE.search(line) or _INJECTION.search(line):
        return []
    line = re.sub(r"\([^)]*\)", "", line)
    head, colon, tail = line.partition(":")
    if colon:
        if not tail.strip() or head.strip() in _ASIDE:
            return []  # a header ("Here are some objects:", "Furniture:") or an aside ("Note: ...")
        if "," not in tail and was_item and normalize_phrase(head):
            line = head  # "1. Knife: used for chopping"
        else:
            line = tail  # "Visible items: lamp, table", "Furniture: chair, table"
    elif _REFUSAL.search(line):
        return []
    line = _DESCRIPTION_DASH.split(line)[0]  # "Tripod - holds the camera steady"
    pieces = re.split(r"[,;/&+]|(?<=[.!?])\s+|\band\b|\bor\b|\s\(?\d+[.)]\s", line)
    return [p for p in pieces if p.strip()]


def parse_llm_output(text: str, max_words: int = 4) -> list[str]:
    """Noun phrases from an LLM answer: a JSON list, or free text in any list or sentence shape.

    Never executes anything; lines that look like code, markup or a refusal give nothing.
    """
    text = re.sub(r"<\|[^|>]*\|>", " ", text or "")  # chat-template tokens
    items = _json_items(text) if "[" in text else None
    if items is None:
        text = re.sub(r"```[a-z]*\n.*?(?:```|$)", "", text, flags=re.S)  # code blocks, closed or not
        items = [p for line in text.lower().splitlines() for p in _line_items(line)]
    seen, out = set(), []
    for piece in items:
        phrase = normalize_phrase(piece, max_words) if isinstance(piece, str) else None
        if phrase is None and isinstance(piece, str):
            phrase = normalize_phrase(_CUE.sub("", piece.strip().lower()), max_words)
        if phrase and phrase not in seen:
            seen.add(phrase)
            out.append(phrase)
    return out


class CandidatesConfig(Section):
    backend: Literal["vllm", "transformers", "none"] = Field(
        "transformers", description="LLM backend for caption expansion"
    )
    llm_model: str = Field(
        "Qwen/Qwen2.5-0.5B-Instruct", description="HF model id, local directory, or 'smoke'"
    )
    device: str = Field("auto", description="transformers backend device: auto, cpu, cuda")
    vocabulary: str | list[str] = Field(
        "lvis",
        description="categories found in captions: lvis, coco, objects365, ade20k, a synonym-format file, or a list",
    )
    synonyms: str | dict[str, list[str]] | None = Field(
        None,
        description="synonym map over the vocabulary: a synonym-format file or {canonical: [synonym, ...]}; "
        "the canonical names are the labels written",
    )
    deny: list[str] = Field([], description="labels or words that never become candidates")
    allow: list[str] = Field([], description="allow-only mode: when set, only these labels become candidates")
    background_labels: list[str] = Field(
        [], description="extra labels that mean 'no object' (sky, wall): never candidates"
    )
    lexicon: bool = Field(
        True, description="lay the bundled English lexicon (hyponyms, compounds, brands) over the vocabulary"
    )
    max_candidates: int = Field(
        24, ge=1, le=512, description="candidates kept per image (caption matches first)"
    )
    max_words: int = Field(4, ge=1, le=8, description="longest candidate phrase, in words")
    llm_vocabulary_only: bool = Field(
        False, description="keep only LLM phrases that name a vocabulary category"
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="LLM tokens generated per prompt")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="LLM sampling temperature (0: greedy)")
    llm_batch_size: int = Field(32, ge=1, description="prompts per generate call")
    prompt_templates: list[str] = Field([], description="override the prompt templates; each needs {caption}")
    structured_output: bool = Field(
        True, description="vllm: constrain answers to a JSON list of strings (guided decoding)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model replica")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: fraction of GPU memory to use")

    @model_validator(mode="after")
    def _templates_have_caption(self):
        bad = [t for t in self.prompt_templates if "{caption}" not in t]
        if bad:
            raise ValueError(f"prompt template without {{caption}}: {bad[0]!r}")
        return self


def _norm_word(text: str) -> str:
    words = _WORD.findall(text.lower().replace("_", " "))
    return " ".join([*words[:-1], singular(words[-1])]) if words else ""


@dataclass
class Candidate:
    """One name CLIP may give a mask; ``as_json`` is its entry in ``candidates_json``."""

    label: str
    source: Literal["caption", "llm"]
    category_id: int | None = None
    words: list[str] = field(default_factory=list)
    template: int | None = None  # llm: the first prompt template that produced it

    def as_json(self) -> dict:
        return {
            "label": self.label,
            "source": self.source,
            "category_id": self.category_id,
            "words": self.words,
            "template": self.template,
        }


class CandidateBuilder:
    """Caption matches and LLM phrases -> the capped candidate list, under the vocabulary controls."""

    def __init__(self, cfg: CandidatesConfig):
        self.cfg = cfg
        self.matcher = CaptionMatcher(
            load_categories(cfg.vocabulary), read_synonyms(cfg.synonyms), cfg.lexicon
        )
        self.deny = {_norm_word(w) for w in cfg.deny}
        self.allow = {_norm_word(w) for w in cfg.allow}
        self.background = {_norm_word(w) for w in cfg.background_labels}

    def _permitted(self, label: str, category: Category | None, words: list[str]) -> bool:
        names = {_norm_word(label)} | ({_norm_word(category.name)} if category else set())
        surfaces = {_norm_word(w) for w in words}
        if names & (self.deny | self.background) or (surfaces and surfaces <= self.deny | self.background):
            return False
        return not self.allow or bool(names & self.allow)

    def category_of(self, phrase: str) -> Category | None:
        """The category an LLM phrase names as a whole ("cellphone", "pram"), else None."""
        return self.matcher.phrase_category(phrase)

    def build(self, caption: str, llm_phrases: list[tuple[str, int]]) -> list[Candidate]:
        """Candidates for one caption; ``llm_phrases`` are (phrase, template index), best first."""
        out: list[Candidate] = []
        by_key: dict[object, Candidate] = {}
        for m in self.matcher(caption):
            if self._permitted(m.category.label, m.category, list(m.words)):
                c = Candidate(m.category.label, "caption", m.category.id, list(m.words))
                by_key[m.category.id] = c
                out.append(c)
        for phrase, template in llm_phrases:
            cat = self.category_of(phrase)
            if cat is None and self.cfg.llm_vocabulary_only:
                heads = self.matcher(phrase)
                cat = heads[-1].category if heads else None
                if cat is None:
                    continue
            key = cat.id if cat else phrase
            if key in by_key:
                if by_key[key].source == "llm" and phrase not in by_key[key].words:
                    by_key[key].words.append(phrase)
                continue
            label = cat.label if cat else phrase
            if self._permitted(label, cat, [phrase]):
                by_key[key] = Candidate(label, "llm", cat.id if cat else None, [phrase], template)
                out.append(by_key[key])
        return out[: self.cfg.max_candidates]


def rank_phrases(answers: list[str], max_words: int) -> list[tuple[str, int]]:
    """Phrases from one caption's answers (one per template), ranked by how many templates gave them.

    Returns:
        ``[(phrase, first template index)]``; ties keep first-seen order.
    """
    votes: dict[str, list[int]] = {}
    for t, answer in enumerate(answers):
        for phrase in parse_llm_output(answer, max_words):
            votes.setdefault(phrase, []).append(t)
    return [(p, votes[p][0]) for p in sorted(votes, key=lambda p: -len(votes[p]))]


class CandidatesStage(Stage):
    """Caption + LLM candidates per row, as JSON in column ``candidates_json``."""

    name = "candidates"
    reads = (*ROW_COLUMNS, "caption")
    writes = ("candidates_json",)

    def __init__(self, cfg: CandidatesConfig, seed: int = 0):
        from ssam.model.llm import build_generator

        self.cfg = cfg
        self.builder = CandidateBuilder(cfg)
        self.templates = cfg.prompt_templates or list(PROMPT_TEMPLATES)
        self.generator = build_generator(
            cfg.backend,
            cfg.llm_model,
            device=cfg.device,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            structured_output=cfg.structured_output,
        )
        self.provenance = self.generator.provenance if self.generator else {"backend": "none", "model": None}

    def llm_answers(self, captions: list[str]) -> list[list[str]]:
        """For each caption, the LLM's answer to each prompt template (none without an LLM)."""
        if self.generator is None or not captions:
            return [[] for _ in captions]
        prompts = [t.format(caption=cap) for cap in captions for t in self.templates]
        answers: list[str] = []
        for s in range(0, len(prompts), self.cfg.llm_batch_size):
            answers += self.generator.generate(prompts[s : s + self.cfg.llm_batch_size])
        k = len(self.templates)
        return [answers[j * k : (j + 1) * k] for j in range(len(captions))]

    def candidates_for(self, caption: str, llm_phrases: list[tuple[str, int]] | list[str]) -> list[dict]:
        """The ``candidates_json`` entries of one caption (phrases may come without template index)."""
        pairs = [p if isinstance(p, tuple) else (p, None) for p in llm_phrases]
        return [c.as_json() for c in self.builder.build(caption, pairs)]

    def process(self, out: dict[str, list]) -> None:
        idx = ok_indices(out)
        captions = [out["caption"][i] or "" for i in idx]
        with_text = [j for j, cap in enumerate(captions) if cap]
        answers = self.llm_answers([captions[j] for j in with_text])
        phrases = {j: rank_phrases(a, self.cfg.max_words) for j, a in zip(with_text, answers, strict=True)}
        by_row = {i: phrases.get(j, []) for j, i in enumerate(idx)}
        map_rows(
            out,
            self.name,
            lambda i: {
                "candidates_json": json.dumps(self.candidates_for(out["caption"][i] or "", by_row[i]))
            },
            {"candidates_json": "[]"},
        )
