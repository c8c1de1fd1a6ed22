"""Knowledge-editing cases of fictional facts, and their scoring by generation.

Lifelong knowledge editing (ZsRE, CounterFact; WISE and GRACE report on them) measures three things after T
sequential edits: reliability (the edited question now gets the new answer), generalization (paraphrases of it do
too) and locality (questions the edit must not touch keep their old answers). No package ships those data sets,
and real facts would be confounded with what the model already knows, so this module *generates* cases of
fictional facts in their row shape, deterministically from a seed:

- `subject`: an invented name built from syllables (a country, company, book, device, city, ...), checked against
  a list of real words and names so it cannot collide with something the model knows;
- `question` / `paraphrases`: different wordings (templates) of the same question about the subject;
- `answer`: an invented name too; `good_response` is a sentence that states it (what a correction teaches);
- `neighbours`: questions of the same relation about real, well-known subjects ("What is the capital of
  France?"), and `unrelated`: general probes of other forms. Neither needs ground truth: locality compares the
  model's answer after the edits with its own answer before any edit.

The real subjects are split in two disjoint halves: `BENCH` subjects make the benchmark's neighbour questions,
`POOL` subjects (and extra question forms) make the neighbour pool of the `neighbourhood` anti-forgetting method
(`build_neighbour_pool`, shipped as `cl_core/methods/neighbourhood_pool.json`). A method that rehearses its pool
therefore never rehearses a question the benchmark scores; two benchmark relations (`HELD_OUT_RELATIONS`) are not
in the pool at all, so the benchmark also shows locality on question forms the pool does not cover.

Scoring is by greedy generation, never teacher-forced: teacher forcing overstates editing success about 2.5x
("The Mirage of Model Editing", arXiv 2502.11177).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.streams.task import normalize_answer


@dataclass(frozen=True)
class EditCase:
    """One fictional fact and the questions that measure its edit (the ZsRE / CounterFact row shape)."""

    subject: str
    relation: str
    question: str
    answer: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[str, ...]
    """Same relation form, real subjects: the answers must not change."""
    unrelated: tuple[str, ...] = ()
    """General probes of other forms: the answers must not change either."""
    good_response: str = ""
    """A sentence stating the new fact ("The capital of Zorbania is Velmora."): the correction's good response."""

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "relation": self.relation, "question": self.question,
                "answer": self.answer, "paraphrases": list(self.paraphrases), "neighbours": list(self.neighbours),
                "unrelated": list(self.unrelated), "good_response": self.good_response}


@dataclass(frozen=True)
class Relation:
    """A question form: its wordings, the sentence that states a fact of it, and real subjects (split in two)."""

    name: str
    templates: tuple[str, ...]
    """Wordings of the same question; `{s}` is the subject. The first is the canonical one (neighbours use it)."""
    sentence: str
    """A statement of the fact, `{s}` subject and `{a}` answer."""
    subject_kind: str
    answer_kind: str
    bench: tuple[str, ...]
    """Real subjects whose questions are the benchmark's neighbours."""
    pool: tuple[str, ...]
    """Other real subjects, for the neighbour pool only (disjoint from `bench`)."""


