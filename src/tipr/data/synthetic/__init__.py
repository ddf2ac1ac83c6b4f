"""A synthetic person-description benchmark, drawn with Pillow, written in a public format.

Every identity gets a fixed set of visible attributes (:mod:`.attributes`): upper
garment (t-shirt, long-sleeved shirt, jacket, coat, tank top; plain or striped;
11 colours), lower garment (trousers, shorts, skirt, long skirt; 11 colours),
hair (short or long, 5 colours), shoes (sneakers or boots, 6 colours), and maybe
a bag (backpack, shoulder bag, handbag), a hat, a scarf and glasses; plus a body
build and skin tone. No two identities share the same upper and lower garment
type and colour, which every caption mentions, so a caption can tell identities
apart. Each image of an identity (:mod:`.painters`) varies what does not change
the attributes: position, scale, walking pose, a horizontal flip, the background
and its clutter, lighting and colour cast. Captions (:mod:`.captions`) come from
a small grammar with synonyms, varied order and filler words ("appears to be",
"walking down the street"), so pruning has something to remove.

The writer (:mod:`.writer`) writes the CUHK-PEDES format by default
(``reid_raw.json`` with 1-based ids, ``file_path``, ``processed_tokens``; splits
train/val/test), or ICFG-PEDES (0-based ids, no val split) or RSTPReid
(``img_path``, 0-based ids), so the real readers are what read it. Train, val
and test identities are disjoint. Output depends only on the
:class:`SyntheticConfig` (a fixed seed gives the same bytes). The default size
(500/100/100 identities, 4 images each, 2 captions per image, 128x64 images) is
written in a few seconds.

Command line (writes the dataset and a PNG grid of samples with their captions)::

    python -m tipr.data.synthetic --out data/synthetic --grid docs/synthetic_samples.png
"""

from tipr.data.synthetic.attributes import COLOURS, Person, distinct_persons, sample_person
from tipr.data.synthetic.captions import describe
from tipr.data.synthetic.painters import draw_person
from tipr.data.synthetic.writer import (
    GENERATOR_VERSION,
    META_FILE,
    SyntheticConfig,
    ensure_synthetic,
    generate_synthetic,
    save_sample_grid,
)

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "META_FILE",
    "Person",
    "SyntheticConfig",
    "describe",
    "distinct_persons",
    "draw_person",
    "ensure_synthetic",
    "generate_synthetic",
    "sample_person",
    "save_sample_grid",
]
