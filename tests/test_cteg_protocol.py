"""The CTEG paper's protocol as the sweeps run it (docs/fidelity.md): checkpoint selection, the
Table 2 and Table 6 sweeps, the MSL 64 and Shuffle rows of one trained model, Diversity's direction,
and each option where the released reference code differs from the paper's text."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facelab.core import checkpoint as ckpt
from facelab.families import registry
from facelab.families.cteg.job import CTEGConfig, CTEGJob, CTEGModel
from facelab.families.cteg.model import CTEG, TextEncoderUnavailable
from facelab.families.cteg.selection import CheckpointSelector
from facelab.spec.loading import apply_overrides, has_path, load_sweep, validate_job
from facelab.tasks.expressions.evaluate import (
    DIRECTIONS,
    METRICS,
    EvalConfig,
    evaluate_baseline,
    evaluate_model,
    evaluate_shuffle,
    model_cppl_inputs,
)
from facelab.tasks.expressions.metrics import cppl_per_item

from tolerances import FP32_SHAPES

REPO = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, n_heads=4, ff_dim=64, latent_dim=16, ewa_dim=8, ewa_heads=2, max_frames=16)
MEAN = torch.linspace(-0.2, 0.2, 53)
TEXTS = ["I am so happy!", "That is terrible.", "What?"]
QUICK = dict(n_diversity=6, n_mmodality=8, n_bootstrap=20, max_texts=8, batch_size=8)


def make(seed: int = 0, **overrides) -> CTEG:
    torch.manual_seed(seed)
    return CTEG(CTEGConfig(**{**TINY, **overrides}), MEAN)


def frames_batch(lengths=(6, 4, 2), t: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    frames = 0.5 * torch.randn(len(lengths), t, 53, generator=g)
    return frames * (torch.arange(t)[None, :, None] < lengths[:, None, None]), lengths


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from facelab.data.synth import generate_emoava

    root = tmp_path_factory.mktemp("emoava")
    generate_emoava(root, n_train=24, n_dev=6, n_test=8, seed=1)
    return root


@pytest.fixture(scope="module")
def test_split(data):
    from facelab.data.emoava import load_split

    return load_split(data, "test")


def resolved_trials(sweep: str) -> dict[str, dict]:
    """{variant: the trial's resolved, validated job dict} of a shipped sweep (first seed)."""
    loaded = load_sweep(REPO / "sweeps" / sweep, root=REPO)
    out = {}
    for t in loaded.trials:
        raw = apply_overrides(loaded.job_for(t.variant), t.overrides(loaded.spec.variants))
        out.setdefault(t.variant, validate_job(raw, sweep).model_dump(mode="json"))
    return out


# --------------------------------------------------------------------------------------------
# 1. training length and checkpoint selection
# --------------------------------------------------------------------------------------------


def _weights_at(epoch: int) -> nn.Module:
    m = nn.Linear(3, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(epoch))
    return m


def test_best_selection_picks_the_epoch_with_the_lowest_dev_metric(tmp_path):
    dev = [3.0, 1.0, 2.0, 1.0, 5.0]  # epochs 1 and 3 tie: the later one wins (the reference's <=)
    sel = CheckpointSelector("best", "val/mse", keep_encoder=True)
    for epoch, v in enumerate(dev):
        sel.update(epoch, {"val/mse": v, "val/cppl": 10.0 - epoch}, _weights_at(epoch))
    assert (sel.epoch, sel.value) == (3, 1.0)
    assert sel.metrics() == {"select/epoch": 3.0, "select/value": 1.0}
    assert sel.tags()["facelab.select.epoch"] == "3" and sel.tags()["facelab.select.metric"] == "val/mse"
    model = _weights_at(4)
    sel.apply(model)
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.parameters())
    # the selection travels inside every checkpoint: a restarted worker resumes it
    sel.save(tmp_path)
    again = CheckpointSelector("best", "val/mse", keep_encoder=True)
    again.restore(tmp_path, sel.meta())
    assert (again.epoch, again.value) == (3, 1.0)
    assert all(torch.equal(again.weights[k], sel.weights[k]) for k in sel.weights)
    other = CheckpointSelector("best", "val/cppl", keep_encoder=True)
    other.restore(tmp_path, sel.meta())  # made with another metric: not resumed
    assert other.epoch is None
    by_cppl = CheckpointSelector("best", "val/cppl", keep_encoder=True)
    for epoch, v in enumerate(dev):
        by_cppl.update(epoch, {"val/mse": v, "val/cppl": 10.0 - epoch}, _weights_at(epoch))
    assert by_cppl.epoch == 4
    last = CheckpointSelector("last", "val/mse", keep_encoder=True)
    for epoch, v in enumerate(dev):
        last.update(epoch, {"val/mse": v}, _weights_at(epoch))
    assert last.epoch == 4 and last.weights is None
    with pytest.raises(KeyError, match="select_metric"):
        last.update(5, {"val/loss": 1.0}, _weights_at(5))


