"""A run: what training and evaluation share about one model trained in one workdir.

run (the config checked once and built), train_state and optim (the state and its optimisers),
checkpointing (Orbax), workdir and tensorboard (the run's records), metrics (their scores).
"""
