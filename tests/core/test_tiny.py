"""`make-tiny --native`: the tiny checkpoint core ComfyUI's loaders take as they are, and its export
(the files the native workflows name). In core ComfyUI itself: tests/comfyui/test_comfyui_workflows.py."""

import json

import pytest
from safetensors import safe_open

from consisid_core.checkpoint import Checkpoint
from consisid_core.cli import main
from consisid_core.errors import ConsisIDError
from consisid_core.tiny import make_tiny
from native_tools import vae_file
from workflow_tools import NATIVE_FILES

SLOW = pytest.mark.slow  # the session's native tiny takes tens of seconds to write


@SLOW
def test_the_transformer_has_the_shapes_cores_cogvideox_detection_reads(native_tiny_dir):
    """comfy/model_detection.py takes the heads to be 64 wide and the channels CogVideoX I2V's."""
    config = Checkpoint.open(native_tiny_dir).transformer_config
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (1, 64)
    assert (config["in_channels"], config["out_channels"], config["is_kps"]) == (32, 16, False)


@SLOW
def test_the_vae_is_the_released_architecture_in_float16(native_tiny_dir):
    """core's VAE Loader builds AutoencoderKLCogVideoX's defaults and reads only latent_channels."""
    from diffusers import AutoencoderKLCogVideoX

    released = AutoencoderKLCogVideoX.from_config({"scaling_factor": 0.7}).config
    config = json.loads((native_tiny_dir / "vae" / "config.json").read_text())
    for field in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "scaling_factor",
                  "temporal_compression_ratio"):
        assert config[field] == (list(released[field]) if isinstance(released[field], tuple) else released[field])
    with safe_open(vae_file(native_tiny_dir), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}
    assert shapes["encoder.conv_out.conv.weight"][0] == 2 * 16  # what core reads latent_channels from
    assert shapes["decoder.up_blocks.3.resnets.2.conv2.conv.weight"] == [128, 128, 3, 3, 3]


@SLOW
def test_it_has_face_models_and_exports_the_files_the_native_workflows_name(native_tiny_dir, tmp_path, capsys):
    assert (native_tiny_dir / "face_encoder" / "models" / "antelopev2" / "glintr100.onnx").is_file()
    capsys.readouterr()
    assert main(["export", "--model", str(native_tiny_dir), "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == sorted(NATIVE_FILES)


def test_native_and_kps_together_are_refused_in_one_line_writing_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-tiny", str(tmp_path / "t"), "--native", "--kps"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--native" in err and "--kps" in err, err
    with pytest.raises(ConsisIDError, match="a native tiny checkpoint cannot have is_kps on"):
        make_tiny(tmp_path / "t", native=True, kps=True)
    assert list(tmp_path.iterdir()) == []
