"""How much memory a NOLA config's basis, coefficients and factors take, and the budget they must fit in: checked
before any module is replaced (:func:`check_basis_memory`)."""

from __future__ import annotations

import torch
from torch import nn

from ..._env import bytes_from_env

from ..lowrank import matrix_shape, resolve_slices
from .config import NolaConfig

BUDGET_ENV = "PEFT_NOLA_BASIS_MEMORY_BUDGET"


def check_basis_memory(config: NolaConfig, targets: list[tuple[str, nn.Module]], loading: bool = False) -> None:
    """Refuse, before any module is replaced, a config whose basis, coefficients and per-layer factors would not
    fit in memory (in every basis mode: the on-the-fly basis stores nothing, but its coefficients and the
    factors it forms in each forward still need room)."""
    if not targets:
        return
    needed = basis_bytes(config, targets, config.basis_mode) + working_bytes(config, targets)
    budget, where = basis_memory_budget(targets[0][1].weight.device)
    if budget is None or needed <= budget:
        return
    if loading:
        # A trained adapter's basis is fixed: 'shared' and the per-layer modes are different bases.
        advice = (
            "This adapter was trained with basis_mode='shared'; another mode would be another basis (another "
            "model), so free memory or load it on a larger device"
            if config.basis_mode == "shared" else
            "Use basis_mode='per_layer' (the same basis, regenerated on the fly instead of kept)"
            if config.basis_mode == "per_layer_cached" else "Free memory or load it on a larger device"
        )
    else:
        advice = (
            f"Use basis_mode='shared' (one basis per layer shape: {format_bytes(basis_bytes(config, targets, 'shared'))} "
            f"here) or 'per_layer' (regenerated on the fly, no basis memory), or lower num_basis_A / num_basis_B"
        )
    raise MemoryError(
        f"NOLA basis_mode={config.basis_mode!r} would need {format_bytes(needed)} of basis, coefficients and factors for "
        f"{len(targets)} adapted modules (k={config.num_basis_A}, l={config.num_basis_B}, r={config.r}), more than "
        f"the {format_bytes(budget)} budget ({where}). {advice}; or raise the budget with the environment variable "
        f"{BUDGET_ENV}=<bytes>."
    )


def basis_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]], mode: str) -> int:
    """Bytes of float32 basis that ``config`` keeps in memory for the ``(key, base layer)`` pairs it adapts in
    ``mode``: one basis per distinct shape when shared, one per adapted block when cached per layer."""
    if mode == "per_layer":
        return 0
    r, k, l = config.r, config.num_basis_A, config.num_basis_B
    shared, total = set(), 0
    for key, base_layer in targets:
        rows, cols = matrix_shape(base_layer)
        splits, adapt = resolve_slices(config.output_slices, key)
        if mode == "shared":
            shared |= {("A", cols), ("B", rows // splits)}
        else:
            total += len(adapt) * (k * r * cols + l * (rows // splits) * r)
    total += sum((k if factor == "A" else l) * r * size for factor, size in shared)
    return 4 * total


def working_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]]) -> int:
    """Bytes of float32 coefficients of all adapted blocks, plus the largest layer's factors ``A (r, cols)`` and
    ``B (rows, r)``, which every mode forms in the forward pass."""
    r, k, l = config.r, config.num_basis_A, config.num_basis_B
    coefficients, factors = 0, 0
    for key, base_layer in targets:
        rows, cols = matrix_shape(base_layer)
        splits, adapt = resolve_slices(config.output_slices, key)
        coefficients += len(adapt) * (k + l)
        factors = max(factors, len(adapt) * (r * cols + (rows // splits) * r))
    return 4 * (coefficients + factors)


def basis_memory_budget(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, where it comes from)``: ``$PEFT_NOLA_BASIS_MEMORY_BUDGET`` if set, else the memory available on
    ``device`` now (``None`` where that cannot be known, e.g. the meta device)."""
    budget = bytes_from_env(BUDGET_ENV)
    if budget is not None:
        return budget, BUDGET_ENV
    return available_memory(device)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, what they are)`` free on ``device`` now: a CUDA device's free memory, the machine's available memory
    for the CPU; ``None`` where that cannot be known (e.g. the meta device)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory on {device}"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available memory on this machine"
        except OSError:
            pass
    return None, ""


def format_bytes(num_bytes: int) -> str:
    """``"1,234,567 bytes (1.2 MiB)"``."""
    size = f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes:,} bytes ({size})"
