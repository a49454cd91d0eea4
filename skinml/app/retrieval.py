"""Cited educational notes: a small Markdown knowledge base and TF-IDF retrieval over it.

``skinml/app/knowledge/<LABEL>.md`` holds one file per diagnosis: ``## `` sections are passages,
each ending with a ``Sources: [id] [id]`` line, and a final ``## Sources`` section lists every
source as ``- [id] title | publisher | URL | licence note``. Loading refuses a passage without
a citation or one citing an id its file does not list, naming the file and passage.

Retrieval ranks passages with scikit-learn's TF-IDF (cosine similarity) against a query made
of the predicted condition's names and the patient's answers (bleeding, growth, itch,
elevation, body region, age). Nothing is generated: the page shows the passages as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from skinml.data import schema

KNOWLEDGE_PACKAGE = "skinml.app"
KNOWLEDGE_DIR = "knowledge"

#: Words that name each condition in a query (the file's own vocabulary, plus common synonyms).
CONDITION_TERMS: dict[str, str] = {
    "ACK": "actinic keratosis keratoses solar keratosis",
    "BCC": "basal cell carcinoma BCC",
    "MEL": "melanoma",
    "NEV": "melanocytic nevus naevus mole moles",
    "SCC": "squamous cell carcinoma SCC",
    "SEK": "seborrheic seborrhoeic keratosis keratoses",
}

#: Query words for a "yes" answer to a symptom question.
SYMPTOM_TERMS: dict[str, str] = {
    "bleed": "bleeding bleeds bleed",
    "grew": "growing grows grew bigger",
    "itch": "itchy itching itch",
    "hurt": "painful pain tender sore",
    "changed": "changing changes change",
    "elevation": "raised lump bump",
}

REGION_TERMS: dict[str, str] = {
    "ABDOMEN": "abdomen", "ARM": "arms", "BACK": "back", "CHEST": "chest", "EAR": "ears",
    "FACE": "face", "FOOT": "soles feet", "FOREARM": "forearms", "HAND": "hands", "LIP": "lips",
    "NECK": "neck", "NOSE": "nose", "SCALP": "scalp", "THIGH": "legs",
}

_SOURCE_LINE = re.compile(r"^-\s*\[(?P<id>[\w.-]+)\]\s*(?P<rest>.+)$")
_CITATION = re.compile(r"\[([\w.-]+)\]")
_TOKEN = re.compile(r"[a-z0-9]+")
_SUFFIXES = ("ingly", "edly", "ing", "ed", "es", "s", "y", "e")


class KnowledgeError(ValueError):
    """A knowledge-base file that breaks the format; the message names the file and passage."""


@dataclass(frozen=True)
class Source:
    id: str
    title: str
    publisher: str
    url: str
    licence: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "publisher": self.publisher, "url": self.url,
                "licence": self.licence}


@dataclass(frozen=True)
class Passage:
    condition: str
    file: str
    title: str
    text: str
    citations: tuple[Source, ...] = field(default_factory=tuple)

    def to_dict(self, score: float | None = None) -> dict[str, Any]:
        out = {"condition": self.condition, "condition_name": schema.LABEL_NAMES.get(self.condition, self.condition),
               "file": self.file, "title": self.title, "text": self.text,
               "citations": [s.to_dict() for s in self.citations]}
        if score is not None:
            out["score"] = round(float(score), 6)
        return out


def stem(token: str) -> str:
    """A deliberately crude suffix stripper: "bleeding", "bleeds" and "bleed" meet at "bleed"."""
    for suffix in _SUFFIXES:
        if token.endswith(suffix) and len(token) - len(suffix) >= 3:
            return token[: -len(suffix)]
    return token


def analyse(text: str) -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [stem(t) for t in _TOKEN.findall(text.lower()) if t not in ENGLISH_STOP_WORDS]


def parse_knowledge_file(text: str, condition: str, file: str) -> list[Passage]:
    """Passages of one condition's Markdown file, each with its resolved citations."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif sections:
            sections[-1][1].append(line)
    sources: dict[str, Source] = {}
    for title, lines in sections:
        if title.lower() != "sources":
            continue
        for line in lines:
            match = _SOURCE_LINE.match(line.strip())
            if not match:
                if line.strip():
                    raise KnowledgeError(f"{file}: cannot read source line {line.strip()!r}; expected "
                                         "'- [id] title | publisher | URL | licence'")
                continue
            parts = [p.strip() for p in match["rest"].split(" | ")]
            if len(parts) != 4 or not parts[2].startswith(("https://", "http://")):
                raise KnowledgeError(f"{file}: source [{match['id']}] needs 'title | publisher | URL | licence', "
                                     f"got {match['rest']!r}")
            sources[match["id"]] = Source(match["id"], *parts)
    if not sources:
        raise KnowledgeError(f"{file}: no '## Sources' section listing the sources")
    passages = []
    for title, lines in sections:
        if title.lower() == "sources":
            continue
        body = [line for line in lines if not line.strip().lower().startswith("sources:")]
        cited = [i for line in lines if line.strip().lower().startswith("sources:") for i in _CITATION.findall(line)]
        text_ = " ".join(" ".join(body).split())
        if not text_:
            raise KnowledgeError(f"{file}: passage {title!r} is empty")
        if not cited:
            raise KnowledgeError(f"{file}: passage {title!r} cites no source; end it with 'Sources: [id]'")
        unknown = [i for i in cited if i not in sources]
        if unknown:
            raise KnowledgeError(f"{file}: passage {title!r} cites {unknown}, not listed under '## Sources'")
        passages.append(Passage(condition, file, title, text_, tuple(sources[i] for i in dict.fromkeys(cited))))
    if not passages:
        raise KnowledgeError(f"{file}: no passages")
    return passages


