"""The diffusion of the paper around the networks: its maths, its losses and its sampler.

diffusion (CARD schedule, forward noising and reverse step with a prior mean), losses (the
training objectives), models (the one factory: config -> modules), sampler (the reverse chain).
"""
