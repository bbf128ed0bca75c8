"""The synthetic speech corpus: command grammar, espeak-ng voices, update sets, synthesis.

Everything here is a pure function of a :class:`CorpusConfig` except the synthesis of
audio, and that is deterministic too: utterance ``i`` of split ``s`` draws all of its
choices (text, speaker, speed, pitch, noise...) from its own generator seeded with
``(seed, s, i)``, so it does not depend on the number of workers or on what was generated
before. Invariants:

- **Speakers split by voice, not by utterance.** A speaker is an espeak-ng accent plus a
  variant (``en-gb-scotland+m3``). The variants are partitioned into train, dev and test
  sets, so no test voice timbre is ever heard in training, while every accent (the
  *cohort*) appears in every split and accuracy can be reported per cohort.
- **Update sets bring only their new words.** Each :class:`UpdateSet` adds ten words
  that the base grammar never produces (athletes, places, artists, names, foods); every
  other word of its sentences is a base word, and every sentence holds a new word.
- **Same seed, same bytes.** Audio is synthesized by espeak-ng at 22.05 kHz, resampled to
  16 kHz in the frequency domain (which also applies the small speed perturbation),
  padded, scaled and mixed with noise in float64 numpy, then stored as int16 PCM.

  (Bytes are reproducible with the same espeak-ng and numpy builds.)

The cache lives under an explicit directory, in a sub-directory named by the digest of
the format version, seed, shard size and espeak-ng version -- not the split sizes, so a
small corpus is a prefix of a large one and shares its shards. Each split is a sequence
of shards (``shard-00000.npy`` with the concatenated int16 audio, and
``shard-00000.json`` with the uids and lengths, written last: a shard without its JSON,
or with fewer utterances than the split size asks for, is made again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from asr import CorpusError, SynthesisError
from diffs.fileio import atomic_output

CORPUS_FORMAT = 1
"""Bump when anything that changes the generated audio or texts changes."""

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050
DEFAULT_CACHE_DIR = Path(".cache/asr-corpus")

# --------------------------------------------------------------------------- voices

ACCENTS: tuple[str, ...] = (
    "en-us",
    "en-us-nyc",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
)
"""The espeak-ng English voices; each one is a cohort."""

TEST_VARIANTS: tuple[str, ...] = (
    "m4",
    "f3",
    "klatt3",
    "Andrea",
    "Diogo",
    "iven2",
    "robert",
    "steph2",
    "travis",
    "grandpa",
    "anika",
    "edward2",
)
"""Voice variants heard only in test sets (base and update)."""

DEV_VARIANTS: tuple[str, ...] = ("m6", "f4", "klatt5", "Gene2", "belinda", "quincy")
"""Voice variants heard only in the dev set (model selection)."""

TRAIN_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m5", "m7", "m8", "f1", "f2", "f5",
    "klatt", "klatt2", "klatt4", "Alex", "Alicia", "Andy", "Annie", "AnxiousAndy",
    "Denis", "Gene", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael",
    "Mike", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky",
    "UniRobot", "adam", "anikaRobot", "antonio", "aunty", "benjamin", "boris", "croak",
    "david", "ed", "edward", "grandma", "gustave", "iven", "iven3", "iven4", "john",
    "kaukovalta", "linda", "marcelo", "max", "michel", "miguel", "norbert", "pablo",
    "paul", "pedro", "rob", "robosoft", "robosoft2", "robosoft3", "robosoft4",
    "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby", "steph",
    "steph3", "victor", "zac",
)  # fmt: skip
"""Voice variants heard in training. Left out of every split: ``whisper``, ``whisperf``,
``Demonic`` and ``announcer`` (barely intelligible), ``fast``, ``Mr serious``, ``caleb``
and ``klatt6`` (byte-identical to other variants)."""

SPEED_WPM = (130, 180)
"""Range of a speaker's base speaking rate (espeak ``-s``); each utterance moves +-8."""
PITCH = (25, 75)
"""Range of a speaker's base pitch (espeak ``-p``, 0-99); each utterance moves +-8."""


@dataclass(frozen=True, order=True)
class Speaker:
    """One synthetic speaker: an espeak-ng accent and voice variant."""

    accent: str
    variant: str

    @property
    def voice(self) -> str:
        """The espeak-ng ``-v`` argument."""
        return f"{self.accent}+{self.variant}"

    @property
    def cohort(self) -> str:
        return self.accent


def speakers(variants: Iterable[str]) -> list[Speaker]:
    """Every accent with every one of ``variants``."""
    return [Speaker(accent, variant) for variant in variants for accent in ACCENTS]


# --------------------------------------------------------------------------- grammar

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
          "seventeen", "eighteen", "nineteen"]  # fmt: skip
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """``n`` (0-999) in words, as spoken in commands: ``three hundred forty two``."""
    if not 0 <= n < 1000:
        raise ValueError(f"{n} is out of range")
    if n < 10:
        return _ONES[n]
    if n < 20:
        return _TEENS[n - 10]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens - 2] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + ("" if rest == 0 else " " + number_words(rest))


def _numbers(low: int, high: int) -> tuple[str, ...]:
    return tuple(number_words(n) for n in range(low, high + 1))


