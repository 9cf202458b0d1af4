"""`make eval`: what the trained model can do, measured automatically on held-out data.

    .venv/bin/python bench/eval.py --ckpt runs/default [--out runs/default/eval] [--quick]

1. Text→image on shapes eval captions, judged by the world's exact checker (colour, shape, size,
   position), the compositional hold-out pairs reported apart; with and without guidance, with the
   retriever re-ranking 4 candidates, and (models trained with retrieval) with retrieval on and off.
2. Text→image on digits, judged by a classifier trained on real training digits (an SVM on the
   8×8 scan resolution, ~99% on the real test split).
3. Captioning: shapes eval images (attributes named in the caption) and digits test images.
4. Zero-shot classification by Bayes' rule (p(x|c), p(caption|x), both) on the digits test split
   and on shapes eval images (shape task, colour task), against a supervised logistic regression
   on pixels and (if a retriever is available) the CLIP-style retriever baseline; calibration
   (ECE). Digits with one view and with VIEWS shifted views (sample.classify: test-time
   augmentation), p(x|c) also read at BRIGHTNESS levels ("image_brightness"), and
   "both_calibrated": the two directions weighted as fitted on 100 labelled
   training digits (sample.bayes.fit_direction_weights). Per-image scores go to
   OUT/classification_digits_scores.npz.
5. Robustness under noise, blur and contrast loss (digits, ROBUST_VIEWS shifted views).

--parts t2i,captioning,digits-classification,shapes-classification,robustness (or classification
for the last three) runs only some parts and updates those in OUT/eval.json.

Writes OUT/eval.json and PNGs (sample grids, a robustness plot). Not a test: figures, not asserts.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch import Tensor

import common  # noqa: F401  (puts the project on sys.path)
from common import merge_results
from sample.api import MultimodalModel
from sample.bayes import combine_directions, expected_calibration_error, posterior
from sample.classify import calibrate_directions, classify, trained_orders
from sample.generate import SamplingConfig
from tokenizers_mm.images import image_grid
from train.data import digits as digits_data
from train.data import shapes as shapes_data

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PARTS = ("t2i", "captioning", "digits-classification", "shapes-classification", "robustness")
ALIASES = {"classification": ("digits-classification", "shapes-classification", "robustness")}
VIEWS = 9  # shifted views for the test-time-augmented reading (sample.classify.shifted_views)
# brightness levels for p(x|c) read also dimmed, the range of training's augmented digits
# (sample.classify.image_views; README: 58.9% -> 67.8% on the 2026-12-06 default run)
BRIGHTNESS = (1.0, 0.9, 0.8)
CALIBRATION_PER_DIGIT = 10  # labelled training digits per class for the direction weights of "both"
ROBUST_VIEWS = 5  # fewer views under corruption: 8 corruptions × views would cost most of the eval
DIGIT_TEMPLATES = ["a handwritten digit {}", "the digit {}, written by hand", "a scan of a handwritten {}",
                   "a handwritten {}"]
# an independent check (issue 6): phrasings whose words no training caption uses (train.data.digits)
UNSEEN_DIGIT_TEMPLATES = list(digits_data.UNSEEN_TEMPLATES)


@contextmanager
def timed(report: dict, part: str):
    """Record the part's wall-clock seconds in report["seconds_by_part"]."""
    t = time.time()
    yield
    report.setdefault("seconds_by_part", {})[part] = round(time.time() - t, 1)