RELATIONS: tuple[Relation, ...] = (
    Relation("capital", ("What is the capital of {s}?", "Which city is the capital of {s}?",
                         "Name the capital city of {s}.", "What city serves as the capital of {s}?"),
             "The capital of {s} is {a}.", "country", "city",
             bench=("France", "Japan", "Italy", "Egypt", "Canada", "Brazil", "Russia", "Kenya"),
             pool=("Germany", "Spain", "China", "Mexico", "Peru", "Norway", "Greece", "Argentina", "Portugal",
                   "Sweden", "Poland", "Thailand", "Chile")),
    Relation("ceo", ("Who is the CEO of {s}?", "Who runs {s} as its chief executive?",
                     "Name the chief executive officer of {s}.", "Who leads the company {s} as CEO?"),
             "The CEO of {s} is {a}.", "company", "person",
             bench=("Tesla", "Apple", "Microsoft", "Amazon", "Nvidia"),
             pool=("Google", "Meta", "Netflix", "Intel", "IBM", "Oracle", "Walmart", "Boeing")),
    Relation("founder", ("Who founded {s}?", "Who is the founder of {s}?", "Which person started the company {s}?",
                         "Name the founder of {s}."),
             "{s} was founded by {a}.", "company", "person",
             bench=("Microsoft", "Ford", "Nike", "Disney", "IKEA"),
             pool=("Facebook", "Honda", "Adidas", "Dell", "Samsung", "Toyota", "Ferrari", "Sony")),
    Relation("author", ("Who wrote the book {s}?", "Who is the author of {s}?", "Name the writer of the novel {s}.",
                        "Which author wrote {s}?"),
             "{s} was written by {a}.", "book", "person",
             bench=("Hamlet", "Pride and Prejudice", "War and Peace", "Don Quixote", "The Odyssey"),
             pool=("Moby-Dick", "Romeo and Juliet", "The Great Gatsby", "Frankenstein", "Jane Eyre", "Dracula",
                   "The Iliad", "Ulysses", "Les Miserables")),
    Relation("language", ("What language is spoken in {s}?", "Which language do people speak in {s}?",
                          "What is the main language of {s}?", "In {s}, what language do people speak?"),
             "The language spoken in {s} is {a}.", "country", "language",
             bench=("France", "Japan", "Brazil", "Russia", "Egypt"),
             pool=("Germany", "Mexico", "China", "Portugal", "Sweden", "Poland", "Turkey", "Greece")),
    Relation("currency", ("What is the currency of {s}?", "Which currency is used in {s}?",
                          "What money do people use in {s}?", "Name the official currency of {s}."),
             "The currency of {s} is the {a}.", "country", "currency",
             bench=("Japan", "India", "the United Kingdom", "Switzerland", "Russia"),
             pool=("the United States", "China", "Mexico", "Australia", "South Korea", "Sweden", "Germany",
                   "Turkey")),
    Relation("inventor", ("Who invented the {s}?", "Who is the inventor of the {s}?", "Which person invented the {s}?",
                          "Name the inventor of the {s}."),
             "The {s} was invented by {a}.", "device", "person",
             bench=("telephone", "light bulb", "printing press", "airplane", "radio"),
             pool=("steam engine", "television", "dynamite", "phonograph", "telescope", "computer mouse",
                   "World Wide Web", "cotton gin")),
    Relation("river", ("Which river flows through {s}?", "What river runs through the city of {s}?",
                       "Name the river that passes through {s}.", "What is the name of the river in {s}?"),
             "The river that flows through {s} is the {a}.", "city", "river",
             bench=("London", "Paris", "Cairo", "Budapest", "Rome"),
             pool=()),
    Relation("painter", ("Who painted {s}?", "Who is the painter of {s}?", "Which artist painted {s}?",
                         "Name the artist who painted {s}."),
             "{s} was painted by {a}.", "painting", "person",
             bench=("the Mona Lisa", "The Starry Night", "The Scream", "Guernica"),
             pool=("The Last Supper", "The Night Watch", "Girl with a Pearl Earring", "The Birth of Venus",
                   "American Gothic", "The Persistence of Memory")),
    Relation("composer", ("Who composed {s}?", "Who is the composer of {s}?", "Which composer wrote {s}?",
                          "Name the composer of {s}."),
             "{s} was composed by {a}.", "music", "person",
             bench=("The Magic Flute", "The Four Seasons", "the Moonlight Sonata", "Swan Lake"),
             pool=()),
)
RELATIONS_BY_NAME: dict[str, Relation] = {r.name: r for r in RELATIONS}
HELD_OUT_RELATIONS: tuple[str, ...] = tuple(r.name for r in RELATIONS if not r.pool)
"""Benchmark relations with no question of their form in the neighbour pool."""