Slots = Mapping[str, tuple[str, ...]]
"""Slot name -> alternatives; an alternative may hold ``{slot}`` references."""


@dataclass(frozen=True)
class Domain:
    """A family of commands: its sentence templates (choices are uniform)."""

    name: str
    templates: tuple[str, ...]


BASE_SLOTS: dict[str, tuple[str, ...]] = {
    "digit": tuple(_ONES),
    "small_number": _numbers(1, 20),
    "count": _numbers(2, 59),
    "number": _numbers(1, 999),
    "hour": _numbers(1, 12),
    "minutes": _numbers(10, 59),
    "percent": (
        *(number_words(n) for n in (10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90)),
        "one hundred",
    ),
    "temperature": _numbers(60, 80),
    "duration": (
        "{count} minutes",
        "{count} seconds",
        "{count} hours",
        "one minute",
        "one hour",
        "half an hour",
        "an hour and a half",
        "a minute",
        "an hour",
        "{count} minutes and {count} seconds",
    ),
    "clock": (
        "{hour}",
        "{hour} o'clock",
        "{hour} {minutes}",
        "{hour} thirty",
        "{hour} fifteen",
        "{hour} forty five",
        "{hour} oh five",
        "noon",
        "midnight",
    ),
    "clock_time": (
        "{clock}",
        "{clock} in the morning",
        "{clock} in the evening",
        "{clock} in the afternoon",
        "{clock} at night",
    ),
    "weekday": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "when": (
        "today",
        "tomorrow",
        "tonight",
        "this weekend",
        "this afternoon",
        "this evening",
        "this morning",
        "on {weekday}",
        "next week",
        "tomorrow morning",
        "tomorrow night",
        "next {weekday}",
    ),
    "past_day": ("today", "yesterday", "this morning", "last night", "on {weekday}"),
    "timer_name": (
        "pasta", "egg", "pizza", "laundry", "oven", "tea", "bread", "rice", "workout",
        "cookie", "nap", "kitchen",
    ),
    "genre": (
        "jazz", "rock", "pop", "classical", "country", "blues", "hip hop", "folk", "reggae",
        "soul", "disco", "metal", "dance", "piano", "relaxing", "christmas", "eighties",
        "nineties",
    ),
    "artist": (
        "adele", "madonna", "queen", "the beatles", "elvis", "coldplay", "abba", "beyonce",
        "prince", "drake", "shakira", "nirvana", "metallica", "eminem", "rihanna", "oasis",
        "taylor swift", "bruno mars", "ed sheeran", "lady gaga", "bob marley",
        "frank sinatra", "johnny cash", "michael jackson", "the rolling stones",
        "pink floyd", "elton john", "billie eilish",
    ),
    "playlist": (
        "workout", "morning", "party", "dinner", "favorite", "road trip", "study", "sleep",
        "running", "chill", "summer",
    ),
    "updown": ("up", "down"),
    "onoff": ("on", "off"),
    "contact": (
        "mom", "dad", "grandma", "grandpa", "john", "mary", "david", "sarah", "michael",
        "emma", "james", "olivia", "peter", "linda", "robert", "susan", "tom", "kate", "alex",
        "chris", "anna", "paul", "lisa", "mark", "laura", "steve", "jessica", "daniel",
        "the office", "the doctor", "my sister", "my brother", "my wife", "my husband",
        "the dentist",
    ),
    "message": (
        "i'm running late", "i'll be home soon", "call me back", "see you tonight",
        "dinner is ready", "i'm on my way", "happy birthday", "i love you", "where are you",
        "don't forget the milk", "the meeting is canceled", "i'm at the store",
        "let's meet at {clock}",
    ),
    "room": (
        "kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage",
        "dining room", "basement", "nursery", "porch", "kids room", "guest room", "attic",
        "laundry room",
    ),
    "color": (
        "red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "warm white",
        "daylight",
    ),
    "brightness": ("brighter", "dimmer", "warmer", "cooler"),
    "appliance": (
        "tv", "television", "fan", "heater", "air conditioner", "coffee maker", "dishwasher",
        "washing machine", "dryer", "oven", "radio", "speaker", "kettle", "printer",
    ),
    "door": ("front door", "back door", "garage door", "side door"),
    "opening": ("blinds", "curtains", "garage door", "window", "shades"),
    "city": (
        "london", "paris", "boston", "chicago", "seattle", "denver", "dallas", "miami",
        "toronto", "sydney", "berlin", "madrid", "rome", "dublin", "tokyo", "new york",
        "los angeles", "san francisco", "atlanta", "houston", "phoenix", "portland",
        "vancouver", "montreal", "amsterdam", "vienna", "prague", "lisbon", "athens",
        "cairo", "moscow", "beijing", "delhi", "mumbai",
    ),
    "unit": (
        "miles", "kilometers", "pounds", "kilograms", "ounces", "grams", "cups", "liters",
        "inches", "centimeters", "feet", "meters", "gallons", "days", "weeks", "hours",
    ),
    "unit_one": (
        "mile", "kilometer", "pound", "kilogram", "ounce", "gram", "cup", "liter", "inch",
        "foot", "meter", "gallon", "day", "week", "year", "hour",
    ),
    "task": (
        "call the dentist", "buy milk", "take out the trash", "water the plants",
        "pick up the kids", "feed the cat", "walk the dog", "pay the bills", "book a table",
        "take my medicine", "charge my phone", "send the report", "clean the kitchen",
        "check the mail", "call {contact}",
    ),
    "item": (
        "milk", "eggs", "bread", "butter", "cheese", "apples", "bananas", "coffee", "tea",
        "rice", "pasta", "tomatoes", "chicken", "orange juice", "cereal", "yogurt", "onions",
        "potatoes", "carrots", "sugar", "flour", "soap", "toilet paper", "dog food",
        "peanut butter", "olive oil", "lemons", "garlic", "salmon", "ice cream",
        "paper towels", "batteries", "salt", "honey",
    ),
    "place": (
        "home", "work", "the airport", "the train station", "the office", "the mall",
        "the beach", "the park", "the hospital", "downtown", "the gym", "school", "{city}",
    ),
    "business": (
        "coffee shop", "gas station", "pharmacy", "restaurant", "grocery store", "bank",
        "hospital", "pizza place", "hotel", "gym", "library", "post office", "bakery",
        "bookstore", "movie theater", "hardware store", "italian restaurant",
        "chinese restaurant",
    ),
    "topic": (
        "sports", "politics", "science", "technology", "business", "movies", "music",
        "the economy", "the election", "health", "space", "the olympics",
    ),
    "team": (
        "lakers", "yankees", "red sox", "patriots", "giants", "bulls", "celtics", "warriors",
        "cowboys", "eagles", "dodgers", "rangers", "packers", "raiders", "mets", "cubs",
    ),
    "event": (
        "swimming", "marathon", "cycling", "rowing", "sprint", "relay", "hundred meter",
        "four hundred meter", "freestyle", "backstroke", "high jump", "long jump",
        "pole vault", "hurdles", "mile",
    ),
    "country": (
        "the united states", "canada", "france", "germany", "japan", "china", "australia",
        "britain", "italy", "spain", "brazil", "kenya", "jamaica", "norway", "sweden",
        "poland", "ireland", "mexico",
    ),
}  # fmt: skip

