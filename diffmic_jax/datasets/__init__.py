"""Datasets for diffmic-jax: TFDS builders (array_record, no TensorFlow), image reading and
conversion, the official split-pickle reader, splits and deduplication, and the synthetic demo.

Only `builders` imports tensorflow_datasets; the other modules are plain numpy/Pillow.
"""
