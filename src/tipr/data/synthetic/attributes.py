"""What a synthetic identity looks like: the attribute vocabularies and how one identity is drawn from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BAG_TYPES",
    "COLOURS",
    "HAIR_COLOURS",
    "HAT_TYPES",
    "LOWER_TYPES",
    "SHOE_COLOURS",
    "SKIN_TONES",
    "UPPER_TYPES",
    "Person",
    "distinct_persons",
    "sample_person",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "gray": (128, 128, 130),
    "red": (204, 32, 36),
    "blue": (36, 72, 204),
    "green": (36, 150, 60),
    "yellow": (240, 212, 36),
    "orange": (242, 128, 28),
    "pink": (242, 150, 192),
    "purple": (128, 48, 164),
    "brown": (118, 74, 38),
}
HAIR_COLOURS = {"black": (22, 20, 20), "brown": (96, 58, 30), "blonde": (226, 196, 116), "gray": (160, 160, 160), "red": (172, 62, 28)}
SHOE_COLOURS = ("black", "white", "brown", "red", "blue", "gray")
SKIN_TONES = ((240, 205, 180), (222, 178, 140), (190, 140, 100), (150, 100, 70), (105, 70, 50))
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "tank top")
LOWER_TYPES = ("trousers", "shorts", "skirt", "long skirt")
BAG_TYPES = ("backpack", "shoulder bag", "handbag")
HAT_TYPES = ("cap", "beanie")


@dataclass(frozen=True)
class Person:
    """The visible attributes of one identity (colours are names, see :data:`COLOURS`)."""

    upper: str
    upper_colour: str
    stripes: str | None  # stripe colour of a striped upper garment
    lower: str
    lower_colour: str
    hair: str  # "short" or "long"
    hair_colour: str
    shoes: str  # "sneakers" or "boots"
    shoe_colour: str
    bag: str | None
    bag_colour: str | None
    hat: str | None
    hat_colour: str | None
    scarf_colour: str | None
    glasses: bool
    skin: int  # index into SKIN_TONES
    build: float  # body width factor
    height: float  # body height as a fraction of the image
    shade: tuple[int, int, int]  # this identity's fixed shift of its garment colours

    def caption_key(self) -> tuple:
        """What every caption mentions: upper and lower garment type and colour (stripes included)."""
        return (self.upper, self.upper_colour, self.stripes, self.lower, self.lower_colour)


def sample_person(rng: np.random.Generator) -> Person:
    """Draw one identity's attributes."""
    colours = list(COLOURS)

    def pick(options, p=None):
        return options[int(rng.choice(len(options), p=p))]

    upper_colour = pick(colours)
    striped = rng.random() < 0.2
    has_bag, has_hat = rng.random() < 0.6, rng.random() < 0.25
    return Person(
        upper=pick(UPPER_TYPES),
        upper_colour=upper_colour,
        stripes=pick([c for c in colours if c != upper_colour]) if striped else None,
        lower=pick(LOWER_TYPES, p=[0.45, 0.2, 0.2, 0.15]),
        lower_colour=pick(colours),
        hair=pick(("short", "long")),
        hair_colour=pick(list(HAIR_COLOURS), p=[0.35, 0.3, 0.15, 0.1, 0.1]),
        shoes=pick(("sneakers", "boots"), p=[0.7, 0.3]),
        shoe_colour=pick(SHOE_COLOURS),
        bag=pick(BAG_TYPES) if has_bag else None,
        bag_colour=pick(colours) if has_bag else None,
        hat=pick(HAT_TYPES) if has_hat else None,
        hat_colour=pick(colours) if has_hat else None,
        scarf_colour=pick(colours) if rng.random() < 0.15 else None,
        glasses=bool(rng.random() < 0.2),
        skin=int(rng.integers(len(SKIN_TONES))),
        build=float(rng.uniform(0.88, 1.12)),
        height=float(rng.uniform(0.82, 0.92)),
        shade=tuple(int(v) for v in rng.integers(-14, 15, size=3)),
    )


def distinct_persons(count: int, rng: np.random.Generator) -> list[Person]:
    """``count`` identities, no two with the same upper and lower garment type and colour (see :meth:`Person.caption_key`)."""
    persons, used = [], set()
    while len(persons) < count:
        p = sample_person(rng)
        if p.caption_key() not in used:
            used.add(p.caption_key())
            persons.append(p)
    return persons