def batched(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ----------------------------------------------------------------------------------------------
def digit_judge():
    """An SVM on real training digits at the scans' own 8×8 resolution: the referee for generated
    digit images. Returns (predict(images) -> labels, its accuracy on the real test split)."""
    from sklearn.svm import SVC

    def features(images):
        return np.stack([np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel() / 16
                         for im in images])

    train = digits_data.digits_documents("train")
    test = digits_data.digits_documents("eval")
    clf = SVC(gamma="scale", C=10).fit(features([d.images[0] for d in train]), [d.meta["label"] for d in train])
    acc = float(np.mean(clf.predict(features([d.images[0] for d in test])) == [d.meta["label"] for d in test]))
    return (lambda images: clf.predict(features(images)).tolist()), acc


@dataclass(frozen=True)
class How:
    """One text→image setting of the evaluation."""

    guidance: float
    retrieve: bool = False  # prepend retrieved documents (models trained with retrieval)
    rerank: int = 1  # candidates per image, the retriever's best kept

    @property
    def name(self) -> str:
        return f"guidance_{self.guidance:g}" + ("_retrieval" if self.retrieve else "") + \
            (f"_rerank{self.rerank}" if self.rerank > 1 else "")


def text_to_image_shapes(mm: MultimodalModel, docs, how: How, seed: int) -> tuple[dict, list]:
    specs = [shapes_data.ShapeSpec(**{k: v for k, v in d.meta["images"][0][0].items() if k != "jitter"}) for d in docs]
    captions = [d.texts[0] for d in docs]
    images = []
    for i, chunk in enumerate(batched(captions, 16)):
        images += generate_batch(mm, chunk, how, seed + i)
    checks = [shapes_data.check(im, s) for im, s in zip(images, specs)]
    held = [(s.colour, s.shape) in shapes_data.HOLDOUT_PAIRS for s in specs]

    def rate(pred, subset=None):
        idx = [i for i in range(len(checks)) if subset is None or subset[i]]
        return float(np.mean([pred(checks[i]) for i in idx])) if idx else None

    res = {"n": len(checks), "colour_and_shape": rate(lambda c: c.colour_ok and c.shape_ok),
           "colour": rate(lambda c: c.colour_ok), "shape": rate(lambda c: c.shape_ok),
           "size": rate(lambda c: c.size_ok), "position": rate(lambda c: c.position_ok),
           "all_attributes": rate(lambda c: c.all_ok),
           "holdout_n": int(sum(held)), "holdout_colour_and_shape": rate(lambda c: c.colour_ok and c.shape_ok, held)}
    return res, images


def generate_batch(mm: MultimodalModel, captions, how: How, seed: int) -> list[Image.Image]:
    """One image per caption: the captions batched when nothing is retrieved or re-ranked, else
    caption by caption through the public API (each caption retrieves its own documents)."""
    from sample.generate import generate_images

    if not how.retrieve and how.rerank == 1:
        return generate_images(mm.decoder, mm.tokenizer, captions, sampling=SamplingConfig(guidance=how.guidance), seed=seed)
    return [mm.text_to_image(c, guidance=how.guidance, seed=seed * 1000 + j, rerank=how.rerank, retrieve=how.retrieve)[0]
            for j, c in enumerate(captions)]


def text_to_image_digits(mm: MultimodalModel, judge, per_digit: int, how: How, seed: int):
    captions = [f"a handwritten digit {WORDS[d]}" for _ in range(per_digit) for d in range(10)]
    labels = [d for _ in range(per_digit) for d in range(10)]
    images = []
    for i, chunk in enumerate(batched(captions, 20)):
        images += generate_batch(mm, chunk, how, seed + i)
    pred = judge(images)
    return {"n": len(images), "judged_right": float(np.mean(np.array(pred) == np.array(labels)))}, images


# ----------------------------------------------------------------------------------------------
def parse_shape_caption(text: str) -> dict:
    t = " " + text.lower() + " "
    out = {"colour": next((c for c in shapes_data.COLOURS if f" {c} " in t), None),
           "shape": next((s for s in shapes_data.SHAPES if re.search(rf"\b{s}", t)), None),
           "size": "large" if re.search(r"\b(large|big|filling)\b", t) else "small" if " small " in t else None}
    pos = None
    for p in sorted(shapes_data.POSITIONS, key=len, reverse=True):
        if re.search(rf"\b{p}\b", t):
            pos = p
            break
    if pos is None and re.search(r"\b(middle|centre)\b", t):
        pos = "center"
    out["position"] = pos
    return out


def caption_of(mm: MultimodalModel, image: Image.Image, retrieve: bool, rerank: int) -> str:
    """Greedy, or (rerank > 1) the best of `rerank` captions sampled at temperature 0.7 by the retriever's score."""
    return mm.caption(image, temperature=0.0 if rerank == 1 else 0.7, rerank=rerank, retrieve=retrieve)[0]


def captions_shapes(mm: MultimodalModel, docs, retrieve: bool = False, rerank: int = 1) -> dict:
    right = {"colour": [], "shape": [], "size": [], "position": []}
    examples = []
    for chunk in batched(docs, 32):
        for d in chunk:
            cap = caption_of(mm, d.images[0], retrieve, rerank)
            truth = d.meta["images"][0][0]
            got = parse_shape_caption(cap)
            for k in right:
                if k in ("size", "position") and got[k] is None:
                    # a caption may leave size or position out; colour and shape are always named
                    if k == "size" and truth["size"] == "small":
                        continue
                right[k].append(got[k] == truth[k])
            if len(examples) < 8:
                examples.append({"caption": cap, "truth": truth})
    res = {k: float(np.mean(v)) if v else None for k, v in right.items()}
    res["colour_and_shape"] = float(np.mean([a and b for a, b in zip(right["colour"], right["shape"])]))
    res["attribute_accuracy"] = float(np.mean([x for v in right.values() for x in v]))
    res["examples"] = examples
    return res


def captions_digits(mm: MultimodalModel, docs, retrieve: bool = False, rerank: int = 1) -> dict:
    ok = []
    examples = []
    for d in docs:
        cap = caption_of(mm, d.images[0], retrieve, rerank).lower()
        label = d.meta["label"]
        said = {i for i, w in enumerate(WORDS) if re.search(rf"\b{w}\b", cap)} | {int(c) for c in re.findall(r"\b(\d)\b", cap)}
        ok.append(said == {label})
        if len(examples) < 8:
            examples.append({"caption": cap, "label": label})
    return {"n": len(ok), "accuracy": float(np.mean(ok)), "examples": examples}


# ----------------------------------------------------------------------------------------------
def corrupt(img: Image.Image, kind: str, level: float, rng: np.random.Generator) -> Image.Image:
    if kind == "clean" or level == 0:
        return img
    if kind == "noise":
        a = np.asarray(img, dtype=np.float64) / 255 + rng.normal(0, level, (img.size[1], img.size[0], 3))
        return Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(level))
    if kind == "contrast":
        return ImageEnhance.Contrast(img).enhance(level)
    raise ValueError(kind)


