"""Drawing a synthetic pedestrian with Pillow: one painter per part, composed by :func:`draw_person`.

:func:`draw_person` paints the background, places the figure (:class:`Figure`:
position, scale, stride and arm swing drawn from the image's generator), then
runs :data:`PAINTERS` in order, back to front. Every painter has the signature
``painter(draw, person, figure)``, draws one garment or body part, and uses no
randomness; the figure holds every coordinate they share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tipr.data.synthetic.attributes import COLOURS, HAIR_COLOURS, SKIN_TONES, Person

__all__ = ["PAINTERS", "Figure", "draw_person", "paint_background"]

RGB = tuple[int, int, int]
Point = tuple[float, float]


def _rgb(base: RGB, shade=(0, 0, 0)) -> RGB:
    return tuple(int(min(255, max(0, c + s))) for c, s in zip(base, shade))


def _darker(c: RGB, f: float = 0.7) -> RGB:
    return tuple(int(v * f) for v in c)


def paint_background(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
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


@dataclass(frozen=True)
class Figure:
    """Where the person stands in one image, in pixels; ``u`` is 1% of the person's height."""

    cx: float  # body centre line
    y0: float  # top of the head
    u: float
    sh: float  # half width at the shoulders
    hip: float  # half width at the hips
    leg: float  # half width of a leg
    shoulder_y: float
    waist_y: float
    ankle_y: float
    hips: tuple[float, float]  # x of the legs at the hips
    feet: tuple[float, float]  # x of the feet
    arms: tuple[tuple[Point, Point], ...]  # (shoulder, hand) of the left and right arm
    head_r: float
    head_y: float
    skin: RGB
    upper: RGB
    lower: RGB
    hair: RGB
    shoe: RGB
    bag: RGB | None

    @classmethod
    def place(cls, person: Person, rng: np.random.Generator, width: int, height: int) -> Figure:
        """Draw this image's position, scale and pose of ``person`` from ``rng``."""
        ph = height * person.height * rng.uniform(0.9, 1.04)  # person height in pixels
        u = ph / 100.0
        cx = width / 2 + rng.uniform(-0.1, 0.1) * width
        y0 = (height - ph) / 2 + rng.uniform(-0.04, 0.04) * height
        stride = rng.uniform(0.0, 4.5) * u  # walking: how far the feet are apart
        swing = rng.uniform(-3.0, 3.0) * u  # arm swing
        wf = person.build
        sh, hip, leg = 9.0 * wf * u, 7.2 * wf * u, 2.9 * wf * u
        shoulder_y = y0 + 16 * u
        arms = tuple(((cx + side * (sh + 0.8 * u), shoulder_y + 1.5 * u), (cx + side * (sh + 2.2 * u) + sw, y0 + 50 * u))
                     for side, sw in ((-1, swing), (1, -swing)))
        return cls(
            cx=cx, y0=y0, u=u, sh=sh, hip=hip, leg=leg,
            shoulder_y=shoulder_y, waist_y=y0 + 48 * u, ankle_y=y0 + 93 * u,
            hips=(cx - hip + leg, cx + hip - leg),
            feet=(cx - 3.2 * u - stride / 2, cx + 3.2 * u + stride / 2),
            arms=arms, head_r=5.3 * u, head_y=y0 + 6.5 * u,
            skin=SKIN_TONES[person.skin],
            upper=_rgb(COLOURS[person.upper_colour], person.shade),
            lower=_rgb(COLOURS[person.lower_colour], person.shade),
            hair=HAIR_COLOURS[person.hair_colour],
            shoe=_rgb(COLOURS[person.shoe_colour], person.shade),
            bag=_rgb(COLOURS[person.bag_colour], person.shade) if person.bag else None,
        )

    def y(self, v: float) -> float:
        """The image row ``v`` units below the top of the head."""
        return self.y0 + v * self.u


