"""QLoRA on SmolLM2-135M-Instruct Q4_1: teach it a reply format it never uses by itself.

    python benchmarks/qlora_smollm2.py [-m SmolLM2-135M-Instruct.Q4_1.gguf] [--out DIR] [--iters 80] [-t 2]

Every reply in the generated chat data (train and held-out validation sets of questions
from different templates and values) has the form

    ANSWER: <the answer> | TOPIC: <arithmetic|geography|language|science>

The script trains with --mask-prompt (loss on the replies only), then reports the
validation loss before and after, the share of held-out questions whose greedy reply has
the format (and the right answer) before and after, one before/after reply, and the
trainer's tokens/s. Data and adapter go to --out.
"""

import argparse
import json
import random
import re
import time
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Turkey", "Ankara"),
    ("Belgium", "Brussels"), ("Iran", "Tehran"), ("Vietnam", "Hanoi"), ("Colombia", "Bogota"),
]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("old", "young"), ("up", "down"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("open", "closed"), ("wet", "dry"), ("strong", "weak"), ("rich", "poor"), ("loud", "quiet"),
             ("thick", "thin"), ("high", "low"), ("near", "far"), ("clean", "dirty"), ("true", "false")]
PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("leaf", "leaves"),
           ("city", "cities"), ("foot", "feet"), ("tooth", "teeth"), ("bus", "buses"), ("knife", "knives"),
           ("man", "men"), ("woman", "women"), ("baby", "babies"), ("goose", "geese"), ("wolf", "wolves")]
SCIENCE = [("What gas do plants take in from the air?", "carbon dioxide"),
           ("What is the chemical symbol for gold?", "Au"), ("What is the chemical symbol for water?", "H2O"),
           ("How many legs does a spider have?", "8"), ("How many legs does an insect have?", "6"),
           ("What planet is known as the red planet?", "Mars"), ("What is the largest planet?", "Jupiter"),
           ("What is the closest star to Earth?", "the Sun"), ("At what temperature in Celsius does water freeze?",
                                                                "0"),
           ("At what temperature in Celsius does water boil?", "100"), ("What force pulls objects to the ground?",
                                                                      "gravity"),
           ("What organ pumps blood through the body?", "the heart"), ("How many planets are in the solar system?",
                                                                       "8"),
           ("What is the hardest natural material?", "diamond"), ("What do bees make?", "honey"),
           ("What is frozen water called?", "ice")]


def questions(rng: random.Random, split: str):
    """(question, answer, topic) items; train and validation use disjoint values."""
    items = []
    lo, hi = (2, 40) if split == "train" else (41, 60)
    for _ in range(150 if split == "train" else 16):
        a, b = rng.randint(lo, hi), rng.randint(2, 30)
        form = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} minus {b}?",
                           "How much is {a} times {b}?"])
        q = form.format(a=a, b=b)
        ans = a + b if "plus" in form or "Add" in form else a - b if "minus" in form else a * b
        items.append((q, str(ans), "arithmetic"))
    caps = CAPITALS[:24] if split == "train" else CAPITALS[24:]
    forms = ("What is the capital of {c}?", "Which city is the capital of {c}?")
    for country, city in caps:
        for form in forms[: 2 if split == "train" else 1]:
            items.append((form.format(c=country), city, "geography"))
    opp = OPPOSITES[:15] if split == "train" else OPPOSITES[15:]
    for w, o in opp:
        for form in ("What is the opposite of {w}?", "Give the opposite of the word '{w}'.")[
                : 2 if split == "train" else 1]:
            items.append((form.format(w=w), o, "language"))
    plu = PLURALS[:11] if split == "train" else PLURALS[11:]
    for w, p in plu:
        items.append((f"What is the plural of {w}?", p, "language"))
    sci = SCIENCE[:12] if split == "train" else SCIENCE[12:]
    for q, a in sci:
        items.append((q, a, "science"))
    rng.shuffle(items)
    return items


def reply(answer, topic):
    return f"ANSWER: {answer} | TOPIC: {topic}"


FORMAT = re.compile(r"^ANSWER: (.+?) \| TOPIC: (arithmetic|geography|language|science)$")


def write_data(out: Path):
    rng = random.Random(0)
    for split in ("train", "val"):
        items = questions(rng, split)
        with open(out / f"{split}.jsonl", "w") as f:
            for q, a, t in items:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": reply(a, t)}]}) + "\n")
    return [json.loads(line) for line in open(out / "val.jsonl")]


def greedy_replies(model, template, val, n=None):
    import pyllm
    from pyllm.runtime.chat_template import encode_rendered

    out = []
    for rec in val[:n]:
        prompt = template.render(rec["messages"][:1], add_generation_prompt=True)
        text = pyllm.generate(model, encode_rendered(model.tokenizer, prompt), max_tokens=40, temp=0)
        out.append(text.strip())
    return out


def score(replies, val):
    fmt = right = 0
    for text, rec in zip(replies, val):
        m = FORMAT.match(text)
        want = FORMAT.match(rec["messages"][1]["content"])
        fmt += bool(m)
        right += bool(m) and m.group(1).strip().lower() == want.group(1).lower() and m.group(2) == want.group(2)
    return fmt / len(replies), right / len(replies)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=str(Path.home() / ".cache/pyllm/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--out", default="/tmp/qlora-smollm2")
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("-t", "--threads", type=int, default=2)
    args = p.parse_args()
    import pyllm
    from pyllm.runtime.chat_template import ChatTemplate
    from pyllm.runtime.gguf_file import GGUFFile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = write_data(out)
    n_train = sum(1 for _ in open(out / "train.jsonl"))
    print(f"data: {n_train} training and {len(val)} validation conversations in {out}")
    template = ChatTemplate.from_metadata(GGUFFile(args.model).metadata)
    base = pyllm.load(args.model, n_ctx=256, n_threads=args.threads)
    before = greedy_replies(base, template, val)
    t0 = time.perf_counter()
    r = pyllm.finetune(args.model, out / "train.jsonl", out / "format.gguf", val_data=out / "val.jsonl",
                       val_every=20, iters=args.iters, batch_size=args.batch_size, lr=args.lr, warmup=5,
                       mask_prompt=True, seq_len=256, rank=8, alpha=16, targets="q,k,v,o,gate,up,down",
                       threads=args.threads, log_every=5)
    seconds = time.perf_counter() - t0
    tuned = pyllm.load(args.model, n_ctx=256, n_threads=args.threads, lora=[(out / "format.gguf", 1.0)])
    after = greedy_replies(tuned, template, val)
    (out / "replies.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    fb, rb = score(before, val)
    fa, ra = score(after, val)
    print(f"validation loss: {r.val_loss[0][1]:.4f} (step 0) -> {r.val_loss[-1][1]:.4f} (step {r.step}); "
          f"all: {[(s, round(v, 4)) for s, v in r.val_loss]}")
    print(f"held-out replies in the format: {fb:.0%} -> {fa:.0%}; format and right answer: {rb:.0%} -> {ra:.0%}")
    print(f"training: {r.step} steps in {seconds:.0f} s, {r.tokens_per_s:.1f} tokens/s, {args.threads} threads")
    i = next((i for i, rec in enumerate(val) if "capital" in rec["messages"][0]["content"]), 0)
    print(f"example: {val[i]['messages'][0]['content']!r}\n  before: {before[i]!r}\n  after:  {after[i]!r}")


if __name__ == "__main__":
    main()
