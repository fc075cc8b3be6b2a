"""README's demo results block equals what tools/readme_results.py generates from the demo's report.json (a copy
of a `make demo` run's report is kept in tests/fixtures/; `make demo` itself checks the live one)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_match_the_saved_demo_report():
    assert _tool().main(["--check", "--report", str(ROOT / "tests" / "fixtures" / "demo_report.json")]) == 0


def test_a_changed_figure_is_caught(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("0.5836", "0.5850"))
    assert _tool().main(["--check", "--readme", str(readme),
                         "--report", str(ROOT / "tests" / "fixtures" / "demo_report.json")]) == 1


def test_readme_yolov8n_results_match_the_saved_second_demo_report():
    """The second demo's block (`make demo-yolov8n`), against a copy of that run's report.json."""
    assert _tool().main(["--check", "--block", "yolov8n-digits",
                         "--report", str(ROOT / "tests" / "fixtures" / "yolov8n_digits_report.json")]) == 0
