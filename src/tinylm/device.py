"""The hardware: which device, which autocast dtype, and the matrix-product peak of the step log's MFU.

MFU (model FLOPs utilisation) = the model's FLOPs per second (6 N per token plus attention,
`Transformer.flops_per_token`, PaLM appendix B) / the device's peak for the dtype the products run in. A GPU's peak is its
datasheet's dense bf16/fp16 tensor-core figure (the H200 measured 798 of its 989 TFLOP/s on
8192-square products here, docs/gpu.md); a CPU's is measured once per process, dtype and thread
count, on square products (a quarter of a second).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow its bf16 products; lower caps emulate them
_ONEDNN_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_")


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) and torch may use
    them: `ATEN_CPU_CAPABILITY=avx2` or an `ONEDNN_MAX_CPU_ISA` below AVX512_CORE_BF16 make bf16
    products emulated (~150x slower than fp32), so those count as no bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not cap.startswith(_ONEDNN_BF16_ISAS):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(name: str) -> torch.device:
    """`train.device`: a name as torch takes it, or "auto": CUDA, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`train.dtype` as the autocast dtype (float32: no autocast). "auto": bf16 on GPUs that have it,
    else fp16 (with a gradient scaler); bf16 on CPUs with bf16 instructions, else fp32."""
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name != "auto":
        if name not in named:
            raise ValueError(f"train.dtype must be auto, bf16, fp16 or fp32, not {name!r}")
        return named[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


# dense bf16 / fp16 tensor-core FLOP/s, from the vendors' datasheets; the first name found in the
# device name wins (so "H100 PCIe" before "H100")
DATASHEET_BF16 = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}
_measured: dict[tuple, float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str] | None:
    """(FLOP/s, where the figure comes from) for products in `dtype` on `device`; None if not known
    (a GPU missing from the table, fp32 on a GPU, other devices)."""
    if device.type == "cuda":
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        name = torch.cuda.get_device_name(device)
        return next(((flops, f"{key} datasheet") for key, flops in DATASHEET_BF16.items() if key in name), None)
    if device.type == "cpu":
        key = (dtype, torch.get_num_threads())
        if key not in _measured:
            _measured[key] = best_cpu_peak(dtype, measure_cpu_peak(dtype))
        return _measured[key], "measured"
    return None


def best_cpu_peak(dtype: torch.dtype, measured: float) -> float:
    """The best of this measurement and the earlier ones on this machine: a quarter-second measurement
    taken while another process shares the cores reads low (and MFU then reads over 100%), a fast one
    never reads high. Kept beside the compile costs in ~/.cache/tinylm/peak.json; best effort."""
    import json

    from .compiling import cache_file, device_name
    from .files import write_json

    path = cache_file().with_name("peak.json")
    key = f"{device_name(torch.device('cpu'))} | {dtype} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    try:
        seen = json.loads(path.read_text(encoding="utf-8"))
        earlier = float(seen.get(key, 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        seen, earlier = {}, 0.0
    if measured > earlier:
        try:
            write_json(path, {**seen, key: measured})
        except OSError:
            pass
    return max(measured, earlier)


@torch.no_grad()
def measure_cpu_peak(dtype: torch.dtype, seconds: float = 0.25, sizes: tuple[int, ...] = (256, 512, 1024)) -> float:
    """Best FLOP/s of square products of each size in `sizes`, seconds / len(sizes) each.

    A dtype the CPU emulates (bf16 without AVX512-BF16 or AMX: ~150x slower than fp32) stops at the
    first size whose single product takes longer than its share of the time."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / len(sizes):
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
        if reps < 2:
            break
    return best
