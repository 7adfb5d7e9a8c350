"""The cascade at sampling time: the orchestrator that chains stage checkpoints in memory
(``orchestrator``) and the sampling job behind ``scripts/cascade_sample.py`` (``job``).
"""

from cascade.pipeline.orchestrator import StageSettings  # noqa: F401  # configs and old checkpoints name cascade.pipeline.StageSettings