CORRUPTIONS = [("clean", 0), ("noise", 0.1), ("noise", 0.2), ("noise", 0.3), ("blur", 1.0), ("blur", 1.5),
               ("contrast", 0.5), ("contrast", 0.25)]


def logistic_baseline(train_docs, test_images, labels_of):
    from sklearn.linear_model import LogisticRegression

    X = np.stack([np.asarray(d.images[0], dtype=np.float32).ravel() / 255 for d in train_docs])
    clf = LogisticRegression(max_iter=300, C=0.1).fit(X, [labels_of(d) for d in train_docs])
    return lambda images: clf.predict(np.stack([np.asarray(im, dtype=np.float32).ravel() / 255 for im in images])).tolist()


def naive_bayes_codes(tokenizer, train_docs, labels_of, alpha: float = 0.1):
    """A supervised reference read off the same tokens the transformer reads: per-position class
    histograms of the training images' VQ codes (add-alpha smoothed), the class with the largest
    sum of log-frequencies wins. It measures how much of the class the codes carry to a generative
    classifier that simply counts them (the transformer's p(x|c) must learn that from captions)."""
    codes = tokenizer.encode_images([d.images[0] for d in train_docs]).numpy()
    labels = np.array([labels_of(d) for d in train_docs])
    classes = np.unique(labels)
    K, G = tokenizer.layout.codebook_size, codes.shape[1]
    counts = np.full((len(classes), G, K), alpha)
    for j, c in enumerate(classes):
        np.add.at(counts[j], (np.broadcast_to(np.arange(G), codes[labels == c].shape), codes[labels == c]), 1)
    logp = np.log(counts / counts.sum(-1, keepdims=True))

    def predict(images) -> list:
        test = tokenizer.encode_images(images).numpy()
        return classes[logp[:, np.arange(G)[None], test].sum(-1).argmax(0)].tolist()
    return predict


