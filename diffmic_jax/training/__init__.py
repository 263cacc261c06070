"""Training: the DCG warm-up and joint DCG + diffusion stages, validating through evaluation.

train (`train_and_evaluate`: stages, resume, best/latest checkpoints, the final test), summary
(`--mode summary`: parameter counts and FLOPs of the train and sampler steps).
"""
