"""Synthetic creators with clearly different styles, for demos and tests.

Each account has a genre, emoji habit, hashtag set, sentence length, catch-phrases, casing
and posting cadence, so a model fine-tuned on one should be told apart from the others.
Deterministic for a seed. Records come out as a TikTok scraper would export them
(`desc`, `authorMeta.name`, `createTime`, `challenges`, `playCount`, `diggCount`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

GENRES: dict[str, dict] = {
    "product_showcase": {
        "subjects": ["this serum", "the new air fryer", "these wireless earbuds", "my fave lip oil",
                     "this desk lamp", "the viral water bottle", "this mini projector", "these running shoes"],
        "verbs": ["changed my whole routine", "is actually worth the hype", "sold out twice already",
                  "lasts all day", "costs less than lunch", "is on sale right now"],
        "tags": ["tiktokmademebuyit", "amazonfinds", "musthaves", "unboxing", "review", "ad"],
        "emoji": ["✨", "🛒", "💸", "🔥", "😍", "📦"],
    },
    "vlog": {
        "subjects": ["today", "this morning", "our sunday reset", "the farmers market", "my commute",
                     "a slow weekend", "moving day", "my 5am routine"],
        "verbs": ["was chaotic but cute", "felt like a movie", "needed more coffee",
                  "ended with tacos", "was exactly what I needed", "did not go as planned"],
        "tags": ["dayinmylife", "vlog", "minivlog", "routine", "slowliving", "weekendvibes"],
        "emoji": ["☕", "🌿", "🌞", "📷", "🧺", "💛"],
    },
    "storytelling": {
        "subjects": ["my landlord", "the guy at the gym", "my grandma", "a stranger on the train",
                     "my old boss", "the wedding DJ", "my roommate", "a customer last night"],
        "verbs": ["said something I will never forget", "did the most unhinged thing",
                  "taught me a lesson", "ruined the whole party", "turned out to be a legend",
                  "left a note on my door"],
        "tags": ["storytime", "storytelling", "truestory", "part2", "fyp", "plottwist"],
        "emoji": ["😳", "💀", "👀", "😭", "🤯", "🙃"],
    },
    "educational": {
        "subjects": ["compound interest", "the Pomodoro method", "how vaccines train your immune system",
                     "why the sky is blue", "index funds", "the Roman aqueducts", "sleep cycles",
                     "the Krebs cycle"],
        "verbs": ["explained in 60 seconds", "in three steps", "is simpler than you think",
                  "and why it matters", "myths vs facts", "the way school never taught it"],
        "tags": ["learnontiktok", "edutok", "didyouknow", "sciencetok", "studytips", "moneytok"],
        "emoji": ["📚", "🧠", "💡", "✅", "📈", "🔬"],
    },
    "fitness": {
        "subjects": ["leg day", "this 10 minute core burner", "my deadlift PR", "zone 2 cardio",
                     "the stairmaster", "mobility work", "my protein breakfast", "rest days"],
        "verbs": ["is non negotiable", "hits different", "changed my posture", "is how you get stronger",
                  "humbled me", "for beginners"],
        "tags": ["gymtok", "fitness", "workout", "legday", "fitnessmotivation", "homeworkout"],
        "emoji": ["💪", "🏋️", "🔥", "🥵", "🏃", "🥚"],
    },
    "food": {
        "subjects": ["this 15 minute pasta", "grandma's dumplings", "crispy rice salad", "the best smash burger",
                     "3 ingredient cookies", "miso butter salmon", "street tacos", "overnight oats"],
        "verbs": ["will live in my head forever", "is dinner sorted", "but make it spicy",
                  "is meal prep gold", "for under 5 dollars", "tastes like a restaurant"],
        "tags": ["foodtok", "recipe", "easyrecipe", "cooking", "whatieatinaday", "dinnerideas"],
        "emoji": ["🍝", "🥟", "🌮", "🤤", "🧄", "🍳"],
    },
    "travel": {
        "subjects": ["Lisbon", "this hidden beach in Bali", "Kyoto in spring", "a night train to Vienna",
                     "Mexico City street food", "the Dolomites", "Seoul on a budget", "Iceland's ring road"],
        "verbs": ["should be on your list", "on a budget", "without the crowds", "in 48 hours",
                  "broke my heart in the best way", "is even better in person"],
        "tags": ["traveltok", "travel", "bucketlist", "wanderlust", "hiddengems", "budgettravel"],
        "emoji": ["✈️", "🌍", "🏝️", "🗺️", "🚆", "🌅"],
    },
    "comedy": {
        "subjects": ["me pretending to be productive", "my cat at 3am", "every group project ever",
                     "when the wifi drops", "my mom reading my texts", "me on day 2 of a diet",
                     "the group chat", "my brain during exams"],
        "verbs": ["is a whole mood", "sends me every time", "is not okay", "is my villain origin story",
                  "deserves an oscar", "pov edition"],
        "tags": ["comedy", "relatable", "funny", "pov", "skit", "memes"],
        "emoji": ["😂", "🤣", "💀", "😭", "🙈", "🤡"],
    },
}


@dataclass(frozen=True)
class Persona:
    account_id: str
    genre: str
    emoji_rate: float  # emoji per sentence
    sentence_words: tuple[int, int]
    casing: str  # "normal" | "lower" | "shouty"
    opener: str
    closer: str
    hours_between_posts: float
    n_tags: int
    cjk: bool = False


OPENERS = ["ok so", "hear me out:", "PSA:", "not me", "real talk,", "quick one:", "bestie,", "y'all."]
CLOSERS = ["follow for part 2", "link in bio", "save this for later", "which one are you?",
           "tell me I'm not the only one", "see you tomorrow", "drop a 🔥 if you agree", "no gatekeeping"]
FILLER = ["honestly", "literally", "low key", "for real", "again", "btw", "lol", "ngl"]
CJK_LINES = ["今天也要加油", "好吃到哭", "周末快乐", "超级推荐", "第一次尝试"]


def make_personas(n: int, seed: int = 0) -> list[Persona]:
    rng = random.Random(seed)
    genres = list(GENRES)
    out = []
    for i in range(n):
        genre = genres[i % len(genres)]
        out.append(
            Persona(
                account_id=f"synth_{genre}_{i:03d}",
                genre=genre,
                emoji_rate=rng.choice([0.0, 0.3, 1.0, 2.5]),
                sentence_words=rng.choice([(4, 8), (8, 14), (14, 24)]),
                casing=rng.choice(["normal", "normal", "lower", "shouty"]),
                opener=rng.choice(OPENERS),
                closer=rng.choice(CLOSERS),
                hours_between_posts=rng.choice([6.0, 24.0, 72.0]),
                n_tags=rng.choice([1, 3, 5]),
                cjk=(i % 5 == 4),
            )
        )
    return out


def _sentence(p: Persona, rng: random.Random) -> str:
    g = GENRES[p.genre]
    words = f"{rng.choice(g['subjects'])} {rng.choice(g['verbs'])}".split()
    lo, hi = p.sentence_words
    while len(words) < rng.randint(lo, hi):
        words.insert(rng.randint(1, len(words)), rng.choice(FILLER))
    s = " ".join(words)
    if p.casing == "lower":
        s = s.lower()
    elif p.casing == "shouty" and rng.random() < 0.5:
        s = s.upper()
    else:
        s = s[0].upper() + s[1:]
    n_emoji = int(p.emoji_rate) + (rng.random() < p.emoji_rate % 1)
    return s + ("!" if rng.random() < 0.4 else ".") + "".join(" " + rng.choice(g["emoji"]) for _ in range(n_emoji))


def make_post(p: Persona, rng: random.Random) -> tuple[str, list[str]]:
    parts = [p.opener] if rng.random() < 0.6 else []
    parts += [_sentence(p, rng) for _ in range(rng.randint(1, 3))]
    if p.cjk and rng.random() < 0.5:
        parts.append(rng.choice(CJK_LINES))
    if rng.random() < 0.5:
        parts.append(p.closer)
    text = " ".join(parts)
    tags = rng.sample(GENRES[p.genre]["tags"], k=min(p.n_tags, len(GENRES[p.genre]["tags"])))
    if rng.random() < 0.3:
        text += "\n\n" + " ".join(f"#{t}" for t in tags)  # some creators put tags in the caption
    return text, tags


def generate_records(n_accounts: int = 8, posts_per_account: int = 120, seed: int = 0,
                     start: datetime = datetime(2024, 1, 1, tzinfo=timezone.utc)) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for p in make_personas(n_accounts, seed):
        t = start + timedelta(hours=rng.uniform(0, 48))
        for j in range(posts_per_account):
            text, tags = make_post(p, rng)
            t += timedelta(hours=rng.expovariate(1.0 / p.hours_between_posts) + 0.1)
            views = int(rng.lognormvariate(9, 1.5))
            records.append({
                "id": f"{p.account_id}-{j:05d}",
                "desc": text,
                "createTime": int(t.timestamp()),
                "authorMeta": {"name": p.account_id, "verified": rng.random() < 0.1},
                "challenges": [{"title": tag} for tag in tags],
                "playCount": views,
                "diggCount": int(views * rng.uniform(0.02, 0.15)),
                "genre": p.genre,
                "musicMeta": {"musicName": rng.choice(["original sound", "trending audio", "lofi beat"])},
            })
    return records


def write_jsonl(records: list[dict], path: str) -> str:
    from tkllm_ray.storage import write_text

    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
