"""Generated parts of weightsmith's calibration mix: math word problems with worked solutions,
short children's stories from a small grammar, and structured data (tables, JSON, CSV, unit
conversions). All templates and word lists were written for weightsmith (Apache-2.0); the
output depends only on the seed."""

from __future__ import annotations

import json
import random

NAMES = [
    "Amara", "Ben", "Chen", "Dara", "Elif", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Kofi",
    "Leila", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera",
    "Wen", "Yusuf", "Zoe", "Lily", "Tom", "Mia", "Leo", "Ava",
]  # fmt: skip
ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("sticker", "stickers"),
    ("book", "books"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"),
    ("card", "cards"), ("egg", "eggs"), ("bead", "beads"), ("balloon", "balloons"),
]  # fmt: skip


def _name(rng: random.Random, *avoid: str) -> str:
    return rng.choice([n for n in NAMES if n not in avoid])


def _p_share(rng):
    a, (_, items) = _name(rng), rng.choice(ITEMS)
    k = rng.randint(2, 9)
    each = rng.randint(3, 15)
    left = rng.randint(0, k - 1)
    total = k * each + left
    return (
        f"Question: {a} has {total} {items} and shares them equally among {k} friends, keeping "
        f"whatever is left over. How many {items} does each friend get, and how many are left?\n"
        f"Solution: Divide {total} by {k}. {k} × {each} = {k * each}, and {total} − {k * each} = "
        f"{left}. Each friend gets {each} {items}, and {left} "
        f"{'is' if left == 1 else 'are'} left over.\nAnswer: {each} each, {left} left."
    )


def _p_shopping(rng):
    a = _name(rng)
    n1, p1 = rng.randint(2, 6), rng.choice([0.5, 0.75, 1.2, 1.5, 2.25, 3.0, 4.5])
    n2, p2 = rng.randint(1, 4), rng.choice([2.0, 2.5, 3.75, 5.0, 6.4, 8.0])
    paid = 20 if n1 * p1 + n2 * p2 < 20 else 50
    cost = n1 * p1 + n2 * p2
    return (
        f"Question: {a} buys {n1} notebooks at ${p1:.2f} each and {n2} pens at ${p2:.2f} each, "
        f"and pays with a ${paid} note. How much change does {a} get?\n"
        f"Solution: The notebooks cost {n1} × ${p1:.2f} = ${n1 * p1:.2f}. The pens cost "
        f"{n2} × ${p2:.2f} = ${n2 * p2:.2f}. Together that is ${cost:.2f}. The change is "
        f"${paid} − ${cost:.2f} = ${paid - cost:.2f}.\nAnswer: ${paid - cost:.2f}"
    )


def _p_speed(rng):
    a = _name(rng)
    v = rng.choice([4, 5, 12, 15, 18, 40, 60, 75, 90])
    t = rng.choice([0.5, 1.5, 2, 2.5, 3, 4])
    mode = "walks" if v < 10 else "cycles" if v < 30 else "drives"
    d = v * t
    return (
        f"Question: {a} {mode} at a steady {v} km/h for {t:g} hours. How far does {a} travel? "
        f"How long would the same trip take at {v * 2} km/h?\n"
        f"Solution: Distance = speed × time = {v} × {t:g} = {d:g} km. At twice the speed the "
        f"time halves: {d:g} ÷ {v * 2} = {t / 2:g} hours, or {round(t * 30)} minutes.\n"
        f"Answer: {d:g} km; {t / 2:g} hours."
    )


def _p_percent(rng):
    price = rng.choice([40, 60, 80, 120, 150, 200, 250, 360])
    pct = rng.choice([10, 15, 20, 25, 30, 40])
    off = price * pct / 100
    item = rng.choice(["jacket", "lamp", "bicycle helmet", "pair of boots", "backpack", "kettle"])
    return (
        f"Question: A {item} costs ${price}. In a sale the price is reduced by {pct}%. What is "
        f"the sale price?\nSolution: {pct}% of {price} is {pct}/100 × {price} = {off:g}. The "
        f"sale price is {price} − {off:g} = {price - off:g}.\nAnswer: ${price - off:g}"
    )