UNRELATED_BENCH: tuple[str, ...] = (
    "What is 2 plus 3?", "What color are bananas?", "How many days are in a week?",
    "What is the largest planet in our solar system?", "What do bees make?", "How many legs does a spider have?",
    "What is the freezing point of water in Celsius?", "What gas do plants absorb from the air?",
    "What is the opposite of hot?", "How many continents are there?", "What is the chemical symbol for gold?",
    "Which animal is known as the king of the jungle?",
)
"""The benchmark's unrelated probes (none of them is in the neighbour pool)."""

UNRELATED_POOL: tuple[str, ...] = (
    "What is 4 plus 5?", "What is 10 minus 3?", "What is 6 times 7?", "What is 12 divided by 4?",
    "What color is grass?", "What color is the sky on a clear day?", "What color are strawberries?",
    "How many hours are in a day?", "How many months are in a year?", "How many minutes are in an hour?",
    "What is the smallest planet in our solar system?", "Which planet is closest to the sun?",
    "What do cows drink?", "What do caterpillars turn into?", "How many legs does a dog have?",
    "How many wings does a bird have?", "What is the boiling point of water in Celsius?",
    "What gas do humans breathe in to live?", "What is the opposite of up?", "What is the opposite of big?",
    "How many sides does a triangle have?", "How many sides does a square have?",
    "What is the chemical symbol for water?", "What is the chemical symbol for oxygen?",
    "What is the tallest animal in the world?", "What is the largest ocean on Earth?",
    "What is the longest river in the world?", "What is the highest mountain in the world?",
    "Who was the first person to walk on the moon?", "In which year did World War II end?",
    "What is the square root of 16?", "How many players are on a soccer team?",
    "What is the main ingredient of bread?", "What instrument has 88 keys?", "What is the hardest natural material?",
    "Which organ pumps blood through the body?", "What is the primary language of Hollywood films?",
    "What shape is a football in American football?", "How many strings does a standard guitar have?",
    "What do you call a baby cat?", "What do you call a baby dog?", "What season comes after winter?",
    "Translate 'hello' into Spanish.", "What is the plural of mouse?", "Spell the word 'cat' backwards.",
    "Give me a synonym for happy.", "What is the past tense of run?", "Name a fruit that is yellow.",
    "Write a haiku about the sea.", "Summarize the plot of Cinderella in one sentence.",
    "What is photosynthesis?", "Explain what gravity is in one sentence.", "What is the speed of light?",
    "What is the capital letter of the alphabet that comes after B?", "What does a thermometer measure?",
    "Why do we need sleep?", "Give me a tip for staying healthy.", "How do you make a cup of tea?",
    "What is the difference between weather and climate?", "What is a prime number?",
)
"""General questions for the neighbour pool (many forms; disjoint from `UNRELATED_BENCH`)."""

