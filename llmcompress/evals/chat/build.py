"""Build ``llmcompress/evals/chat/default.jsonl``: the evaluate stage's default chat prompts (``chat: {}``).

Deterministic (fixed seed, no input files): ``python llmcompress/evals/chat/build.py`` rewrites the same file byte
for byte.
Each row is ``{"prompt", "answer", "kind"}``; ``answer`` is a short string that a correct reply contains (matched
case-insensitively as a whole word or number: ``12`` does not match ``123``). Three kinds:

- ``facts``: capitals, chemical symbols, the solar system, authors and artists, everyday science and geography;
- ``arithmetic``: small additions, subtractions and multiplications (generated);
- ``instructions``: repeat a phrase, the opposite of a word, a plural, a common word in French, Spanish or German,
  a word spelled backwards, the next item of a sequence, the end of a proverb.

Written for small instruction-tuned models (SmolLM2-135M answers about half of them within 24 tokens): a flip (right
before compression, wrong after) needs prompts the original answers right. Nothing here comes from the calibration or
training data (``recipes/data/``: Python documentation Q&A). Answers were chosen to be unambiguous: no disputed
capitals, no facts that changed recently, no spellings that vary (Kyiv/Kiev, Dostoevsky), and, except for "repeat"
instructions, the answer never appears in its own prompt (an echo of the question must not count as right).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 15
OUT = Path(__file__).resolve().parent / "default.jsonl"

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
    ("Turkey", "Ankara"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Kenya", "Nairobi"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Venezuela", "Caracas"), ("New Zealand", "Wellington"),
    ("Scotland", "Edinburgh"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Jamaica", "Kingston"),
    ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Uruguay", "Montevideo"), ("Ecuador", "Quito"),
    ("Qatar", "Doha"), ("Malaysia", "Kuala Lumpur"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"), ("Ghana", "Accra"), ("Senegal", "Dakar"),
    ("Zimbabwe", "Harare"), ("Uganda", "Kampala"), ("Switzerland", "Bern"), ("Mexico", "Mexico City"),
    ("Wales", "Cardiff"),
]

SYMBOLS = [
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"),
    ("nitrogen", "N"), ("sodium", "Na"), ("potassium", "K"), ("copper", "Cu"), ("lead", "Pb"), ("tin", "Sn"),
    ("mercury", "Hg"), ("calcium", "Ca"), ("chlorine", "Cl"), ("zinc", "Zn"), ("neon", "Ne"), ("magnesium", "Mg"),
    ("platinum", "Pt"), ("nickel", "Ni"), ("fluorine", "F"), ("phosphorus", "P"), ("argon", "Ar"),
    ("lithium", "Li"),
]

# (question, answer): the solar system, people, places, science and everyday knowledge.
FACTS = [
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is famous for its large, bright rings?", "Saturn"),
    ("Which planet do we live on?", "Earth"),
    ("Which planet is the hottest in the solar system?", "Venus"),
    ("Which planet is the farthest from the Sun?", "Neptune"),
    ("What is the name of Earth's natural satellite?", "Moon"),
    ("What is the star at the centre of our solar system called?", "Sun"),
    ("What is the name of the galaxy that contains our solar system?", "Milky Way"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who wrote the play Hamlet?", "Shakespeare"),
    ("Who wrote the novel Pride and Prejudice?", "Austen"),
    ("Who wrote the novel Nineteen Eighty-Four?", "Orwell"),
    ("Who wrote Animal Farm?", "Orwell"),
    ("Who wrote War and Peace?", "Tolstoy"),
    ("Who wrote Don Quixote?", "Cervantes"),
    ("Who is the ancient Greek poet said to have composed the Odyssey?", "Homer"),
    ("Who wrote the Harry Potter books?", "Rowling"),
    ("Who wrote Oliver Twist?", "Dickens"),
    ("Who wrote A Christmas Carol?", "Dickens"),
    ("Who wrote On the Origin of Species?", "Darwin"),
    ("Who wrote The Adventures of Tom Sawyer?", "Twain"),
    ("Who wrote Moby-Dick?", "Melville"),
    ("Who wrote the novel Frankenstein?", "Shelley"),
    ("Who wrote the novel Dracula?", "Stoker"),
    ("Who wrote The Hobbit?", "Tolkien"),
    ("Who wrote The Lord of the Rings?", "Tolkien"),
    ("Who wrote The Divine Comedy?", "Dante"),
    ("Who wrote The Great Gatsby?", "Fitzgerald"),
    ("Who created the detective Sherlock Holmes?", "Doyle"),
    ("Who wrote Alice's Adventures in Wonderland?", "Carroll"),
    ("Who wrote the novel Les Misérables?", "Hugo"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("Who painted The Starry Night?", "Gogh"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("Who formulated the three laws of motion?", "Newton"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("Who was the first president of the United States?", "Washington"),
    ("Who discovered penicillin?", "Fleming"),
    ("Which scientist won Nobel Prizes in both physics and chemistry for work on radioactivity?", "Curie"),
    ("Who composed the Moonlight Sonata?", "Beethoven"),
    ("Who composed the opera The Magic Flute?", "Mozart"),
    ("Who is credited with inventing the telephone?", "Bell"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is fresh snow?", "white"),
    ("What colour is a ripe banana?", "yellow"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour do you get by mixing red and white?", "pink"),
    ("What gas do plants take in from the air to make their food?", "carbon dioxide"),
    ("Which gas do humans need to breathe in to live?", "oxygen"),
    ("What is H2O more commonly called?", "water"),
    ("What is frozen water called?", "ice"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What is the largest hot desert in the world?", "Sahara"),
    ("What is the largest continent?", "Asia"),
    ("What is the largest country in the world by area?", "Russia"),
    ("What is the fastest land animal?", "cheetah"),
    ("What is the largest animal that has ever lived?", "blue whale"),
    ("What is the tallest animal?", "giraffe"),
    ("Which animal says moo?", "cow"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What sweet food do bees make?", "honey"),
    ("What does a caterpillar turn into?", "butterfly"),
    ("What is a baby cat called?", "kitten"),
    ("What is a baby dog called?", "puppy"),
    ("What is a young sheep called?", "lamb"),
    ("What is the hardest natural substance?", "diamond"),
    ("Which organ pumps blood around the body?", "heart"),
    ("Which organ do humans use to breathe?", "lungs"),
    ("Which organ do we think with?", "brain"),
    ("What is a shape with three sides called?", "triangle"),
    ("What is a shape with four equal sides and four right angles called?", "square"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("What force pulls objects towards the ground?", "gravity"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United States?", "dollar"),
    ("What currency is used in Germany, France and Italy?", "euro"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What language is mainly spoken in Mexico?", "Spanish"),
    ("In which city is the Eiffel Tower?", "Paris"),
    ("In which city is the Statue of Liberty?", "New York"),
    ("In which city is Big Ben?", "London"),
    ("In which city is the Colosseum?", "Rome"),
    ("In which country is the Great Wall?", "China"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which country is the Taj Mahal?", "India"),
    ("In which country do kangaroos live in the wild?", "Australia"),
    ("How many hours are there in a day?", "24"),
    ("How many days are there in a week?", "7"),
    ("How many months are there in a year?", "12"),
    ("How many minutes are there in an hour?", "60"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many days are there in a leap year?", "366"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("At what temperature in degrees Fahrenheit does water freeze?", "32"),
    ("How many sides does a hexagon have?", "6"),
    ("How many players does a football (soccer) team have on the field?", "11"),
    ("What is the first month of the year?", "January"),
    ("What is the last month of the year?", "December"),
    ("Which season comes after winter?", "spring"),
    ("What do bees collect from flowers?", "nectar"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("What do we call the scientist who studies rocks?", "geologist"),
    ("What instrument has 88 keys?", "piano"),
    ("Which ocean lies between Europe and North America?", "Atlantic"),
    ("What is the longest bone in the human body?", "femur"),
    ("What is the boiling point of water in degrees Fahrenheit?", "212"),
]

REPEAT = [
    "good morning", "blue elephant", "banana", "thank you very much", "the quick brown fox", "purple rain",
    "happy birthday", "see you tomorrow", "green apple", "seven silver spoons", "orange juice", "rainy day",
    "hello friend", "open the window", "little red boat", "winter is coming", "coffee and cake", "paper moon",
    "quiet library", "golden sunset",
]
REPEAT_TEMPLATES = ["Repeat after me: {}", 'Please repeat "{}".', 'Say "{}".', 'Repeat this phrase: {}']

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("happy", "sad"), ("black", "white"),
    ("fast", "slow"), ("wet", "dry"), ("tall", "short"), ("left", "right"), ("early", "late"), ("full", "empty"),
    ("high", "low"), ("rich", "poor"), ("win", "lose"), ("love", "hate"), ("push", "pull"), ("buy", "sell"),
    ("north", "south"), ("east", "west"), ("summer", "winter"), ("question", "answer"), ("thick", "thin"),
    ("strong", "weak"), ("loud", "quiet"), ("clean", "dirty"), ("heavy", "light"), ("true", "false"),
    ("alive", "dead"), ("inside", "outside"), ("before", "after"), ("friend", "enemy"),
    ("above", "below"), ("always", "never"), ("remember", "forget"), ("cheap", "expensive"), ("dark", "light"),
    ("good", "bad"),
]

PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
    ("tooth", "teeth"), ("goose", "geese"), ("person", "people"), ("ox", "oxen"), ("box", "boxes"),
    ("baby", "babies"), ("knife", "knives"), ("leaf", "leaves"), ("wolf", "wolves"), ("city", "cities"),
]

TRANSLATIONS = [
    ("French", "hello", "bonjour"), ("French", "cat", "chat"), ("French", "dog", "chien"), ("French", "water", "eau"),
    ("French", "thank you", "merci"), ("French", "yes", "oui"), ("French", "house", "maison"),
    ("French", "bread", "pain"), ("French", "cheese", "fromage"), ("French", "red", "rouge"),
    ("French", "book", "livre"), ("French", "apple", "pomme"),
    ("Spanish", "hello", "hola"), ("Spanish", "thank you", "gracias"), ("Spanish", "dog", "perro"),
    ("Spanish", "cat", "gato"), ("Spanish", "water", "agua"), ("Spanish", "house", "casa"),
    ("Spanish", "friend", "amigo"), ("Spanish", "milk", "leche"), ("Spanish", "red", "rojo"),
    ("Spanish", "book", "libro"),
    ("German", "thank you", "danke"), ("German", "water", "Wasser"), ("German", "dog", "Hund"),
    ("German", "cat", "Katze"),
]

BACKWARDS = [("cat", "tac"), ("dog", "god"), ("star", "rats"), ("top", "pot"), ("stop", "pots"), ("live", "evil"),
             ("ten", "net"), ("pan", "nap"), ("tab", "bat"), ("loop", "pool"), ("drawer", "reward"), ("time", "emit")]

SEQUENCES = [
    ("Monday, Tuesday, Wednesday", "Thursday"), ("2, 4, 6, 8", "10"), ("1, 2, 3, 4", "5"), ("5, 10, 15, 20", "25"),
    ("10, 20, 30, 40", "50"), ("January, February, March", "April"), ("spring, summer, autumn", "winter"),
    ("one, two, three, four", "five"), ("first, second, third", "fourth"), ("1, 3, 5, 7", "9"),
    ("100, 90, 80, 70", "60"), ("red, orange, yellow, green", "blue"), ("Friday, Saturday", "Sunday"),
    ("3, 6, 9, 12", "15"),
]

PROVERBS = [
    ("The early bird catches the", "worm"), ("Twinkle, twinkle, little", "star"),
    ("An apple a day keeps the", "doctor"), ("Actions speak louder than", "words"), ("Better late than", "never"),
    ("Practice makes", "perfect"), ("Don't judge a book by its", "cover"), ("The pen is mightier than the", "sword"),
    ("Where there's smoke, there's", "fire"), ("Two heads are better than", "one"),
    ("Every cloud has a silver", "lining"), ("Curiosity killed the", "cat"), ("Rome wasn't built in a", "day"),
    ("Once upon a", "time"), ("Honesty is the best", "policy"),
]


def facts() -> list[tuple[str, str]]:
    rows = [(f"What is the capital of {country}?", city) for country, city in CAPITALS]
    rows += [(f"What is the chemical symbol for {element}?", symbol) for element, symbol in SYMBOLS]
    return rows + FACTS


def arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    """Small sums, differences and products; each answer differs from both operands (so an echo never counts)."""
    rows: dict[str, str] = {}

    def add(prompt: str, answer: int, *operands: int) -> None:
        if answer not in operands:
            rows.setdefault(prompt, str(answer))

    while len(rows) < 40:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        add(f"What is {a} + {b}? Answer with a number.", a + b, a, b)
    while len(rows) < 55:
        a, b = rng.randint(10, 40), rng.randint(2, 9)
        add(f"What is {a} + {b}? Answer with a number.", a + b, a, b)
    while len(rows) < 72:
        a, b = rng.randint(6, 20), rng.randint(1, 5)
        add(f"What is {a} minus {b}? Answer with a number.", a - b, a, b)
    while len(rows) < 100:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        add(f"What is {a} multiplied by {b}? Reply with just the number.", a * b, a, b)
    return list(rows.items())


def instructions(rng: random.Random) -> list[tuple[str, str]]:
    rows = [(REPEAT_TEMPLATES[i % len(REPEAT_TEMPLATES)].format(p), p) for i, p in enumerate(REPEAT)]
    rows += [(f"What is the opposite of {a}?", b) for a, b in OPPOSITES]
    rows += [(f'What is the plural of "{a}"?', b) for a, b in PLURALS]
    rows += [(f'How do you say "{w}" in {lang}?', t) for lang, w, t in TRANSLATIONS]
    rows += [(f'Spell the word "{a}" backwards.', b) for a, b in BACKWARDS]
    rows += [(f"What comes next in the sequence: {s}, ...?", b) for s, b in SEQUENCES]
    rows += [(f"Finish the saying: {s} ...", b) for s, b in PROVERBS]
    return rows


def contains(text: str, answer: str) -> bool:
    """The rule the evaluate stage scores with (``llmcompress.eval.chat.is_correct``)."""
    norm = " ".join(text.casefold().split())
    return re.search(rf"(?<!\w){re.escape(' '.join(answer.casefold().split()))}(?!\w)", norm) is not None


def build() -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    for kind, items in (("facts", facts()), ("arithmetic", arithmetic(rng)), ("instructions", instructions(rng))):
        for prompt, answer in items:
            echo_ok = kind == "instructions" and answer in REPEAT
            assert echo_ok or not contains(prompt, answer), f"the answer is in its own prompt: {prompt} -> {answer}"
            rows.append({"prompt": prompt, "answer": answer, "kind": kind})
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), "a prompt is listed twice"
    rng.shuffle(rows)  # kinds mixed, so `limit: N` takes some of each
    return rows


def main() -> None:
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    print(f"wrote {OUT}: {len(rows)} rows ({', '.join(f'{k} {n}' for k, n in counts.items())})")


if __name__ == "__main__":
    main()
