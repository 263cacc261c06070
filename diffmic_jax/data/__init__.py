"""The data: raw layouts and official split pickles -> TFDS datasets -> Grain batches.

layouts, official_pickle and images list and read the raw files; builders write the prepared
datasets; splits makes train/val/test; demo draws the synthetic set; input_pipeline batches them.
"""
