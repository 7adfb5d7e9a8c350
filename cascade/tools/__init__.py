"""Developer tooling outside the runtime library: the training-step benchmark against a diffusers
twin. Nothing under ``cascade`` outside this folder imports it.
"""
