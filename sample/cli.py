"""`python -m sample`: command lines for scripts.

    python -m sample generate --ckpt runs/default --prompt "a small red circle in the top left" \\
        [--image in.png ...] [--next image|text|auto] --n 4 --seed 0 --out OUT [--retrieval auto|on|off --k K]

`<image>` in the prompt stands for the next --image file (images without a placeholder follow the
text). Writes OUT/sample<i>_<j>.png, OUT/result.json (each sample a list of segments
{"text": ...} or {"image": "relative/path.png"}; "retrieved": the documents prepended from the
retrieval bank, with their scores and bank ids) and OUT/index.html showing the result.
Exit codes: 0 ok, 2 bad input (with a message naming what was wrong).
"""
from __future__ import annotations

import argparse
import html
import json
import sys
import warnings
from pathlib import Path

from tokenizers_mm.document import Segment
from tokenizers_mm.images import load_image

# the classify command reads each image in 9 views (itself and its 8 one-pixel shifts): on the
# default model it lifts digits zero-shot accuracy of both directions combined (README, classification)
DEFAULT_VIEWS = 9


def parse_prompt(text: str, image_paths: list[str], size: int) -> list[Segment]:
    """Split the prompt at each `<image>` and put the next image file there."""
    images = [load_image(p, size) for p in image_paths]
    parts = text.split("<image>")
    if len(parts) - 1 > len(images):
        raise ValueError(f"the prompt has {len(parts) - 1} <image> placeholders but only {len(images)} --image files")
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if part.strip():
            segments.append(part.strip() if i else part.rstrip())
        if i < len(parts) - 1:
            segments.append(images[i])
    segments.extend(images[len(parts) - 1 :])
    if not segments:
        raise ValueError("the prompt is empty: give --prompt text and/or --image files")
    return segments


def write_result(out: Path, prompt: list[Segment], samples: list[list[Segment]],
                 retrieved: list[tuple[float, int, list[Segment]]] | None = None) -> dict:
    """PNG files, result.json and index.html for the samples. retrieved: (score, bank id,
    segments) of each document prepended by retrieval, best first."""
    out.mkdir(parents=True, exist_ok=True)

    def dump(segs: list[Segment], stem: str) -> list[dict]:
        items = []
        for j, seg in enumerate(segs):
            if isinstance(seg, str):
                items.append({"text": seg})
            else:
                name = f"{stem}_{j}.png"
                seg.save(out / name)
                items.append({"image": name})
        return items

    result = {"prompt": dump(prompt, "prompt"), "samples": [dump(s, f"sample{i}") for i, s in enumerate(samples)],
              "retrieved": [{"score": round(score, 6), "id": i, "segments": dump(segs, f"retrieved{j}")}
                            for j, (score, i, segs) in enumerate(retrieved or [])]}
    (out / "result.json").write_text(json.dumps(result, indent=2))

    def render(items: list[dict]) -> str:
        return " ".join(f"<span>{html.escape(x['text'])}</span>" if "text" in x
                        else f'<img src="{x["image"]}" width="128" style="image-rendering:pixelated">' for x in items)

    rows = "\n".join(f"<tr><td>{i}</td><td>{render(s)}</td></tr>" for i, s in enumerate(result["samples"]))
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>samples</title>"
        "<style>body{font-family:sans-serif}td{padding:6px;vertical-align:middle}span{margin:0 6px}</style>"
        f"<h3>prompt</h3><p>{render(result['prompt'])}</p>"
        + ("<h3>retrieved</h3><table>" + "".join(f"<tr><td>{r['score']:.3f}</td><td>{render(r['segments'])}</td></tr>"
                                                 for r in result["retrieved"]) + "</table>" if result["retrieved"] else "")
        + f"<h3>samples</h3><table>{rows}</table>")
    return result


