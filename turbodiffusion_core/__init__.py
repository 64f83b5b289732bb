"""TurboDiffusion engine: Wan2.1 / Wan2.2 video diffusion with rCM, SLA and quantized linears.

Importing this package does not import torch; the torch-using modules are imported on demand.
"""

__version__ = "0.1.0"
