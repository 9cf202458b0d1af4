"""The Gradio demo: draw, describe, continue a story, classify zero-shot, see what retrieval finds —
one model behind all tabs.

Thin by design (STYLE.md §13): `build_demo(mm)` lays out the tabs and wires handlers that call
only the public `sample/` API; `serve(demo)` launches it on localhost. Nothing runs at import
and nothing lives in module globals: every piece of state (the model lock, the folder of
example and answer images) is created inside `build_demo` and captured by its handlers.

    from sample.api import MultimodalModel
    from demo.app import build_demo, serve
    serve(build_demo(MultimodalModel.from_pretrained("runs/default")), port=7860)

Robustness: uploads are opened here (not by gradio's preprocessing) so that a non-image gets a clear message,
a huge image is downscaled and a decompression bomb refused before decoding; every model call
is bounded in tokens and wall-clock time and serialised by one lock (the model holds a single KV
cache); the queue is bounded; a request that fails raises `gr.Error` and the app keeps serving.
"""
from __future__ import annotations

import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import gradio as gr
from PIL import Image, ImageOps, UnidentifiedImageError

from sample.api import Generation, MultimodalModel
from sample.classify import classify
from sample.generate import SamplingConfig

DISPLAY_SIDE = 256  # generated images are tiny (32 px): shown upscaled with hard pixel edges