BASE_DOMAINS: tuple[Domain, ...] = (
    Domain(
        "timers",
        (
            "set a timer for {duration}",
            "set a {count} minute timer",
            "start a timer for {duration}",
            "set a {timer_name} timer for {duration}",
            "cancel the {timer_name} timer",
            "cancel my timer",
            "how much time is left",
            "how much time is left on the {timer_name} timer",
            "pause the timer",
            "stop the timer",
            "resume the timer",
            "set an alarm for {clock_time}",
            "set an alarm for {clock_time} {when}",
            "wake me up at {clock_time}",
            "wake me up {when} at {clock}",
            "cancel my alarm for {when}",
            "snooze the alarm",
            "turn off the alarm",
            "what alarms do i have {when}",
        ),
    ),
    Domain(
        "music",
        (
            "play {genre} music",
            "play some {genre}",
            "play {genre} music in the {room}",
            "play music by {artist}",
            "play {artist}",
            "play songs by {artist}",
            "play the latest album by {artist}",
            "shuffle my {playlist} playlist",
            "play my {playlist} playlist",
            "add this song to my {playlist} playlist",
            "skip this song",
            "play the next song",
            "play the previous song",
            "pause the music",
            "stop the music",
            "resume the music",
            "what song is this",
            "who sings this song",
            "turn the volume {updown}",
            "turn it {updown}",
            "set the volume to {small_number}",
            "play the radio",
        ),
    ),
    Domain(
        "calls",
        (
            "call {contact}",
            "call {contact} on speaker",
            "call {contact} at home",
            "call {contact} at work",
            "video call {contact}",
            "send a message to {contact}",
            "text {contact} {message}",
            "tell {contact} {message}",
            "send {contact} a message saying {message}",
            "read my messages",
            "read my new messages",
            "do i have any missed calls",
            "hang up",
            "answer the call",
            "redial the last number",
            "call {digit} {digit} {digit} {digit} {digit} {digit} {digit}",
            "dial {digit} {digit} {digit} {digit} {digit} {digit} {digit}",
            "who called me {past_day}",
            "call back {contact}",
        ),
    ),
    Domain(
        "home",
        (
            "turn {onoff} the lights",
            "turn {onoff} the {room} lights",
            "turn the {room} lights {onoff}",
            "turn the lights {onoff} in the {room}",
            "switch {onoff} the {room} lights",
            "dim the {room} lights",
            "dim the lights to {percent} percent",
            "set the {room} lights to {percent} percent",
            "set the {room} lights to {color}",
            "change the lights to {color}",
            "make the {room} lights {brightness}",
            "set the thermostat to {temperature} degrees",
            "turn the heat {updown}",
            "turn {onoff} the {appliance}",
            "turn the {appliance} {onoff}",
            "lock the {door}",
            "unlock the {door}",
            "is the {door} locked",
            "open the {opening}",
            "close the {opening}",
            "start the vacuum",
            "stop the vacuum",
            "what's the temperature inside",
            "what's the temperature in the {room}",
        ),
    ),
    Domain(
        "weather",
        (
            "what's the weather {when}",
            "what's the weather like {when}",
            "what's the weather in {city}",
            "what's the weather in {city} {when}",
            "what's the weather going to be like {when}",
            "will it rain {when}",
            "will it rain in {city} {when}",
            "is it going to snow {when}",
            "do i need an umbrella {when}",
            "do i need a jacket {when}",
            "how hot will it be {when}",
            "how cold is it outside",
            "what's the forecast for {when}",
            "what's the forecast for {city}",
            "how windy is it in {city}",
            "what's the temperature in {city}",
            "when is sunset {when}",
            "when is sunrise {when}",
            "is it sunny in {city}",
        ),
    ),
    Domain(
        "numbers",
        (
            "what is {number} plus {number}",
            "what's {number} plus {number}",
            "what is {number} minus {number}",
            "what's {number} times {small_number}",
            "what is {number} divided by {small_number}",
            "what's {percent} percent of {number}",
            "what is the square root of {number}",
            "convert {number} {unit} to {unit}",
            "how many {unit} are in a {unit_one}",
            "count to {small_number}",
            "pick a number between one and {number}",
            "roll a die",
            "flip a coin",
            "what's {number} squared",
        ),
    ),
    Domain(
        "lists",
        (
            "remind me to {task} {when}",
            "remind me to {task} at {clock_time}",
            "remind me {when} to {task}",
            "add {item} to my shopping list",
            "add {item} to the list",
            "put {item} on my shopping list",
            "remove {item} from my shopping list",
            "what's on my shopping list",
            "clear my shopping list",
            "what's on my calendar {when}",
            "what's my next appointment",
            "schedule a meeting with {contact} {when} at {clock}",
            "cancel my meeting with {contact}",
            "move my {clock} meeting to {clock}",
        ),
    ),
    Domain(
        "general",
        (
            "what time is it",
            "what time is it in {city}",
            "what's the date today",
            "what day is it",
            "tell me a joke",
            "tell me a story",
            "read the news",
            "what's the latest news",
            "what's the latest news about {topic}",
            "how far is it to {city}",
            "navigate to {place}",
            "take me to {place}",
            "directions to the nearest {business}",
            "find a {business} near me",
            "find the nearest {business}",
            "how long will it take to get to {place}",
            "what's the traffic like",
            "what's the traffic like on the way to {place}",
            "stop",
            "cancel",
            "never mind",
            "thank you",
            "good morning",
            "good night",
            "what can you do",
            "repeat that",
        ),
    ),
    Domain(
        "sports",
        (
            "who won the game last night",
            "what's the score of the {team} game",
            "when do the {team} play next",
            "did the {team} win",
            "show me the highlights of the {team} game",
            "who won the {event} race",
            "what are the results of the {event} final",
            "how many medals does {country} have",
            "when is the {event} final",
            "show me the medal table",
            "who will win the {team} or the {team}",
            "play the highlights of the {event}",
        ),
    ),
)


