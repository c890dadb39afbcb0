"""TFDS `coco/2017`: the real builder, its label <-> COCO category id mapping.

The TFDS builder (tensorflow_datasets/object_detection/coco.py) stores, per image: `image`
(original JPEG bytes), `image/filename`, `image/id`, and `objects` with `bbox` (normalised
[ymin, xmin, ymax, xmax]), `label` (0..79, the index of the category in the annotation file's
category list, which is sorted by id), `is_crowd`, `area`, `id`. The pipeline reads it with
the image left encoded (`SkipDecoding`) and decodes it itself.

Preparing it (docs/data.md): `tfds build coco/2017 --data_dir=DIR` (downloads ~25 GB), or with
the zips already downloaded `--manual_dir=DIR_WITH_ZIPS`, or point `config.data.data_dir` at an
existing prepared data_dir (a local folder or a `gs://` bucket).
"""

import tensorflow_datasets as tfds

TFDS_NAME = "coco/2017"

# The 80 COCO category ids in label order (sorted ids of instances_*2017.json).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90)

COCO_CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")

assert len(COCO_CATEGORY_IDS) == len(COCO_CATEGORY_NAMES) == 80


def coco_builder(data_dir=None, name: str = TFDS_NAME) -> tfds.core.DatasetBuilder:
  """The real `coco/2017` builder (never downloads; reading needs a prepared data_dir)."""
  return tfds.builder(name, data_dir=data_dir)
