"""Validation during training on the tiny Flux over the 8 fake CPU devices: it never changes the LoRA (bit for bit),
its pictures reach samples/<step>/ and TensorBoard, its held-out loss is eval_loss at fixed noise and timesteps,
stopped and killed runs resume its schedule with no step repeated or missing, another base is sampled with the
trained LoRA on it, and bad settings name their key."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from PIL import Image

from flux_jax.data.encoding import resolve_encoder_paths
from flux_jax.data.examples import BatchIterator, CachedExamples, synthetic_examples, write_cached_examples
from flux_jax.dtypes import FP8
from flux_jax.errors import CheckpointError, ConfigError, DataError
from flux_jax.model.config import FluxConfig, preset
from flux_jax.model.flux import Flux
from flux_jax.model.lora import lora_modules, remove_lora
from flux_jax.run_config import ModelConfig, load_config
from flux_jax.sampling.images import read_png_text
from flux_jax.sampling.loading import load_transformer, load_vae_for
from flux_jax.sampling.prompts import PromptEncoder
from flux_jax.sampling.sampler import FluxSampler, SampleSettings
from flux_jax.sharding import batch_sharding
from flux_jax.train.build import Adapters, lora_model
from flux_jax.train.loop import TrainResult, setup
from flux_jax.train.state import split_trainable
from flux_jax.train.step import STEP_KEYS, eval_loss
from flux_jax.train.validation import MARKER, SAMPLES_DIR, sampling_graphdef
from flux_jax.weights.writers import write_flux_bfl
from tests.helpers.compile_cache import child_env
from tests.helpers.gcs_server import fake_gcs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY = 8, 4
VALIDATED = [0, 4, 8]
# data=2 x fsdp=4 as in test_train_loop.py / test_train_resume.py: the same train step, compiled once per session.
COMMON = [
    f"train.steps={STEPS}",
    "checkpoint.every=4",
    "checkpoint.async_save=false",
    "mesh.data=2",
    "mesh.fsdp=4",
    "log.tensorboard=false",
]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("train_compile_cache")]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """16 held-out examples shaped for the tiny model (another draw than the training set)."""
    m = preset("tiny")
    source = synthetic_examples(
        in_channels=m.in_channels, context_dim=m.context_in_dim, vec_dim=m.vec_in_dim, resolution=64, seed=7
    )
    return write_cached_examples(tmp_path_factory.mktemp("heldout") / "examples", source.examples)


def config(out: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={out}", *COMMON, *overrides])


PROMPTS = ["a red cat", "a blue dog"]
SEEDS = [0, 5]
SIZE = 32


def validation_args(heldout: Path | None, *extra: str) -> list[str]:
    """Validation every 4 steps: 2 prompts x 2 seeds at 32 x 32 px in 2 steps (one sampler call of 4 images), the
    encoders in fp32 like the tiny run, and the held-out loss when ``heldout`` is given."""
    return [
        f"validation.every={EVERY}",
        f"validation.prompts={PROMPTS}",
        f"validation.seeds={SEEDS}",
        f"validation.width={SIZE}",
        f"validation.height={SIZE}",
        "validation.steps=2",
        "encoders.dtype=fp32",
        *([f"validation.loss_cache={heldout}"] if heldout is not None else []),
        *extra,
    ]


def run(cfg, hooks=()) -> tuple[TrainResult, object]:
    """Train ``cfg`` with extra ``(hook, every)`` pairs added after the trainer's own; returns (result, trainer)."""
    trainer, state = setup(cfg, progress=False)
    for hook, every in hooks:
        trainer.add_hook(hook, every=every)
    return trainer.run(state), trainer


def validation_of(trainer):
    (hook,) = [h for h, _ in trainer.hooks if type(h).__name__ == "Validation"]
    return hook


def host_lora(result: TrainResult) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in result.state.lora.items()}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def validation_records(out: Path) -> list[dict]:
    return [r for r in records(out) if "validation_time" in r]


def marker_steps(out: Path) -> list[int]:
    root = out / SAMPLES_DIR
    return sorted(int(p.name) for p in root.iterdir() if (p / MARKER).is_file()) if root.exists() else []