@dataclass(frozen=True)
class UpdateSet:
    """New words the base model never heard, and the commands that carry them."""

    name: str
    description: str
    slot: str
    """The slot of :attr:`templates` that holds a new word."""
    new_words: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def domain(self) -> Domain:
        return Domain(self.name, self.templates)

    @property
    def slots(self) -> dict[str, tuple[str, ...]]:
        return {**BASE_SLOTS, self.slot: self.new_words}


UPDATE_SETS: tuple[UpdateSet, ...] = (
    UpdateSet(
        "swimmers",
        "Olympic swimmers",
        "swimmer",
        ("ledecky", "dressel", "peaty", "titmus", "mckeon", "marchand", "popovici",
         "mcintosh", "finke", "sjostrom"),
        (
            "how did {swimmer} do in the {event} final",
            "how did {swimmer} do {past_day}",
            "show me the highlights of {swimmer}",
            "when does {swimmer} race next",
            "did {swimmer} win the {event} final",
            "what's the latest news about {swimmer}",
            "how many medals does {swimmer} have",
            "who won the race {swimmer} or {swimmer}",
            "play the highlights of {swimmer} in the {event}",
        ),
    ),
    UpdateSet(
        "places",
        "Olympic venues and cities",
        "new_city",
        ("kalisz", "gdansk", "wroclaw", "tbilisi", "reykjavik", "ljubljana", "bratislava",
         "marrakesh", "cusco", "oaxaca"),
        (
            "what's the weather in {new_city}",
            "what's the weather in {new_city} {when}",
            "will it rain in {new_city} {when}",
            "what time is it in {new_city}",
            "how far is it to {new_city}",
            "navigate to {new_city}",
            "take me to {new_city}",
            "what's the temperature in {new_city}",
            "what's the forecast for {new_city}",
            "find a {business} in {new_city}",
        ),
    ),
    UpdateSet(
        "artists",
        "Music artists",
        "new_artist",
        ("lizzo", "hozier", "stromae", "rosalia", "khalid", "kygo", "avicii", "bjork",
         "zedd", "sade"),
        (
            "play {new_artist}",
            "play music by {new_artist}",
            "play songs by {new_artist}",
            "play the latest album by {new_artist}",
            "play {new_artist} in the {room}",
            "add {new_artist} to my {playlist} playlist",
            "what's the latest news about {new_artist}",
            "play {new_artist} and {artist}",
        ),
    ),
    UpdateSet(
        "contacts",
        "Irish first names in the contact list",
        "new_contact",
        ("siobhan", "niamh", "saoirse", "aoife", "oisin", "tadhg", "grainne", "caoimhe",
         "ciaran", "eoin"),
        (
            "call {new_contact}",
            "call {new_contact} on speaker",
            "video call {new_contact}",
            "send a message to {new_contact}",
            "text {new_contact} {message}",
            "tell {new_contact} {message}",
            "remind me to call {new_contact} {when}",
            "schedule a meeting with {new_contact} {when} at {clock}",
        ),
    ),
    UpdateSet(
        "foods",
        "Foods on the shopping list",
        "food",
        ("quinoa", "gnocchi", "tzatziki", "halloumi", "kimchi", "sriracha", "tahini",
         "edamame", "chorizo", "gochujang"),
        (
            "add {food} to my shopping list",
            "add {food} to the list",
            "put {food} on my shopping list",
            "remove {food} from my shopping list",
            "add {food} and {item} to my shopping list",
            "remind me to buy {food} {when}",
            "find a {business} near me with {food}",
        ),
    ),
    UpdateSet(
        "athletes",
        "Olympic track and field athletes",
        "athlete",
        ("duplantis", "warholm", "kipyegon", "ingebrigtsen", "mclaughlin", "lyles",
         "jepchirchir", "tamberi", "kipchoge", "hassan"),
        (
            "how did {athlete} do in the {event} final",
            "did {athlete} win the {event} final",
            "show me the highlights of {athlete}",
            "when does {athlete} race next",
            "what's the latest news about {athlete}",
            "how many medals does {athlete} have",
            "who won the {event} race {athlete} or {athlete}",
        ),
    ),
)  # fmt: skip

