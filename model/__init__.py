"""The decoder-only transformer: config and presets, blocks, KV cache, loss. No data, no I/O beyond weights."""
from model.config import PRESETS, ModelConfig, num_params, preset
from model.transformer import (
    CacheState,
    KVCache,
    LossOutput,
    Transformer,
    lm_loss,
    packing_mask,
    positions_from_doc_ids,
)

__all__ = [
    "PRESETS", "ModelConfig", "num_params", "preset",
    "CacheState", "KVCache", "LossOutput", "Transformer", "lm_loss", "packing_mask", "positions_from_doc_ids",
]
