"""Test helper: the Trainer's FSDP2 path on CPU processes (gloo), for the torchrun workers of the parallel tests.

accelerate enables FSDP on GPUs only. `CpuFsdp2Trainer` gives a CPU run the plugin that configs/accelerate/fsdp2.yaml
gives a GPU run, so the Trainer takes its FSDP2 path (fully_shard, DCP checkpoints, sharded optimizer). A worker
script imports it with the repository root on sys.path: `from tests.fsdp2_cpu import CpuFsdp2Trainer`.
"""
from __future__ import annotations

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from longalign_lib import train


class CpuFsdp2Trainer(train.LongAlignTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT")
        self.is_fsdp_enabled = True
