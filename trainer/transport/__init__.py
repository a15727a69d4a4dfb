"""How published weights (and prompt images) move between processes: the object store, CUDA IPC and
the NCCL/gloo broadcast. Above the core, below the pools and the learner."""
