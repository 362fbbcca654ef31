"""Benchmark of instaqueue's knowledge-base replies: retrieval time, and worker memory on the LLM path.

Runs against real services, like ``bench/dm_pipeline.py`` and ``bench/memory.py`` (whose process
handling, batching and /proc helpers it imports): Redis and PostgreSQL from ``tests/services.py``
(``INSTAQUEUE_TEST_REDIS_URL`` / ``INSTAQUEUE_TEST_DATABASE_URL`` if set, else throwaway
``redis-server`` / PostgreSQL from PATH), the fake Graph API of ``tests/fake_graph.py`` and the fake
chat-completions server of ``tests/fake_llm.py`` in this process, and a real worker (concurrency
4, prefork) started as ``python -m instaqueue worker``; no beat.

The knowledge base is one account's, generated from templates: products (material x item, e.g.
"merino cardigan") x 20 topics ("Return policy for ...", "Care instructions for ...", ...) and
countries x 3 topics ("Shipping to ...", "Customs and duties for ...", ...), each answer one to
three sentences drawn from several phrasings with varied figures. The questions are customer
messages phrased differently from the entries ("can the merino cardigan go in the washing
machine?"); each is generated for one entry, so the share ranked first is printed too. No
question contains a word of the account's keyword rule (``price, cost``) or a hand-off phrase.

1. Retrieval (PostgreSQL): N entries (10,000; ``--quick`` 2,000), then ``ANALYZE``; Q questions
   (500; quick 100) through ``instaqueue.retrieve_entries(account_id, question)`` in this process,
   each followed by a trivial indexed lookup (``SELECT id FROM knowledge_entry WHERE id = :id``
   in its own session, as ``retrieve_entries`` opens one) so both share the same CPU conditions
   on a busy machine; p50/p95/max of each and their ratio. Then ``EXPLAIN (ANALYZE, BUFFERS)``
   of the exact statement ``retrieve_entries`` sends for the question at the median time (caught
   with a SQLAlchemy cursor event): whether ``ix_knowledge_entry_search`` is used, and its
   execution time; and how many entries each question's ``tsquery`` matches (the rows ranked).
   The same on SQLite, the development fallback, in a subprocess (settings are read at import):
   the same N entries, fewer questions by default (``--sqlite-queries``).
2. Worker memory on the LLM path: with ``INSTAQUEUE_LLM_URL`` pointing at the fake LLM, D DMs
   (500; quick 100) pre-inserted as rows whose text is a KB question (so no keyword rule matches
   and the reply goes through retrieval + the LLM), sent with ``process_instagram_message.delay``
   in two equal batches. ``VmRSS`` (and ``RssAnon``) of the worker's main process and each pool
   child at rest and after each batch; every row must end ``replied`` with ``reply_path`` 'llm'.
   The per-process figure is printed next to the seed's claim of 200 MB per task.

Figures are printed, never asserted; the only failures are a DM not replied exactly once through
the LLM path, or a failed task: a loud line and exit status 1.

Usage (from the repository root)::

    .venv/bin/python bench/retrieval.py            # 10,000 entries, 500 questions, 500 DMs
    .venv/bin/python bench/retrieval.py --quick    # 2,000 entries, 100 questions, 100 DMs
    .venv/bin/python bench/retrieval.py --entries 20000 --sqlite-queries 50 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# dm_pipeline puts tests/ and the repository root on sys.path.
from dm_pipeline import ROOT, Proc, add_account, percentile, run_batch  # noqa: E402
from memory import children, mib, snapshot  # noqa: E402
from fake_graph import FakeGraph  # noqa: E402
from fake_llm import FakeLLM  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
ACCOUNT = ("17841400000000031", "shop_kb", "TOKEN-bench-retrieval")
FIRST_SENDER = 8_000_000
WARMUP_QUERIES = 10
#: Questions whose tsquery matches are counted (a count(*) each, after the timing).
MATCH_SAMPLE = 100
SETTLE = 1.0  #: seconds between the last result of a batch and the RSS reading
CLAIMED_MB = 200  #: the seed's claim: 200 MB of memory per task
LOOKUP_SQL = "SELECT id FROM knowledge_entry WHERE id = :id"


# Knowledge base and questions #################################################################

MATERIALS = ["linen", "wool", "cotton", "denim", "leather", "silk", "cashmere", "fleece", "canvas", "suede",
             "velvet", "corduroy", "bamboo", "merino", "nylon", "recycled polyester", "hemp", "satin", "tweed",
             "jersey"]
ITEMS = ["shirt", "sweater", "jacket", "dress", "boots", "sneakers", "scarf", "backpack", "hat", "trousers",
         "skirt", "hoodie", "coat", "gloves", "belt", "wallet", "tote bag", "socks", "pyjamas", "blazer",
         "cardigan", "shorts", "beanie", "sandals", "raincoat"]
COUNTRIES = ["Austria", "Belgium", "Bulgaria", "Croatia", "Cyprus", "Czechia", "Denmark", "Estonia", "Finland",
             "France", "Germany", "Greece", "Hungary", "Ireland", "Italy", "Latvia", "Lithuania", "Luxembourg",
             "Malta", "the Netherlands", "Poland", "Portugal", "Romania", "Slovakia", "Slovenia", "Spain", "Sweden",
             "Norway", "Switzerland", "Iceland", "the United Kingdom", "the United States", "Canada", "Australia",
             "New Zealand", "Japan", "South Korea", "Singapore", "Israel", "Mexico"]
COLOURS = ["black", "navy", "olive", "sand", "burgundy", "grey", "ivory", "rust", "forest green", "sky blue"]
CARRIERS = ["DHL", "UPS", "DPD", "GLS", "the national post"]
ORIGINS = ["Portugal", "Italy", "Scotland", "Turkey", "India", "Peru", "Lithuania"]
OPENERS = ["", "", "", "Hi! ", "Hello, ", "Hey, quick question: ", "Good morning! ", "hi there, "]
CLOSERS = ["", "", "", " Thanks!", " thank you", " :)", " Thanks in advance."]

#: (title, tags, answer sentences: the first always, then 0-2 of the others, questions).
PRODUCT_TOPICS: list[tuple[str, str, list[str], list[str]]] = [
    ("Return policy for the {product}", "returns refund send back",
     ["You can return the {product} within {days} days of delivery for a full refund.",
      "Items must be unworn and still have their tags attached.",
      "Returns within the EU are free with the prepaid label in the parcel.",
      "The refund reaches your account within {n} working days of our receiving the item."],
     ["can I send the {product} back if I don't like it?", "I'd like my money back for the {item} I bought",
      "how many days do I have to return a {material} {item}?", "the {product} doesn't suit me, what now?"]),
    ("Sizes of the {product}", "size fit measurements sizing",
     ["The {product} comes in sizes XS to XXL.",
      "It fits true to size; between two sizes, take the larger one.",
      "The measurements of every size are in the size chart on the product page."],
     ["which size of the {product} should I take?", "does the {material} {item} run small?",
      "is the {product} available in XXL?", "I'm usually an M, what fits me in the {item}?"]),
    ("Care instructions for the {product}", "wash laundry care clean",
     ["Wash the {product} at {degrees} degrees, inside out.", "Do not tumble dry; lay it flat to dry.",
      "Dry cleaning is fine but not needed.", "Iron on low heat only."],
     ["how do I clean my {product}?", "can the {material} {item} go in the washing machine?",
      "can I put the {item} in the dryer?", "will the {product} shrink when I wash it?"]),
    ("Materials of the {product}", "fabric composition made",
     ["The {product} is made of {pct} percent {material}.",
      "The fabric is sourced from certified mills in {origin}.",
      "The lining is recycled polyester."],
     ["what fabric is the {product} made from?", "is the {item} pure {material}?",
      "what's the {material} {item} made of exactly?", "where does the fabric of the {item} come from?"]),
    ("Availability of the {product}", "stock sold out restock back",
     ["The {product} is restocked about every {weeks} weeks.",
      "Sign up for the back-in-stock e-mail on the product page.",
      "Popular sizes sell out first, so order early."],
     ["when will the {product} be back in stock?", "is the {material} {item} sold out for good?",
      "the {item} is gone in my size, will it come back?"]),
    ("Warranty on the {product}", "guarantee defect broken",
     ["The {product} has a {years}-year warranty against manufacturing defects.",
      "Send us a photo of the defect and your order number.",
      "Normal wear and tear is not covered."],
     ["my {item} broke after a month, is that covered?", "what guarantee comes with the {product}?",
      "the seam of my {material} {item} came apart, can you replace it?"]),
    ("Colours of the {product}", "colour color shades",
     ["The {product} comes in {colour1}, {colour2} and {colour3}.",
      "Colours may look slightly different on screen.",
      "New colours arrive every season."],
     ["what colors does the {product} come in?", "do you have the {item} in {colour1}?",
      "is there a {colour2} version of the {material} {item}?"]),
    ("Gift wrapping for the {product}", "gift wrap present",
     ["We can gift-wrap the {product} for {fee} EUR; choose it at checkout.",
      "A handwritten card can be added for free.",
      "Gift-wrapped parcels contain no invoice."],
     ["can you wrap the {product} as a present?", "I'm buying the {item} for my sister's birthday, can it be packed nicely?",
      "do you do gift packaging for the {material} {item}?"]),
    ("Exchanges for the {product}", "swap exchange size",
     ["Exchanging the {product} for another size or colour is free within {days} days.",
      "Start the exchange from your account page.",
      "We send the new item as soon as yours is on its way back."],
     ["can I swap my {product} for a different size?", "the {item} is too big, can I get a smaller one?",
      "I want to change the colour of my {material} {item}"]),
    ("Discounts on the {product}", "sale coupon promo code discount",
     ["The {product} is part of our seasonal sale in {month}.",
      "Newsletter subscribers get {pct2} percent off their first order.",
      "Only one discount code applies per order."],
     ["is the {product} ever on sale?", "do you have a promo code for the {item}?",
      "will the {material} {item} be reduced soon?"]),
    ("Delivery time for the {product}", "shipping dispatch arrive days",
     ["The {product} ships within {n} working days.",
      "Express delivery arrives the next working day if you order before 2 pm.",
      "You get a tracking link by e-mail when it leaves the warehouse."],
     ["how fast can you ship the {product}?", "when would a {material} {item} arrive if I order today?",
      "how long until the {item} gets here?"]),
    ("Sustainability of the {product}", "organic eco recycled fair",
     ["The {product} is made from {pct} percent certified {material}.",
      "It is sewn in a fair-trade certified factory in {origin}.",
      "The packaging is plastic-free and recyclable."],
     ["is the {product} eco-friendly?", "how sustainable is the {material} {item}?",
      "who makes the {item} and under what conditions?"]),
    ("Repairs for the {product}", "repair mend fix service",
     ["Our repair service mends the {product} for free in the first year.",
      "After that, a repair is {fee} EUR plus shipping.",
      "Most repairs take about {weeks} weeks."],
     ["can you fix a hole in my {product}?", "the zip on my {item} is stuck, can you mend it?",
      "do you repair old {material} {item_plural}?"]),
    ("Pre-order of the {product}", "preorder release launch",
     ["The new {product} can be pre-ordered now and ships in {month}.",
      "You are charged only when it ships.",
      "Pre-orders can be cancelled any time before shipping."],
     ["can I pre-order the new {product}?", "when is the next {material} {item} released?",
      "can I reserve the {item} before it launches?"]),
    ("Personalisation of the {product}", "monogram embroidery custom initials",
     ["We embroider up to three initials on the {product} for {fee} EUR.",
      "Personalised items cannot be returned.",
      "Embroidery adds {n} working days to delivery."],
     ["can you add my initials to the {item}?", "is embroidery possible on the {product}?",
      "could the {material} {item} get a monogram?"]),
    ("Bulk orders of the {product}", "wholesale bulk company team",
     ["For {min_qty} or more pieces of the {product} we offer wholesale terms.",
      "Write to b2b@example.com with the sizes and quantities you need.",
      "Bulk orders ship within {weeks} weeks."],
     ["we need 40 {item_plural} for our team, can you help?", "do you sell the {product} wholesale?",
      "my company wants the {material} {item} in large quantities"]),
    ("Click and collect for the {product}", "pickup store collect shop",
     ["You can order the {product} online and pick it up in our Berlin store after 2 hours.",
      "Bring your order number or the confirmation e-mail.",
      "Pickup is free."],
     ["can I pick up the {product} in your shop?", "could I collect the {item} in Berlin instead of delivery?",
      "is in-store pickup possible for the {material} {item}?"]),
    ("Sensitive skin and the {product}", "allergy sensitive skin hypoallergenic",
     ["The {product} is tested for harmful substances (OEKO-TEX Standard 100).",
      "It contains no nickel parts.",
      "If you react to {material}, try our organic cotton range instead."],
     ["I have sensitive skin, is the {material} {item} ok?", "is the {product} hypoallergenic?",
      "does the {item} make you itch?"]),
    ("Vegan status of the {product}", "vegan animal",
     ["The {product} is {vegan}.", "Our vegan range is marked with a green leaf.",
      "The glue and dyes we use are free of animal products."],
     ["is the {product} vegan?", "are there animal products in the {material} {item}?",
      "is the {item} suitable for vegans?"]),
    ("Paying for the {product} in instalments", "klarna pay later instalments",
     ["You can pay for the {product} in {parts} interest-free instalments with Klarna.",
      "Choose 'Pay later' at checkout.",
      "Instalments are available for orders from 50 EUR."],
     ["can I pay for the {product} in instalments?", "is pay later possible for the {item}?",
      "can I split the payment for the {material} {item}?"]),
]

COUNTRY_TOPICS: list[tuple[str, str, list[str], list[str]]] = [
    ("Shipping to {country}", "delivery postage abroad international",
     ["We ship to {country} with {carrier}; delivery takes {n} to {n2} working days.",
      "Shipping to {country} is free for orders over {free} EUR.",
      "You get a tracking link as soon as the parcel leaves our warehouse."],
     ["do you deliver to {country}?", "how long does a parcel take to reach {country}?",
      "can I order from {country}?", "what are the shipping fees for {country}?"]),
    ("Customs and duties for {country}", "customs duties import tax VAT",
     ["Orders to {country} may be charged import duties by the local customs office.",
      "Duties are paid by the recipient on delivery.",
      "Orders under {free} EUR usually pass customs without charges."],
     ["will I pay import tax if I order to {country}?", "are there customs fees for {country}?",
      "do I have to pay extra at the door in {country}?"]),
    ("Returns from {country}", "returns abroad label",
     ["Customers in {country} can return items with a prepaid label within {days} days.",
      "Drop the parcel at any {carrier} point.",
      "The refund follows within {n} working days."],
     ["how do I send an item back from {country}?", "is returning free if I live in {country}?",
      "I'm in {country}, how does a refund work?"]),
]

PLURAL = {"boots": "pairs of boots", "sneakers": "pairs of sneakers", "gloves": "pairs of gloves",
          "socks": "packs of socks", "pyjamas": "sets of pyjamas", "trousers": "pairs of trousers",
          "shorts": "pairs of shorts", "sandals": "pairs of sandals", "dress": "dresses", "tote bag": "tote bags"}
MONTHS = ["January", "March", "May", "July", "September", "November"]


def _slots(rng: random.Random, **fixed: str) -> dict[str, Any]:
    colours = rng.sample(COLOURS, 3)
    item = fixed.get("item", "")
    return dict(days=rng.choice([14, 30, 60, 100]), n=rng.randint(2, 5), n2=rng.randint(6, 12),
                degrees=rng.choice([30, 40]), pct=rng.choice([60, 80, 95, 100]), pct2=rng.choice([10, 15]),
                origin=rng.choice(ORIGINS), weeks=rng.randint(2, 8), years=rng.choice([1, 2, 3]),
                colour1=colours[0], colour2=colours[1], colour3=colours[2], fee=rng.choice([3, 5, 8, 15]),
                month=rng.choice(MONTHS), min_qty=rng.choice([20, 30, 50]), parts=rng.choice([3, 4]),
                free=rng.choice([50, 80, 100, 150]), carrier=rng.choice(CARRIERS),
                vegan=rng.choice(["fully vegan", "not vegan: it contains animal fibres"]),
                item_plural=PLURAL.get(item, item + "s"), **fixed)


def _entry(rng: random.Random, topic: tuple[str, str, list[str], list[str]], slots: dict[str, Any],
           extra_tags: str) -> dict[str, Any]:
    title, tags, sentences, questions = topic
    first, rest = sentences[0], sentences[1:]
    chosen = [first] + rng.sample(rest, rng.randint(0, min(2, len(rest))))
    return dict(title=title.format(**slots)[:1].upper() + title.format(**slots)[1:],
                answer=" ".join(s.format(**slots) for s in chosen),
                tags=f"{tags} {extra_tags}".strip(), questions=questions, slots=slots)


def build_corpus(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` entries: every country entry first (120), then product x topic pairs at random."""
    rng = random.Random(seed)
    entries = [_entry(rng, topic, _slots(rng, country=country), country.removeprefix("the ").lower())
               for country in COUNTRIES for topic in COUNTRY_TOPICS]
    pairs = [(m, i, t) for m in MATERIALS for i in ITEMS for t in range(len(PRODUCT_TOPICS))]
    rng.shuffle(pairs)
    for material, item, t in pairs[:max(0, count - len(entries))]:
        slots = _slots(rng, product=f"{material} {item}", material=material, item=item)
        entries.append(_entry(rng, PRODUCT_TOPICS[t], slots, f"{material} {item}"))
    entries = entries[:count]
    titles = Counter(e["title"] for e in entries)
    assert max(titles.values()) == 1, "entry titles must be unique"
    return entries