def test_paper_sweeps_train_100_epochs_and_select_a_checkpoint():
    job = CTEGJob()
    assert job.train.epochs == 100 and job.train.select == "best" and job.train.select_metric == "val/mse"
    for sweep in ("cteg_main.yaml", "cteg_ablation.yaml", "cteg_variants.yaml", "cteg_depth.yaml"):
        for variant, j in resolved_trials(sweep).items():
            if j["kind"] == "cteg" and not j["eval"]["baseline"]:
                assert j["train"]["epochs"] == 100 and j["train"]["select"] == "best", (sweep, variant)
                assert (j["model"]["ewa_heads"], j["model"]["ewa_dim"]) == (12, 768), (sweep, variant)


def test_paper_settings_in_the_cteg_job():
    """jobs/cteg.yaml holds the paper's settings (§5.1, Appendix D; reference train.sh where the
    paper gives none) and every reference-only behaviour is off."""
    from facelab.spec.loading import load_job

    _, j = load_job(REPO / "jobs" / "cteg.yaml")
    assert {k: j["model"][k] for k in ("d_model", "n_heads", "ff_dim", "cvad_layers", "latent_dim", "dropout")} == {
        "d_model": 768,
        "n_heads": 12,
        "ff_dim": 2048,
        "cvad_layers": 1,
        "latent_dim": 768,
        "dropout": 0.1,
    }
    assert (j["model"]["ewa_dim"], j["model"]["ewa_heads"], j["model"]["max_text_tokens"]) == (768, 12, 128)
    assert (j["model"]["ewa"], j["model"]["lta"], j["model"]["target_guided"]) == (True, "attention", True)
    assert (j["model"]["finetune_encoder"], j["model"]["share_projection"], j["model"]["scale_embedding"]) == (
        False,
        False,
        True,
    )
    paper = dict(output_sigma=1.0, kl_reduction="sum", kl_layers="sum", recon_loss="mse", jaw_weight=1.0)
    assert {k: j["model"][k] for k in paper} == paper and j["model"]["unconditional"] == "masked"
    assert j["model"]["stop_threshold"] == 1.0 and j["data"]["max_frames"] == 256
    assert j["optim"] == {
        "batch_size": 256,
        "lr_mul": 2.0,
        "warmup": 4000,
        "betas": [0.9, 0.98],
        "eps": 1e-9,
        "grad_clip": None,
    }
    assert (j["train"]["epochs"], j["train"]["select"], j["train"]["select_metric"]) == (100, "best", "val/mse")
    e = j["eval"]
    assert (e["max_frames"], e["n_diversity"], e["n_mmodality"], e["delta"], e["sigma"]) == (256, 750, 1500, 0.8, 0.2)
    assert (e["cppl_region"], e["cppl_output"], e["cppl_first_step"]) == ("cdf_difference", "mean", False)