def paint_hair_behind(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """Long hair falls behind the shoulders."""
    if p.hair == "long":
        d.rectangle([f.cx - 6 * f.u, f.y(6), f.cx + 6 * f.u, f.y(25)], fill=f.hair)


def paint_backpack(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """A backpack sticks out behind the torso (its straps are drawn by :func:`paint_carried_bag`)."""
    if p.bag == "backpack":
        d.rounded_rectangle([f.cx - f.sh - 2.5 * f.u, f.y(18), f.cx + f.sh + 2.5 * f.u, f.y(44)], radius=3 * f.u, fill=f.bag)


def paint_legs(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """Bare legs, from hip to ankle (the lower garment covers what it covers)."""
    for hx, fx in zip(f.hips, f.feet):
        d.line([hx, f.waist_y, fx, f.ankle_y], fill=f.skin, width=int(2 * f.leg))


def paint_lower_garment(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """Trousers or shorts (two legs and a seat), or a skirt (a trapezoid, long or short)."""
    u, cx, hip = f.u, f.cx, f.hip
    if p.lower in ("trousers", "shorts"):
        stop = 1.0 if p.lower == "trousers" else 0.45
        for hx, fx in zip(f.hips, f.feet):
            end = (hx + (fx - hx) * stop, f.waist_y + (f.ankle_y - f.waist_y) * stop)
            d.line([hx, f.waist_y, *end], fill=f.lower, width=int(2 * f.leg + 1.5 * u))
        d.rectangle([cx - hip, f.waist_y - u, cx + hip, f.y(54)], fill=f.lower)
    else:
        bottom = f.y(67) if p.lower == "skirt" else f.y(86)
        flare = 4 * u if p.lower == "skirt" else 6.5 * u
        d.polygon([(cx - hip, f.waist_y - u), (cx + hip, f.waist_y - u), (cx + hip + flare, bottom), (cx - hip - flare, bottom)],
                  fill=f.lower)


def paint_shoes(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """Sneakers, or boots that reach up the shin."""
    top = 6.5 if p.shoes == "boots" else 2.2
    for fx in f.feet:
        d.rounded_rectangle([fx - 3.2 * f.u, f.ankle_y - top * f.u, fx + 3.4 * f.u, f.ankle_y + 3 * f.u], radius=f.u, fill=f.shoe)


def paint_upper_garment(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """The torso: a coat reaches the thighs, stripes across it, a zip on jackets and coats, bare shoulders on a tank top."""
    u, cx, sh, hip, top = f.u, f.cx, f.sh, f.hip, f.shoulder_y
    coat = p.upper == "coat"
    bottom = f.y(58) if coat else f.waist_y + u  # short enough to show shorts and skirts
    flare = 1.5 * u if coat else 0
    d.polygon([(cx - sh, top), (cx + sh, top), (cx + hip + flare, bottom), (cx - hip - flare, bottom)], fill=f.upper)
    if p.stripes:
        stripe = _rgb(COLOURS[p.stripes], p.shade)
        for yy in np.arange(top + 3 * u, bottom - u, 5 * u):
            half = sh + (hip - sh) * ((yy - top) / (bottom - top))
            d.rectangle([cx - half + u, yy, cx + half - u, yy + 1.8 * u], fill=stripe)
    if p.upper in ("jacket", "coat"):
        d.line([cx, top + u, cx, bottom], fill=_darker(f.upper, 0.55), width=max(1, int(0.8 * u)))
    if p.upper == "tank top":
        for side in (-1, 1):
            d.polygon([(cx + side * sh, top), (cx + side * (sh - 3 * u), top), (cx + side * sh, top + 4 * u)], fill=f.skin)


def paint_arms(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """Each arm: skin from shoulder to hand, the sleeve over part of it, then the hand."""
    u = f.u
    sleeve = {"t-shirt": 0.35, "tank top": 0.0}.get(p.upper, 1.0)
    for (ax, ay), (hx, hy) in f.arms:
        d.line([ax, ay, hx, hy], fill=f.skin, width=int(3.4 * u))
        if sleeve:
            d.line([ax, ay, ax + (hx - ax) * sleeve, ay + (hy - ay) * sleeve], fill=f.upper, width=int(3.8 * u))
        d.ellipse([hx - 1.8 * u, hy - 1.5 * u, hx + 1.8 * u, hy + 2.2 * u], fill=f.skin)


def paint_neck(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    d.rectangle([f.cx - 1.8 * f.u, f.y(11), f.cx + 1.8 * f.u, f.shoulder_y + f.u], fill=f.skin)


def paint_scarf(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """A scarf round the neck with one end hanging down the chest."""
    if p.scarf_colour:
        scarf = _rgb(COLOURS[p.scarf_colour], p.shade)
        d.rounded_rectangle([f.cx - 4.5 * f.u, f.y(12.5), f.cx + 4.5 * f.u, f.y(17.5)], radius=f.u, fill=scarf)
        d.rectangle([f.cx + 1 * f.u, f.y(16), f.cx + 3.5 * f.u, f.y(28)], fill=scarf)


def paint_head(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    r = f.head_r
    d.ellipse([f.cx - r * 0.9, f.head_y - r, f.cx + r * 0.9, f.head_y + r], fill=f.skin)


def paint_hair(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """The top of the head (unless a hat covers it) and, for long hair, the locks beside the face."""
    cx, hy, r = f.cx, f.head_y, f.head_r
    if p.hat is None:
        d.chord([cx - r, hy - r * 1.12, cx + r, hy + r * 0.9], 180, 360, fill=f.hair)
    if p.hair == "long":
        d.rectangle([cx - r, hy - 0.2 * r, cx - 0.7 * r, hy + 1.6 * r], fill=f.hair)
        d.rectangle([cx + 0.7 * r, hy - 0.2 * r, cx + r, hy + 1.6 * r], fill=f.hair)


def paint_hat(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """A beanie, or a cap with its brim."""
    if p.hat is not None:
        cx, hy, r = f.cx, f.head_y, f.head_r
        hat = _rgb(COLOURS[p.hat_colour], p.shade)
        d.chord([cx - r * 1.05, hy - r * 1.25, cx + r * 1.05, hy + r * 0.7], 180, 360, fill=hat)
        if p.hat == "cap":
            d.rectangle([cx, hy - 0.35 * r, cx + 1.7 * r, hy - 0.1 * r], fill=hat)


def paint_glasses(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    if p.glasses:
        r, gy = f.head_r, f.head_y - 0.05 * f.head_r
        for gx in (f.cx - 0.42 * r, f.cx + 0.42 * r):
            d.rectangle([gx - 0.32 * r, gy - 0.2 * r, gx + 0.32 * r, gy + 0.22 * r], outline=(15, 15, 15), width=max(1, int(0.6 * f.u)))


def paint_carried_bag(d: ImageDraw.ImageDraw, p: Person, f: Figure) -> None:
    """What shows of a bag in front: backpack straps, a shoulder bag on its strap, or a handbag in the right hand."""
    u, cx, sh, bag = f.u, f.cx, f.sh, f.bag
    if p.bag == "backpack":
        for side in (-1, 1):
            d.line([cx + side * 0.55 * sh, f.shoulder_y, cx + side * 0.6 * sh, f.y(36)], fill=_darker(bag, 0.8), width=max(1, int(1.3 * u)))
    elif p.bag == "shoulder bag":
        d.line([cx - sh + u, f.shoulder_y, cx + f.hip + 1.5 * u, f.y(46)], fill=_darker(bag, 0.8), width=max(1, int(1.2 * u)))
        d.rounded_rectangle([cx + f.hip - u, f.y(43), cx + f.hip + 6 * u, f.y(54)], radius=u, fill=bag)
    elif p.bag == "handbag":
        hx, hy = f.arms[1][1]
        d.rounded_rectangle([hx - 3 * u, hy + u, hx + 3.5 * u, hy + 8 * u], radius=u, fill=bag)
        d.arc([hx - 2 * u, hy - 1.5 * u, hx + 2.5 * u, hy + 2.5 * u], 180, 360, fill=_darker(bag, 0.7), width=max(1, int(0.6 * u)))


#: The painters :func:`draw_person` runs, back to front.
PAINTERS = (paint_hair_behind, paint_backpack, paint_legs, paint_lower_garment, paint_shoes, paint_upper_garment,
            paint_arms, paint_neck, paint_scarf, paint_head, paint_hair, paint_hat, paint_glasses, paint_carried_bag)


def draw_person(person: Person, rng: np.random.Generator, size: tuple[int, int] = (128, 64), supersample: int = 2) -> Image.Image:
    """Render one image ``size`` = (H, W) of ``person``; ``rng`` drives the per-image variation.

    Drawn at ``supersample`` times the size and reduced; then maybe flipped
    horizontally, with a random brightness and a mild colour cast.
    """
    H, W = size[0] * supersample, size[1] * supersample
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    paint_background(d, W, H, rng)
    figure = Figure.place(person, rng, W, H)
    for paint in PAINTERS:
        paint(d, person, figure)
    img = img.reduce(supersample) if supersample > 1 else img
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.94, 1.06, size=3)
    lut = [min(255, int(v * g)) for g in gain for v in range(256)]
    return img.point(lut)
