"""Deterministic, project-written English-like corpora for the offline demo model.

A seeded generator describes a small made-up world (objects, towns, people) and
writes varied documents about it: facts, comparisons, arithmetic, lists,
dialogues, stories and code-like snippets. Training text adds the Python
reference topics bundled with CPython (``pydoc_data``); a fixed subset of those
topics is reserved for the held-out set so calibration and evaluation never
share text.

Regenerate the committed sets with ``python -m pipeline.demo.corpus --write calibration/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CORPUS_VERSION = 1  # bump whenever a code change alters any generated text
WORLD_SEED = 20240611
TRAIN_DOCUMENTS = 3000
CALIBRATION_RECORDS = 512
HELDOUT_RECORDS = 64
CHAT_RECORDS = 64
MAX_RECORD_CHARS = 1000
HELDOUT_TOPICS = (
    "assert",
    "augassign",
    "bitwise",
    "booleans",
    "del",
    "formatstrings",
    "lambda",
    "power",
    "raise",
    "shifting",
    "truth",
    "unary",
    "yield",
)
PYDOC_SHARE = 4  # one record in PYDOC_SHARE comes from pydoc topics

CALIBRATION_FILE = "demo-calibration.jsonl"
HELDOUT_FILE = "demo-heldout.jsonl"
CHAT_FILE = "demo-chat.jsonl"

_SYLLABLES = (
    "ka",
    "lo",
    "mir",
    "ven",
    "tash",
    "or",
    "bel",
    "qui",
    "dra",
    "sen",
    "fo",
    "lum",
    "zar",
    "ith",
    "pel",
    "nor",
    "ga",
    "ru",
    "vex",
    "to",
    "ma",
    "sil",
    "den",
    "ak",
)
_TOWN_SUFFIXES = ("ford", "ton", "vale", "mere", "by", "wick", "holm", "stead")
_FIRST_NAMES = (
    "Ada",
    "Bruno",
    "Chen",
    "Dara",
    "Elif",
    "Femi",
    "Greta",
    "Hugo",
    "Ines",
    "Jonah",
    "Kenji",
    "Lena",
    "Milo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tove",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
)
_COLORS = ("red", "blue", "green", "yellow", "grey", "white", "black", "orange", "purple", "silver")
_MATERIALS = ("brass", "oak", "copper", "glass", "iron", "clay", "pine", "tin", "stone", "bamboo", "steel")
_KINDS = {
    "lantern": "gives light at night",
    "compass": "points to the north",
    "kettle": "boils water for tea",
    "loom": "weaves cloth from thread",
    "clock": "keeps the time",
    "flute": "plays soft music",
    "pump": "lifts water from a well",
    "telescope": "shows distant stars",
    "bell": "rings at noon",
    "kite": "flies on windy days",
    "scale": "weighs grain at the market",
    "mill": "grinds wheat into flour",
}
_JOBS = (
    "baker",
    "teacher",
    "sailor",
    "farmer",
    "painter",
    "clockmaker",
    "doctor",
    "miller",
    "weaver",
    "cook",
)
_RIVERS = ("Amber", "Slow", "Cold", "Narrow", "Bright", "Winding")
_FRUITS = ("apples", "pears", "plums", "lemons", "figs", "oranges", "cherries")
_TOOLS = ("a rope", "a map", "a torch", "bread", "a blanket", "a knife", "a cup", "a notebook", "boots")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Town:
    """A made-up town."""

    name: str
    river: str
    population: int
    founded: int


@dataclass(frozen=True)
class Person:
    """A made-up person living in a town."""

    name: str
    job: str
    age: int
    town: Town


@dataclass(frozen=True)
class Thing:
    """A made-up named object with fixed attributes."""

    name: str
    kind: str
    color: str
    material: str
    grams: int
    price: int
    year: int
    town: Town
    maker: Person


@dataclass(frozen=True)
class World:
    """The fixed catalogue every generated document draws facts from."""

    towns: tuple[Town, ...]
    people: tuple[Person, ...]
    things: tuple[Thing, ...]


def _coined_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _unique_names(rng: random.Random, count: int, make: Callable[[], str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = make()
        if name not in names:
            names.append(name)
    return names


@cache
def build_world(seed: int = WORLD_SEED) -> World:
    """Create the deterministic catalogue of towns, people and objects."""
    rng = random.Random(seed)
    town_names = _unique_names(rng, 16, lambda: _coined_name(rng, 2) + rng.choice(_TOWN_SUFFIXES))
    towns = tuple(
        Town(name, rng.choice(_RIVERS), rng.randrange(300, 90000, 10), rng.randrange(1100, 1900)) for name in town_names
    )
    people_names = _unique_names(rng, 32, lambda: f"{rng.choice(_FIRST_NAMES)} {_coined_name(rng, 2)}")
    people = tuple(Person(name, rng.choice(_JOBS), rng.randrange(18, 90), rng.choice(towns)) for name in people_names)
    thing_names = _unique_names(rng, 64, lambda: _coined_name(rng, rng.choice((2, 3))))
    things = tuple(
        Thing(
            name=name,
            kind=rng.choice(sorted(_KINDS)),
            color=rng.choice(_COLORS),
            material=rng.choice(_MATERIALS),
            grams=rng.randrange(40, 5000, 5),
            price=rng.randrange(2, 400),
            year=rng.randrange(1400, 2000),
            town=rng.choice(towns),
            maker=rng.choice(people),
        )
        for name in thing_names
    )
    return World(towns, people, things)


def _number(rng: random.Random, value: int) -> str:
    if 0 <= value < len(_NUMBER_WORDS) and rng.random() < 0.5:
        return _NUMBER_WORDS[value]
    return str(value)


def _thing_facts(rng: random.Random, world: World) -> str:
    t = rng.choice(world.things)
    facts = [
        f"The {t.name} is a {t.color} {t.kind} made of {t.material}.",
        f"It weighs {t.grams} grams.",
        f"It was built in {t.town.name} in the year {t.year}.",
        f"Its maker, {t.maker.name}, was a {t.maker.job} from {t.maker.town.name}.",
        f"Like every {t.kind}, it {_KINDS[t.kind]}.",
        f"Today it sells for {t.price} coins.",
        f"People in {t.town.name} say the {t.name} is older than the bridge over the {t.town.river} river.",
    ]
    head, rest = facts[0], facts[1:]
    rng.shuffle(rest)
    return " ".join([head, *rest[: rng.randint(2, len(rest))]])


def _comparison(rng: random.Random, world: World) -> str:
    a, b = rng.sample(world.things, 2)
    if rng.random() < 0.5:
        heavy, light = (a, b) if a.grams >= b.grams else (b, a)
        return (
            f"The {a.name} weighs {a.grams} grams and the {b.name} weighs {b.grams} grams. "
            f"So the {heavy.name} is heavier, by {heavy.grams - light.grams} grams."
        )
    old, new = (a, b) if a.year <= b.year else (b, a)
    return (
        f"The {a.name} was built in {a.year}, and the {b.name} was built in {b.year}. "
        f"The {old.name} is the older of the two; it is {new.year - old.year} years older."
    )


def _arithmetic(rng: random.Random, _: World) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randint(0, 99), rng.randint(1, 12)
        lines.append(
            rng.choice(
                (
                    f"{x} plus {y} equals {x + y}.",
                    f"{x} minus {y} equals {x - y}.",
                    f"{x} times {y} is {x * y}.",
                    f"{x * y} divided by {y} is {x}.",
                    f"Double {x} is {2 * x}, and half of {2 * x} is {x}.",
                    f"The sum of {x}, {y} and {x + y} is {2 * (x + y)}.",
                    f"{x} is {'greater than' if x > y else 'less than' if x < y else 'equal to'} {y}.",
                )
            )
        )
    return " ".join(lines)


def _word_problem(rng: random.Random, world: World) -> str:
    p = rng.choice(world.people)
    fruit = rng.choice(_FRUITS)
    have, buy, eat = rng.randint(2, 20), rng.randint(1, 15), rng.randint(0, 5)
    total = have + buy - eat
    return (
        f"{p.name} has {_number(rng, have)} {fruit}. At the market in {p.town.name}, "
        f"{p.name} buys {_number(rng, buy)} more and eats {_number(rng, eat)}. "
        f"How many {fruit} are left? {have} + {buy} - {eat} = {total}. "
        f"{p.name} has {total} {fruit} left."
    )


def _ranked_list(rng: random.Random, world: World) -> str:
    chosen = rng.sample(world.things, rng.randint(3, 6))
    ranked = sorted(chosen, key=lambda t: t.grams, reverse=True)
    lines = [f"{i}. {t.name} ({t.kind}, {t.grams} g)" for i, t in enumerate(ranked, 1)]
    return "Objects sorted from heaviest to lightest:\n" + "\n".join(lines)


def _packing_list(rng: random.Random, world: World) -> str:
    p, town = rng.choice(world.people), rng.choice(world.towns)
    items = rng.sample(_TOOLS, rng.randint(3, 6))
    bullets = "\n".join(f"- {item}" for item in items)
    return (
        f"Before walking to {town.name}, {p.name} packed:\n{bullets}\n"
        f"That is {_number(rng, len(items))} things in total."
    )


def _how_to(rng: random.Random, world: World) -> str:
    t = rng.choice(world.things)
    steps = [
        f"Take the {t.name} down from its shelf.",
        f"Wipe the {t.material} with a dry cloth.",
        f"Check that the {t.kind} still {_KINDS[t.kind]}.",
        "Write the date in the notebook.",
        "Put it back where it belongs.",
    ]
    body = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps[: rng.randint(3, 5)], 1))
    return f"How to look after the {t.name}\n{body}"


def _dialogue(rng: random.Random, world: World) -> str:
    seller, buyer = rng.sample(world.people, 2)
    t = rng.choice(world.things)
    count = rng.randint(2, 4)
    return "\n".join(
        (
            f"{buyer.name}: Good morning. How much is the {t.kind} called the {t.name}?",
            f"{seller.name}: It costs {t.price} coins. It is made of {t.material}.",
            f"{buyer.name}: I would like {_number(rng, count)} of them, please.",
            f"{seller.name}: That makes {count * t.price} coins.",
            f"{buyer.name}: Here you are. Thank you!",
        )
    )


def _question_answer(rng: random.Random, world: World) -> tuple[str, str]:
    t, p, town = rng.choice(world.things), rng.choice(world.people), rng.choice(world.towns)
    x, y = rng.randint(2, 30), rng.randint(2, 12)
    return rng.choice(
        (
            (f"What is the {t.name} made of?", f"The {t.name} is made of {t.material}."),
            (f"What colour is the {t.name}?", f"The {t.name} is {t.color}."),
            (f"How heavy is the {t.name}?", f"The {t.name} weighs {t.grams} grams."),
            (f"Who made the {t.name}?", f"The {t.name} was made by {t.maker.name}, a {t.maker.job}."),
            (f"What does the {t.name} do?", f"The {t.name} is a {t.kind}, so it {_KINDS[t.kind]}."),
            (f"Where does {p.name} live?", f"{p.name} lives in {p.town.name} and works as a {p.job}."),
            (f"How old is {p.name}?", f"{p.name} is {p.age} years old."),
            (f"Which river flows through {town.name}?", f"The {town.river} river flows through {town.name}."),
            (f"What is {x} times {y}?", f"{x} times {y} is {x * y}."),
            (f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."),
        )
    )


def _interview(rng: random.Random, world: World) -> str:
    pairs = [_question_answer(rng, world) for _ in range(rng.randint(2, 4))]
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)


def _story(rng: random.Random, world: World) -> str:
    p, t = rng.choice(world.people), rng.choice(world.things)
    tool = rng.choice(_TOOLS)
    hours = rng.randint(2, 9)
    return (
        f"{p.name} was a {p.job} in {p.town.name}. One morning, {p.name} heard that the {t.name} "
        f"had gone missing from {t.town.name}. Taking {tool}, {p.name} walked for "
        f"{_number(rng, hours)} hours along the {t.town.river} river. "
        f"At sunset the {t.color} {t.kind} was found under an old cart. "
        f"Everyone in {t.town.name} agreed that the {t.name} had never looked better."
    )


def _town_profile(rng: random.Random, world: World) -> str:
    town = rng.choice(world.towns)
    locals_ = [p.name for p in world.people if p.town == town]
    made = [t.name for t in world.things if t.town == town]
    parts = [
        (
            f"{town.name} is a town on the {town.river} river. It was founded in {town.founded} "
            f"and has {town.population} people."
        )
    ]
    if locals_:
        parts.append(f"Residents we know of: {', '.join(locals_)}.")
    if made:
        parts.append(f"Objects built there include the {', the '.join(made)}.")
    return " ".join(parts)


def _record_card(rng: random.Random, world: World) -> str:
    t = rng.choice(world.things)
    fields = (
        ("name", t.name),
        ("kind", t.kind),
        ("color", t.color),
        ("material", t.material),
        ("weight_g", str(t.grams)),
        ("year", str(t.year)),
        ("town", t.town.name),
    )
    return "\n".join(f"{key}: {value}" for key, value in fields[: rng.randint(4, len(fields))])


def _code(rng: random.Random, world: World) -> str:
    things = rng.sample(world.things, rng.randint(2, 4))
    factor = rng.randint(2, 9)
    name = rng.choice(("scale", "grow", "repeat", "boost"))
    arg = rng.randint(1, 20)
    snippets = (
        "weights = {\n"
        + "".join(f'    "{t.name}": {t.grams},\n' for t in things)
        + "}\n"
        + f"print(sum(weights.values()))  # {sum(t.grams for t in things)}",
        f"def {name}(x):\n    return x * {factor}\n\n\nprint({name}({arg}))  # {arg * factor}",
        f"total = 0\nfor n in range({arg}):\n    total += n\nprint(total)  # {sum(range(arg))}",
        (f"prices = [{', '.join(str(t.price) for t in things)}]\nprint(max(prices))  # {max(t.price for t in things)}"),
    )
    return rng.choice(snippets)


_GENERATORS: tuple[Callable[[random.Random, World], str], ...] = (
    _thing_facts,
    _comparison,
    _arithmetic,
    _word_problem,
    _ranked_list,
    _packing_list,
    _how_to,
    _dialogue,
    _interview,
    _story,
    _town_profile,
    _record_card,
    _code,
)


def generate_document(seed: str) -> str:
    """One short generated document, fully determined by ``seed``."""
    rng = random.Random(seed)
    return rng.choice(_GENERATORS)(rng, build_world())


def _generated_record(seed: str, max_chars: int = MAX_RECORD_CHARS) -> str:
    """At least two generated documents joined into a record of about ``max_chars`` characters at most."""
    rng = random.Random(seed)
    target = rng.randint(max_chars // 3, max_chars)
    parts: list[str] = []
    for i in range(64):
        doc = generate_document(f"{seed}/{i}")
        if len(parts) >= 2 and sum(len(p) + 2 for p in parts) + len(doc) > target:
            break
        parts.append(doc)
    return "\n\n".join(parts)


def heldout_topics() -> list[str]:
    """Pydoc topics reserved for the held-out set; their paragraphs never reach training or calibration."""
    return [name for name in HELDOUT_TOPICS if name in _pydoc_topics()]


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _pack(paragraphs: list[str], max_chars: int = MAX_RECORD_CHARS) -> list[str]:
    """Pack paragraphs (hard-split when too long) into chunks of at most ``max_chars``."""
    chunks: list[str] = []
    current = ""
    for para in paragraphs:
        for piece in (para[i : i + max_chars] for i in range(0, len(para), max_chars)):
            if current and len(current) + 2 + len(piece) > max_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def pydoc_chunks(heldout: bool) -> list[str]:
    """Chunks of the held-out topics, or of the other topics minus any paragraph the held-out ones contain.

    Topics quote each other (``compound`` repeats ``while``, ...), so exclusion works per paragraph.
    """
    topics = _pydoc_topics()
    reserved = heldout_topics()
    if heldout:
        return [chunk for name in reserved for chunk in _pack(_paragraphs(topics[name]))]
    held = {p for name in reserved for p in _paragraphs(topics[name])}
    return [
        chunk
        for name in sorted(set(topics) - set(reserved))
        for chunk in _pack([p for p in _paragraphs(topics[name]) if p not in held])
    ]


def render_chatml(messages: Iterable[dict[str, str]]) -> str:
    """Render messages in the ChatML layout used by the demo tokenizer's chat template."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def chat_messages(seed: str) -> list[dict[str, str]]:
    """A one- or two-turn user/assistant exchange about the made-up world."""
    rng = random.Random(seed)
    world = build_world()
    messages: list[dict[str, str]] = []
    for _ in range(rng.choice((1, 1, 2))):
        question, answer = _question_answer(rng, world)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def training_texts(documents: int = TRAIN_DOCUMENTS) -> list[str]:
    """Training documents: generated records, ChatML exchanges and non-held-out pydoc topics."""
    generated = [_generated_record(f"train:{i}") for i in range(documents)]
    chats = [render_chatml(chat_messages(f"train-chat:{i}")) for i in range(documents // 8)]
    return generated + chats + pydoc_chunks(heldout=False)


def _mixed_records(split: str, count: int, heldout: bool) -> list[dict[str, str]]:
    rng = random.Random(f"{split}:mix")
    n_pydoc = count // PYDOC_SHARE
    texts = rng.sample(pydoc_chunks(heldout=heldout), n_pydoc)
    texts += [_generated_record(f"{split}:{i}") for i in range(count - n_pydoc)]
    rng.shuffle(texts)
    return [{"text": text} for text in texts]


def calibration_records(count: int = CALIBRATION_RECORDS) -> list[dict[str, str]]:
    """Calibration records ``{"text": ...}`` (generated text plus non-held-out pydoc chunks)."""
    return _mixed_records("calibration", count, heldout=False)


def heldout_records(count: int = HELDOUT_RECORDS) -> list[dict[str, str]]:
    """Evaluation records disjoint from calibration (other seeds, reserved pydoc topics)."""
    records = _mixed_records("heldout", count, heldout=True)
    overlap = {r["text"] for r in records} & {r["text"] for r in calibration_records()}
    if overlap:
        raise RuntimeError(f"held-out set overlaps calibration in {len(overlap)} records")
    return records


def chat_records(count: int = CHAT_RECORDS) -> list[dict[str, list[dict[str, str]]]]:
    """Chat records ``{"messages": [...]}`` for chat-template tests."""
    return [{"messages": chat_messages(f"chat:{i}")} for i in range(count)]


def corpus_fingerprint() -> str:
    """Hash identifying the corpus: generator version plus the bundled pydoc topics."""
    digest = hashlib.sha256(f"corpus-v{CORPUS_VERSION}:{WORLD_SEED}".encode())
    digest.update(json.dumps(_pydoc_topics(), sort_keys=True).encode())
    return digest.hexdigest()


def _write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_demo_sets(out_dir: Path) -> list[Path]:
    """Write the calibration, held-out and chat JSONL files into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _write_jsonl(out_dir / CALIBRATION_FILE, calibration_records()),
        _write_jsonl(out_dir / HELDOUT_FILE, heldout_records()),
        _write_jsonl(out_dir / CHAT_FILE, chat_records()),
    ]


def main(argv: list[str] | None = None) -> None:
    """CLI: write the demo data sets, or print a sample of training text."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the JSONL sets into DIR")
    parser.add_argument("--sample", type=int, default=0, metavar="N", help="print N training documents")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_demo_sets(args.write):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    for i in range(args.sample):
        print(_generated_record(f"train:{i}"), end="\n\n---\n\n")


if __name__ == "__main__":
    main()
