"""Config loading, overrides and the errors a user sees."""

from pathlib import Path

import pytest

from avgk.config import Config, ConfigError, build_config, load_config
from tests.helpers.runs import ROOT


def test_defaults_are_valid_and_flatten():
    config = Config()
    flat = config.flat()
    assert flat["loss.name"] == "two_head"
    assert flat["data.synthetic.num_classes"] == 100


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss.nme=ce"], "unknown key 'loss.nme'"),
        (["train.lr=-1"], "train.lr=-1"),
        (["loss.k=100"], "loss.k must be < number of classes 100, got 100.0"),
        (["eval.ks=[1,150]"], "K must be < number of classes 100, got 150"),
        (["loss.pseudo_k=0.5"], "loss.pseudo_k must be >= 1, got 0.5"),
        (["train.batch_size=10", "train.num_workers=3"], "must be divisible"),
        (["data.source=imagefolder"], "data.root is required"),
        (["data.crop=64", "data.resize=32"], "data.crop must be <= data.resize"),
        (["loss.ml_reduction=max"], "loss.ml_reduction='max'"),
        (["train.milestones=[5,3]", "train.epochs=10"], "train.milestones must be increasing"),
        (["run.name=a/b"], "run.name must be a plain folder name"),
        (["trainepochs"], "must look like key.sub=value"),
        (["loss.name=ce", "loss.pseudo_labels=offline"], "loss.pseudo_labels=offline needs loss.name=two_head"),
        (["eval.num_actors=0"], "eval.num_actors=0"),
        (["eval.top_t=1"], "eval.top_t"),
        (["eval.ks=[1,5]", "eval.top_t=5"], "eval.top_t must be > the largest K it serves (eval.ks and loss.pseudo_k: 5), got 5"),
        (["eval.ks=[1]", "loss.pseudo_k=6", "eval.top_t=6"],
         "eval.top_t must be > the largest K it serves (eval.ks and loss.pseudo_k: 6), got 6"),
        (["eval.score_rows=some"], "eval.score_rows"),
    ],
)
def test_bad_values_name_key_value_and_rule(overrides, expected):
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_parse_yaml_values():
    config = build_config({}, ["eval.ks=[1, 1.5, 3]", "train.amp=bf16", "tracking.uri=null"])
    assert config.eval.ks == [1, 1.5, 3]
    assert config.train.amp == "bf16"
    assert config.tracking.uri is None


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files
    for path in files:
        if {"sweeps", "studies", "pipelines"} & set(path.parts):
            continue  # their own loaders' tests (test_sweep_config, test_study, test_pipeline_spec) load those
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_real_sources_validate_k_against_manifest_classes():
    config = build_config({"data": {"source": "imagefolder", "root": "/x"}, "eval": {"ks": [1, 5]}})
    with pytest.raises(ValueError, match="K must be < number of classes 4, got 5"):
        config.validate_num_classes(4)


def test_a_config_error_needs_neither_torch_nor_ray(tmp_path):
    """Config errors answer at once: the CLI validates before it imports the heavy libraries."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipelines import cli\n"
        "rc = cli.main(['train', 'configs/smoke.yaml', 'loss.k=40'])\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "loss.k must be < number of classes 20, got 40.0" in out.stderr


def _avgk(*args, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    out = _avgk("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"avgk {version('avgk')}"


def test_avgk_config_prints_the_resolved_config_and_every_key():
    import yaml

    from avgk.config import Config, load_config

    out = _avgk("config", "configs/smoke.yaml", "train.lr=0.01", "train.optimizer=sgd")
    assert out.returncode == 0, out.stderr
    resolved = Config.model_validate(yaml.safe_load(out.stdout))
    assert resolved == load_config(ROOT / "configs" / "smoke.yaml", ["train.lr=0.01", "train.optimizer=sgd"])
    assert resolved.train.weight_decay == 5e-4  # the optimizer's own default, as a run would use it
    keys = _avgk("config", "--keys")
    listed = {line.split()[0] for line in keys.stdout.splitlines() if line and not line.startswith(" ")}
    assert set(Config().flat()) <= listed  # (dict-valued keys such as train.extra_resources flatten to nothing)
    assert "run.resume  (one of auto | never | force, default 'auto')" in keys.stdout


def test_a_bad_backbone_stops_before_any_data_ray_or_mlflow(tmp_path):
    out = _avgk("train", "configs/smoke.yaml", "model.backbone=timm:resnet5", f"run.storage={tmp_path / 'runs'}",
                f"data.shards={tmp_path / 'shards'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "avgk: error: config error: model.backbone='timm:resnet5': timm has no model 'resnet5' "
        "(did you mean resnet50, resnet51q, resnet50t?)"]
    assert list(tmp_path.iterdir()) == []  # no shards, no run folder, no MLflow store


def test_configs_that_ship_with_the_wheel_are_found_outside_a_checkout(tmp_path, monkeypatch):
    """After `pip install`, configs live in <prefix>/share/avgk/configs: the README's paths still work."""
    import shutil
    import sys

    from avgk.config import find_config_file, load_config
    from avgk.experiments.sweep_config import load_sweep

    prefix = tmp_path / "prefix"
    shutil.copytree(ROOT / "configs", prefix / "share" / "avgk" / "configs")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(sys, "base_prefix", str(prefix))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    bundled = prefix / "share" / "avgk" / "configs" / "smoke.yaml"
    for name in ("configs/smoke.yaml", "smoke.yaml", "smoke"):
        assert find_config_file(name) == bundled
    assert load_config("configs/smoke.yaml").run.name == load_config(ROOT / "configs" / "smoke.yaml").run.name
    sweep, base = load_sweep("configs/sweeps/smoke.yaml")  # its base, ../smoke.yaml, resolves in the bundle too
    assert sweep.name == "smoke-sweep" and base.data.synthetic.num_classes == 20
    (elsewhere / "smoke.yaml").write_text("run: {name: mine}\n")  # a local file always wins
    assert load_config("smoke.yaml").run.name == "mine"
    assert find_config_file("nope.yaml") == Path("nope.yaml")
