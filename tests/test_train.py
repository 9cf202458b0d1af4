"""End to end: `make tokenize PRESET=tiny`, training, exact resume after SIGKILL, DDP on 2 processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


from conftest import RA_SETTINGS, env  # noqa: E402


def train_cmd(data: Path, out: Path, *sets: str) -> list[str]:
    base = ["steps=24", "ckpt_every=4", "eval_every=1000", "sample_grid=false", "log_every=4"]
    return [sys.executable, "-m", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
            *[a for s in (*base, *sets) for a in ("--set", s)]]


def test_make_tokenize_tiny_writes_tokenizer_shards_and_report(tiny_artifacts):
    report = json.loads((tiny_artifacts / "report.json").read_text())
    for corpus in ("shapes", "digits"):
        assert 0 < report["vq"]["codebook_usage"][corpus] <= 1
        assert report["vq"]["perplexity"][corpus] > 1
        assert report["vq"]["psnr_db"][corpus] > 10
        assert 0 < report["vq"]["blank_share"][corpus] < 1  # both corpora draw on black
        assert report["vq"]["content_perplexity"][corpus] > 1
        assert (tiny_artifacts / f"vq_recon_{corpus}.png").is_file()
    usage = report["vq"]["codebook_usage"]  # the union of the eval splits uses every code either corpus uses
    assert max(usage["shapes"], usage["digits"]) <= usage["all eval splits"] <= min(1.0, usage["shapes"] + usage["digits"])
    assert 0.0 <= report["vq"]["shapes_reconstruction_exact"] <= 1.0  # share of reconstructions the checker passes
    assert report["bpe"]["vocab_size"] > 265
    assert report["splits"]["train"]["docs"] > 0 and report["splits"]["eval"]["docs"] > 0
    assert report["splits"]["train"]["per_source"]["digits"]["docs"] == 1437
    assert report["splits"]["eval"]["per_source"]["digits"]["docs"] == 360
    assert report["bad_inputs"]["count"] == 0
    assert (tiny_artifacts / "tokenizer" / "tokenizer.json").is_file()
    assert (tiny_artifacts / "shards" / "train" / "index.json").is_file()
    ret = report["retriever"]
    assert set(ret["eval"]) == {"shapes", "digits"} and 0 <= ret["eval"]["digits"]["t2i_recall@5"] <= 1
    assert 0 <= ret["zero_shot_digits_accuracy"] <= 1 and "corrupted_removed" in ret["curation_demo"]["shapes"]
    assert ret["neighbours"]["train"]["filled"] > 0.9


def test_training_lowers_held_out_loss_and_writes_a_loadable_checkpoint(tiny_artifacts, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(train_cmd(tiny_artifacts, run, "eval_every=12"), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert len(evals) == 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (run / "loss_curve.png").is_file()
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 24 and "eval_image_nll" in final
    # `make train` on a finished run resumes at its last step and must keep the run's figures
    r = subprocess.run(train_cmd(tiny_artifacts, run, "eval_every=12"), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "final_metrics.json").read_text()) == final
    from model.checkpoint import load_pretrained

    loaded = load_pretrained(run)
    assert loaded.info["step"] == 24 and loaded.path.name == "step_000024"
    ids = torch.tensor([loaded.tokenizer.encode_text("a red circle")])
    assert torch.isfinite(loaded.model(ids)).all()


@pytest.mark.parametrize("sets", [(), RA_SETTINGS, ("image_orders=4",)], ids=["plain", "retrieval", "image-orders"])
def test_a_run_killed_mid_training_resumes_to_the_same_weights_bitwise(tiny_artifacts, tmp_path, sets):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(train_cmd(tiny_artifacts, straight, *sets), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    # slow steps down (1 thread, bigger eval) is not needed: poll for the first checkpoint, then SIGKILL
    p = subprocess.Popen(train_cmd(tiny_artifacts, killed, *sets), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "latest").is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_killed = int((killed / "latest").read_text().strip().split("_")[-1])
    assert step_killed < 24

    r = subprocess.run(train_cmd(tiny_artifacts, killed, *sets), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming at step {step_killed}" in r.stdout + r.stderr
    a = load_file(straight / "checkpoints" / "step_000024" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step_000024" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if "image_orders=4" in sets:  # the model has the 3 order markers past the tokenizer's ids
        from model.checkpoint import load_pretrained
        from sample.classify import trained_orders

        loaded = load_pretrained(killed)
        assert trained_orders(loaded.model, loaded.tokenizer) == 4


def test_two_ddp_processes_stay_in_sync(tiny_artifacts, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *train_cmd(tiny_artifacts, run, "steps=6")[3:]]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["ranks_in_sync"] is True and final["step"] == 6
    assert "ranks 2" in r.stdout + r.stderr


def test_a_non_finite_loss_stops_the_run_naming_the_step(tiny_artifacts, tmp_path):
    r = subprocess.run(train_cmd(tiny_artifacts, tmp_path / "nan", "lr=1e12", "warmup=0", "grad_clip=1e30"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "non-finite loss" in r.stderr and "at step" in r.stderr


def test_unknown_or_mistyped_settings_are_refused(tiny_artifacts, tmp_path):
    for bad, message in (("stepz=3", "unknown setting 'stepz'"), ("steps=three", "expected an integer")):
        r = subprocess.run(train_cmd(tiny_artifacts, tmp_path / "x", bad), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr


def test_a_run_saved_before_a_setting_existed_resumes_with_what_it_trained_with():
    import dataclasses

    from train.config import TrainConfig

    saved = dataclasses.asdict(TrainConfig())
    del saved["image_pos_emb"]  # a run from before the setting
    assert TrainConfig.from_saved(saved).image_pos_emb is False
    assert TrainConfig.from_saved({**saved, "image_pos_emb": True}).image_pos_emb is True


def test_training_with_image_positions_sizes_them_from_the_tokenizer(tiny_artifacts, tmp_path):
    run = tmp_path / "pos"
    r = subprocess.run(train_cmd(tiny_artifacts, run, "steps=4", "image_pos_emb=true"), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from model.checkpoint import load_pretrained

    loaded = load_pretrained(run)
    assert loaded.model.config.image_pos_emb == loaded.tokenizer.image_tokens
    assert loaded.model.img_pos_emb.weight.shape == (loaded.tokenizer.image_tokens, loaded.model.config.dim)


def test_autocast_defaults_to_where_bf16_is_native_and_can_be_forced_either_way():
    from model.precision import bf16_pays
    from train.config import PRESETS
    from train.overrides import apply_overrides
    from train.trainer import uses_bf16

    cpu = torch.device("cpu")
    cfg = PRESETS["default"]
    assert cfg.autocast is None and uses_bf16(cfg, cpu) == bf16_pays(cpu)
    assert uses_bf16(apply_overrides(cfg, ["autocast=true"]), cpu) is True
    assert uses_bf16(apply_overrides(cfg, ["autocast=false"]), cpu) is False
    assert apply_overrides(apply_overrides(cfg, ["autocast=true"]), ["autocast=none"]).autocast is None


def test_a_failing_sample_grid_leaves_that_steps_checkpoint(tiny_artifacts, tmp_path, monkeypatch):
    # the grid is drawn after the checkpoint: a sampler failure (a bug, a code edit under a running
    # job) stops the run without costing the steps since the previous checkpoint
    from dataclasses import replace

    from train import trainer
    from train.config import PRESETS

    def broken(*args, **kwargs):
        raise RuntimeError("sampler broke")

    monkeypatch.setattr(trainer, "write_sample_grid", broken)
    cfg = replace(PRESETS["tiny"], steps=8, eval_every=6, ckpt_every=6, sample_grid=True)
    with pytest.raises(RuntimeError, match="sampler broke"):
        trainer.train(cfg, tiny_artifacts, tmp_path / "run")
    assert (tmp_path / "run" / "latest").read_text().strip().endswith("step_000006")