_SLOT = re.compile(r"\{([a-z_]+)\}")


def expand(template: str, slots: Slots, rng: np.random.Generator) -> str:
    """Fill every ``{slot}`` of ``template`` (recursively), each occurrence on its own."""

    def fill(match: re.Match[str]) -> str:
        options = slots[match.group(1)]
        return expand(options[int(rng.integers(len(options)))], slots, rng)

    return _SLOT.sub(fill, template)


def vocabulary(templates: Iterable[str], slots: Slots) -> set[str]:
    """Every word that ``templates`` can produce."""
    words: set[str] = set()
    seen: set[str] = set()

    def visit(text: str) -> None:
        for name in _SLOT.findall(text):
            if name not in seen:
                seen.add(name)
                for option in slots[name]:
                    visit(option)
        words.update(_SLOT.sub(" ", text).split())

    for template in templates:
        visit(template)
    return words


def base_lexicon() -> set[str]:
    """Every word of the base grammar."""
    return vocabulary((t for d in BASE_DOMAINS for t in d.templates), BASE_SLOTS)


def update_set(name: str) -> UpdateSet:
    for update in UPDATE_SETS:
        if update.name == name:
            return update
    raise CorpusError(f"no update set {name!r}; known: {', '.join(u.name for u in UPDATE_SETS)}")


def lexicon_for(updates: Iterable[str] = ()) -> set[str]:
    """The base lexicon plus the new words of the named update sets."""
    words = base_lexicon()
    for name in updates:
        words.update(update_set(name).new_words)
    return words


# --------------------------------------------------------------------------- plan

BASE_SPLITS = ("base/train", "base/dev", "base/test")


@dataclass(frozen=True)
class CorpusConfig:
    """Sizes and seed of a corpus; its digest names the cache directory."""

    seed: int = 20_240_726
    train_size: int = 24_000
    dev_size: int = 480
    test_size: int = 1_600
    update_train_size: int = 1_200
    update_test_size: int = 320
    shard_size: int = 200

    def splits(self) -> list[str]:
        """Every split: ``base/train|dev|test`` and ``<update>/train|test``."""
        names = list(BASE_SPLITS)
        for update in UPDATE_SETS:
            names += [f"{update.name}/train", f"{update.name}/test"]
        return names

    def size(self, split: str) -> int:
        group, part = _parse_split(split)
        if group == "base":
            return {"train": self.train_size, "dev": self.dev_size, "test": self.test_size}[part]
        return self.update_train_size if part == "train" else self.update_test_size

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_split(split: str) -> tuple[str, str]:
    group, _, part = split.partition("/")
    if group == "base" and part in ("train", "dev", "test"):
        return group, part
    if group in {u.name for u in UPDATE_SETS} and part in ("train", "test"):
        return group, part
    raise CorpusError(f"unknown split {split!r}")


def split_variants(split: str) -> tuple[str, ...]:
    """The voice variants a split is spoken with."""
    part = _parse_split(split)[1]
    return {"train": TRAIN_VARIANTS, "dev": DEV_VARIANTS, "test": TEST_VARIANTS}[part]


NOISE_KINDS = ("none", "white", "pink", "brown", "hum")


