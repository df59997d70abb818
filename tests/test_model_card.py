"""`flux-jax export` writes a Hub model card (README.md) beside the LoRA: it parses with huggingface_hub, names
FLUX.1-dev as the base (whatever the training base), carries the trigger words, the license and the last validation
grid, and no local path; `--push-to-hub --dry-run` lists exactly what would go up and contacts nothing.

The run is the tiny config's, saved at step 0 (no training step is compiled) in a directory under a "home" whose
name must not leak; its validation output (grid and marker) is written the way the validation hook writes it."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import jax
import numpy as np
import pytest
from huggingface_hub import ModelCard

from flux_jax import cli
from flux_jax.errors import ConfigError
from flux_jax.sampling.images import grid, write_png
from flux_jax.train import hub_push
from flux_jax.train.loop import setup
from flux_jax.train.model_card import FLUX_SCHNELL, OURS, CardFacts, model_card
from flux_jax.train.validation import GRID, MARKER, SAMPLES_DIR
from flux_jax.weights.safetensors_file import SafetensorsFile
from tests.helpers import tiny_lora

PROMPTS = ["ohwx riding a bicycle", "ohwx in the rain"]
TAGS = {"lora", "flux", "text-to-image", "flux-jax"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home_of_me")
    run_dir = home / "runs" / "secret_run"
    cfg = tiny_lora.config(
        run_dir, "checkpoint.async_save=false", "mesh.data=1", "lora.trigger_words=[ohwx, sks]",
        f"validation.prompts={json.dumps(PROMPTS)}", "validation.lora_scale=0.8", f"data.cache_dir={home / 'cache'}",
    )  # fmt: skip
    trainer, state = setup(cfg, devices=jax.devices()[:1], progress=False)
    try:
        trainer.checkpointer.save(state, data_state=trainer.data.get_state(), meta=trainer.meta)
        trainer.checkpointer.wait()
    finally:
        trainer.close()
    # The validation hook's output at step 0 (what `flux_jax.train.validation.Validation` writes), sampled on
    # another base given by an absolute path.
    out = run_dir / SAMPLES_DIR / "0"
    out.mkdir(parents=True)
    images = [np.full((16, 16, 3), v, np.uint8) for v in (0, 80, 160, 240)]
    write_png(out / GRID, grid(images, columns=2), {"step": "0"})
    settings = dict(base=str(home / "my_flux_dev"), width=512, height=512, steps=20, guidance=3.5, cfg=1.0,
                    negative="", lora_scale=0.8, match="diffusers")  # fmt: skip
    (out / MARKER).write_text(json.dumps({"step": 0, "settings": settings, "prompts": PROMPTS, "images": []}))
    return dict(home=home, run=run_dir)


def export(*argv) -> int:
    return cli.main(["export", *map(str, argv)])


def assert_no_local_path(text: str, *places: Path) -> None:
    for place in places:
        assert str(place) not in text and place.name not in text, place
    assert str(Path.home()) not in text
    assert not re.search(r"(?<![\w.:/])/(?:tmp|home|root|Users|var)/", text), text
    assert not re.search(r"[A-Za-z]:\\\\", text)


def test_card_from_a_run(run, tmp_path, capsys):
    out = tmp_path / "my_lora.safetensors"
    assert export(run["run"], out, "--format", "kohya") == 0
    card_file = tmp_path / "README.md"
    card = ModelCard.load(card_file)
    data = card.data.to_dict()
    assert data["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert data["base_model_relation"] == "adapter"
    assert (data["library_name"], data["pipeline_tag"]) == ("diffusers", "text-to-image")
    assert TAGS <= set(data["tags"])
    assert data["instance_prompt"] == "ohwx, sks"
    assert data["license"] == "other" and data["license_name"] == "flux-1-dev-non-commercial-license"
    assert data["license_link"].endswith("FLUX.1-dev/blob/main/LICENSE.md")
    # The grid is copied beside the LoRA and shown by the widget and the body.
    grid_file = tmp_path / "my_lora_grid.png"
    assert grid_file.read_bytes() == (run["run"] / SAMPLES_DIR / "0" / GRID).read_bytes()
    assert data["widget"] == [{"text": PROMPTS[0], "output": {"url": "my_lora_grid.png"}}]
    body = card.text
    assert "](my_lora_grid.png)" in body and "Validation at step 0" in body and "`my_flux_dev`" in body
    # How it was trained, from the run (tiny.yaml: rank 4, alpha 8, 30 planned steps, 16 examples, adamw 1e-3).
    assert "at guidance 1.0." in body and "Dev2Pro recipe" in body
    for row in ("| steps | 0 of 30 |", "| LoRA | rank 4, alpha 8.0 (scale 2.0) |", "| targets | `all_blocks` |",
                "| resolution | 64 |", "| dataset | 16 examples |", "| batch | 8 |",
                "| optimizer | adamw, lr 0.001, constant schedule, weight decay 0.01 |"):  # fmt: skip
        assert row in body, row
    # How to use it, at the validation's scale.
    assert 'pipe.load_lora_weights("my_lora.safetensors")' in body
    assert 'joint_attention_kwargs={"scale": 0.8}' in body and "pipe.fuse_lora(lora_scale=0.8)" in body
    assert "Recommended LoRA scale: **0.8**" in body
    assert "LoraLoaderModelOnly" in body and "ComfyUI/models/loras/" in body
    assert_no_local_path(card_file.read_text(), run["home"], run["run"], tmp_path)
    # The trigger words are in the file too, so a later conversion of it keeps them.
    with SafetensorsFile(out) as f:
        assert f.metadata["modelspec.trigger_phrase"] == "ohwx, sks"
        assert json.loads(f.metadata["flux_jax.meta"])["trigger_words"] == ["ohwx", "sks"]
    assert f"wrote {card_file}" in capsys.readouterr().out


def test_card_of_a_full_metadata_export_is_still_path_free(run, tmp_path):
    out = tmp_path / "full.safetensors"
    assert export(run["run"], out, "--format", "diffusers", "--metadata", "full") == 0
    text = (tmp_path / "README.md").read_text()
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "black-forest-labs/FLUX.1-dev"
    assert_no_local_path(text, run["home"], run["run"], tmp_path)


def test_dry_run_lists_exactly_the_files_and_contacts_nothing(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_unused_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tmp_path / "unrelated.txt").write_text("not for the Hub")
    out = tmp_path / "lora.safetensors"
    assert export(run["run"], out, "--format", "diffusers", "--push-to-hub", "me/my-lora", "--dry-run") == 0
    printed = capsys.readouterr().out
    listed = dict(re.findall(r"(?m)^  (\S+)  ([\d,]+) bytes$", printed))
    want = {"lora.safetensors", "lora_grid.png", "README.md"}
    assert set(listed) == want, printed
    for name in want:
        assert int(listed[name].replace(",", "")) == (tmp_path / name).stat().st_size
    assert "me/my-lora" in printed and "nothing was sent" in printed
    # With a repository named, the card's code loads from it.
    assert 'load_lora_weights("me/my-lora", weight_name="lora.safetensors")' in (tmp_path / "README.md").read_text()

    # Without a card, only the LoRA would go up.
    bare = tmp_path / "bare"
    bare.mkdir()
    argv = [run["run"], bare / "x.safetensors", "--format", "kohya", "--no-card", "--push-to-hub", "me/x", "--dry-run"]
    assert export(*argv) == 0
    assert re.findall(r"(?m)^  (\S+)  ", capsys.readouterr().out) == ["x.safetensors"]
    assert sorted(p.name for p in bare.iterdir()) == ["x.safetensors"]


def test_a_failed_upload_is_one_line_and_the_export_stays(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    calls = []

    def refused(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("[Errno 111] Connection refused")

    monkeypatch.setattr("huggingface_hub.create_repo", refused)
    out = tmp_path / "lora.safetensors"
    assert export(run["run"], out, "--format", "kohya", "--push-to-hub", "me/my-lora") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "me/my-lora: upload failed: [Errno 111]" in err and "kept" in err
    assert calls == ["me/my-lora"] and out.exists() and (tmp_path / "README.md").exists()


def test_push_uploads_only_the_staged_files(tmp_path, monkeypatch):
    """`push` hands upload_folder a folder holding exactly the files named (nothing else of the output dir)."""
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    for name in ("a.safetensors", "README.md", "other.bin"):
        (tmp_path / name).write_text(name)
    seen = {}

    def upload_folder(*, repo_id, folder_path, **kwargs):
        seen.update(repo=repo_id, files={p.name: p.read_text() for p in Path(folder_path).iterdir()})
        return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr("huggingface_hub.create_repo", lambda repo_id, **kw: seen.update(created=(repo_id, kw)))
    monkeypatch.setattr("huggingface_hub.upload_folder", upload_folder)
    uploads = hub_push.plan_upload([tmp_path / "a.safetensors", tmp_path / "README.md"])
    assert hub_push.push(uploads, "me/x", private=True) == "https://hub/commit/1"
    assert seen["files"] == {"a.safetensors": "a.safetensors", "README.md": "README.md"}
    assert seen["created"] == ("me/x", {"repo_type": "model", "private": True, "exist_ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "a.safetensors", "other.bin"]  # stage gone


def test_push_without_a_token_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    (tmp_path / "a.safetensors").write_text("x")
    with pytest.raises(Exception, match=r"no Hugging Face token; set HF_TOKEN or run `hf auth login`"):
        hub_push.push(hub_push.plan_upload([tmp_path / "a.safetensors"]), "me/x")


def test_a_readme_that_is_not_ours_is_kept(run, tmp_path, capsys):
    theirs = tmp_path / "README.md"
    theirs.write_text("# my own notes\n")
    out = tmp_path / "lora.safetensors"
    assert export(run["run"], out, "--format", "kohya") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "README.md exists and was not written by flux-jax" in err
    assert theirs.read_text() == "# my own notes\n" and not out.exists()  # refused before the export
    assert export(run["run"], out, "--format", "kohya", "--no-card") == 0  # --no-card leaves it alone
    assert theirs.read_text() == "# my own notes\n" and not (tmp_path / "lora_grid.png").exists()
    assert export(run["run"], out, "--format", "kohya", "--force") == 0  # --force replaces it
    assert OURS in theirs.read_text()
    # Ours is replaced on the next export without --force.
    assert export(run["run"], tmp_path / "again.safetensors", "--format", "comfy") == 0
    text = theirs.read_text()
    assert "again_grid.png" in text and "diffusers ignores" in text


def test_trigger_flag_overrides_the_config(run, tmp_path):
    out = tmp_path / "lora.safetensors"
    assert export(run["run"], out, "--format", "diffusers", "--trigger", "zxq person", "--trigger", "zxq") == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.instance_prompt == "zxq person, zxq"
    assert "`zxq person`, `zxq`" in card.text and "ohwx, sks" not in card.text
    with SafetensorsFile(out) as f:
        assert f.metadata["modelspec.trigger_phrase"] == "zxq person, zxq"


def test_card_for_a_lora_file(run, tmp_path):
    # Ours: converting an exported file keeps its training summary and trigger words (no run, so no grid).
    first = tmp_path / "first" / "lora.safetensors"
    first.parent.mkdir()
    assert export(run["run"], first, "--format", "kohya", "--no-card") == 0
    again = tmp_path / "again" / "lora.safetensors"
    assert export(first, again, "--format", "diffusers") == 0
    card = ModelCard.load(again.parent / "README.md")
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev" and card.data.instance_prompt == "ohwx, sks"
    assert "| LoRA | rank 4, alpha 8.0 (scale 2.0) |" in card.text and "| steps | 0 of 30 |" in card.text
    assert "widget" not in card.data.to_dict() and not list(again.parent.glob("*.png"))
    assert_no_local_path((again.parent / "README.md").read_text(), run["home"], run["run"], tmp_path)

    # Another trainer's file (no training summary, no trigger words): a minimal card.
    foreign = tmp_path / "foreign.safetensors"
    _as_another_trainers(first, foreign)
    out = tmp_path / "minimal" / "lora.safetensors"
    assert export(foreign, out, "--format", "kohya") == 0
    card = ModelCard.load(out.parent / "README.md")
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev" and TAGS <= set(card.data.tags)
    assert "instance_prompt" not in card.data.to_dict()
    assert "records no flux-jax training run" in card.text and "(rank 4)" in card.text
    assert "Recommended LoRA scale: **1.0**" in card.text


def test_schnell_shaped_lora_names_schnell_and_its_license():
    facts = CardFacts(
        lora_file="s.safetensors", fmt="diffusers", base=FLUX_SCHNELL, trigger_words=(), meta={}, run={}, rank=2
    )
    card = ModelCard(model_card(facts))
    assert card.data.base_model == "black-forest-labs/FLUX.1-schnell" and card.data.license == "apache-2.0"
    assert card.data.license_name is None
    assert "guidance_scale=0.0," in card.text and "num_inference_steps=4," in card.text


def test_flag_misuse_is_one_line(run, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    for argv, message in (
        ([run["run"], out, "--format", "kohya", "--dry-run"], "--private and --dry-run apply to --push-to-hub"),
        ([run["run"], out, "--format", "kohya", "--push-to-hub", "not a repo"], "not a Hub repository id"),
        ([run["run"], out, "--format", "kohya", "--push-to-hub", "just-a-name"], "give the repository as org/name"),
        ([run["run"], out, "--merge-into", out, "--push-to-hub", "me/x"], "--push-to-hub applies to a LoRA export"),
        ([run["run"], out, "--format", "kohya", "--trigger", " "], "--trigger: a trigger word is empty"),
    ):
        assert export(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "README.md").exists()


def test_an_empty_trigger_word_in_the_config_is_an_error():
    with pytest.raises(ConfigError, match=r"lora\.trigger_words\[1\]: is empty"):
        tiny_lora.config(Path("unused"), "lora.trigger_words=[ohwx, ' ']")


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_another_trainers(src: Path, dst: Path) -> None:
    """`src`'s kohya tensors as another trainer would write them: no training summary, no modelspec / ss_* keys.
    Only the model config stays (the tiny model's shapes cannot be guessed from a LoRA; a full-size one's can)."""
    from safetensors.numpy import load_file, save_file

    with SafetensorsFile(src) as f:
        config = f.metadata["flux_jax.config"]
    save_file(load_file(src), dst, metadata={"format": "pt", "flux_jax.config": config})