def build_questions(corpus: list[dict[str, Any]], count: int, seed: int) -> list[tuple[str, str]]:
    """(question, title of the entry it was written for), reproducible from ``seed``."""
    rng = random.Random(seed + 1)
    out = []
    for _ in range(count):
        entry = rng.choice(corpus)
        text = rng.choice(entry["questions"]).format(**entry["slots"])
        opener = rng.choice(OPENERS)
        text = opener + (text[:1].upper() + text[1:] if not opener or opener.endswith("! ") else text)
        out.append((text + rng.choice(CLOSERS), entry["title"]))
    return out


# Retrieval ###################################################################################

def insert_corpus(iq: Any, account_id: int, corpus: list[dict[str, Any]]) -> dict[str, int]:
    """Insert the entries in chunks; title -> id."""
    now = iq.utcnow()
    table = iq.KnowledgeEntry.__table__
    with iq.session() as db:
        for start in range(0, len(corpus), 1000):
            db.execute(iq.sa.insert(table), [
                dict(account_id=account_id, title=e["title"], answer=e["answer"], tags=e["tags"], enabled=True,
                     created_at=now) for e in corpus[start:start + 1000]])
        db.commit()
        rows = db.execute(iq.sa.select(table.c.title, table.c.id).where(table.c.account_id == account_id)).all()
    return {title: entry_id for title, entry_id in rows}