@dataclass(frozen=True)
class UtteranceSpec:
    """Everything that determines one utterance's audio."""

    uid: str
    text: str
    speaker: Speaker
    domain: str
    speed_wpm: int
    pitch: int
    word_gap: int
    """espeak ``-g``: extra pause between words, in units of 10 ms."""
    tempo: float
    """Speed perturbation: 1.05 plays 5% faster (and higher), like resampling tape."""
    gain_db: float
    noise: str
    snr_db: float
    lead_ms: int
    trail_ms: int
    noise_seed: int

    @property
    def cohort(self) -> str:
        return self.speaker.cohort


def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _speaker_base(seed: int, speaker: Speaker) -> tuple[int, int]:
    rng = np.random.default_rng([seed, _stable_int(speaker.voice)])
    speed = int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1))
    pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
    return speed, pitch


def plan_utterance(config: CorpusConfig, split: str, index: int) -> UtteranceSpec:
    """Utterance ``index`` of ``split``: a pure function of the configuration."""
    group = _parse_split(split)[0]
    rng = np.random.default_rng([config.seed, _stable_int(split), index])
    if group == "base":
        domain = BASE_DOMAINS[int(rng.integers(len(BASE_DOMAINS)))]
        slots: Slots = BASE_SLOTS
    else:
        update = update_set(group)
        domain, slots = update.domain, update.slots
    text = expand(domain.templates[int(rng.integers(len(domain.templates)))], slots, rng)
    variants = split_variants(split)
    # Cohorts take turns so that every accent has the same share of every split.
    speaker = Speaker(ACCENTS[index % len(ACCENTS)], variants[int(rng.integers(len(variants)))])
    base_speed, base_pitch = _speaker_base(config.seed, speaker)
    noise = NOISE_KINDS[int(rng.choice(len(NOISE_KINDS), p=[0.15, 0.3, 0.25, 0.15, 0.15]))]
    return UtteranceSpec(
        uid=f"{split}/{index:06d}",
        text=" ".join(text.split()),
        speaker=speaker,
        domain=domain.name,
        speed_wpm=base_speed + int(rng.integers(-8, 9)),
        pitch=int(np.clip(base_pitch + int(rng.integers(-8, 9)), 0, 99)),
        word_gap=int(rng.integers(0, 3)),
        tempo=round(float(rng.uniform(0.94, 1.06)), 4),
        gain_db=round(float(rng.uniform(-6.0, 6.0)), 2),
        noise=noise,
        snr_db=round(float(rng.uniform(10.0, 40.0)), 2),
        lead_ms=int(rng.integers(50, 400)),
        trail_ms=int(rng.integers(50, 400)),
        noise_seed=int(rng.integers(2**31)),
    )


def plan_split(config: CorpusConfig, split: str) -> list[UtteranceSpec]:
    return [plan_utterance(config, split, i) for i in range(config.size(split))]


# --------------------------------------------------------------------------- audio


def espeak_version(espeak: str = "espeak-ng") -> str:
    """The ``espeak-ng --version`` line (it names the cache, since audio depends on it)."""
    exe = shutil.which(espeak)
    if exe is None:
        raise SynthesisError(f"{espeak} is not installed (Debian: apt-get install espeak-ng)")
    done = subprocess.run([exe, "--version"], capture_output=True, check=False, timeout=30)
    return done.stdout.decode("utf-8", "replace").strip().split("  ")[0]


