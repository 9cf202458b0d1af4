"""Everything that turns documents into token ids and back."""
from tokenizers_mm.document import Document, Segment, is_image

__all__ = ["Document", "Segment", "is_image"]