class _Ctx:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


class _ResumeFrom:
    def __init__(self, path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def run_loop(monkeypatch, job: dict, data: Path, out: Path, resume_from=None) -> list[dict]:
    """The CTEG ``worker_loop`` in this process, one CPU worker (Ray Train's context, report and DDP
    wrapper replaced); every reported checkpoint is copied to ``out``."""
    import ray.train
    import ray.train.torch

    from facelab.families.cteg import loop

    reports: list[dict] = []

    def report(metrics, checkpoint=None):
        entry = {"metrics": dict(metrics)}
        if checkpoint is not None:
            entry["dir"] = Path(out) / f"epoch{metrics['epoch']}"
            shutil.copytree(checkpoint.path, entry["dir"])
        reports.append(entry)

    monkeypatch.setattr(ray.train, "get_context", lambda: _Ctx())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: resume_from and _ResumeFrom(resume_from))
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kw: model)
    loop.worker_loop({"job": job, "data_dir": str(data), "root": str(out), "tracking": None})
    return reports


def tiny_job(**train) -> dict:
    return CTEGJob(
        data={"max_frames": 12, "dev_subset": 6},
        model={**{k: v for k, v in TINY.items() if k != "max_frames"}, "max_text_tokens": 16},
        optim={"batch_size": 8, "warmup": 2, "lr_mul": 3.0},
        train={"epochs": 3, "max_steps_per_epoch": 3, "seed": 3, "select": "best", "select_metric": "val/kl", **train},
        eval={"max_frames": 12, "extra_max_frames": [6], "shuffle_row": True, **QUICK},
    ).model_dump(mode="json")


def test_worker_loop_scores_the_selected_epoch_and_one_model_gives_three_rows(monkeypatch, tmp_path, data):
    """One training run: the final checkpoint and the test metrics are the selected epoch's; the
    same run also reports the MSL-limited row (test6/) and the Shuffle row (shuffle/)."""
    from facelab.families.cteg.servable import load
    from facelab.tasks.expressions.scoring import eval_config

    job = tiny_job()
    reports = run_loop(monkeypatch, job, data, tmp_path / "full")
    assert [r["metrics"]["epoch"] for r in reports] == [0, 1, 2]
    dev = [r["metrics"]["val/kl"] for r in reports]
    best = max(i for i, v in enumerate(dev) if v == min(dev))
    assert best != 2, dev  # the case of interest: an earlier epoch than the last (the KL grows here)
    final = reports[-1]["metrics"]
    assert final["select/epoch"] == best and final["select/value"] == dev[best]
    assert ckpt.load_meta(reports[-1]["dir"])["select"] == {
        "mode": "best",
        "metric": "val/kl",
        "epoch": best,
        "value": dev[best],
    }
    selected = ckpt.load_weights(reports[best]["dir"])
    final_w = ckpt.load_weights(reports[-1]["dir"])
    assert all(torch.equal(final_w[k], selected[k]) for k in selected)  # the final checkpoint = the selection

    # the test metrics are those of the selected weights (rebuilt from the selected epoch's checkpoint)
    from facelab.data.emoava import load_split

    model = load(reports[best]["dir"])
    expect = evaluate_model(model, load_split(data, "test"), eval_config(job))
    for m in METRICS:
        assert final[f"test/{m}"] == pytest.approx(expect[m][0], rel=1e-4, abs=1e-5), m
    # ... and from the same model, evaluation only: the MSL 6 row (no Cppl) and the Shuffle row
    assert {f"test6/{m}" for m in METRICS if m != "cppl"} <= set(final) and "test6/cppl" not in final
    limited = evaluate_model(model, load_split(data, "test"), dataclasses.replace(eval_config(job), max_frames=6))
    for m in ("dot", "fgd", "variation"):
        assert final[f"test6/{m}"] == pytest.approx(limited[m][0], rel=1e-4, abs=1e-5), m
    assert {f"shuffle/{m}" for m in METRICS} <= set(final)
    assert math.isfinite(final["shuffle/cppl"])  # (a 3-step model sits at the probability floor on both)
    # intermediate epochs report the selection so far, never test metrics
    assert all("test/cppl" not in r["metrics"] and "select/epoch" in r["metrics"] for r in reports[:-1])