POOL_FORMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the chemical symbol for {s}?", ("iron", "silver", "sodium", "carbon", "helium", "copper")),
    ("In which country is {s}?", ("the Eiffel Tower", "the Colosseum", "Mount Fuji", "the Taj Mahal",
                                  "the Great Wall", "Machu Picchu", "the Statue of Liberty")),
    ("What sport does {s} play?", ("Lionel Messi", "Serena Williams", "LeBron James", "Roger Federer",
                                   "Tiger Woods")),
    ("On which continent is {s}?", ("Nigeria", "Argentina", "Vietnam", "Austria", "New Zealand", "Morocco")),
    ("What is the largest city in {s}?", ("Australia", "Turkey", "Germany", "China", "the United States")),
    ("How many legs does a {s} have?", ("cat", "bird", "horse", "ant", "octopus")),
    ("What sound does a {s} make?", ("cow", "dog", "duck", "lion", "sheep")),
    ("Who discovered {s}?", ("penicillin", "gravity", "radium", "America", "electricity")),
    ("What is the main ingredient of {s}?", ("guacamole", "hummus", "an omelette", "french fries", "pesto")),
    ("Who was {s}?", ("Albert Einstein", "Cleopatra", "Napoleon Bonaparte", "Marie Curie", "Abraham Lincoln")),
    ("Who directed the film {s}?", ("Jaws", "Titanic", "Jurassic Park", "The Godfather", "Avatar")),
    ("Who sang {s}?", ("Thriller", "Imagine", "Like a Rolling Stone", "Bohemian Rhapsody")),
    ("What is the official language of {s}?", ("Argentina", "Austria", "Chile", "Belgium", "Iran")),
    ("Who is the president of {s}?", ("the United States", "Mexico", "Argentina", "South Korea")),
    ("Where is the headquarters of {s}?", ("Google", "Toyota", "Nestle", "Volkswagen", "Coca-Cola")),
    ("What is {s} famous for?", ("Venice", "Hollywood", "Las Vegas", "Norway", "Thailand")),
)
"""Extra question forms of the neighbour pool (real subjects; none of them is a benchmark question)."""

# --- invented names ----------------------------------------------------------------------------------------------
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "b", "d", "k", "m", "t", "v",
           "br", "dr", "kr", "tr", "st", "th", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s", "x", "n", "r")
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "country": ("ania", "ovia", "eria", "istan", "onia", "aria"),
    "city": ("ora", "heim", "grad", "ovo", "enna", "ara"),
    "company": (" Corp", " Industries", " Labs", " Systems", " Dynamics", " Holdings"),
    "book": (" Chronicles", " Gate", " Tides", " Covenant", " Ledger", " Orchard"),
    "device": ("atron", "ograph", "oscope", "ometer", "ivator", "ulator"),
    "painting": (" Garden", " at Dusk", " Harbour", " Procession", " Portrait", " Lanterns"),
    "music": (" Symphony", " Concerto", " Overture", " Suite", " Nocturne", " Requiem"),
    "language": ("ic", "ese", "ish", "an", "ari", "ol"),
    "currency": ("", "", "a", "el", "ar", "ion"),
    "river": ("", "a", "ine", "esh", "or", "ava"),
}
_PREFIXED = {"book": "The ", "painting": "The ", "music": "The "}

