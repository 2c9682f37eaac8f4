"""pytest-benchmark hook: record the versions that matter in the machine info of saved runs."""
import os

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton_version
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_count"] = os.cpu_count()
