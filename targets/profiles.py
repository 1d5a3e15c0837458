"""Deployment targets as data: one frozen profile per device, in a registry.

Software versions (checked against NVIDIA's documentation, November 2026):
- JetPack 7.2 (Jetson Linux 39.2) runs on Jetson Orin and Thor with CUDA 13.2 and
  TensorRT 10.16; the Orin profiles assume it. TensorRT 11.4.1 supports JetPack 7.2.2+
  on AGX Orin and Thor only, so the Orin profiles stay on 10.16.
- JetPack 6.2 (Jetson Linux 36.4) ships TensorRT 10.3 and CUDA 12.6; the ``-jp6``
  profiles keep that line for devices still on it.
- Desktop and data-centre GPUs: TensorRT 11.4, the newest on PyPI (`pip install
  tensorrt`; NVIDIA's GitHub also tags 11.5), which takes only strongly typed networks.

Memory figures: Jetson modules share DRAM between the CPU and GPU, so ``usable_gib``
is what is left to one TensorRT process after JetPack, the OS and a headless desktop
(an assumption stated here, not measured on each device); desktop GPUs use the
card's memory less a margin for the driver and the CUDA context.
"""

from __future__ import annotations

import dataclasses

from sa_export.core.errors import UsageError


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    gpu_arch: str | None  # CUDA compute capability as sm_XY; None for CPU
    memory_gib: float
    usable_gib: float
    tensorrt: str | None  # expected TensorRT major.minor on the target
    precisions: tuple[str, ...]
    default_precision: str
    workspace_mib: int
    max_batch: int
    max_context: int
    max_prefill: int  # query tokens of the prefill optimization profile
    builds_on_device: bool  # engines must be built on the device itself (Jetson)
    jetpack: str | None = None  # the JetPack release the profile assumes (Jetson)
    cuda: str | None = None

    @property
    def writes_caches_in_place(self) -> bool:
        """TensorRT 10.15+ imports TensorScatter as an in-place KV-cache update: caches become
        fixed-capacity buffers instead of a concatenation at every step."""
        return self.tensorrt is not None and self.tensorrt_version >= (10, 15)

    @property
    def tensorrt_version(self) -> tuple[int, int]:
        major, minor = self.tensorrt.split(".")[:2]
        return int(major), int(minor)

    @property
    def uses_tensorrt(self) -> bool:
        return self.tensorrt is not None

    @property
    def strongly_typed_only(self) -> bool:
        """TensorRT 11 accepts only strongly typed networks: precision lives in the ONNX types."""
        return self.tensorrt is not None and int(self.tensorrt.split(".")[0]) >= 11


# JetPack release -> (TensorRT, CUDA) it ships for Jetson Orin.
JETPACK = {"7.2": ("10.16", "13.2"), "6.2": ("10.3", "12.6")}


def _jetson(
    name: str, memory: float, usable: float, workspace: int, batch: int, context: int, prefill: int, what: str, jetpack: str = "7.2"
) -> TargetProfile:
    tensorrt, cuda = JETPACK[jetpack]
    return TargetProfile(
        name=name,
        description=f"NVIDIA Jetson {what} (JetPack {jetpack})",
        gpu_arch="sm_87",
        memory_gib=memory,
        usable_gib=usable,
        tensorrt=tensorrt,
        jetpack=jetpack,
        cuda=cuda,
        precisions=("fp32", "fp16"),
        default_precision="fp16",
        workspace_mib=workspace,
        max_batch=batch,
        max_context=context,
        max_prefill=prefill,
        builds_on_device=True,
    )


def _desktop(name: str, arch: str, memory: float, what: str, trt: str = "11.4") -> TargetProfile:
    return TargetProfile(
        name=name,
        description=what,
        gpu_arch=arch,
        memory_gib=memory,
        usable_gib=memory - 1.5,
        tensorrt=trt,
        cuda="13",
        precisions=("fp32", "fp16"),
        default_precision="fp16",
        workspace_mib=4096,
        max_batch=4,
        max_context=8192,
        max_prefill=2048,
        builds_on_device=False,
    )


PROFILES: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        _jetson("jetson-orin-agx-64gb", 64, 56, 4096, 4, 8192, 2048, "AGX Orin 64GB"),
        _jetson("jetson-orin-agx-32gb", 32, 27, 4096, 4, 8192, 2048, "AGX Orin 32GB"),
        _jetson("jetson-orin-nx-16gb", 16, 13, 2048, 2, 8192, 1024, "Orin NX 16GB"),
        _jetson("jetson-orin-nano-8gb", 8, 6, 1024, 1, 4096, 512, "Orin Nano 8GB"),
        _jetson("jetson-orin-agx-64gb-jp6", 64, 56, 4096, 4, 8192, 2048, "AGX Orin 64GB", jetpack="6.2"),
        _jetson("jetson-orin-nx-16gb-jp6", 16, 13, 2048, 2, 8192, 1024, "Orin NX 16GB", jetpack="6.2"),
        _jetson("jetson-orin-nano-8gb-jp6", 8, 6, 1024, 1, 4096, 512, "Orin Nano 8GB", jetpack="6.2"),
        _desktop("desktop-ampere", "sm_86", 24, "Ampere desktop GPU (RTX 30 series, 24 GB class)"),
        _desktop("desktop-ada", "sm_89", 24, "Ada desktop GPU (RTX 40 series, 24 GB class)"),
        _desktop("hopper", "sm_90", 80, "Hopper data-centre GPU (H100 80 GB)"),
        TargetProfile(
            name="cpu",
            description="ONNX Runtime on the CPU (no TensorRT)",
            gpu_arch=None,
            memory_gib=0,
            usable_gib=0,
            tensorrt=None,
            precisions=("fp32", "fp16", "int4"),
            default_precision="fp32",
            workspace_mib=0,
            max_batch=4,
            max_context=8192,
            max_prefill=2048,
            builds_on_device=False,
        ),
    )
}

# `jetson-orin` names the smallest Orin: where memory fit decides whether a model runs at all.
ALIASES = {"jetson-orin": "jetson-orin-nano-8gb", "jetson-orin-jp6": "jetson-orin-nano-8gb-jp6"}


TABLE_COLUMNS = ("target", "GPU", "memory", "usable", "JetPack", "TensorRT", "CUDA", "precisions", "default", "workspace", "batch", "context", "builds")


def table_rows() -> list[tuple[str, ...]]:
    """One row per profile, for `sa-export targets`."""
    return [
        (
            p.name, p.gpu_arch or "-", f"{p.memory_gib:g} GiB" if p.memory_gib else "host", f"{p.usable_gib:g} GiB" if p.usable_gib else "-",
            p.jetpack or "-", p.tensorrt or "-", p.cuda or "-", ",".join(p.precisions), p.default_precision,
            f"{p.workspace_mib} MiB" if p.workspace_mib else "-", str(p.max_batch), str(p.max_context), "on device" if p.builds_on_device else "here",
        )
        for p in PROFILES.values()
    ]


def target_names() -> list[str]:
    return [*PROFILES, *ALIASES]


def get_target(name: str) -> TargetProfile:
    name = ALIASES.get(name, name)
    if name not in PROFILES:
        raise UsageError(f"unknown target {name!r}; `sa-export targets` lists them")
    return PROFILES[name]
