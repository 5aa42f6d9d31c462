"""A synthetic chat dataset (messages format) of varied length, about 50 to 1000 tokens per row.

Deterministic (seeded). Some rows have a system prompt, some several turns.
Usage: python3 scripts/gpu/make_chat_dataset.py OUT.jsonl [ROWS]
"""
import json
import random
import sys
from pathlib import Path

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if more no out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like our over "
         "man me even most made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world still own see men work long "
         "get here between both life being under never day same another know while last might us great old year off "
         "come since against go came right used take three river harbor engine lattice signal copper garden winter "
         "ledger compass violin orbit granite meadow lantern harvest quarry beacon cipher atlas").split()
TOPICS = ("history of a harbor town", "how a steam engine works", "planning a vegetable garden", "a short story about a "
          "lighthouse", "comparing two sorting algorithms", "the water cycle", "learning the violin", "a winter hiking trip",
          "bookkeeping for a small shop", "the night sky in autumn", "repairing a bicycle", "a recipe for bread")
SYSTEMS = ("You are a helpful assistant.", "You are a concise expert. Answer precisely.",
           "You are a friendly tutor who explains step by step.")


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 22))]
    return " ".join(words).capitalize() + rng.choice(".!?..")


def paragraph(rng: random.Random, n_words: int) -> str:
    parts, count = [], 0
    while count < n_words:
        s = sentence(rng)
        parts.append(s)
        count += len(s.split())
    return " ".join(parts)


def row(rng: random.Random) -> dict:
    budget = int(rng.uniform(35, 720))  # words; about 1.3 tokens each plus template tokens
    turns = 1 if budget < 150 else rng.choice((1, 1, 2, 3))
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(turns):
        share = budget // turns
        q_words = max(5, int(share * rng.uniform(0.1, 0.3)))
        topic = rng.choice(TOPICS)
        messages.append({"role": "user", "content": f"Tell me about {topic}. " + paragraph(rng, q_words - 4)})
        messages.append({"role": "assistant", "content": paragraph(rng, share - q_words)})
    return {"messages": messages}


def main(out: str, rows: int = 600) -> None:
    rng = random.Random(1234)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps(row(rng)) + "\n")
    print(f"{rows} rows → {path}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 600)
