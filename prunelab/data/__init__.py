"""Data sets as device-ready tensors: `load_dataset(DatasetHparams) -> DataSplit(train, test)`."""

from .augment import random_crop_flip
from .base import DataSplit, ImageData
from .sets import (DATASETS, IMAGENET10_WNIDS, ROOT_LAYOUTS, cache_dir, check_root,
                   dataset_shape, dataset_sizes, load_dataset, make_shapes)

__all__ = ["DATASETS", "DataSplit", "IMAGENET10_WNIDS", "ImageData",
           "ROOT_LAYOUTS", "cache_dir", "check_root", "dataset_shape", "dataset_sizes", "load_dataset", "make_shapes", "random_crop_flip"]
