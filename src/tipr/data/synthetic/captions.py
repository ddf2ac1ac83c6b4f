"""Caption text for a synthetic identity: a small grammar with synonyms, varied order and filler words.

Every caption names the upper and lower garment with their colours (what tells
identities apart, see :meth:`~tipr.data.synthetic.attributes.Person.caption_key`);
hair, bag, shoes, hat, scarf and glasses come at random in up to three follow-up
sentences. Filler ("appears to be", "walking down the street") gives caption
pruning something to remove.
"""

from __future__ import annotations

import numpy as np

from tipr.data.synthetic.attributes import Person

__all__ = ["describe"]

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
