"""TFDS `coco/2017`: the real builder, its label <-> COCO category id mapping.

The TFDS builder (tensorflow_datasets/object_detection/coco.py) stores, per image: `image`
(original JPEG bytes), `image/filename`, `image/id`, and `objects` with `bbox` (normalised
[ymin, xmin, ymax, xmax]), `label` (0..79, the index of the category in the annotation file's
category list, which is sorted by id), `is_crowd`, `area`, `id`. The pipeline reads it with
the image left encoded (`SkipDecoding`) and decodes it itself.

Preparing it (docs/data.md), once:

    python -m focus_detr_jax.data.coco_tfds --data_dir=DIR                 # downloads ~27 GB
    python -m focus_detr_jax.data.coco_tfds --data_dir=DIR --manual_dir=ZIPS   # zips at hand

(the same as `tfds build coco/2017 --data_dir=DIR [--manual_dir=ZIPS]`, whose CLI needs
apache-beam installed, tensorflow/datasets#5463), or point `config.data.data_dir` at an existing
prepared data_dir (a local folder or a `gs://` bucket).
"""

import argparse

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


# The files coco/2017 downloads; with `manual_dir` TFDS takes them from there instead.
COCO_2017_FILES = ("train2017.zip", "val2017.zip", "test2017.zip", "annotations_trainval2017.zip",
                   "image_info_test2017.zip")


def prepare(data_dir: str, manual_dir: str | None = None, download_dir: str | None = None,
            name: str = TFDS_NAME) -> tfds.core.DatasetBuilder:
  """Downloads (or takes from `manual_dir`) and prepares coco/2017 under `data_dir`."""
  builder = tfds.builder(name, data_dir=data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_dir=download_dir, download_config=config)
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(description="Prepare TFDS coco/2017 for the pipeline.")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write (local or gs://)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding the already downloaded " + ", ".join(COCO_2017_FILES))
  parser.add_argument("--download_dir", default=None, help="where downloads/extractions go "
                      "(default: <data_dir>/downloads)")
  args = parser.parse_args(argv)
  builder = prepare(args.data_dir, args.manual_dir, args.download_dir)
  print(f"prepared {builder.info.full_name} in {builder.data_dir}:")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} images")


if __name__ == "__main__":
  main()
