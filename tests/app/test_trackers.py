"""train.report_to: TensorBoard, Weights & Biases (offline) and MLflow (a file store in tmp_path), with resume."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import ConfigError, load_config
from tests.app.test_app import make_config


@pytest.mark.slow
def test_wandb_mlflow_tensorboard_and_resume(env, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store unless told
    path = make_config(env, tmp_path / "run", steps=2, checkpoint_every=1, plots=False)
    trackers = "train.report_to=[tensorboard,wandb,mlflow]"
    assert cli(["train", str(path), trackers]) == 0
    out = tmp_path / "run"
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}
    assert cli(["train", str(path), trackers, "train.steps=3", "--resume"]) == 0
    assert json.loads((out / "trackers.json").read_text()) == ids, "a resumed run continues the same tracker runs"
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(ids["wandb"]) for r in runs), runs
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    import mlflow

    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(ids["mlflow"], "loss/sentiment")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert client.get_run(ids["mlflow"]).data.params["strategy"] == "joint"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3]


def test_tracker_not_installed_names_the_extra(env, tmp_path, monkeypatch):  # noqa: F811
    path = make_config(env, tmp_path / "run")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"wandb is not installed \(pip install 'ortho-lora-dist\[wandb\]'\)"):
        load_config(path, ["train.report_to=[tensorboard,wandb]"])
    with pytest.raises(ConfigError, match=r"mlflow is not installed \(pip install 'ortho-lora-dist\[mlflow\]'\)"):
        load_config(path, ["train.report_to=[mlflow]"])
    assert load_config(path).train.report_to == ["tensorboard"]
    assert load_config(path, ["train.report_to=[]"]).train.report_to == []
    with pytest.raises(ConfigError, match=r"unknown key 'report_to' \(did you mean 'train.report_to'\?\)"):
        load_config(path, ["report_to=[wandb]"])


def test_report_to_none_writes_metrics_only(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run", steps=1, plots=False)
    assert cli(["train", str(path), "train.report_to=[]"]) == 0
    out = tmp_path / "run"
    assert (
        (out / "metrics.jsonl").is_file()
        and not (out / "tensorboard").exists()
        and not (out / "trackers.json").exists()
    )


@pytest.mark.slow
def test_tracking_names_reach_wandb_and_mlflow(tmp_path, monkeypatch):
    """train.tracking's project, run name, group and tags reach the trackers; unset, WANDB_NAME is honoured (the
    output folder's name only as the last resort)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import mlflow

    from ortho_lora_dist.training.telemetry import Telemetry

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking = {"project": "mixtures", "run_name": "qwen-joint", "group": "compare-1", "tags": ["qlora", "joint"]}
    config = {"model": {"name_or_path": "m"}, "train": {"strategy": "joint", "tracking": tracking}, "tasks": []}
    t = Telemetry(tmp_path / "a", ["x"], True, report_to=["wandb", "mlflow"], config=config)
    run = t.trackers["wandb"].run
    assert (run.project, run.name, run.group, set(run.tags)) == (
        "mixtures",
        "qwen-joint",
        "compare-1",
        {"qlora", "joint"},
    )
    got = mlflow.tracking.MlflowClient().get_run(t.trackers["mlflow"].id)
    assert (
        got.info.run_name == "qwen-joint" and got.data.tags["group"] == "compare-1" and got.data.tags["qlora"] == "true"
    )
    assert mlflow.get_experiment(got.info.experiment_id).name == "mixtures"
    t.close()
    monkeypatch.setenv("WANDB_NAME", "from-env")
    t = Telemetry(tmp_path / "b", ["x"], True, report_to=["wandb"], config={"train": {}})
    assert t.trackers["wandb"].run.name == "from-env"
    t.close()
