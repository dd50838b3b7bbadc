"""Candidates: caption nouns matched against a vocabulary, plus LLM expansion.

A caption names what is notable ("a busy intersection"); the LLM is asked, with several prompt
templates, for what such an image also holds ("car, traffic light, wheel"). Its answers are
parsed -- never executed -- into short noun phrases, normalised (lower case, singular, no
articles or counts), filtered for junk and instructions, deduplicated and capped. Each candidate
keeps its ``source``: ``caption`` or ``llm``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator

from ssam.configio import Section
from ssam.vocab import load_vocabulary

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
    "a",
    "an",
    "the",
    "some",
    "many",
    "several",
    "few",
    "various",
    "other",
    "more",
    "lots",
    "of",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "multiple",
    "possibly",
    "maybe",
    "probably",
    "likely",
    "additional",
    "any",
}
# Words that signal the model talking rather than naming an object.
_JUNK = {
    "here",
    "sure",
    "list",
    "answer",
    "object",
    "objects",
    "item",
    "items",
    "thing",
    "things",
    "image",
    "photo",
    "picture",
    "caption",
    "scene",
    "following",
    "etc",
    "none",
    "nothing",
    "noun",
    "nouns",
    "example",
    "visible",
    "background",
    "foreground",
    "comma",
    "note",
    "assistant",
    "user",
    "i",
    "you",
    "it",
    "they",
    "this",
    "that",
    "these",
    "those",
    "and",
    "or",
    "is",
    "are",
    "with",
    "without",
    "include",
    "includes",
    "including",
    "such",
    "as",
    "also",
    "ignore",
    "instruction",
    "instructions",
    "system",
    "prompt",
}


@lru_cache(maxsize=100_000)
def singular(word: str) -> str:
    """Noun lemma (``wheels -> wheel``, ``mice -> mouse``) from lemminflect's dictionary and rules."""
    from lemminflect import getLemma

    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def normalize_phrase(text: str, max_words: int = 4) -> str | None:
    """A short noun phrase in canonical form, or None for junk.

    Lower case; bullets, numbering, quotes and trailing punctuation stripped; leading articles and
    counts dropped; the head (last) word singular. Phrases with digits, too many words, or words
    that signal an instruction are rejected.
    """
    text = text.strip().lower()
    if re.search(r"[`$<>{}=/\\|@#~^*]", text.lstrip("-*\u2022 ")):
        return None  # code, markup, paths: never a noun phrase
    text = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)]|[a-z][.)])\s+", "", text)
    text = text.strip(" \t\"'`.,;:!?()[]{}")
    if not text or len(text) > 48 or re.search(r"\d", text) or ":" in text:
        return None
    words = _WORD.findall(text.replace("_", " "))
    if " ".join(words) != re.sub(r"\s+", " ", text.replace("_", " ")):
        return None  # symbols or non-latin characters we cannot normalise safely
    while words and words[0] in _LEADING:
        words = words[1:]
    if not words or len(words) > max_words or any(w in _JUNK for w in words) or len(words[-1]) < 2:
        return None
    words[-1] = singular(words[-1])
    return " ".join(words)


def parse_llm_output(text: str, max_words: int = 4) -> list[str]:
    """Noun phrases from free LLM text: split on commas, newlines, semicolons and ' and '."""
    pieces = re.split(r"[,\n;]|\band\b", text.lower())
    seen, out = set(), []
    for piece in pieces:
        phrase = normalize_phrase(piece, max_words)
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
        description="caption nouns are matched against this: lvis, coco, objects365, ade20k, a file, or a list",
    )
    max_candidates: int = Field(
        24, ge=1, le=512, description="candidates kept per image (caption matches first)"
    )
    max_words: int = Field(4, ge=1, le=8, description="longest candidate phrase, in words")
    llm_vocabulary_only: bool = Field(
        False, description="keep only LLM phrases that contain a vocabulary name"
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="LLM tokens generated per prompt")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="LLM sampling temperature (0: greedy)")
    llm_batch_size: int = Field(32, ge=1, description="prompts per generate call")
    prompt_templates: list[str] = Field([], description="override the prompt templates; each needs {caption}")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model replica")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: fraction of GPU memory to use")

    @model_validator(mode="after")
    def _templates_have_caption(self):
        bad = [t for t in self.prompt_templates if "{caption}" not in t]
        if bad:
            raise ValueError(f"prompt template without {{caption}}: {bad[0]!r}")
        return self


