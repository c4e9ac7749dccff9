"""The training job's config (batch arithmetic, validation, W by name) and worker pieces that need no Ray."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hscr_platform.core.config import ConfigError, load_config
from hscr_platform.training.train_config import BatchConfig, TrainJobConfig, batch_plan, identity, run_name

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "train" / "tiny.yaml"


def _cfg(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, list(overrides))


# --- config -------------------------------------------------------------------------------------------------


def test_batch_arithmetic_is_derived_or_checked():
    assert batch_plan(BatchConfig(micro_batch_size=2, global_batch_size=16), 8).accum == 1
    plan = batch_plan(BatchConfig(micro_batch_size=2, global_batch_size=16), 4)
    assert (plan.micro, plan.workers, plan.accum, plan.global_batch) == (2, 4, 2, 16)
    with pytest.raises(ValueError, match="global_batch_size 16"):
        batch_plan(BatchConfig(micro_batch_size=3, global_batch_size=16), 2)
    with pytest.raises(ValueError):
        batch_plan(BatchConfig(micro_batch_size=2, grad_accum=3, global_batch_size=16), 2)


def test_batch_mismatch_fails_at_load_naming_the_numbers():
    with pytest.raises(ConfigError, match=r"global_batch_size 8 != micro_batch_size 2 × num_workers 3"):
        _cfg("workers.num_workers=3")
    assert batch_plan(_cfg("batch.grad_accum=null").batch, 2).accum == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.weights=pairs", "must be one of"),
        ("loss.gamma=0", "gamma must be > 0"),
        ("loss.nll_weight=-0.1", "nll_weight must be >= 0"),
        ("loss.reduction=max", "must be one of"),
        ("deepspeed.stage=1", "must be one of"),
        ("deepspeed.offload=true deepspeed.stage=0", "needs ZeRO"),
        ("loss.weights=custom loss.explicit=[1.0]", "loss.explicit needs 3 weights"),
        ("loss.weights=custom loss.explicit=[1,1,1] loss.implicit=[[0,1],[0,0]]", "3×3 matrix"),
        ("data.max_levels=1", "max_levels must be >= 2"),
        ("precision=fp16", "must be one of"),
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ],
)
def test_bad_values_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*override.split())


def test_every_profile_loads_with_its_batch_arithmetic():
    for path in sorted(TINY.parent.glob("*.yaml")):
        cfg = load_config(TrainJobConfig, path)
        assert batch_plan(cfg.batch, cfg.workers.num_workers).global_batch == cfg.batch.global_batch_size
    base = load_config(TrainJobConfig, TINY.parent / "base.yaml")
    assert (base.policy.lora.enabled, base.policy.lora.r, base.optim.lr, base.schedule.epochs) == (
        True,
        16,
        5e-7,
        2,
    )
    assert (base.batch.global_batch_size, base.precision, base.deepspeed.stage, base.workers.num_workers) == (
        16, "bf16", 2, 8)  # fmt: skip


def test_run_name_ignores_the_stop_point_and_the_cluster():
    cfg = _cfg()
    stopped = _cfg("schedule.stop_after_steps=2", "ray.num_cpus=1")
    assert run_name(cfg) == run_name(stopped) and identity(cfg) == identity(stopped)
    assert run_name(_cfg("optim.lr=0.5")) != run_name(cfg)
    assert run_name(_cfg("output.name=mine")) == "mine"


def test_a_run_name_is_bound_to_one_config_and_one_live_driver(tmp_path):
    import json
    import os
    import socket

    from hscr_platform.training.job import claim

    run_dir = tmp_path / "train" / "r"
    with claim(_cfg(), run_dir):
        assert json.loads((run_dir / "driver.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match="is being trained by pid"), claim(_cfg(), run_dir):
            pass
    assert not (run_dir / "driver.lock").exists()
    (run_dir / "driver.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
    with claim(_cfg("schedule.stop_after_steps=1"), run_dir):  # a killed driver's lock; the stop point may change
        pass
    with pytest.raises(ValueError, match="different config"), claim(_cfg("optim.lr=0.5"), run_dir):
        pass


def test_importing_the_job_config_is_light():
    code = "import sys, hscr_platform.training.job; print(','.join(m for m in ('ray', 'deepspeed', 'mlflow', 'transformers', 'peft') if m in sys.modules))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- pair weights by name, schedule, loss reduction, DeepSpeed config ---------------------------------------


def test_pair_weights_by_name():
    from hscr_platform.training.loop import pair_weights

    def w(name: str, **kw) -> list[list[float]]:
        return pair_weights(dataclasses.replace(_cfg().loss, weights=name, **kw), 4).tolist()

    assert w("all_pairs") == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert w("explicit") == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert w("implicit") == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert w("adjacent") == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert w("dpo") == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    custom = torch.tensor(w("custom", explicit=(1.0, 0.5, 0.25), implicit=0.1))
    torch.testing.assert_close(
        custom, torch.tensor([[0, 1, 0.5, 0.25], [0, 0, 0.1, 0.1], [0, 0, 0, 0.1], [0, 0, 0, 0]])
    )


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from hscr_platform.training.loop import lr_at

    lrs = [lr_at(s, base_lr=1.0, warmup=2, total=10, min_ratio=0.1) for s in range(12)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))


def test_micro_loss_mean_is_over_the_nominal_micro_batch():
    from hscr_platform.training.loop import micro_loss

    per_example = torch.tensor([1.0, 3.0])  # a third row was skipped
    assert micro_loss(per_example, reduction="mean", nominal=3, micro_batches=4).item() == pytest.approx(4 / 3)
    # sum: 4 micro-batches averaged by DeepSpeed, so the micro-batch sum 4 is scaled by 4
    assert micro_loss(per_example, reduction="sum", nominal=3, micro_batches=4).item() == 16.0
    with pytest.raises(ValueError, match="unknown loss"):
        micro_loss(per_example, reduction="max", nominal=3, micro_batches=4)


def _deepspeed_step_grad(reduction: str, weight: torch.Tensor, x: torch.Tensor, *, workers: int, accum: int):
    """The step gradient as DeepSpeed forms it: each worker backpropagates ``micro_loss / accum`` for each of
    its ``accum`` micro-batches; the gradients are then averaged over the workers. Per-example loss:
    ``l_b = (x_b · w − 1)²``; the last row of the last micro-batch is skipped (not in ``per_example``)."""
    from hscr_platform.training.loop import micro_loss

    micro = x.shape[0] // (workers * accum)
    per_worker = []
    for rank in range(workers):
        w = weight.clone().requires_grad_(True)
        for step in range(accum):
            start = (rank * accum + step) * micro
            rows = x[start : start + micro]
            if rank == workers - 1 and step == accum - 1:
                rows = rows[:-1]  # a skipped row
            per_example = (rows @ w - 1.0) ** 2  # (b,)
            loss = micro_loss(per_example, reduction=reduction, nominal=micro, micro_batches=workers * accum)
            (loss / accum).backward()
        per_worker.append(w.grad)
    return torch.stack(per_worker).mean(0)


def test_sum_reduction_gradient_is_the_sum_of_per_example_gradients_over_two_ranks():
    weight = torch.tensor([0.3, -0.2, 0.5])
    x = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 10  # 2 workers × accum 2 × micro 2
    kept = x[:7]  # the skipped row is the last one
    w = weight.clone().requires_grad_(True)
    ((kept @ w - 1.0) ** 2).sum().backward()
    per_example_sum = w.grad
    for workers, accum in ((2, 2), (1, 4), (4, 1)):
        summed = _deepspeed_step_grad("sum", weight, x, workers=workers, accum=accum)
        torch.testing.assert_close(summed, per_example_sum)
        meaned = _deepspeed_step_grad("mean", weight, x, workers=workers, accum=accum)
        torch.testing.assert_close(meaned, per_example_sum / 8)  # the nominal global batch: 8 rows
    # by hand, row 0 alone: x = (0, .1, .2), x·w − 1 = −0.92, grad 2·(−0.92)·x = (0, −0.184, −0.368)
    row = _deepspeed_step_grad("sum", weight, torch.cat([x[:1], x[:1] * 0]), workers=1, accum=1)
    torch.testing.assert_close(row, torch.tensor([0.0, -0.184, -0.368]))


def test_deepspeed_config_matches_the_batch_plan(monkeypatch):
    from hscr_platform.training.ds_config import deepspeed_config, worker_env

    ds = deepspeed_config(stage=3, offload=True, micro=2, accum=4, global_batch=16, lr=1e-4, weight_decay=0.0,
                          grad_clip=1.0, bf16=True)  # fmt: skip
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] and ds["bf16"]["enabled"] and "scheduler" not in ds
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert worker_env("/tmp/x/.cache")["TORCH_EXTENSIONS_DIR"] == "/tmp/x/.cache/torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert worker_env()["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


def test_engine_setup_turns_off_deepspeeds_cpu_shm_op_without_probing(monkeypatch):
    """Training never uses DeepSpeed's shared-memory all-reduce; building it cost a minute per job."""
    import importlib

    import deepspeed.ops

    from hscr_platform.training.ds_config import skip_shm_comm_op

    monkeypatch.delitem(deepspeed.ops.__dict__, "__compatible_ops__", raising=False)
    probes = []
    monkeypatch.setattr(deepspeed.ops, "_probe_compatible_ops", lambda: probes.append(1) or {})
    skip_shm_comm_op()
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the module (deepspeed.comm re-exports torch)
    assert ds_torch.build_shm_op() is None and not probes  # no compiler probe, no JIT build