def calibration_digits(quick: bool) -> list:
    """Labelled training digits (originals, CALIBRATION_PER_DIGIT of each) on which the direction
    weights of "both" are fitted: never the test split the accuracy is read on."""
    per = 3 if quick else CALIBRATION_PER_DIGIT
    docs = digits_data.digits_documents("train")
    return [next(d for k, d in enumerate(docs) if d.meta["label"] == digit and k >= j * len(docs) // per)
            for j in range(per) for digit in range(10)]


def as_trained(mm: MultimodalModel) -> dict:
    """classify's retrieval arguments as the CLI defaults them: the bank for a model trained with
    retrieval (its documents read before captions and images), none otherwise."""
    return {"bank": mm.bank_for(None), "k": mm.retrieval_k}


def classify_digits(mm: MultimodalModel, quick: bool, retriever_dir: Path | None, out_dir: Path) -> dict:
    test = digits_data.digits_documents("eval")
    if quick:
        test = test[::4]
    images = [d.images[0] for d in test]
    y = torch.tensor([d.meta["label"] for d in test])
    calib = calibration_digits(quick)
    cal_images, cal_y = [d.images[0] for d in calib], torch.tensor([d.meta["label"] for d in calib])
    t = time.time()
    res: dict = {}
    raw: dict = {"test_labels": y.numpy(), "calibration_labels": cal_y.numpy()}

    def read(post: Tensor) -> dict:
        return {"accuracy": float((post.argmax(-1) == y).double().mean()), "ece": expected_calibration_error(post, y)}

    # one "both" run gives both directions' scores; each direction is also read on its own, and
    # "both_calibrated" weights the directions as fitted on labelled training digits
    for views in (1, VIEWS):
        sfx = "" if views == 1 else f"_views{views}"
        c = classify(mm.model, mm.tokenizer, images, WORDS, DIGIT_TEMPLATES, mode="both", views=views, **as_trained(mm))
        weights, cal = calibrate_directions(mm.model, mm.tokenizer, cal_images, cal_y.tolist(), WORDS, DIGIT_TEMPLATES,
                                            views=views, **as_trained(mm))
        for mode, ll in (("image", c.image_loglik), ("text", c.text_loglik), ("both", c.loglik),
                         ("both_calibrated", combine_directions(c.image_loglik, c.text_loglik, weights))):
            res[mode + sfx] = read(posterior(ll))
        res["both_calibrated" + sfx]["weights"] = [round(w, 4) for w in weights]
        res["both_calibrated" + sfx]["calibration_images"] = len(calib)
        for name, cl in (("test", c), ("calibration", cal)):
            raw[f"{name}_image{sfx}"], raw[f"{name}_text{sfx}"] = cl.image_loglik.numpy(), cl.text_loglik.numpy()
    res["retrieval"] = mm.bank_for(None) is not None  # as trained (the CLI's default)
    if res["retrieval"]:  # the same model reading no retrieved documents, one view
        c = classify(mm.model, mm.tokenizer, images, WORDS, DIGIT_TEMPLATES, mode="both")
        for mode, ll in (("image", c.image_loglik), ("text", c.text_loglik), ("both", c.loglik)):
            res[mode + "_no_retrieval"] = read(posterior(ll))
        raw["test_image_no_retrieval"], raw["test_text_no_retrieval"] = c.image_loglik.numpy(), c.text_loglik.numpy()
    np.savez(out_dir / "classification_digits_scores.npz", **raw)  # per-image scores for offline analysis
    one = classify(mm.model, mm.tokenizer, images, WORDS, DIGIT_TEMPLATES[:1], mode="image", **as_trained(mm))
    res["image_one_template"] = {"accuracy": float((one.posterior.argmax(-1) == y).double().mean())}
    dim = classify(mm.model, mm.tokenizer, images, WORDS, DIGIT_TEMPLATES, mode="image", brightness=BRIGHTNESS, **as_trained(mm))
    res["image_brightness"] = read(dim.posterior) | {"levels": list(BRIGHTNESS)}
    digits_data.check_unseen_templates()
    unseen = classify(mm.model, mm.tokenizer, images, WORDS, UNSEEN_DIGIT_TEMPLATES, mode="both", **as_trained(mm))
    for mode, ll in (("image", unseen.image_loglik), ("text", unseen.text_loglik), ("both", unseen.loglik)):
        res[mode + "_unseen_templates"] = read(posterior(ll))
    res["unseen_templates"] = UNSEEN_DIGIT_TEMPLATES
    res["seconds"] = round(time.time() - t, 1)
    res["image_orders"] = trained_orders(mm.model, mm.tokenizer)  # p(x|c) averaged over them (classify's default)
    train = digits_data.digits_documents("train")
    logreg = logistic_baseline(train, images, lambda d: d.meta["label"])
    res["logistic_regression_pixels"] = {"accuracy": float(np.mean(np.array(logreg(images)) == y.numpy()))}
    nb = naive_bayes_codes(mm.tokenizer, train, lambda d: d.meta["label"])
    res["naive_bayes_codes"] = {"accuracy": float(np.mean(np.array(nb(images)) == y.numpy()))}
    clip = clip_baseline(retriever_dir, mm)
    if clip is not None:
        for key, templates in (("clip_retriever", DIGIT_TEMPLATES), ("clip_retriever_unseen_templates", UNSEEN_DIGIT_TEMPLATES)):
            res[key] = {"accuracy": float((clip(images, WORDS, templates).argmax(-1) == y).double().mean())}
    return res


def classify_shapes(mm: MultimodalModel, quick: bool) -> dict:
    """Shape task and colour task on eval singles; templates marginalise the other attribute; the
    direction weights of "both_calibrated" are fitted on labelled train singles."""
    sdocs = [d for d in shapes_data.shapes_documents("eval", 600 if not quick else 200, seed=0) if d.meta["kind"] == "single"]
    cdocs = [d for d in shapes_data.shapes_documents("train", 300 if not quick else 90, seed=0) if d.meta["kind"] == "single"]
    sres = {}
    for task, labels, key in (("shape", list(shapes_data.SHAPES), "shape"), ("colour", list(shapes_data.COLOURS), "colour")):
        templates = ([f"a {c} {{}}" for c in shapes_data.COLOURS] if task == "shape"
                     else [f"a {{}} {s}" for s in shapes_data.SHAPES])
        # one view: the shapes tasks have many templates, and whole-pixel shifts carry no news
        # about a colour or a shape drawn on a coarse grid
        c = classify(mm.model, mm.tokenizer, [d.images[0] for d in sdocs], labels, templates, mode="both", **as_trained(mm))
        yy = torch.tensor([labels.index(d.meta["images"][0][0][key]) for d in sdocs])
        cal_yy = [labels.index(d.meta["images"][0][0][key]) for d in cdocs]
        weights, _ = calibrate_directions(mm.model, mm.tokenizer, [d.images[0] for d in cdocs], cal_yy, labels, templates,
                                          **as_trained(mm))
        sres[task] = {"n": len(sdocs), "calibration_images": len(cdocs), "weights": [round(w, 4) for w in weights]} | {
            f"accuracy_{mode}": float((ll.argmax(-1) == yy).double().mean())
            for mode, ll in (("image", c.image_loglik), ("text", c.text_loglik), ("both", c.loglik),
                             ("both_calibrated", combine_directions(c.image_loglik, c.text_loglik, weights)))}
    return sres


def robustness(mm: MultimodalModel, quick: bool, retriever_dir: Path | None) -> list[dict]:
    """Accuracy under corruption on a subset of the digits test split: Bayes "both" against the
    CLIP-style retriever and logistic regression on pixels."""
    test = digits_data.digits_documents("eval")
    if quick:
        test = test[::4]
    images = [d.images[0] for d in test]
    y = torch.tensor([d.meta["label"] for d in test])
    logreg = logistic_baseline(digits_data.digits_documents("train"), images, lambda d: d.meta["label"])
    clip = clip_baseline(retriever_dir, mm)
    rng = np.random.default_rng(0)
    sub = list(range(0, len(test), 4 if not quick else 2))
    rob = []
    for kind, level in CORRUPTIONS:
        imgs = [corrupt(images[i], kind, level, rng) for i in sub]
        ys = y[sub]
        row = {"corruption": kind, "level": level}
        for views in (1, ROBUST_VIEWS):
            c = classify(mm.model, mm.tokenizer, imgs, WORDS, DIGIT_TEMPLATES[:2], mode="both", views=views, **as_trained(mm))
            row["bayes_both" + ("" if views == 1 else f"_views{views}")] = float((c.posterior.argmax(-1) == ys).double().mean())
        row["logistic_regression"] = float(np.mean(np.array(logreg(imgs)) == ys.numpy()))
        if clip is not None:
            row["clip_retriever"] = float((clip(imgs, WORDS, DIGIT_TEMPLATES).argmax(-1) == ys).double().mean())
        rob.append(row)
        print(f"  robustness {kind} {level}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "level"))
    return rob


def clip_baseline(retriever_dir: Path | None, mm: MultimodalModel):
    if retriever_dir is None or not retriever_dir.is_dir():
        return None
    from model.retrieval import Retriever
    from train.retriever import zero_shot_classify

    r = Retriever.from_pretrained(retriever_dir)
    return lambda images, labels, templates: zero_shot_classify(r, mm.tokenizer, images, labels, templates)


def robustness_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows[0] if k not in ("corruption", "level")]
    xs = [f"{r['corruption']} {r['level']}" if r["corruption"] != "clean" else "clean" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for n in names:
        ax.plot(xs, [r.get(n) for r in rows], "o-", label=n)
    ax.set_ylabel("accuracy, digits test split")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/default")
    p.add_argument("--out", default=None)
    p.add_argument("--retriever", default=None, help="retriever folder for the CLIP-style baseline")
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights sampling decodes with (MultimodalModel.from_pretrained); scoring reads float32")
    args = p.parse_args()
    mm = MultimodalModel.from_pretrained(args.ckpt, precision=args.precision)
    out = Path(args.out or Path(args.ckpt) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    parts = {q for part in args.parts.split(",") for q in ALIASES.get(part, (part,))}
    if not parts <= set(PARTS):
        raise SystemExit(f"--parts: unknown part(s) {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    previous = out / "eval.json"
    # a partial run updates the parts it ran in an earlier eval.json of the same checkpoint
    report: dict = json.loads(previous.read_text()) if parts != set(PARTS) and previous.exists() else {}
    report["ckpt"] = str(args.ckpt)
    report["decoding_dtype"] = str(mm.decoder.tok_emb.weight.dtype).removeprefix("torch.")

    judge, judge_acc = digit_judge()
    report["digit_judge_accuracy_on_real_test"] = judge_acc
    n_shapes = 64 if args.quick else 240
    singles = [d for d in shapes_data.shapes_documents("eval", n_shapes * 3, seed=args.seed + 1) if d.meta["kind"] == "single"][:n_shapes]
    holdout = [d for d in shapes_data.shapes_documents("eval", 4000, seed=args.seed + 2)
               if d.meta["kind"] == "single" and d.meta.get("holdout")][: (16 if args.quick else 48)]
    if "t2i" in parts:
        with timed(report, "t2i"):
            t2i = {}
            hows = [How(1.0), How(3.0)]
            if mm.can_retrieve:  # the retriever re-ranks 4 or 8 candidates per caption (issue 5: optional re-ranking)
                hows += [How(3.0, rerank=4), How(3.0, rerank=8)]
            if mm.trained_with_retrieval:  # and, for a model trained with it, retrieval on as well as off
                hows += [How(1.0, retrieve=True), How(3.0, retrieve=True)]
            for how in hows:
                res, imgs = text_to_image_shapes(mm, singles + holdout, how, args.seed)
                t2i[f"shapes_{how.name}"] = res
                image_grid([imgs[i : i + 16] for i in range(0, min(len(imgs), 64), 16)], scale=2).save(out / f"t2i_shapes_{how.name}.png")
                res_d, dimgs = text_to_image_digits(mm, judge, 4 if args.quick else 10, how, args.seed)
                t2i[f"digits_{how.name}"] = res_d
                image_grid([dimgs[i : i + 10] for i in range(0, min(len(dimgs), 40), 10)], scale=2).save(out / f"t2i_digits_{how.name}.png")
                print(f"text→image {how.name}: shapes colour+shape {res['colour_and_shape']:.3f} "
                      f"(hold-out {res['holdout_colour_and_shape']}), digits judged right {res_d['judged_right']:.3f}")
            report["text_to_image"] = t2i
    if "captioning" in parts:
        with timed(report, "captioning"):
            cap_docs = singles[: (32 if args.quick else 120)]
            digit_docs = digits_data.digits_documents("eval")[:: (6 if args.quick else 2)]
            report["captioning"] = {"shapes": captions_shapes(mm, cap_docs), "digits": captions_digits(mm, digit_docs)}
            if mm.can_retrieve:  # the retriever re-ranks 8 sampled captions per image (as it re-ranks images)
                report["captioning"]["shapes_rerank8"] = captions_shapes(mm, cap_docs, rerank=8)
                report["captioning"]["digits_rerank8"] = captions_digits(mm, digit_docs, rerank=8)
            if mm.trained_with_retrieval:
                report["captioning"]["shapes_retrieval"] = captions_shapes(mm, cap_docs, retrieve=True)
                report["captioning"]["digits_retrieval"] = captions_digits(mm, digit_docs, retrieve=True)
            for how in ("", "_rerank8"):
                if f"shapes{how}" in report["captioning"]:
                    print(f"captioning{how}: shapes attribute accuracy {report['captioning'][f'shapes{how}']['attribute_accuracy']:.3f}, "
                          f"digits {report['captioning'][f'digits{how}']['accuracy']:.3f}")
    retriever = Path(args.retriever) if args.retriever else None
    if parts & {"digits-classification", "shapes-classification", "robustness"}:
        mm.model.compile_scoring()  # thousands of images: compilation (~1 min) pays (Transformer.compile_scoring)
    if "digits-classification" in parts:
        with timed(report, "digits-classification"):
            report.setdefault("classification", {})["digits"] = classify_digits(mm, args.quick, retriever, out)
            print("classification digits: " + json.dumps(report["classification"]["digits"]))
    if "shapes-classification" in parts:
        with timed(report, "shapes-classification"):
            report.setdefault("classification", {})["shapes"] = classify_shapes(mm, args.quick)
            print("classification shapes: " + json.dumps(report["classification"]["shapes"]))
    if "robustness" in parts:
        with timed(report, "robustness"):
            report.setdefault("classification", {})["robustness_digits"] = robustness(mm, args.quick, retriever)
            robustness_plot(report["classification"]["robustness_digits"], out / "robustness.png")
    report["seconds"] = round(time.time() - t0, 1)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    merge_results("eval", {k: v for k, v in report.items() if k != "captioning"})
    print(f"wrote {out}/eval.json and PNGs in {report['seconds']} s")


if __name__ == "__main__":
    main()