class VocabularyMatcher:
    """Finds vocabulary names in a caption, longest phrase first, on singular word forms."""

    def __init__(self, names: list[str]):
        self.by_form: dict[tuple[str, ...], str] = {}
        for name in names:
            # LVIS qualifies ambiguous names ("car (automobile)", "bow (weapon)"): captions say "car";
            # the first name of a form wins, and the label is the plain name.
            plain = re.sub(r"\s*\(.*?\)", "", name).strip()
            words = _WORD.findall(plain)
            if words:
                self.by_form.setdefault(tuple(words[:-1] + [singular(words[-1])]), plain)
        self.longest = max((len(k) for k in self.by_form), default=1)

    def __call__(self, caption: str) -> list[str]:
        words = [singular(w) for w in _WORD.findall(caption.lower())]
        found, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                name = self.by_form.get(tuple(words[i : i + n]))
                if name:
                    found.append(name)
                    i += n
                    break
            else:
                i += 1
        return list(dict.fromkeys(found))


class CandidatesStage(Stage):
    """Caption + LLM candidates per row, as JSON in column ``candidates_json``."""

    name = "candidates"
    reads = (*ROW_COLUMNS, "caption")
    writes = ("candidates_json",)

    def __init__(self, cfg: CandidatesConfig, seed: int = 0):
        from ssam.model.llm import build_generator

        c = cfg
        self.cfg = c
        self.matcher = VocabularyMatcher(load_vocabulary(c.vocabulary))
        self.templates = c.prompt_templates or list(PROMPT_TEMPLATES)
        self.generator = build_generator(
            c.backend,
            c.llm_model,
            device=c.device,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            seed=seed,
            tensor_parallel_size=c.tensor_parallel_size,
            gpu_memory_utilization=c.gpu_memory_utilization,
        )
        self.provenance = self.generator.provenance if self.generator else {"backend": "none", "model": None}

    def _llm_phrases(self, captions: list[str]) -> list[list[str]]:
        """For each caption, LLM phrases ranked by how many templates produced them."""
        if self.generator is None or not captions:
            return [[] for _ in captions]
        prompts = [t.format(caption=cap) for cap in captions for t in self.templates]
        answers: list[str] = []
        for s in range(0, len(prompts), self.cfg.llm_batch_size):
            answers += self.generator.generate(prompts[s : s + self.cfg.llm_batch_size])
        k = len(self.templates)
        ranked = []
        for j in range(len(captions)):
            votes: dict[str, int] = {}
            for answer in answers[j * k : (j + 1) * k]:
                for phrase in parse_llm_output(answer, self.cfg.max_words):
                    votes[phrase] = votes.get(phrase, 0) + 1
            ranked.append(sorted(votes, key=lambda p: -votes[p]))  # stable: ties keep first-seen order
        return ranked

    def candidates_for(self, caption: str, llm_phrases: list[str]) -> list[dict]:
        cands = [{"label": n, "source": "caption"} for n in self.matcher(caption)]
        seen = {c["label"] for c in cands}
        for phrase in llm_phrases:
            if phrase in seen:
                continue
            if self.cfg.llm_vocabulary_only and not self.matcher(phrase):
                continue
            seen.add(phrase)
            cands.append({"label": phrase, "source": "llm"})
        return cands[: self.cfg.max_candidates]

    def process(self, out: dict[str, list]) -> None:
        idx = ok_indices(out)
        captions = [out["caption"][i] or "" for i in idx]
        with_text = [j for j, cap in enumerate(captions) if cap]
        phrases = dict(zip(with_text, self._llm_phrases([captions[j] for j in with_text]), strict=True))
        by_row = {i: phrases.get(j, []) for j, i in enumerate(idx)}
        map_rows(
            out,
            self.name,
            lambda i: {
                "candidates_json": json.dumps(self.candidates_for(out["caption"][i] or "", by_row[i]))
            },
            {"candidates_json": "[]"},
        )