def test_worker_loop_resumes_the_selection(monkeypatch, tmp_path, data):
    """A restart from the first checkpoint resumes the selection and ends with the same weights."""
    job = tiny_job(select_metric="val/kl")
    job["eval"]["enabled"] = False
    reports = run_loop(monkeypatch, job, data, tmp_path / "full")
    best = reports[-1]["metrics"]["select/epoch"]
    final_w = ckpt.load_weights(reports[-1]["dir"])
    resumed = run_loop(monkeypatch, job, data, tmp_path / "resumed", resume_from=reports[0]["dir"])
    assert [r["metrics"]["epoch"] for r in resumed] == [1, 2]
    assert resumed[-1]["metrics"]["select/epoch"] == best
    again = ckpt.load_weights(resumed[-1]["dir"])
    assert all(torch.equal(again[k], final_w[k]) for k in final_w)


# --------------------------------------------------------------------------------------------
# 2. / 3. the sweeps: Table 6 on "w. sharing", Table 2's MSL 64 row trains nothing
# --------------------------------------------------------------------------------------------


def test_table6_variants_are_built_on_sharing():
    jobs = resolved_trials("cteg_variants.yaml")
    assert set(jobs) == {"w. sharing", "w. pooling", "w. BERT fine-tuning", "CTEG"}
    for v in ("w. sharing", "w. pooling", "w. BERT fine-tuning"):
        assert jobs[v]["model"]["share_projection"] is True, v
    assert jobs["CTEG"]["model"]["share_projection"] is False
    sharing = jobs["w. sharing"]["model"]

    def diff(v):
        return {k: x for k, x in jobs[v]["model"].items() if sharing[k] != x}

    assert diff("w. pooling") == {"lta": "pooling"}
    assert diff("w. BERT fine-tuning") == {"finetune_encoder": True}


def test_table2_msl64_row_is_evaluation_only():
    jobs = resolved_trials("cteg_main.yaml")
    training = [v for v, j in jobs.items() if j["kind"] == "cteg" and not j["eval"]["baseline"]]
    assert training == ["CTEG"]  # one CTEG model is trained; no second one for MSL 64
    cteg = jobs["CTEG"]
    assert cteg["data"]["max_frames"] == 256 and cteg["eval"]["max_frames"] == 256
    assert cteg["eval"]["extra_max_frames"] == [64] and cteg["eval"]["shuffle_row"] is True
    assert all(j["data"]["max_frames"] == 256 for j in jobs.values())  # nothing trains at 64
    assert all(j["eval"].get("baseline") != "shuffle" for j in jobs.values())  # Shuffle comes from the model
    assert {j["eval"].get("baseline") for j in jobs.values()} == {None, "random", "gt"}


def test_extra_max_frames_is_validated():
    with pytest.raises(ValueError, match="extra_max_frames"):
        CTEGJob(eval={"max_frames": 64, "extra_max_frames": [64]})
    with pytest.raises(ValueError, match="extra_max_frames"):
        CTEGJob(eval={"extra_max_frames": [32, 32]})


# --------------------------------------------------------------------------------------------
# 4. the Shuffle row is the trained model's
# --------------------------------------------------------------------------------------------


