"""One video on several GPUs: Ulysses sequence parallelism for the Wan DiT over torch.distributed.

- ulysses.py: the math. Each rank keeps L/N tokens of the DiT's hidden stream; around self-attention two
  all-to-alls give every rank the full sequence for H/N heads (so SLA's per-head block map sees the whole
  sequence), then give the tokens back. Hooked into `WanModel.forward(..., sp_group=...)`.
- runtime.py: rank 0 drives. Its pipeline is the ordinary one (text encoder, VAE, sampler, progress,
  cancel) with each DiT replaced by a `ShardedDiT` proxy that sends one command per forward; the other
  ranks hold only the DiT and `serve` those commands.
- launch.py: bring the ranks up, by spawning them from this process or under torchrun
  (`turbodiffusion generate --gpus 0,1,2,3 ...`).

NCCL on GPUs, gloo on the CPU (the equivalence tests run two gloo ranks). Importing this package imports
torch; `turbodiffusion_core` itself does not import it.
"""

from turbodiffusion_core.parallel.ulysses import (
    SequenceParallelError,
    SequenceShard,
    SPGroup,
    check_world_size,
    valid_world_sizes,
)

__all__ = ["SPGroup", "SequenceParallelError", "SequenceShard", "check_world_size", "valid_world_sizes"]