def measure_retrieval(iq: Any, account_id: int, questions: list[tuple[str, str]], ids: dict[str, int],
                      seed: int) -> dict[str, Any]:
    """Each question through retrieve_entries, each followed by one trivial indexed lookup."""
    rng = random.Random(seed + 2)
    all_ids = list(ids.values())
    lookup = iq.sa.text(LOOKUP_SQL)

    def trivial(entry_id: int) -> None:
        with iq.session() as db:
            db.execute(lookup, {"id": entry_id}).scalar_one()

    for question, _ in questions[:WARMUP_QUERIES]:
        iq.retrieve_entries(account_id, question)
        trivial(rng.choice(all_ids))
    retrieval, baseline, first, top3, empty = [], [], 0, 0, 0
    for question, title in questions:
        t0 = time.perf_counter()
        found = iq.retrieve_entries(account_id, question)
        t1 = time.perf_counter()
        trivial(rng.choice(all_ids))
        t2 = time.perf_counter()
        retrieval.append(t1 - t0)
        baseline.append(t2 - t1)
        ranked = [entry.id for entry, _ in found]
        first += bool(ranked) and ranked[0] == ids[title]
        top3 += ids[title] in ranked[:3]
        empty += not ranked
    return dict(retrieval=retrieval, baseline=baseline, first=first, top3=top3, empty=empty, n=len(questions))


