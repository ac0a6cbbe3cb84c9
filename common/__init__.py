"""Distributed core shared by the videodpo and llmpost tracks.

Nothing in here imports either track: configs, process groups and meshes, FSDP2,
attention back-ends, context and pair parallelism, the data-regularization projector,
checkpoints and metrics.
"""
