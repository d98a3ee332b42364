"""Running 2:4 checkpoints faster than dense on the GPU.

- :mod:`.format`: the compressed format the Triton kernel reads (kept values, 2-bit positions);
- :mod:`.cusparselt`: cuSPARSELt's product, called so that its result is contiguous and its bias fused;
- :mod:`.triton_decode`: a Triton 2:4 GEMM for few tokens (decode), imported only where it runs;
- :mod:`.linear`: :class:`Linear24`, the deployed linear holding the compressed weight only;
- :mod:`.policy`: per linear shape, 2:4 (which storage) or dense, from measured costs and a workload;
- :mod:`.costs`: timing on the GPU (CUDA events, replayed CUDA graphs, one linear's cost);
- :mod:`.convert`: :func:`deploy`, the policy and the conversion of a model's 2:4 linears;
- :mod:`.gathers`: runtime input gathers, folded into the norms that produce their input;
- :mod:`.fp8`: FP8 x 2:4 through cuSPARSELt, a measured candidate;
- :mod:`.speed`: ``permsparse speed``, dense against 2:4 end to end.
"""
from .convert import deploy, gpu_problem
from .format import compress, decompress
from .gathers import GatherFolds, attach_gathers, fold_gathers, remove_gathers
from .linear import STORAGES, Linear24
from .policy import DEFAULT_WORKLOAD, Choice, Plan, choose, plan, read_costs, write_costs

__all__ = [
    "DEFAULT_WORKLOAD", "STORAGES", "Choice", "GatherFolds", "Linear24", "Plan", "attach_gathers", "choose", "compress",
    "decompress", "deploy", "fold_gathers", "gpu_problem", "plan", "read_costs", "remove_gathers", "write_costs",
]
