"""What prunelab knows about its data sets, models and synthetic sources, without torch.

The facts here are read by config validation (`hparams`), by the cost model, by the loaders in
`prunelab.data` and by `analysis/`, which never imports torch. The registries that build things
(`prunelab.data.sets.LOADERS`, `prunelab.models.MODELS`, `prunelab.synthetic.DISTILLERS` and
`CORESETS`) hold exactly the names listed here; tests/test_architecture.py checks that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSetFacts:
    """A data set as shipped: channels, image size, classes, train and test images (shapes is
    generated: its default sizes), whether `image_size` resizes it, and the folders its root holds."""

    channels: int
    size: int
    classes: int
    train: int
    test: int
    resizable: bool = False
    layout: tuple[str, ...] = ()

    @property
    def real_per_class(self) -> float:
        """Real training images per class (for compression ratios)."""
        return self.train / self.classes


# The first 10 WordNet ids of IDC's ImageNet-100 list; class index = position here.
IMAGENET10_WNIDS = ("n02869837", "n01749939", "n02488291", "n02107142", "n13037406",
                    "n02091831", "n04517823", "n04589890", "n03062245", "n01773797")

DATASETS = {
    "digits": DataSetFacts(1, 8, 10, 1438, 359),
    "cifar10": DataSetFacts(3, 32, 10, 50_000, 10_000, layout=("cifar-10-batches-py",)),
    "cifar100": DataSetFacts(3, 32, 100, 50_000, 10_000, layout=("cifar-100-python",)),
    "shapes": DataSetFacts(3, 32, 10, 10_000, 2_000, resizable=True),
    "imagenet10": DataSetFacts(3, 224, 10, 13_000, 500, resizable=True,
                               layout=tuple(f"{s}/{w}" for s in ("train", "val") for w in IMAGENET10_WNIDS)),
    # ILSVRC-2012 (ImageNet-1k): 1,281,167 training images, the 50,000 validation images as the test set
    "imagenet": DataSetFacts(3, 224, 1000, 1_281_167, 50_000, resizable=True, layout=("train", "val")),
}

MODELS = ("convnet3", "resnet10_bn", "resnet18_bn", "resnet50_bn")

DISTILLERS = ("idc", "dm")  # pruning_data.kind = distilled, pruning_data.method = one of these
CORESETS = ("random_subset", "herding")  # pruning_data.kind = one of these
# pruning.method: "magnitude" trains on the pruning data and prunes the smallest weights (IMP,
# distilled pruning); the others find a round's mask at initialization (`prunelab.sources.SOURCES`)
INIT_SOURCES = ("random", "magnitude_init", "snip", "grasp", "synflow")
MASK_METHODS = ("magnitude",) + INIT_SOURCES
ALLOCATIONS = ("global", "layerwise", "erk", "chain")  # pruning.scope: how the kept weights spread over layers

# The version of prunelab's synthetic-set code: a set it builds (and every mask found on one) changes
# with it, so it is part of the synthetic store's keys and of such chains' hashes. Bump it when a
# distiller's output changes for the same inputs (3: DSA on normalized images, IDC's order).
SYNTHETIC_CODE_VERSION = 3


def dataset_facts(name: str) -> DataSetFacts:
    """The facts of data set `name`; KeyError names the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def real_images_per_class(name: str) -> float | None:
    """Real training images per class of data set `name`, or None if unknown."""
    facts = DATASETS.get(name)
    return facts.real_per_class if facts else None
