"""What a data set's images are, declared by the data set class: evaluation picks its features from it.

``natural``: photographs (ImageNet-like); Inception-v3 features (FID, IS) are meaningful.
``synthetic``: anything ImageNet features say little about (the built-in procedural shapes); evaluation
then measures with a classifier trained on the data set itself.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ImageDomain", "IMAGE_DOMAINS", "image_domain"]

ImageDomain = Literal["natural", "synthetic"]
IMAGE_DOMAINS: tuple[ImageDomain, ...] = ("natural", "synthetic")


def image_domain(dataset_class: type) -> ImageDomain:
    """The ``domain`` a data set class declares; ValueError naming the class when it declares none."""
    domain = getattr(dataset_class, "domain", None)
    if domain not in IMAGE_DOMAINS:
        raise ValueError(
            f"data set {dataset_class.__module__}.{dataset_class.__qualname__} does not declare its image domain; "
            f"give the class `domain: ClassVar[ImageDomain] = 'natural'` (or 'synthetic'), or choose the "
            "features yourself: features=inception or features=classifier"
        )
    return domain
