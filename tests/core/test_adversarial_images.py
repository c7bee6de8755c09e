"""Hostile images: files read by name (`media.read_image`, the CLI's --face and --image) and arrays
(`face.extract.to_rgb_uint8`, ComfyUI's IMAGE). Each is read, or refused with one line that names
it and what is wrong, from the header where the header says enough, never with PIL's traceback."""

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from consisid_core.errors import ConsisIDError, FaceError
from consisid_core.face.extract import to_rgb_uint8
from consisid_core.media import MAX_IMAGE_PIXELS, read_image


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bytes = b"\0", depth: int = 8, colour: int = 2) -> bytes:
    """A PNG with a valid signature and IHDR declaring width × height, and the IDAT given (by
    default one filter byte: a few bytes whatever size the header declares)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def encoded(array: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, kind)
    return buffer.getvalue()


def photo(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def refused(path) -> tuple[ConsisIDError, list]:
    """read_image's refusal, with the warnings raised meanwhile; checks it is one line of ours."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConsisIDError) as info:
            read_image(path)
    error = info.value
    message = str(error)
    assert type(error) is ConsisIDError and message.startswith(f"'{path}' ")
    assert "\n" not in message and all(c.isprintable() for c in message)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error, caught


@pytest.mark.parametrize("side", [50_000, 10_000, 9_000])
def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(tmp_path, side):
    """50000² is over PIL's own bomb limit, 10000² between its warning and its limit, 9000² just
    over ours; none is decoded (its pixels would take gigabytes, its IDAT holds one byte)."""
    path = tmp_path / "huge.png"
    path.write_bytes(png(side, side))
    assert len(path.read_bytes()) < 100 and side * side > MAX_IMAGE_PIXELS
    start = time.perf_counter()
    error, caught = refused(path)
    assert time.perf_counter() - start < 1
    if side > 13_000:  # PIL's DecompressionBombError, taken as our refusal
        assert str(error) == (
            f"'{path}' declares more pixels than any photo (a decompression bomb?); photos are read up to "
            "64 megapixels: scale it down first"
        )
    else:
        assert str(error) == f"'{path}' declares {side}×{side} pixels; photos are read up to 64 megapixels: scale it down first"
    assert caught == []  # no DecompressionBombWarning either


def test_an_image_within_the_bound_but_with_too_little_data_is_unreadable(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(png(4000, 4000))  # 16 megapixels declared, one byte of them given
    error, _ = refused(path)
    assert str(error).startswith(f"'{path}' is not a readable image (")


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.png", lambda: b"", "cannot identify image file"),
        ("text.png", lambda: b"a photo of me, honest\n", "cannot identify image file"),
        ("half.png", lambda: half(encoded(photo(), "PNG")), "image file is truncated"),
        ("half.jpg", lambda: half(encoded(photo(), "JPEG")), "image file is truncated ("),
        ("noise.jpg", lambda: encoded(photo(), "JPEG")[:200] + bytes(range(256)) * 4, "cannot load this image"),
        ("header.jpg", lambda: b"\xff\xd8\xff\xe0" + b"garbage" * 30, "Truncated File Read"),
        ("png.jpg", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "cannot identify image file"),
    ],
)
def test_broken_files_are_refused_in_one_line(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data())
    error, _ = refused(path)
    assert str(error).startswith(f"'{path}' is not a readable image (") and str(error).endswith(")")
    assert reason in str(error)


def test_a_name_that_is_no_file_is_refused(tmp_path):
    (tmp_path / "photos.png").mkdir()
    for path, says in (
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path / "photos.png", "is a folder: give an image file"),
    ):
        with pytest.raises(ConsisIDError) as info:
            read_image(path)
        assert str(info.value) == f"image '{path}' {says}"


def test_a_one_pixel_image_reads_and_holds_no_face(tmp_path, tiny_dir):
    from consisid_core.face import extract_identity, load_face_models

    path = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    assert read_image(path).size == (1, 1) and to_rgb_uint8(path).shape == (1, 1, 3)
    with pytest.raises(FaceError) as info:
        extract_identity(load_face_models(tiny_dir / "face_encoder"), path)
    assert str(info.value) == (
        f"no face found in {path} (1×1 after resizing): use a clearer, larger, well-lit, frontal photo with one face"
    )


def test_16_bit_pngs_read_and_scale_to_8_bits(tmp_path):
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(grey)
    image = read_image(grey)
    assert image.mode.startswith("I;16") and image.size == (3, 1)
    assert to_rgb_uint8(grey).tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]

    rgb = tmp_path / "rgb16.png"
    pixels = np.array([[[65535, 0, 32768], [0, 65535, 257]]], ">u2")
    rgb.write_bytes(png(2, 1, b"\0" + pixels.tobytes(), depth=16, colour=2))
    assert read_image(rgb).size == (2, 1)
    assert to_rgb_uint8(rgb).tolist() == [[[255, 0, 128], [0, 255, 1]]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["numpy float32", "numpy float64", "comfyui tensor", "bfloat16 tensor"])
