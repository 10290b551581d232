"""Every model source through the real loader: diffusers directory, BFL single file, HF cache, tiny-random,
and the bad sources a user can hand us (each a ModelLoadError naming the file and what was expected)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kleinserve.engine import Pipeline, latents, load_pipeline
from kleinserve.engine.checkpoints import bfl_to_diffusers_transformer, diffusers_to_bfl_transformer
from kleinserve.engine.loading import inspect_source, resolve_source
from kleinserve.engine.tiny import BFL_TINY_FILE
from kleinserve.errors import ModelLoadError
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference

REQUEST = GenerateRequest(prompt="a red fox in the snow", width=64, height=64, seed=3)
TRANSFORMER_FILE = Path("transformer") / "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = Path("text_encoder") / "model.safetensors"
VAE_FILE = Path("vae") / "diffusion_pytorch_model.safetensors"


def load(model: str, **options: object) -> Pipeline:
    """Pipelines compared pixel for pixel compute in fp32, like the session `pipeline`."""
    return load_pipeline(model, dtype="float32", **options)


def file_values(path: Path, keep: Callable[[str], bool] = lambda key: True) -> int:
    """Number of values stored in a safetensors file (read with safetensors itself, not our header parser)."""
    return sum(tensor.numel() for key, tensor in load_file(str(path)).items() if keep(key))


def used_by_trimmed_encoder(key: str) -> bool:
    """Qwen3 weights the encoder cut after layer 27 loads: embeddings and layers 0..26."""
    if ".layers." in key:
        return int(key.split(".layers.")[1].split(".")[0]) < 27
    return "embed_tokens" in key


def image_of(pipeline: Pipeline, request: GenerateRequest = REQUEST):
    return pipeline.generate(request).images[0].image


@pytest.fixture(scope="module")
def expected_image(pipeline: Pipeline):
    """The diffusers-layout directory's image for REQUEST: what any source of the same weights must give."""
    image = image_of(pipeline)
    # A flat image would make "pixel-identical" meaningless.
    assert np.asarray(image).std() > 10
    return image


