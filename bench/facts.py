"""Seeded long documents with facts to look up, the questions about them, and how answers are scored.

Used by ``python -m bench rag-vs-full``; everything here is deterministic given ``(seed, n_tokens)`` and the
question counts (``random.Random(f"rag-vs-full:{seed}:{n_tokens}")`` makes every choice).

**The document.** Filler text is Python's own ``pydoc_data.topics`` (``bench.common.pydoc_text()``), split into
paragraphs at blank lines and read from a seeded starting paragraph onwards (wrapping around at the end), so
documents of different seeds or lengths differ. Fact sentences are inserted as paragraphs of their own at
paragraph boundaries, and the text is cut so that it has ``n_tokens`` tokens of the generator's tokenizer
(re-tokenising the cut text can differ by a token; :attr:`FactDocument.n_tokens` is the exact count). A fact:

    The locker number of the red lantern is 48213.

Each holder is a colour + a noun, the noun never repeated within a document (so "lantern" names one thing);
codes are distinct 5-digit numbers (10000-99999) that occur nowhere in ``pydoc_data.topics``. Each question's
facts have an *attribute* ("locker number", "serial number", ...) that no other question's facts use: with one
shared wording ("archive code" everywhere) SmolLM2-135M mostly copies whichever code is nearest the question
(a probe at 3-4K tokens with 10 facts: 8/30 right with one wording, 23/30 with distinct attributes).

**The questions** (each with an answer *stem* that every method gets after ``Answer:``, like the passkey
benchmarks' "The pass key is", which lets a small model answer by copying):

* ``single``: one fact. "What is the locker number of the red lantern?" → ``48213``.
* ``pair`` (multi-fact): two facts sharing an attribute, at least ``min_gap`` of the document apart (default
  40%). "What are the parcel numbers of the green anchor and the teal kettle?" → both codes.
* ``chain`` (multi-fact): a link "The violet kettle is kept in the olive cellar." and, at least ``min_gap``
  away, "The archive code of the olive cellar is 61024."; the question "What is the archive code of the place
  where the violet kettle is kept?" names neither the place nor anything else of the second sentence. Every
  place fact says "archive code", and a document with chain questions also holds ``DECOY_PLACES`` (3) such
  facts about places nothing is kept in, so retrieval on the question finds the link but has to guess among
  at least four "archive code of the <place>" sentences: the case where retrieval is expected to struggle.

Multi-fact questions alternate pair, chain, pair, ... How many fit: a single or chain question takes one object
noun, a pair two (70 nouns); a chain one place (21 besides the decoys); a single or pair one attribute (45), so
30 single + 20 multi-fact questions (``n_questions=50, n_multi=20``) fit. Documents that need no more than the
first pools (30 nouns, 12 places, 19 attributes) draw from those alone, as before the pools grew.

Depths (fraction of the document's tokens): single facts at stratified depths (the range 3%-97% cut into equal
strata, one uniform draw in each, strata shuffled among the questions); a multi-fact question's two facts at
``a`` and ``b`` with ``b - a >= min_gap + 0.05`` (the margin absorbs moving each to the nearest free paragraph
boundary), their order drawn at random; decoys uniformly. After assembly each multi-fact question's facts are
checked to be ``min_gap`` apart in tokens; if not, the start paragraph and depths are drawn again (from the same
random stream).

**Scoring** (:func:`score`): an answer is correct when every expected code appears in it as a whole number
(``148213`` does not contain ``48213``) and no *other* code of the document does, so listing every code seen
is not rewarded. Only the answer's first non-blank line counts (:func:`answer_line`).

    from bench.facts import make_document, score
    doc = make_document(tokenizer, 16384, seed=0, n_questions=10, n_multi=4)
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from bench.common import pydoc_text

COLOURS = (
    "red", "green", "blue", "amber", "silver", "golden", "violet", "crimson", "ivory", "teal",
    "scarlet", "copper", "olive", "indigo", "orange", "white", "black", "grey", "pink", "bronze",
)  # fmt: skip
OBJECTS = (
    "lantern", "anchor", "kettle", "compass", "drum", "mirror", "violin", "telescope", "hourglass", "candle",
    "teapot", "helmet", "saddle", "banner", "chalice", "globe", "harp", "ladder", "lockbox", "typewriter",
    "umbrella", "trumpet", "clock", "kite", "bicycle", "microscope", "accordion", "sextant", "barometer", "quill",
)  # fmt: skip
PLACES = (
    "vault", "cellar", "tower", "cabinet", "attic", "warehouse", "chapel", "greenhouse", "boathouse", "library",
    "pantry", "workshop",
)  # fmt: skip
# Attributes of single and pair facts, one per question (places' facts all say "archive code", see above).
ATTRIBUTES = (
    "locker number", "serial number", "badge number", "ticket number", "room number", "account number",
    "licence number", "parcel number", "catalogue number", "permit number", "case number", "inventory number",
    "registration number", "order number", "batch number", "invoice number", "membership number", "claim number",
    "voucher number",
)  # fmt: skip
# Drawn from only when a document needs more than the pools above hold (say 30 single + 20 multi questions):
# a document that fits the pools above samples them alone, so its text is what it was before these were added.
MORE_OBJECTS = (
    "flute", "goblet", "spyglass", "statuette", "tambourine", "lute", "vase", "satchel", "briefcase", "abacus",
    "anvil", "bugle", "cello", "easel", "fiddle", "gramophone", "hammock", "inkwell", "jukebox", "kayak",
    "mandolin", "metronome", "oboe", "padlock", "periscope", "quiver", "rucksack", "scooter", "skateboard",
    "stopwatch", "tuba", "ukulele", "wheelbarrow", "xylophone", "zither", "banjo", "birdcage", "canoe", "cauldron",
    "thimble",
)  # fmt: skip
MORE_PLACES = (
    "garage", "basement", "loft", "shed", "barn", "crypt", "lighthouse", "observatory", "armoury", "gatehouse",
    "mill", "cottage",
)  # fmt: skip
MORE_ATTRIBUTES = (
    "tracking number", "booking number", "contract number", "passport number", "seat number", "shipment number",
    "pallet number", "cabin number", "berth number", "route number", "docket number", "folio number",
    "ledger number", "patient number", "student number", "employee number", "vehicle number", "warranty number",
    "receipt number", "coupon number", "deposit number", "crate number", "postal code", "dispatch code",
    "security code", "courier code",
)  # fmt: skip
PLACE_ATTRIBUTE = "archive code"
DECOY_PLACES = 3
KINDS = ("single", "pair", "chain")
LOW, HIGH = 0.03, 0.97  # depth range for facts
CODE = re.compile(r"\b\d{5}\b")


@dataclass(frozen=True)
class Fact:
    sentence: str
    role: str  # "single", "pair", "chain-link", "chain-code" or "decoy" (a place fact no question asks for)
    char_start: int  # sentence == document.text[char_start : char_start + len(sentence)]
    token_start: int  # index of the token holding the sentence's first character
    depth: float  # token_start / document.n_tokens


@dataclass(frozen=True)
class Question:
    id: str
    kind: str  # "single", "pair" or "chain"
    text: str
    stem: str  # what the answer starts with; the prompt ends "Answer: {stem}"
    answers: tuple[str, ...]  # every code the answer must contain
    facts: tuple[int, ...]  # indices into FactDocument.facts that the answer needs

    @property
    def multi(self) -> bool:
        return self.kind != "single"


@dataclass(frozen=True)
class FactDocument:
    seed: int
    requested_tokens: int
    n_tokens: int  # exact count of the text's tokens
    start_paragraph: int  # first filler paragraph (index into pydoc_text().split("\n\n"))
    text: str
    facts: tuple[Fact, ...]
    questions: tuple[Question, ...]
    codes: frozenset[str] = field(default_factory=frozenset)  # every code in the document

    def others(self, question: Question) -> frozenset[str]:
        """The document's codes that are not an answer to ``question`` (their presence makes it wrong)."""
        return self.codes - set(question.answers)