class Spy:
    """A model that records what ``teacher_forced_means`` is asked."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def teacher_forced_means(self, texts, frames, lengths, **kw):
        self.calls.append((list(texts), frames.clone(), lengths.clone()))
        return self.model.teacher_forced_means(texts, frames, lengths, **kw)


def test_shuffle_row_scores_the_shuffled_sequences_with_the_model(test_split):
    cfg = EvalConfig(max_frames=256, cppl_floor=None, **QUICK)  # exact: an untrained model sits at the floor
    spy = Spy(make(0, max_frames=256))
    row = evaluate_shuffle(spy, test_split, cfg)
    assert spy.calls, "the Shuffle row's Cppl must call the model"
    seqs = [np.asarray(s) for s in test_split.sequences[: cfg.max_texts]]
    fed = [f[:n] for texts, frames, lengths in spy.calls for f, n in zip(frames.numpy(), lengths.tolist())]
    assert [texts for texts, _, _ in spy.calls][0] == list(test_split.texts[: len(spy.calls[0][0])])
    assert [len(f) for f in fed] == [min(len(s), 256) for s in seqs]
    for s, f in zip(seqs, fed):  # a permutation of the test sequence's frames, not the sequence itself
        if len(s) <= 256:
            np.testing.assert_allclose(np.sort(f, axis=0), np.sort(s.astype(np.float32), axis=0), rtol=1e-6)
    assert any(not np.allclose(f, s[: len(f)]) for s, f in zip(seqs, fed))
    other = evaluate_shuffle(make(1, max_frames=256), test_split, cfg)
    assert row["cppl"][0] != other["cppl"][0]  # another model, another likelihood
    data_only = evaluate_baseline("shuffle", test_split, None, cfg)
    for m in ("dot", "fgd", "diversity", "mmodality", "variation"):  # the same shuffled sequences
        assert row[m] == other[m] == data_only[m], m
    assert math.isnan(data_only["cppl"][0])  # no model, no Cppl


# --------------------------------------------------------------------------------------------
# 5. / 6. EwA heads, the text encoder
# --------------------------------------------------------------------------------------------


def test_ewa_defaults_to_12_heads():
    m = CTEGModel()
    assert (m.ewa_heads, m.ewa_dim, m.n_heads) == (12, 768, 12) and m.ewa_dim % m.ewa_heads == 0
    model = make(ewa_dim=24, ewa_heads=12)
    assert model.embed.ewa.cross.n_heads == 12 and model.embed.ewa.cross.head_dim == 2
    with pytest.raises(ValueError, match="ewa_dim"):
        CTEGModel(ewa_dim=64, ewa_heads=12)


def test_missing_text_encoder_names_what_to_install_or_cache():
    with pytest.raises(TextEncoderUnavailable) as ei:
        make(text_encoder="facelab-tests/no-such-encoder")
    msg = str(ei.value)
    assert "hf download facelab-tests/no-such-encoder" in msg and "HF_HOME" in msg and "bert-base-cased" in msg


# --------------------------------------------------------------------------------------------
# 7. the reference code's choices, each an option that does what it says
# --------------------------------------------------------------------------------------------


def test_reconstruction_loss_options_by_hand():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 53, generator=g), torch.randn(2, 3, 53, generator=g)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    w = torch.ones(53)
    w[-3:] = 5.0
    mse = make().recon(pred, target, valid)
    torch.testing.assert_close(mse, torch.where(valid, (pred - target).pow(2).mean(-1), 0.0))
    ref = make(recon_loss="l2", jaw_weight=5.0)
    # the reference's cal_loss_continue: pred and gold times the weights, then the Euclidean norm
    by_hand = torch.sqrt(torch.sum((pred * w - target * w) ** 2, dim=-1))
    torch.testing.assert_close(ref.recon(pred, target, valid), torch.where(valid, by_hand, 0.0))
    x = float(by_hand[0, 0])
    d = (pred[0, 0] - target[0, 0]).double()
    assert x == pytest.approx(math.sqrt(float((d[:50] ** 2).sum() + 25 * (d[50:] ** 2).sum())), rel=1e-5)
    # no NaN gradient from the norm where a difference is exactly zero (padding steps, a perfect frame)
    p = target.clone().requires_grad_(True)
    ref.recon(p, target, valid).sum().backward()
    assert torch.isfinite(p.grad).all()
    # the training terms use it: the same draws give the l2 terms of the MSE model's predictions
    frames, lengths = frames_batch()
    torch.manual_seed(5)
    a = make(dropout=0.0).step_losses(TEXTS, frames, lengths)
    torch.manual_seed(5)
    b = make(dropout=0.0, recon_loss="l2", jaw_weight=5.0).step_losses(TEXTS, frames, lengths)
    torch.testing.assert_close(a["pred"], b["pred"])
    target_steps = torch.cat([frames, torch.zeros(3, 1, 53)], dim=1)
    torch.testing.assert_close(b["mse"], ref.recon(b["pred"], target_steps, b["mask"]))


def test_kl_reductions_over_latent_dims_and_layers():
    frames, lengths = frames_batch()
    terms = {}
    for key, over in {
        "sum": {},
        "dims_mean": {"kl_reduction": "mean"},
        "layers_mean": {"kl_layers": "mean"},
    }.items():
        torch.manual_seed(7)
        model = make(dropout=0.0, cvad_layers=2, **over)
        torch.manual_seed(8)
        terms[key] = model.step_losses(TEXTS, frames, lengths)["kl"]
    torch.testing.assert_close(terms["dims_mean"], terms["sum"] / TINY["latent_dim"])
    torch.testing.assert_close(terms["layers_mean"], terms["sum"] / 2)


def test_output_sigma_and_cppl_output():
    frames, lengths = frames_batch()
    diffs = {}
    for sigma in (1.0, math.exp(0.5)):
        model = make(output_sigma=sigma)
        kw = dict(latent="mean", generator=torch.Generator().manual_seed(1))
        mean, mask = model.teacher_forced_means(TEXTS, frames, lengths, latent="mean")
        sample, _ = model.teacher_forced_means(TEXTS, frames, lengths, output="sample", **kw)
        assert not torch.allclose(sample[mask], mean[mask])
        diffs[sigma] = (sample - mean)[mask]
    # σ·W_out ε with the same ε: the reference's σ = e^0.5 scales the noise by e^0.5
    torch.testing.assert_close(diffs[math.exp(0.5)], math.exp(0.5) * diffs[1.0], **FP32_SHAPES)
    # model_cppl_inputs passes eval.cppl_output through; σ = 0 leaves nothing to sample
    seqs = [f[:n].numpy() for f, n in zip(frames, lengths.tolist())]
    for sigma, same in ((1.0, False), (0.0, True)):
        model = make(output_sigma=sigma)
        m, _ = model_cppl_inputs(model, TEXTS, seqs, EvalConfig(), 16, torch.Generator().manual_seed(0))
        s, _ = model_cppl_inputs(
            model, TEXTS, seqs, EvalConfig(cppl_output="sample"), 16, torch.Generator().manual_seed(0)
        )
        assert all(np.allclose(x, y) for x, y in zip(m, s)) == same


def test_unconditional_pad_states_attends_uniformly_to_the_pad_states():
    ref = make(unconditional="pad_states", max_text_tokens=10)
    masked = make(unconditional="masked", max_text_tokens=10)
    memory, pad = ref.encode_text(["", "hello there"])
    m2, pad2 = masked.encode_text(["", "hello there"])
    torch.testing.assert_close(memory[1], m2[1])  # texts are unaffected
    assert pad2[0].all() and pad[0].tolist() == [False] + [True] * (pad.shape[1] - 1)
    # by hand: the encoder on 10 [PAD] tokens under an all-zero attention mask, uniform attention
    ids = torch.full((1, 10), ref.tokenizer.pad_token_id)
    with torch.no_grad():
        states = ref.text_proj(ref.text_encoder(input_ids=ids, attention_mask=torch.zeros_like(ids)).last_hidden_state)
        attn = ref.layers[0].gen_attn.eval()
        q = torch.randn(1, 4, 32)
        k, v = attn.keys_values(states)
        uniform = v.mean(dim=-2, keepdim=True).expand(-1, -1, 4, -1)  # softmax over equal scores
        by_hand = attn.norm(q + attn.w_o(uniform.transpose(-3, -2).flatten(-2)))
        ours = attn(q, *attn.keys_values(memory[:1]), key_valid=~pad[:1])
    torch.testing.assert_close(ours, by_hand, **FP32_SHAPES)
    # and generation differs from the masked mode (same weights, same noise)
    torch.manual_seed(0)
    a = make(unconditional="pad_states", max_text_tokens=10).generate([""], 6, torch.Generator().manual_seed(2))
    b = masked.generate([""], 6, torch.Generator().manual_seed(2))
    assert not torch.allclose(a[0][:1], b[0][:1])


def test_cppl_first_step_scores_the_start_frame(test_split):
    model = make()
    texts, seqs = test_split.texts[:4], [np.asarray(s) for s in test_split.sequences[:4]]
    base = EvalConfig()
    m0, t0 = model_cppl_inputs(model, texts, seqs, base, 16, torch.Generator().manual_seed(0))
    cfg = EvalConfig(cppl_first_step=True)
    m1, t1 = model_cppl_inputs(model, texts, seqs, cfg, 16, torch.Generator().manual_seed(0))
    for a, b, x, y in zip(m0, m1, t0, t1):
        assert len(b) == len(a) + 1 and len(y) == len(x) + 1
        np.testing.assert_allclose(b[0], MEAN.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(y[0], b[0])
        np.testing.assert_array_equal(b[1:], a)
    h0 = cppl_per_item(m0, t0, base.delta, base.sigma, region=base.cppl_region, floor=base.cppl_floor)
    h1 = cppl_per_item(m1, t1, cfg.delta, cfg.sigma, region=cfg.cppl_region, floor=cfg.cppl_floor)
    start = cppl_per_item([m1[0][:1]], [t1[0][:1]], cfg.delta, cfg.sigma, region=cfg.cppl_region, floor=cfg.cppl_floor)[
        0
    ]
    n = np.array([len(t) for t in t0])
    np.testing.assert_allclose(h1, (h0 * n + start) / (n + 1), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# 8. Diversity's direction; docs/fidelity.md is consistent with the code and the tests
# --------------------------------------------------------------------------------------------


def test_diversity_is_higher_is_better():
    assert DIRECTIONS == {
        "cppl": "↓",
        "dot": "→",
        "fgd": "→",
        "diversity": "↑",
        "mmodality": "↑",
        "variation": "→",
    }


def test_fidelity_doc_names_real_keys_and_tests():
    doc = (REPO / "docs" / "fidelity.md").read_text()
    # The CTEG half names CTEG job keys; the KeyframeFace half names keys of its three families' schemas.
    cteg_part, keyframe_part = doc.split("\n# KeyframeFace", 1)
    keyframe_jobs = [registry.get(k).job for k in ("keyframe", "keyframe_evaluator", "keyframe_mdm")]
    tests = {p.stem: p.read_text() for p in (REPO / "tests").rglob("test_*.py")}
    for part, schemas, at_least in ((cteg_part, [CTEGJob], 20), (keyframe_part, keyframe_jobs, 10)):
        rows = [line for line in part.splitlines() if line.startswith("| ") and not line.startswith("| Paper")]
        assert len(rows) >= at_least
        for row in rows:
            check_row(row, schemas, tests)


def check_row(row: str, schemas: list, tests: dict[str, str]) -> None:
    for key in re.findall(r"`((?:model|train|eval|data|optim)\.[a-z_]+)`", row):
        assert any(has_path(job, key) for job in schemas), (key, row)
    for file, name in re.findall(r"`(?:[a-z]+/)?(test_[a-z_]+)::(test_[a-z0-9_]+)`", row):
        assert file in tests and f"def {name}(" in tests[file], (file, name, row)
