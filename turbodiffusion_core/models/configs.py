"""Architecture configurations of the Wan DiT variants we run (reference/wan.md §1.1, turbodiffusion.md §2.4).

A config fixes every shape in the network, so it is what a checkpoint is checked against. The names are
the `arch` values the presets in `turbodiffusion_core.spec` refer to. The "tiny" ones are ours: same code
paths, small enough for a CPU test (text_dim 32 because the tiny umT5 encoder has d_model 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DiTConfig:
    """Shape of one Wan DiT (`WanModel`). Field names follow the official `config.json`."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        """Latent voxels per token (1*2*2 = 4)."""
        return math.prod(self.patch_size)

    @property
    def patch_in_features(self) -> int:
        """Input width of the Linear patch embedding: in_dim * kt * kh * kw."""
        return self.in_dim * self.patch_volume

    @property
    def cond_dim(self) -> int:
        """Channels of the image-conditioning input `y` concatenated after the noisy latent (0 for T2V)."""
        return self.in_dim - self.out_dim

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real channels of each head given to the (frame, height, width) rotary axes.

        Wan's rule d - 4*(d//6), 2*(d//6), 2*(d//6): 44/42/42 for head_dim 128 (22/21/21 complex pairs),
        12/10/10 for the tiny head_dim 32.
        """
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


DIT_CONFIGS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16),
    # Wan2.2 I2V-A14B expert (high or low noise): conditioning only through 36 input channels, no CLIP.
    "wan2.2-i2v-a14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
    "tiny-t2v": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, text_dim=32),
    "tiny-i2v": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, text_dim=32),
}


def get_dit_config(name_or_cfg: str | DiTConfig) -> DiTConfig:
    """Look a config up by arch name (a DiTConfig passes through), with the known names in the error."""
    if isinstance(name_or_cfg, DiTConfig):
        return name_or_cfg
    try:
        return DIT_CONFIGS[name_or_cfg]
    except KeyError:
        raise KeyError(f"unknown DiT architecture {name_or_cfg!r}; known: {', '.join(DIT_CONFIGS)}") from None
