"""The public sampling API: load a checkpoint folder, generate documents from prompt documents.

    from sample.api import MultimodalModel
    mm = MultimodalModel.from_pretrained("runs/default")
    docs = mm.generate(["a small red circle in the top left"], next="image", n=4, seed=0)
    docs[0].images[0].save("circle.png")

Prompts are documents: a list of text strings and PIL images (or a `Document`). The result of
each sample is a Document holding only the new segments.

Retrieval (RA-CM3 / CM3Leon): a checkpoint with a `retriever/` folder can `retrieve(prompt, k)`
documents from its training bank; `generate(..., retrieve=...)` prepends them behind `<break>`
as in training (on by default for a model trained with retrieval) and reports them with their
scores in `Generation.retrieved`. `on_token(sample, token_id)` streams
every drawn token; `on_image(sample, image)` every image as soon as its last code is drawn.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from PIL import Image

from model.checkpoint import RETRIEVER_DIR, load_pretrained
from model.precision import bf16_pays
from model.retrieval import RetrievalBank
from model.transformer import Transformer
from sample.generate import SamplingConfig, generate_ids, image_state
from tokenizers_mm import special
from tokenizers_mm.document import Document, Segment
from tokenizers_mm.multimodal import MultimodalTokenizer

Next = Literal["auto", "image", "text"]


@dataclass(frozen=True)
class Retrieved:
    """One document retrieved from the bank for a prompt."""

    score: float  # cosine similarity of the prompt's and the document's embeddings, in [-1, 1]
    document: Document  # decoded from the bank's token ids
    id: int  # the bank entry (= document index in the training shard)
    ids: list[int] = field(default_factory=list, repr=False)  # its token ids, as prepended


@dataclass
class Generation:
    """What `MultimodalModel.generate` returns for one sample."""

    document: Document  # the new segments only
    ids: list[int]  # the new token ids
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as the model saw it (retrieved part included)
    retrieved: list[Retrieved] = field(default_factory=list)  # prepended documents, best first (empty: no retrieval)


class MultimodalModel:
    """A trained model and its tokenizer, ready to sample."""

    def __init__(self, model: Transformer, tokenizer: MultimodalTokenizer, bank: RetrievalBank | None = None,
                 trained_with_retrieval: bool = False, retrieval_k: int = 2,
                 decoding_dtype: torch.dtype = torch.float32) -> None:
        if trained_with_retrieval and bank is None:
            raise ValueError("a model trained with retrieval needs its retrieval bank (model.retrieval.RetrievalBank)")
        self.model = model.eval()
        # what the samplers run: the model itself, or a copy with weights in decoding_dtype (bf16 halves
        # the bytes each decoding step reads: Transformer.decoding_copy); scoring keeps self.model
        same = decoding_dtype == model.tok_emb.weight.dtype
        self.decoder = self.model if same else model.decoding_copy(decoding_dtype)
        self.tokenizer = tokenizer
        self.bank = bank
        self.trained_with_retrieval = trained_with_retrieval
        self.retrieval_k = max(1, retrieval_k)  # default k: the most neighbours the model saw in training

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", compile_decoding: bool = False,
                        precision: Literal["auto", "fp32", "bf16"] = "auto") -> "MultimodalModel":
        """Load a model folder or a run folder's newest checkpoint (see model/checkpoint.py), with
        its retrieval bank when the folder has one. compile_decoding: `torch.compile` the one-token
        decoding step (slow first call per batch shape, faster after: see Transformer.compile_decoding).
        precision: the weights sampling decodes with; "auto" is bf16 where the hardware multiplies it
        natively (model.precision.bf16_pays), else float32. Scoring (classification) always reads the
        float32 weights."""
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        loaded = load_pretrained(path, device=device)
        bf16 = bf16_pays(device) if precision == "auto" else precision == "bf16"
        folder = loaded.path / RETRIEVER_DIR
        bank = RetrievalBank.load(folder) if folder.is_dir() else None
        mm = cls(loaded.model, loaded.tokenizer, bank, bool(loaded.info.get("trained_with_retrieval")),
                 int(loaded.info.get("retrieval_k") or 2), torch.bfloat16 if bf16 else torch.float32)
        if compile_decoding:
            mm.decoder.compile_decoding()
        return mm

    @property
    def can_retrieve(self) -> bool:
        """True when the checkpoint carries a retrieval bank."""
        return self.bank is not None

    @staticmethod
    def _document(prompt: Document | Sequence[Segment] | str) -> Document:
        if isinstance(prompt, str):
            prompt = [prompt]
        return prompt if isinstance(prompt, Document) else Document(list(prompt))

    @torch.no_grad()
    def retrieve(self, prompt: Document | Sequence[Segment] | str, k: int = 2) -> list[Retrieved]:
        """The k bank documents closest to the prompt (its text, its images, or both: the
        normalised mean of their embeddings, as the bank embeds documents), best first."""
        if self.bank is None:
            raise ValueError("this checkpoint has no retriever/ folder: it cannot retrieve (train with a "
                             "`make tokenize` output that includes the retriever)")
        doc = self._document(prompt)
        texts = [t for t in (self.tokenizer.encode_text(x) for x in doc.texts if x.strip()) if t]
        if not texts and not doc.images:
            raise ValueError("the prompt is empty: give some text or an image to retrieve with")
        found = self.bank.search_documents([texts], [doc.images], k)
        out = []
        for score, i in zip(found.scores[0].tolist(), found.ids[0].tolist()):
            if i >= 0:
                ids = self.bank.documents[i]
                out.append(Retrieved(float(score), self.tokenizer.decode(ids), int(i), ids))
        return out

    def bank_for(self, retrieve: bool | None) -> RetrievalBank | None:
        """The bank to retrieve from, or None: `retrieve` None means on exactly when the model was
        trained with retrieval; True needs a checkpoint with a retriever/ folder."""
        use = self.trained_with_retrieval if retrieve is None else bool(retrieve)
        if use and self.bank is None:
            raise ValueError("retrieve=True, but this checkpoint has no retriever/ folder; pass retrieve=False")
        return self.bank if use else None

    @property
    def context(self) -> int:
        return self.model.config.block_size

    def prompt_ids(self, prompt: Document | Sequence[Segment] | str, next: Next = "auto") -> list[int]:
        """<bos> + the prompt's segments (no <eos>), + <boi> when the next segment is an image."""
        if isinstance(prompt, str):
            prompt = [prompt]
        doc = prompt if isinstance(prompt, Document) else Document(list(prompt))
        ids = self.tokenizer.encode(doc, bos=True, eos=False)
        if next == "image" and image_state(ids, self.tokenizer.image_tokens) < 0:
            ids.append(special.BOI_ID)
        return ids

    def _fit(self, ids: list[int], new_tokens: int) -> list[int]:
        """Trim a prompt from the left (keeping <bos>, never cutting inside an image) so that
        prompt + new_tokens fit the context; warn when anything is dropped."""
        budget = self.context - new_tokens
        if budget < 2:
            raise ValueError(f"max_new_tokens={new_tokens} leaves no room for a prompt in the "
                             f"model's context of {self.context} tokens")
        if len(ids) <= budget:
            return ids
        cut = len(ids) - (budget - 1)
        body = ids[cut:]
        # never start inside an image: skip to just after the next <eoi> if we cut into one
        if special.EOI_ID in body and (special.BOI_ID not in body or body.index(special.EOI_ID) < body.index(special.BOI_ID)):
            body = body[body.index(special.EOI_ID) + 1 :]
        warnings.warn(f"prompt of {len(ids)} tokens trimmed from the left to {len(body) + 1} to fit the "
                      f"context of {self.context} with {new_tokens} new tokens", stacklevel=3)
        return [special.BOS_ID, *body]

    @torch.no_grad()
    def generate(self, prompt: Document | Sequence[Segment] | str, *, n: int = 1, next: Next = "auto",
                 max_new_tokens: int | None = None, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None,
                 on_image: Callable[[int, Image.Image], None] | None = None,
                 retrieve: bool | None = None, k: int | None = None) -> list[Generation]:
        """Sample n continuations of a prompt document.

        next: "image" draws exactly one image; "text" writes text until the model ends it (at
        <eos> or where it would begin an image); "auto" continues freely, interleaving text and
        images, until <eos> or max_new_tokens.
        retrieve: prepend the k documents retrieved for the prompt, `<bos> d_k <break> ... d_1
        <break> prompt` as in training (None: on when the model was trained with retrieval);
        the worst are dropped first if the context is short. k None: the training maximum.
        """
        if n < 1 or n > 256:
            raise ValueError(f"n must be between 1 and 256, got {n}")
        if next not in ("auto", "image", "text"):
            raise ValueError(f"next must be 'auto', 'image' or 'text', got {next!r}")
        tok = self.tokenizer
        if max_new_tokens is None:
            max_new_tokens = tok.image_tokens + 1 if next == "image" else (64 if next == "text" else 4 * (tok.image_tokens + 2) + 64)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        use = self.bank_for(retrieve) is not None
        own = self.prompt_ids(prompt, next)
        if len(own) <= 1 and next == "text":
            raise ValueError("the prompt is empty: give some text or an image to continue from")
        doc = self._document(prompt)
        retrieved = self.retrieve(doc, k or self.retrieval_k) if use and (doc.images or "".join(doc.texts).strip()) else []
        # the worst neighbours go first when the context is short: the prompt is never cut for them
        retrieved = retrieved[: special.neighbours_that_fit([r.ids for r in retrieved], self.context - max_new_tokens - len(own))]
        prefix = special.retrieved_prefix([r.ids for r in retrieved])
        ids = self._fit([special.BOS_ID, *prefix, *own[1:]], max_new_tokens)
        # the guidance stream sees no prompt content, as a caption-dropped training sequence
        uncond = [special.BOS_ID] + ([special.BOI_ID] if ids[-1] == special.BOI_ID else [])
        images_done: dict[int, list[int]] = {}

        def stream(row: int, token: int) -> None:
            if on_token is not None:
                on_token(row, token)
            if on_image is not None:
                cur = images_done.setdefault(row, [])
                cur.append(token)
                if token == special.EOI_ID:
                    full = ids + cur
                    start = max(i for i, t in enumerate(full) if t == special.BOI_ID)
                    codes = [c - tok.image_offset for c in full[start + 1 : start + 1 + tok.image_tokens]]
                    on_image(row, tok.decode_images([codes])[0])

        new = generate_ids(
            self.decoder, tok, [ids] * n, max_new_tokens=max_new_tokens, sampling=sampling,
            uncond_prompts=[uncond] * n if sampling.needs_uncond else None,
            stop_after_images=1 if next == "image" else None, allow_image=next != "text",
            seed=seed, on_token=stream if (on_token or on_image) else None)
        out = []
        for row in new:
            row = [t for t in row if t != special.PAD_ID]
            full = (ids[-1:] if ids[-1] == special.BOI_ID else []) + row  # an open <boi> belongs to the new image
            out.append(Generation(tok.decode(full), row, ids, list(retrieved)))
        return out

    def text_to_image(self, text: str, *, n: int = 1, guidance: float = 3.0, temperature: float = 0.7,
                      top_k: int | None = None, seed: int = 0, rerank: int = 1,
                      retrieve: bool | None = None) -> list[Image.Image]:
        """n images for a caption (guidance 3 by default: CM3Leon found scales around 3 best).

        rerank: draw n·rerank candidates and keep the n that the retriever scores closest to the
        caption (image-text cosine, best first), as DALL-E re-ranks with CLIP and CM3Leon with its
        retriever; 1 = no re-ranking. Needs a checkpoint with a retriever/ folder.
        """
        if not text.strip():
            raise ValueError("the caption is empty")
        if rerank < 1:
            raise ValueError(f"rerank must be >= 1 candidates per image, got {rerank}")
        s = SamplingConfig(guidance=guidance, image_temperature=temperature, image_top_k=top_k)
        gens = self.generate([text], n=n * rerank, next="image", sampling=s, seed=seed, retrieve=retrieve)
        images = [g.document.images[0] for g in gens]
        if rerank == 1:
            return images
        order = self.image_text_scores(images, text).argsort(descending=True)
        return [images[i] for i in order[:n].tolist()]

    def image_text_scores(self, images: Sequence[Image.Image], text: str) -> torch.Tensor:
        """Cosine similarity (N,) of each image to the text in the retriever's embedding space."""
        return (self._embed_images(images) @ self._embed_texts([text]).T).squeeze(1)

    def text_image_scores(self, image: Image.Image, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity (T,) of each text to the image in the retriever's embedding space."""
        return (self._embed_texts(texts) @ self._embed_images([image]).T).squeeze(1)

    def _retriever(self):
        if self.bank is None:
            raise ValueError("re-ranking needs the retriever: this checkpoint has no retriever/ folder (train "
                             "on a `make tokenize` output that includes the retriever)")
        return self.bank.retriever

    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._retriever().embed_images(list(images))

    def _embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        retriever = self._retriever()
        ids = [self.tokenizer.encode_text(t) for t in texts]
        if not all(ids):
            raise ValueError("a text to score is empty")
        return retriever.embed_texts(ids)

    def caption(self, image: Image.Image, *, n: int = 1, temperature: float = 0.0, seed: int = 0,
                max_new_tokens: int = 32, rerank: int = 1, retrieve: bool | None = None) -> list[str]:
        """n captions for an image (greedy by default); retrieve as in `generate`.

        rerank: draw n·rerank captions (sampled: needs temperature > 0) and keep the n that the
        retriever scores closest to the image, best first, as `text_to_image` re-ranks images;
        1 = no re-ranking.
        """
        if rerank < 1:
            raise ValueError(f"rerank must be >= 1 candidates per caption, got {rerank}")
        if rerank > 1 and temperature <= 0:
            raise ValueError("rerank > 1 needs temperature > 0: greedy decoding draws the same caption every time")
        s = SamplingConfig(temperature=temperature)
        gens = self.generate([image], n=n * rerank, next="text", sampling=s, seed=seed, max_new_tokens=max_new_tokens,
                             retrieve=retrieve)
        texts = [" ".join(g.document.texts).strip() for g in gens]
        if rerank == 1:
            return texts
        return [texts[i] for i in self.rank_texts(image, texts)[:n]]

    def rank_texts(self, image: Image.Image, texts: Sequence[str]) -> list[int]:
        """Indices of `texts`, the one the retriever scores closest to the image first; empty
        texts (which cannot be embedded) last."""
        scored = [i for i, t in enumerate(texts) if t.strip()]
        order = self.text_image_scores(image, [texts[i] for i in scored]).argsort(descending=True).tolist() if scored else []
        return [scored[i] for i in order] + [i for i, t in enumerate(texts) if not t.strip()]