# ---- scoring (pure) -----------------------------------------------------------------------------------------
def answer_line(raw: str) -> str:
    """The answer proper: the generation's first non-blank line (models go on with more text after it)."""
    return raw.lstrip().split("\n", 1)[0].strip()


def has_code(text: str, code: str) -> bool:
    """``code`` appears in ``text`` as a whole number, not inside a longer number or word."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(code)}(?![0-9A-Za-z])", text) is not None


def codes_in(text: str) -> list[str]:
    """Every standalone 5-digit number in ``text``, in order."""
    return CODE.findall(text)


def score(answer: str, expected: Iterable[str], others: Iterable[str] = ()) -> bool:
    """Correct: every expected code is in ``answer`` and none of ``others`` is."""
    expected = list(expected)
    if not expected:
        raise ValueError("a question needs at least one expected code")
    return all(has_code(answer, c) for c in expected) and not any(has_code(answer, c) for c in others)


# ---- the generator ------------------------------------------------------------------------------------------
@dataclass
class _Spec:
    sentences: list[str]  # one (single, decoy) or two (pair, chain) facts
    roles: list[str]
    kind: str  # "single", "pair", "chain" or "decoy"
    codes: tuple[str, ...]  # every code in the sentences
    question: str = ""
    stem: str = ""
    answers: tuple[str, ...] = ()


def _kinds(n_questions: int, n_multi: int, multi_kinds: Sequence[str]) -> list[str]:
    if not 0 <= n_multi <= n_questions:
        raise ValueError(f"n_multi={n_multi} must be between 0 and n_questions={n_questions}")
    if n_multi and (not multi_kinds or any(k not in ("pair", "chain") for k in multi_kinds)):
        raise ValueError(f"multi_kinds must be a non-empty list of 'pair'/'chain', got {multi_kinds!r}")
    return ["single"] * (n_questions - n_multi) + [multi_kinds[i % len(multi_kinds)] for i in range(n_multi)]


def _specs(rng: random.Random, kinds: list[str], forbidden_codes: set[str]) -> list[_Spec]:
    n_objects = sum({"single": 1, "pair": 2, "chain": 1}[k] for k in kinds)
    n_chains = kinds.count("chain")
    n_places = n_chains + (DECOY_PLACES if n_chains else 0)
    n_attributes = kinds.count("single") + kinds.count("pair")
    objects, places = _pool(OBJECTS, MORE_OBJECTS, n_objects), _pool(PLACES, MORE_PLACES, n_places)
    attribute_pool = _pool(ATTRIBUTES, MORE_ATTRIBUTES, n_attributes)
    if n_objects > len(objects) or n_places > len(places) or n_attributes > len(attribute_pool):
        raise ValueError(
            f"too many questions: {len(OBJECTS + MORE_OBJECTS)} objects (a single or chain question takes one, a "
            f"pair two), {len(PLACES + MORE_PLACES) - DECOY_PLACES} chain places and "
            f"{len(ATTRIBUTES + MORE_ATTRIBUTES)} single/pair attributes available"
        )
    colours = rng.sample(COLOURS, len(COLOURS))
    nouns = rng.sample(objects, n_objects) + rng.sample(places, n_places)
    names = [f"{colours[i % len(colours)]} {noun}" for i, noun in enumerate(nouns)]
    object_names, place_names = iter(names[:n_objects]), iter(names[n_objects:])
    attributes = iter(rng.sample(attribute_pool, n_attributes))
    n_codes = n_objects - n_chains + n_places
    codes: list[str] = []
    while len(codes) < n_codes:
        code = str(rng.randrange(10000, 100000))
        if code not in forbidden_codes and code not in codes:
            codes.append(code)
    code_iter = iter(codes)

    def fact(attribute: str, name: str) -> tuple[str, str]:
        code = next(code_iter)
        return f"The {attribute} of the {name} is {code}.", code

    specs = []
    for kind in kinds:
        if kind == "single":
            attribute, name = next(attributes), next(object_names)
            sentence, code = fact(attribute, name)
            specs.append(
                _Spec([sentence], ["single"], kind, (code,), f"What is the {attribute} of the {name}?",
                      f"The {attribute} of the {name} is", (code,))
            )  # fmt: skip
        elif kind == "pair":
            attribute, a, b = next(attributes), next(object_names), next(object_names)
            (sa, ca), (sb, cb) = fact(attribute, a), fact(attribute, b)
            plural = attribute.replace("number", "numbers").replace("code", "codes")
            specs.append(
                _Spec([sa, sb], ["pair", "pair"], kind, (ca, cb), f"What are the {plural} of the {a} and the {b}?",
                      f"The {plural} of the {a} and the {b} are", (ca, cb))
            )  # fmt: skip
        else:
            thing, place = next(object_names), next(place_names)
            sentence, code = fact(PLACE_ATTRIBUTE, place)
            specs.append(
                _Spec([f"The {thing} is kept in the {place}.", sentence], ["chain-link", "chain-code"], kind,
                      (code,), f"What is the {PLACE_ATTRIBUTE} of the place where the {thing} is kept?",
                      f"The {PLACE_ATTRIBUTE} of the place where the {thing} is kept is", (code,))
            )  # fmt: skip
    for place in place_names:  # the decoys: whatever is left
        sentence, code = fact(PLACE_ATTRIBUTE, place)
        specs.append(_Spec([sentence], ["decoy"], "decoy", (code,)))
    return specs


def _pool(base: tuple[str, ...], more: tuple[str, ...], needed: int) -> tuple[str, ...]:
    """``base`` when it holds ``needed`` (the documents made before ``more`` existed stay the same), else both."""
    return base if needed <= len(base) else base + more


def _targets(rng: random.Random, specs: list[_Spec], min_gap: float) -> list[list[float]]:
    """Depth targets for every spec's sentences (see the module docstring)."""
    gap = min_gap + 0.05
    if HIGH - LOW < gap:
        raise ValueError(f"min_gap={min_gap} is too large (at most {HIGH - LOW - 0.05:.2f})")
    singles = [i for i, s in enumerate(specs) if s.kind == "single"]
    strata = [LOW + (HIGH - LOW) * (j + rng.random()) / len(singles) for j in range(len(singles))]
    rng.shuffle(strata)
    targets: list[list[float]] = [[] for _ in specs]
    for i, depth in zip(singles, strata, strict=True):
        targets[i] = [depth]
    for i, spec in enumerate(specs):
        if spec.kind == "decoy":
            targets[i] = [rng.uniform(LOW, HIGH)]
        elif spec.kind != "single":
            a = rng.uniform(LOW, HIGH - gap)
            b = rng.uniform(a + gap, HIGH)
            targets[i] = [a, b] if rng.random() < 0.5 else [b, a]
    return targets