def _p_age(rng):
    a, b = _name(rng), None
    b = _name(rng, a)
    x = rng.randint(3, 12)
    k = rng.choice([2, 3, 4])
    y = rng.randint(2, 10)
    return (
        f"Question: {b} is {k} times as old as {a}. In {y} years, {b} will be "
        f"{k * x + y} years old. How old is {a} now?\n"
        f"Solution: In {y} years {b} is {k * x + y}, so {b} is {k * x + y} − {y} = {k * x} now. "
        f"{a} is a {k}th of that: {k * x} ÷ {k} = {x}.\nAnswer: {x} years old."
    )


def _p_area(rng):
    w, h = rng.randint(3, 15), rng.randint(2, 12)
    tile = rng.choice([1, 2])
    per = rng.choice([12, 18, 25, 30])
    n = (w * h) // (tile * tile)
    return (
        f"Question: A room is {w} m long and {h} m wide. How many square tiles of side "
        f"{tile} m cover the floor, and what do they cost at ${per} per tile?\n"
        f"Solution: The floor area is {w} × {h} = {w * h} m². Each tile covers {tile * tile} m², "
        f"so {w * h} ÷ {tile * tile} = {(w * h) / (tile * tile):g} tiles"
        + (f" (rounded up to {-(-(w * h) // (tile * tile))})" if (w * h) % (tile * tile) else "")
        + f". The cost is {-(-(w * h) // (tile * tile))} × ${per} = "
        f"${-(-(w * h) // (tile * tile)) * per}.\nAnswer: {max(n, -(-(w * h) // (tile * tile)))}"
        f" tiles, ${-(-(w * h) // (tile * tile)) * per}."
    )


def _p_average(rng):
    a = _name(rng)
    scores = [rng.randint(55, 100) for _ in range(rng.randint(3, 6))]
    s = sum(scores)
    return (
        f"Question: {a}'s test scores were {', '.join(map(str, scores))}. What is the average?\n"
        f"Solution: The sum is {' + '.join(map(str, scores))} = {s}. There are {len(scores)} "
        f"scores, so the average is {s} ÷ {len(scores)} = {s / len(scores):.2f}.\n"
        f"Answer: {s / len(scores):.2f}"
    )


def _p_time(rng):
    a = _name(rng)
    h, m = rng.randint(6, 17), rng.choice([0, 10, 15, 20, 30, 45, 50])
    dur = rng.randint(35, 190)
    end = h * 60 + m + dur
    return (
        f"Question: {a}'s train leaves at {h:02d}:{m:02d} and the journey takes {dur} minutes. "
        f"When does it arrive?\nSolution: {dur} minutes is {dur // 60} hour(s) and {dur % 60} "
        f"minutes. {h:02d}:{m:02d} plus {dur // 60} h is {h + dur // 60:02d}:{m:02d}; adding "
        f"{dur % 60} min gives {end // 60:02d}:{end % 60:02d}.\nAnswer: {end // 60:02d}:{end % 60:02d}"
    )


def _p_linear(rng):
    x = rng.randint(-9, 12)
    a, b = rng.randint(2, 9), rng.randint(-20, 20)
    c = a * x + b
    sign = "+" if b >= 0 else "−"
    return (
        f"Question: Solve {a}x {sign} {abs(b)} = {c}.\n"
        f"Solution: {'Subtract' if b >= 0 else 'Add'} {abs(b)} on both sides: {a}x = {c - b}. "
        f"Divide by {a}: x = {c - b} ÷ {a} = {x}. Check: {a} × {x} {sign} {abs(b)} = {c}.\n"
        f"Answer: x = {x}"
    )


def _p_recipe(rng):
    serves, want = rng.choice([2, 4, 6]), rng.choice([3, 5, 8, 9, 10, 12])
    flour, milk = rng.choice([150, 200, 250, 300]), rng.choice([200, 250, 300, 400])
    f = want / serves
    return (
        f"Question: A pancake recipe for {serves} people uses {flour} g of flour and {milk} ml of "
        f"milk. How much of each is needed for {want} people?\n"
        f"Solution: Scale by {want}/{serves} = {f:.3g}. Flour: {flour} × {f:.3g} = "
        f"{flour * f:.0f} g. Milk: {milk} × {f:.3g} = {milk * f:.0f} ml.\n"
        f"Answer: {flour * f:.0f} g of flour and {milk * f:.0f} ml of milk."
    )


