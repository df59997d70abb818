"""Run-config loading: every shipped YAML parses, partial files default, and bad input names its key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flux_jax import typed_config
from flux_jax.axes import DEFAULT_RULES
from flux_jax.commands.demo import DEMO_CONFIG
from flux_jax.errors import ConfigError
from flux_jax.run_config import MeshConfig, RunConfig, TrainConfig, from_dict, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/ plus the demo config that ships as package data (flux_jax/assets/demo.yaml).
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml")) + [Path(str(DEMO_CONFIG))]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "path",
    ALL_YAMLS,
    ids=lambda p: str(p.relative_to(CONFIGS)) if p.is_relative_to(CONFIGS) else f"flux_jax/assets/{p.name}",
)
def test_every_shipped_config_parses_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # to_dict is plain YAML data, and loading it back gives the same frozen config.
    again = from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_shipped_configs_exist() -> None:
    names = {p.name for p in ALL_YAMLS}
    assert {"tiny.yaml", "dev2pro_lora.yaml", "demo.yaml"} <= names


def test_tiny_config_values() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.preset == "tiny" and cfg.model.base == ""
    assert (cfg.model.base_dtype, cfg.model.compute_dtype, cfg.model.remat) == ("fp32", "fp32", "auto")
    assert (cfg.lora.rank, cfg.lora.alpha) == (4, 8.0)
    assert (cfg.train.steps, cfg.train.batch_size) == (30, 8)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.mesh.shape == (-1, 1, 1)
    assert cfg.output_dir == "runs/tiny"
    cfg.validate_for_training(require_data=False)


def test_dev2pro_config_values() -> None:
    cfg = load_config(CONFIGS / "dev2pro_lora.yaml")
    assert cfg.train.guidance == 1.0 and cfg.train.timestep_sampling == "flux_shift"
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 16.0)
    assert (cfg.model.base_dtype, cfg.model.compute_dtype, cfg.model.remat) == ("bf16", "bf16", "auto")
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.steps, cfg.train.batch_size) == ("adamw", 1e-4, 1500, 8)
    assert cfg.mesh.shape == (1, -1, 1)
    with pytest.raises(ConfigError, match="data.path"):
        cfg.validate_for_training()
    load_config(CONFIGS / "dev2pro_lora.yaml", ["data.path=/data/x"]).validate_for_training()


def test_partial_and_empty_files_use_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "mesh:\n  data: 2\n  fsdp: -1\ntrain:\n  batch_size: 16\n"))
    assert cfg.mesh.shape == (2, -1, 1) and cfg.mesh.rules == DEFAULT_RULES
    assert cfg.train.batch_size == 16 and cfg.train.steps == TrainConfig().steps
    assert cfg.model == RunConfig().model
    assert load_config(write(tmp_path, "", "empty.yaml")) == RunConfig()
    assert load_config(write(tmp_path, "mesh:\n", "section.yaml")) == RunConfig()


def test_defaults_need_base_at_train_time() -> None:
    with pytest.raises(ConfigError, match="model.base is empty"):
        RunConfig().validate_for_training(require_data=False)
    bad = from_dict({"model": {"preset": "nope"}})
    with pytest.raises(ConfigError, match="'nope' is not one of"):
        bad.validate_for_training(require_data=False)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("trian:\n  steps: 3\n", "trian"),
        ("train:\n  stepz: 3\n", "train.stepz"),
        ("lora:\n  rank: 4\n  rnak: 8\n", "lora.rnak"),
    ],
)
def test_unknown_keys_name_full_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"unknown key {key!r}" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_key_suggests_the_close_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(write(tmp_path, "train:\n  stepz: 3\n"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  steps: ten\n", r"train.steps: expected int, got str"),
        ("train:\n  steps: 2.5\n", r"train.steps: expected int, got float"),
        ("train:\n  steps: true\n", r"train.steps: expected int, got bool"),
        ("checkpoint:\n  async_save: 1\n", r"checkpoint.async_save: expected bool"),
        ("model:\n  base: 3\n", r"model.base: expected str"),
        ("model:\n  base: null\n", r"model.base: expected str, got NoneType"),
        ("model:\n  base_dtype: fp16\n", r"model.base_dtype: must be one of 'fp32', 'bf16', 'fp8'"),
        ("train:\n  timestep_sampling: sigmoid\n", r"train.timestep_sampling: must be one of"),
        ("train:\n  guidance_range: [1.0]\n", r"train.guidance_range: expected 2 items"),
        ("train:\n  guidance_range: [1.0, x]\n", r"train.guidance_range\[1\]: expected float"),
        ("lora:\n  blocks: [1, a]\n", r"lora.blocks"),
        ("lora:\n  targets: 3\n", r"lora.targets: expected"),
        ("mesh: 3\n", r"mesh: expected a mapping"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_wrong_types_are_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_numeric_coercions(tmp_path: Path) -> None:
    # int for a float field, and PyYAML's `1e-4` (read as a string under YAML 1.1) for a float field.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-4\n  weight_decay: 0\nlora:\n  alpha: 8\n"))
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)
    cfg = load_config(write(tmp_path, "train:\n  guidance_range: [1, 4]\noptim:\n  clip_norm: null\n"))
    assert cfg.train.guidance_range == (1.0, 4.0) and cfg.optim.clip_norm is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  steps: 0\n", r"train.steps: must be >= 1"),
        ("train:\n  batch_size: 6\n  grad_accum: 4\n", r"train.batch_size: 6 is not divisible by grad_accum"),
        ("mesh:\n  data: -1\n  fsdp: -1\n", r"mesh.fsdp: at most one mesh axis may be -1"),
        ("mesh:\n  tensor: 0\n", r"mesh.tensor: must be a positive int or -1"),
        ("mesh:\n  rules: [[embed, model]]\n", r"mesh.rules: .*unknown mesh axis 'model'"),
        ("mesh:\n  rules: [[embed, fsdp], [embed, null]]\n", r"mesh.rules: .*more than one"),
        ("optim:\n  lr: -1\n", r"optim.lr: must be > 0"),
        ("optim:\n  ema_decay: 1.5\n", r"optim.ema_decay"),
        ("lora:\n  rank: 0\n", r"lora.rank: must be >= 1"),
        ("data:\n  resolution: 500\n", r"data.resolution: must be a positive multiple of 16"),
        ("train:\n  guidance_range: [4, 1]\n", r"train.guidance_range: low must be <= high"),
    ],
)
def test_out_of_range_values_are_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 5\nmodel:\n  preset: tiny\n")
    cfg = load_config(
        path,
        [
            "train.steps=10",
            "lora.targets=[a, 'b.*']",
            "mesh.data=-1",
            "mesh.fsdp=2",
            "model.preset=null",
            "model.base=",
            "optim.lr=3e-4",
            "train.guidance_range=[1, 4]",
            "mesh.rules=[[embed, fsdp], [act_batch, [data, fsdp]]]",
            "output_dir=runs/x",
        ],
    )
    assert cfg.train.steps == 10
    assert cfg.lora.targets == ("a", "b.*")
    assert cfg.mesh.shape == (-1, 2, 1)
    assert cfg.model.preset is None and cfg.model.base == ""
    assert cfg.optim.lr == 3e-4
    assert cfg.train.guidance_range == (1.0, 4.0)
    assert cfg.mesh.rules == (("embed", "fsdp"), ("act_batch", ("data", "fsdp")))
    assert cfg.output_dir == "runs/x"


def test_section_override_merges(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  steps: 5\n"), ["train={batch_size: 4}"])
    assert (cfg.train.steps, cfg.train.batch_size) == (5, 4)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.stepz=3", r"override 'train.stepz=3': unknown key 'train.stepz'"),
        ("trian.steps=3", r"override 'trian.steps=3': unknown key 'trian'"),
        ("train.steps.x=3", r"train.steps is not a section"),
        ("train.steps", r"not of the form key.path=value"),
        ("train.steps=abc", r"override 'train.steps=abc': train.steps: expected int"),
        ("mesh.data=0", r"override 'mesh.data=0': mesh.data: must be a positive int"),
        ("lora.targets=[a, [b]]", r"override 'lora.targets=\[a, \[b\]\]'"),
    ],
)
def test_bad_overrides_name_the_override(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, "train:\n  steps: 5\n"), [override])


def test_parse_override_values() -> None:
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override("lora.targets=[a,b]") == ("lora.targets", ["a", "b"])
    assert parse_override("mesh.data=-1") == ("mesh.data", -1)
    assert parse_override("model.base=a=b") == ("model.base", "a=b")


def test_configs_are_frozen_and_hashable() -> None:
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]
    assert hash(cfg) == hash(RunConfig())
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=7))
    assert changed.train.steps == 7 and cfg.train.steps == TrainConfig().steps


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="at most one mesh axis"):
        MeshConfig(data=-1, fsdp=-1)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train: [\n"))


# -- non-finite numbers, duplicate keys, files that are not YAML text (issue 16, cases 4, 7 and 8) --------------


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("optim:\n  lr: .inf\n", "optim.lr", "inf"),
        ("optim:\n  lr: -.inf\n", "optim.lr", "-inf"),
        ("optim:\n  b2: .nan\n", "optim.b2", "nan"),
        ("optim:\n  lr: 1e999\n", "optim.lr", "'1e999'"),  # a YAML 1.1 string that float() reads as inf
        ("lora:\n  alpha: .inf\n", "lora.alpha", "inf"),
        ("optim:\n  clip_norm: .inf\n", "optim.clip_norm", "inf"),  # float | None
        ("train:\n  guidance_range: [1.0, .inf]\n", "train.guidance_range[1]", "inf"),  # inside a tuple
    ],
)
def test_non_finite_numbers_are_errors(tmp_path: Path, text: str, key: str, value: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {key}: must be a finite number, got {value}"
    assert err.value.key == key


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.NaN", "optim={lr: .inf}"])
def test_non_finite_overrides_name_the_override(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "optim:\n  lr: 1.0e-4\n"), [override])
    assert str(err.value).startswith(f"override {override!r}: optim.lr: must be a finite number")


def test_non_finite_numbers_are_refused_when_building_from_data() -> None:
    with pytest.raises(ConfigError, match=r"optim.lr: must be a finite number, got nan"):
        from_dict({"optim": {"lr": float("nan")}})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A second `train:` section used to replace the first (batch_size 8 silently became the default).
        (
            "train:\n  batch_size: 8\n  steps: 3\noptim:\n  lr: 1.0e-4\ntrain:\n  steps: 5\n",
            "duplicate key 'train' on line 6 (first on line 1)",
        ),
        ("optim:\n  lr: 1.0e-4\n  b1: 0.9\n  lr: 3.0e-4\n", "duplicate key 'lr' on line 4 (first on line 2)"),
        ("mesh: {data: 1, fsdp: 2, data: 4}\n", "duplicate key 'data' on line 1 (first on line 1)"),
        ("lora:\n  targets: [attn]\n  rank: 4\n  rank: 4\n", "duplicate key 'rank' on line 4 (first on line 3)"),
    ],
)
def test_duplicate_keys_are_errors_naming_both_lines(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_duplicate_keys_in_an_override_value_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'train=\{steps: 1, steps: 2\}': duplicate key 'steps'"):
        load_config(write(tmp_path, "train:\n  steps: 5\n"), ["train={steps: 1, steps: 2}"])


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """`<<: *anchor` then an explicit key is YAML's way to override: not a duplicate."""
    text = "x-opt: &opt {lr: 1.0e-4, b1: 0.8}\n"
    cfg = typed_config.read_yaml_file(write(tmp_path, text + "optim:\n  <<: *opt\n  lr: 2.0e-4\n"))
    assert cfg["optim"] == {"lr": 2.0e-4, "b1": 0.8}


def test_yaml_is_still_read_safely(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_config(write(tmp_path, "model:\n  base: !!python/object/apply:os.system [echo hi]\n"))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "not a YAML text file (not UTF-8: byte 0x89 at offset 0)"),
        (b"train:\n  steps: 3\n\x00\x01\x02", "not a YAML text file (character #x00 at offset 18"),
    ],
)
def test_a_binary_config_file_is_one_line(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "photo.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(err.value)


def test_invalid_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 3\n  batch_size: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: invalid YAML at line 4, column 1:")
    assert "\n" not in str(err.value)
