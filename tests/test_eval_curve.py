"""`eval curve` end to end on the tiny pipeline with tiny random encoders: a batched run of two subjects saves
3 checkpoints (bank.safetensors); the curve renders, scores and plots every step, resumes after an
interruption (only the missing steps rendered), and reads a one-subject run's checkpoints (adapter folders)
too. Numbers from random weights mean nothing; the plumbing is real."""

import csv
import json
import shutil

import pytest
from helpers import fresh_accelerate_state

import dreambooth_singlora.generate as G
from dreambooth_singlora.adapter import read_adapter
from dreambooth_singlora.checkpoint import subject_adapter
from dreambooth_singlora.errors import UserError
from dreambooth_singlora.eval.cli import main as eval_main
from dreambooth_singlora.events import read_events

SUBJECTS, STEPS = ("dog", "backpack"), (1, 2, 3)


@pytest.fixture(scope="module")
def bank_run(tiny_pipeline, dataset_dir, tmp_path_factory):
    """Two subjects trained together for 3 steps, a checkpoint kept at every step."""
    from dreambooth_singlora.train_dreambooth import main as train_main

    run = tmp_path_factory.mktemp("curve") / "run"
    with fresh_accelerate_state():
        train_main(["--subjects", *SUBJECTS, "--output_dir", str(run), "--pretrained_model_name_or_path",
                    str(tiny_pipeline), "--dataset_dir", dataset_dir, "--resolution", "32", "--max_train_steps", "3",
                    "--checkpointing_steps", "1", "--checkpoints_total_limit", "0", "--mixed_precision", "no",
                    "--report_to", "none"])
    return run


def curve_argv(run, out, ckpts, dataset_dir, *extra):
    return ["curve", "--run", str(run), "--output", str(out), "--dataset_dir", dataset_dir, "--max_prompts", "1",
            "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--clip_checkpoint", str(ckpts["clip_dir"]),
            "--dino_checkpoint", str(ckpts["dino_dir"]), "--no_progress", *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_subject_adapter_out_of_a_bank_checkpoint_is_the_final_adapter(bank_run, tmp_path):
    last = bank_run / "checkpoints" / "checkpoint-3"
    for i, s in enumerate(SUBJECTS):
        meta, tensors = read_adapter(subject_adapter(last, s, tmp_path / s))
        final_meta, final = read_adapter(bank_run / s)
        assert tensors.keys() == final.keys() and all(tensors[k].equal(final[k]) for k in final)  # exact: a copy
        for k in ("method", "rank", "alpha", "ramp_steps", "init", "target_modules", "step", "u", "base_model"):
            assert meta[k] == final_meta[k], k
        assert meta["run"]["subject"] == s
    early = read_adapter(subject_adapter(bank_run / "checkpoints" / "checkpoint-1", "dog", tmp_path / "d1"))
    assert early[0]["step"] == 1 and not all(early[1][k].equal(final[k]) for k in final)
    with pytest.raises(UserError, match="not 'cat'"):
        subject_adapter(last, "cat", tmp_path / "cat")
    with pytest.raises(UserError, match="give an output folder"):
        subject_adapter(last, "dog")


def test_curve_end_to_end_and_resume(bank_run, tiny_eval_checkpoints, dataset_dir, tmp_path, monkeypatch):
    out, events = tmp_path / "curve", tmp_path / "events.jsonl"
    argv = curve_argv(bank_run, out, tiny_eval_checkpoints, dataset_dir, "--events", str(events))
    # 1. interrupted while rendering step 3: steps 1 and 2 are kept on disk
    real = G.generate_many

    def dies_at_3(pipe, adapters, cfg, output_dir, *a, **k):
        if str(output_dir).endswith("step-3"):
            raise KeyboardInterrupt
        return real(pipe, adapters, cfg, output_dir, *a, **k)
    monkeypatch.setattr(G, "generate_many", dies_at_3)
    with pytest.raises(SystemExit):
        eval_main(argv)
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step-1.json", "step-2.json"]
    assert read_events(events)[-1]["event"] == "failed"
    # 2. the same command again: only step 3 is rendered
    monkeypatch.setattr(G, "generate_many", real)
    calls = []
    monkeypatch.setattr(G, "generate_many", lambda pipe, adapters, cfg, o, *a, **k: calls.append(o.name)
                        or real(pipe, adapters, cfg, o, *a, **k))
    assert eval_main(argv) == 0
    assert calls == ["step-3"]
    rows = read_csv(out / "curve.csv")
    metrics = {"clip_i", "clip_t", "dino"}
    assert {(int(r["step"]), r["subject"], r["metric"]) for r in rows} == {
        (t, s, m) for t in STEPS for s in (*SUBJECTS, "mean") for m in metrics}
    for r in rows:
        assert float(r["low"]) <= float(r["mean"]) <= float(r["high"]) and r["n_images"] == (
            "4" if r["subject"] == "mean" else "2")
    by = {(int(r["step"]), r["subject"], r["metric"]): float(r["mean"]) for r in rows}
    for t in STEPS:  # the mean row is the mean of the two subject means (float64 sum of two, one rounding)
        for m in metrics:
            assert by[(t, "mean", m)] == pytest.approx((by[(t, "dog", m)] + by[(t, "backpack", m)]) / 2, abs=1e-15)
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "curve.html").read_text()
    assert all(f"<th>step {t}</th>" in page for t in STEPS) and "images/step-3/dog/" in page
    assert '<img src="curve.png"' in page
    assert json.loads((out / "curve.json").read_text())["steps"] == list(STEPS)
    ev = read_events(events)
    kinds = [e["event"] for e in ev]
    assert kinds[-1] == "finished" and "started" in kinds
    assert any(e["event"] == "progress" and e.get("unit") == "checkpoint" and e["done"] == 3 for e in ev)
    # 3. a step's result and one subject's images deleted: only that step renders (only dog's images: the
    # others are still there), with the same numbers
    (out / "steps" / "step-2.json").unlink()
    shutil.rmtree(out / "images" / "step-2" / "dog")
    calls.clear()
    assert eval_main(argv) == 0
    assert calls == ["step-2"]
    again = {(int(r["step"]), r["subject"], r["metric"]): float(r["mean"]) for r in read_csv(out / "curve.csv")}
    assert again == by  # same seeds, same adapter, same CPU code: the same images, bit for bit
    # 4. nothing left to do: nothing rendered, nothing loaded
    calls.clear()
    monkeypatch.setattr("dreambooth_singlora.eval.cli.encoders_from_args",
                        lambda a: (_ for _ in ()).throw(AssertionError("encoders loaded")))
    assert eval_main(argv) == 0 and calls == []