@lru_cache(maxsize=1)
def load_knowledge() -> tuple[Passage, ...]:
    """Every passage of the packaged knowledge base, one file per label."""
    root = resources.files(KNOWLEDGE_PACKAGE).joinpath(KNOWLEDGE_DIR)
    passages: list[Passage] = []
    for label in schema.LABELS:
        name = f"{label}.md"
        resource = root.joinpath(name)
        if not resource.is_file():
            raise KnowledgeError(f"knowledge base: {KNOWLEDGE_DIR}/{name} is missing (one file per label)")
        passages.extend(parse_knowledge_file(resource.read_text(encoding="utf-8"), label, f"{KNOWLEDGE_DIR}/{name}"))
    return tuple(passages)


def answer_terms(answers: Mapping[str, Any] | None) -> str:
    """Query words for the patient's answers that retrieval uses (yes-answers, region, age)."""
    answers = answers or {}
    words = []
    for column, terms in SYMPTOM_TERMS.items():
        if schema.canonical_category(column, answers.get(column)) == "True":
            words.append(terms)
    region = schema.canonical_category("region", answers.get("region"))
    if region in REGION_TERMS:
        words.append(REGION_TERMS[region])
    age = answers.get("age")
    try:
        age = float(age) if not schema.is_missing(age) else None
    except (TypeError, ValueError):
        age = None
    if age is not None:
        words.append("older adults age" if age >= 50 else "young adults" if age < 30 else "adults")
    return " ".join(words)


class KnowledgeIndex:
    """TF-IDF over the passages (title + text); ``search`` ranks them for a query."""

    def __init__(self, passages: tuple[Passage, ...] | None = None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.passages = tuple(passages if passages is not None else load_knowledge())
        self.vectorizer = TfidfVectorizer(analyzer=analyse, sublinear_tf=True, norm="l2")
        self.matrix = self.vectorizer.fit_transform([f"{p.title} {p.text}" for p in self.passages])

    def scores(self, query: str) -> np.ndarray:
        vector = self.vectorizer.transform([query])
        return (self.matrix @ vector.T).toarray().ravel()

    def search(self, query: str, conditions: list[str] | None = None, k: int = 3,
               answers_query: str = "") -> list[tuple[Passage, float]]:
        """Top ``k`` passages (of ``conditions`` if given) for ``query``; ``answers_query`` is
        scored separately and added, so the patient's answers weigh as much as the condition."""
        scores = self.scores(query)
        if answers_query.strip():
            scores = scores + self.scores(answers_query)
        ranked = sorted(range(len(self.passages)), key=lambda i: (-scores[i], i))
        hits = [(self.passages[i], float(scores[i])) for i in ranked
                if conditions is None or self.passages[i].condition in conditions]
        return hits[:k]

    def notes_for(self, probabilities: Mapping[str, float], answers: Mapping[str, Any] | None = None,
                  max_conditions: int = 2, min_probability: float = 0.2,
                  per_condition: tuple[int, ...] = (2, 1)) -> list[dict[str, Any]]:
        """Passages for the most probable condition(s) and the patient's answers.

        The top condition always gets notes; a runner-up gets them when its probability is at
        least ``min_probability``. Each condition's passages are ranked by its names plus the
        answers, so a bleeding lesion on the nose brings up the passages about bleeding and sites.
        """
        ranked = sorted(probabilities.items(), key=lambda kv: -float(kv[1]))
        chosen = [label for i, (label, p) in enumerate(ranked[:max_conditions])
                  if label in CONDITION_TERMS and (i == 0 or float(p) >= min_probability)]
        extra = answer_terms(answers)
        notes = []
        for i, label in enumerate(chosen):
            k = per_condition[min(i, len(per_condition) - 1)]
            query = CONDITION_TERMS[label]
            for passage, score in self.search(query, [label], k, answers_query=extra):
                notes.append(passage.to_dict(score) | {"query": f"{query} {extra}".strip()})
        return notes


@lru_cache(maxsize=1)
def default_index() -> KnowledgeIndex:
    return KnowledgeIndex()
