"""The embedded corpora (DATA.md): the shapes world, scikit-learn's digits, a user's JSONL files,
and weighted mixtures of them. Every source yields `tokenizers_mm.document.Document`s."""
from train.data.digits import digit_captions, digits_documents
from train.data.jsonl import BadInput, load_jsonl
from train.data.mixture import Mixture, interleave, mix_documents
from train.data.shapes import (
    HOLDOUT_PAIRS, PALETTE, POSITIONS, SHAPES, SIZES, Scene, ShapeSpec, analyze, caption_variants,
    check, check_scene, render, shapes_documents,
)

__all__ = [
    "HOLDOUT_PAIRS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "Scene", "ShapeSpec", "analyze",
    "caption_variants", "check", "check_scene", "render", "shapes_documents",
    "digit_captions", "digits_documents", "BadInput", "load_jsonl", "Mixture", "interleave",
    "mix_documents",
]