# --- one training step without Ray: the NaN stop, and the export --------------------------------------------


class _PlainEngine:
    """What the step needs of a DeepSpeed engine, over a plain module: one process, SGD, accumulation 2."""

    def __init__(self, model, accum: int = 2):
        self.module, self.accum, self.micro = model, accum, 0
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        (loss / self.accum).backward()

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accum == 0

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro += 1

    def get_global_grad_norm(self):
        return None

    def zero_optimization(self):
        return False


@pytest.fixture(scope="module")
def step_setup(tiny_model_dir):
    from hscr_platform.training.loop import StepContext, pair_weights
    from hscr_platform.training.policy import Reference, load_policy
    from hscr_platform.training.pref_data import to_example
    from hscr_platform.training.toy_prefs import toy_preference_rows

    cfg = _cfg(f"policy.path={tiny_model_dir}")
    model, processor = load_policy(cfg)
    engine = _PlainEngine(model)
    ctx = StepContext(cfg, engine, Reference(cfg, engine, torch.device("cpu")), processor,
                      pair_weights(cfg.loss, 4), torch.device("cpu"), 2)  # fmt: skip
    rows = toy_preference_rows(tiny_model_dir, 4, seed=3)

    def examples(*changes: dict):
        from hscr_platform.models.logprobs import model_fingerprint

        fp = model_fingerprint(tiny_model_dir)
        return [
            to_example(
                {**row, **change},
                max_levels=4,
                vocab_size=len(processor.tokenizer),
                fingerprint=fp,
                use_stored=True,
            )
            for row, change in zip(rows, changes, strict=False)
        ]

    return ctx, processor, examples


