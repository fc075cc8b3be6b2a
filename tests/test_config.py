"""Configs are validated on creation: unknown keys, wrong types, bad regexes and bad devices are one TrtQatError."""
import pytest
import yaml

from trt_qat.config import QATConfig, QuantConfig, check_device, from_dict, load_pipeline_config
from trt_qat.errors import TrtQatError


def test_numbers_written_as_strings_are_read_as_numbers():
    cfg = from_dict(QATConfig, {"lr": "1e-4", "epochs": "3"}, "qat")  # PyYAML reads 1e-4 as a string
    assert cfg.lr == 1e-4 and cfg.epochs == 3


@pytest.mark.parametrize("values, msg", [
    ({"epochs": "two"}, "'qat.epochs' must be int"),
    ({"epochs": 2.5}, "'qat.epochs' must be int"),
    ({"freeze_amax": "no"}, "'qat.freeze_amax' must be bool"),
    ({"grad_clip": "x"}, "'qat.grad_clip' must be float or null"),
    ({"optimizer": 3}, "'qat.optimizer' must be str"),
])
def test_wrong_types_are_one_clear_error(values, msg):
    with pytest.raises(TrtQatError, match=msg):
        from_dict(QATConfig, values, "qat")


def test_bad_sections_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"qat": 5}))
    with pytest.raises(TrtQatError, match="section 'qat' must be a mapping"):
        load_pipeline_config(path)
    path.write_text("qat:\n")  # an empty section, then --set into it
    assert load_pipeline_config(path, {"qat.epochs": 1}).qat.epochs == 1
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TrtQatError, match="not valid UTF-8 YAML"):
        load_pipeline_config(path)


def test_bad_skip_regex_and_device():
    with pytest.raises(TrtQatError, match="not a valid regex"):
        QuantConfig(skip=["("])
    with pytest.raises(TrtQatError, match="unknown device 'gpu0'"):
        check_device("gpu0")
    with pytest.raises(TrtQatError, match="unknown device"):
        QATConfig(device="gpu0")
    assert check_device(None) is None and str(check_device("cpu")) == "cpu"


def test_export_opset_bounds_are_checked_on_creation():
    from trt_qat.config import ExportConfig

    with pytest.raises(TrtQatError, match="opset 99 is newer"):
        ExportConfig(opset=99)
    with pytest.raises(TrtQatError, match="opset 11 is too old"):
        ExportConfig(opset=11)
    assert ExportConfig(opset=17).opset == 17


def test_data_imgsz_null_means_the_checkpoints_size():
    from trt_qat.config import DataConfig

    assert DataConfig().imgsz is None and DataConfig(imgsz=96).imgsz == 96
    with pytest.raises(TrtQatError, match="data.imgsz=100 must be a multiple of 32"):
        DataConfig(imgsz=100)