@dataclass(frozen=True)
class DemoLimits:
    """Bounds that keep one request from starving the others."""

    max_images: int = 8  # images per text→image request
    caption_tokens: int = 32  # new tokens per caption
    story_tokens: int = 400  # new tokens per story answer (the model's context bounds it too)
    max_seconds: float = 60.0  # wall-clock budget of one request's generation
    max_labels: int = 32  # labels per classification
    max_retrieved: int = 16  # documents per retrieval request
    max_upload_mb: float = 10.0  # larger uploads are refused by gradio before any handler runs
    max_upload_pixels: int = 100_000_000  # refused above this (decompression bombs); below, downscaled
    upload_side: int = 512  # uploads are downscaled to fit this side (the model sees far fewer pixels)
    queue_size: int = 64  # requests waiting beyond this are turned away with "queue is full"
    concurrency: int = 1  # model calls at once: the model holds one KV cache

    def __post_init__(self) -> None:
        for name in ("max_images", "caption_tokens", "story_tokens", "max_labels", "max_retrieved", "max_upload_pixels",
                     "upload_side", "queue_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seconds <= 0 or self.max_upload_mb <= 0:
            raise ValueError("DemoLimits.max_seconds and max_upload_mb must be positive")


class OutOfTime(Exception):
    """Raised from the token callback when a request has used its time budget."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a ValueError from the sample API (bad labels, prior, temperature ...) as a gr.Error."""
    try:
        yield
    except ValueError as e:
        raise gr.Error(str(e)) from None


def open_upload(upload: dict | str | Path | None, limits: DemoLimits) -> Image.Image:
    """Open an uploaded file (gradio's raw file payload {"path", "orig_name", ...} or a path) as
    an RGB image no larger than limits.upload_side.

    Raises gr.Error for a missing upload, a non-image, a truncated file or a decompression bomb.
    """
    if isinstance(upload, dict):
        path, name = upload.get("path"), upload.get("orig_name")
    else:
        path, name = upload, None
    if not path:
        raise gr.Error("no image given: upload one or pick an example below")
    name = name or Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > limits.max_upload_pixels:  # checked from the header, before decoding
                raise gr.Error(f"{name} is {w}×{h} pixels, more than the demo's limit of "
                               f"{limits.max_upload_pixels:,}: downscale it and upload it again")
            img.draft("RGB", (limits.upload_side, limits.upload_side))  # JPEG decodes at reduced scale
            img = ImageOps.exif_transpose(img)
            img.thumbnail((limits.upload_side, limits.upload_side), Image.Resampling.LANCZOS)
            if img.mode in ("RGBA", "LA", "PA", "P"):
                rgba = img.convert("RGBA")  # alpha onto black, the corpora's background
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise gr.Error(f"{name} is not an image: upload a PNG, JPEG, WebP, GIF or BMP file") from None
    except Image.DecompressionBombError:
        raise gr.Error(f"{name} has more than the demo's limit of {limits.max_upload_pixels:,} pixels (too large "
                       "to decode safely): downscale it and upload it again") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise gr.Error(f"{name} could not be read as an image ({e}): upload another file") from None


def for_display(img: Image.Image) -> Image.Image:
    """Upscale a small generated image with nearest-neighbour pixels for the browser."""
    scale = max(1, DISPLAY_SIDE // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def parse_labels(text: str, limits: DemoLimits) -> list[str]:
    """Comma-separated labels -> list (blank entries dropped)."""
    labels = [l.strip() for l in (text or "").split(",") if l.strip()]
    if len(labels) > limits.max_labels:
        raise gr.Error(f"{len(labels)} labels: the demo takes at most {limits.max_labels}")
    return labels


def parse_prior(text: str, num_labels: int) -> list[float] | None:
    """Optional comma-separated prior weights, one per label, normalised to sum to one."""
    if not (text or "").strip():
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise gr.Error(f"the prior must be comma-separated numbers, one per label; got {text!r}") from None
    if len(weights) != num_labels:
        raise gr.Error(f"the prior has {len(weights)} values but there are {num_labels} labels")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise gr.Error(f"prior weights must be non-negative and not all zero; got {weights}")
    return [w / sum(weights) for w in weights]


def message_segments(history: Sequence[dict], limits: DemoLimits) -> list[str | Image.Image]:
    """A chat history (gr.Chatbot messages) as one document's segments, in order."""
    segments: list[str | Image.Image] = []
    for message in history or []:
        content = message.get("content") if isinstance(message, dict) else message.content
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, str):
                segments.append(item)
            elif isinstance(item, dict) and item.get("type") == "text":
                segments.append(item["text"])
            elif isinstance(item, dict) and ("file" in item or "path" in item):
                f = item.get("file") or item  # {"file": FileData | {"path"} | path} or {"path"}
                segments.append(open_upload(f, limits))
    return [s for s in segments if not isinstance(s, str) or s.strip()]


def example_files(folder: Path, num_shapes: int = 6, num_digits: int = 4) -> dict[str, Any]:
    """Render example images and prompts from the embedded corpora's eval split into `folder`.

    Returns {"captions": [...], "images": [paths], "classify": [[path, labels, template, prior]],
    "story": [{"text", "files"}]}.
    """
    # the demo reads train.data only here, for examples: the corpora are procedural / shipped
    from train.data.digits import DIGIT_WORDS, digits_documents
    from train.data.shapes import SHAPES, shapes_documents

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"captions": [], "images": [], "classify": [], "story": []}

    def save(img: Image.Image, name: str) -> str:
        path = folder / f"{name}.png"
        img.save(path)
        return str(path)

    docs = shapes_documents("eval", 40)
    singles = [d for d in docs if d.meta["kind"] == "single"][:num_shapes]
    for i, d in enumerate(singles):
        caption, img = d.segments
        path = save(img, f"shape_{i}")
        out["captions"].append(caption)
        out["images"].append(path)
        shape = d.meta["images"][0][0]["shape"]
        if shape in caption:  # the caption itself, with the shape word as the blank
            out["classify"].append([path, ", ".join(SHAPES), caption.replace(shape, "{}", 1), ""])
    stories = [d for d in docs if d.meta["kind"] == "story"][:2]
    for i, d in enumerate(stories):
        out["story"].append({"text": d.segments[0], "files": [save(d.segments[1], f"story_{i}")]})
    digits = digits_documents("eval")[:num_digits]
    for i, d in enumerate(digits):
        caption, img = d.segments
        path = save(img, f"digit_{i}")
        out["captions"].append(caption)
        out["images"].append(path)
        out["classify"].append([path, ", ".join(DIGIT_WORDS), "a handwritten digit {}", ""])
    return out