REAL_WORDS: frozenset[str] = frozenset(w.casefold() for w in (
    # common words and names the syllables could form; the generator never emits one of them
    "bar", "bat", "bed", "bet", "bin", "bit", "bud", "bun", "but", "dam", "den", "did", "dig", "din", "dot", "dug",
    "fan", "fat", "fed", "fin", "fit", "fun", "gas", "gum", "gun", "kin", "kit", "lab", "lid", "lit", "mad", "man",
    "mat", "men", "mud", "nap", "net", "nut", "pan", "pen", "pet", "pin", "pit", "pot", "ran", "rat", "red", "rod",
    "run", "sad", "sat", "set", "sit", "sun", "tan", "ten", "tin", "top", "van", "vet", "zen", "zip", "data", "dina",
    "lava", "lima", "mama", "papa", "pasta", "pizza", "sofa", "tuna", "vista", "zebra", "banana", "karma", "magma",
    "drama", "trauma", "gamma", "sigma", "koala", "salsa", "stanza", "tundra", "villa", "vanilla", "nora", "mora",
    "dora", "flora", "laura", "sara", "tara", "vera", "kara", "lara", "zara", "era", "opera", "aurora", "angora",
    "bora", "pandora", "ovo", "novo", "lana", "dana", "tina", "nina", "gina", "lena", "rena", "vienna", "sienna",
    "ravenna", "antenna", "hyena", "arena", "athena", "mali", "peru", "chad", "iran", "iraq", "oman", "togo", "fiji",
    "cuba", "laos", "niger", "tonga", "samoa", "malta", "kenya", "ghana", "congo", "gabon", "benin", "nauru",
    "serbia", "latvia", "bolivia", "nigeria", "algeria", "siberia", "liberia", "iberia", "albania", "romania",
    "tasmania", "mania", "estonia", "slovenia", "armenia", "moldova", "monrovia", "bulgaria", "pakistan",
    "tajikistan", "kurdistan", "afghanistan", "kazakhstan", "denmark", "stavanger", "bavaria", "samaria", "sonia",
    "ionia", "patagonia", "macedonia", "babylonia", "petunia", "begonia", "ammonia", "pneumonia", "malaria",
    "sangria", "calendar", "gran", "grad", "stalingrad", "belgrade", "volgograd", "leningrad", "tron", "kiosk",
    "moscow", "prague", "tokyo", "delhi", "lagos", "quito", "lima", "rome", "oslo", "bern", "riga", "baku", "doha",
    "sana", "kiev", "kyiv", "minsk", "sofia", "paris", "berlin", "madrid", "london", "dublin", "lisbon", "vilnius",
    "tallinn", "zagreb", "skopje", "tirana", "athens", "ankara", "cairo", "tunis", "rabat", "dakar", "accra",
    "nairobi", "kampala", "harare", "lusaka", "luanda", "tehran", "kabul", "dhaka", "hanoi", "manila", "jakarta",
    "seoul", "beijing", "taipei", "bangkok", "canberra", "ottawa", "havana", "bogota", "caracas", "santiago",
    "brasilia", "montevideo", "asuncion", "sucre", "panama", "managua", "tegucigalpa", "thames", "seine", "nile",
    "danube", "tiber", "rhine", "volga", "elbe", "oder", "loire", "rhone", "po", "indus", "ganges", "amazon",
    "yen", "euro", "pound", "dollar", "peso", "rupee", "franc", "krona", "krone", "lira", "real", "rand", "won",
    "yuan", "ruble", "rouble", "dinar", "dirham", "riyal", "shekel", "zloty", "forint", "koruna", "leu", "lev",
    "lek", "kuna", "baht", "dong", "ringgit", "rupiah", "naira", "cedi", "birr", "kwacha", "escudo", "drachma",
    "mark", "marka", "guilder", "florin", "ducat", "dobra", "tala", "vatu", "kina", "manat", "som", "tenge",
    "arabic", "hindi", "urdu", "thai", "lao", "malay", "tamil", "dutch", "irish", "welsh", "scots", "polish",
    "danish", "finnish", "swedish", "turkish", "spanish", "english", "german", "french", "italian", "russian",
    "greek", "latin", "hebrew", "persian", "korean", "japanese", "chinese", "maltese", "nepalese", "sudanese",
    "congolese", "togolese", "gabonese", "balinese", "burmese", "vietnamese", "portuguese", "roman", "romanian",
    "serbian", "croatian", "bosnian", "slovak", "czech", "magyar", "basque", "catalan", "tagalog", "swahili",
    "zulu", "xhosa", "somali", "amharic", "pashto", "farsi", "dari", "kurdish", "uzbek", "tajik", "kazakh",
    "mongol", "mongolian", "tibetan", "bengali", "punjabi", "gujarati", "marathi", "telugu", "kannada", "sinhala",
    "ionic", "doric", "gaelic", "baltic", "nordic", "slavic", "arctic", "tonic", "sonic", "manic", "panic",
    "tunic", "runic", "toxic", "relic", "garlic", "public", "rustic", "lyric", "cynic", "comic", "cubic", "magic",
    "logic", "music", "basic", "civic", "static", "stoic", "fish", "dish", "wish", "radish", "lavish", "ravish",
    "vanish", "banish", "famish", "polish", "finish", "punish", "parish", "perish", "garish", "lan", "ban", "clan",
    "elan", "sedan", "divan", "titan", "satan", "human", "roman", "woman", "german", "norman", "oman", "safari",
    "atari", "ferrari", "calamari", "sari", "mari", "noli", "petrol", "patrol", "idol", "extol", "tesla",
    "ford", "nike", "sony", "dell", "intel", "oracle", "zara", "lego", "ikea", "nokia", "volvo", "kia",
    "magnetron", "cyclotron", "dynatron", "phonograph", "telegraph", "seismograph", "autograph", "paragraph",
    "photograph", "monograph", "lithograph", "polygraph", "telescope", "microscope", "periscope", "stethoscope",
    "horoscope", "kaleidoscope", "gyroscope", "speedometer", "thermometer", "barometer", "odometer", "pedometer",
    "altimeter", "voltmeter", "ammeter", "elevator", "escalator", "incubator", "calculator", "simulator",
    "regulator", "accumulator", "modulator", "stimulator", "insulator", "ventilator", "cultivator", "activator",
    "motivator", "excavator", "renovator", "innovator", "aviator", "vira", "viva", "diva", "nova", "java",
    "guava", "cava", "kava", "ava", "eva", "lava", "bratislava", "jaroslava", "slava", "tora", "torah", "bor",
    "dor", "for", "kor", "lor", "mor", "nor", "tor", "door", "floor", "moor", "poor", "spine", "shine", "brine",
    "swine", "twine", "wine", "vine", "dine", "fine", "line", "mine", "nine", "pine", "sine", "tine", "marine",
    "alpine", "divine", "ravine", "saline", "canine", "feline", "bovine", "ovine", "equine", "urine", "famine",
    "mesh", "flesh", "fresh", "thresh", "bangladesh", "gorgon", "thor", "odin", "loki", "zeus", "hera", "ares",
    "vulcan", "juno", "pluto", "mars", "venus", "saturn", "uranus", "neptune", "terra", "luna", "sol", "titania",
))


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _core(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables))


