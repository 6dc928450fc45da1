"""Every shipped config composes and checks; bad values fail naming the key and the fix."""

import ast
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from dist_trainer.config import (
    CONF_DIR,
    ConfigError,
    JobConfig,
    flatten,
    load_config,
    resolve_config,
)

GROUPS = {
    g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
    for g in ("model", "data", "optim", "experiment")
}


def test_defaults_compose_to_the_contract_keys():
    job = resolve_config(load_config())
    assert isinstance(job, JobConfig)
    assert job.trainer.global_batch_size > 0 and job.scaling.num_workers == 2
    assert job.scaling.use_gpu == "auto" and job.trainer.max_micro_batch_size is None  # no cap
    assert job.tracking.uri == "sqlite:///mlflow.db"
    flat = flatten(OmegaConf.to_container(load_config(), resolve=True))
    for key in (
        "trainer.global_batch_size",
        "trainer.max_epochs",
        "trainer.max_micro_batch_size",
        "trainer.seed",
        "scaling.num_workers",
        "scaling.use_gpu",
        "tracking.uri",
        "tracking.experiment",
        "model._target_",
        "data._target_",
    ):
        assert key in flat


@pytest.mark.parametrize("group", ["model", "data", "optim", "experiment"])
def test_every_shipped_option_composes(group):
    assert GROUPS[group], f"conf/{group} is empty"
    for option in GROUPS[group]:
        resolve_config(load_config([f"{group}={option}"]))


def test_every_model_data_pair_composes():
    for model in GROUPS["model"]:
        for data in GROUPS["data"]:
            resolve_config(load_config([f"model={model}", f"data={data}"]))


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(HydraException, match="model/resnet9000") as err:
        load_config(["model=resnet9000"])
    assert "mlp" in str(err.value)  # Hydra lists the available options


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.global_batch_size=0", "trainer.global_batch_size"),
        ("trainer.global_batch_size=-4", "trainer.global_batch_size"),
        ("trainer.max_micro_batch_size=0", "trainer.max_micro_batch_size"),
        ("trainer.max_micro_batch_size=huge", "trainer.max_micro_batch_size"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
        ("trainer.precision=float16", "trainer.precision"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("scaling.num_workers=[2,1]", "scaling.num_workers"),
        ("scaling.num_workers=[0,2]", "scaling.num_workers"),
        ("scaling.num_workers=[1,2,4]", "scaling.num_workers"),
        ("scaling.num_workers=[1,two]", "scaling.num_workers"),
        ("scaling.num_workers=true", "scaling.num_workers"),
        ("scaling.elastic_resize_interval_s=0", "scaling.elastic_resize_interval_s"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("scaling.placement_strategy=RANDOM", "scaling.placement_strategy"),
        ("optim.lr_scaling=cubic", "optim.lr_scaling"),
        ("optim.lr_scaling=linear", "optim.base_batch_size"),
        ("optim.schedule=step", "optim.schedule"),
        ("model._target_=no.such.Model", "model._target_"),
        ("data._target_=dist_trainer.data.nothing_here", "data._target_"),
        ("tracking.uri=", "tracking.uri"),
        ("comm.probe_every_n_steps=0", "comm.probe_every_n_steps"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(load_config([override]))


@pytest.mark.parametrize(
    ("override", "workers", "elastic", "low", "high", "text"),
    [
        ("scaling.num_workers=3", 3, False, 3, 3, "3"),
        ("scaling.num_workers=[1,4]", [1, 4], True, 1, 4, "1-4"),
        ("scaling.num_workers=[2,2]", 2, False, 2, 2, "2"),  # a range of one count is fixed
    ],
)
def test_num_workers_is_a_count_or_an_elastic_range(override, workers, elastic, low, high, text):
    scaling = resolve_config(load_config([override])).scaling
    assert scaling.num_workers == workers and scaling.elastic is elastic
    assert (scaling.min_workers, scaling.max_workers) == (low, high)
    assert scaling.describe_workers() == text


def test_type_errors_name_the_key():
    # Typed keys are checked while Hydra composes: its error names the override.
    with pytest.raises(HydraException, match="trainer.global_batch_size"):
        load_config(["trainer.global_batch_size=lots"])


def test_every_config_field_is_documented():
    """Each dataclass field carries a docstring right under it."""
    tree = ast.parse((Path(__file__).parents[1] / "dist_trainer" / "config.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(following, ast.Expr) and isinstance(
                    getattr(following, "value", None), ast.Constant
                )
                nested = isinstance(node.annotation, ast.Name) and node.annotation.id.endswith(
                    "Config"
                )
                assert documented or nested, f"{cls.name}.{node.target.id} has no docstring"


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 3}]}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "d.0.e": 3,
    }


def test_ray_train_still_reads_the_settings_we_give_it():
    """Our Ray Train levers are its internal environment variables: a Ray release that renames
    one would silently drop it, so this fails instead."""
    import inspect

    import ray._private.ray_constants as ray_constants
    import ray.train.v2._internal.constants as train_constants

    from dist_trainer.ray_cluster import RAY_DRIVER_ENV, RAY_TRAIN_ENV

    train_source = inspect.getsource(train_constants)
    for name in RAY_TRAIN_ENV:
        assert f'"{name}"' in train_source, name
    for name in RAY_DRIVER_ENV:
        assert f'"{name}"' in inspect.getsource(ray_constants), name


def test_storage_path_uris_pass_as_given(tmp_path, monkeypatch):
    from dist_trainer.ray_cluster import storage_path

    assert storage_path("s3://bucket/runs") == "s3://bucket/runs"
    assert storage_path("gs://b/p") == "gs://b/p"
    monkeypatch.chdir(tmp_path)
    local = storage_path("ray_storage")
    assert local == str(tmp_path / "ray_storage") and (tmp_path / "ray_storage").is_dir()


@pytest.mark.parametrize(
    ("uri", "nodes", "refused"),
    [
        ("sqlite:////x/mlflow.db", ["10.0.0.1"], False),  # one machine: fine
        ("sqlite:////x/mlflow.db", ["10.0.0.1", "10.0.0.1"], False),  # nodes on this machine
        ("sqlite:////x/mlflow.db", ["10.0.0.1", "10.0.0.2"], True),
        ("file:///x/mlruns", ["10.0.0.1", "10.0.0.2"], True),
        ("http://mlflow:5000", ["10.0.0.1", "10.0.0.2"], False),
    ],
)
def test_a_file_store_is_refused_for_a_cluster_of_machines(uri, nodes, refused):
    from dist_trainer.ray_cluster import file_store_conflict

    problem = file_store_conflict(uri, nodes, "10.0.0.1")
    assert (problem is not None) == refused
    if refused:
        assert "10.0.0.2" in problem and "tracking.uri=http://" in problem