def parse_wav(data: bytes) -> tuple[int, npt.NDArray[np.int16]]:
    """Sample rate and samples of a mono 16-bit PCM WAV (espeak's streamed sizes are 0x7ff..)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthesisError("not a RIFF/WAVE file")
    pos, rate, channels, bits = 12, 0, 0, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", data[body : body + 8])
            bits = struct.unpack("<H", data[body + 14 : body + 16])[0]
            if fmt != 1 or channels != 1 or bits != 16:
                raise SynthesisError(f"unsupported WAV: format {fmt}, {channels} ch, {bits} bit")
        elif chunk == b"data":
            if rate == 0:
                raise SynthesisError("WAV data before its fmt chunk")
            end = min(len(data), body + size)
            end -= (end - body) % 2
            return rate, np.frombuffer(data[body:end], dtype="<i2").astype(np.int16)
        pos = body + size + (size & 1)
    raise SynthesisError("WAV without a data chunk")


def write_wav(path: str | Path, audio: npt.NDArray[np.int16], rate: int = SAMPLE_RATE) -> None:
    """Write mono 16-bit PCM."""
    pcm = np.asarray(audio, dtype="<i2").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", len(pcm))
    with atomic_output(path) as out:
        out.write(header + pcm)


def read_wav(path: str | Path) -> tuple[int, npt.NDArray[np.int16]]:
    return parse_wav(Path(path).read_bytes())


def resample(x: npt.NDArray[np.float64], src_rate: int, dst_rate: int) -> npt.NDArray[np.float64]:
    """Band-limited resampling between integer rates, exact in rate (see :func:`_fourier`)."""
    ratio = Fraction(dst_rate, src_rate)
    # Pad to k * q samples (q the reduced denominator) so that both lengths are whole.
    k = _fast_length(-(-len(x) // ratio.denominator), even=False)
    n, m = k * ratio.denominator, k * ratio.numerator
    return _fourier(x, n, m, round(len(x) * ratio))


def stretch(x: npt.NDArray[np.float64], ratio: float) -> npt.NDArray[np.float64]:
    """Resample to about ``ratio`` times as many samples (a rate change by ``ratio``).

    The ratio actually applied is ``m / n`` for a fast FFT length ``n``; it differs from
    ``ratio`` by less than ``1 / m`` (an imperceptible tempo difference).
    """
    n = _fast_length(len(x))
    return _fourier(x, n, round(n * ratio), round(len(x) * ratio))


def _fourier(x: npt.NDArray[np.float64], n: int, m: int, want: int) -> npt.NDArray[np.float64]:
    """Resample ``x`` zero-padded to ``n`` samples onto ``m``; keep the first ``want``.

    The spectrum is cut (or zero-padded) at the lower Nyquist frequency, with a raised
    cosine over its top 5% so that the cut does not ring; float64 and deterministic. The
    signal is treated as periodic, so audio should start and end near silence (espeak's
    does; a clip that does not gets some ringing at its ends).
    """
    if want <= 0 or m <= 0:
        return np.zeros(0, dtype=np.float64)
    spectrum = np.fft.rfft(x, n)
    keep = min(len(spectrum), m // 2 + 1)
    shaped = np.zeros(m // 2 + 1, dtype=np.complex128)
    shaped[:keep] = spectrum[:keep]
    roll = max(1, keep // 20)
    shaped[keep - roll : keep] *= 0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, roll))
    return np.fft.irfft(shaped, m)[:want] * (m / n)


def _fast_length(n: int, *, even: bool = True) -> int:
    """The least 2-3-5-smooth number >= ``n`` (even, unless ``even`` is false)."""
    best = 2 * max(n, 1) + 2
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n or (even and size % 2):
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _noise(kind: str, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    if kind == "white":
        return rng.standard_normal(n)
    if kind in ("pink", "brown"):
        # Shape white noise to 1/f (pink) or 1/f^2 (brown) power, flat below 20 Hz.
        size = _fast_length(n)
        spectrum = np.fft.rfft(rng.standard_normal(size))
        hertz = np.maximum(np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE), 20.0)
        return np.fft.irfft(spectrum / (np.sqrt(hertz) if kind == "pink" else hertz), size)[:n]
    if kind == "hum":
        mains = 50.0 if rng.integers(2) else 60.0
        t = np.arange(n) / SAMPLE_RATE
        phases = rng.uniform(0, 2 * np.pi, size=4)
        tone = sum(np.sin(2 * np.pi * mains * k * t + phases[k - 1]) / k for k in range(1, 5))
        return np.asarray(tone) + 0.1 * rng.standard_normal(n)
    raise ValueError(f"unknown noise kind {kind!r}")


def render(spec: UtteranceSpec, espeak_pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """Turn espeak's 22.05 kHz output into the utterance's 16 kHz int16 audio."""
    speech = espeak_pcm.astype(np.float64) / 32768.0
    speech = stretch(speech, SAMPLE_RATE / ESPEAK_RATE / spec.tempo)
    lead, trail = spec.lead_ms * SAMPLE_RATE // 1000, spec.trail_ms * SAMPLE_RATE // 1000
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    audio *= 10.0 ** (spec.gain_db / 20.0)
    if spec.noise != "none":
        rng = np.random.default_rng(spec.noise_seed)
        noise = _noise(spec.noise, len(audio), rng)
        speech_power = float(np.mean(audio[lead : lead + len(speech)] ** 2)) + 1e-12
        noise_power = float(np.mean(noise**2)) + 1e-12
        audio += noise * np.sqrt(speech_power / noise_power / 10.0 ** (spec.snr_db / 10.0))
    return np.asarray(np.clip(np.round(audio * 32767.0), -32768, 32767), dtype=np.int16)


def espeak_args(spec: UtteranceSpec, espeak: str = "espeak-ng") -> list[str]:
    return [
        espeak,
        "-v",
        spec.speaker.voice,
        "-s",
        str(spec.speed_wpm),
        "-p",
        str(spec.pitch),
        "-g",
        str(spec.word_gap),
        "--stdout",
        "--",
        spec.text,
    ]


def synthesize(spec: UtteranceSpec, espeak: str = "espeak-ng") -> npt.NDArray[np.int16]:
    """The utterance's audio: 16 kHz mono int16."""
    try:
        done = subprocess.run(
            espeak_args(spec, espeak), capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SynthesisError(f"{spec.uid}: cannot run {espeak}: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise SynthesisError(f"{spec.uid}: {espeak} failed ({done.returncode}): {message}")
    rate, pcm = parse_wav(done.stdout)
    if rate != ESPEAK_RATE or len(pcm) < rate // 20:
        raise SynthesisError(f"{spec.uid}: {len(pcm)} samples at {rate} Hz from {espeak}")
    return render(spec, pcm)


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class Utterance:
    """A planned utterance with its audio (a view of a memory-mapped shard)."""

    spec: UtteranceSpec
    audio: npt.NDArray[np.int16]

    @property
    def text(self) -> str:
        return self.spec.text

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def corpus_key(config: CorpusConfig, espeak: str) -> str:
    """Names the cache: what the audio of utterance ``i`` of a split depends on.

    The split sizes are left out on purpose: utterance ``i`` does not depend on them, so
    a small corpus is a prefix of a larger one with the same seed and shares its shards.
    """
    payload = json.dumps(
        {
            "format": CORPUS_FORMAT,
            "seed": config.seed,
            "shard": config.shard_size,
            "espeak": espeak,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CorpusStore:
    """Where one configuration's corpus lives in a cache directory."""

    cache_dir: Path
    config: CorpusConfig
    espeak: str

    @classmethod
    def open(cls, cache_dir: str | Path, config: CorpusConfig) -> CorpusStore:
        return cls(Path(cache_dir), config, espeak_version())

    @property
    def root(self) -> Path:
        return self.cache_dir / f"v{CORPUS_FORMAT}-{corpus_key(self.config, self.espeak)}"

    def shard_count(self, split: str) -> int:
        return -(-self.config.size(split) // self.config.shard_size)

    def shard_paths(self, split: str, shard: int) -> tuple[Path, Path]:
        stem = self.root / split / f"shard-{shard:05d}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def missing_shards(self, split: str) -> list[int]:
        """Shards not yet made, or made shorter than this split size needs.

        A longer shard (made for a larger split) serves a smaller one: its prefix is
        exactly the smaller shard, since utterance ``i`` depends on ``i`` alone.
        """
        return [
            shard
            for shard in range(self.shard_count(split))
            if self._shard_len(split, shard) < len(self._shard_range(split, shard))
        ]

    def _shard_range(self, split: str, shard: int) -> range:
        first = shard * self.config.shard_size
        return range(first, min(self.config.size(split), first + self.config.shard_size))

    def _shard_len(self, split: str, shard: int) -> int:
        try:
            meta = json.loads(self.shard_paths(split, shard)[1].read_text())
            return len(meta["uids"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def shard_specs(self, split: str, shard: int) -> list[UtteranceSpec]:
        return [plan_utterance(self.config, split, i) for i in self._shard_range(split, shard)]

    def write_description(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "corpus.json"
        if not path.exists():
            text = {
                "format": CORPUS_FORMAT,
                "espeak": self.espeak,
                "seed": self.config.seed,
                "shard_size": self.config.shard_size,
            }
            with atomic_output(path) as out:
                out.write(json.dumps(text, indent=2).encode() + b"\n")

    def load(self, split: str) -> list[Utterance]:
        """Every utterance of ``split``; raises :class:`CorpusError` if not generated."""
        missing = self.missing_shards(split)
        if missing:
            raise CorpusError(
                f"{split}: {len(missing)} of {self.shard_count(split)} shards missing under "
                f"{self.root} (run `diffcast asr corpus`)"
            )
        utterances: list[Utterance] = []
        for shard in range(self.shard_count(split)):
            npy, meta_path = self.shard_paths(split, shard)
            meta = json.loads(meta_path.read_text())
            specs = self.shard_specs(split, shard)
            audio = np.load(npy, mmap_mode="r")
            uids = meta["uids"][: len(specs)]
            if uids != [s.uid for s in specs] or sum(meta["lengths"]) != len(audio):
                raise CorpusError(f"{npy} does not match its plan; delete it and regenerate")
            offsets = np.concatenate([[0], np.cumsum(meta["lengths"][: len(specs)])])
            for spec, begin, end in zip(specs, offsets[:-1], offsets[1:], strict=True):
                utterances.append(Utterance(spec, audio[int(begin) : int(end)]))
        return utterances


def _make_shard(job: tuple[CorpusStore, str, int]) -> int:
    store, split, shard = job
    specs = store.shard_specs(split, shard)
    clips = [synthesize(spec) for spec in specs]
    npy, meta = store.shard_paths(split, shard)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(npy) as out:
        np.save(out, np.concatenate(clips).astype("<i2"))
    lengths = [len(c) for c in clips]
    with atomic_output(meta) as out:
        out.write(json.dumps({"uids": [s.uid for s in specs], "lengths": lengths}).encode())
    return len(specs)


def generate(
    store: CorpusStore,
    splits: Sequence[str] | None = None,
    *,
    workers: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Synthesize every missing shard of ``splits`` (default: all); returns utterances made.

    ``on_progress(done, total)`` is called after each shard (counts in utterances).
    """
    splits = list(splits) if splits is not None else store.config.splits()
    store.write_description()
    jobs = [(store, split, shard) for split in splits for shard in store.missing_shards(split)]
    total = sum(len(store.shard_specs(split, shard)) for _, split, shard in jobs)
    done = 0
    if on_progress is not None:
        on_progress(done, total)
    results: Iterator[int]
    if workers <= 1 or len(jobs) <= 1:
        results = map(_make_shard, jobs)
        for made in results:
            done += made
            if on_progress is not None:
                on_progress(done, total)
        return done
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for made in pool.imap_unordered(_make_shard, jobs):
            done += made
            if on_progress is not None:
                on_progress(done, total)
    return done