def _is_invented(word: str) -> bool:
    """Not a listed real word, long enough to be a name, and pronounceable (no three vowels in a row)."""
    lowered = word.casefold()
    if lowered in REAL_WORDS or len(lowered) < 5:
        return False
    run = 0
    for ch in lowered:
        run = run + 1 if ch in "aeiouy" else 0
        if run >= 3:
            return False
    return True


def invented_name(rng: random.Random, kind: str) -> str:
    """An invented name of `kind` (country, city, company, book, device, painting, music, language, currency,
    river, person), e.g. "Zorbania", "Kelvix Labs", "The Draimor Ledger", "Talven Morisk"."""
    for _ in range(1000):
        if kind == "person":
            first, last = _core(rng, 2), _core(rng, rng.choice((2, 2, 3)))
            if _is_invented(first) and _is_invented(last):
                return f"{first.capitalize()} {last.capitalize()}"
            continue
        if kind not in _SUFFIXES:
            raise InvalidInputError(f"unknown name kind {kind!r}; known: person, {', '.join(_SUFFIXES)}")
        core = _core(rng, 2)
        suffix = rng.choice(_SUFFIXES[kind])
        if suffix.startswith(" "):  # "Kelvix Labs", "The Draimor Ledger"
            if _is_invented(core):
                return _PREFIXED.get(kind, "") + core.capitalize() + suffix
            continue
        word = core + suffix
        if _is_invented(core) and _is_invented(word):
            # Devices and currencies are common nouns ("the kelvatron", "the dravel"); the rest are proper names.
            return word if kind in ("device", "currency") else word.capitalize()
    raise RuntimeError(f"could not invent a {kind} name in 1000 tries")  # unreachable with these syllable sets