def cmd_generate(args: argparse.Namespace) -> int:
    from sample.api import MultimodalModel
    from sample.generate import SamplingConfig

    if not 1 <= args.n <= 256:
        raise ValueError(f"--n must be between 1 and 256, got {args.n}")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, image_temperature=args.image_temperature,
                              image_top_k=args.image_top_k, guidance=args.guidance, strategy=args.strategy)
    mm = MultimodalModel.from_pretrained(args.ckpt, compile_decoding=args.compile, precision=args.precision)
    prompt = parse_prompt(args.prompt or "", args.image or [], mm.tokenizer.image_size)
    retrieve = {"auto": None, "on": True, "off": False}[args.retrieval]
    if args.rerank < 1 or args.n * args.rerank > 256:
        raise ValueError(f"--rerank must be >= 1 with --n × --rerank <= 256, got --n {args.n} --rerank {args.rerank}")
    gens = mm.generate(prompt, n=args.n * args.rerank, next=args.next, max_new_tokens=args.max_new_tokens,
                       sampling=sampling, seed=args.seed, retrieve=retrieve, k=args.k)
    if args.rerank > 1:
        gens = rerank(mm, prompt, gens, args.n)
    retrieved = [(r.score, r.id, r.document.segments) for r in gens[0].retrieved]
    result = write_result(Path(args.out), prompt, [g.document.segments for g in gens], retrieved)
    for r in result["retrieved"]:
        print(f"retrieved {r['id']} (score {r['score']:.3f}): " + " ".join(x.get("text", f"[{x.get('image')}]") for x in r["segments"]))
    for i, s in enumerate(result["samples"]):
        print(f"sample {i}: " + " ".join(x.get("text", f"[{x.get('image')}]") for x in s))
    print(f"wrote {args.out}/result.json and {args.out}/index.html")
    return 0


def rerank(mm, prompt, gens: list, n: int) -> list:
    """The n samples the retriever scores closest to the prompt: each new image against the
    prompt's text (--next image), or each new text against the prompt's last image (--next text)."""
    if all(g.document.images for g in gens):
        text = " ".join(t.strip() for t in prompt if isinstance(t, str) and t.strip())
        if not text:
            raise ValueError("--rerank scores new images against the prompt's text: give a --prompt with text")
        scores = mm.image_text_scores([g.document.images[0] for g in gens], text)
        return [gens[i] for i in scores.argsort(descending=True)[:n].tolist()]
    if any(g.document.images for g in gens):
        raise ValueError("--rerank needs every sample to be an image (--next image) or every one text (--next text)")
    images = [s for s in prompt if not isinstance(s, str)]
    if not images:
        raise ValueError("--rerank scores new text against the prompt's image: give an --image")
    order = mm.rank_texts(images[-1], [" ".join(g.document.texts).strip() for g in gens])
    return [gens[i] for i in order[:n]]


def read_labels(spec: str) -> list[str]:
    """Labels from "a,b,c" or from a file (one per line, or comma-separated) given as @path or a path."""
    path = Path(spec[1:] if spec.startswith("@") else spec)
    if spec.startswith("@") or (path.suffix in (".txt", ".csv") and path.is_file()):
        if not path.is_file():
            raise ValueError(f"label file not found: {path}")
        text = path.read_text(encoding="utf-8")
        items = text.replace(",", "\n").splitlines()
    else:
        items = spec.split(",")
    return [x.strip() for x in items if x.strip()]