def test_curve_of_a_one_subject_run(bank_run, tiny_eval_checkpoints, dataset_dir, tmp_path, capsys):
    """A run of one subject keeps its adapter folder in each checkpoint: made here from the bank's rows (the
    layout a `--subject dog` run writes: adapter files + trainer_state.json naming the one subject)."""
    run = tmp_path / "dog_run"
    for t in (1, 3):
        src = bank_run / "checkpoints" / f"checkpoint-{t}"
        ckpt = run / "checkpoints" / f"checkpoint-{t}"
        subject_adapter(src, "dog", ckpt)
        state = json.loads((src / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "subjects": ["dog"]}))
    # the run's final adapter (a one-subject run writes it into --output_dir itself) held two photos out
    (run / "adapter_config.json").write_text(json.dumps({"holdout": ["03.jpg", "04.jpg"], "run": {"subject": "dog"}}))
    out = tmp_path / "curve"
    assert eval_main(curve_argv(run, out, tiny_eval_checkpoints, dataset_dir)) == 0
    rows = read_csv(out / "curve.csv")
    assert {(r["step"], r["subject"]) for r in rows} == {("1", "dog"), ("1", "mean"), ("3", "dog"), ("3", "mean")}
    assert {r["metric"] for r in rows} == {"clip_i", "clip_t", "dino"} | {
        f"{m}_{s}" for m in ("clip_i", "dino") for s in ("train", "heldout", "gap")}
    by = {(r["step"], r["metric"]): float(r["mean"]) for r in rows if r["subject"] == "dog"}
    # gap = train - held-out per image, so its mean is the difference of the means (float64, a few roundings)
    assert by[("3", "dino_gap")] == pytest.approx(by[("3", "dino_train")] - by[("3", "dino_heldout")], abs=1e-12)
    assert "dashed: held out of training" in (out / "curve.html").read_text()
    assert not (out / "adapters").exists()  # the checkpoint itself is the adapter: nothing written out
    assert "rendered 2 of 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        eval_main(curve_argv(run, tmp_path / "c2", tiny_eval_checkpoints, dataset_dir, "--steps", "2"))
    assert e.value.code == 2 and "no checkpoint of step 2" in capsys.readouterr().err
