"""Test helper: `longalign` (longalign_lib.cli) as `accelerate launch` starts it, on CPU processes (gloo).

accelerate turns the FSDP settings of a config file (configs/accelerate/fsdp2.yaml, sequence_parallel.yaml) on for
GPUs only: on CPU processes the same launch would silently train DDP. Launched with such a config, this entry point
hands the Trainer the FSDP plugin built from that file's settings (accelerate launch exports them as FSDP_*
variables: version, wrap policy, state-dict type, ...) and then runs the CLI unchanged. With any other config (DDP,
DeepSpeed ZeRO-3, which accelerate does run on CPU) it is the plain CLI.

Run as (repository root on PYTHONPATH):
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 tests/cli_cpu.py \
        train --preset cpu-demo --set model.device=cpu --set batching.world_size=2 ...
"""
from __future__ import annotations

import os
import sys

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from longalign_lib import cli, train


class CliCpuFsdpTrainer(train.LongAlignTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the config's FSDP_* settings
        self.is_fsdp_enabled = True


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        train.LongAlignTrainer = CliCpuFsdpTrainer
    sys.exit(cli.main())