def parse_prior(spec: str | None, num_labels: int) -> list[float] | None:
    if spec is None:
        return None
    try:
        values = [float(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--prior must be comma-separated numbers, got {spec!r}") from None
    if len(values) != num_labels:
        raise ValueError(f"--prior has {len(values)} values but there are {num_labels} labels")
    return values


def parse_weights(text: str) -> tuple[float, float]:
    """--weights IMAGE,TEXT: two non-negative numbers, not both zero (sample.bayes.check_weights)."""
    from sample.bayes import check_weights
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--weights takes two comma-separated numbers IMAGE,TEXT such as 0.2,1; got {text!r}") from None
    return check_weights((a, b))


def parse_brightness(text: str) -> list[float]:
    """--brightness 1,0.9,0.8: distinct factors in (0, 1] (sample.classify.check_brightness)."""
    from sample.classify import check_brightness
    try:
        levels = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--brightness takes comma-separated factors in (0, 1] such as 1,0.9,0.8; got {text!r}") from None
    try:
        return check_brightness(levels)
    except ValueError as e:
        raise ValueError(f"--brightness: {e}") from None


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _accuracy(scores, truth: list[int]) -> float:
    return sum(int(p == t) for p, t in zip(scores.argmax(-1).tolist(), truth)) / len(truth)


def read_labelled_folder(folder: str, labels: list[str], size: int) -> tuple[list, list[int]]:
    """A folder with one subfolder per label holding example images -> (images, label indices)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--calibrate {folder}: not a folder; give a folder with one subfolder of example images per label")
    subs = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [s for s in subs if s not in labels]
    if unknown:
        raise ValueError(f"--calibrate {folder}: subfolders {unknown} are not among the labels {labels}")
    images, truth = [], []
    for i, label in enumerate(labels):
        for path in sorted((root / label).glob("*")) if (root / label).is_dir() else []:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(load_image(str(path), size))
                truth.append(i)
    if len(images) < 2:
        raise ValueError(f"--calibrate {folder}: found {len(images)} example images; put labelled examples in "
                         f"subfolders named after the labels, e.g. {root / labels[0]}/a.png")
    return images, truth


def cmd_classify(args: argparse.Namespace) -> int:
    from sample.api import MultimodalModel
    from sample.bayes import check_prior, combine_directions
    from sample.classify import MAX_VIEWS, calibrate_directions, check_labels, classify, trained_orders

    labels = read_labels(args.labels)
    templates = args.template or ["{}"]
    check_labels(labels, templates)
    prior = parse_prior(args.prior, len(labels))
    check_prior(prior, len(labels))
    weights = parse_weights(args.weights)
    if args.calibrate and args.mode != "both":
        raise ValueError("--calibrate fits the weights of --mode both; drop --mode or set it to both")
    if not args.images:
        raise ValueError("no --images given")
    loaded = [MultimodalModel.from_pretrained(path) for path in args.ckpt]
    mm = loaded[0]
    for path, other in zip(args.ckpt[1:], loaded[1:]):
        if not other.tokenizer.same_as(mm.tokenizer):
            raise ValueError(f"{path} was trained on another tokenizer than {args.ckpt[0]}: checkpoints scored "
                             "together must come from one `make tokenize` output")
    models = [m.model for m in loaded]
    if args.compile:
        for m in models:
            m.compile_scoring()
    images = [load_image(p, mm.tokenizer.image_size) for p in args.images]
    if not 1 <= args.views <= MAX_VIEWS:
        raise ValueError(f"--views must be between 1 and {MAX_VIEWS}, got {args.views}")
    brightness = parse_brightness(args.brightness)
    most = min(trained_orders(m, mm.tokenizer) for m in models)
    orders = most if args.orders is None else args.orders
    if not 1 <= orders <= most:  # refused before any scoring
        raise ValueError(f"--orders must be between 1 and {most} (the image orders the checkpoints were trained "
                         f"with), got {orders}")
    # auto: retrieve when every checkpoint was trained with retrieval (one bank serves them all)
    retrieve = {"auto": all(m.trained_with_retrieval for m in loaded), "on": True, "off": False}[args.retrieval]
    bank = mm.bank_for(retrieve)
    k = mm.retrieval_k if args.k is None else args.k
    if bank is not None and not 1 <= k <= 64:
        raise ValueError(f"--k must be between 1 and 64, got {k}")
    if args.calibrate:
        examples, truth = read_labelled_folder(args.calibrate, labels, mm.tokenizer.image_size)
        weights, scored = calibrate_directions(models, mm.tokenizer, examples, truth, labels, templates, views=args.views,
                                               orders=orders, bank=bank, k=k, brightness=brightness)
        print(f"calibrated on {len(examples)} labelled images: --weights {weights[0]:.4g},{weights[1]:.4g} "
              f"(accuracy on them: image {_accuracy(scored.image_loglik, truth):.3f}, text "
              f"{_accuracy(scored.text_loglik, truth):.3f}, both weighted "
              f"{_accuracy(combine_directions(scored.image_loglik, scored.text_loglik, weights), truth):.3f})", file=sys.stderr)
    out = classify(models, mm.tokenizer, images, labels, templates, prior=prior, mode=args.mode, views=args.views,
                   weights=weights, orders=orders, bank=bank, k=k, brightness=brightness)

    def shown(found) -> list[dict]:  # retrieved bank documents: id, score and their text
        return [{"id": nb.id, "score": round(nb.score, 6), "text": " ".join(mm.tokenizer.decode(bank.documents[nb.id]).texts)}
                for nb in found]

    if bank is not None and not args.json:
        for caption, found in (out.caption_neighbours or {}).items():
            print(f"retrieved for {caption!r}: " + ", ".join(f"{d['id']} ({d['score']:.3f})" for d in shown(found)), file=sys.stderr)
    for i, path in enumerate(args.images):
        post = {l: round(float(p), 6) for l, p in zip(labels, out.posterior[i])}
        ll = {l: round(float(v), 4) for l, v in zip(labels, out.loglik[i])}
        if args.json:
            row = {"image": path, "prediction": out.predictions[i], "posterior": post, "loglik": ll}
            if bank is not None:  # what the model read before the prompts
                row["retrieved"] = {"image": shown(out.image_neighbours[i]) if out.image_neighbours else [],
                                    "captions": {c: shown(f) for c, f in (out.caption_neighbours or {}).items()}}
            print(json.dumps(row))
        else:
            top = sorted(post.items(), key=lambda kv: -kv[1])[:3]
            print(f"{path}\t{out.predictions[i]}\t" + "  ".join(f"{l}={p:.3f}" for l, p in top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="sample text, images or interleaved documents from a prompt")
    g.add_argument("--ckpt", default="runs/default", help="a run folder or a checkpoint folder")
    g.add_argument("--prompt", default="", help="prompt text; <image> marks where the next --image goes")
    g.add_argument("--image", action="append", help="an image file of the prompt (repeatable)")
    g.add_argument("--next", default="auto", choices=["auto", "image", "text"], help="what to generate next")
    g.add_argument("--n", type=int, default=4, help="number of samples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="samples_out", help="output folder")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale for images (1 = off)")
    g.add_argument("--strategy", default="sample", choices=["sample", "cdk"], help="image decoding: guided sampling or CD-K")
    g.add_argument("--temperature", type=float, default=0.7, help="text temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=None, help="text top-k")
    g.add_argument("--top-p", type=float, default=0.9, help="text nucleus")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--image-temperature", type=float, default=0.7, help="image-code temperature (0.7 measured best)")
    g.add_argument("--image-top-k", type=int, default=None)
    g.add_argument("--retrieval", default="auto", choices=["auto", "on", "off"],
                   help="prepend documents retrieved for the prompt (auto: if the model was trained with retrieval)")
    g.add_argument("--k", type=int, default=None, help="documents to retrieve (default: the training maximum)")
    g.add_argument("--rerank", type=int, default=1, metavar="R",
                   help="draw R candidates per sample and keep the n the retriever scores closest to the prompt "
                        "(new images against its text, new text against its image)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights to decode with (auto: bf16 where the CPU multiplies it natively, 1.2-1.7x the images/s on a 2-core EPYC)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (40-55 s once per batch shape, then 4-6x the images/s "
                        "on a 2-core AMX Xeon): pays off for many samples, not for a few")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("classify", help="zero-shot classification by Bayes' rule")
    c.add_argument("--ckpt", nargs="+", default=["runs/default"],
                   help="a run folder or a checkpoint folder; several (trained on one tokenizer, e.g. other seeds) "
                        "average their scores, M times the time")
    c.add_argument("--labels", required=True, help="comma-separated labels, or @file (one per line)")
    c.add_argument("--template", action="append", help="prompt template with {} (repeatable; ensembled)")
    c.add_argument("--images", nargs="+", required=True, help="image files")
    c.add_argument("--prior", default=None, help="comma-separated prior probabilities, one per label")
    c.add_argument("--mode", default="both", choices=["both", "image", "text"],
                   help="both: p(x|c)·p(caption|x) weighted by --weights (the best default over the measured tasks); "
                        "image: p(x|c) alone; text: p(caption|x) (best on digits)")
    c.add_argument("--weights", default="1,1", metavar="IMAGE,TEXT",
                   help="mode both: weights of log p(x|c) and log p(caption|x) before they are added "
                        "(1,1 = the plain product; --calibrate fits them)")
    c.add_argument("--calibrate", default=None, metavar="FOLDER",
                   help="fit --weights on labelled examples: FOLDER/<label>/*.png, a few per label "
                        "(the fitted weights are printed to reuse with --weights)")
    c.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                   help="score each image also shifted by whole pixels and average over the views "
                        f"(1 = the image alone; up to 25; time grows with views; default {DEFAULT_VIEWS})")
    c.add_argument("--brightness", default="1", metavar="B1,B2,...",
                   help="also read every view dimmed to these levels in (0, 1] and average over them, e.g. 1,0.9,0.8 "
                        "(digits p(x|c) 58.9%% -> 67.8%% on the default model; time grows with the levels)")
    c.add_argument("--orders", type=int, default=None,
                   help="average p(x|c) over this many image token orders (a model trained with image_orders > 1; "
                        "default: every order the checkpoints were trained with, 1 for raster-only models)")
    c.add_argument("--retrieval", default="auto", choices=["auto", "on", "off"],
                   help="read each class caption and each image behind the documents the retriever finds for it "
                        "(auto: if every checkpoint was trained with retrieval)")
    c.add_argument("--k", type=int, default=None, help="documents to retrieve (default: the training maximum)")
    c.add_argument("--json", action="store_true",
                   help="one JSON object per image (with retrieval: the documents read, under \"retrieved\")")
    c.add_argument("--compile", action="store_true",
                   help="torch.compile the scoring forward (about a minute once, then ~1.8x faster under bf16): "
                        "pays off for hundreds of images, not for a few")
    c.set_defaults(func=cmd_classify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # torch's own deprecation notices (e.g. from inside torch.compile) are nothing a user can act on
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
