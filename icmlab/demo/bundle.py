"""All demo datasets of one (seed, scale), and their rendered image bytes.

:func:`generate_bundle` builds every dataset's records (cheap); :func:`render_dataset` draws and
encodes its images (the only costly step: ~0.6 ms per 64 px image on one core). Both the archive
packer (:mod:`icmlab.demo.pack`) and the tree writer (:mod:`icmlab.demo.tree`) start from here, so
the packed sources and the unpacked tree hold the same records and pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import datasets as D
from .highlevel import mix665k
from .images import ImageSpec, render_bytes

DEMO_VERSION = 4
"""Bump when the generated content changes, so stale manifests are rebuilt."""

DEFAULT_COUNTS: dict[str, int] = {
    "q_instruct_images": 3000,
    "q_instruct_extra_every": 3,
    "icm_instruct_images": 4000,
    "icm_instruct_extra_every": 2,
    "icm_instruct_descriptions": 1,
    "qbench_items": 200,
    "icm_val_items": 200,
}
"""Sizes at ``scale=1.0``; the ``*_extra_every`` and ``icm_instruct_descriptions`` entries are not
scaled.

The mix is dominated by the questions the held-out sets ask (every Q-Instruct image carries the
distortion, Yes/No and brightness multiple choices; every ICM image the decisive ``pair0``), with
free text on one image in ``*_extra_every`` and one explanation round instead of upstream's five:
measured in docs/benchmarks.md ("Demo learning"), this is what lets the tiny model pass 90 % on
both held-out sets within the demo's training budget on two CPU cores."""

IMAGE_SIZE = 64
"""Side of the low-level images: 64 px with patch 8 gives the demo model's 64 image tokens."""


@dataclass
class DemoBundle:
    """The five demo datasets of one build.

    Attributes:
        seed: global seed.
        scale: size multiplier.
        q_instruct, icm_instruct, mix665k, qbench, icm_val: the datasets.
    """

    seed: int
    scale: float
    q_instruct: D.DemoDataset
    icm_instruct: D.DemoDataset
    mix665k: D.DemoDataset
    qbench: D.DemoDataset
    icm_val: D.DemoDataset

    def datasets(self) -> list[D.DemoDataset]:
        """The datasets in a fixed order."""
        return [self.q_instruct, self.icm_instruct, self.mix665k, self.qbench, self.icm_val]

    def counts(self) -> dict[str, dict[str, int]]:
        """Records and images per dataset (for manifests and reports)."""
        return {d.name: {"records": len(d.payload), "images": len(d.images)} for d in self.datasets()}


def generate_bundle(seed: int = 0, scale: float = 1.0) -> DemoBundle:
    """Build every dataset's records for (``seed``, ``scale``).

    Args:
        seed: global seed; each dataset draws from its own stream of it.
        scale: multiplies the default counts (tests use e.g. 0.05).

    Returns:
        The bundle.

    Raises:
        ValueError: if ``scale`` is not positive.
    """
    c = DEFAULT_COUNTS
    return DemoBundle(
        seed=seed,
        scale=scale,
        q_instruct=D.quality_train(
            seed, D.scaled(c["q_instruct_images"], scale, 20), size=IMAGE_SIZE, extra_every=c["q_instruct_extra_every"]
        ),
        icm_instruct=D.moderation_train(
            seed,
            D.scaled(c["icm_instruct_images"], scale, 20),
            n_descriptions=c["icm_instruct_descriptions"],
            size=IMAGE_SIZE,
            extra_every=c["icm_instruct_extra_every"],
        ),
        mix665k=mix665k(seed, scale),
        qbench=D.qbench_dev(seed, D.scaled(c["qbench_items"], scale, 20), size=IMAGE_SIZE),
        icm_val=D.icm_val(seed, D.scaled(c["icm_val_items"], scale, 20), size=IMAGE_SIZE),
    )


def render_dataset(ds: D.DemoDataset, cache: dict[ImageSpec, bytes] | None = None) -> dict[str, bytes]:
    """Render and encode every image of ``ds``.

    Args:
        ds: the dataset.
        cache: optional spec → bytes cache shared between calls (the same spec used under two
            paths, e.g. ``val/`` and ``val_MEQ/``, is drawn once).

    Returns:
        ``{relative path: encoded bytes}`` in sorted path order.
    """
    cache = {} if cache is None else cache
    out: dict[str, bytes] = {}
    for path in sorted(ds.images):
        spec = ds.images[path]
        if spec not in cache:
            cache[spec] = render_bytes(spec)
        out[path] = cache[spec]
    return out
