"""C++ kernels built on first use (PyTorch's JIT extension builder) and cached per machine; ``None`` where they cannot be.

The only one so far is ``csrc/group_norm_act.cpp``: GroupNorm, ADM's scale-shift and SiLU in four memory
passes over channels-last maps (see :mod:`cascade.nn.group_norm`). It is built once per CPU type;
the library is cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and reused
by later processes. Where it cannot be built (no C++ compiler, a compiler without OpenMP such as Apple's
clang) every caller falls back to PyTorch ops after a one-line warning; ``CASCADE_NATIVE_KERNELS=0`` does so
silently.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["group_norm_kernels", "loaded_group_norm_kernels", "native_kernels_enabled"]

SOURCES = Path(__file__).resolve().parent / "csrc"

# Instruction sets to compile for, by what PyTorch detected at run time: the library is named after the level, so a
# cache shared by machines of different CPU types (an NFS home directory) never hands one an instruction it lacks.
ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


_loaded_group_norm: ModuleType | None = None  # set once group_norm_kernels() has built or loaded the library


def loaded_group_norm_kernels() -> ModuleType | None:
    """The library if :func:`group_norm_kernels` has loaded it in this process, else None; never builds anything.

    For code traced by ``torch.compile``, which must decide without side effects whether the kernels exist.
    """
    return _loaded_group_norm


def native_kernels_enabled() -> bool:
    """False when the environment variable ``CASCADE_NATIVE_KERNELS`` is ``0`` (use PyTorch ops only)."""
    return os.environ.get("CASCADE_NATIVE_KERNELS", "1") != "0"


@functools.cache
def group_norm_kernels() -> ModuleType | None:
    """The compiled ``group_norm_act.cpp`` (functions ``forward`` and ``backward``), or None where it cannot be built."""
    global _loaded_group_norm
    if not native_kernels_enabled():
        return None
    level = torch.backends.cpu.get_cpu_capability()
    level = next((key for key in ARCH_FLAGS if level.startswith(key)), "DEFAULT")
    name = f"cascade_group_norm_act_{level.lower()}"
    logger = logging.getLogger("torch.utils.cpp_extension")
    level_before = logger.level
    logger.setLevel(logging.ERROR)  # it warns at import when a CUDA toolkit is found without a GPU: irrelevant here
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        _announce_first_build(cpp_extension, name, level)
        _loaded_group_norm = cpp_extension.load(
            name=name,
            sources=[str(SOURCES / "group_norm_act.cpp")],
            extra_cflags=["-O3", "-fopenmp", *ARCH_FLAGS.get(level, [])],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        return _loaded_group_norm
    except Exception as error:  # any build failure means: use PyTorch's ops
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(
            f"cascade: the C++ GroupNorm kernel could not be built ({first_line[:200]}); using PyTorch ops, "
            "which are slower for channels-last bf16 and float32 on CPU. Set CASCADE_NATIVE_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    finally:
        logger.setLevel(level_before)


def _announce_first_build(cpp_extension: ModuleType, name: str, level: str) -> None:
    """One line on stderr when no built library is cached yet: the next ~15 s go to the compiler."""
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))  # private API, only for this message
    except Exception:
        return
    if not any(build_dir.glob(f"{name}*.so")):
        print(
            f"cascade: compiling the channels-last GroupNorm kernel for this CPU ({level}), once (~15 s); cached in {build_dir}",
            file=sys.stderr,
            flush=True,
        )


def _put_ninja_on_path() -> None:
    """PyTorch's builder runs ``ninja``; the pip package's binary is not on PATH when the venv is not activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
