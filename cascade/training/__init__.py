"""The training runtime: the trainer loop, its resumable state, self-describing checkpoints,
signal and fault handling. Stage-agnostic: it sees stages only through ``cascade.roles``.
"""