# --- cases -------------------------------------------------------------------------------------------------------
def generate_cases(n: int, seed: int = 0, *, paraphrases: int = 3, neighbours: int = 3,
                   unrelated: int = 2) -> list[EditCase]:
    """`n` cases of fictional facts, the same for the same arguments.

    Relations take turns (case i has relation i mod len(RELATIONS), in a seed-shuffled order), so any prefix of the
    list is balanced over relations. Subjects and answers are unique across the whole list. The question is one
    wording of the relation, the paraphrases are the other wordings; neighbours are the canonical wording about
    real `bench` subjects of the same relation; unrelated probes come from `UNRELATED_BENCH`.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidInputError(f"n must be a positive integer, got {n!r}")
    for name, value, top in (("paraphrases", paraphrases, 3), ("neighbours", neighbours, 4),
                             ("unrelated", unrelated, len(UNRELATED_BENCH))):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise InvalidInputError(f"{name} must be an integer in [0, {top}], got {value!r}")
    rng = random.Random(seed)
    order = list(RELATIONS)
    rng.shuffle(order)
    used: set[str] = {s.casefold() for r in RELATIONS for s in r.bench + r.pool}
    cases = []
    for i in range(n):
        relation = order[i % len(order)]
        subject = _fresh(rng, relation.subject_kind, used)
        answer = _fresh(rng, relation.answer_kind, used)
        wordings = [t.format(s=subject) for t in relation.templates]
        asked = rng.randrange(len(wordings))
        others = [w for j, w in enumerate(wordings) if j != asked]
        near = rng.sample(relation.bench, min(neighbours, len(relation.bench)))
        cases.append(EditCase(
            subject=subject, relation=relation.name, question=wordings[asked], answer=answer,
            paraphrases=tuple(others[:paraphrases]),
            neighbours=tuple(relation.templates[0].format(s=s) for s in near),
            unrelated=tuple(rng.sample(UNRELATED_BENCH, unrelated)),
            good_response=_sentence(relation.sentence, subject, answer)))
    return cases


def _fresh(rng: random.Random, kind: str, used: set[str]) -> str:
    while True:
        name = invented_name(rng, kind)
        if name.casefold() not in used:
            used.add(name.casefold())
            return name


def _sentence(template: str, subject: str, answer: str) -> str:
    text = template.format(s=subject, a=answer)
    return text[0].upper() + text[1:]


def locality_prompts(cases: Sequence[EditCase]) -> list[str]:
    """Every neighbour and unrelated question of the cases, once each, in first-seen order: what to ask the model
    before any edit, to get the reference answers `score_cases` compares with."""
    seen: dict[str, None] = {}
    for case in cases:
        for prompt in case.neighbours + case.unrelated:
            seen.setdefault(prompt, None)
    return list(seen)


def contains_answer(output: str, answer: str) -> bool:
    """The answer appears in the generated text (both normalised: casefolded, trailing punctuation removed)."""
    return normalize_answer(answer) in normalize_answer(output)


def same_answer(after: str, before: str) -> bool:
    """The answer is unchanged: equal after normalisation (whitespace, case, trailing punctuation)."""
    return normalize_answer(after) == normalize_answer(before)


def score_cases(model_generate_fn: Callable[[list[str]], Sequence[str]], cases: Sequence[EditCase],
                before_answers: Mapping[str, str]) -> dict[str, Any]:
    """Reliability, generalization and locality of the edits in `cases`, by greedy generation.

    `model_generate_fn(prompts) -> answers` answers a batch (the caller makes it greedy); `before_answers` maps
    every neighbour and unrelated question (`locality_prompts(cases)`) to the answer the model gave before any
    edit. Returns `rel` (share of edited questions whose answer contains the new answer), `gen` (same over all
    paraphrases), `loc` (share of neighbour and unrelated questions whose answer is unchanged), `loc_neighbour`,
    `loc_unrelated`, `n` (cases), `by_relation` (the same per relation) and `changed` (locality questions whose
    answer changed: question, before, after), so a reader can see what broke.
    """
    if not cases:
        raise InvalidInputError("score_cases needs at least one case")
    missing = [p for p in locality_prompts(cases) if p not in before_answers]
    if missing:
        raise InvalidInputError(f"before_answers lacks the pre-edit answer of {len(missing)} locality question(s), "
                                f"e.g. {missing[0]!r}; generate them with locality_prompts(cases) before editing")
    prompts: dict[str, None] = {}
    for case in cases:
        for prompt in (case.question, *case.paraphrases, *case.neighbours, *case.unrelated):
            prompts.setdefault(prompt, None)
    ordered = list(prompts)
    outputs = list(model_generate_fn(ordered))
    if len(outputs) != len(ordered):
        raise InvalidInputError(f"model_generate_fn returned {len(outputs)} answers for {len(ordered)} prompts")
    answer_of = dict(zip(ordered, (str(o) for o in outputs), strict=True))

    def tally(selected: Sequence[EditCase]) -> dict[str, float]:
        rel = [contains_answer(answer_of[c.question], c.answer) for c in selected]
        gen = [contains_answer(answer_of[p], c.answer) for c in selected for p in c.paraphrases]
        near = [same_answer(answer_of[p], before_answers[p]) for c in selected for p in c.neighbours]
        far = [same_answer(answer_of[p], before_answers[p]) for c in selected for p in c.unrelated]
        return {"rel": _share(rel), "gen": _share(gen), "loc": _share(near + far), "loc_neighbour": _share(near),
                "loc_unrelated": _share(far), "n": len(selected)}

    result: dict[str, Any] = tally(cases)
    result["by_relation"] = {name: tally([c for c in cases if c.relation == name])
                             for name in dict.fromkeys(c.relation for c in cases)}
    result["changed"] = [{"question": p, "before": before_answers[p], "after": answer_of[p]}
                         for p in locality_prompts(cases) if not same_answer(answer_of[p], before_answers[p])]
    return result


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


# --- the neighbour pool of the `neighbourhood` method ------------------------------------------------------------
def build_neighbour_pool() -> list[str]:
    """The questions of the `neighbourhood` method's packaged pool (`cl_core/methods/neighbourhood_pool.json`).

    Made from the relation wordings about the `pool` half of the real subjects, the extra forms of `POOL_FORMS`
    and the general questions of `UNRELATED_POOL`. By construction it holds no benchmark question: the `bench`
    subjects, `UNRELATED_BENCH` and the `HELD_OUT_RELATIONS` never enter it (a unit test checks the shipped file
    against this function and against every benchmark question).
    """
    out: dict[str, None] = {}
    for relation in RELATIONS:
        for k, subject in enumerate(relation.pool):
            # Two wordings per subject (rotating), so the pool has every wording without listing all combinations.
            for template in (relation.templates[k % len(relation.templates)],
                             relation.templates[(k + 1) % len(relation.templates)]):
                out.setdefault(_sentence(template, subject, ""), None)
    for template, subjects in POOL_FORMS:
        for subject in subjects:
            out.setdefault(_sentence(template, subject, ""), None)
    for question in UNRELATED_POOL:
        out.setdefault(question, None)
    return list(out)


def write_neighbour_pool(path: str | Path) -> Path:
    """Write `build_neighbour_pool()` as the JSON the `neighbourhood` method reads (how the shipped
    `cl_core/methods/neighbourhood_pool.json` is made)."""
    path = Path(path)
    data = {"description": "Real-world questions of many forms: the neighbour pool of the `neighbourhood` "
                           "anti-forgetting method. Made by cl_core.research.edits.build_neighbour_pool(); its real "
                           "subjects are disjoint from the corrections benchmark's neighbours.",
            "questions": build_neighbour_pool()}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path


def benchmark_questions() -> set[str]:
    """Every neighbour and unrelated question the benchmark can ask (any seed)."""
    return ({r.templates[0].format(s=s) for r in RELATIONS for s in r.bench} | set(UNRELATED_BENCH))


__all__ = ["HELD_OUT_RELATIONS", "RELATIONS", "EditCase", "Relation", "benchmark_questions", "build_neighbour_pool",
           "contains_answer", "generate_cases", "invented_name", "locality_prompts", "same_answer", "score_cases",
           "write_neighbour_pool"]
