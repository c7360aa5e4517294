"""Generate the small example datasets in ``examples/data/`` (deterministic; a few hundred lines each).

    python scripts/make_example_data.py            # writes examples/data/{sft,prefix_lm,embedding,diffusion}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "data"
N = 400

WORDS = ("apple river stone cloud garden window candle forest silver planet rocket mirror lemon violin "
         "harbor island meadow pencil tiger castle bridge desert orange thunder marble saddle").split()
ANIMALS = {"cat": "meows", "dog": "barks", "cow": "moos", "duck": "quacks", "lion": "roars", "owl": "hoots",
           "sheep": "bleats", "horse": "neighs", "frog": "croaks", "bee": "buzzes", "snake": "hisses",
           "wolf": "howls"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago",
            "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "Ireland": "Dublin", "India": "New Delhi"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
          "pumpkin": "orange", "plum": "purple"}
ADJ = "quick lazy small bright quiet old young brave gentle clever".split()
VERBS = "jumps runs walks sleeps sings waits looks climbs".split()


def sft(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return {"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"}
    if kind == 1:
        w = rng.choice(WORDS)
        return {"prompt": f"Spell the word backwards: {w}", "completion": f" {w[::-1]}"}
    if kind == 2:
        w = rng.choice(WORDS)
        return {"prompt": f"Write in capitals: {w}", "completion": f" {w.upper()}"}
    c = rng.choice(list(CAPITALS))
    return {"prompt": f"What is the capital of {c}?", "completion": f" The capital of {c} is {CAPITALS[c]}."}


def prefix_lm(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 6))
    kind = rng.randrange(3)
    if kind == 0:
        return {"prompt": "Sort these words: " + " ".join(words), "completion": " " + " ".join(sorted(words))}
    if kind == 1:
        return {"prompt": "Reverse the order: " + " ".join(words), "completion": " " + " ".join(words[::-1])}
    return {"prompt": "Count the words: " + " ".join(words), "completion": f" {len(words)}"}


def embedding(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a = rng.choice(list(ANIMALS))
        q = rng.choice([f"What sound does a {a} make?", f"noise of a {a}", f"{a} sound"])
        return {"query": q, "positive": f"The {a} {ANIMALS[a]}."}
    if kind == 1:
        c = rng.choice(list(CAPITALS))
        q = rng.choice([f"capital of {c}", f"Which city is the capital of {c}?", f"{c} capital city"])
        return {"query": q, "positive": f"{CAPITALS[c]} is the capital of {c}."}
    t = rng.choice(list(COLORS))
    q = rng.choice([f"what color is the {t}", f"colour of {t}", f"The {t} has which color?"])
    return {"query": q, "positive": f"The {t} is {COLORS[t]}."}


def diffusion(rng: random.Random) -> dict:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        a = rng.choice(list(ANIMALS))
        sentences.append(f"The {rng.choice(ADJ)} {a} {rng.choice(VERBS)} near the {rng.choice(WORDS)} "
                         f"and {ANIMALS[a]}.")
    return {"text": " ".join(sentences)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("sft", sft), ("prefix_lm", prefix_lm), ("embedding", embedding), ("diffusion", diffusion)):
        rng = random.Random(f"anymask-{name}")
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(N)), encoding="utf-8")
        print(f"{path}: {N} examples, {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