def copy_model(tiny_dir: Path, destination: Path, *, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(tiny_dir, destination, ignore=shutil.ignore_patterns(*without) if without else None)
    return destination


def edit_json(path: Path, **changes: object) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --- diffusers-layout directories -------------------------------------------------------------------------


def test_diffusers_directory_is_distilled_tiny(tiny_dir: Path, pipeline: Pipeline) -> None:
    source = resolve_source(str(tiny_dir))
    assert source.directory == tiny_dir
    assert source.transformer_file is None  # transformer/ exists, the root single file is not used
    info = inspect_source(source)
    spec = info.spec
    defaults = (spec.name, spec.distilled, spec.default_steps, spec.default_guidance)
    assert defaults == ("tiny-random", True, 4, 1.0)
    assert not spec.uses_cfg and spec.guidance_fixed
    assert pipeline.spec == spec
    assert info.stored_dtypes == {"transformer": "F32", "text_encoder": "F32", "vae": "F32"}
    # Parameter counts from the headers are the values in the files (the text encoder: only what it loads).
    assert info.transformer_parameters == file_values(tiny_dir / TRANSFORMER_FILE) == spec.parameters
    assert info.text_encoder_parameters == file_values(tiny_dir / TEXT_ENCODER_FILE, used_by_trimmed_encoder)
    assert info.vae_parameters == file_values(tiny_dir / VAE_FILE)
    assert len(pipeline.components.text_encoder.layers) == 27
    result = pipeline.generate(REQUEST)
    assert (result.width, result.height, result.steps, result.guidance) == (64, 64, 4, 1.0)
    assert result.images[0].image.size == (64, 64)


def test_base_directory_uses_cfg_defaults(tiny_base_dir: Path) -> None:
    base = load(str(tiny_base_dir))
    spec = base.spec
    defaults = (spec.name, spec.distilled, spec.default_steps, spec.default_guidance)
    assert defaults == ("tiny-random-base", False, 50, 4.0)
    assert spec.uses_cfg and not spec.guidance_fixed
    resolved = base.resolve(GenerateRequest(prompt="a fox", width=64, height=64, seed=1))
    assert (resolved.steps, resolved.guidance, resolved.use_cfg) == (50, 4.0, True)
    # A short CFG run works end to end.
    result = base.generate(GenerateRequest(prompt="a fox", width=64, height=64, seed=1, steps=2))
    assert (result.steps, result.guidance) == (2, 4.0)
    assert result.images[0].image.size == (64, 64)


# --- BFL single-file transformer --------------------------------------------------------------------------


def transformer_output(pipeline: Pipeline) -> torch.Tensor:
    """The transformer's velocity for fixed random inputs (whatever form its weights take in memory)."""
    generator = torch.Generator().manual_seed(0)
    config = pipeline.components.transformer.config
    hidden = torch.randn(1, 16, config["in_channels"], generator=generator)
    text = torch.randn(1, 8, config["joint_attention_dim"], generator=generator)
    with torch.inference_mode():
        return pipeline.components.transformer(
            hidden_states=hidden,
            encoder_hidden_states=text,
            timestep=torch.tensor([0.7]),
            img_ids=latents.image_ids(4, 4),
            txt_ids=latents.text_ids(8),
            guidance=None,
            return_dict=False,
        )[0]


def test_bfl_single_file_loads_the_same_transformer(tiny_dir: Path, pipeline: Pipeline) -> None:
    """Guards the key mapping of model.md section 8 (qkv split, swapped final-layer halves) and the config
    inferred from the tensor shapes."""
    file = tiny_dir / BFL_TINY_FILE
    source = resolve_source(str(file))
    assert (source.directory, source.transformer_file) == (tiny_dir, file)
    single = load(str(file))
    assert single.spec == pipeline.spec
    config = single.components.transformer.config
    reference_config = pipeline.components.transformer.config
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim"):
        assert config[key] == reference_config[key], key
    for key in ("num_attention_heads", "joint_attention_dim", "mlp_ratio", "rope_theta", "guidance_embeds"):
        assert config[key] == reference_config[key], key
    assert tuple(config["axes_dims_rope"]) == tuple(reference_config["axes_dims_rope"])
    # Every tensor the modules keep as such is equal...
    expected = pipeline.components.transformer.state_dict()
    loaded = single.components.transformer.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key
    # ...and so is what they compute (a swapped or misplaced weight changes it at 1e-1, not 1e-7).
    torch.testing.assert_close(transformer_output(single), transformer_output(pipeline), rtol=1e-5, atol=1e-6)


def test_bfl_single_file_matches_diffusers_layout(tiny_dir: Path, expected_image) -> None:
    """Same weights, same request, same seed: the same pixels, whatever file the weights came from."""
    single = load(str(tiny_dir / BFL_TINY_FILE))
    assert max_difference(image_of(single), expected_image) == 0


def test_directory_without_transformer_folder_uses_root_single_file(
    tiny_dir: Path, tmp_path: Path, expected_image
) -> None:
    model = copy_model(tiny_dir, tmp_path / "klein", without=("transformer",))
    source = resolve_source(str(model))
    assert (source.directory, source.transformer_file) == (model, model / BFL_TINY_FILE)
    assert max_difference(image_of(load(str(model))), expected_image) == 0


def test_prefixed_bfl_keys_load(tiny_dir: Path, tmp_path: Path, expected_image) -> None:
    """ComfyUI-style files prefix every key with `model.diffusion_model.`; components from another folder."""
    state = load_file(str(tiny_dir / BFL_TINY_FILE))
    file = tmp_path / "flux-2-klein-comfy.safetensors"
    save_file({f"model.diffusion_model.{key}": value for key, value in state.items()}, str(file))
    source = resolve_source(str(file), components=str(tiny_dir))
    assert (source.directory, source.transformer_file) == (tiny_dir, file)
    single = load(str(file), components=str(tiny_dir))
    assert max_difference(image_of(single), expected_image) == 0


def test_bfl_conversion_round_trips_exactly(tiny_dir: Path) -> None:
    diffusers_state = load_file(str(tiny_dir / TRANSFORMER_FILE))
    bfl_state = diffusers_to_bfl_transformer(diffusers_state)
    back = bfl_to_diffusers_transformer(bfl_state)
    assert back.keys() == diffusers_state.keys()
    for key, tensor in diffusers_state.items():
        assert torch.equal(back[key], tensor), key
    # The file create-tiny writes is exactly that conversion.
    on_disk = load_file(str(tiny_dir / BFL_TINY_FILE))
    assert on_disk.keys() == bfl_state.keys()
    for key, tensor in bfl_state.items():
        assert torch.equal(on_disk[key], tensor), key
    # The two places where the layouts differ by more than a name (model.md section 8).
    final = diffusers_state["norm_out.linear.weight"]  # diffusers: (scale, shift)
    scale, shift = final.chunk(2, dim=0)
    assert not torch.equal(scale, shift)
    assert torch.equal(bfl_state["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    qkv = bfl_state["double_blocks.0.img_attn.qkv.weight"]
    names = ("to_q", "to_k", "to_v")
    parts = [diffusers_state[f"transformer_blocks.0.attn.{name}.weight"] for name in names]
    assert torch.equal(qkv, torch.cat(parts))
    txt = [diffusers_state[f"transformer_blocks.0.attn.add_{c}_proj.weight"] for c in "qkv"]
    assert torch.equal(bfl_state["double_blocks.0.txt_attn.qkv.weight"], torch.cat(txt))


# --- Hugging Face repo id, from the local cache -----------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of our own, so that the user's real cache is never read.

    huggingface_hub (2.x) reads HF_HUB_CACHE once, when `huggingface_hub.constants` is imported (which
    conftest's imports have already done), and snapshot_download looks up `constants.HF_HUB_CACHE` on every
    call. Setting the environment variable alone would therefore not be seen: patch both.
    """
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def add_to_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay out `files` as `hf download` does: content-addressed blobs, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in files.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_repo_id_loads_from_local_cache(hub_cache: Path, tiny_dir: Path, expected_image) -> None:
    snapshot = add_to_hub_cache(hub_cache, "owner/name", tiny_dir)
    assert (snapshot / TRANSFORMER_FILE).is_symlink()
    source = resolve_source("owner/name")
    assert source.directory.resolve() == snapshot.resolve()
    assert source.transformer_file is None
    cached = load("owner/name")
    assert cached.spec.name == "tiny-random"
    assert max_difference(image_of(cached), expected_image) == 0


def test_uncached_repo_id_names_the_fix(hub_cache: Path, tiny_dir: Path) -> None:
    add_to_hub_cache(hub_cache, "owner/name", tiny_dir)  # a different repo is cached
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline("owner/missing")
    message = caught.value.message
    assert message.startswith("owner/missing: ")
    assert "not in the local Hugging Face cache" in message
    assert "hf download owner/missing" in message


# --- tiny-random by name ----------------------------------------------------------------------------------


def test_tiny_random_by_name_is_written_to_the_cache_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected_image
) -> None:
    monkeypatch.setenv("KLEINSERVE_CACHE", str(tmp_path / "cache"))
    source = resolve_source("tiny-random")
    assert source.directory.parent == tmp_path / "cache"
    index = source.directory / "model_index.json"
    written = index.stat().st_mtime_ns
    by_name = load("tiny-random")
    assert index.stat().st_mtime_ns == written  # the second resolve reuses the files
    assert by_name.spec.name == "tiny-random"
    # The same seed-0 weights as the session's tiny_dir, so the same pixels.
    assert max_difference(image_of(by_name), expected_image) == 0


# --- bad sources ------------------------------------------------------------------------------------------


def remove_vae_config(model: Path) -> tuple[Path, str]:
    (model / "vae" / "config.json").unlink()
    return model / "vae" / "config.json", "file not found"


def invalid_vae_config(model: Path) -> tuple[Path, str]:
    (model / "vae" / "config.json").write_text("{not json")
    return model / "vae" / "config.json", "not valid JSON"


def corrupt_transformer(model: Path) -> tuple[Path, str]:
    path = model / TRANSFORMER_FILE
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path, "not a readable safetensors file"


def truncate_transformer(model: Path) -> tuple[Path, str]:
    path = model / TRANSFORMER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated safetensors file"


def truncate_text_encoder(model: Path) -> tuple[Path, str]:
    path = model / TEXT_ENCODER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated safetensors file"


def narrow_text_encoder(model: Path) -> tuple[Path, str]:
    edit_json(model / "text_encoder" / "config.json", hidden_size=24)
    return model / "text_encoder" / "config.json", "joint_attention_dim 48"


def remove_tokenizer(model: Path) -> tuple[Path, str]:
    shutil.rmtree(model / "tokenizer")
    return model / "tokenizer", "tokenizer folder not found"


def remove_transformer_weights(model: Path) -> tuple[Path, str]:
    (model / TRANSFORMER_FILE).unlink()
    return model / "transformer", "no .safetensors weights found"


def transformer_config_needs_more_layers(model: Path) -> tuple[Path, str]:
    """The config asks for a second double block the weights do not have."""
    edit_json(model / "transformer" / "config.json", num_layers=2)
    return model / "transformer", "transformer_blocks.1"


def text_encoder_missing_a_layer(model: Path) -> tuple[Path, str]:
    """A text encoder checkpoint without layer 5: its weights must not be made up."""
    path = model / TEXT_ENCODER_FILE
    state = {k: v for k, v in load_file(str(path)).items() if ".layers.5." not in k}
    save_file(state, str(path), metadata={"format": "pt"})
    return model / "text_encoder", "layers.5"


@pytest.mark.parametrize(
    "damage",
    [
        remove_vae_config,
        invalid_vae_config,
        corrupt_transformer,
        truncate_transformer,
        truncate_text_encoder,
        narrow_text_encoder,
        remove_tokenizer,
        remove_transformer_weights,
        transformer_config_needs_more_layers,
        text_encoder_missing_a_layer,
    ],
)
def test_damaged_directory_names_file_and_expectation(
    damage: Callable[[Path], tuple[Path, str]], tiny_dir: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_dir, tmp_path / "klein")
    offending, expectation = damage(model)
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(model))
    message = caught.value.message
    assert message.startswith(f"{offending}:"), message
    assert expectation in message, message


def test_narrow_text_encoder_explains_the_widths(tiny_dir: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_dir, tmp_path / "klein")
    narrow_text_encoder(model)
    with pytest.raises(ModelLoadError) as caught:
        inspect_source(resolve_source(str(model)))  # fails on the configs, before any weight is read
    message = caught.value.message
    assert "hidden_size 24 gives 72-wide prompt embeddings" in message
    assert "joint_attention_dim 48" in message


def test_unknown_layout(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("# hello\n")
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(folder))
    message = caught.value.message
    assert message.startswith(f"{folder}: unknown layout")
    assert "model_index.json" in message and ".safetensors" in message


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "klein"
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(missing))
    assert caught.value.message.startswith(f"{missing}: no such file or directory")


def test_text_file_as_model(tmp_path: Path) -> None:
    notes = tmp_path / "model.txt"
    notes.write_text("flux-2-klein-4b\n")
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(notes))
    message = caught.value.message
    assert message.startswith(f"{notes}:")
    assert "expected a .safetensors transformer checkpoint or a model directory" in message


def test_diffusers_transformer_file_is_not_a_bfl_file(tiny_dir: Path) -> None:
    """A user passing transformer/diffusion_pytorch_model.safetensors as the single file."""
    file = tiny_dir / TRANSFORMER_FILE
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(file), components=str(tiny_dir))
    message = caught.value.message
    assert message.startswith(f"{file}: not a FLUX.2 transformer in BFL naming")
    assert "single_stream_modulation.lin.weight" in message


@pytest.mark.parametrize(
    ("keep", "expectation"),
    [(0.5, "truncated safetensors file"), (0.001, "not a readable safetensors file (header length")],
)
def test_cut_single_file(tiny_dir: Path, tmp_path: Path, keep: float, expectation: str) -> None:
    """Cut in half (header intact, data missing) or inside the header (an interrupted download)."""
    data = (tiny_dir / BFL_TINY_FILE).read_bytes()
    file = tmp_path / "flux-2-klein-4b.safetensors"
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(file), components=str(tiny_dir))
    assert caught.value.message.startswith(f"{file}: {expectation}"), caught.value.message
