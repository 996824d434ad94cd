"""attnc.distributed: context parallelism for any attnc spec with dense storage over a torch.distributed process
group (NCCL on GPUs, gloo on CPUs). docs/distributed.md tells how to use it."""
from .context import ContextParallel, context_parallel
from .sharding import shard_sequence, unshard_sequence

__all__ = ["ContextParallel", "context_parallel", "shard_sequence", "unshard_sequence"]