class Recorder:
    """A hook that only records the steps it was called at."""

    def __init__(self):
        self.steps: list[int] = []

    def __call__(self, step, state):
        self.steps.append(step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run without validation (and a recording hook every 3 steps, which changes nothing either)."""
    out = tmp_path_factory.mktemp("reference")
    recorder = Recorder()
    result, _ = run(config(out), hooks=[(recorder, 3)])
    assert result.step == STEPS
    return out, result, recorder


def test_a_hook_runs_at_step_0_every_n_steps_and_at_the_last_step(reference):
    _, _, recorder = reference
    assert recorder.steps == [0, 3, 6, 8]


@pytest.fixture(scope="module")
def validated(tmp_path_factory, heldout):
    """The same run with validation on (pictures, loss, TensorBoard) and a slow hook at the validation steps."""
    out = tmp_path_factory.mktemp("validated")

    def slow(step, state):
        time.sleep(SLOW)

    cfg = config(out, *validation_args(heldout), "log.tensorboard=true")
    result, trainer = run(cfg, hooks=[(slow, EVERY)])
    return out, result, trainer


SLOW = 2.0


def test_validation_does_not_change_the_lora_bit_for_bit(reference, validated):
    want, got = host_lora(reference[1]), host_lora(validated[1])
    assert want.keys() == got.keys()
    assert not np.allclose(want["double_blocks.img_attn.qkv.lora.lora_b"], 0)  # it trained
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert validated[1].last_loss == reference[1].last_loss


def images_of(out: Path, step: int) -> dict[tuple[int, int], np.ndarray]:
    return {
        (i, seed): np.asarray(Image.open(out / SAMPLES_DIR / str(step) / f"{i}_seed{seed}.png"))
        for i in range(len(PROMPTS))
        for seed in SEEDS
    }


def test_validation_runs_at_step_0_and_every_n_steps_with_its_time_apart(validated, heldout):
    out, _, trainer = validated
    validation = validation_of(trainer)
    assert validation.runs == VALIDATED
    assert validation.sampler.traces == 1  # one compile of the denoising loop for every validation step
    assert marker_steps(out) == VALIDATED
    vals = validation_records(out)
    assert [r["step"] for r in vals] == VALIDATED
    assert all(r["validation_time"] > 0 for r in vals)
    train = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # each step once
    # The hooks' time (validation and a 2 s sleep at step 4) is in no step's step_time.
    step_time = {r["step"]: r.get("step_time") for r in train}
    assert step_time[5] is not None and step_time[5] < SLOW, step_time
    marker = json.loads((out / SAMPLES_DIR / "4" / MARKER).read_text())
    assert marker["step"] == 4 and marker["val_loss"] == vals[1]["val_loss"]
    assert marker["prompts"] == PROMPTS
    assert marker["images"] == [f"{i}_seed{s}.png" for i in range(len(PROMPTS)) for s in SEEDS]
    assert marker["settings"] == {
        "base": "random:tiny", "width": SIZE, "height": SIZE, "steps": 2, "guidance": 3.5, "cfg": 1.0,
        "negative": "", "lora_scale": 1.0, "match": "diffusers", "loss_cache": str(heldout),
        "loss_batches": 1, "loss_seed": 0,
    }  # fmt: skip


def test_each_validation_step_writes_pngs_with_their_settings_and_a_prompts_by_seeds_grid(validated):
    out, _, _ = validated
    for step in VALIDATED:
        images = images_of(out, step)
        for (i, seed), image in images.items():
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            text = read_png_text(out / SAMPLES_DIR / str(step) / f"{i}_seed{seed}.png")
            assert (text["prompt"], text["seed"], text["step"]) == (PROMPTS[i], str(seed), str(step))
            assert (text["steps"], text["guidance"], text["cfg"], text["match"]) == ("2", "3.5", "1.0", "diffusers")
            assert text["base"] == "random:tiny" and text["lora_scale"] == "1.0"
        tiles = np.asarray(Image.open(out / SAMPLES_DIR / str(step) / "grid.png"))
        pitch = SIZE + 2  # 2 px of black between tiles
        assert tiles.shape == (2 * SIZE + 2, 2 * SIZE + 2, 3)
        for (i, seed), image in images.items():  # prompts down, seeds across
            r, c = i * pitch, SEEDS.index(seed) * pitch
            np.testing.assert_array_equal(tiles[r : r + SIZE, c : c + SIZE], image)
        # Different seeds are different noise, and the prompts condition the picture.
        assert not np.array_equal(images[(0, SEEDS[0])], images[(0, SEEDS[1])])
        assert not np.array_equal(images[(0, SEEDS[0])], images[(1, SEEDS[0])])
    # The LoRA moves the pictures as it trains (step 0 is the base's: the adapters start at zero).
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(images_of(out, 0).values(), images_of(out, STEPS).values(), strict=True)
    )


def tensorboard_events(out: Path) -> list:
    """Every Event of the run's TensorBoard files, read straight from the TFRecord framing (length, CRC, data,
    CRC) with tensorboardX's Event proto: no TensorFlow import needed."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_tensorboard_events_hold_the_images_and_the_validation_scalars(validated):
    out, _, _ = validated
    events = tensorboard_events(out)
    images: dict[tuple[str, int], np.ndarray] = {}
    scalars: dict[tuple[str, int], float] = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("image"):
                images[(value.tag, event.step)] = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
            elif value.HasField("simple_value"):
                scalars[(value.tag, event.step)] = value.simple_value
    want = {(f"samples/{i}_seed{seed}", step) for step in VALIDATED for i in range(len(PROMPTS)) for seed in SEEDS}
    assert set(images) == want
    for step in VALIDATED:  # the very pixels of the PNG files
        for (i, seed), image in images_of(out, step).items():
            np.testing.assert_array_equal(images[(f"samples/{i}_seed{seed}", step)], image)
    vals = {r["step"]: r["val_loss"] for r in validation_records(out)}
    for step in VALIDATED:
        assert scalars[("validation/val_loss", step)] == pytest.approx(vals[step], rel=1e-6)
        assert ("validation/validation_time", step) in scalars
    assert ("train/loss", STEPS) in scalars


