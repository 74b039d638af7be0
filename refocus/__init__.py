"""refocus: reinforcement-learned, query-conditioned frame selection for video-LLMs.

This package is the learning core (policy, rewards, trainer, baselines, metrics); the other
layers are ``stores`` (file formats), ``pipelines`` (stages) and ``flows`` (orchestration
and the command line).
"""

__version__ = "0.1.0"