def _prepared(processor, examples):
    from collections import Counter

    from hscr_platform.training.pref_data import Prepared, collate

    recomputed = Counter(r.ref_status for r in examples if r.ref_logps is None)
    return Prepared(collate(examples, processor, num_levels=4), Counter(), recomputed)


def test_step_record_with_stored_and_recomputed_references(step_setup):
    from hscr_platform.training.loop import train_step

    ctx, processor, examples = step_setup
    batch = _prepared(processor, examples({}, {"ref_fingerprint": "stale"}))
    record = train_step(ctx, [batch, _prepared(processor, [])], step=0, total=4)
    # policy == reference (lr 0): every reward is 0, so the loss is 6 pairs × log 2 per example, / nominal 2
    assert record["loss"] == pytest.approx((2 * 6 * math.log(2) / 2 + 0.0) / 2, rel=1e-4)
    assert abs(record["rewards/margins"]) < 1e-4 and record["ref_forward_rows"] == 1
    assert record["grad_norm"] > 0  # computed by the loop where the engine keeps none
    assert record["counts"] == {"ref_recomputed/stale": 1} and record["skipped_rows"] == 0


def test_step_adds_the_nll_term_on_y_w(step_setup):
    from hscr_platform.training.loop import train_step

    ctx, processor, examples = step_setup
    batch = _prepared(processor, examples({}, {}))
    records = []
    for weight in (0.0, 0.5):  # lr 1e-30: the weights do not move between the two steps
        loss = dataclasses.replace(ctx.cfg.loss, nll_weight=weight)
        cfg = dataclasses.replace(ctx.cfg, loss=loss, optim=dataclasses.replace(ctx.cfg.optim, lr=1e-30))
        records.append(train_step(dataclasses.replace(ctx, cfg=cfg), [batch, batch], step=0, total=4))
    off, on = records
    assert on["nll_loss"] == pytest.approx(off["nll_loss"]) and on["nll_loss"] > 0
    assert on["loss"] == pytest.approx(off["loss"] + 0.5 * on["nll_loss"], rel=1e-5)


def test_a_nan_loss_stops_with_the_step_and_example_ids(step_setup):
    from hscr_platform.training.loop import NonFinite, train_step

    ctx, processor, examples = step_setup
    batch = _prepared(processor, examples({}, {"ref_logps": [float("nan")] * 4}))
    with pytest.raises(NonFinite, match=r"non-finite loss at step 7.*toy-3-0.*toy-3-1"):
        train_step(ctx, [batch], step=7, total=8)


def test_lora_export_merges_into_a_folder_load_vlm_reads(tiny_model_dir, tmp_path):
    from hscr_platform.models.loading import ModelConfig, load_vlm
    from hscr_platform.training.checkpoints import export_model
    from hscr_platform.training.policy import load_policy

    cfg = _cfg(f"policy.path={tiny_model_dir}", "policy.lora.enabled=true", "policy.lora.r=4")
    model, processor = load_policy(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # B = 0 at init would make the merge trivially equal
    model.eval()
    out = export_model({k: v.clone() for k, v in model.state_dict().items()}, cfg, processor, tmp_path)
    merged, _ = load_vlm(ModelConfig(path=str(out)))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(
        merged.model.language_model(ids).last_hidden_state,
        model.base_model.model.model.language_model(ids).last_hidden_state,
    )
    cfg = _cfg(
        f"policy.path={tiny_model_dir}",
        "policy.lora.enabled=true",
        "policy.lora.r=4",
        "policy.lora.merge=false",
    )
    assert export_model(model.state_dict(), cfg, processor, tmp_path).name == "adapter"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