def _p_work(rng):
    a, b = _name(rng), None
    b = _name(rng, a)
    ta, tb = rng.choice([(2, 3), (3, 6), (4, 12), (6, 3), (5, 20), (10, 15)])
    together = ta * tb / (ta + tb)
    return (
        f"Question: {a} can paint a fence in {ta} hours and {b} can paint it in {tb} hours. "
        f"How long do they take working together?\n"
        f"Solution: {a} paints 1/{ta} of the fence per hour and {b} paints 1/{tb}. Together "
        f"they paint 1/{ta} + 1/{tb} = {ta + tb}/{ta * tb} per hour, so the whole fence takes "
        f"{ta * tb}/{ta + tb} = {together:g} hours.\nAnswer: {together:g} hours"
    )


def _p_interest(rng):
    p, r, y = rng.choice([500, 1000, 2000, 2500]), rng.choice([2, 3, 4, 5]), rng.randint(2, 4)
    lines, v = [], float(p)
    for i in range(1, y + 1):
        nv = v * (1 + r / 100)
        lines.append(f"after year {i}: {v:.2f} × {1 + r / 100:.2f} = {nv:.2f}")
        v = nv
    return (
        f"Question: ${p} is saved at {r}% interest per year, compounded yearly. How much is "
        f"there after {y} years?\nSolution: Multiply by {1 + r / 100:.2f} each year; "
        + "; ".join(lines)
        + f".\nAnswer: ${v:.2f}"
    )


PROBLEMS = [_p_share, _p_shopping, _p_speed, _p_percent, _p_age, _p_area, _p_average, _p_time,
            _p_linear, _p_recipe, _p_work, _p_interest]  # fmt: skip


def math_problems(rng: random.Random, chars: int) -> list[str]:
    """Word problems with worked solutions, about ``chars`` characters, 4 per document."""
    docs, size = [], 0
    while size < chars:
        doc = "\n\n".join(rng.choice(PROBLEMS)(rng) for _ in range(4))
        docs.append(doc)
        size += len(doc)
    return docs


ANIMALS = ["rabbit", "fox", "owl", "turtle", "mouse", "bear cub", "duck", "kitten", "puppy",
           "squirrel", "hedgehog", "little frog", "goat", "lamb", "badger"]  # fmt: skip
PLACES = ["by the river", "at the edge of the forest", "in a busy town", "on a small farm",
          "near the sea", "in a quiet garden", "at the top of a hill", "in a big city park",
          "beside an old mill", "in a snowy valley"]  # fmt: skip
WANTS = [
    ("to find the biggest strawberry in the field", "found a strawberry as big as a plum"),
    ("to see the sea", "stood on the sand and watched the waves roll in"),
    ("to build a boat that could float", "watched the little boat bob on the pond"),
    ("to learn to whistle", "whistled a tune that made the birds answer"),
    ("to reach the moon", "climbed the tallest tree and saw the moon shining in the water"),
    ("to bake a cake for a friend", "carried a lopsided but delicious cake to the party"),
    ("to find a lost button", "found the button under a leaf, shining like a coin"),
    ("to win the spring race", "crossed the finish line with everyone cheering"),
    ("to make a new friend", "sat under the tree with a new friend, sharing a snack"),
    ("to grow a sunflower", "looked up at a sunflower taller than the fence"),
]  # fmt: skip
PROBLEMS_STORY = [
    "it started to rain very hard", "the path was blocked by a fallen tree",
    "the bridge was broken", "it got dark too early", "a strong wind blew everything away",
    "the map was torn in half", "it was too shy to ask for help", "the river was too wide",
]  # fmt: skip
HELPERS = [
    ("a wise old tortoise", "Go slowly, and look carefully."),
    ("a kind girl named {n}", "We can do it together."),
    ("a grumpy crow", "Hmph. Follow me, and don't be late."),
    ("a boy named {n} with a red hat", "I know a shortcut!"),
    ("its grandmother", "Every problem is smaller after a cup of tea."),
    ("a family of ants", "Many small steps make a long road."),
]  # fmt: skip
MORALS = [
    "Asking for help is brave, not weak.", "Patience makes hard things possible.",
    "Friends make every journey shorter.", "Trying again is how we learn.",
    "Kindness comes back to those who give it.", "Being different can be a gift.",
]  # fmt: skip


