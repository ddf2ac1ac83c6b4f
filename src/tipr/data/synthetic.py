"""A synthetic person-description benchmark, drawn with Pillow, written in a public format.

Every identity gets a fixed set of visible attributes: upper garment (t-shirt,
long-sleeved shirt, jacket, coat, tank top; plain or striped; 11 colours), lower
garment (trousers, shorts, skirt, long skirt; 11 colours), hair (short or long,
5 colours), shoes (sneakers or boots, 6 colours), and maybe a bag (backpack,
shoulder bag, handbag), a hat, a scarf and glasses; plus a body build and skin
tone. No two identities share the same upper and lower garment type and
colour, which every caption mentions, so a caption can tell identities apart.
Each image of an identity varies what does not change the attributes: position,
scale, walking pose, a horizontal flip, the background and its clutter,
lighting and colour cast. Captions come from a small grammar with synonyms,
varied order and filler words ("appears to be", "walking down the street"), so
pruning has something to remove.

The generator writes the CUHK-PEDES format by default (``reid_raw.json`` with
1-based ids, ``file_path``, ``processed_tokens``; splits train/val/test), or
ICFG-PEDES (0-based ids, no val split) or RSTPReid (``img_path``, 0-based ids),
so the real readers are what read it. Train, val and test identities are
disjoint. Output depends only on the arguments (a fixed seed gives the same
bytes). The default size (500/100/100 identities, 4 images each, 2 captions per
image, 128x64 images) is written in a few seconds.

Command line (writes the dataset and a PNG grid of samples with their captions)::

    python -m tipr.data.synthetic --out data/synthetic --grid docs/synthetic_samples.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tipr.data.benchmarks import BENCHMARKS, read_benchmark_folder

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "Person",
    "SyntheticConfig",
    "describe",
    "draw_person",
    "ensure_synthetic",
    "generate_synthetic",
    "save_sample_grid",
    "sample_person",
]

GENERATOR_VERSION = 1
META_FILE = "synthetic.json"

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


# ---------------------------------------------------------------- drawing


def _rgb(base: tuple[int, int, int], shade=(0, 0, 0)) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + s))) for c, s in zip(base, shade))


def _darker(c: tuple[int, int, int], f: float = 0.7) -> tuple[int, int, int]:
    return tuple(int(v * f) for v in c)


def _background(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    """Wall + ground with a few muted objects behind the person."""
    wall = rng.integers(70, 200, size=3)
    wall = (wall.mean() + 0.35 * (wall - wall.mean())).astype(int)  # low saturation
    ground = (wall * rng.uniform(0.55, 0.85)).astype(int)
    horizon = int(h * rng.uniform(0.55, 0.8))
    draw.rectangle([0, 0, w, horizon], fill=tuple(wall))
    draw.rectangle([0, horizon, w, h], fill=tuple(ground))
    for _ in range(int(rng.integers(2, 7))):
        c = rng.integers(50, 210, size=3)
        c = tuple((c.mean() + 0.3 * (c - c.mean())).astype(int))
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 20, h // 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=c)
        else:
            draw.line([x0, y0, x1, y1], fill=c, width=int(rng.integers(2, 6)))


def draw_person(person: Person, rng: np.random.Generator, size: tuple[int, int] = (128, 64), supersample: int = 2) -> Image.Image:
    """Render one image ``size`` = (H, W) of ``person``; ``rng`` drives the per-image variation."""
    H, W = size[0] * supersample, size[1] * supersample
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    _background(d, W, H, rng)

    ph = H * person.height * rng.uniform(0.9, 1.04)  # person height in pixels
    u = ph / 100.0  # one unit = 1% of the person's height
    cx = W / 2 + rng.uniform(-0.1, 0.1) * W
    y0 = (H - ph) / 2 + rng.uniform(-0.04, 0.04) * H
    wf = person.build
    stride = rng.uniform(0.0, 4.5) * u  # walking: how far the feet are apart
    swing = rng.uniform(-3.0, 3.0) * u  # arm swing

    def Y(v: float) -> float:
        return y0 + v * u

    skin = SKIN_TONES[person.skin]
    upper = _rgb(COLOURS[person.upper_colour], person.shade)
    lower = _rgb(COLOURS[person.lower_colour], person.shade)
    hair = HAIR_COLOURS[person.hair_colour]
    shoe = _rgb(COLOURS[person.shoe_colour], person.shade)
    bag = _rgb(COLOURS[person.bag_colour], person.shade) if person.bag else None

    sh, hip = 9.0 * wf * u, 7.2 * wf * u  # half widths at shoulders and hips
    leg = 2.9 * wf * u  # half width of a leg
    shoulder_y, waist_y, ankle_y = Y(16), Y(48), Y(93)
    feet = (cx - 3.2 * u - stride / 2, cx + 3.2 * u + stride / 2)
    hips = (cx - hip + leg, cx + hip - leg)

    # Long hair falls behind the shoulders; a backpack sticks out behind the torso.
    if person.hair == "long":
        d.rectangle([cx - 6 * u, Y(6), cx + 6 * u, Y(25)], fill=hair)
    if person.bag == "backpack":
        d.rounded_rectangle([cx - sh - 2.5 * u, Y(18), cx + sh + 2.5 * u, Y(44)], radius=3 * u, fill=bag)

    # Legs (skin where the garment stops), then the lower garment over them.
    for hx, fx in zip(hips, feet):
        d.line([hx, waist_y, fx, ankle_y], fill=skin, width=int(2 * leg))
    if person.lower in ("trousers", "shorts"):
        stop = 1.0 if person.lower == "trousers" else 0.45
        for hx, fx in zip(hips, feet):
            d.line([hx, waist_y, hx + (fx - hx) * stop, waist_y + (ankle_y - waist_y) * stop], fill=lower, width=int(2 * leg + 1.5 * u))
        d.rectangle([cx - hip, waist_y - u, cx + hip, Y(54)], fill=lower)
    else:
        bottom = Y(67) if person.lower == "skirt" else Y(86)
        flare = 4 * u if person.lower == "skirt" else 6.5 * u
        d.polygon([(cx - hip, waist_y - u), (cx + hip, waist_y - u), (cx + hip + flare, bottom), (cx - hip - flare, bottom)], fill=lower)

    # Shoes; boots reach up the shin.
    top = 6.5 if person.shoes == "boots" else 2.2
    for fx in feet:
        d.rounded_rectangle([fx - 3.2 * u, ankle_y - top * u, fx + 3.4 * u, ankle_y + 3 * u], radius=u, fill=shoe)

    # Torso (the coat reaches the thighs).
    torso_bottom = Y(58) if person.upper == "coat" else waist_y + u  # short enough to show shorts and skirts
    torso = [(cx - sh, shoulder_y), (cx + sh, shoulder_y), (cx + hip + (1.5 * u if person.upper == "coat" else 0), torso_bottom),
             (cx - hip - (1.5 * u if person.upper == "coat" else 0), torso_bottom)]
    d.polygon(torso, fill=upper)
    if person.stripes:
        stripe = _rgb(COLOURS[person.stripes], person.shade)
        for yy in np.arange(shoulder_y + 3 * u, torso_bottom - u, 5 * u):
            t = (yy - shoulder_y) / (torso_bottom - shoulder_y)
            half = sh + (hip - sh) * t
            d.rectangle([cx - half + u, yy, cx + half - u, yy + 1.8 * u], fill=stripe)
    if person.upper in ("jacket", "coat"):
        d.line([cx, shoulder_y + u, cx, torso_bottom], fill=_darker(upper, 0.55), width=max(1, int(0.8 * u)))
    if person.upper == "tank top":  # bare shoulders
        for side in (-1, 1):
            d.polygon([(cx + side * sh, shoulder_y), (cx + side * (sh - 3 * u), shoulder_y), (cx + side * sh, shoulder_y + 4 * u)], fill=skin)

    # Arms: sleeve from the shoulder, skin below it, then the hand.
    sleeve = {"t-shirt": 0.35, "tank top": 0.0}.get(person.upper, 1.0)
    hands = []
    for side, sw in ((-1, swing), (1, -swing)):
        ax, ay = cx + side * (sh + 0.8 * u), shoulder_y + 1.5 * u
        hx, hy = cx + side * (sh + 2.2 * u) + sw, Y(50)
        hands.append((hx, hy))
        d.line([ax, ay, hx, hy], fill=skin, width=int(3.4 * u))
        if sleeve:
            d.line([ax, ay, ax + (hx - ax) * sleeve, ay + (hy - ay) * sleeve], fill=upper, width=int(3.8 * u))
        d.ellipse([hx - 1.8 * u, hy - 1.5 * u, hx + 1.8 * u, hy + 2.2 * u], fill=skin)

    # Neck, scarf, head, hair, hat, glasses.
    d.rectangle([cx - 1.8 * u, Y(11), cx + 1.8 * u, shoulder_y + u], fill=skin)
    if person.scarf_colour:
        scarf = _rgb(COLOURS[person.scarf_colour], person.shade)
        d.rounded_rectangle([cx - 4.5 * u, Y(12.5), cx + 4.5 * u, Y(17.5)], radius=u, fill=scarf)
        d.rectangle([cx + 1 * u, Y(16), cx + 3.5 * u, Y(28)], fill=scarf)
    hr = 5.3 * u
    hy = Y(6.5)
    d.ellipse([cx - hr * 0.9, hy - hr, cx + hr * 0.9, hy + hr], fill=skin)
    if person.hat is None:
        d.chord([cx - hr, hy - hr * 1.12, cx + hr, hy + hr * 0.9], 180, 360, fill=hair)
        if person.hair == "long":
            d.rectangle([cx - hr, hy - 0.2 * hr, cx - 0.7 * hr, hy + 1.6 * hr], fill=hair)
            d.rectangle([cx + 0.7 * hr, hy - 0.2 * hr, cx + hr, hy + 1.6 * hr], fill=hair)
    else:
        hat = _rgb(COLOURS[person.hat_colour], person.shade)
        if person.hair == "long":
            d.rectangle([cx - hr, hy - 0.2 * hr, cx - 0.7 * hr, hy + 1.6 * hr], fill=hair)
            d.rectangle([cx + 0.7 * hr, hy - 0.2 * hr, cx + hr, hy + 1.6 * hr], fill=hair)
        d.chord([cx - hr * 1.05, hy - hr * 1.25, cx + hr * 1.05, hy + hr * 0.7], 180, 360, fill=hat)
        if person.hat == "cap":
            d.rectangle([cx, hy - 0.35 * hr, cx + 1.7 * hr, hy - 0.1 * hr], fill=hat)
    if person.glasses:
        gy = hy - 0.05 * hr
        for gx in (cx - 0.42 * hr, cx + 0.42 * hr):
            d.rectangle([gx - 0.32 * hr, gy - 0.2 * hr, gx + 0.32 * hr, gy + 0.22 * hr], outline=(15, 15, 15), width=max(1, int(0.6 * u)))

    # Bags carried in front.
    if person.bag == "backpack":
        for side in (-1, 1):
            d.line([cx + side * 0.55 * sh, shoulder_y, cx + side * 0.6 * sh, Y(36)], fill=_darker(bag, 0.8), width=max(1, int(1.3 * u)))
    elif person.bag == "shoulder bag":
        d.line([cx - sh + u, shoulder_y, cx + hip + 1.5 * u, Y(46)], fill=_darker(bag, 0.8), width=max(1, int(1.2 * u)))
        d.rounded_rectangle([cx + hip - u, Y(43), cx + hip + 6 * u, Y(54)], radius=u, fill=bag)
    elif person.bag == "handbag":
        hx, hy2 = hands[1]
        d.rounded_rectangle([hx - 3 * u, hy2 + u, hx + 3.5 * u, hy2 + 8 * u], radius=u, fill=bag)
        d.arc([hx - 2 * u, hy2 - 1.5 * u, hx + 2.5 * u, hy2 + 2.5 * u], 180, 360, fill=_darker(bag, 0.7), width=max(1, int(0.6 * u)))

    img = img.reduce(supersample) if supersample > 1 else img
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Lighting: overall brightness and a mild colour cast.
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.94, 1.06, size=3)
    lut = [min(255, int(v * g)) for g in gain for v in range(256)]
    return img.point(lut)


# ---------------------------------------------------------------- captions

_SUBJECTS = ("A person", "A pedestrian", "The pedestrian", "This person", "An individual", "Someone", "The walker")
_WEARS = ("is wearing", "wears", "is dressed in", "has on", "appears to be wearing", "can be seen wearing")
_FILLERS_AFTER = ("", "", "", " while walking down the street", " and is walking", " in the picture", " on the sidewalk")
_UPPER_WORDS = {
    "t-shirt": ("t-shirt", "tee", "short-sleeved shirt", "short sleeve top"),
    "shirt": ("long-sleeved shirt", "shirt with long sleeves", "long sleeve top"),
    "jacket": ("jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "tank top": ("tank top", "sleeveless top", "vest"),
}
_LOWER_WORDS = {
    "trousers": ("pants", "trousers", "long pants", "slacks"),
    "shorts": ("shorts", "short pants"),
    "skirt": ("short skirt", "skirt", "mini skirt"),
    "long skirt": ("long skirt", "maxi skirt", "ankle-length skirt"),
}
_PLURAL_LOWER = {"pants", "trousers", "long pants", "slacks", "shorts", "short pants"}
_COLOUR_WORDS = {"gray": ("gray", "grey"), "blonde": ("blonde", "blond")}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(person: Person, rng: np.random.Generator) -> str:
    """One caption for ``person``: upper and lower garment always, other attributes at random."""

    def pick(options):
        return options[int(rng.integers(len(options)))]

    def colour(name: str) -> str:
        return pick(_COLOUR_WORDS.get(name, (name,)))

    plural = rng.random() < 0.35  # "they" or "the person" in the follow-up sentences
    they = "they" if plural else pick(("the person", "the pedestrian", "this individual"))
    their = "their" if plural else pick(("their", "their", "his or her"))
    has, is_ = ("have", "are") if plural else ("has", "is")
    wear = pick(("wear", "are wearing", "have on")) if plural else pick(("wears", "is wearing", "has on"))

    utype = pick(_UPPER_WORDS[person.upper])
    if person.stripes:
        upper = pick((f"{colour(person.upper_colour)} and {colour(person.stripes)} striped {utype}",
                      f"{colour(person.upper_colour)} {utype} with {colour(person.stripes)} stripes"))
    else:
        upper = f"{colour(person.upper_colour)} {utype}"
    upper = _a(upper)
    ltype = pick(_LOWER_WORDS[person.lower])
    lower = f"{colour(person.lower_colour)} {ltype}"
    lower = lower if ltype in _PLURAL_LOWER else _a(lower)

    hair = f"{person.hair} {colour(person.hair_colour)} hair"
    extras = []  # follow-up sentences
    subject = pick(_SUBJECTS)
    if rng.random() < 0.65:
        if rng.random() < 0.4:
            subject = f"{subject} with {hair}"
        else:
            extras.append(pick((f"{they} {has} {hair}.", f"{their} hair is {person.hair} and {colour(person.hair_colour)}.")))
    if person.bag and rng.random() < 0.85:
        bag = f"{colour(person.bag_colour)} {person.bag}"
        extras.append(pick((f"{they} {is_} carrying {_a(bag)}.", f"{they} {has} {_a(bag)} with them.",
                            f"{_a(bag).capitalize()} is also visible.")))
    if rng.random() < 0.6:
        shoes = f"{colour(person.shoe_colour)} {person.shoes if rng.random() < 0.6 else ('shoes' if person.shoes == 'sneakers' else 'boots')}"
        extras.append(pick((f"{they} {wear} {shoes}.", f"On {their} feet are {shoes}.", f"{shoes.capitalize()} complete the outfit.")))
    if person.hat and rng.random() < 0.85:
        extras.append(f"{they} {wear} {_a(colour(person.hat_colour) + ' ' + person.hat)} on {their} head.")
    if person.scarf_colour and rng.random() < 0.7:
        extras.append(f"{_a(colour(person.scarf_colour) + ' scarf')} is wrapped around {their} neck.")
    if person.glasses and rng.random() < 0.6:
        extras.append(pick((f"{they} {wear} glasses.", f"{they} {has} glasses on.")))

    core = pick((
        f"{subject} {pick(_WEARS)} {upper} and {lower}{pick(_FILLERS_AFTER)}.",
        f"{subject} {pick(_WEARS)} {lower} and {upper}{pick(_FILLERS_AFTER)}.",
        f"{subject} in {upper} and {lower} is walking.",
        f"{subject} {pick(_WEARS)} {upper}, paired with {lower}.",
    ))
    order = rng.permutation(len(extras))[:3]  # at most 3 follow-ups: captions stay under ~48 tokens, like real ones
    sentences = [core] + [extras[i] for i in order]
    return " ".join(s[0].upper() + s[1:] for s in sentences)


# ---------------------------------------------------------------- dataset files


@dataclass(frozen=True)
class SyntheticConfig:
    """What the synthetic benchmark is made of (recorded in ``synthetic.json``)."""

    num_train_ids: int = 500
    num_val_ids: int = 100
    num_test_ids: int = 100
    images_per_id: int = 4
    captions_per_image: int = 2
    image_size: tuple[int, int] = (128, 64)
    seed: int = 0
    format: str = "CUHK-PEDES"

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.format not in BENCHMARKS:
            raise ValueError(f"format must be one of {sorted(BENCHMARKS)}, got {self.format!r}")
        if min(self.num_train_ids, self.num_test_ids, self.images_per_id, self.captions_per_image) < 1 or self.num_val_ids < 0:
            raise ValueError(f"synthetic benchmark needs >= 1 train/test identity, image and caption (and >= 0 val ids): {self}")

    def meta(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **asdict(self), "image_size": list(self.image_size)}


_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def _distinct_persons(count: int, rng: np.random.Generator) -> list[Person]:
    """``count`` identities, no two with the same upper and lower garment type and colour."""
    persons, used = [], set()
    while len(persons) < count:
        p = sample_person(rng)
        key = (p.upper, p.upper_colour, p.stripes, p.lower, p.lower_colour)
        if key not in used:
            used.add(key)
            persons.append(p)
    return persons


def generate_synthetic(out_dir: str | os.PathLike, config: SyntheticConfig | None = None, **overrides) -> Path:
    """Write the synthetic benchmark to ``out_dir`` (``imgs/`` + the annotation file + ``synthetic.json``).

    ``overrides`` are :class:`SyntheticConfig` fields. Returns ``out_dir``.
    """
    config = SyntheticConfig(**{**(asdict(config) if config else {}), **overrides})
    fmt = BENCHMARKS[config.format]
    annotation_file, path_key, id_base, has_val = fmt.annotation_files[0], fmt.path_key, fmt.id_base, "val" in fmt.splits
    out = Path(out_dir)
    splits = [("train", config.num_train_ids), ("val", config.num_val_ids if has_val else 0), ("test", config.num_test_ids)]
    persons = _distinct_persons(sum(n for _, n in splits), np.random.default_rng([config.seed, 0]))
    entries, pid = [], 0
    for split, count in splits:
        (out / "imgs" / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            person = persons[pid]
            for k in range(config.images_per_id):
                rng = np.random.default_rng([config.seed, 1, pid, k])  # this image's variation and captions
                path = f"{split}/{pid + id_base:05d}_{k}.jpg"
                draw_person(person, rng, config.image_size).save(out / "imgs" / path, quality=92)
                captions = [describe(person, rng) for _ in range(config.captions_per_image)]
                entry = {"split": split, "captions": captions, path_key: path, "id": pid + id_base}
                if config.format == "CUHK-PEDES":
                    entry["processed_tokens"] = [_WORD.findall(c.lower()) for c in captions]
                entries.append(entry)
            pid += 1
    with open(out / annotation_file, "w") as f:
        json.dump(entries, f)
    with open(out / META_FILE, "w") as f:
        json.dump(config.meta(), f, indent=1)
    return out


def ensure_synthetic(out_dir: str | os.PathLike, config: SyntheticConfig | None = None) -> Path:
    """Generate the synthetic benchmark in ``out_dir`` unless it is already there with the same config.

    A folder generated with another config (its ``synthetic.json`` differs) is
    replaced; a folder that exists without ``synthetic.json`` is not ours and is
    left alone (error). Generation goes to a temporary folder renamed into place,
    so concurrent processes never read a half-written dataset.
    """
    config = config or SyntheticConfig()
    out = Path(out_dir)
    meta = out / META_FILE
    if meta.is_file():
        try:
            if json.loads(meta.read_text()) == config.meta():
                return out
        except json.JSONDecodeError:
            pass
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but holds no {META_FILE}: not a tipr synthetic benchmark; choose another root")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        generate_synthetic(tmp, config)
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}-old"
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if not (meta.is_file() and json.loads(meta.read_text()) == config.meta()):
                raise  # someone else put something else there
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_sample_grid(folder: str | os.PathLike, png: str | os.PathLike, *, num_ids: int = 8, images_per_id: int = 2, split: str = "train",
                     format: str = "CUHK-PEDES", scale: int = 2) -> Path:
    """Save a PNG of the first ``num_ids`` identities of ``split`` (images + one caption per image).

    The dataset is read back with the benchmark reader, so the picture shows
    exactly what the data module trains on.
    """
    data = read_benchmark_folder(folder, format).split(split)
    font = ImageFont.load_default(size=13)
    first_caption = {int(img): c for c, img in reversed(list(enumerate(data.caption_images)))}
    cells = []
    for pid in list(dict.fromkeys(data.image_pids.tolist()))[:num_ids]:
        images = np.flatnonzero(data.image_pids == pid)[:images_per_id]
        cells.append((pid, [(Image.open(Path(folder, "imgs", data.image_paths[i])).convert("RGB"), data.captions[first_caption[int(i)]]) for i in images]))
    ih, iw = cells[0][1][0][0].height * scale, cells[0][1][0][0].width * scale
    text_w, pad, cols = 250, 8, 2
    cell_w, cell_h = images_per_id * (iw + pad) + text_w + pad, ih + 2 * pad
    rows = (len(cells) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (pid, shots) in enumerate(cells):
        x, y = pad + (n % cols) * cell_w, pad + (n // cols) * cell_h
        for k, (im, _) in enumerate(shots):
            sheet.paste(im.resize((iw, ih), Image.Resampling.NEAREST), (x + k * (iw + pad), y))
        text = f"id {pid}\n" + "\n".join(textwrap.fill(f"{k + 1}: {c}", 38) for k, (_, c) in enumerate(shots))
        draw.multiline_text((x + images_per_id * (iw + pad), y), text, fill="black", font=font, spacing=2)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return Path(png)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic person-description benchmark (and a PNG grid of samples).")
    parser.add_argument("--out", default="data/synthetic", help="output folder (default data/synthetic)")
    parser.add_argument("--format", default="CUHK-PEDES", choices=sorted(BENCHMARKS))
    defaults = SyntheticConfig()
    for name in ("num_train_ids", "num_val_ids", "num_test_ids", "images_per_id", "captions_per_image", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--image-size", type=int, nargs=2, default=list(defaults.image_size), metavar=("H", "W"))
    parser.add_argument("--grid", default=None, help="also save a PNG grid of samples with their captions here")
    args = parser.parse_args(argv)
    config = SyntheticConfig(args.num_train_ids, args.num_val_ids, args.num_test_ids, args.images_per_id, args.captions_per_image,
                             tuple(args.image_size), args.seed, args.format)
    out = ensure_synthetic(args.out, config)
    print(f"synthetic benchmark ({config.format} format) in {out}")
    if args.grid:
        print(f"sample grid: {save_sample_grid(out, args.grid, format=config.format)}")


if __name__ == "__main__":
    main()