def test_validation_loss_is_eval_loss_at_fixed_noise_and_timesteps(validated, heldout):
    out, result, trainer = validated
    vals = {r["step"]: r["val_loss"] for r in validation_records(out)}
    assert all(np.isfinite(v) for v in vals.values())
    assert len(set(vals.values())) == len(vals)  # the LoRA changes, so does its loss
    # By hand: the first batch of the held-out set in loss_seed 0's order, sample i drawing from
    # fold_in(fold_in(key(0), batch 0), i), for the final LoRA.
    source = CachedExamples(heldout)
    batch = next(BatchIterator(source, batch_size=8, seed=0))
    sharding = batch_sharding(trainer.mesh)  # placed as the hook places it: the same program, compiled once
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items() if k in STEP_KEYS}
    c = trainer.step
    loss = jax.jit(functools.partial(eval_loss, c.graphdef, c.template, objective=c.objective))
    want = loss(trainer.frozen, result.state.lora, batch, jax.random.fold_in(jax.random.key(0), 0))
    assert vals[STEPS] == pytest.approx(float(want), rel=1e-5)


class Stopper:
    """Sends this process SIGTERM in the hook of ``at``: the trainer then stops at the next step and saves."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, step, state):
        if step == self.at:
            signal.raise_signal(signal.SIGTERM)


class Killed(Exception):
    pass


def crash_at(at: int):
    def crash(step, state):
        if step == at:
            raise Killed(f"killed at step {step}, after its validation, before its checkpoint")

    return crash


def test_stopped_and_killed_runs_continue_the_validation_schedule_exactly(tmp_path, heldout, reference):
    out = tmp_path / "run"
    cfg = config(out, *validation_args(heldout))
    # 1. SIGTERM during step 3: the run stops at step 4 and saves it, skipping step 4's validation.
    first, trainer = run(cfg, hooks=[(Stopper(3), 1)])
    assert first.preempted and first.step == 4
    assert validation_of(trainer).runs == [0] and marker_steps(out) == [0]
    # 2. Resumed at 4: step 4's validation is due and missing, so it runs first. Then the run dies at step 8
    #    after validating it, before its checkpoint: the latest checkpoint stays at step 4.
    trainer, state = setup(cfg, progress=False)
    trainer.add_hook(crash_at(8), every=EVERY)
    with pytest.raises(Killed):
        trainer.run(state)
    assert validation_of(trainer).runs == [4, 8] and marker_steps(out) == VALIDATED
    # 3. Resumed at 4 again: step 4 is done (no repeat); steps 5..8 run again, and so does step 8's validation.
    last, trainer = run(cfg)
    assert last.step == STEPS and not last.preempted
    assert validation_of(trainer).runs == [8]
    assert marker_steps(out) == VALIDATED
    assert [r["step"] for r in validation_records(out)] == VALIDATED  # each validation step logged once
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, STEPS + 1))
    want = host_lora(reference[1])
    for k, v in host_lora(last).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


# --------------------------------------------------------------------------------------------------
# Another base


def random_base(config: FluxConfig, seed: int) -> Flux:
    """A random Flux of ``config`` (fp32) with numpy weights: building it with jax.random costs a compile."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = {
        path: var.replace(jax.numpy.asarray(0.1 * rng.standard_normal(var.shape), var.dtype))
        for path, var in nnx.to_flat_state(abstract)
    }
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A second tiny random base, written as a BFL single file like a downloaded Flux.1-dev."""
    return write_flux_bfl(random_base(preset("tiny"), seed=11), tmp_path_factory.mktemp("other") / "other.safetensors")


def sample_alone(base: Path, cfg, mesh, tmp_path: Path) -> dict[tuple[int, int], np.ndarray]:
    """The pictures of ``base`` with no LoRA, drawn by the sampler alone: each prompt and seed on its own."""
    paths, _ = resolve_encoder_paths(cfg, tmp_path / "encoders")
    encoder = PromptEncoder.load(paths, mesh=mesh, dtype="fp32")
    model = load_transformer(str(base), dtype="fp8", compute_dtype="fp32", mesh=mesh)
    sampler = FluxSampler.from_model(model, load_vae_for(paths, dtype="fp32", mesh=mesh), mesh=mesh, dtype="fp32")
    out = {}
    for i, prompt in enumerate(PROMPTS):
        text = encoder.encode([prompt])
        for seed in SEEDS:
            settings = SampleSettings(width=SIZE, height=SIZE, steps=2, guidance=3.5, cfg=1.0, seed=seed)
            out[(i, seed)] = sampler.images(text, settings)[0]
    return out


def test_validation_on_another_base_samples_it_with_the_lora_and_trains_the_same(
    tmp_path, other_base, reference, validated
):
    out = tmp_path / "run"
    # base_dtype fp8, the default: the other base's kernels are stored float8 (the training base stays fp32).
    cfg = config(out, *validation_args(None, f"validation.base={other_base}"))
    assert cfg.validation.base_dtype == "fp8"
    result, trainer = run(cfg)
    want = host_lora(reference[1])
    for k, v in host_lora(result).items():  # training did not change
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert marker_steps(out) == VALIDATED
    assert json.loads((out / SAMPLES_DIR / "0" / MARKER).read_text())["settings"]["base"] == str(other_base)
    sampler = validation_of(trainer).sampler
    kernel = sampler.params[0]["double_blocks"]["img_attn"]["qkv"]["kernel"].get_value()
    assert kernel.dtype == FP8 and kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")  # sharded as trained
    # Step 0 (the adapters are still zero): exactly the other base's own pictures, not the training base's.
    before = images_of(out, 0)
    alone = sample_alone(other_base, cfg, trainer.mesh, tmp_path)
    training_base = images_of(validated[0], 0)
    for key, image in before.items():
        # The other base's pictures, up to float rounding: the validation program carries the zero adapters (split
        # over fsdp), the lone sampler does not, and XLA's CPU code for the two may order a sum differently, so an
        # ulp can flip one pixel's rounding to uint8 (seen on CI: one value of 3072 off by one). The training
        # base's pictures are more than 10 levels away on average (below).
        diff = np.abs(image.astype(int) - alone[key])
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.01 * diff.size, (key, diff.max(), np.count_nonzero(diff))
        assert np.abs(image.astype(int) - training_base[key]).mean() > 10, key
    # The trained LoRA is on it: the pictures move from step 0 to the last step.
    after = images_of(out, STEPS)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_lora_scale_multiplies_the_adapters_in_the_sampling_copy_only():
    m = preset("tiny")
    model_cfg = ModelConfig(base_dtype="fp32", compute_dtype="fp32")
    # Shapes only, then random weights from numpy (compiling the random init costs more than this whole test); a
    # nonzero B, so the adapters change the output. Masks are 1: every block trains.
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: lora_model(m, model_cfg, Adapters(4, 8.0, "all_blocks", None, "fp32"), seed=0)[0])
    )
    rng = np.random.default_rng(0)

    def fill(path, var):
        value = np.ones(var.shape) if path[-1] == "mask" else 0.1 * rng.standard_normal(var.shape)
        return var.replace(jax.numpy.asarray(value, var.dtype))

    state = nnx.from_flat_state({path: fill(path, var) for path, var in nnx.to_flat_state(abstract)})
    graphdef, lora, rest = split_trainable(nnx.merge(graphdef, state))
    keys = jax.random.split(jax.random.key(1), 3)
    inputs = (
        jax.random.normal(keys[0], (1, 16, m.in_channels)),  # img: 4 x 4 tokens
        jax.numpy.zeros((16, 3)),
        jax.random.normal(keys[1], (1, 8, m.context_in_dim)),  # txt
        jax.numpy.zeros((8, 3)),
        jax.numpy.full((1,), 0.5),  # t
        jax.random.normal(keys[2], (1, m.vec_in_dim)),  # y
        jax.numpy.full((1,), 3.5),  # guidance
    )

    def velocity(graph) -> np.ndarray:
        return np.asarray(jax.jit(lambda lo, re: nnx.merge(graph, lo, re)(*inputs))(lora, rest))

    def alphas(graph) -> set[float]:
        return {linear.lora.alpha for _, linear in lora_modules(nnx.merge(graph, lora, rest))}

    scaled = {s: sampling_graphdef(graphdef, (lora, rest), lora_scale=s) for s in (0.0, 1.0, 2.0)}
    assert [alphas(scaled[s]) for s in (0.0, 1.0, 2.0)] == [{0.0}, {8.0}, {16.0}]
    assert alphas(graphdef) == {8.0}  # the trainer's graphdef is untouched
    base = nnx.merge(graphdef, lora, rest)
    remove_lora(base)
    alone = np.asarray(jax.jit(lambda st: nnx.merge(nnx.graphdef(base), st)(*inputs))(nnx.state(base)))
    np.testing.assert_array_equal(velocity(scaled[0.0]), alone)  # scale 0: the base alone
    np.testing.assert_array_equal(velocity(scaled[1.0]), velocity(graphdef))  # scale 1: the trained LoRA as is
    assert np.abs(velocity(scaled[1.0]) - velocity(scaled[0.0])).max() > 1e-3  # and the adapters do something


# --------------------------------------------------------------------------------------------------
# A run directory in a bucket (the local GCS server of tests/helpers/fake_gcs.py, as in test_remote_run_dir.py)

BUCKET = "flux-jax-validation"


@pytest.fixture(scope="module")
def gcs_env(tmp_path_factory) -> dict[str, str]:
    with fake_gcs(BUCKET) as url:
        yield child_env(
            tmp_path_factory.getbasetemp() / "train-xla-cache",  # what this module's in-process runs compiled
            EPATH_USE_TF="false",
            STORAGE_EMULATOR_HOST=url,
            TENSORSTORE_GCS_HTTP_URL=url,
            GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
            GOOGLE_CLOUD_PROJECT="test",
        )


# Run in a child with the emulator's environment: the run's sample files, markers, metrics and TensorBoard files.
READ_SAMPLES = """
import io, json, sys
import numpy as np
from etils import epath
from PIL import Image

