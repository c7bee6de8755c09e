"""Checkpoint layout, loading, and the errors a wrong folder or file gets."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consisid_core.checkpoint import Checkpoint
from consisid_core.errors import CheckpointError, ConsisIDError
from consisid_core.single_file import infer_transformer_config, load_transformer_file, read_safetensors_shapes
from consisid_core.text import load_text_encoder
from consisid_core.tiny import make_tiny


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    def copy() -> Path:
        target = tmp_path / "copy"
        shutil.copytree(tiny_dir, target)
        return target

    return copy


def test_tiny_checkpoint_has_the_released_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ConsisIDPipeline"
    assert index["transformer"] == ["diffusers", "ConsisIDTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLCogVideoX"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "CogVideoXDPMScheduler"]
    for path in (
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/spiece.model",
        "scheduler/scheduler_config.json",
    ):
        assert (tiny_dir / path).is_file(), path
    assert (tiny_dir / "face_encoder").is_dir()


def test_make_tiny_is_deterministic_from_the_seed(tiny_dir, tmp_path):
    same = _digests(make_tiny(tmp_path / "same", seed=0))
    assert same == _digests(tiny_dir)
    other = _digests(make_tiny(tmp_path / "other", seed=5))
    assert other["transformer/diffusion_pytorch_model.safetensors"] != same["transformer/diffusion_pytorch_model.safetensors"]


def test_make_tiny_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConsisIDError, match="not an empty folder"):
        make_tiny(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_loads_in_the_dtype_asked_for(tiny_dir, name, dtype):
    model = Checkpoint.open(tiny_dir).load_model(name)
    assert model.transformer.dtype == dtype
    assert model.vae.dtype == dtype
    assert model.scheduler_config["_class_name"] == "CogVideoXDPMScheduler"


def test_text_encoder_loads_with_its_tokenizer(tiny_dir):
    encoder = load_text_encoder(Checkpoint.open(tiny_dir), "fp32")
    ids = encoder.tokenizer("a person smiling").input_ids
    assert encoder.tokenizer.unk_token_id not in ids
    assert ids[-1] == encoder.tokenizer.eos_token_id


def test_unknown_dtype(tiny_dir):
    with pytest.raises(CheckpointError, match="dtype 'fp8' is not one of fp32, bf16, fp16"):
        Checkpoint.open(tiny_dir).load_model("fp8")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; expected a folder laid out like"):
        Checkpoint.open(tmp_path / "nope")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        Checkpoint.open(tmp_path / "x.safetensors")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError, match=r"model_index.json is missing \(found: transformer/\)"):
        Checkpoint.open(tmp_path)


def test_other_pipeline(copy_of):
    root = copy_of()
    index = json.loads((root / "model_index.json").read_text()) | {"_class_name": "CogVideoXImageToVideoPipeline"}
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names the pipeline 'CogVideoXImageToVideoPipeline'"):
        Checkpoint.open(root)


def test_missing_component(copy_of):
    root = copy_of()
    shutil.rmtree(root / "vae")
    with pytest.raises(CheckpointError, match="has no vae/ folder"):
        Checkpoint.open(root)


def test_missing_weights(copy_of):
    root = copy_of()
    (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"transformer' has none of diffusion_pytorch_model.safetensors"):
        Checkpoint.open(root)


def test_pickled_weights_are_refused(copy_of):
    root = copy_of()
    (root / "text_encoder" / "model.safetensors").rename(root / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only as pickled .bin files.*convert them to .safetensors"):
        Checkpoint.open(root)


def test_transformer_without_face_layers(copy_of):
    root = copy_of()
    path = root / "transformer" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"is_train_face": False}))
    with pytest.raises(CheckpointError, match="is_train_face off"):
        Checkpoint.open(root)


def test_corrupt_weights_get_a_loading_error(copy_of):
    root = copy_of()
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"vae' does not load as a AutoencoderKLCogVideoX"):
        Checkpoint.open(root).load_vae("fp32")


# -- one .safetensors file -------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_file(tiny_dir, tmp_path_factory):
    """The tiny transformer as one file, the way people keep it in models/diffusion_models."""
    path = tmp_path_factory.mktemp("single") / "consisid_transformer.safetensors"
    shutil.copy(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors", path)
    return path


def test_inferred_config_matches_the_written_one(tiny_dir, single_file):
    written = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    inferred = infer_transformer_config(read_safetensors_shapes(single_file))
    assert {k: written[k] for k in inferred} == inferred
    # what shapes cannot tell takes the released checkpoint's values: 49 frames at 480x720
    model = load_transformer_file(single_file, "fp32")
    assert (model.config.sample_frames, model.config.sample_height, model.config.sample_width) == (49, 60, 90)


@pytest.mark.parametrize("config", ["inferred", "folder"])
def test_single_file_loads_the_same_weights(tiny_dir, single_file, config):
    reference = Checkpoint.open(tiny_dir).load_transformer("fp32")
    loaded = load_transformer_file(single_file, "fp32", None if config == "inferred" else tiny_dir)
    ours = loaded.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert not any(p.is_meta for p in loaded.parameters())
    assert not any(b.is_meta for b in loaded.buffers())


def test_single_file_in_bf16(single_file):
    assert load_transformer_file(single_file, "bf16").dtype == torch.bfloat16


def test_single_file_must_be_safetensors(tmp_path):
    path = tmp_path / "consisid.ckpt"
    path.write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="is not a .safetensors file"):
        load_transformer_file(path)


def test_single_file_unreadable(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="is not a readable .safetensors file"):
        load_transformer_file(path)


def test_single_file_of_another_model(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a ConsisID transformer with diffusers key names: 'patch_embed"):
        load_transformer_file(path)


def test_single_file_with_unexpected_and_wrong_keys(single_file, tmp_path, tiny_dir):
    from safetensors.torch import load_file

    state = load_file(single_file)
    state["extra.weight"] = torch.zeros(1)
    state["norm_final.weight"] = torch.zeros(3)
    del state["proj_out.bias"]
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as e:
        load_transformer_file(path, config=tiny_dir)
    message = str(e.value)
    assert "1 missing (proj_out.bias)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "norm_final.weight: [3], expected [64]" in message


def test_vae_single_file_loads_the_same_weights_with_an_inferred_config(tiny_dir):
    from consisid_core.single_file import load_vae_file

    reference = Checkpoint.open(tiny_dir).load_vae("fp32")
    loaded = load_vae_file(tiny_dir / "vae" / "diffusion_pytorch_model.safetensors", "fp32")
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "scaling_factor"):
        assert loaded.config[key] == reference.config[key], key
    ours = loaded.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())


def test_vae_single_file_of_something_else(single_file):
    from consisid_core.single_file import load_vae_file

    with pytest.raises(CheckpointError, match="not a CogVideoX VAE with diffusers key names"):
        load_vae_file(single_file)


def test_model_from_two_files(tiny_dir):
    from consisid_core.single_file import model_from_files

    model = model_from_files(
        tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors",
        tiny_dir / "vae" / "diffusion_pytorch_model.safetensors",
        "fp32",
    )
    from diffusers import CogVideoXDPMScheduler

    assert model.checkpoint is None
    released = CogVideoXDPMScheduler.from_config(model.scheduler_config).config
    written = CogVideoXDPMScheduler.from_config(Checkpoint.open(tiny_dir).scheduler_config).config
    assert {k: v for k, v in released.items() if not k.startswith("_")} == {
        k: v for k, v in written.items() if not k.startswith("_")
    }


def test_a_vae_that_does_not_fit_the_transformer(tiny_dir, tmp_path):
    from consisid_core.single_file import model_from_files
    from consisid_core.tiny import TINY_VAE
    from diffusers import AutoencoderKLCogVideoX

    AutoencoderKLCogVideoX(**(TINY_VAE | {"latent_channels": 8})).save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="the VAE has 8 latent channels"):
        model_from_files(
            tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors",
            tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
            "fp32",
        )


def test_inferred_config_of_the_released_architecture():
    """The released transformer's shapes (48 heads x 64, 42 layers, the full Local Facial Extractor),
    built on the meta device so no memory is used: the inferred config is the released one."""
    from diffusers import ConsisIDTransformer3DModel

    released = dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, patch_size=2, use_rotary_positional_embeddings=True,
        is_train_face=True, cross_attn_interval=2, cross_attn_dim_head=128, cross_attn_num_heads=16,
        LFE_id_dim=1280, LFE_vit_dim=1024, LFE_depth=10, LFE_dim_head=64, LFE_num_heads=16,
        LFE_num_id_token=5, LFE_num_querie=32, LFE_output_dim=2048, LFE_ff_mult=4, LFE_num_scale=5,
    )
    with torch.device("meta"):
        model = ConsisIDTransformer3DModel(**released)
    inferred = infer_transformer_config({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert {k: inferred[k] for k in released} == released
