"""Interoperability with the original PyTorch Tiny-ONN code."""

from tinyonn_jax.interop.pytorch import (
    check_state_dict,
    expected_shapes,
    export_state_dict,
    import_state_dict,
    load_safetensors,
    reference_config,
    save_safetensors,
)

__all__ = [
    "check_state_dict",
    "expected_shapes",
    "export_state_dict",
    "import_state_dict",
    "load_safetensors",
    "reference_config",
    "save_safetensors",
]