def explain_retrieval(iq: Any, account_id: int, question: str) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the very statement retrieve_entries sends for ``question``."""
    engine = iq.get_engine()
    caught: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "ts_rank" in statement:
            caught.append((statement, parameters))

    iq.sa.event.listen(engine, "before_cursor_execute", grab)
    try:
        iq.retrieve_entries(account_id, question)
    finally:
        iq.sa.event.remove(engine, "before_cursor_execute", grab)
    if not caught:
        return ["(retrieve_entries sent no ts_rank statement)"]
    statement, parameters = caught[0]
    with engine.connect() as conn:
        return [row[0] for row in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)]


def count_matches(iq: Any, account_id: int, questions: list[str]) -> list[int]:
    """How many of the account's entries each question's tsquery matches: the rows ts_rank scores."""
    statement = iq.sa.text(
        "SELECT count(*) FROM knowledge_entry WHERE account_id = :a AND enabled "
        f"AND search @@ websearch_to_tsquery('{iq.KB_SEARCH_CONFIG}', :q)")
    with iq.session() as db:
        return [db.execute(statement, {"a": account_id, "q": " or ".join(iq.keywords(q))}).scalar_one()
                for q in questions if iq.keywords(q)]


def ms(values: list[float]) -> str:
    return "  ".join(f"{name} {percentile(values, p) * 1000:8.2f} ms" for name, p in (("p50", 50), ("p95", 95))) \
        + f"  max {max(values) * 1000:8.2f} ms"


def print_retrieval(label: str, result: dict[str, Any]) -> None:
    r, b = result["retrieval"], result["baseline"]
    print(f"  retrieve_entries     {ms(r)}")
    print(f"  lookup by id         {ms(b)}")
    print(f"  ratio                p50 {percentile(r, 50) / percentile(b, 50):6.1f}x   "
          f"p95 {percentile(r, 95) / percentile(b, 95):6.1f}x   "
          f"total {sum(r):.2f} s vs {sum(b):.2f} s over {result['n']} queries")
    print(f"  right entry first    {result['first']}/{result['n']} ({result['first'] / result['n']:.0%}), "
          f"in the top 3 {result['top3']}/{result['n']} ({result['top3'] / result['n']:.0%}), "
          f"nothing found {result['empty']}")


# SQLite (subprocess) #########################################################################

def sqlite_child(args: argparse.Namespace) -> int:
    """Runs with INSTAQUEUE_DATABASE_URL=sqlite:///...: the same corpus, printed as JSON."""
    import instaqueue as iq

    iq.create_tables()
    with iq.session() as db:
        account = iq.Account(ig_user_id=ACCOUNT[0], username=ACCOUNT[1], access_token=ACCOUNT[2])
        db.add(account)
        db.commit()
    corpus = build_corpus(args.entries, args.seed)
    t0 = time.perf_counter()
    ids = insert_corpus(iq, account.id, corpus)
    insert_s = time.perf_counter() - t0
    questions = build_questions(corpus, args.sqlite_queries, args.seed)
    result = measure_retrieval(iq, account.id, questions, ids, args.seed)
    result.update(insert_s=insert_s, entries=len(ids), dialect=iq.get_engine().dialect.name)
    print(json.dumps(result))
    return 0


