"""apex_reward.training: manifests, corpus preparation, embedding extraction, training, grid, arena.

Needs the ``train`` extra: ``pip install 'apex-reward[train]'``.
"""
