"""hdpo_ray: H-DPO (entropy-controllable DPO) training on Ray.

Kept light on purpose: importing the package imports neither Ray nor DeepSpeed nor vLLM.
"""

__version__ = "0.1.0"
