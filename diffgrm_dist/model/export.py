"""A trained model as files: safetensors weights + a JSON config, loaded without running code."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from diffgrm_dist.core.config import ModelConfig
from diffgrm_dist.core.errors import DiffGRMError
from diffgrm_dist.model.network import DiffGRM, SidSpec

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "model_config.json"


def export_weights(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, spec: SidSpec,
                   folder: Path) -> None:
    """Everything needed to rebuild the model, and nothing executable."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / EXPORT_WEIGHTS))
    (folder / EXPORT_CONFIG).write_text(json.dumps(
        {"model": asdict(model_cfg), "sizes": list(spec.sizes), "max_history": spec.max_history,
         "items": spec.items}, indent=2) + "\n")


def load_exported(folder: Path, device: str = "cpu") -> DiffGRM:
    """Loads safetensors weights (no code is executed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        if not (folder / name).is_file():
            raise DiffGRMError(f"{folder / name}: missing (re-run `diffgrm train`)")
    try:
        meta = json.loads((folder / EXPORT_CONFIG).read_text())
        spec = SidSpec(tuple(meta["sizes"]), meta["max_history"], meta["items"])
        model = DiffGRM(ModelConfig(**meta["model"]), spec)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DiffGRMError(f"{folder / EXPORT_CONFIG}: not a model config this version reads ({exc}); "
                           "re-run `diffgrm train`") from None
    try:
        weights = load_file(str(folder / EXPORT_WEIGHTS), device=device)
        model.load_state_dict(weights)
    except (SafetensorError, RuntimeError) as exc:  # truncated / corrupt file, or wrong tensors
        raise DiffGRMError(f"{folder / EXPORT_WEIGHTS}: corrupt or not this model's weights "
                           f"({str(exc).splitlines()[0]}); re-run `diffgrm train`") from None
    return model.to(device).eval()