def test_arrays_with_nan_or_infinity_are_refused(bad, kind):
    array = np.random.default_rng(0).random((8, 8, 3))
    array[2, 3, 1] = bad
    image = {
        "numpy float32": array.astype(np.float32),
        "numpy float64": array,
        "comfyui tensor": torch.from_numpy(array).float().unsqueeze(0),
        "bfloat16 tensor": torch.from_numpy(array).to(torch.bfloat16),
    }[kind]
    with pytest.raises(FaceError) as info:
        to_rgb_uint8(image, "photo 2")
    assert str(info.value) == "photo 2: the image has NaN or infinite values"


@pytest.mark.parametrize(
    "array",
    [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0, 3), np.float32), np.zeros((1, 0, 0, 3), np.float32),
     np.zeros((5, 0, 3), np.uint8)],
    ids=["[0, 0, 3] uint8", "[0, 0, 3] float", "[1, 0, 0, 3]", "[5, 0, 3]"],
)
def test_arrays_without_pixels_are_refused(array):
    with pytest.raises(FaceError) as info:
        to_rgb_uint8(array)
    shape = list(array.shape[1:] if array.ndim == 4 else array.shape)
    assert str(info.value) == f"the face image: expected an image [H, W], [H, W, 3] or [H, W, 4], found shape {shape}"


def test_odd_arrays_are_refused_and_plain_ones_read():
    for array, says in (
        (np.zeros((2, 8, 8, 3)), "expected an image [H, W], [H, W, 3] or [H, W, 4], found shape [2, 8, 8, 3]"),
        (np.zeros((8, 8, 2)), "found shape [8, 8, 2]"),
        (np.array(0.5), "found shape []"),
        (np.zeros((8, 8, 3), np.complex64), "unsupported pixel type complex64"),
        (np.zeros((8, 8, 3), object), "unsupported pixel type object"),
    ):
        with pytest.raises(FaceError) as info:
            to_rgb_uint8(array)
        assert str(info.value).startswith("the face image: ") and str(info.value).endswith(says)
    assert to_rgb_uint8(np.full((2, 2, 3), 0.5, np.float32)).tolist() == [[[128] * 3] * 2] * 2
    assert to_rgb_uint8(torch.ones(1, 2, 2, 4)).tolist() == [[[255] * 3] * 2] * 2


# ---------------------------------------------------------------------------------------------
# ComfyUI's IMAGE, as every node that takes one checks it (`checks.check_image`)

from consisid_core.checks import check_image  # noqa: E402


@pytest.mark.parametrize(
    "image, found",
    [
        (torch.zeros(0, 8, 8, 3), "float32 [0, 8, 8, 3]"),
        (torch.zeros(1, 0, 0, 3), "float32 [1, 0, 0, 3]"),
        (torch.zeros(1, 8, 8, 0), "float32 [1, 8, 8, 0]"),
        (torch.zeros(1, 8, 8, 5), "float32 [1, 8, 8, 5]"),
        (torch.zeros(8, 8, 3), "float32 [8, 8, 3]"),
        (torch.tensor(0.5), "float32 []"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), "uint8 [1, 8, 8, 3]"),
        (torch.ones(1, 8, 8, 3, dtype=torch.bool), "bool [1, 8, 8, 3]"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.complex64), "complex64 [1, 8, 8, 3]"),
        (np.zeros((1, 8, 8, 3), np.float32), "ndarray"),
        (None, "NoneType"),
    ],
)
def test_what_is_no_image_batch_is_refused_in_one_line(image, found):
    with pytest.raises(FaceError) as info:
        check_image(image, "photo input", "connect a Load Image", FaceError)
    assert str(info.value) == (
        f"the photo input ({found}) is not an IMAGE: a float batch [images, height, width, channels] with at least one "
        "pixel and 1 to 4 channels; connect a Load Image"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_image_batch_with_nan_or_infinity_is_refused(bad, dtype):
    image = torch.rand(2, 8, 8, 3).to(dtype)
    image[1, 2, 3, 1] = bad
    with pytest.raises(ConsisIDError) as info:
        check_image(image, "frames input", "connect a video's frames")
    assert str(info.value) == "the frames input holds NaN or infinite pixels; connect a video's frames"


def test_grey_grey_alpha_and_rgba_batches_are_taken_as_rgb():
    rgb = torch.rand(2, 4, 5, 3)
    grey = rgb[..., :1]
    assert torch.equal(check_image(rgb, "image", ""), rgb)
    assert torch.equal(check_image(torch.cat([rgb, torch.ones(2, 4, 5, 1)], -1), "image", ""), rgb)
    assert torch.equal(check_image(grey, "image", ""), grey.expand(2, 4, 5, 3))
    assert torch.equal(check_image(torch.cat([grey, torch.zeros(2, 4, 5, 1)], -1), "image", ""), grey.expand(2, 4, 5, 3))