def story(rng: random.Random) -> str:
    """A short children's story from the grammar above."""
    hero, name = rng.choice(ANIMALS), _name(rng)
    want, done = rng.choice(WANTS)
    trouble = rng.choice(PROBLEMS_STORY)
    helper, said = rng.choice(HELPERS)
    helper = helper.format(n=_name(rng, name))
    feel = rng.choice(["sad", "worried", "cross", "tired", "frustrated"])
    day = rng.choice(["One sunny morning", "One rainy afternoon", "On a cold day",
                      "One evening", "On the first day of spring"])  # fmt: skip
    return (
        f"Once upon a time, there was a {hero} named {name} who lived {rng.choice(PLACES)}. "
        f"More than anything, {name} wanted {want}. {day}, {name} set off. But soon "
        f'{trouble}, and {name} felt {feel}. "Maybe I should go home," {name} said.\n'
        f'Just then {helper} came along. "What is the matter?" {name} explained everything. '
        f'"{said}" came the answer. So they tried again, step by step. It was not easy, and '
        f"{name} nearly gave up twice, but at last {name} {done}.\n"
        f"That night, {name} smiled before falling asleep. {name} had learned something: "
        f"{rng.choice(MORALS)}"
    )


def stories(rng: random.Random, chars: int) -> list[str]:
    docs, size = [], 0
    while size < chars:
        docs.append(story(rng))
        size += len(docs[-1])
    return docs


CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Toronto", "Cairo", "Perth",
          "Reykjavik", "Hanoi", "Quito", "Vienna"]  # fmt: skip
PRODUCTS = ["desk lamp", "wool scarf", "coffee grinder", "hiking boots", "tea kettle",
            "phone case", "road bike", "yoga mat", "backpack", "garden hose"]  # fmt: skip


def structured(rng: random.Random, chars: int) -> list[str]:
    """Markdown tables, CSV, JSON records, and unit conversions with their arithmetic."""
    kinds = [_weather_table, _orders_csv, _json_records, _conversions]
    docs, size = [], 0
    while size < chars:
        docs.append(rng.choice(kinds)(rng))
        size += len(docs[-1])
    return docs


def _weather_table(rng):
    rows = ["| City | High (°C) | Low (°C) | Rain (mm) |", "|---|---|---|---|"]
    for c in rng.sample(CITIES, 5):
        hi = rng.randint(-5, 36)
        rows.append(f"| {c} | {hi} | {hi - rng.randint(3, 12)} | {rng.randint(0, 40)} |")
    return "Daily weather summary\n\n" + "\n".join(rows)


def _orders_csv(rng):
    lines = ["order_id,customer,product,quantity,unit_price,total"]
    for i in range(rng.randint(5, 9)):
        q, p = rng.randint(1, 5), round(rng.uniform(3, 120), 2)
        lines.append(f"{10231 + i * 7},{_name(rng)},{rng.choice(PRODUCTS)},{q},{p:.2f},{q * p:.2f}")
    return "orders.csv:\n" + "\n".join(lines)


def _json_records(rng):
    recs = [
        {"id": rng.randint(100, 999), "name": _name(rng), "city": rng.choice(CITIES),
         "active": rng.random() < 0.7, "score": round(rng.uniform(0, 1), 3),
         "tags": rng.sample(["admin", "beta", "mobile", "eu", "trial", "vip"], 2)}
        for _ in range(rng.randint(2, 4))
    ]  # fmt: skip
    return "Response body:\n" + json.dumps({"users": recs, "count": len(recs)}, indent=2)


def _conversions(rng):
    km = rng.randint(2, 90)
    c = rng.randint(-10, 40)
    kg = rng.randint(1, 120)
    return (
        f"{km} kilometres is {km} × 0.6214 = {km * 0.6214:.2f} miles. "
        f"{c} °C is {c} × 9/5 + 32 = {c * 9 / 5 + 32:g} °F. "
        f"{kg} kg is {kg} × 2.2046 = {kg * 2.2046:.1f} pounds. "
        f"{km * 1000} metres per hour is {km * 1000 / 3600:.2f} metres per second."
    )
