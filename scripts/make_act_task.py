"""Write llmdrop/data/act_mc.jsonl: the multiple-choice task used in docs/act.md (seeded, reproducible).

Every fact below was written for llmdrop (no dataset copied). Each item is a short completion prompt, the
right answer and two wrong answers drawn (seeded) from the same table, so that every choice is a
plausible word of the right kind. Run: python scripts/make_act_task.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "llmdrop" / "data" / "act_mc.jsonl"
SEED = 0

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("light", "dark"),
    ("happy", "sad"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("old", "young"),
    ("hard", "soft"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("high", "low"),
    ("long", "short"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("near", "far"),
    ("first", "last"),
    ("love", "hate"),
    ("true", "false"),
    ("win", "lose"),
    ("buy", "sell"),
    ("day", "night"),
    ("inside", "outside"),
    ("push", "pull"),
    ("above", "below"),
    ("cheap", "expensive"),
    ("safe", "dangerous"),
    ("sweet", "sour"),
    ("begin", "end"),
    ("left", "right"),
    ("north", "south"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("arrive", "leave"),
    ("always", "never"),
]

SOUNDS = [
    ("dog", "bark"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("lion", "roar"),
    ("snake", "hiss"),
    ("horse", "neigh"),
    ("pig", "oink"),
    ("owl", "hoot"),
    ("bee", "buzz"),
    ("frog", "croak"),
    ("mouse", "squeak"),
    ("wolf", "howl"),
    ("bird", "chirp"),
]

YOUNG = [
    ("cat", "kitten"),
    ("dog", "puppy"),
    ("cow", "calf"),
    ("sheep", "lamb"),
    ("horse", "foal"),
    ("goat", "kid"),
    ("bear", "cub"),
    ("frog", "tadpole"),
    ("duck", "duckling"),
    ("kangaroo", "joey"),
    ("swan", "cygnet"),
    ("hen", "chick"),
    ("pig", "piglet"),
    ("deer", "fawn"),
    ("goose", "gosling"),
]

COLORS = [
    ("banana", "yellow"),
    ("grass", "green"),
    ("the sky on a clear day", "blue"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("chocolate", "brown"),
    ("a lemon", "yellow"),
    ("a fire truck", "red"),
    ("milk", "white"),
    ("a leaf in summer", "green"),
    ("the ocean", "blue"),
    ("a crow", "black"),
    ("a carrot", "orange"),
    ("a strawberry", "red"),
    ("cream", "white"),
    ("soil", "brown"),
    ("a cucumber", "green"),
    ("a raven", "black"),
]

PLURALS = [
    ("mouse", "mice", "mouses"),
    ("child", "children", "childs"),
    ("foot", "feet", "foots"),
    ("tooth", "teeth", "tooths"),
    ("man", "men", "mans"),
    ("woman", "women", "womans"),
    ("goose", "geese", "gooses"),
    ("person", "people", "persons"),
    ("knife", "knives", "knifes"),
    ("leaf", "leaves", "leafs"),
    ("wolf", "wolves", "wolfs"),
    ("box", "boxes", "boxs"),
    ("city", "cities", "citys"),
    ("baby", "babies", "babys"),
    ("bus", "buses", "bus"),
    ("ox", "oxen", "oxes"),
    ("half", "halves", "halfs"),
    ("wife", "wives", "wifes"),
    ("dish", "dishes", "dishs"),
    ("party", "parties", "partys"),
]

PAST = [
    ("go", "went", "goed"),
    ("eat", "ate", "eated"),
    ("see", "saw", "seed"),
    ("run", "ran", "runned"),
    ("write", "wrote", "writed"),
    ("take", "took", "taked"),
    ("give", "gave", "gived"),
    ("come", "came", "comed"),
    ("drink", "drank", "drinked"),
    ("sing", "sang", "singed"),
    ("swim", "swam", "swimmed"),
    ("buy", "bought", "buyed"),
    ("think", "thought", "thinked"),
    ("bring", "brought", "bringed"),
    ("teach", "taught", "teached"),
    ("catch", "caught", "catched"),
    ("fly", "flew", "flied"),
    ("speak", "spoke", "speaked"),
    ("break", "broke", "breaked"),
    ("find", "found", "finded"),
]

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Thailand", "Bangkok"),
    ("the United Kingdom", "London"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("South Korea", "Seoul"),
    ("Turkey", "Ankara"),
]

KINDS = {
    "fruit": ["apple", "pear", "cherry", "grape", "peach", "plum", "mango", "banana"],
    "vegetable": ["carrot", "potato", "onion", "cabbage", "lettuce", "pea", "turnip", "spinach"],
    "animal": ["tiger", "rabbit", "elephant", "giraffe", "zebra", "monkey", "camel", "fox"],
    "tool": ["hammer", "saw", "wrench", "screwdriver", "drill", "chisel", "shovel", "axe"],
    "vehicle": ["car", "truck", "bicycle", "train", "bus", "motorcycle", "van", "tractor"],
    "instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "cello", "harp"],
}

NUMBER_WORDS = [
    "zero",
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
    "eleven",
    "twelve",
]


def _choices(rng, answer, pool, n_wrong=2):
    wrong = rng.sample(sorted({p for p in pool if p != answer}), n_wrong)
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return choices


def _item(kind, prompt, choices, answer):
    return {"kind": kind, "prompt": prompt, "choices": [" " + c for c in choices], "label": choices.index(answer)}


def build(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for a, b in OPPOSITES:
        pool = [y for _, y in OPPOSITES] + [x for x, _ in OPPOSITES]
        items.append(_item("opposite", f"The opposite of {a} is", _choices(rng, b, [p for p in pool if p != a]), b))
    for animal, sound in SOUNDS:
        article = "an" if animal[0] in "aeiou" else "a"
        items.append(
            _item(
                "sound", f"The sound {article} {animal} makes is a", _choices(rng, sound, [s for _, s in SOUNDS]), sound
            )
        )
    for animal, young in YOUNG:
        items.append(_item("young", f"A baby {animal} is called a", _choices(rng, young, [y for _, y in YOUNG]), young))
    for thing, color in COLORS:
        items.append(_item("color", f"The color of {thing} is", _choices(rng, color, [c for _, c in COLORS]), color))
    for word, plural, wrong in PLURALS:
        other = rng.choice([p for _, p, _ in PLURALS if p != plural])
        items.append(_item("plural", f"The plural of {word} is", _choices(rng, plural, [wrong, other]), plural))
    for verb, past, wrong in PAST:
        other = rng.choice([p for _, p, _ in PAST if p != past])
        items.append(_item("past", f"The past tense of {verb} is", _choices(rng, past, [wrong, other]), past))
    for country, capital in CAPITALS:
        items.append(
            _item("capital", f"The capital of {country} is", _choices(rng, capital, [c for _, c in CAPITALS]), capital)
        )
    for kind, members in KINDS.items():
        for m in members:
            article = "An" if m[0] in "aeiou" else "A"
            items.append(_item("kind", f"{article} {m} is a kind of", _choices(rng, kind, list(KINDS)), kind))
    # arithmetic, written as words and digits: small sums and comparisons
    for _ in range(60):
        a, b = rng.randint(1, 6), rng.randint(1, 6)
        answer = NUMBER_WORDS[a + b]
        items.append(
            _item(
                "sum",
                f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} equals",
                _choices(rng, answer, NUMBER_WORDS[2:13]),
                answer,
            )
        )
    for a, b in rng.sample([(a, b) for a in range(13) for b in range(13) if a != b], 50):
        big = NUMBER_WORDS[max(a, b)]
        items.append(
            _item(
                "compare",
                f"Which number is larger, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}? The larger number is",
                _choices(rng, big, [NUMBER_WORDS[a], NUMBER_WORDS[b]], n_wrong=1),
                big,
            )
        )
    return items


def main():
    items = build()
    OUT.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(items)} items to {OUT}")


if __name__ == "__main__":
    main()
