"""The diffusion mathematics: schedules, the forward process and posterior, parameterisations,
losses, model functions, samplers and guidance. Imports only ``cascade.utils``.
"""