root = epath.Path(sys.argv[1])
samples = root / "samples"
files = sorted(f"{d.name}/{f.name}" for d in samples.iterdir() for f in d.iterdir())
markers = {d.name: json.loads((d / "validation.json").read_text()) for d in samples.iterdir()}
pixels = {name: np.asarray(Image.open(io.BytesIO((samples / name).read_bytes()))).tolist()
          for name in files if name.endswith("seed0.png")}
metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
events = [p.name for p in (root / "tensorboard").iterdir()]
print(json.dumps({"files": files, "markers": markers, "pixels": pixels, "metrics": metrics, "events": events}))
"""


def test_validation_writes_to_a_gs_run_dir_and_resumes_there(gcs_env, heldout, validated):
    run = f"gs://{BUCKET}/runs/validated"

    def train(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "flux_jax.cli", "train", "--config", str(TINY), f"output_dir={run}", *COMMON,
               f"train.steps={steps}", "log.tensorboard=true", *validation_args(heldout), "--no-progress"]  # fmt: skip
        done = subprocess.run(cmd, env=gcs_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = train(EVERY)  # validates 0 and 4
    assert "validation at step 4" in first.stderr
    second = train(STEPS)  # resumes at 4: validated there already (the marker is in the bucket), then 8
    assert "resuming from" in second.stderr and "validation at step 4" not in second.stderr, second.stderr[-3000:]
    assert "validation at step 8" in second.stderr
    done = subprocess.run([sys.executable, "-c", READ_SAMPLES, run], env=gcs_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    names = sorted(f"{i}_seed{s}.png" for i in range(len(PROMPTS)) for s in SEEDS) + ["grid.png", MARKER]
    assert got["files"] == sorted(f"{step}/{name}" for step in map(str, VALIDATED) for name in names)
    assert sorted(int(k) for k in got["markers"]) == VALIDATED
    assert [r["step"] for r in got["metrics"] if "validation_time" in r] == VALIDATED
    assert any(name.startswith("events.out.tfevents") for name in got["events"])
    local = images_of(validated[0], 0)  # the same run in a local directory: the same pictures
    for i in range(len(PROMPTS)):
        np.testing.assert_array_equal(np.asarray(got["pixels"][f"0/{i}_seed0.png"], np.uint8), local[(i, 0)])


def test_another_base_of_another_architecture_is_refused_before_it_is_loaded(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    wider = dataclasses.replace(preset("tiny"), depth=1, hidden_size=96, num_heads=4, axes_dim=(8, 8, 8))
    base = write_flux_bfl(random_base(wider, seed=0), tmp_path / "wider.safetensors")
    cfg = config(tmp_path / "run", *validation_args(None, f"validation.base={base}"))
    with pytest.raises(ConfigError) as e:
        setup(cfg, progress=False)
    assert e.value.key == "validation.base", str(e.value)
    assert str(e.value) == (
        f"validation.base: {base} is another architecture than the training base, so the LoRA does not fit it: "
        "hidden_size 96 (training base: 64), depth 1 (training base: 2), axes_dim (8, 8, 8) (training base: (4, 6, 6))"
    )
    assert "validation: loading base" not in caplog.text


# --------------------------------------------------------------------------------------------------
# Config errors name the key


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("validation.width=40", "validation.width", "multiple of 16"),
        ("validation.height=0", "validation.height", "multiple of 16"),
        ("validation.steps=0", "validation.steps", ">= 1"),
        ("validation.match=automatic1111", "validation.match", "'diffusers', 'comfyui', 'bfl'"),
        ("validation.base_dtype=int8", "validation.base_dtype", "'fp32', 'bf16', 'fp8'"),
        ("validation.cfg=0.5", "validation.cfg", ">= 1"),
        ("validation.seeds=[]", "validation.seeds", "at least one seed"),
        ("validation.seeds=[-1]", "validation.seeds[0]", "[0, 2**64)"),
        ("validation.prompts=['a cat', ' ']", "validation.prompts[1]", "is empty"),
        ("validation.every=-2", "validation.every", ">= 0"),
        ("validation.loss_batches=0", "validation.loss_batches", ">= 1"),
    ],
)
def test_a_bad_validation_setting_names_its_key(override, key, message):
    with pytest.raises(ConfigError, match="validation") as e:
        load_config(TINY, ["validation.prompts=['a cat']", override])
    assert e.value.key == key and message in str(e.value), str(e.value)
    assert f"override {override!r}" in str(e.value)


def test_validation_is_off_by_default_and_needs_something_to_validate():
    assert not load_config(TINY).validation.enabled
    assert not load_config(TINY, ["validation.every=0", "validation.prompts=['a cat']"]).validation.enabled
    with pytest.raises(ConfigError, match="nothing to validate") as e:
        load_config(TINY, ["validation.every=10"])
    assert e.value.key == "validation.every"
    with pytest.raises(ConfigError, match="not both") as e:
        load_config(TINY, ["validation.every=10", "validation.prompts=['a']", "validation.prompts_file=p.txt"])
    assert e.value.key == "validation.prompts_file"


def test_a_missing_prompts_file_or_loss_cache_fails_before_the_model_is_built(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for override, key in (
        (f"validation.prompts_file={tmp_path / 'nope.txt'}", "validation.prompts_file"),
        (f"validation.loss_cache={tmp_path / 'nope'}", "validation.loss_cache"),
    ):
        cfg = config(tmp_path / key, "validation.every=2", override)
        with pytest.raises(ConfigError) as e:
            setup(cfg, progress=False)
        assert e.value.key == key and str(tmp_path / "nope") in str(e.value)
    (tmp_path / "not-a-cache").mkdir()
    with pytest.raises(DataError, match=r"validation.loss_cache: .*not-a-cache: no complete cache here"):
        setup(config(tmp_path / "c", "validation.every=2", f"validation.loss_cache={tmp_path / 'not-a-cache'}"))
    (tmp_path / "not-a-base.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match=r"^validation.base: .*not-a-base.safetensors"):
        setup(
            config(
                tmp_path / "b",
                "validation.every=2",
                "validation.prompts=['a']",
                f"validation.base={tmp_path / 'not-a-base.safetensors'}",
            )
        )
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        setup(config(tmp_path / "e", "validation.every=2", f"validation.prompts_file={tmp_path / 'empty.txt'}"))
    assert "building a random" not in caplog.text
