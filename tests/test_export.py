"""ONNX export (issue 20) without a pipeline: torch-free decoding, the parity check, bad files.

The export stages themselves, through real `dvc repro`, are tested in test_pipeline_dvc.py; the
torch-free `tlpipe predict` on their files in test_experiments.py.
"""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tlpipe.deploy import export
from tlpipe.deploy.onnx_model import SEAL_KEY, UNSEALED, OnnxModel, seal
from tlpipe.ingest.decoded import DecodedSplit, ShardWriter
from tlpipe.ingest.pixels import eval_pixels
from tlpipe.nets import calibration
from tlpipe.nets.models import Classifier
from tlpipe.runtime import TlpipeError

RECORD = {"img_size": 16, "resize_size": 20, "interpolation": "bicubic", "jpeg_draft": True,
          "normalize": "backbone", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
CLASSES = ["ant", "bee", "wasp"]


# --- decoding without torch is torchvision's Resize + CenterCrop to the byte ----------------------

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("img_size, resize_size", [(32, 36), (224, 256), (64, 64)])
def test_eval_pixels_equal_torchvision_resize_and_centre_crop(interpolation, img_size, resize_size):
    from torchvision.transforms import v2

    mode = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}[interpolation]
    reference = v2.Compose([v2.Resize(resize_size, interpolation=mode, antialias=True),
                            v2.CenterCrop(img_size), v2.PILToTensor()])
    rng = np.random.default_rng(0)
    for w, h in [(80, 50), (50, 80), (36, 36), (37, 41), (1000, 3), (3, 999), (225, 300), (257, 256),
                 (640, 427)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = eval_pixels(img, img_size, resize_size, interpolation)
        assert got.dtype == np.uint8 and got.shape == (3, img_size, img_size)
        assert np.array_equal(got, reference(img).numpy()), (w, h)


# --- the export and its parity check, on small real models ---------------------------------------

def decoded_test_split(folder, n: int, low: int, high: int) -> DecodedSplit:
    """A decoded split of n random images with pixel values in [low, high)."""
    s = RECORD["img_size"]
    writer = ShardWriter(folder, "test", (3, s, s))
    images = torch.randint(low, high, (n, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    writer.add(images, torch.arange(n))
    writer.flush()
    geometry = {k: RECORD[k] for k in ("img_size", "resize_size", "interpolation", "jpeg_draft")}
    return DecodedSplit("test", folder, {"splits": {"test": {"shards": writer.sizes}}, "preprocessing": geometry,
                                         "files": writer.files})


class Trunk(nn.Module):
    """A small convnet trunk (pooled features), optionally with data-dependent control flow."""

    def __init__(self, branchy: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.branchy = branchy

    def forward(self, x):
        f = self.conv(x)
        # Tracing records the branch its example input (zeros, normalized to -1) takes: an exporter
        # bug of the kind parity exists to catch. Bright images take the other one in PyTorch.
        if self.branchy and float(x.mean()) > 0:
            return -4 * f
        return f


TEMPERATURE = 1.7  # a fitted temperature (tlpipe.nets.calibration) that the export bakes into the graph


def export_tiny(tmp_path, branchy: bool = False, low: int = 0, high: int = 256, temperature: float = TEMPERATURE):
    model = Classifier(Trunk(branchy), nn.Linear(8, len(CLASSES))).eval()
    source = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
    cfg = {"classes": CLASSES, "preprocessing": RECORD, "backbone": "tiny", "weights_sha256": "0" * 64}
    (tmp_path / "decoded").mkdir()
    test = decoded_test_split(tmp_path / "decoded", 37, low, high)
    out, metrics = tmp_path / "model.onnx", tmp_path / "export.json"
    numbers = export.export(model, cfg, source, tmp_path / "model.json", out, metrics, test, temperature,
                            str(tmp_path / "calibration.json"))
    return model, out, metrics, numbers, test


def test_export_writes_a_checked_onnx_file_with_its_metadata(tmp_path):
    model, out, metrics, numbers, test = export_tiny(tmp_path)
    assert json.loads(metrics.read_text()) == numbers
    assert numbers["images"] == 37 and numbers["argmax_mismatches"] == 0
    assert numbers["max_abs_prob_diff"] <= export.TOLERANCE
    assert numbers["onnx_bytes"] == out.stat().st_size

    proto = onnx.load(str(out))
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["preprocessing"]) == RECORD
    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert float(meta["temperature"]) == TEMPERATURE and meta["temperature_from"] == str(tmp_path / "calibration.json")
    assert numbers["temperature"] == TEMPERATURE
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch

    # Any batch size gives PyTorch's probabilities, calibrated as `tlpipe predict` calibrates them
    # (the temperature on the log of the softmax), and its raw logits.
    runtime = OnnxModel(out)
    assert runtime.temperature == TEMPERATURE
    pixels, _ = test.rows(0, 5)
    with torch.no_grad():
        logits = model((pixels.float() / 255 - 0.5) / 0.5)
    calibrated = calibration.scaled_proba(calibration.logits_of(torch.softmax(logits, dim=1)), TEMPERATURE).numpy()
    as_trained = torch.softmax(logits, dim=1).numpy()
    assert np.abs(calibrated - as_trained).max() > 1e-3  # the temperature matters on these images
    for n in (1, 5):
        proba, raw = runtime.run(pixels[:n].numpy())
        assert proba == pytest.approx(calibrated[:n], abs=1e-5)
        assert raw == pytest.approx(logits[:n].numpy(), abs=1e-4)
        assert runtime.proba(pixels[:n].numpy()) == pytest.approx(calibrated[:n], abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_temperature_stops_the_export_in_one_line(tmp_path, temperature):
    with pytest.raises(TlpipeError) as err:
        export_tiny(tmp_path, temperature=temperature)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'calibration.json'}: temperature ")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_parity_failure_stops_in_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(TlpipeError) as err:
        export_tiny(tmp_path, branchy=True, low=200, high=256)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'model.onnx'}: onnxruntime disagrees with PyTorch")
    assert "limit 1e-04" in message
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "export.json").exists()
    assert [p.name for p in tmp_path.glob(".model.onnx*")] == []  # no temporary left either


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_parity_passes_where_the_traced_branch_is_the_one_taken(tmp_path):
    """The same model on dark images: PyTorch takes the traced branch, so the check passes (the
    failure above is the data, not the check being too strict)."""
    _, out, _, numbers, _ = export_tiny(tmp_path, branchy=True, low=0, high=100)
    assert out.is_file() and numbers["argmax_mismatches"] == 0


# --- bad .onnx files are refused in one line -----------------------------------------------------

def one_line_error(path) -> str:
    with pytest.raises(TlpipeError) as err:
        OnnxModel(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def save_sealed(proto, path) -> None:
    """Save an edited model sealed anew: a file written that way, not altered after its export."""
    for p in proto.metadata_props:
        if p.key == SEAL_KEY:
            p.value = UNSEALED
    path.write_bytes(seal(proto.SerializeToString()))


def test_corrupted_or_foreign_onnx_files_fail_in_one_line(tmp_path):
    _, out, _, _, _ = export_tiny(tmp_path)
    good = out.read_bytes()
    for name, data in {"garbage.onnx": b"not a model\n" * 10, "truncated.onnx": good[: len(good) // 2],
                       "empty.onnx": b""}.items():
        (tmp_path / name).write_bytes(data)
        assert "not a loadable ONNX model" in one_line_error(tmp_path / name)
    assert one_line_error(tmp_path / "absent.onnx").endswith("no such file")

    # A valid ONNX model, but not one of ours: no metadata, then a tampered record.
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    assert "not a tlpipe export" in one_line_error(tmp_path / "foreign.onnx")
    proto = onnx.load(str(out))
    for p in proto.metadata_props:
        if p.key == "preprocessing":
            p.value = json.dumps({**RECORD, "img_size": 24})
    save_sealed(proto, tmp_path / "resized.onnx")
    assert "uint8 N x 3 x 24 x 24" in one_line_error(tmp_path / "resized.onnx")
    proto = onnx.load(str(out))
    for p in proto.metadata_props:
        if p.key == "temperature":
            p.value = "hot"
    save_sealed(proto, tmp_path / "hot.onnx")
    assert "metadata 'temperature' is 'hot', not a number above 0" in one_line_error(tmp_path / "hot.onnx")
