"""The TVM backend: attention plans lowered to TensorIR (kernel.py, emit.py) and built with LLVM for the host
CPU (host.py); backend.py registers "tvm" with attnc.runtime.api and launches through DLPack."""
