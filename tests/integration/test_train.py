"""Multi-level DPO on Ray Train + DeepSpeed, 2 CPU workers, the tiny toy model, shards built here.

One local Ray instance serves the module. The shards hold 40 toy rows (every 5th with a stale reference
fingerprint, so the reference runs for it) and 3 bad rows at epoch positions 0, 5 and 10. The order is not
shuffled; with 43 rows, global batch G = 8 and L = 5 steps per epoch, step s takes position 5·j + s of each slot
j (pref_stream), so step 0 holds all 3 bad rows and the first micro-batch of worker 0 (slots 0 and 1) is all bad
(a masked filler keeps both workers stepping together).
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

STEPS = 4  # global batch 8 = 2 × 2 workers × 2 accumulation; 43 rows -> 5 steps per epoch


@pytest.fixture(scope="module")
def toy_rows(tiny_model_dir):
    from hscr_platform.training.toy_prefs import toy_preference_rows

    rows = toy_preference_rows(tiny_model_dir, 40, seed=1)
    for row in rows[::5]:
        row["ref_fingerprint"] = "stale"
    return rows


@pytest.fixture(scope="module")
def shards(toy_rows, tmp_path_factory):
    from hscr_platform.training.toy_prefs import write_preference_shards

    good = toy_rows[3]
    bad = [
        {**good, "id": "bad-one-response", "responses": good["responses"][:1],
         "response_token_ids": good["response_token_ids"][:1], "num_levels": 0},
        {**good, "id": "bad-lengths", "responses": good["responses"][:2]},
        {**good, "id": "bad-image", "image": b"not an image"},
    ]  # fmt: skip
    rows = list(toy_rows)
    for position, row in zip((0, 5, 10), bad, strict=True):
        rows.insert(position, row)
    return write_preference_shards(rows, tmp_path_factory.mktemp("pref"), rows_per_shard=16)


def _cfg(tiny_model_dir, shards, root, *overrides: str):
    from pathlib import Path

    from hscr_platform.core.config import load_config
    from hscr_platform.training.train_config import TrainJobConfig

    tiny = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "train" / "tiny.yaml"
    base = [
        f"data.path={shards}",
        f"policy.path={tiny_model_dir}",
        f"output.root={root}",
        "data.shuffle=false",
        f"schedule.max_steps={STEPS}",
        "schedule.checkpoint_every=2",
        "schedule.log_every=2",
    ]
    return load_config(TrainJobConfig, tiny, [*base, *overrides])


def _mlflow(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root.resolve()}/mlflow.db")


def _losses(client, run_id):
    return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def zero2_resumed(ray_local, tiny_model_dir, shards, tmp_path_factory):
    """ZeRO-2, stopped after 2 steps (as if killed), then the same command again: it resumes."""
    from hscr_platform.training.job import run

    root = tmp_path_factory.mktemp("runs")
    stopped = run(_cfg(tiny_model_dir, shards, root, "output.name=z2", "schedule.stop_after_steps=2"))
    client = _mlflow(root)
    run_id = client.search_runs([client.get_experiment_by_name("hscr-train-tiny").experiment_id])[0].info.run_id
    first = {
        "stopped": stopped,
        "status": client.get_run(run_id).info.status,
        "losses": _losses(client, run_id),
    }
    summary = run(_cfg(tiny_model_dir, shards, root, "output.name=z2"))
    return root, run_id, first, summary


def test_stop_then_resume_finishes_the_configured_steps(zero2_resumed):
    _, _, first, summary = zero2_resumed
    assert first["stopped"]["stopped_at"] == 2 and first["stopped"]["checkpoint"].endswith("checkpoint_000002")
    assert first["status"] == "KILLED" and len(first["losses"]) == 2
    assert summary["steps"] == STEPS
    # every bad row counted by reason; the 4 steps cover positions p < 40 with p mod 5 != 4, where all 8 stale
    # rows sit (toy rows 0, 5, .., 35 at positions 1, 7, 13, 18, 23, 28, 33, 38)
    assert summary["counts"] == {"skipped/too_few_responses": 1, "skipped/length_mismatch": 1,
                                 "skipped/bad_image": 1, "ref_recomputed/stale": 8}  # fmt: skip


def test_mlflow_run_has_params_metrics_and_artifacts(zero2_resumed):
    root, run_id, _, _ = zero2_resumed
    client = _mlflow(root)
    run = client.get_run(run_id)  # the resumed job re-attached to the same run
    assert run.info.status == "FINISHED" and run.info.run_name == "z2"
    assert run.data.params["deepspeed.stage"] == "2" and run.data.params["batch.global_batch_size"] == "8"
    losses = _losses(client, run_id)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    # step 0: policy == reference, so each valid example costs 6 pairs × log 2; 3 of the 8 rows were bad and
    # the mean is over the nominal global batch (a skipped row never reweights the others)
    assert losses[0] == pytest.approx(5 / 8 * 6 * math.log(2), rel=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "rewards/margins_0_3", "lr", "grad_norm", "examples_per_s"):  # fmt: skip
        assert len(client.get_metric_history(run_id, key)) == STEPS, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "loss.png", "margins.png", "model"} <= artifacts


def test_output_folder_loads_and_differs_from_the_start(zero2_resumed, tiny_model_dir):
    import torch

    from hscr_platform.models.loading import ModelConfig, load_vlm

    summary = zero2_resumed[3]
    trained, _ = load_vlm(ModelConfig(path=summary["model"]))
    start, _ = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, start.state_dict()[n])]
    assert moved and not any("vision_tower" in n for n in moved)  # freeze_vision: the tower is untouched


def test_zero3_uninterrupted_matches_zero2_resumed(zero2_resumed, tiny_model_dir, shards):
    from hscr_platform.training.job import run

    root, run_id, _, _ = zero2_resumed
    run(_cfg(tiny_model_dir, shards, root, "output.name=z3", "deepspeed.stage=3"))
    client = _mlflow(root)
    z3 = client.search_runs([client.get_run(run_id).info.experiment_id], "attributes.run_name = 'z3'")[0]
    assert _losses(client, z3.info.run_id) == pytest.approx(_losses(client, run_id), rel=1e-5)


def test_lora_nan_loss_stops_at_the_last_good_checkpoint(ray_local, tiny_model_dir, toy_rows, tmp_path):
    from hscr_platform.training.job import run
    from hscr_platform.training.toy_prefs import write_preference_shards

    rows = [dict(r) for r in toy_rows]
    rows[6]["ref_logps"] = [float("nan")] * len(rows[6]["ref_logps"])  # position 6 = slot 1, step 1 (L = 5)
    shards = write_preference_shards(rows, tmp_path / "pref")
    cfg = _cfg(tiny_model_dir, shards, tmp_path, "output.name=nan", "policy.lora.enabled=true",
               "schedule.checkpoint_every=1")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 1.*toy-1-6.*checkpoint_000001"):
        run(cfg)
    client = _mlflow(tmp_path)
    (tracked,) = client.search_runs([client.get_experiment_by_name("hscr-train-tiny").experiment_id])
    assert tracked.info.status == "FAILED" and len(_losses(client, tracked.info.run_id)) == 1
