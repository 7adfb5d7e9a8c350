"""Foundation helpers every layer may use: devices and precision, one-line CLI errors, PNG plots.

Imports nothing else from ``cascade``.
"""