def run_sqlite(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTAQUEUE_")}
    env.update(INSTAQUEUE_DATABASE_URL=f"sqlite:///{base / 'sqlite' / 'kb.db'}",
               INSTAQUEUE_DATA_DIR=str(base / "sqlite-data"))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--sqlite-child", "--entries",
                           str(args.entries), "--sqlite-queries", str(args.sqlite_queries), "--seed", str(args.seed)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"SQLite subprocess exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Worker memory ###############################################################################

def rss_anon_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def make_kb_rows(iq: Any, fake: FakeGraph, account: Any, questions: list[tuple[str, str]]) -> list[int]:
    """One received DM per question (one sender each, known to the fake so the Send API accepts)."""
    values = []
    now = iq.utcnow()
    for i, (text, _) in enumerate(questions):
        sender = str(FIRST_SENDER + i)
        graph_id = fake.add_dm(account.ig_user_id, sender, text, sender_username=f"k{sender}")
        values.append(dict(
            account_id=account.id, graph_message_id=graph_id,
            conversation_id=fake.conversation_id(account.ig_user_id, sender), sender_id=sender,
            sender_username=f"k{sender}", text=text, created_time=now, received_at=now,
            status=iq.MessageStatus.received, attempts=0, next_attempt_at=now))
    with iq.session() as db:
        rows = db.execute(iq.sa.insert(iq.InboundMessage.__table__).returning(iq.InboundMessage.id), values)
        ids = [row[0] for row in rows]
        db.commit()
    return ids


def memory_phase(iq: Any, fake: FakeGraph, llm: FakeLLM, account: Any, questions: list[tuple[str, str]],
                 ids: dict[str, int], base: Path) -> dict[str, Any]:
    rows = make_kb_rows(iq, fake, account, questions)
    worker = Proc("worker", ["worker", "-n", "bench-kb@%h", "--without-gossip", "--without-mingle"],
                  base / "worker.log", dict(os.environ), " ready.")
    result: dict[str, Any] = dict(problems=[], readings=[])
    try:
        worker.start()
        main_pid = worker.popen.pid
        deadline = time.monotonic() + 30
        while len(children(main_pid)) < CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        pids = [main_pid, *children(main_pid)]

        def reading(label: str, rate: float | None) -> None:
            result["readings"].append((label, snapshot(main_pid), {p: rss_anon_kib(p) for p in pids}, rate))

        reading("at rest", None)
        half = len(rows) // 2
        bad = 0
        for batch, done in ((rows[:half], half), (rows[half:], len(rows))):
            elapsed, failed = run_batch(lambda i, batch=batch: iq.process_instagram_message.delay(batch[i]),
                                        len(batch), timeout=1800)
            bad += failed
            time.sleep(SETTLE)
            reading(f"after {done}", len(batch) / elapsed)
            print(f"  ... {done} DMs done ({len(batch)} in {elapsed:.1f} s, {len(batch) / elapsed:.1f}/s)", flush=True)
        result["main_pid"], result["pids"] = main_pid, pids
    finally:
        worker.stop()

    with iq.session() as db:
        stored = db.exec(iq.select(iq.InboundMessage).where(iq.InboundMessage.id.in_(rows))).all()
    by_id = {row.id: row for row in stored}
    answers = {}
    with iq.session() as db:
        for entry_id, answer in db.execute(iq.sa.select(iq.KnowledgeEntry.id, iq.KnowledgeEntry.answer)):
            answers[entry_id] = answer
    statuses = Counter(str(row.status) for row in stored)
    paths = Counter(str(row.reply_path) for row in stored)
    first_right = sum(1 for row_id, (_, title) in zip(rows, questions)
                      if by_id[row_id].reply_entry_ids and by_id[row_id].reply_entry_ids[0] == ids[title])
    grounded = sum(1 for row in stored if row.reply_entry_ids and row.reply_text == answers.get(row.reply_entry_ids[0]))
    sent = len(fake.sent_messages(account.ig_user_id))
    problems = result["problems"]
    if statuses.get("replied", 0) != len(rows):
        problems.append(f"rows: {dict(statuses)} (expected {len(rows)} replied)")
    if paths.get("llm", 0) != len(rows):
        problems.append(f"reply_path: {dict(paths)} (expected {len(rows)} 'llm')")
    if sent != len(rows):
        problems.append(f"{sent} replies sent for {len(rows)} DMs")
    if len(llm.requests) != len(rows):
        problems.append(f"{len(llm.requests)} LLM requests for {len(rows)} DMs")
    if bad:
        problems.append(f"{bad} tasks did not succeed")
    if grounded != len(rows):
        problems.append(f"{len(rows) - grounded} replies are not the answer of their first grounding entry")
    replaced = [p for p in result["pids"] if any(p not in snap for _, snap, _, _ in result["readings"])]
    if replaced:
        problems.append(f"pool processes came or went during the run (pids {replaced})")
    result.update(dms=len(rows), statuses=statuses, paths=paths, first_right=first_right, llm_requests=len(llm.requests))
    return result


def print_memory(result: dict[str, Any]) -> None:
    readings, main_pid = result["readings"], result["main_pid"]
    labels = [label for label, *_ in readings]
    head = ["process", *labels, "growth", "RssAnon end"]
    widths = [16] + [12] * len(labels) + [10, 13]
    print("  " + "".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    last_rss, last_anon = readings[-1][1], readings[-1][2]
    for n, pid in enumerate(result["pids"]):
        name = f"main {pid}" if pid == main_pid else f"child{n} {pid}"
        a, b = readings[0][1].get(pid), last_rss.get(pid)
        row = [name, *(mib(snap.get(pid)) for _, snap, _, _ in readings),
               f"{(b - a) / 1024:+.1f}" if a and b else "-", mib(last_anon.get(pid))]
        print("  " + "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    sums = [sum(snap.values()) for _, snap, _, _ in readings]
    row = ["sum", *(mib(s) for s in sums), f"{(sums[-1] - sums[0]) / 1024:+.1f}",
           mib(sum(v or 0 for v in last_anon.values()))]
    print("  " + "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    kids = [last_rss[p] for p in result["pids"] if p != main_pid and p in last_rss]
    kids_anon = [last_anon[p] for p in result["pids"] if p != main_pid and last_anon.get(p)]
    mb = 1024 / 1e6  # KiB -> MB
    if kids:
        print(f"  per pool child (one task at a time each) after {result['dms']} DMs: VmRSS "
              f"{min(kids) * mb:.0f}-{max(kids) * mb:.0f} MB, RssAnon {min(kids_anon) * mb:.0f}-"
              f"{max(kids_anon) * mb:.0f} MB   vs the seed's claim: {CLAIMED_MB} MB per task "
              f"({max(kids) * mb / CLAIMED_MB:.2f}x of it at most)")
    print(f"  whole worker (main + {len(kids)} children, VmRSS summed, shared pages counted in each): "
          f"{sum(last_rss.values()) * mb:.0f} MB for {len(kids)} concurrent tasks; "
          f"the claim would make it {CLAIMED_MB * len(kids)} MB + main")
    rates = "  ".join(f"{label}: {rate:.1f} DMs/s" for label, _, _, rate in readings if rate)
    print(f"  DM rate per batch (first enqueue -> last result): {rates}")
    print(f"  rows: {dict(result['statuses'])}, reply_path {dict(result['paths'])}, LLM requests "
          f"{result['llm_requests']}; first grounding entry is the one the question was written for: "
          f"{result['first_right']}/{result['dms']}")


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 entries, 100 queries, 100 DMs")
    parser.add_argument("--entries", type=int, default=None, help="knowledge-base entries (10,000)")
    parser.add_argument("--queries", type=int, default=None, help="retrieval queries on PostgreSQL (500)")
    parser.add_argument("--sqlite-queries", type=int, default=None,
                        help="retrieval queries on SQLite (100; quick 50): each scores every entry in Python")
    parser.add_argument("--dms", type=int, default=None, help="DMs through the LLM path (500)")
    parser.add_argument("--seed", type=int, default=1, help="seed for entries and questions")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    parser.add_argument("--sqlite-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.entries = args.entries or (2000 if args.quick else 10_000)
    args.queries = args.queries or (100 if args.quick else 500)
    args.sqlite_queries = args.sqlite_queries or (50 if args.quick else 100)
    args.dms = args.dms or (100 if args.quick else 500)
    if args.entries < 200 or args.queries < 20 or args.dms < 2 or args.sqlite_queries < 1:
        parser.error("at least 200 entries, 20 queries, 2 DMs and 1 SQLite query")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sqlite_child:
        return sqlite_child(args)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-retrieval-"))
    services: list[Any] = []
    fake = FakeGraph()
    llm: FakeLLM | None = None
    ok = False
    try:
        redis_service = provide_redis(base / "redis")
        services.append(redis_service)
        pg_service = provide_postgres(base / "pg")
        services.append(pg_service)
        for service in (redis_service, pg_service):
            if not service.url:
                print(f"bench: {service.problem}", file=sys.stderr)
                return 2
        fake.start()
        llm = FakeLLM()

        for name in [n for n in os.environ if n.startswith("INSTAQUEUE_") and not n.startswith("INSTAQUEUE_TEST_")]:
            del os.environ[name]
        os.environ.update({
            "INSTAQUEUE_REDIS_URL": redis_service.url,
            "INSTAQUEUE_DATABASE_URL": pg_service.url,
            "INSTAQUEUE_GRAPH_API_URL": fake.url,
            "INSTAQUEUE_DATA_DIR": str(base / "data"),
            "INSTAQUEUE_WORKER_CONCURRENCY": str(CONCURRENCY),
            "INSTAQUEUE_LLM_URL": llm.url,
        })
        import celery
        import instaqueue as iq
        import redis

        iq.create_tables()
        redis.Redis.from_url(redis_service.url).flushdb()
        account = add_account(iq, fake, *ACCOUNT)
        corpus = build_corpus(args.entries, args.seed)
        t0 = time.perf_counter()
        ids = insert_corpus(iq, account.id, corpus)
        with iq.get_engine().connect() as conn:
            conn.exec_driver_sql("ANALYZE knowledge_entry")
            conn.commit()
        insert_s = time.perf_counter() - t0
        questions = build_questions(corpus, args.queries, args.seed)
        dm_questions = build_questions(corpus, args.dms, args.seed + 100)
        words = [len(iq.keywords(q)) for q, _ in questions]

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue knowledge-base retrieval benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}, load average "
              f"{os.getloadavg()[0]:.2f}")
        print(f"  services  Redis ({redis_service.how}), PostgreSQL ({pg_service.how}), fake Graph API and fake "
              f"LLM in the benchmark process")
        print(f"  settings  kb top-k {iq.KB_TOP_K}, text search config '{iq.KB_SEARCH_CONFIG}', kb_min_score "
              f"{s.kb_min_score:g}, worker_concurrency {s.worker_concurrency} (prefork), llm_url {s.llm_url}")
        print(f"  corpus    {len(ids)} entries of one account ({len(ids) - len(COUNTRIES) * len(COUNTRY_TOPICS)} "
              f"product x topic, {len(COUNTRIES) * len(COUNTRY_TOPICS)} country), inserted + ANALYZE in "
              f"{insert_s:.1f} s; {len(questions)} questions ({percentile(words, 50):.0f} keywords median, "
              f"{max(words)} max), e.g. {questions[0][0]!r}")
        print(f"  logs      {base}", flush=True)

        # 1. Retrieval on PostgreSQL
        pg = measure_retrieval(iq, account.id, questions, ids, args.seed)
        median_at = sorted(range(len(pg["retrieval"])), key=pg["retrieval"].__getitem__)[len(pg["retrieval"]) // 2]
        plan = explain_retrieval(iq, account.id, questions[median_at][0])
        matches = count_matches(iq, account.id, [q for q, _ in questions[:MATCH_SAMPLE]])
        print()
        print(f"1. Retrieval for one DM, {len(ids)} entries on PostgreSQL, {pg['n']} queries in process "
              f"(each followed by one lookup by id):")
        print_retrieval("PostgreSQL", pg)
        used = any("ix_knowledge_entry_search" in line for line in plan)
        exec_line = next((line.strip() for line in plan if line.startswith("Execution Time")), "?")
        print(f"  EXPLAIN ANALYZE of the median query {questions[median_at][0]!r}:")
        print(f"    GIN index ix_knowledge_entry_search used: {'YES' if used else 'NO'};  {exec_line}")
        for line in plan:
            print(f"    | {line}")
        if matches:
            print(f"  entries matched by the tsquery (all ranked by ts_rank), first {len(matches)} questions: "
                  f"median {percentile(matches, 50):.0f} ({percentile(matches, 50) / len(ids):.0%}), p95 "
                  f"{percentile(matches, 95):.0f}, max {max(matches)} of {len(ids)}")
        print(f"  ... SQLite: inserting {len(ids)} entries and running {args.sqlite_queries} queries in a "
              f"subprocess", flush=True)
        lite = run_sqlite(args, base)
        print(f"SQLite (the development fallback: every entry of the account loaded and scored in Python), "
              f"{lite['entries']} entries, {lite['n']} queries in process (each followed by one lookup by id):")
        print_retrieval("SQLite", lite)
        print(f"  PostgreSQL vs SQLite retrieval p50: {percentile(pg['retrieval'], 50) * 1000:.2f} ms vs "
              f"{percentile(lite['retrieval'], 50) * 1000:.2f} ms "
              f"({percentile(lite['retrieval'], 50) / percentile(pg['retrieval'], 50):.1f}x)")

        # 2. Worker memory on the LLM path
        print()
        print(f"2. Worker RSS (VmRSS, MiB) per process, LLM path on, {args.dms} DMs through retrieval + the fake "
              f"LLM over the same {len(ids)} entries, in two batches:", flush=True)
        mem = memory_phase(iq, fake, llm, account, dm_questions, ids, base)
        print_memory(mem)
        for problem in mem["problems"]:
            print(f"!!! MISMATCH: {problem}")
        if mem["problems"]:
            print(f"!!! logs kept in {base}")
            return 1
        ok = True
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        fake.stop()
        if llm is not None:
            llm.stop()
        for service in services:
            service.stop()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif not ok:
            print(f"logs kept in {base}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