def make_document(
    tokenizer: PreTrainedTokenizerBase,
    n_tokens: int,
    seed: int = 0,
    n_questions: int = 10,
    n_multi: int = 4,
    min_gap: float = 0.4,
    multi_kinds: Sequence[str] = ("pair", "chain"),
) -> FactDocument:
    """A document of ``n_tokens`` tokens with facts for ``n_questions`` questions (``n_multi`` multi-fact ones).

    Same arguments (and tokenizer) → the same document and questions. See the module docstring for the design.
    """
    if n_tokens < 256:
        raise ValueError("n_tokens must be at least 256")
    kinds = _kinds(n_questions, n_multi, multi_kinds)
    text = pydoc_text()
    paragraphs = text.split("\n\n")
    lengths = [len(ids) + 1 for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]]  # + "\n\n"
    rng = random.Random(f"rag-vs-full:{seed}:{n_tokens}")
    specs = _specs(rng, kinds, set(codes_in(text)))
    sentences = [s for spec in specs for s in spec.sentences]
    fact_tokens = sum(len(ids) + 1 for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"])
    filler_budget = n_tokens - fact_tokens
    if filler_budget < n_tokens // 2:
        raise ValueError(f"{n_tokens} tokens is too short for {n_questions} questions' facts")
    for _ in range(100):
        start = rng.randrange(len(paragraphs))
        targets = _targets(rng, specs, min_gap)
        document = _assemble(tokenizer, paragraphs, lengths, start, filler_budget, n_tokens, specs, targets)
        if document is None:
            continue
        facts, questions, cut_text, count = document
        if all(abs(facts[q.facts[0]].depth - facts[q.facts[1]].depth) >= min_gap for q in questions if q.multi):
            codes = frozenset(c for spec in specs for c in spec.codes)
            return FactDocument(seed, n_tokens, count, start, cut_text, tuple(facts), tuple(questions), codes)
    raise RuntimeError(f"could not place the facts {min_gap:.0%} apart in {n_tokens} tokens; lower min_gap")


def _assemble(
    tokenizer: PreTrainedTokenizerBase,
    paragraphs: list[str],
    lengths: list[int],
    start: int,
    filler_budget: int,
    n_tokens: int,
    specs: list[_Spec],
    targets: list[list[float]],
) -> tuple[list[Fact], list[Question], str, int] | None:
    # Filler paragraphs from `start` on until the budget (plus slack for the final cut) is reached.
    chosen: list[str] = []
    boundaries: list[int] = []  # token offset (in the filler) at which chosen[j] starts
    total = 0
    index = start
    while total < filler_budget + 64:
        boundaries.append(total)
        chosen.append(paragraphs[index])
        total += lengths[index]
        index = (index + 1) % len(paragraphs)
    # Each fact goes before the free paragraph whose start is nearest its target (never after the budget).
    usable = [j for j in range(1, len(chosen)) if boundaries[j] <= filler_budget]
    taken: dict[int, str] = {}
    for spec, depths in zip(specs, targets, strict=True):
        for sentence, depth in zip(spec.sentences, depths, strict=True):
            free = [j for j in usable if j not in taken]
            if not free:
                return None
            goal = depth * filler_budget
            j = min(free, key=lambda j: abs(boundaries[j] - goal))
            taken[j] = sentence
    pieces: list[str] = []
    for j, paragraph in enumerate(chosen):
        if j in taken:
            pieces.append(taken[j])
        pieces.append(paragraph)
    text = "\n\n".join(pieces)
    # Cut at the start of token n_tokens; re-tokenising the cut text gives the exact count.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) > n_tokens:
        text = text[: offsets[n_tokens][0]]
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    count = len(offsets)
    ends = [end for _, end in offsets]
    facts: list[Fact] = []
    questions: list[Question] = []
    counters = dict.fromkeys(KINDS, 0)
    for spec in specs:
        indices = []
        for sentence, role in zip(spec.sentences, spec.roles, strict=True):
            char_start = text.find(sentence)
            if char_start < 0:  # cut off (cannot happen with the budget above, but never report a missing fact)
                return None
            token_start = bisect.bisect_right(ends, char_start)
            indices.append(len(facts))
            facts.append(Fact(sentence, role, char_start, token_start, token_start / count))
        if spec.kind == "decoy":
            continue
        counters[spec.kind] += 1
        questions.append(
            Question(f"{spec.kind}-{counters[spec.kind]}", spec.kind, spec.question, spec.stem, spec.answers,
                     tuple(indices))
        )  # fmt: skip
    return facts, questions, text, count