def build_demo(mm: MultimodalModel, limits: DemoLimits = DemoLimits(), workdir: str | Path | None = None) -> gr.Blocks:
    """The demo's Blocks (not launched): text→image, image→text, story chat, classification.

    workdir: where example images and the story's generated images are written (a new
    temporary folder if None).
    """
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fusion_mm_demo_"))
    answers = work / "answers"
    answers.mkdir(parents=True, exist_ok=True)
    examples = example_files(work / "examples")
    lock = threading.Lock()  # one KV cache per model: model calls never overlap

    def generate(prompt: list, deadline: float, **kwargs: Any) -> list[Generation]:
        """mm.generate under the lock, stopped with OutOfTime once `deadline` has passed."""
        def check(row: int, token: int) -> None:
            if time.monotonic() > deadline:
                raise OutOfTime
        with lock, user_errors():
            return mm.generate(prompt, on_token=check, **kwargs)

    def out_of_time() -> gr.Error:
        return gr.Error(f"stopped after {limits.max_seconds:.0f} s, the demo's time limit per request: "
                        "ask for less (fewer images, a shorter answer) or try again when it is less busy")

    # ------------------------------------------------------------------ handlers
    def draw(caption: str, n: float, guidance: float, temperature: float, seed: float) -> Iterator[tuple[list, str]]:
        """text→image: n images, one at a time, each shown as soon as it is drawn."""
        caption = (caption or "").strip()
        if not caption:
            raise gr.Error("type a caption first, e.g. 'a small red circle in the top left'")
        n = int(n)
        if not 1 <= n <= limits.max_images:
            raise gr.Error(f"number of images must be between 1 and {limits.max_images}, got {n}")
        with user_errors():
            sampling = SamplingConfig(guidance=float(guidance), image_temperature=float(temperature))
        deadline = time.monotonic() + limits.max_seconds
        images: list[Image.Image] = []
        yield images, f"drawing 1 of {n} ..."
        for i in range(n):
            try:  # one image per call, so each appears when finished; image i uses seed + i
                gen = generate([caption], deadline, n=1, next="image", sampling=sampling, seed=int(seed or 0) + i)
            except OutOfTime:
                yield images, f"stopped after {len(images)} of {n} images: the time limit is {limits.max_seconds:.0f} s"
                return
            images.append(for_display(gen[0].document.images[0]))
            yield images, f"{len(images)} of {n} images" + (" — drawing the next ..." if len(images) < n else "")

    def describe(image: dict | None, n: float, temperature: float, seed: float) -> str:
        """image→text: n captions for an uploaded image."""
        img = open_upload(image, limits)
        n = int(n)
        if not 1 <= n <= limits.max_images:
            raise gr.Error(f"number of captions must be between 1 and {limits.max_images}, got {n}")
        with user_errors():
            sampling = SamplingConfig(temperature=float(temperature))
        try:
            gens = generate([img], time.monotonic() + limits.max_seconds, n=n, next="text", sampling=sampling,
                            seed=int(seed or 0), max_new_tokens=limits.caption_tokens)
        except OutOfTime:
            raise out_of_time() from None
        captions = [" ".join(" ".join(g.document.texts).split()) or "(no text)" for g in gens]  # one line each
        return "\n".join(captions) if n == 1 else "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))

    def story(message: dict | None, history: list, next_kind: str, temperature: float, seed: float) -> Iterator[tuple[list, Any, str]]:
        """Interleaved story chat: the whole conversation is the prompt; the model answers with
        text and/or images (next_kind: "auto", "text" or "image")."""
        if next_kind not in ("auto", "text", "image"):
            raise gr.Error(f"the model continues with 'auto', 'text' or 'image', not {next_kind!r}")
        message = message or {}
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])  # raw file payloads: {"path", "orig_name", ...}
        if not text and not files:
            raise gr.Error("write a sentence or attach an image to start or continue the story")
        new_images = [open_upload(f, limits) for f in files]  # refuse a bad file before anything changes
        history = list(history or [])
        user_turn = [*([text] if text else []), *[{"path": f["path"] if isinstance(f, dict) else f} for f in files]]
        history.append({"role": "user", "content": user_turn})
        yield history, gr.MultimodalTextbox(value=None), "the model is writing ..."
        segments = message_segments(history[:-1], limits) + ([text] if text else []) + new_images
        with user_errors():
            sampling = SamplingConfig(temperature=float(temperature), top_p=0.9)
            prompt_len = len(mm.prompt_ids(segments, next_kind))
        grid = mm.tokenizer.image_tokens
        if next_kind == "image":
            max_new = grid + 1  # the codes and <eoi>: the prompt ends in <boi>
        else:  # what the context leaves, but at least room for a sentence (and an image, for "auto")
            need = 48 if next_kind == "text" else grid + 2 + 16
            max_new = min(limits.story_tokens, mm.context - 2, max(mm.context - prompt_len, need))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                gen = generate(segments, time.monotonic() + limits.max_seconds, n=1, next=next_kind,
                               sampling=sampling, seed=int(seed or 0), max_new_tokens=max_new)[0]
            except OutOfTime:
                history.append({"role": "assistant", "content": "(stopped: the demo's time limit per answer was reached)"})
                yield history, gr.MultimodalTextbox(value=None), f"stopped after {limits.max_seconds:.0f} s"
                return
        reply: list[Any] = []
        for seg in gen.document.segments:
            if isinstance(seg, str):
                if seg.strip():
                    reply.append(seg.strip())
            else:
                path = answers / f"{uuid.uuid4().hex}.png"
                for_display(seg).save(path)
                reply.append({"path": str(path)})
        history.append({"role": "assistant", "content": reply or "(the model ended the story here)"})
        trimmed = any("trimmed" in str(w.message) for w in caught)
        status = (f"{len(gen.ids)} new tokens" +
                  (f"; the story is longer than the model's context ({mm.context} tokens): it saw only the latest part"
                   if trimmed else ""))
        yield history, gr.MultimodalTextbox(value=None), status

    def classify_image(image: dict | None, labels_text: str, template: str, prior_text: str, mode: str) -> tuple[dict, Any, str]:
        """Zero-shot classification by Bayes' rule: posterior over the labels and the top label."""
        import pandas as pd  # gradio's own dependency; only the bar plot needs it

        img = open_upload(image, limits)
        labels = parse_labels(labels_text, limits)
        template = (template or "").strip() or "{}"
        prior = parse_prior(prior_text, len(labels)) if len(labels) > 1 else None
        with lock, user_errors():
            result = classify(mm.model, mm.tokenizer, [img], labels, [template], prior=prior, mode=mode,
                              bank=mm.bank_for(None), k=mm.retrieval_k)  # as trained: retrieval where it was
        post = [float(p) for p in result.posterior[0]]
        top = result.predictions[0]
        frame = pd.DataFrame({"label": labels, "posterior": post})
        return dict(zip(labels, post)), frame, f"**{top}** — posterior {max(post):.1%} ({mode}, prior {'given' if prior else 'uniform'})"

    def retrieve(text: str, image: dict | None, k: float) -> tuple[list, str]:
        """The bank documents retrieved for a prompt (text, an image, or both), with scores."""
        segments: list[str | Image.Image] = [text.strip()] if (text or "").strip() else []
        if image:
            segments.append(open_upload(image, limits))
        if not segments:
            raise gr.Error("type a prompt or upload an image to retrieve with")
        k = int(k or 0)
        if not 1 <= k <= limits.max_retrieved:
            raise gr.Error(f"number of documents must be between 1 and {limits.max_retrieved}, got {k}")
        with lock, user_errors():
            found = mm.retrieve(segments, k)
        gallery, lines = [], []
        for rank, r in enumerate(found, 1):
            words = " ".join(" ".join(r.document.texts).split()) or "(no text)"
            gallery += [(for_display(img), f"{rank}. {r.score:.3f} — {words}") for img in r.document.images]
            lines.append(f"{rank}. **{r.score:.3f}** — {words} (bank document {r.id})")
        return gallery, "\n".join(lines)

    # ------------------------------------------------------------------ layout
    model_event: dict[str, Any] = {"concurrency_id": "model", "concurrency_limit": limits.concurrency}
    # events with uploads take gradio's raw file payloads (preprocess=False): gradio's own image
    # preprocessing decodes every upload and fails on a non-image with an opaque server error,
    # while open_upload says what went wrong and guards against decompression bombs
    raw_uploads = {**model_event, "preprocess": False}
    with gr.Blocks(title="fusion-mm demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# fusion-mm\nOne decoder-only transformer that reads and writes text and images as one "
                    "token stream. Images are 32×32 (shown enlarged).")
        with gr.Tab("text → image"):
            with gr.Row():
                with gr.Column():
                    t2i_caption = gr.Textbox(label="caption", placeholder="a small red circle in the top left")
                    t2i_n = gr.Slider(1, limits.max_images, value=4, step=1, label="number of images")
                    t2i_guidance = gr.Slider(1.0, 8.0, value=3.0, step=0.5, label="guidance scale (1 = off)")
                    t2i_temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="temperature (0 = greedy)")
                    t2i_seed = gr.Number(value=0, precision=0, label="seed")
                    t2i_button = gr.Button("draw", variant="primary", elem_id="t2i_button")
                with gr.Column():
                    t2i_gallery = gr.Gallery(label="images", columns=4, format="png", elem_id="t2i_gallery")
                    t2i_status = gr.Markdown(elem_id="t2i_status")
            gr.Examples([[c] for c in examples["captions"]], inputs=[t2i_caption], label="captions from the eval data")
            t2i_button.click(draw, [t2i_caption, t2i_n, t2i_guidance, t2i_temperature, t2i_seed],
                             [t2i_gallery, t2i_status], api_name="text_to_image", **model_event)

        with gr.Tab("image → text"):
            with gr.Row():
                with gr.Column():
                    i2t_image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"], height=256,
                                         elem_id="i2t_image", elem_classes=["pixelated"])
                    i2t_n = gr.Slider(1, limits.max_images, value=1, step=1, label="number of captions")
                    i2t_temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    i2t_seed = gr.Number(value=0, precision=0, label="seed")
                    i2t_button = gr.Button("describe", variant="primary")
                i2t_text = gr.Textbox(label="caption", lines=6)
            gr.Examples([[p] for p in examples["images"]], inputs=[i2t_image], label="images from the eval data")
            i2t_button.click(describe, [i2t_image, i2t_n, i2t_temperature, i2t_seed], [i2t_text],
                             api_name="caption", **raw_uploads)

        with gr.Tab("story"):
            chat = gr.Chatbot(label="story", height=420)
            chat_input = gr.MultimodalTextbox(placeholder="start a story: a sentence, an image, or both",
                                              file_types=["image"], file_count="multiple", sources=["upload"])
            with gr.Row():
                chat_next = gr.Radio(["auto", "text", "image"], value="auto", label="the model continues with")
                chat_temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="text temperature")
                chat_seed = gr.Number(value=0, precision=0, label="seed")
            chat_status = gr.Markdown()
            gr.ClearButton([chat, chat_input, chat_status], value="new story")
            gr.Examples([[m] for m in examples["story"]], inputs=[chat_input], label="story openings from the eval data")
            chat_input.submit(story, [chat_input, chat, chat_next, chat_temperature, chat_seed],
                              [chat, chat_input, chat_status], api_name="story", **raw_uploads)

        with gr.Tab("classify"):
            with gr.Row():
                with gr.Column():
                    cls_image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"], height=256,
                                         elem_id="cls_image", elem_classes=["pixelated"])
                    cls_labels = gr.Textbox(label="labels (comma-separated)", value="zero, one, two, three, four, five, six, seven, eight, nine")
                    cls_template = gr.Textbox(label="template ({} is replaced by each label)", value="a handwritten digit {}")
                    cls_prior = gr.Textbox(label="prior (optional): weights, one per label", placeholder="uniform")
                    cls_mode = gr.Radio(["both", "image", "text"], value="both",
                                        label="score: p(image | caption) · p(caption | image), either alone")
                    cls_button = gr.Button("classify", variant="primary", elem_id="cls_button")
                with gr.Column():
                    cls_top = gr.Markdown(elem_id="cls_top")
                    cls_label = gr.Label(label="posterior", num_top_classes=5)
                    cls_plot = gr.BarPlot(x="label", y="posterior", label="posterior over all labels", y_lim=[0, 1], sort="-y")
            gr.Examples(examples["classify"], inputs=[cls_image, cls_labels, cls_template, cls_prior],
                        label="images from the eval data")
            cls_button.click(classify_image, [cls_image, cls_labels, cls_template, cls_prior, cls_mode],
                             [cls_label, cls_plot, cls_top], api_name="classify", **raw_uploads)

        # ------------------------------------------------------------------ retrieval tab
        # only for a checkpoint that carries a retrieval bank: no tab rather than one that cannot work
        if mm.can_retrieve:
            with gr.Tab("retrieval"):
                gr.Markdown("The training documents closest to a prompt, as the retriever finds them"
                            + (" — the model reads them before the prompt when it generates." if mm.trained_with_retrieval
                               else " (this model was trained without retrieval: generation does not use them)."))
                with gr.Row():
                    with gr.Column():
                        ret_text = gr.Textbox(label="prompt", placeholder="a small red circle in the top left")
                        ret_image = gr.Image(label="image (optional)", type="filepath", sources=["upload", "clipboard"],
                                             height=192, elem_classes=["pixelated"])
                        ret_k = gr.Slider(1, limits.max_retrieved, value=4, step=1, label="documents")
                        ret_button = gr.Button("retrieve", variant="primary", elem_id="ret_button")
                    with gr.Column():
                        ret_gallery = gr.Gallery(label="retrieved (rank, score, text)", columns=4, format="png")
                        ret_list = gr.Markdown(elem_id="ret_list")
                gr.Examples([[c] for c in examples["captions"]], inputs=[ret_text], label="captions from the eval data")
                ret_button.click(retrieve, [ret_text, ret_image, ret_k], [ret_gallery, ret_list], api_name="retrieve",
                                 **raw_uploads)

    demo.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    demo.upload_limits = limits  # read by serve() for max_file_size
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, *, block: bool = True) -> str:
    """Launch on host:port (localhost unless told otherwise; never a public share link).

    block=False returns at once with the server running in a thread (tests). Returns the URL.
    """
    limits: DemoLimits = getattr(demo, "upload_limits", DemoLimits())
    # system fonts: the default theme would fetch Google Fonts, which offline machines cannot
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    # 32-px inputs would show as stamps: enlarge them with hard pixel edges, as the outputs are
    css = ".pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                prevent_thread_lock=not block, max_file_size=int(limits.max_upload_mb * 1024 * 1024), theme=theme,
                css=css, show_error=False, quiet=not block)
    return demo.local_url
